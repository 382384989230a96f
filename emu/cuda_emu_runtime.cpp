// The emulator's runtime (see cuda_emu.h): fibers, block barriers, warp
// collectives, shared memory and launches. Compiled once per harness, with
// the sanitizers when they are on: the fiber switches tell AddressSanitizer
// about the stacks they change to.
#include "cuda_emu.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
#define EMU_ASAN 1
#endif

// Fiber switches. glibc's swapcontext saves and restores the signal mask
// with a system call on every switch, which dominated the run time; on x86-64
// a switch is this: push the callee-saved registers and the SSE / x87
// control words, swap stack pointers, pop. Elsewhere, and under
// AddressSanitizer (which tracks ucontext's stacks itself), ucontext.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT) && !defined(__SANITIZE_ADDRESS__)
#define EMU_FAST_SWITCH 1
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack
)");
#endif

namespace emu {

[[noreturn]] void fail(const char* format, ...);

namespace {

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGatherBytes = 32;

const char* op_name(Op op) {
  static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                "__shfl_xor_sync", "__ballot_sync", "__any_sync", "__all_sync",
                                "__match_any_sync", "__match_all_sync", "__reduce_add_sync", "__reduce_min_sync",
                                "__reduce_max_sync", "__reduce_and_sync", "__reduce_or_sync", "__reduce_xor_sync",
                                "warp gather (ldmatrix / mma.sync)"};
  return names[static_cast<int>(op)];
}

enum class State : uint8_t { Runnable, AtBarrier, InCollective, Done };

struct Fiber {
#ifdef EMU_FAST_SWITCH
  void* sp;
#else
  ucontext_t context;
#endif
  uint3 thread_idx;
  unsigned linear;
  State state;
  uint64_t result;
  void* fake_stack;
  char* stack;
};

// A warp collective waiting for the rest of its mask.
struct Collective {
  unsigned mask;
  unsigned arrived;
  Op op;
  unsigned value_bytes;
  uint64_t values[32];
  int params[32];
  int widths[32];
};

struct Warp {
  Collective pending[32];
  int pending_count;
  // Op::Gather: every lane's bytes, copied when the collective completes.
  unsigned char gathered[32 * kMaxGatherBytes];
};

struct DynamicShared {
  const char* name;
  unsigned char* (*address)();
  size_t capacity;
};

struct Runtime {
  // The launch.
  const char* kernel = "";
  LaunchConfig config;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  uint3 block_idx{0, 0, 0};
  unsigned long long launches = 0;
  // The block.
  std::vector<Fiber> fibers;
  unsigned threads = 0;
  unsigned done = 0;
  unsigned at_barrier = 0;
  BarrierKind barrier_kind = BarrierKind::Sync;
  long long barrier_acc = 0;
  long long barrier_result = 0;
  std::vector<Warp> warps;
  Fiber* current = nullptr;
#ifdef EMU_FAST_SWITCH
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  // Fiber stacks, reused by every block.
  char* stacks = nullptr;
  size_t stack_bytes = 0;
  size_t stack_count = 0;
  // Options (environment).
  bool options_read = false;
  int schedule = 0;  // 0 forward, 1 reverse, 2 random
  uint64_t schedule_seed = 1;
  int poison = 0xff;
  std::mt19937_64 rng;
  std::vector<unsigned> order;
  // Shared memory.
  unsigned char* tls_block = nullptr;
  size_t tls_bytes = 0;
  std::vector<DynamicShared> dynamic_shared;
  std::vector<std::pair<const void*, unsigned>> opt_in;
  // Argument-width warnings already printed.
  std::vector<std::string> warned;
};

Runtime& rt() {
  static Runtime runtime;
  return runtime;
}

// ------------------------------------------------------------------ options
void read_options() {
  Runtime& r = rt();
  if (r.options_read) return;
  r.options_read = true;
  if (const char* s = std::getenv("EMU_SCHEDULE")) {
    const std::string v = s;
    if (v.empty() || v == "forward") {
      r.schedule = 0;
    } else if (v == "reverse") {
      r.schedule = 1;
    } else if (v.rfind("random", 0) == 0) {
      r.schedule = 2;
      if (v.size() > 7 && v[6] == ':') r.schedule_seed = std::strtoull(v.c_str() + 7, nullptr, 0);
    } else {
      std::fprintf(stderr, "emu: error: EMU_SCHEDULE=%s: expected forward, reverse or random[:seed]\n", s);
      std::abort();
    }
  }
  if (const char* s = std::getenv("EMU_SHARED_POISON")) r.poison = static_cast<int>(std::strtol(s, nullptr, 0)) & 0xff;
  r.rng.seed(r.schedule_seed);
}

// ----------------------------------------------------------- shared memory
// Every __shared__ variable lives in the TLS block of the object this
// runtime is linked into: the executable (emu/harness) or the fake
// libcuda.so (emu/libcuda), which defines no other thread_local. The block
// is per OS thread (a library's is allocated on its first use), so it is
// looked up at every launch.
thread_local volatile unsigned char tls_anchor;  // touched first: allocates a library's block

int find_tls_block(dl_phdr_info* info, size_t, void* data) {
  const auto self = reinterpret_cast<uintptr_t>(&find_tls_block);
  bool contains = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    const uintptr_t begin = info->dlpi_addr + ph.p_vaddr;
    if (ph.p_type == PT_LOAD && self >= begin && self < begin + ph.p_memsz) contains = true;
  }
  if (!contains) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type == PT_TLS && info->dlpi_tls_data != nullptr) {
      Runtime& r = *static_cast<Runtime*>(data);
      r.tls_block = static_cast<unsigned char*>(info->dlpi_tls_data);
      r.tls_bytes = info->dlpi_phdr[i].p_memsz;
    }
  }
  return 1;
}

void find_shared_memory() {
  Runtime& r = rt();
  tls_anchor = 0;
  r.tls_block = nullptr;
  r.tls_bytes = 0;
  dl_iterate_phdr(find_tls_block, &r);
  if (r.tls_block == nullptr) fail("cannot find the TLS block that holds __shared__ memory");
}

void poison_shared_memory() {
  Runtime& r = rt();
  if (r.tls_block != nullptr) std::memset(r.tls_block, r.poison, r.tls_bytes);
}

// A write past the launch's dynamic shared bytes left a byte unpoisoned.
void check_dynamic_shared_tail() {
  Runtime& r = rt();
  unsigned char expected[4096];
  std::memset(expected, r.poison, sizeof expected);
  for (const auto& d : r.dynamic_shared) {
    const unsigned char* base = d.address();
    for (size_t chunk = r.config.shared_bytes; chunk < d.capacity; chunk += sizeof expected) {
      const size_t n = std::min(sizeof expected, d.capacity - chunk);
      if (std::memcmp(base + chunk, expected, n) == 0) continue;
      size_t i = chunk;
      while (base[i] == expected[0]) ++i;
      fail("wrote %s[] (dynamic shared memory) at byte %zu, past the %u bytes the launch asked for", d.name, i,
           r.config.shared_bytes);
    }
  }
}

// ----------------------------------------------------------------- fibers
constexpr size_t kStackBytes = 256 * 1024;

void reserve_stacks(size_t count) {
  Runtime& r = rt();
  if (r.stack_count >= count) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  // One mapping, a guard page below each stack; untouched pages cost nothing.
  const size_t bytes = count * (kStackBytes + page);
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) {
    std::fprintf(stderr, "emu: error: cannot map %zu bytes of fiber stacks\n", bytes);
    std::abort();
  }
  for (size_t i = 0; i < count; ++i) mprotect(static_cast<char*>(base) + i * (kStackBytes + page), page, PROT_NONE);
  r.stacks = static_cast<char*>(base);
  r.stack_bytes = kStackBytes + page;
  r.stack_count = count;
  r.fibers.resize(count);
}

void fiber_main();

// Scheduler -> fiber.
void switch_to(Fiber* f) {
  Runtime& r = rt();
  r.current = f;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&r.scheduler_fake_stack, f->stack, kStackBytes);
#endif
#ifdef EMU_FAST_SWITCH
  emu_switch_stack(&r.scheduler_sp, f->sp);
#else
  swapcontext(&r.scheduler, &f->context);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(r.scheduler_fake_stack, nullptr, nullptr);
#endif
  r.current = nullptr;
}

// Fiber -> scheduler; returns when the scheduler resumes this fiber.
void yield() {
  Runtime& r = rt();
  Fiber* f = r.current;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&f->fake_stack, r.scheduler_stack_bottom, r.scheduler_stack_size);
#endif
#ifdef EMU_FAST_SWITCH
  emu_switch_stack(&f->sp, r.scheduler_sp);
#else
  swapcontext(&f->context, &r.scheduler);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &r.scheduler_stack_bottom, &r.scheduler_stack_size);
#endif
}

void fiber_main() {
  Runtime& r = rt();
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.scheduler_stack_bottom, &r.scheduler_stack_size);
#endif
  r.body(r.body_arg);
  r.current->state = State::Done;
  ++r.done;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, r.scheduler_stack_bottom, r.scheduler_stack_size);
#endif
#ifdef EMU_FAST_SWITCH
  void* unused;
  emu_switch_stack(&unused, r.scheduler_sp);  // never resumed
  __builtin_unreachable();
#else
  // Returning resumes uc_link, the scheduler.
#endif
}

// ------------------------------------------------------------- deadlocks
std::string lane_list(unsigned mask) {
  std::string s;
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    int e = l;
    while (e + 1 < 32 && ((mask >> (e + 1)) & 1u)) ++e;
    if (!s.empty()) s += ",";
    s += std::to_string(l);
    if (e > l) s += "-" + std::to_string(e);
    l = e;
  }
  return s.empty() ? "none" : s;
}

[[noreturn]] void report_deadlock() {
  Runtime& r = rt();
  std::string what;
  unsigned exited = 0;
  for (unsigned i = 0; i < r.threads; ++i) exited += r.fibers[i].state == State::Done ? 1u : 0u;
  what += std::to_string(r.at_barrier) + " of " + std::to_string(r.threads) + " threads wait at __syncthreads, " +
          std::to_string(exited) + " have exited";
  for (size_t w = 0; w < r.warps.size(); ++w) {
    const Warp& warp = r.warps[w];
    for (int c = 0; c < warp.pending_count; ++c) {
      const Collective& col = warp.pending[c];
      unsigned gone = 0;
      for (int l = 0; l < 32; ++l) {
        const unsigned t = static_cast<unsigned>(w) * 32 + l;
        if (((col.mask >> l) & 1u) && (t >= r.threads || r.fibers[t].state == State::Done)) gone |= 1u << l;
      }
      what += "; warp " + std::to_string(w) + ": " + op_name(col.op) + " mask 0x";
      char hex[16];
      std::snprintf(hex, sizeof hex, "%08x", col.mask);
      what += hex;
      what += " has lanes " + lane_list(col.arrived) + ", still missing " + lane_list(col.mask & ~col.arrived);
      if (gone) what += " (exited or absent: " + lane_list(gone) + ")";
    }
  }
  r.current = nullptr;
  fail("deadlock: %s", what.c_str());
}

// ------------------------------------------------------------ block barrier
long long block_barrier_impl(BarrierKind kind, int predicate) {
  Runtime& r = rt();
  Fiber* f = r.current;
  if (r.at_barrier == 0) {
    r.barrier_kind = kind;
    r.barrier_acc = kind == BarrierKind::And ? 1 : 0;
  } else if (r.barrier_kind != kind) {
    fail("threads of the block wait at different barriers (__syncthreads vs __syncthreads_count/and/or)");
  }
  switch (kind) {
    case BarrierKind::Sync: break;
    case BarrierKind::Count: r.barrier_acc += predicate != 0; break;
    case BarrierKind::And: r.barrier_acc &= predicate != 0; break;
    case BarrierKind::Or: r.barrier_acc |= predicate != 0; break;
  }
  f->state = State::AtBarrier;
  if (++r.at_barrier == r.threads) {
    r.barrier_result = r.barrier_acc;
    r.at_barrier = 0;
    for (unsigned i = 0; i < r.threads; ++i) {
      if (r.fibers[i].state == State::AtBarrier) r.fibers[i].state = State::Runnable;
    }
  }
  yield();
  return r.barrier_result;
}

// --------------------------------------------------------- warp collectives
uint64_t collective_result(const Collective& c, unsigned lane, unsigned warp_base) {
  auto value_of = [&](unsigned src) -> uint64_t {
    if (!((c.mask >> src) & 1u)) {
      fail("%s: lane %u reads lane %u, which is not in the mask 0x%08x", op_name(c.op), warp_base + lane, src,
           c.mask);
    }
    return c.values[src];
  };
  const int width = c.widths[lane];
  const unsigned group_first = lane & ~static_cast<unsigned>(width - 1);
  switch (c.op) {
    case Op::Sync:
    case Op::Gather: return 0;
    case Op::ShflIdx: return value_of(group_first + (static_cast<unsigned>(c.params[lane]) & (width - 1)));
    case Op::ShflUp: {
      const unsigned delta = static_cast<unsigned>(c.params[lane]);
      return (lane - group_first) >= delta ? value_of(lane - delta) : c.values[lane];
    }
    case Op::ShflDown: {
      const unsigned delta = static_cast<unsigned>(c.params[lane]);
      return (lane - group_first) + delta < static_cast<unsigned>(width) ? value_of(lane + delta) : c.values[lane];
    }
    case Op::ShflXor: {
      const unsigned src = lane ^ static_cast<unsigned>(c.params[lane]);
      // A lane of a later group of `width` lanes gives the caller its own value.
      return src >= group_first + static_cast<unsigned>(width) || src >= 32 ? c.values[lane] : value_of(src);
    }
    case Op::Ballot: {
      unsigned bits = 0;
      for (unsigned l = 0; l < 32; ++l) bits |= (((c.mask >> l) & 1u) && c.values[l] != 0) ? 1u << l : 0u;
      return bits;
    }
    case Op::Any:
    case Op::All: {
      bool any = false, all = true;
      for (unsigned l = 0; l < 32; ++l) {
        if (!((c.mask >> l) & 1u)) continue;
        any |= c.values[l] != 0;
        all &= c.values[l] != 0;
      }
      return c.op == Op::Any ? any : all;
    }
    case Op::MatchAny: {
      unsigned peers = 0;
      for (unsigned l = 0; l < 32; ++l) peers |= (((c.mask >> l) & 1u) && c.values[l] == c.values[lane]) ? 1u << l : 0u;
      return peers;
    }
    case Op::MatchAll: {
      for (unsigned l = 0; l < 32; ++l) {
        if (((c.mask >> l) & 1u) && c.values[l] != c.values[lane]) return 0;
      }
      return c.mask;
    }
    case Op::ReduceAdd:
    case Op::ReduceMin:
    case Op::ReduceMax:
    case Op::ReduceAnd:
    case Op::ReduceOr:
    case Op::ReduceXor: {
      // values hold the 32-bit operand; params[lane] != 0 for signed min/max.
      const bool is_signed = c.params[lane] != 0;
      uint32_t acc = 0;
      bool first = true;
      for (unsigned l = 0; l < 32; ++l) {
        if (!((c.mask >> l) & 1u)) continue;
        const uint32_t v = static_cast<uint32_t>(c.values[l]);
        if (first) {
          acc = v;
          first = false;
          continue;
        }
        switch (c.op) {
          case Op::ReduceAdd: acc += v; break;
          case Op::ReduceMin:
            acc = is_signed ? static_cast<uint32_t>(std::min<int32_t>(static_cast<int32_t>(acc), static_cast<int32_t>(v)))
                            : std::min(acc, v);
            break;
          case Op::ReduceMax:
            acc = is_signed ? static_cast<uint32_t>(std::max<int32_t>(static_cast<int32_t>(acc), static_cast<int32_t>(v)))
                            : std::max(acc, v);
            break;
          case Op::ReduceAnd: acc &= v; break;
          case Op::ReduceOr: acc |= v; break;
          default: acc ^= v; break;
        }
      }
      return acc;
    }
  }
  return 0;
}

// Arrives at the collective `op` of this lane's warp under `mask`; returns
// this lane's result once every lane of the mask has arrived.
uint64_t warp_collective_impl(Op op, unsigned mask, uint64_t value, unsigned value_bytes, int param, int width) {
  Runtime& r = rt();
  Fiber* f = r.current;
  const unsigned lane = f->linear & 31u;
  const unsigned warp_index = f->linear / 32;
  const unsigned warp_base = warp_index * 32;
  if (!((mask >> lane) & 1u)) fail("%s with mask 0x%08x, which leaves out the calling lane %u", op_name(op), mask, lane);
  const unsigned warp_lanes = std::min(32u, r.threads - warp_base);
  const unsigned existing = warp_lanes == 32 ? 0xffffffffu : (1u << warp_lanes) - 1;
  if (mask & ~existing) {
    fail("%s with mask 0x%08x: the warp has lanes %s only (%u threads per block)", op_name(op), mask,
         lane_list(existing).c_str(), r.threads);
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("%s with width %d: not a power of two <= 32", op_name(op), width);
  Warp& warp = r.warps[warp_index];
  Collective* c = nullptr;
  for (int i = 0; i < warp.pending_count; ++i) {
    if (warp.pending[i].mask == mask) c = &warp.pending[i];
  }
  if (c == nullptr) {
    c = &warp.pending[warp.pending_count++];
    c->mask = mask;
    c->arrived = 0;
    c->op = op;
    c->value_bytes = value_bytes;
  } else if (c->op != op || c->value_bytes != value_bytes) {
    fail("divergent warp collectives under mask 0x%08x: lane %u calls %s (%u-byte value) while lanes %s wait in %s "
         "(%u-byte value)",
         mask, lane, op_name(op), value_bytes, lane_list(c->arrived).c_str(), op_name(c->op), c->value_bytes);
  }
  c->values[lane] = value;
  c->params[lane] = param;
  c->widths[lane] = width;
  c->arrived |= 1u << lane;
  f->state = State::InCollective;
  if (c->arrived == mask) {
    if (op == Op::Gather) {
      // values[l] points at lane l's bytes (on its suspended stack).
      for (unsigned l = 0; l < 32; ++l) {
        if ((mask >> l) & 1u) {
          std::memcpy(warp.gathered + l * value_bytes, reinterpret_cast<const void*>(c->values[l]), value_bytes);
        }
      }
    }
    for (unsigned l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      Fiber& peer = r.fibers[warp_base + l];
      peer.result = collective_result(*c, l, warp_base);
      peer.state = State::Runnable;
    }
    *c = warp.pending[--warp.pending_count];
  }
  yield();
  return f->result;
}

// ------------------------------------------------------------------ launch
void run_block() {
  Runtime& r = rt();
  r.done = 0;
  r.at_barrier = 0;
  for (auto& w : r.warps) w.pending_count = 0;
  const dim3 b = r.config.block;
  for (unsigned i = 0; i < r.threads; ++i) {
    Fiber& f = r.fibers[i];
    f.linear = i;
    f.thread_idx = uint3{i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
    f.state = State::Runnable;
    f.fake_stack = nullptr;
    f.stack = r.stacks + i * r.stack_bytes + (r.stack_bytes - kStackBytes);
#ifdef EMU_FAST_SWITCH
    // What emu_switch_stack pops: the control words, six registers, then
    // fiber_main as the return address, entered as if called (rsp = 8 mod 16).
    auto* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);
    uint64_t* sp = top - 2;
    *sp = reinterpret_cast<uint64_t>(&fiber_main);
    sp -= 6;
    for (int k = 0; k < 6; ++k) sp[k] = 0;
    --sp;
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    const uint64_t words = mxcsr | (static_cast<uint64_t>(fpucw) << 32);
    *sp = words;
    f.sp = sp;
#else
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &r.scheduler;
    makecontext(&f.context, fiber_main, 0);
#endif
  }
  poison_shared_memory();
  r.order.resize(r.threads);
  for (unsigned i = 0; i < r.threads; ++i) r.order[i] = r.schedule == 1 ? r.threads - 1 - i : i;
  while (r.done < r.threads) {
    if (r.schedule == 2) std::shuffle(r.order.begin(), r.order.end(), r.rng);
    bool ran = false;
    for (unsigned i : r.order) {
      if (r.fibers[i].state != State::Runnable) continue;
      ran = true;
      switch_to(&r.fibers[i]);
    }
    if (!ran) report_deadlock();
  }
  check_dynamic_shared_tail();
}

void check_config(const char* kernel, const LaunchConfig& c) {
  auto bad = [&](const char* what) {
    std::fprintf(stderr,
                 "emu: error: cuLaunchKernel(%s): CUDA_ERROR_INVALID_VALUE: %s (grid %u,%u,%u block %u,%u,%u, "
                 "%u shared bytes)\n",
                 kernel, what, c.grid.x, c.grid.y, c.grid.z, c.block.x, c.block.y, c.block.z, c.shared_bytes);
    std::abort();
  };
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0) bad("empty grid");
  if (c.grid.x > 0x7fffffffu || c.grid.y > 65535 || c.grid.z > 65535) bad("grid too large");
  if (c.block.x == 0 || c.block.y == 0 || c.block.z == 0) bad("empty block");
  if (c.block.z > 64 || static_cast<unsigned long long>(c.block.x) * c.block.y * c.block.z > kMaxThreadsPerBlock) {
    bad("more than 1024 threads per block");
  }
}

// Runs `body` (the kernel with its arguments bound) over the grid.
void run_grid_impl(const char* kernel, const void* function, const LaunchConfig& config, void (*body)(void*),
                     void* arg) {
  Runtime& r = rt();
  read_options();
  check_config(kernel, config);
  if (config.shared_bytes > kDefaultDynamicSharedBytes) {
    unsigned allowed = kDefaultDynamicSharedBytes;
    for (const auto& entry : r.opt_in) {
      if (entry.first == function) allowed = entry.second;
    }
    if (config.shared_bytes > allowed) {
      std::fprintf(stderr,
                   "emu: error: cuLaunchKernel(%s): CUDA_ERROR_INVALID_VALUE: %u bytes of dynamic shared memory, "
                   "%u allowed (opt in with cuFuncSetAttribute)\n",
                   kernel, config.shared_bytes, allowed);
      std::abort();
    }
  }
  r.kernel = kernel;
  r.config = config;
  r.body = body;
  r.body_arg = arg;
  r.threads = config.block.x * config.block.y * config.block.z;
  find_shared_memory();
  reserve_stacks(r.threads);
  r.warps.resize((r.threads + 31) / 32);
  if (r.schedule == 2) r.rng.seed(r.schedule_seed + 0x9e3779b97f4a7c15ull * ++r.launches);
  for (unsigned z = 0; z < config.grid.z; ++z) {
    for (unsigned y = 0; y < config.grid.y; ++y) {
      for (unsigned x = 0; x < config.grid.x; ++x) {
        r.block_idx = uint3{x, y, z};
        run_block();
      }
    }
  }
  r.threads = 0;
  r.kernel = "";
}

}  // namespace

[[noreturn]] void fail(const char* format, ...) {
  Runtime& r = rt();
  std::fprintf(stderr, "emu: error in %s", r.kernel);
  if (r.current != nullptr) {
    std::fprintf(stderr, " block (%u,%u,%u) thread (%u,%u,%u)", r.block_idx.x, r.block_idx.y, r.block_idx.z,
                 r.current->thread_idx.x, r.current->thread_idx.y, r.current->thread_idx.z);
  } else if (r.threads > 0) {
    std::fprintf(stderr, " block (%u,%u,%u)", r.block_idx.x, r.block_idx.y, r.block_idx.z);
  }
  std::fprintf(stderr, ": ");
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

// "kernel block (x,y,z) thread (x,y,z)" of the running launch, for crash reports.
void describe_location(char* out, size_t size) {
  Runtime& r = rt();
  if (r.threads == 0) {
    std::snprintf(out, size, "outside any kernel");
  } else if (r.current != nullptr) {
    std::snprintf(out, size, "%s block (%u,%u,%u) thread (%u,%u,%u)", r.kernel, r.block_idx.x, r.block_idx.y,
                  r.block_idx.z, r.current->thread_idx.x, r.current->thread_idx.y, r.current->thread_idx.z);
  } else {
    std::snprintf(out, size, "%s block (%u,%u,%u)", r.kernel, r.block_idx.x, r.block_idx.y, r.block_idx.z);
  }
}

const uint3& thread_idx() { return rt().current->thread_idx; }
const uint3& block_idx() { return rt().block_idx; }
const dim3& block_dim() { return rt().config.block; }
const dim3& grid_dim() { return rt().config.grid; }

long long block_barrier(BarrierKind kind, int predicate) { return block_barrier_impl(kind, predicate); }

uint64_t warp_collective(Op op, unsigned mask, uint64_t value, unsigned value_bytes, int param, int width) {
  if (op == Op::Gather) fail("warp gather through warp_collective: use warp_gather");
  return warp_collective_impl(op, mask, value, value_bytes, param, width);
}

void warp_gather(const void* mine, unsigned bytes, void* all) {
  if (bytes == 0 || bytes > kMaxGatherBytes) fail("warp gather of %u bytes per lane (at most %u)", bytes, kMaxGatherBytes);
  Runtime& r = rt();
  const unsigned warp_index = r.current->linear / 32;
  // The whole warp, as the .sync.aligned instructions require.
  warp_collective_impl(Op::Gather, 0xffffffffu, reinterpret_cast<uintptr_t>(mine), bytes, 0, 32);
  std::memcpy(all, r.warps[warp_index].gathered, 32 * bytes);
}

// Which lanes are converged cannot be known here: every live lane of the warp.
unsigned active_mask() {
  Runtime& r = rt();
  const unsigned base = r.current->linear & ~31u;
  unsigned mask = 0;
  for (unsigned l = 0; l < 32 && base + l < r.threads; ++l) {
    if (r.fibers[base + l].state != State::Done) mask |= 1u << l;
  }
  return mask;
}

bool register_dynamic_shared(const char* name, unsigned char* (*address)(), size_t capacity) {
  rt().dynamic_shared.push_back({name, address, capacity});
  return true;
}

void set_max_dynamic_shared_bytes(const void* function, unsigned bytes) {
  if (bytes > kMaxDynamicSharedBytes) {
    std::fprintf(stderr, "emu: error: cuFuncSetAttribute: %u bytes of dynamic shared memory, the limit is %u\n",
                 bytes, kMaxDynamicSharedBytes);
    std::abort();
  }
  for (auto& entry : rt().opt_in) {
    if (entry.first == function) {
      entry.second = bytes;
      return;
    }
  }
  rt().opt_in.push_back({function, bytes});
}

void run_grid(const char* kernel, const void* function, const LaunchConfig& config, void (*body)(void*), void* arg) {
  run_grid_impl(kernel, function, config, body, arg);
}

// A pushed value wider than its parameter is read from its first bytes, as
// the driver reads it (a warning); a narrower one would be read past.
void argument_width_mismatch(const char* kernel, size_t index, size_t parameter_bytes, size_t pushed_bytes) {
  if (pushed_bytes < parameter_bytes) {
    std::fprintf(stderr,
                 "emu: error: argument %zu of %s: the kernel parameter is %zu bytes, the launcher pushes only %zu "
                 "(the driver would read past it)\n",
                 index, kernel, parameter_bytes, pushed_bytes);
    std::abort();
  }
  const std::string key = std::string(kernel) + "#" + std::to_string(index);
  auto& warned = rt().warned;
  if (std::find(warned.begin(), warned.end(), key) != warned.end()) return;
  warned.push_back(key);
  std::fprintf(stderr,
               "emu: warning: argument %zu of %s: the kernel parameter is %zu bytes, the launcher pushes %zu; the "
               "kernel reads the first %zu\n",
               index, kernel, parameter_bytes, pushed_bytes, parameter_bytes);
}

}  // namespace emu

// kernel<<<config.grid, config.block, config.shared_bytes>>>(args...), with
// the kernel's name in diagnostics.
#define EMU_LAUNCH(kernel, config, ...) ::emu::launch_kernel(#kernel, config, kernel, ##__VA_ARGS__)


// src/ops/routing/{mod,cuda}.rs on the emulator: RoutingConfig::new_grouped, the
// fused forward kernel (RowLayout, rows per group, rank or rounds), the plan
// through the grouping primitive, the fixed-order statistics, the report ->
// errors, then the backward with its own status word.
//
// Coverage knobs (inputs; the defaults are the Rust constants, so a plain
// case is launched exactly as the crate launches it): forward_blocks
// (FORWARD_BLOCKS, lower it to give each group several rows), max_backward_blocks
// (MAX_BACKWARD_BLOCKS, lower it to make the backward grid-stride), selection
// ("auto" = row_flags, or "rounds" / "rank" to force one path), backward
// ("if_ok": as the op API, after a clean forward; "always": also after a
// forward Err, to test the backward's own check; "never").
#include <cmath>
#include <optional>

#include "bundle.h"
#include "device.h"
#include "grouping.h"
#include "kernels.h"
#include "ops.h"

namespace harness {
namespace {

constexpr uint64_t kBackwardRowWords = 2;  // BACKWARD_ROW_WORDS
constexpr uint64_t kDefaultSharedBytes = 48 * 1024;
constexpr uint64_t kMaxWarpsPerBlock = 8;
constexpr uint32_t kFinalizeThreads = 256;
constexpr uint32_t kFlagSigmoid = 1, kFlagRenormalize = 2, kFlagRankSelection = 4;
constexpr uint64_t kNullPointer = 0;  // NULL_POINTER, pushed for an absent operand

struct RoutingConfig {
  uint64_t tokens, experts, groups, k;
  bool sigmoid, renormalize;
  uint64_t group_experts() const { return experts / groups; }
  uint64_t routing_rows() const { return tokens * groups; }
  uint64_t slots() const { return routing_rows() * k; }
};

// RoutingConfig::new_grouped (k == 0 stands for TopK::All).
RoutingConfig make_config(uint64_t tokens, uint64_t experts, uint64_t groups, uint64_t k, bool sigmoid,
                          bool renormalize, const std::optional<std::vector<uint32_t>>& expert_mask) {
  if (experts == 0 || experts >= 0xffffffffull) throw invalid("logits", "expected 1 <= E < 2^32 - 1 experts");
  if (groups == 0 || experts % groups != 0) throw invalid("groups", "expected a divisor of E");
  const uint64_t n = experts / groups;
  std::vector<uint64_t> active(groups, n);
  if (expert_mask) {
    check_len("expert_mask", expert_mask->size(), experts);
    for (size_t e = 0; e < experts; ++e) {
      const uint32_t m = (*expert_mask)[e];
      if (m > 1) throw invalid("expert_mask", "expected entries 0 or 1, got " + std::to_string(m) + " at position " + std::to_string(e));
      if (m == 0) --active[e / n];
    }
  }
  const uint64_t fewest = *std::min_element(active.begin(), active.end());
  if (k == 0) {
    if (std::any_of(active.begin(), active.end(), [&](uint64_t a) { return a != active[0]; })) {
      throw invalid("k", "TopK::All needs as many active experts in every group");
    }
    k = fewest;
  }
  if (k == 0 || k > fewest) throw invalid("k", "expected 1..=" + std::to_string(fewest) + ", got " + std::to_string(k));
  if (tokens * groups * k >= 0xffffffffull) throw invalid("logits", "T * G * k must be < 2^32 - 1");
  return RoutingConfig{tokens, experts, groups, k, sigmoid, renormalize};
}

struct RowLayout {
  uint32_t group_size;
  uint64_t groups_per_block;
  uint32_t shared_bytes;
  emu::LaunchConfig launch_config(uint64_t blocks) const {
    return emu::LaunchConfig{dim3(u32_arg("blocks", blocks)), dim3(static_cast<unsigned>(groups_per_block * group_size)),
                             shared_bytes};
  }
};

uint64_t next_power_of_two(uint64_t x) {
  uint64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// forward_words: per lane group, 3 words per column, 2 per expert, 1.
uint64_t forward_words(const RoutingConfig& c) { return 3 * c.group_experts() + 2 * c.experts + 1; }

// RowLayout::new; `opt_in` is cuFuncSetAttribute on the launched function.
template <class OptIn>
RowLayout row_layout(const RoutingConfig& c, uint64_t words, OptIn opt_in) {
  const uint64_t columns = c.group_experts(), experts = c.experts;
  const uint64_t group_size = std::min<uint64_t>(next_power_of_two(columns), 32);
  const uint64_t groups_per_warp = 32 / group_size;
  const uint64_t warp_bytes = groups_per_warp * words * 4;
  const uint64_t warps = std::clamp<uint64_t>(kDefaultSharedBytes / warp_bytes, 1, kMaxWarpsPerBlock);
  const uint64_t shared_bytes = warps * warp_bytes;
  if (shared_bytes > kDefaultSharedBytes) {
    const uint64_t limit = emu::kMaxDynamicSharedBytes;  // CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    if (shared_bytes > limit) {
      // CudaDevice::allow_dynamic_shared; the emulator has no static shared memory to count.
      throw invalid("logits", "one row of " + std::to_string(columns) + " experts (of " + std::to_string(experts) +
                                  ") needs 0 + " +
                                  std::to_string(shared_bytes) +
                                  " bytes of shared memory per block on CUDA; this device allows " +
                                  std::to_string(limit));
    }
    opt_in(static_cast<unsigned>(limit));
  }
  return RowLayout{static_cast<uint32_t>(group_size), warps * groups_per_warp, static_cast<uint32_t>(shared_bytes)};
}

// row_flags, with the selection override.
uint32_t row_flags(const RoutingConfig& c, uint32_t group_size, const std::string& selection) {
  const uint64_t columns_per_lane = (c.group_experts() + group_size - 1) / group_size;
  const uint64_t round_cost = c.k * (columns_per_lane + 2 * __builtin_ctz(group_size));
  const uint64_t rank_cost = columns_per_lane * c.group_experts();
  uint32_t flags = 0;
  if (c.sigmoid) flags |= kFlagSigmoid;
  if (c.renormalize) flags |= kFlagRenormalize;
  const bool rank = selection == "rank" || (selection == "auto" && rank_cost < round_cost);
  if (selection != "auto" && selection != "rank" && selection != "rounds") throw std::runtime_error("selection: " + selection);
  if (rank) flags |= kFlagRankSelection;
  return flags;
}

// A pointer to an optional operand, or NULL_POINTER (a u64 0) when absent.
template <class T>
struct Optional {
  std::optional<DeviceBuffer<T>> buffer;
  explicit Optional(const std::optional<std::vector<T>>& host) {
    if (host) buffer = clone_htod(*host);
  }
  uint64_t pushed() const { return buffer ? reinterpret_cast<uint64_t>(buffer->ptr()) : kNullPointer; }
  const T* host_ptr() const { return buffer ? buffer->ptr() : nullptr; }
};

template <class T>
struct Kernels;
#define EMU_ROUTING_KERNELS(suffix, T)                                       \
  template <>                                                                \
  struct Kernels<T> {                                                        \
    static constexpr auto forward = routing_forward_##suffix;                \
    static constexpr auto backward = routing_backward_##suffix;              \
    static constexpr const char* forward_name = "routing_forward_" #suffix;  \
    static constexpr const char* backward_name = "routing_backward_" #suffix; \
  };
EMU_ROUTING_KERNELS(f32, float)
EMU_ROUTING_KERNELS(bf16, __nv_bfloat16)
EMU_ROUTING_KERNELS(f16, __half)
#undef EMU_ROUTING_KERNELS

OpError non_finite(uint64_t position, uint64_t experts) {
  OpError e{"NonFinite", "logits: position " + std::to_string(position)};
  e.position = position;
  e.row = position / experts;
  e.column = position % experts;
  return e;
}

template <class T>
void routing(const Bundle& in, Bundle& out) {
  const uint64_t tokens = in.scalar<uint64_t>("tokens");
  const uint64_t experts = in.scalar<uint64_t>("experts");
  const std::string score = in.text("score", "softmax");
  const auto expert_mask_host = in.get_optional<uint32_t>("expert_mask");
  const auto token_mask_host = in.get_optional<uint32_t>("token_mask");
  const auto bias_host = in.get_optional<float>("selection_bias");
  const uint64_t forward_blocks = in.scalar<uint64_t>("forward_blocks", 1024);         // FORWARD_BLOCKS
  const uint64_t max_backward_blocks = in.scalar<uint64_t>("max_backward_blocks", 65535);  // MAX_BACKWARD_BLOCKS
  const std::string selection = in.text("selection", "auto");
  const std::string run_backward = in.text("backward", "if_ok");

  // routing::forward (op API): host-side checks, then the backend.
  const std::vector<T> logits_host = bits_vector<T>(in, "logits");
  check_len("logits", logits_host.size(), tokens * experts);
  if (token_mask_host) check_len("token_mask", token_mask_host->size(), tokens);
  const RoutingConfig config = make_config(tokens, experts, in.scalar<uint64_t>("groups", 1), in.scalar<uint64_t>("k"),
                                           score == "sigmoid", in.scalar<uint32_t>("renormalize", 0) != 0,
                                           expert_mask_host);
  const uint64_t rows = config.routing_rows();
  if (bias_host) {
    check_len("selection_bias", bias_host->size(), experts);
    for (size_t e = 0; e < experts; ++e) {
      if (!std::isfinite((*bias_host)[e])) throw invalid("selection_bias", "expected finite values");
    }
  }
  out.put_scalar<uint64_t>("k", config.k);
  DeviceBuffer<T> logits = clone_htod(logits_host);
  const Optional<uint32_t> expert_mask(expert_mask_host), token_mask(token_mask_host);
  const Optional<float> bias(bias_host);
  DeviceBuffer<unsigned long long> report = clone_htod(std::vector<unsigned long long>{kStatusClean, kStatusClean, 0});

  // cuda::forward
  const uint64_t slots = config.slots();
  const uint32_t experts_arg = u32_arg("experts", experts);
  const uint32_t k_arg = u32_arg("k", config.k);
  const uint32_t slots_arg = u32_arg("T * k", slots);
  const uint32_t groups_arg = u32_arg("groups", config.groups);
  const uint32_t group_experts_arg = u32_arg("N", config.group_experts());
  DeviceBuffer<uint32_t> indices = alloc_uninit<uint32_t>(slots);
  DeviceBuffer<float> weights = alloc_uninit<float>(slots);
  DeviceBuffer<uint32_t> counts = alloc_zeros<uint32_t>(experts);
  DeviceBuffer<uint32_t> offsets = alloc_zeros<uint32_t>(experts + 1);
  DeviceBuffer<uint32_t> token_of_row = alloc_uninit<uint32_t>(slots);
  DeviceBuffer<uint32_t> row_of_slot = alloc_uninit<uint32_t>(slots);
  DeviceBuffer<float> gate_mass = alloc_zeros<float>(experts);
  DeviceBuffer<float> lb_loss = alloc_zeros<float>(1);
  DeviceBuffer<float> z_loss = alloc_zeros<float>(1);
  DeviceBuffer<float> grad_scales = alloc_zeros<float>(experts + 1);
  if (tokens == 0) {
    report[2] = 0;
  } else {
    // 1. The fused row kernel.
    const auto forward_kernel = Kernels<T>::forward;
    const RowLayout layout = row_layout(config, forward_words(config),
                                        [&](unsigned limit) { emu::set_max_dynamic_shared(forward_kernel, limit); });
    const uint64_t rows_per_group = (rows + layout.groups_per_block * forward_blocks - 1) /
                                    (layout.groups_per_block * forward_blocks);
    const uint64_t blocks = (rows + layout.groups_per_block * rows_per_group - 1) /
                            (layout.groups_per_block * rows_per_group);
    const uint64_t columns = 2 * experts + 1;
    DeviceBuffer<uint32_t> expert_keys = alloc_uninit<uint32_t>(slots);
    DeviceBuffer<float> partials = alloc_uninit<float>(blocks * columns);
    const uint64_t rows_arg = rows;
    const uint32_t flags = row_flags(config, layout.group_size, selection);
    const uint32_t rows_per_group_arg = u32_arg("rows", rows_per_group);
    emu::launch_kernel(Kernels<T>::forward_name, layout.launch_config(blocks), forward_kernel, logits.ptr(),
                       expert_mask.pushed(), token_mask.pushed(), bias.pushed(), rows_arg, experts_arg, groups_arg,
                       group_experts_arg, k_arg, flags, layout.group_size, rows_per_group_arg, indices.ptr(),
                       weights.ptr(), expert_keys.ptr(), partials.ptr(), report.ptr());
    out.put_scalar<uint64_t>("forward_group_size", layout.group_size);
    out.put_scalar<uint64_t>("forward_groups_per_block", layout.groups_per_block);
    out.put_scalar<uint64_t>("forward_shared_bytes", layout.shared_bytes);
    out.put_scalar<uint64_t>("forward_blocks", blocks);
    out.put_scalar<uint64_t>("rows_per_group", rows_per_group);
    out.put_scalar<uint64_t>("flags", flags);

    // 2. The plan: (routing row, slot) positions grouped by expert, E = no group.
    DeviceGroups groups = group_by_key(expert_keys.ptr(), slots, experts + 1, experts_arg);
    unsigned long long* rows_word = report.ptr() + 2;
    EMU_LAUNCH(routing_plan_counts, grid_stride_config(experts + 1), static_cast<const uint32_t*>(groups.keys.ptr()),
               static_cast<const uint32_t*>(groups.starts.ptr()), static_cast<const uint32_t*>(groups.count.ptr()),
               experts_arg, counts.ptr(), offsets.ptr(), rows_word);
    EMU_LAUNCH(routing_plan_rows, grid_stride_config(slots), static_cast<const uint32_t*>(groups.order.ptr()), slots_arg,
               k_arg, static_cast<const uint32_t*>(offsets.ptr()), experts_arg, token_of_row.ptr(), row_of_slot.ptr());

    // 3. The statistics.
    DeviceBuffer<float> totals = alloc_uninit<float>(columns);
    const uint32_t blocks_arg = u32_arg("blocks", blocks);
    const uint32_t columns_arg = u32_arg("2E + 1", columns);
    const emu::LaunchConfig reduce_config{dim3(u32_arg("columns", (columns + 31) / 32)), dim3(32, 32, 1), 0};
    EMU_LAUNCH(routing_reduce_partials, reduce_config, static_cast<const float*>(partials.ptr()), blocks_arg,
               columns_arg, totals.ptr());
    const emu::LaunchConfig finalize_config{dim3(1), dim3(kFinalizeThreads), 0};
    EMU_LAUNCH(routing_finalize, finalize_config, static_cast<const float*>(totals.ptr()),
               static_cast<const uint32_t*>(counts.ptr()), static_cast<const uint32_t*>(offsets.ptr()),
               expert_mask.pushed(), experts_arg, groups_arg, group_experts_arg, k_arg, gate_mass.ptr(),
               lb_loss.ptr(), z_loss.ptr(), grad_scales.ptr());
  }

  // routing::forward (op API): the one synchronisation.
  out.put("report", report.to_host());
  out.put("indices", indices.to_host());
  out.put("weights", weights.to_host());
  out.put("counts", counts.to_host());
  out.put("offsets", offsets.to_host());
  out.put("row_of_slot", row_of_slot.to_host());
  out.put("gate_mass", gate_mass.to_host());
  out.put("lb_loss", lb_loss.to_host());
  out.put("z_loss", z_loss.to_host());
  out.put("grad_scales", grad_scales.to_host());
  std::optional<OpError> forward_error;
  if (report[1] != kStatusClean && token_mask_host) {
    forward_error = invalid("token_mask", "expected entries 0 or 1, got " + std::to_string((*token_mask_host)[report[1]]) +
                                              " at position " + std::to_string(report[1]));
    forward_error->position = report[1];
  } else if (report[0] != kStatusClean) {
    forward_error = non_finite(report[0], experts);
  } else {
    // first_rows: the plan's R rows.
    if (report[2] > token_of_row.len()) throw invalid("rows", "more rows than room for");
    out.put("token_of_row", token_of_row.to_host(report[2]));
  }
  if (run_backward == "never" || (forward_error && run_backward != "always")) {
    if (forward_error) throw *forward_error;
    return;
  }

  // routing::backward (op API) -> cuda::backward.
  const std::vector<float> dweights_host = in.get<float>("dweights");
  check_len("dweights", dweights_host.size(), slots);
  const float lb_coef = in.scalar<float>("lb_coef", 0.0f);
  const float z_coef = in.scalar<float>("z_coef", 0.0f);
  if (!std::isfinite(lb_coef) || !std::isfinite(z_coef)) throw invalid("lb_coef / z_coef", "expected finite values");
  DeviceBuffer<float> dweights = clone_htod(dweights_host);
  DeviceBuffer<float> dlogits = alloc_uninit<float>(tokens * experts);
  DeviceBuffer<unsigned long long> status = new_status();
  if (tokens > 0) {
    const auto backward_kernel = Kernels<T>::backward;
    const RowLayout layout = row_layout(config, kBackwardRowWords * config.group_experts(),
                                        [&](unsigned limit) { emu::set_max_dynamic_shared(backward_kernel, limit); });
    const uint64_t blocks = std::min((rows + layout.groups_per_block - 1) / layout.groups_per_block, max_backward_blocks);
    const uint64_t rows_arg = rows;
    const uint32_t flags = row_flags(config, layout.group_size, selection);
    emu::launch_kernel(Kernels<T>::backward_name, layout.launch_config(blocks), backward_kernel,
                       static_cast<const T*>(logits.ptr()), expert_mask.pushed(), token_mask.pushed(),
                       static_cast<const uint32_t*>(indices.ptr()), static_cast<const float*>(dweights.ptr()),
                       static_cast<const float*>(grad_scales.ptr()), lb_coef, z_coef, rows_arg, experts_arg,
                       groups_arg, group_experts_arg, k_arg, flags, layout.group_size, dlogits.ptr(), status.ptr());
    out.put_scalar<uint64_t>("backward_blocks", blocks);
  }
  out.put("backward_status", status.to_host());
  out.put("dlogits", dlogits.to_host());
  if (forward_error) throw *forward_error;
  if (status[0] != kStatusClean) {
    OpError e = non_finite(status[0], experts);
    e.kind = "BackwardNonFinite";
    throw e;
  }
}

}  // namespace

void routing_op(const std::string& op, const Bundle& in, Bundle& out) {
  if (op != "routing") throw std::runtime_error("unknown op " + op);
  dispatch_float(in.text("dtype", "f32"), [&](auto tag) { routing<decltype(tag)>(in, out); });
}

}  // namespace harness

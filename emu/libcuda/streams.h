// Streams and events of the fake libcuda (emu/libcuda/README.md), as
// asynchronous as a driver may make them: work queued on a stream does not
// run when it is queued but when something waits for it — a synchronising
// call on that stream, the context or an event recorded after it, or a
// stream that waits on such an event and is itself waited for. So a kernel
// that reads a buffer another stream writes, without a wait in between,
// runs before that write; and a buffer freed on one stream while work queued
// on another still uses it, with nothing ordering the two, is reported when
// the free is queued (a driver may reuse the memory at once).
//
// Not thread-safe on its own: driver.cpp calls it under its one lock.
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace emu {
namespace libcuda {

struct Stream;

// Work queued on a stream. A wait (`wait_on` set) runs the first `wait_upto`
// operations of `wait_on` first.
struct Op {
  std::string what;                  // for reports: "kernel name", "cuMemsetD8Async", ...
  std::vector<uintptr_t> buffers;    // device allocations it touches (their base addresses)
  std::function<void()> run;         // empty for a wait
  Stream* wait_on = nullptr;
  uint64_t wait_upto = 0;
};

struct Stream {
  std::deque<Op> pending;
  uint64_t executed = 0;  // operations run so far; the next pending one has this sequence number
  uint64_t queued = 0;    // operations queued so far

  void enqueue(Op op) {
    pending.push_back(std::move(op));
    ++queued;
  }

  // Runs this stream's operations until the first `upto` have run.
  void run_until(uint64_t upto) {
    while (executed < upto && !pending.empty()) {
      Op op = std::move(pending.front());
      pending.pop_front();
      if (op.wait_on != nullptr) op.wait_on->run_until(op.wait_upto);
      if (op.run) op.run();
      ++executed;
    }
  }

  void run_all() { run_until(queued); }

  // Whether the operation with sequence number `sequence` on `other` is
  // ordered before the first `upto` operations of this stream end: it is on
  // this stream before `upto`, has run already, or a pending wait before
  // `upto` (directly or through other streams' waits) covers it.
  bool orders_before(uint64_t upto, const Stream* other, uint64_t sequence) const {
    if (sequence < other->executed) return true;
    if (other == this) return sequence < upto;
    for (uint64_t i = 0; i < pending.size() && executed + i < upto; ++i) {
      const Op& op = pending[i];
      if (op.wait_on != nullptr && op.wait_on->orders_before(op.wait_upto, other, sequence)) return true;
    }
    return false;
  }
};

// An event: the work of `stream` it was last recorded after.
struct Event {
  Stream* stream = nullptr;
  uint64_t upto = 0;
};

// Every stream ever created (never freed: a destroyed stream keeps its
// sequence numbers for the waits that name it), plus the null stream.
inline std::vector<Stream*>& all_streams() {
  static std::vector<Stream*> streams;
  return streams;
}

inline Stream* new_stream() {
  all_streams().push_back(new Stream());
  return all_streams().back();
}

inline void run_all_streams() {
  for (Stream* s : all_streams()) s->run_all();
}

// A pending operation on another stream than `freeing` that touches
// `buffer` and is not ordered before the end of `freeing`'s queue: what
// a free of `buffer` queued now on `freeing` races with. Empty if none.
inline std::string unordered_use(const Stream* freeing, uintptr_t buffer) {
  for (const Stream* s : all_streams()) {
    if (s == freeing) continue;
    for (uint64_t i = 0; i < s->pending.size(); ++i) {
      const Op& op = s->pending[i];
      bool touches = false;
      for (uintptr_t b : op.buffers) touches = touches || b == buffer;
      if (touches && !freeing->orders_before(freeing->queued, s, s->executed + i)) return op.what;
    }
  }
  return "";
}

}  // namespace libcuda
}  // namespace emu

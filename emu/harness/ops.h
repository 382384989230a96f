// What the harness's op files share: element-type dispatch, raw element
// bits in and out, and the entry points main.cpp dispatches to.
#pragma once
#include <string>
#include <type_traits>
#include <vector>

#include "bundle.h"

namespace harness {

// The integer type holding an element's bits (u32 for f32, u16 for bf16/f16).
template <class T>
using uint16_or_32 = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;

// Input `name` (stored as the element's bits) as elements of T.
template <class T>
std::vector<T> bits_vector(const Bundle& in, const std::string& name) {
  const auto bits = in.get<uint16_or_32<T>>(name);
  std::vector<T> v(bits.size());
  if (!v.empty()) std::memcpy(static_cast<void*>(v.data()), bits.data(), bits.size() * sizeof(T));
  return v;
}

// Calls f(T{}) for the element type named "f32", "bf16" or "f16".
template <class F>
void dispatch_float(const std::string& dtype, F&& f) {
  if (dtype == "f32") return f(float{});
  if (dtype == "bf16") return f(__nv_bfloat16{});
  if (dtype == "f16") return f(__half{});
  throw std::runtime_error("dtype: expected f32, bf16 or f16, got " + dtype);
}

void grouping_op(const std::string& op, const Bundle& in, Bundle& out);
void embedding_op(const std::string& op, const Bundle& in, Bundle& out);
void routing_op(const std::string& op, const Bundle& in, Bundle& out);
void selftest_op(const std::string& op, const Bundle& in, Bundle& out);

}  // namespace harness

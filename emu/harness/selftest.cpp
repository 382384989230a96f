// `moerec_emu selftest`: launches the kernels of emu/tu/selftest.cpp; the
// test module checks the results (and the errors) against CUDA's rules.
#include "bundle.h"
#include "device.h"
#include "ops.h"

extern "C" {
void emu_selftest_convert(const float* in, uint32_t n, uint16_t* bf16, uint16_t* f16, float* bf16_back,
                          float* f16_back);
void emu_selftest_warp(const uint32_t* in, uint32_t* out);
void emu_selftest_barrier(uint32_t with_barrier, uint32_t* out);
void emu_selftest_deadlock(uint32_t* out);
void emu_selftest_bad_mask(uint32_t* out);
void emu_selftest_shared_overrun(uint32_t words, uint32_t* out);
void emu_selftest_global_overrun(const uint32_t* in, uint32_t n, uint32_t* out);
void emu_selftest_argument(uint32_t value, uint32_t* out);
}

namespace harness {

void selftest_op(const std::string&, const Bundle& in, Bundle& out) {
  const std::string which = in.text("case");
  const uint32_t threads = in.scalar<uint32_t>("threads", 64);
  DeviceBuffer<uint32_t> result = alloc_uninit<uint32_t>(threads * 18);
  const emu::LaunchConfig one_block{dim3(1), dim3(threads), 0};
  if (which == "convert") {
    const std::vector<float> x = in.get<float>("x");
    DeviceBuffer<float> xs = clone_htod(x);
    auto bf16 = alloc_uninit<uint16_t>(x.size()), f16 = alloc_uninit<uint16_t>(x.size());
    auto bf16_back = alloc_uninit<float>(x.size()), f16_back = alloc_uninit<float>(x.size());
    EMU_LAUNCH(emu_selftest_convert, grid_stride_config(x.size()), static_cast<const float*>(xs.ptr()),
               static_cast<uint32_t>(x.size()), bf16.ptr(), f16.ptr(), bf16_back.ptr(), f16_back.ptr());
    out.put("bf16", bf16.to_host());
    out.put("f16", f16.to_host());
    out.put("bf16_back", bf16_back.to_host());
    out.put("f16_back", f16_back.to_host());
    return;
  }
  if (which == "warp") {
    DeviceBuffer<uint32_t> x = clone_htod(in.get<uint32_t>("x"));
    check_len("x", x.len(), threads);
    EMU_LAUNCH(emu_selftest_warp, one_block, static_cast<const uint32_t*>(x.ptr()), result.ptr());
  } else if (which == "barrier") {
    EMU_LAUNCH(emu_selftest_barrier, one_block, in.scalar<uint32_t>("with_barrier"), result.ptr());
  } else if (which == "deadlock") {
    EMU_LAUNCH(emu_selftest_deadlock, one_block, result.ptr());
  } else if (which == "bad_mask") {
    EMU_LAUNCH(emu_selftest_bad_mask, one_block, result.ptr());
  } else if (which == "shared_overrun") {
    const uint32_t words = in.scalar<uint32_t>("words");
    EMU_LAUNCH(emu_selftest_shared_overrun, (emu::LaunchConfig{dim3(1), dim3(threads), words * 4}), words,
               result.ptr());
  } else if (which == "global_overrun") {
    DeviceBuffer<uint32_t> x = clone_htod(std::vector<uint32_t>(threads, 7));
    EMU_LAUNCH(emu_selftest_global_overrun, one_block, static_cast<const uint32_t*>(x.ptr()), threads, result.ptr());
  } else if (which == "argument") {
    const uint64_t pushed = in.scalar<uint64_t>("value");  // wider than the parameter
    EMU_LAUNCH(emu_selftest_argument, one_block, pushed, result.ptr());
  } else {
    throw std::runtime_error("unknown selftest case " + which);
  }
  out.put("out", result.to_host());
}

}  // namespace harness

// Registers the extern "C" kernels of one kernels/<module>.cu with the fake
// libcuda (emu/libcuda/driver.cpp). build.sh generates one translation unit
// per module: emu/tu/<module>.cpp, then this header, then one
// EMU_REGISTER_KERNEL(module, name) per kernel the file defines.
#pragma once
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "../cuda_emu.h"
#include "kernel.h"

namespace emu {
namespace libcuda {

template <class P>
inline P read_param(const void* source) {
  static_assert(std::is_trivially_copyable<P>::value, "kernel parameters must be trivially copyable");
  P p;
  std::memcpy(static_cast<void*>(&p), source, sizeof(P));
  return p;
}

template <class... P>
struct Launcher {
  template <size_t... I>
  static std::tuple<P...> read_all(void** params, std::index_sequence<I...>) {
    return std::tuple<P...>(read_param<P>(params[I])...);
  }
  static void launch(const Kernel& kernel, const unsigned (&grid)[3], const unsigned (&block)[3], unsigned shared,
                     void** params) {
    const LaunchConfig config{dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), shared};
    auto* function = reinterpret_cast<void (*)(P...)>(const_cast<void*>(kernel.function));
    BoundKernel<P...> bound{function, read_all(params, std::index_sequence_for<P...>{})};
    run_grid(kernel.name, kernel.function, config, &BoundKernel<P...>::run, &bound);
  }
};

template <class... P>
inline bool add_kernel(const char* module, const char* name, void (*function)(P...)) {
  return register_kernel(Kernel{module, name, reinterpret_cast<const void*>(function), {sizeof(P)...},
                                &Launcher<P...>::launch});
}

}  // namespace libcuda
}  // namespace emu

#define EMU_REGISTER_KERNEL(module, name) \
  static const bool emu_registered_##name = ::emu::libcuda::add_kernel(#module, #name, &name);

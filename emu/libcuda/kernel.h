// What emu/libcuda/driver.cpp knows of the emulated kernels and the
// runtime. The driver does not include cuda_emu.h (its CUDA names, clock()
// for one, clash with the C library headers the driver needs).
#pragma once
#include <stddef.h>

#include <vector>

namespace emu {

// emu/cuda_emu_runtime.cpp
void set_max_dynamic_shared_bytes(const void* function, unsigned bytes);
void describe_location(char* out, size_t size);

namespace libcuda {

struct Kernel {
  const char* module;
  const char* name;
  const void* function;             // the kernel, as a key for cuFuncSetAttribute
  std::vector<size_t> param_bytes;  // sizeof each C++ parameter
  // Runs the kernel over the grid with its parameters read from `params` as
  // cuLaunchKernel reads kernelParams: param_bytes[i] bytes from params[i].
  void (*launch)(const Kernel& kernel, const unsigned (&grid)[3], const unsigned (&block)[3], unsigned shared,
                 void** params);
};

// emu/libcuda/driver.cpp
bool register_kernel(const Kernel& kernel);

}  // namespace libcuda
}  // namespace emu

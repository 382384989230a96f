// Stand-in for CUDA's <cuda_bf16.h> when kernels/*.cu are built with g++ for the
// emulator: everything lives in emu/cuda_emu.h.
#pragma once
#include "../cuda_emu.h"

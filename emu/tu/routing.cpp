// kernels/routing.cu built for the emulator (emu/README.md), unmodified.
#include "../cuda_emu.h"
#include "../../kernels/routing.cu"
#include "../harness/kernels.h"  // checks the harness's prototypes

EMU_DYNAMIC_SHARED(float, shared_words)

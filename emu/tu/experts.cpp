// kernels/experts.cu built for the emulator (emu/README.md), unmodified.
#include "../cuda_emu.h"
#include "../../kernels/experts.cu"
#include "../harness/kernels.h"  // checks the harness's prototypes

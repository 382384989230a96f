// kernels/scoring.cu built for the emulator (emu/README.md), unmodified.
#include "../cuda_emu.h"
#include "../../kernels/scoring.cu"
#include "../harness/kernels.h"  // checks the harness's prototypes

EMU_DYNAMIC_SHARED(float, group_sums)

// kernels/scoring_topk.cu built for the emulator (emu/README.md), unmodified.
#include "../cuda_emu.h"
#include "../../kernels/scoring_topk.cu"
#include "../harness/kernels.h"  // checks the harness's prototypes

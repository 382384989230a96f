// What the fake driver reads from the PTX that build.rs embeds
// (emu/libcuda/ptx.cpp): per entry point, what a real driver would know of
// the compiled kernel, and the shared-memory alignment rule the emulator's
// own placement of __shared__ variables cannot show.
#pragma once
#include <stddef.h>

#include <map>
#include <string>
#include <vector>

namespace emu {
namespace libcuda {
namespace ptx {

struct Entry {
  std::vector<size_t> param_bytes;  // each .param's size
  // The static shared memory of the entry: every module-scope .shared
  // variable its body names, laid out in declaration order with each one's
  // alignment (ptxas may order them otherwise: within a few bytes).
  unsigned static_shared_bytes = 0;
  unsigned max_threads = 0;  // product of .maxntid (__launch_bounds__); 0: none stated
};

// Entry name -> Entry. `problems` gets one line per rule a GPU would break:
// a vector access to shared memory (ld/st .v2/.v4, ldmatrix, stmatrix,
// cp.async) wider than the alignment its variable is declared with (the
// access faults or reads the wrong bytes unless the variable happens to sit
// at a better-aligned offset), and an entry without __launch_bounds__.
std::map<std::string, Entry> parse(const char* ptx, std::vector<std::string>& problems);

}  // namespace ptx
}  // namespace libcuda
}  // namespace emu

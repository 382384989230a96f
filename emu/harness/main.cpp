// moerec_emu OP IN OUT: runs one op of the harness on the emulator. IN and
// OUT are bundles (bundle.h); an Err of the mirrored Rust op is written to
// OUT as error_kind / error_message / error_position / error_index /
// error_row / error_column, beside the outputs computed before it. Emulator
// errors (deadlocks, bad collectives, sanitizer reports) abort instead.
#include <cstdio>
#include <exception>

#include "bundle.h"
#include "device.h"
#include "ops.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr,
                 "usage: %s OP IN OUT\n  OP: grouping scan embedding_forward embedding_backward embedding_update "
                 "routing selftest\n",
                 argv[0]);
    return 2;
  }
  const std::string op = argv[1];
  harness::Bundle out;
  try {
    const harness::Bundle in = harness::Bundle::read(argv[2]);
    try {
      if (op == "grouping" || op == "scan") {
        harness::grouping_op(op, in, out);
      } else if (op.rfind("embedding_", 0) == 0) {
        harness::embedding_op(op, in, out);
      } else if (op == "routing") {
        harness::routing_op(op, in, out);
      } else if (op == "selftest") {
        harness::selftest_op(op, in, out);
      } else {
        std::fprintf(stderr, "moerec_emu: unknown op %s\n", op.c_str());
        return 2;
      }
    } catch (const harness::OpError& e) {
      out.put_text("error_kind", e.kind);
      out.put_text("error_message", e.message);
      out.put_scalar<uint64_t>("error_position", e.position);
      out.put_scalar<uint64_t>("error_index", e.index);
      out.put_scalar<uint64_t>("error_row", e.row);
      out.put_scalar<uint64_t>("error_column", e.column);
    }
    out.write(argv[3]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moerec_emu: %s\n", e.what());
    return 2;
  }
  return 0;
}

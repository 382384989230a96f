#!/usr/bin/env bash
# Builds every test, bench and example binary here (no GPU needed) and copies
# them into .gpu/ (ignored through .git/info/exclude), for the device tool:
#   run(command="bash scripts/gpu-run.sh", carry=[".gpu"])
# The device has nvcc, the driver, PyTorch and CuPy but no Rust.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
eval "$(bash scripts/install-nvcc.sh)"
export MOEREC_REQUIRE_NVCC=1
# .git is a file in a worktree: ask git where the exclude file is.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '.gpu/' "$exclude" 2>/dev/null || echo '.gpu/' >> "$exclude"
rm -rf .gpu && mkdir -p .gpu/tests .gpu/benches .gpu/examples
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
        print(msg["target"]["kind"][0], msg["target"]["name"], msg["executable"])'
}
cargo test --release --no-run --message-format=json 2>/dev/null | executables | while read -r kind name path; do
  # Integration tests and the library's unit tests; not build scripts.
  case "$kind" in test|lib) cp "$path" ".gpu/tests/$name-$kind" ;; esac
done
cargo bench --no-run --message-format=json 2>/dev/null | executables | while read -r kind name path; do
  [ "$kind" = bench ] && cp "$path" ".gpu/benches/$name"
done
cargo build --release --examples --message-format=json 2>/dev/null | executables | while read -r kind name path; do
  [ "$kind" = example ] && cp "$path" ".gpu/examples/$name"
done
# Symbols are not needed there, and the carried tree is capped at 64 MiB:
# the binaries travel stripped and compressed; gpu-run.sh unpacks them.
strip --strip-unneeded .gpu/tests/* .gpu/benches/* .gpu/examples/*
git rev-parse HEAD > .gpu/commit
tar -C .gpu -cJf .gpu/binaries.tar.xz tests benches examples
rm -rf .gpu/tests .gpu/benches .gpu/examples
du -sh .gpu

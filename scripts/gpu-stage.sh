#!/usr/bin/env bash
# Builds every test, bench and example binary here (no GPU needed), and the
# candle CUDA trials and CUDA `train` binary, and copies them into .gpu/
# (ignored through .git/info/exclude), for the device tool:
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
# candle on CUDA (candle-core's `cuda`, README "Models"): moerec's candle
# trials (`candle-cuda`), the models' device trials and the `train` binary
# (`cuda`), in target/candle-cuda beside CI's lint of the same features.
# candle's kernels need nvcc and a compute capability here; the binaries link
# libcuda, cuBLAS(Lt), cuRAND and NVRTC, which this machine has only as
# stand-ins (scripts/cuda-link-stubs.sh); the device loads the real ones.
# Cold, candle-kernels' nvcc step takes ~7 min on two idle cores.
mkdir -p .gpu/cuda
(
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER="$(bash scripts/cuda-link-stubs.sh)/cc"
  export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER
  cuda=(--release --target-dir target/candle-cuda --message-format=json)
  {
    cargo test "${cuda[@]}" --no-run -p moerec --features candle-cuda --test 'candle_*'
    cargo test "${cuda[@]}" --no-run -p moerec-models --features cuda --test devices
    cargo build "${cuda[@]}" -p moerec-models --features cuda --bin train
  } 2>"$root/target/gpu-stage-cuda.log" | executables | while read -r kind name path; do
    case "$kind" in test|bin) cp "$path" ".gpu/cuda/$name" ;; esac
  done
)
for want in candle_scoring candle_embedding candle_routing candle_experts devices train; do
  [ -x ".gpu/cuda/$want" ] || {
    tail -n 20 target/gpu-stage-cuda.log >&2
    echo "gpu-stage: the CUDA build did not produce $want (log: target/gpu-stage-cuda.log)" >&2
    exit 1
  }
done
# Symbols are not needed there, and the carried tree is capped at 64 MiB:
# the binaries travel stripped and compressed; gpu-run.sh unpacks them.
strip --strip-unneeded .gpu/tests/* .gpu/benches/* .gpu/examples/* .gpu/cuda/*
git rev-parse HEAD > .gpu/commit
tar -C .gpu -cJf .gpu/binaries.tar.xz tests benches examples cuda
rm -rf .gpu/tests .gpu/benches .gpu/examples .gpu/cuda
du -sh .gpu

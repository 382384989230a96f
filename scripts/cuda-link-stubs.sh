#!/usr/bin/env bash
# Link-time stand-ins for the CUDA libraries candle-core's `cuda` feature
# links (cudarc `dynamic-linking`: libcuda, libnvrtc, libcurand, libcublas,
# libcublasLt), for building such binaries on a machine without a CUDA
# toolkit or driver (../shared/notes/candle-cuda-build.md): one empty
# function per name cudarc's bindings declare, under the real libraries'
# SONAMEs, so the binaries load the real ones on a GPU machine. Never run
# against these: they do nothing.
#
# Prints a folder holding the stubs and `cc`, a linker that searches them:
#   export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=$(bash scripts/cuda-link-stubs.sh)/cc
# (a linker setting, not CUDA_HOME or RUSTFLAGS: those would rebuild
# candle-kernels or everything). Usage: cuda-link-stubs.sh [FOLDER]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/target/cuda-link-stubs}
cudarc=$(cargo metadata --format-version 1 --manifest-path "$root/Cargo.toml" 2>/dev/null | python3 -c '
import json, os, sys
dirs = sorted({os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"})
if len(dirs) != 1:
    sys.exit(f"expected one cudarc in the dependency graph, found {dirs}")
print(dirs[0])')
mkdir -p "$out"
# library (as linked), cudarc's bindings, SONAME (CUDA 13: what candle's build expects).
for entry in "cuda driver libcuda.so.1" "nvrtc nvrtc libnvrtc.so.13" "curand curand libcurand.so.10" \
  "cublas cublas libcublas.so.13" "cublasLt cublaslt libcublasLt.so.13"; do
  read -r lib bindings soname <<< "$entry"
  # Functions declared in the bindings' `extern "C"` blocks, and any link_name.
  names=$(grep -ohE '^\s+(pub )?fn [A-Za-z_][A-Za-z0-9_]*\(|link_name = "[A-Za-z0-9_]+"' \
    "$cudarc/src/$bindings/sys/"*.rs | grep -oE '[A-Za-z_][A-Za-z0-9_]*(\(|"$)' | tr -d '("' | sort -u)
  [ -n "$names" ] || { echo "no function names in $cudarc/src/$bindings/sys" >&2; exit 1; }
  printf 'void %s(void) {}\n' $names > "$out/$lib.c"
  cc -shared -fPIC -Wl,-soname,"$soname" -o "$out/lib$lib.so" "$out/$lib.c"
  rm "$out/$lib.c"
done
# candle-kernels' MoE kernels (its static libmoe) call the CUDA runtime, so
# the binaries also link -lcudart: the real libcudart.so.13 of the pinned
# PyPI toolkit (scripts/install-nvcc.sh) links without a driver, and its
# SONAME sends the binaries to the device's own libcudart.so.13.
nvcc=${NVCC:-$(eval "$(bash "$root/scripts/install-nvcc.sh")" && echo "$NVCC")}
cudart=$(dirname "$nvcc")/../lib/libcudart.so.13
[ -e "$cudart" ] || { echo "no libcudart.so.13 beside $nvcc (expected $cudart)" >&2; exit 1; }
ln -sf "$(cd "$(dirname "$cudart")" && pwd)/libcudart.so.13" "$out/libcudart.so"
cat > "$out/cc" <<EOF
#!/bin/sh
exec cc -L"$out" "\$@"
EOF
chmod +x "$out/cc"
echo "$out"

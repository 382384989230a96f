#!/usr/bin/env bash
# ptxas resource report for the H100 (sm_90a), no GPU needed: registers, stack
# and spills for every kernel of every kernels/*.cu. Writes
# target/ptxas-report.txt and exits non-zero when any kernel spills.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
  nvcc=$(ls "$root"/.venv-cuda/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n 1 || true)
fi
[ -x "$nvcc" ] || { echo "ptxas-report: no nvcc (set NVCC or run scripts/install-nvcc.sh)" >&2; exit 1; }
mkdir -p "$root/target"
report="$root/target/ptxas-report.txt"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-44s %5s %6s %12s %11s\n' kernel regs stack spill_stores spill_loads > "$report"
for source in "$root"/kernels/*.cu; do
  "$nvcc" -cubin -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -Xptxas -v \
    -I "$root/kernels" "$source" -o "$tmp/out.cubin" 2> "$tmp/log"
  # ptxas prints, per entry: "Compiling entry function 'name'", then the stack
  # and spill line, then "Used N registers".
  awk -v file="$(basename "$source")" '
    /Compiling entry function/ { match($0, /\047[^\047]+\047/); name = substr($0, RSTART + 1, RLENGTH - 2) }
    /bytes stack frame/ { stack = $1; stores = $5; loads = $9 }
    /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1);
      printf "%-44s %5s %6s %12s %11s\n", file ":" name, regs, stack, stores, loads }
  ' "$tmp/log" >> "$report"
done
cat "$report"
spills=$(awk 'NR > 1 && ($4 > 0 || $5 > 0)' "$report")
if [ -n "$spills" ]; then
  echo "ptxas-report: kernels that spill:" >&2
  echo "$spills" >&2
  exit 1
fi

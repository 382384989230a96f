#!/usr/bin/env bash
# Runs on the GPU machine from the repo root, after scripts/gpu-stage.sh:
# every test binary with MOEREC_REQUIRE_GPU=1, the example, the benches named
# in $MOEREC_BENCHES (default: all) and their PyTorch peers, then writes the
# bench records (DESIGN 5) to $OUT/records.jsonl. Logs go to $OUT.
set -uo pipefail
out="${OUT:-/tmp/moerec-out}"
mkdir -p "$out"
export MOEREC_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
commit=$(cat .gpu/commit 2>/dev/null || echo unknown)
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
failed=0
{ nvidia-smi; nvcc --version; } > "$out/machine.txt" 2>&1
tar -C .gpu -xJf .gpu/binaries.tar.xz

for test in .gpu/tests/*; do
  echo "== $test" >> "$out/tests.log"
  "$test" --test-threads=1 >> "$out/tests.log" 2>&1 || { failed=1; echo "FAILED: $test" | tee -a "$out/tests.log"; }
done
grep -E "^test result|FAILED|panicked" "$out/tests.log"
for example in .gpu/examples/*; do
  "$example" >> "$out/example.log" 2>&1 || { failed=1; echo "FAILED: $example"; }
done
tail -n 5 "$out/example.log" 2>/dev/null

benches=${MOEREC_BENCHES:-$(ls .gpu/benches)}
peers=()
for bench in $benches; do
  CRITERION_HOME=/tmp/criterion ".gpu/benches/$bench" --bench >> "$out/bench.log" 2>&1 || { failed=1; echo "FAILED: bench $bench"; }
  peer="python_ref/${bench}_torch_peer.py"
  if [ -f "$peer" ]; then
    python3 "$peer" --out "$out/peers.jsonl" >> "$out/peers.log" 2>&1 || { failed=1; echo "FAILED: $peer"; }
    peers=("$out/peers.jsonl")
  fi
done
python3 scripts/bench_records.py /tmp/criterion --device "$device" --commit "$commit" \
  --command "bash scripts/gpu-run.sh (MOEREC_BENCHES=${benches//$'\n'/ })" --peers "${peers[@]}" > "$out/records.jsonl"
wc -l "$out/records.jsonl"
exit $failed

#!/usr/bin/env bash
# The first-GPU check in one device call, after scripts/gpu-stage.sh here:
#   run(command="bash scripts/gpu-run.sh", carry=[".gpu"], timeout_s=540)
# From the repo root on the GPU machine (nvcc, driver, PyTorch; no Rust):
#   1. every test binary with MOEREC_REQUIRE_GPU=1 (a CUDA trial that cannot
#      run fails), then the example; then the candle CUDA trials (moerec's
#      `candle_*`, the models' `devices`) and a short CUDA-vs-CPU training
#      smoke of `train` (1b);
#   2. compute-sanitizer memcheck, racecheck, synccheck and initcheck on one
#      short CUDA test per kernel family;
#   3. a reduced benchmark set (DESIGN 5 reference points, short criterion
#      times), each followed by its PyTorch peer on the same shapes;
#   4. $OUT/records.jsonl (scripts/bench_records.py).
# Logs go to $OUT. Sanitizer runs stop at 45 s each and start only while a
# minute of MOEREC_GPU_BUDGET_S (default 450 s of the call) is left; benches
# start only while more than their estimate is left: what did not start is
# listed as skipped. Exits non-zero when anything failed or did not run.
#
# Rehearsal without a GPU, on the emulated device (the fake libcuda of
# emu/libcuda/; no nvidia-smi, compute-sanitizer or PyTorch there, so those
# steps report their failure, which is what is rehearsed):
#   bash scripts/gpu-stage.sh
#   LD_LIBRARY_PATH=$(bash emu/libcuda/build.sh) OUT=/tmp/gpu-out \
#     MOEREC_GPU_BUDGET_S=120 MOEREC_GPU_TESTS='streams-test' bash scripts/gpu-run.sh
# Step 1b without the CUDA build: stage default-feature `train`, `devices`
# and `candle_*` binaries as .gpu/cuda/<name> in binaries.tar.xz; their CUDA
# trials then fail under MOEREC_REQUIRE_GPU=1 and `train --device cuda`
# fails naming the missing feature, which is what is rehearsed.
set -uo pipefail
start=$SECONDS
budget=${MOEREC_GPU_BUDGET_S:-450}
left() { echo $((budget - (SECONDS - start))); }
out="${OUT:-/tmp/moerec-out}"
mkdir -p "$out"
export MOEREC_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
commit=$(cat .gpu/commit 2>/dev/null || echo unknown)
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
device=${device:-unknown}
failed=0
fail() { failed=1; echo "FAILED: $*" | tee -a "$out/summary.log"; }
note() { echo "$*" | tee -a "$out/summary.log"; }
{ nvidia-smi; nvcc --version; } > "$out/machine.txt" 2>&1
tar -C .gpu -xJf .gpu/binaries.tar.xz || fail "unpacking .gpu/binaries.tar.xz"

# 1. Tests (MOEREC_GPU_TESTS: a glob of the staged names to run instead of
# all, for a rehearsal on the emulated device).
for test in .gpu/tests/${MOEREC_GPU_TESTS:-*}; do
  [ -e "$test" ] || { fail "no staged test binary matches .gpu/tests/${MOEREC_GPU_TESTS:-*}"; continue; }
  t0=$SECONDS
  echo "== $test" >> "$out/tests.log"
  "$test" --test-threads=1 >> "$out/tests.log" 2>&1 || fail "$test"
  note "$(basename "$test"): $((SECONDS - t0)) s"
done
grep -E "^test result|FAILED|panicked" "$out/tests.log"
for example in .gpu/examples/*; do
  [ -e "$example" ] || { fail "no staged example"; continue; }
  "$example" >> "$out/example.log" 2>&1 || fail "$example"
done

# 1b. candle on CUDA (binaries built with candle-core's `cuda`, which links
# the CUDA 13 libraries: the driver's libcuda and PyTorch's or the toolkit's
# cuBLAS, cuBLASLt, cuRAND, NVRTC): moerec's candle trials, the models'
# device trials, then a training smoke of `train` (SASRec and FAME on
# Beauty's first 2560 users: 10 steps of 256 on CUDA and the same on the CPU
# for the ratio; loss and seq/s in $out/train-smoke.jsonl and .log). Inside
# the budget: ~2 min estimated on a GPU machine, taken from the sanitizer
# and bench steps after it.
cuda_libs=$(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = [d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))]
dirs += glob.glob("/usr/local/cuda*/lib64") + glob.glob("/usr/local/cuda*/targets/*/lib")
print(":".join(sorted(set(dirs))))
PY
)
cuda_env=(env "LD_LIBRARY_PATH=${cuda_libs:+$cuda_libs:}${LD_LIBRARY_PATH:-}")
if [ ! -x .gpu/cuda/train ]; then
  fail "no staged candle CUDA binaries (.gpu/cuda): run scripts/gpu-stage.sh"
elif missing=$("${cuda_env[@]}" ldd .gpu/cuda/train | grep 'not found'); then
  fail "candle CUDA binaries cannot load (searched ${cuda_libs:-nothing}): $(echo "$missing" | tr -s ' \t\n' ' ')"
else
  for test in .gpu/cuda/candle_* .gpu/cuda/devices; do
    if [ "$(left)" -le 60 ]; then
      fail "skipped $test: $(left) s left of $budget"
      continue
    fi
    t0=$SECONDS
    echo "== $test" >> "$out/candle-cuda.log"
    "${cuda_env[@]}" timeout 120 "$test" --test-threads=1 >> "$out/candle-cuda.log" 2>&1 || fail "$test"
    note "$(basename "$test") (candle CUDA): $((SECONDS - t0)) s"
  done
  grep -E "^test result|FAILED|panicked" "$out/candle-cuda.log"
  # Each evaluation ranks these users against the whole catalog; the
  # steps' seq/s include CUDA's start-up (cuBLAS handles, PTX loading).
  head -n 2560 data/Beauty.txt > "$out/beauty-2560.txt"
  for model in sasrec fame; do
    for dev in cuda cpu; do
      if [ "$(left)" -le 60 ]; then
        fail "skipped the $model training smoke on $dev: $(left) s left of $budget"
        continue
      fi
      t0=$SECONDS
      echo "== $model on $dev" >> "$out/train-smoke.log"
      "${cuda_env[@]}" timeout 90 .gpu/cuda/train --model "$model" --device "$dev" \
        --data "$out/beauty-2560.txt" --num-items 12101 --seed 1 --max-epochs 1 --time-budget 0 --quiet \
        --results "$out/train-smoke.jsonl" --note "gpu-run.sh smoke on $dev ($device), 10 steps" \
        >> "$out/train-smoke.log" 2>&1 || fail "train --model $model --device $dev"
      note "train $model on $dev: $((SECONDS - t0)) s"
    done
  done
  [ -s "$out/train-smoke.jsonl" ] && python3 - "$out/train-smoke.jsonl" <<'PY' | tee -a "$out/summary.log" || fail "reading $out/train-smoke.jsonl"
import json, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[(r["model"], "cuda" if " on cuda " in r["note"] else "cpu")] = r
for model in ("sasrec", "fame"):
    got = {d: runs.get((model, d)) for d in ("cuda", "cpu")}
    line = [f"{model}:"]
    for d, r in got.items():
        if r:
            line.append(f"{d} loss {r['epoch_losses'][-1]:.5f} {r['sequences_per_s']:.0f} seq/s")
    if all(got.values()):
        line.append(f"cuda/cpu {got['cuda']['sequences_per_s'] / got['cpu']['sequences_per_s']:.2f}x")
    print("  ".join(line))
PY
fi

# 2. compute-sanitizer: one short CUDA test per kernel family.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
families=(
  "embedding-test cuda::an_all_padding_batch_gives_zero_rows_and_an_empty_gradient"
  "routing-test cuda::a_hand_checked_plan"
  "experts-test cuda::matches_the_numpy_golden_files"
  "scoring-test cuda::matches_the_numpy_golden_files"
  "cuda_launch-test cuda::shared_memory_past_48_kb_needs_the_opt_in_and_stays_within_the_limit"
)
if [ -z "$sanitizer" ]; then
  fail "compute-sanitizer not found: the sanitizer checks did not run"
else
  for tool in memcheck racecheck synccheck initcheck; do
    for family in "${families[@]}"; do
      read -r binary name <<< "$family"
      if [ "$(left)" -le 60 ]; then
        fail "skipped compute-sanitizer --tool $tool $binary: $(left) s left of $budget"
        continue
      fi
      t0=$SECONDS
      echo "== $tool $binary $name" >> "$out/sanitizer.log"
      timeout 45 "$sanitizer" --tool "$tool" --error-exitcode 1 ".gpu/tests/$binary" --exact "$name" \
        >> "$out/sanitizer.log" 2>&1 || fail "compute-sanitizer --tool $tool $binary $name (exit $?)"
      note "$tool $binary: $((SECONDS - t0)) s"
    done
  done
fi

# 3. Benches: name; criterion filter (a regex); peer arguments; estimated seconds.
benches=(
  "embedding;^(copy/cuda|embedding_(fwd|bwd)/cuda/[a-z0-9]+/H4_V1000000_D(64|128)_T51200);--iters 20;40"
  "routing;^routing_(fwd|bwd)/cuda/bf16/T(65536|262144)_E(8|64)_k(2|8)\$;--T 65536 262144 --E 8 64 --k 2 8 --dtype bf16;45"
  "experts;^experts_(fwd|bwd)/cuda/bf16/T(51200_E8_k2_Din256_Dout256|16384_E8_k2_Din2048_Dout2048)_;--shapes recsys --T 51200 --din 256 --dout 256 --E 8 --k 2;60"
  "scoring;^scoring_[a-z]+_[a-z]+/cuda/bf16/B4096_H4_D64_V1000000;--B 4096 --H 4 --D 64 --V 1000000 --dtype bf16;60"
)
criterion=(--warm-up-time 0.3 --measurement-time 1 --sample-size 10)
# This run's results only (a rehearsal machine may hold older ones).
criterion_home=$(mktemp -d)
peers=()
for entry in "${benches[@]}"; do
  IFS=';' read -r bench filter peer_args estimate <<< "$entry"
  if [ "$(left)" -le "$estimate" ]; then
    note "skipped bench $bench: $(left) s left of $budget, it needs about $estimate"
    failed=1
    continue
  fi
  t0=$SECONDS
  CRITERION_HOME=$criterion_home timeout "$(left)" ".gpu/benches/$bench" --bench "${criterion[@]}" "$filter" \
    >> "$out/bench.log" 2>&1 || fail "bench $bench"
  peer="python_ref/${bench}_torch_peer.py"
  if [ -f "$peer" ] && [ "$(left)" -gt 10 ]; then
    # shellcheck disable=SC2086
    timeout "$(left)" python3 "$peer" $peer_args --out "$out/peers.jsonl" >> "$out/peers.log" 2>&1 \
      || fail "$peer"
    [ -s "$out/peers.jsonl" ] && peers=("$out/peers.jsonl")
  fi
  note "bench $bench + peer: $((SECONDS - t0)) s"
done
python3 scripts/bench_records.py "$criterion_home" --device "$device" --commit "$commit" \
  --command "bash scripts/gpu-run.sh (reduced set)" --peers "${peers[@]}" > "$out/records.jsonl" \
  || fail "scripts/bench_records.py"
note "records: $(wc -l < "$out/records.jsonl"); wall $((SECONDS - start)) s; failed=$failed"
exit $failed

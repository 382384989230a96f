#!/usr/bin/env python3
"""Training speed of the seed models, Rust vs the PyTorch twin, on this
machine: sequences/s of training steps (forward, backward, AdamW; batch,
data, dropout as `train`) and the peak memory of each process, measured
alternately (Rust, PyTorch, Rust, PyTorch, ...) at the same thread count and
batch, so both see the same machine load. Appends one JSON line per run to
--out (machine, commit, date, the exact command, the round) and prints the
medians.

usage: python3 scripts/models-speed.py [--models sasrec,fame] [--steps 10] [--rounds 3]
           [--threads 1] [--batch-size 256] [--out bench/results/models/speed.jsonl] [--note TEXT]

Rust: the example `train_speed` (built here with cargo); PyTorch:
`python -m models.train_speed` in the torch venv (scripts/torch-env.sh, or
MOEREC_TORCH_PYTHON). On a shared machine, quote the medians and the CPU
seconds per step (the steadier figure) with the load.
"""

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torch_python():
    if os.environ.get("MOEREC_TORCH_PYTHON"):
        return os.environ["MOEREC_TORCH_PYTHON"]
    out = subprocess.run(["bash", str(ROOT / "scripts" / "torch-env.sh")], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def cpu_model():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def run(impl, model, args, python):
    """One measurement: the child's JSON line, with the command that produced it."""
    common = ["--model", model, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    if impl == "rust":
        cmd = [str(ROOT / "target" / "release" / "examples" / "train_speed"), *common, "--data", "data/Beauty.txt"]
        cwd, shown = ROOT, f"RAYON_NUM_THREADS={args.threads} target/release/examples/train_speed"
    else:
        cmd = [python, "-m", "models.train_speed", *common, "--threads", str(args.threads)]
        cwd, shown = ROOT / "python_ref", "cd python_ref && python -m models.train_speed"
    load = load_average()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{impl} {model} failed ({out.returncode}):\n{out.stderr}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["command"] = f"{shown} {shlex.join(cmd[1 if impl == 'rust' else 3:])}"
    record["load_average_before"] = load
    return record


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sasrec,fame")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "models" / "speed.jsonl"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "-p", "moerec-models", "--example", "train_speed"], cwd=ROOT, check=True
    )
    python = torch_python()
    base = dict(
        machine=dict(cpu=cpu_model(), threads=args.threads),
        commit=git("rev-parse", "HEAD"),
        dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
        script=shlex.join(["python3", "scripts/models-speed.py", *sys.argv[1:]]),
        note=args.note,
    )
    results = []
    with open(args.out, "a") as f:
        for round_ in range(1, args.rounds + 1):
            for model in args.models.split(","):
                for impl in ("rust", "pytorch"):
                    record = run(impl, model, args, python)
                    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                    record.update(base, round=round_, date=date)
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    results.append(record)
                    print(
                        f"round {round_} {model:6} {impl:7} {record['sequences_per_s']:8.1f} seq/s  "
                        f"{record['wall_s_per_step']:.3f} s/step wall  {record['cpu_s_per_step']:.3f} CPU-s/step  "
                        f"peak {record['peak_rss_mb']} MB  (load {record['load_average_before']})",
                        flush=True,
                    )
    print(f"\nmedians over {args.rounds} rounds of {args.steps} steps, batch {args.batch_size}, {args.threads} thread(s):")
    for model in args.models.split(","):
        row = {}
        for impl in ("rust", "pytorch"):
            runs = [r for r in results if r["model"] == model and r["impl"] == impl]
            row[impl] = {k: statistics.median(r[k] for r in runs) for k in ("sequences_per_s", "cpu_s_per_step", "peak_rss_mb")}
            m = row[impl]
            print(f"  {model:6} {impl:7} {m['sequences_per_s']:8.1f} seq/s  {m['cpu_s_per_step']:.3f} CPU-s/step  peak {m['peak_rss_mb']:.0f} MB")
        ratio = row["rust"]["sequences_per_s"] / row["pytorch"]["sequences_per_s"]
        print(f"  {model:6} Rust / PyTorch sequences/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()

"""Training-step throughput of the PyTorch twins, for the Rust-vs-PyTorch
speed comparison: the same data, split, batch size, model and AdamW as the
Rust trainer (`train --max-steps-per-epoch N`), timed over N steps.

usage: python -m models.train_speed --model sasrec --data data/Beauty.txt --steps 10 --threads 1
(run from python_ref/). Prints one JSON line: sequences/s, wall and CPU seconds
per step, peak RSS.
"""

import argparse
import datetime
import json
import platform
import shlex
import sys
import random
import resource
import time

import torch

from . import fame, sasrec

MAX_LEN = 50


def load_train(path):
    """Training sequences (inputs, targets) of the leave-one-out split, last 50 items."""
    out = []
    with open(path) as f:
        for line in f:
            items = [int(t) for t in line.split()[1:]]
            train = items[:-2]
            if len(train) >= 2:
                start = max(len(train) - 1 - MAX_LEN, 0)
                out.append((train[start:-1], train[start + 1 :]))
    return out


def batch(seqs):
    width = max(len(i) for i, _ in seqs)
    inputs = torch.zeros(len(seqs), width, dtype=torch.long)
    rows, targets = [], []
    for b, (i, t) in enumerate(seqs):
        inputs[b, width - len(i) :] = torch.tensor(i)
        first = b * width + width - len(t)
        rows.extend(range(first, first + len(t)))
        targets.extend(t)
    return inputs, torch.tensor(rows), torch.tensor(targets)


def init(model, num_items, dim=64, heads=2, blocks=2, facets=4, experts=4):
    """Parameters named and shaped as the Rust model's (values: N(0, 0.02), norms 1/0)."""
    g = torch.Generator().manual_seed(0)
    p = {}

    def normal(name, *shape):
        p[name] = (torch.randn(*shape, generator=g) * 0.02).requires_grad_()

    def const(name, value, *shape):
        p[name] = torch.full(shape, float(value)).requires_grad_()

    def linear(name, i, o):
        normal(f"{name}.weight", i, o)
        const(f"{name}.bias", 0, o)

    def norm(name, *shape):
        const(f"{name}.gain", 1, *shape)
        const(f"{name}.bias", 0, *shape)

    normal("items", num_items + 1, dim)
    normal("positions", MAX_LEN, dim)
    shared = blocks if model == "sasrec" else blocks - 1
    for i in range(shared):
        n = f"block{i}"
        norm(f"{n}.attn_norm", dim)
        for w in ("query", "key", "value", "output", "ffn.inner", "ffn.outer"):
            linear(f"{n}.{w}", dim, dim)
        norm(f"{n}.ffn_norm", dim)
    if model == "sasrec":
        norm("final_norm", dim)
    else:
        h, n, dh = facets, experts, dim // facets
        norm("fame.attn_norm", dim)
        normal("fame.query_experts.weight", h * n, dim, dh)
        const("fame.query_experts.bias", 0, h * n, dh)
        linear("fame.key", dim, dim)
        linear("fame.value", dim, dim)
        normal("fame.router.weight", h, n * dh, n)
        const("fame.router.bias", 0, h, 1, n)
        norm("fame.ffn_norm", h, 1, dh)
        for w in ("ffn_inner", "ffn_outer"):
            normal(f"fame.{w}.weight", h, dh, dh)
            const(f"fame.{w}.bias", 0, h, 1, dh)
        norm("fame.final_norm", h, 1, dh)
        normal("fame.item_facets", h, dim, dh)
        linear("fame.gate", dim, h)
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["sasrec", "fame"], default="sasrec")
    ap.add_argument("--data", default="../data/Beauty.txt")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seqs = load_train(args.data)
    with open(args.data) as f:
        num_items = max(int(t) for line in f for t in line.split()[1:])
    random.Random(0).shuffle(seqs)
    params = init(args.model, num_items)
    config = dict(dim=64, heads=2, blocks=2, max_len=MAX_LEN, facets=4, experts=4, mixing=0)
    loss_fn = sasrec.loss if args.model == "sasrec" else fame.loss
    opt = torch.optim.AdamW(params.values(), lr=1e-3, weight_decay=0.01)
    wall = cpu = 0.0
    done = 0
    for step in range(args.steps):
        chunk = seqs[step * args.batch_size : (step + 1) * args.batch_size]
        inputs, rows, targets = batch(chunk)
        w0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        loss = loss_fn(params, inputs, rows, targets, config)
        loss.backward()
        opt.step()
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        done += len(chunk)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(model=args.model, impl="pytorch", torch=torch.__version__, threads=args.threads,
                          batch=args.batch_size, steps=args.steps, sequences_per_s=done / wall,
                          wall_s_per_step=wall / args.steps, cpu_s_per_step=cpu / args.steps,
                          peak_rss_mb=peak_kb / 1024, final_loss=loss.item(), cpu=cpu_model(),
                          date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                          command=shlex.join([sys.executable, "-m", "models.train_speed", *sys.argv[1:]]))))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()

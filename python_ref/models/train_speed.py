"""Training-step throughput of a PyTorch twin at its default shape, the
PyTorch side of the Rust-vs-PyTorch speed comparison (scripts/models-speed.py
runs it alternately with the Rust example `train_speed`): the data, split,
batch, model, dropout and AdamW of `train.py`, timed over N steps of a
shuffled epoch, without the evaluation. Prints one JSON line: sequences/s,
wall and CPU seconds per step, peak RSS (the whole process, torch's libraries
included).

usage (from python_ref/): python -m models.train_speed --model fame --steps 10 --threads 1
"""

import argparse
import json
import random
import time

import torch

from . import layers, train


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m models.train_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(train.QUERIES), default="sasrec")
    ap.add_argument("--data", default=str(train.ROOT / "data" / "Beauty.txt"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        ap.error("--steps and --batch-size must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    defaults = train.arguments([])
    num_items, sequences = train.load(args.data)
    seqs, _, _ = train.split(sequences)
    random.Random(args.seed).shuffle(seqs)
    config = train.config_of(defaults, num_items)
    params = train.init(args.model, config, args.seed)
    query = train.QUERIES[args.model]
    drop = train.dropout_fn(defaults.dropout)
    opt = torch.optim.AdamW(params.values(), lr=defaults.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    wall = cpu = 0.0
    done = taken = 0
    for step in range(args.steps):
        chunk = seqs[step * args.batch_size : (step + 1) * args.batch_size]
        if not chunk:
            break
        inputs, rows, targets = train.train_batch(chunk)
        w0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = layers.query_loss(query(params, inputs, rows, config, drop), targets)
        loss.backward()
        opt.step()
        value = loss.item()
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        done += len(chunk)
        taken += 1
    print(
        json.dumps(
            dict(
                model=args.model,
                impl="pytorch",
                torch=torch.__version__,
                threads=torch.get_num_threads(),
                batch=args.batch_size,
                steps=taken,
                sequences_per_s=round(done / wall, 2),
                wall_s_per_step=round(wall / taken, 4),
                cpu_s_per_step=round(cpu / taken, 4),
                peak_rss_mb=round(train.peak_rss_mb(), 1),
                final_loss=round(value, 5),
            )
        )
    )


if __name__ == "__main__":
    main()

"""Trains a PyTorch twin of the seed models in the protocol of the Rust `train`
binary (models/src/bin/train.rs), so the README's table compares like with like:

- data: the same files (`user item1 item2 ...`, 1-based ids, time order), the
  same errors (file, line, value); leave-one-out (last item = test target,
  second-to-last = validation target, the rest trains), inputs cut to the
  last 50 items, left-padded with 0, positions counted back from the newest;
- model: the twin in sasrec.py / fame.py (same layers, names, layouts and
  dropout sites as the Rust model; weights N(0, 0.02^2), norms 1 / 0);
- training: AdamW (PyTorch's, lr 1e-3, betas 0.9 / 0.999, eps 1e-8, weight
  decay 0.01 on every parameter, as models/src/optim.rs), batch 256, dropout
  0.2, cross-entropy over the whole catalog at every position; seeded
  (initialisation, shuffling and dropout) and deterministic for a given seed
  and thread count;
- evaluation: full ranking of the catalog, the user's history excluded except
  the target, ties to the lower id, HR/NDCG@5/10/20 (models/src/eval.rs);
  early stopping on validation NDCG@10 with patience, test metrics with the
  best epoch's weights;
- record: one JSON line with the Rust RunRecord's fields plus "impl":
  "pytorch" (models/src/record.rs).

The random streams differ from Rust's (torch's generator, not the Rust
SplitMix64), so a seed gives a different (equally distributed) run.

usage (from python_ref/): python -m models.train --model fame --data ../data/Beauty.txt
    --seed 1 --max-epochs 5 --time-budget 0 --threads 1 --results ../bench/results/models/x.jsonl
`--help` lists the options.
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import fame, layers, sasrec

ROOT = Path(__file__).resolve().parents[2]
MAX_LEN = 50
CUTOFFS = (5, 10, 20)
QUERIES = {"sasrec": sasrec.query, "fame": fame.query}
MIXINGS = {"logits": 0, "probabilities": 1}
INIT_STD = 0.02


class DataError(ValueError):
    """A data file's content is invalid: names the file, the line and the value."""


# ---------------------------------------------------------------- data


def parse(text, file, declared_items=None):
    """`(num_items, sequences)` from interaction text (models/src/data.rs `parse`)."""
    if declared_items is not None and declared_items < 1:
        raise ValueError(f"declared_items: expected at least 1, got {declared_items}")
    sequences, largest = [], 0
    for line_no, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            raise DataError(f"{file}:{line_no}: empty line: expected `user item1 item2 ...`")
        user = tokens[0]
        if not user.isdigit():
            raise DataError(f"{file}:{line_no}: malformed user id {user!r}: expected a non-negative integer")
        items = []
        for token in tokens[1:]:
            if not token.isdigit() or int(token) > 4294967295:
                raise DataError(f"{file}:{line_no}: malformed item id {token!r}: expected an integer in 1..=4294967295")
            item = int(token)
            if item == 0:
                raise DataError(f"{file}:{line_no}: item id 0: ids are 1-based, 0 is the padding id")
            if declared_items is not None and item > declared_items:
                raise DataError(
                    f"{file}:{line_no}: item id {item} is beyond the declared catalog of {declared_items} items"
                )
            largest = max(largest, item)
            items.append(item)
        if len(items) < 3:
            raise DataError(
                f"{file}:{line_no}: user {user} has {len(items)} item(s); "
                "the split needs at least 3 (train, validation, test)"
            )
        sequences.append(items)
    if not sequences:
        raise DataError(f"{file}:0: empty file: no users")
    return (declared_items if declared_items is not None else largest), sequences


def load(path, declared_items=None):
    with open(path) as f:
        return parse(f.read(), str(path), declared_items)


def split(sequences, max_len=MAX_LEN):
    """Leave-one-out: training `(inputs, targets)` pairs (users with at least two
    training items), validation and test `(history, target)` cases."""
    train, valid, test = [], [], []
    for seq in sequences:
        part = seq[:-2]
        if len(part) >= 2:
            start = max(len(part) - 1 - max_len, 0)
            train.append((part[start:-1], part[start + 1 :]))
        valid.append((part, seq[-2]))
        test.append((seq[:-1], seq[-1]))
    return train, valid, test


def pad(inputs):
    """`[B, T]` ids left-padded with 0 to the longest input."""
    width = max(len(i) for i in inputs)
    out = torch.zeros(len(inputs), width, dtype=torch.long)
    for b, items in enumerate(inputs):
        out[b, width - len(items) :] = torch.tensor(items)
    return out


def train_batch(seqs):
    """Inputs `[B, T]`, flat rows `b * T + t` with a target, and the targets."""
    inputs = pad([i for i, _ in seqs])
    width = inputs.shape[1]
    rows, targets = [], []
    for b, (_, t) in enumerate(seqs):
        first = b * width + width - len(t)
        rows.extend(range(first, first + len(t)))
        targets.extend(t)
    return inputs, torch.tensor(rows), torch.tensor(targets)


# ---------------------------------------------------------------- model


def config_of(args, num_items):
    return dict(
        num_items=num_items,
        dim=args.dim,
        heads=args.heads,
        blocks=args.blocks,
        max_len=MAX_LEN,
        dropout=args.dropout,
        facets=args.facets,
        experts=args.experts,
        mixing=MIXINGS[args.mixing],
    )


def init(model, config, seed):
    """Parameters named and shaped as the Rust model's: weights N(0, 0.02^2),
    biases 0, norm gains 1 (values from torch's generator, not Rust's)."""
    g = torch.Generator().manual_seed(seed)
    p = {}
    dim = config["dim"]

    def normal(name, *shape):
        p[name] = (torch.randn(*shape, generator=g) * INIT_STD).requires_grad_()

    def const(name, value, *shape):
        p[name] = torch.full(shape, float(value)).requires_grad_()

    def linear(name, i, o):
        normal(f"{name}.weight", i, o)
        const(f"{name}.bias", 0, o)

    def norm(name, *shape):
        const(f"{name}.gain", 1, *shape)
        const(f"{name}.bias", 0, *shape)

    if model not in QUERIES:
        raise ValueError(f"--model: expected one of {sorted(QUERIES)}, got {model!r}")
    if config["heads"] < 1 or dim % config["heads"]:
        raise ValueError(f"heads: expected a divisor of the width {dim}, got {config['heads']}")
    normal("items", config["num_items"] + 1, dim)
    normal("positions", config["max_len"], dim)
    shared = config["blocks"] if model == "sasrec" else config["blocks"] - 1
    if shared < 0:
        raise ValueError("blocks: expected at least 1 (the last is FAME's), got 0")
    for i in range(shared):
        n = f"block{i}"
        norm(f"{n}.attn_norm", dim)
        for w in ("query", "key", "value", "output", "ffn.inner", "ffn.outer"):
            linear(f"{n}.{w}", dim, dim)
        norm(f"{n}.ffn_norm", dim)
    if model == "sasrec":
        norm("final_norm", dim)
    else:
        h, n = config["facets"], config["experts"]
        if h < 1 or dim % h or n < 1:
            raise ValueError(f"facets / experts: expected a divisor of {dim} and at least 1, got {h} / {n}")
        dh = dim // h
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


# ---------------------------------------------------------------- evaluation


def ranking_scores(model, p, config, chunk):
    """For `(history, target)` cases: `[B, V]` what items 1..V are ranked by
    (NaN as -inf) and `[B, V]` which are eligible (not in the history, or the
    target). The model sees the last `max_len` items of each history."""
    inputs = pad([history[-config["max_len"] :] for history, _ in chunk])
    width = inputs.shape[1]
    rows = torch.arange(len(chunk)) * width + width - 1
    with torch.no_grad():
        s = layers.ranking_scores(*QUERIES[model](p, inputs, rows, config))
    s = torch.nan_to_num(s, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    eligible = torch.ones_like(s, dtype=torch.bool)
    for b, (history, target) in enumerate(chunk):
        eligible[b, [i - 1 for i in set(history) if i != target]] = False
    return s, eligible


def rankings(model, p, config, cases, batch_size=256, depth=CUTOFFS[-1]):
    """The `depth` best eligible items of every `(history, target)` case, best
    first, ties to the lower id (models/src/eval.rs `rankings`)."""
    out = []
    for start in range(0, len(cases), batch_size):
        s, eligible = ranking_scores(model, p, config, cases[start : start + batch_size])
        short = (eligible.sum(1) < depth).nonzero()
        if len(short):
            raise ValueError(f"case {start + int(short[0])}: expected at least {depth} eligible items")
        # Stable sorts: by score (ties keep the lower id first), then eligible
        # items before excluded ones, keeping that order.
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        excluded_last = torch.sort((~eligible.gather(1, order)).to(torch.uint8), dim=1, stable=True).indices
        out.extend((order.gather(1, excluded_last)[:, :depth] + 1).tolist())
    return out


def metrics(ranked, cases):
    """HR@k and NDCG@k (k in 5, 10, 20) averaged over the cases."""
    hr, ndcg = [0.0] * len(CUTOFFS), [0.0] * len(CUTOFFS)
    for ranking, (_, target) in zip(ranked, cases):
        if target in ranking:
            rank = ranking.index(target)
            for i, k in enumerate(CUTOFFS):
                if rank < k:
                    hr[i] += 1
                    ndcg[i] += 1 / math.log2(rank + 2)
    n = max(len(cases), 1)
    out = {f"hr@{k}": hr[i] / n for i, k in enumerate(CUTOFFS)}
    out.update({f"ndcg@{k}": ndcg[i] / n for i, k in enumerate(CUTOFFS)})
    return out


def evaluate(model, p, config, cases, batch_size=256):
    return metrics(rankings(model, p, config, cases, batch_size), cases)


# ---------------------------------------------------------------- training


def dropout_fn(rate):
    if rate == 0:
        return layers.no_dropout
    return lambda x: torch.nn.functional.dropout(x, rate, training=True)


def progress(quiet, epoch, step, steps, loss, rate):
    if quiet:
        return
    line = f"epoch {epoch:>3} [{step}/{steps}]  loss {loss:.4f}  {rate:.0f} seq/s"
    if sys.stderr.isatty():
        print("\r" + line, end="" if step < steps else "\n", file=sys.stderr, flush=True)
    elif step == steps or step % max(1, steps // 10) == 0:
        print(line, file=sys.stderr, flush=True)


def save_checkpoint(path, state):
    tmp = Path(f"{path}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(args):
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected at least 1, got {args.batch_size}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout: expected a rate in [0, 1), got {args.dropout}")
    torch.set_num_threads(args.threads)
    num_items, sequences = load(args.data, args.num_items)
    train_seqs, valid, test = split(sequences)
    if not train_seqs:
        raise ValueError("training sequences: expected at least one user with 4 or more items, got 0")
    config = config_of(args, num_items)
    p = init(args.model, config, args.seed)
    query = QUERIES[args.model]
    opt = torch.optim.AdamW(p.values(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    torch.manual_seed(args.seed)
    shuffle = random.Random(args.seed)
    state = dict(epoch=0, best_epoch=0, best_ndcg10=-math.inf)
    best = {}
    if args.resume:
        if not args.checkpoint:
            raise ValueError("--resume: expected a --checkpoint path, got none")
        saved = torch.load(args.checkpoint, weights_only=False)
        if (saved["model"], saved["config"]) != (args.model, config):
            raise ValueError(
                f"checkpoint {args.checkpoint}: made for {saved['model']} {saved['config']}, "
                f"not {args.model} {config}"
            )
        with torch.no_grad():
            for name, value in saved["params"].items():
                p[name].copy_(value)
        opt.load_state_dict(saved["optimizer"])
        best, state = saved["best"], saved["state"]
        torch.set_rng_state(saved["torch_rng"])
        shuffle.setstate(saved["shuffle_rng"])
    elif args.checkpoint and Path(args.checkpoint).exists() and not args.overwrite:
        raise ValueError(f"{args.checkpoint} exists; pass --overwrite to replace it, or --resume to continue from it")
    print(
        f"{args.model} (pytorch) on {args.data} ({len(sequences)} users, {num_items} items, "
        f"{len(train_seqs)} training sequences), {sum(t.numel() for t in p.values())} parameters, "
        f"{torch.get_num_threads()} thread(s)",
        file=sys.stderr,
    )
    full_steps = math.ceil(len(train_seqs) / args.batch_size)
    steps = min(full_steps, args.max_steps_per_epoch) if args.max_steps_per_epoch else full_steps
    drop = dropout_fn(args.dropout)
    started = time.perf_counter()
    epochs, stopped_by = [], f"max_epochs ({args.max_epochs})"
    while state["epoch"] < args.max_epochs:
        epoch = state["epoch"] + 1
        order = list(range(len(train_seqs)))
        shuffle.shuffle(order)
        w0, c0 = time.perf_counter(), time.process_time()
        loss_sum, seen, taken, out_of_time = 0.0, 0, 0, False
        for step in range(steps):
            chunk = [train_seqs[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]]
            inputs, rows, targets = train_batch(chunk)
            opt.zero_grad(set_to_none=True)
            loss = layers.query_loss(query(p, inputs, rows, config, drop), targets)
            loss.backward()
            opt.step()
            value = loss.item()
            if not math.isfinite(value):
                raise ValueError(f"training loss: expected a finite number, got {value} at epoch {epoch}, step {step + 1}")
            loss_sum, seen, taken = loss_sum + value, seen + len(chunk), taken + 1
            progress(args.quiet, epoch, taken, steps, loss_sum / taken, seen / (time.perf_counter() - w0))
            if args.time_budget and time.perf_counter() - started >= args.time_budget:
                out_of_time = True
                break
        train_s, cpu_s = time.perf_counter() - w0, time.process_time() - c0
        valid_m = evaluate(args.model, p, config, valid, args.batch_size)
        state["epoch"] = epoch
        is_best = valid_m["ndcg@10"] > state["best_ndcg10"]
        if is_best:
            state.update(best_ndcg10=valid_m["ndcg@10"], best_epoch=epoch)
            best = {n: t.detach().clone() for n, t in p.items()}
        log = dict(epoch=epoch, loss=loss_sum / max(taken, 1), steps=taken, train_s=train_s, cpu_s=cpu_s, sequences=seen)
        epochs.append(log)
        if not args.quiet:
            print(
                f"epoch {epoch:>3}  loss {log['loss']:.4f}  {train_s:.1f} s  {seen / train_s:.0f} seq/s  "
                f"valid HR@10 {valid_m['hr@10']:.4f}  NDCG@10 {valid_m['ndcg@10']:.4f}{'  (best)' if is_best else ''}",
                file=sys.stderr,
            )
        if args.checkpoint:
            save_checkpoint(
                args.checkpoint,
                dict(
                    model=args.model,
                    config=config,
                    params={n: t.detach() for n, t in p.items()},
                    optimizer=opt.state_dict(),
                    best=best,
                    state=state,
                    torch_rng=torch.get_rng_state(),
                    shuffle_rng=shuffle.getstate(),
                ),
            )
        if out_of_time:
            stopped_by = f"time budget ({args.time_budget} s)"
            break
        if epoch - state["best_epoch"] >= args.patience:
            stopped_by = f"early stopping (no better validation NDCG@10 for {args.patience} epochs)"
            break
    if state["best_epoch"] == 0:
        raise ValueError(f"--max-epochs: expected at least one epoch to train, got {state['epoch']} already done")
    with torch.no_grad():
        for name, value in best.items():
            p[name].copy_(value)
    report = dict(
        epochs=epochs,
        epochs_total=state["epoch"],
        best_epoch=state["best_epoch"],
        best_valid=evaluate(args.model, p, config, valid, args.batch_size),
        test=evaluate(args.model, p, config, test, args.batch_size),
        stopped_by=stopped_by,
        steps_per_epoch=full_steps,
    )
    return report


# ---------------------------------------------------------------- record


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record(args, report, command):
    """The Rust RunRecord's fields (models/src/record.rs), plus impl and torch."""
    ran = [e for e in report["epochs"] if e["steps"] > 0]
    steps = sum(e["steps"] for e in ran)

    def per_epoch(key):
        return round(sum(e[key] for e in ran) / steps * report["steps_per_epoch"], 1) if steps else None

    seconds = sum(e["train_s"] for e in ran)
    data = Path(args.data).resolve()
    dataset = str(data.relative_to(ROOT)) if data.is_relative_to(ROOT) else args.data
    return dict(
        model=args.model,
        impl="pytorch",
        dataset=dataset,
        seed=args.seed,
        valid={k: round(v, 6) for k, v in report["best_valid"].items()},
        test={k: round(v, 6) for k, v in report["test"].items()},
        epochs=report["epochs_total"],
        best_epoch=report["best_epoch"],
        stopped_by=report["stopped_by"],
        epoch_losses=[round(e["loss"], 5) for e in report["epochs"]],
        epoch_steps=[e["steps"] for e in report["epochs"]],
        steps_per_epoch=report["steps_per_epoch"],
        wall_s_per_epoch=per_epoch("train_s"),
        cpu_s_per_epoch=per_epoch("cpu_s"),
        sequences_per_s=round(sum(e["sequences"] for e in ran) / seconds, 1) if seconds else 0.0,
        peak_rss_mb=round(peak_rss_mb(), 1),
        machine=dict(cpu=cpu_model(), threads=torch.get_num_threads()),
        torch=torch.__version__,
        commit=commit(),
        date=utc_now(),
        note=args.note,
        command=command,
    )


def arguments(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m models.train",
        description="Trains a PyTorch twin of a seed model in the Rust `train` protocol; prints validation and test HR/NDCG@10.",
    )
    ap.add_argument("--model", choices=sorted(QUERIES), default="fame")
    ap.add_argument("--data", default=str(ROOT / "data" / "Beauty.txt"), help="interaction file (default data/Beauty.txt)")
    ap.add_argument("--num-items", type=int, help="declared catalog size (default: the largest id)")
    ap.add_argument("--seed", type=int, default=42, help="initialisation, shuffling and dropout seed")
    ap.add_argument("--time-budget", type=float, default=180, help="stop training after this many seconds; 0 = no limit")
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--patience", type=int, default=10, help="epochs without a better validation NDCG@10")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--facets", type=int, default=4, help="FAME's heads H")
    ap.add_argument("--experts", type=int, default=4, help="FAME's query experts per head N")
    ap.add_argument("--mixing", choices=sorted(MIXINGS), default="logits")
    ap.add_argument("--max-steps-per-epoch", type=int, help="cap every epoch (smoke runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--checkpoint", help="save after every epoch (refuses to replace an existing file)")
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --checkpoint")
    ap.add_argument("--results", help="append a JSON-lines record of the run")
    ap.add_argument("--note", default="", help="free text stored in the record")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap.parse_args(argv)


def main(argv=None):
    args = arguments(argv)
    try:
        report = train(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.model} (pytorch): best epoch {report['best_epoch']} of {report['epochs_total']} ({report['stopped_by']})")
    for name, m in (("validation", report["best_valid"]), ("test      ", report["test"])):
        print(f"{name}  HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}")
    if args.results:
        command = shlex.join([sys.executable, "-m", "models.train", *(sys.argv[1:] if argv is None else argv)])
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(record(args, report, command)) + "\n")
        print(f"appended the run to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Renders the README's model results from the JSON-lines run records under
bench/results/models/: one row per model x data set x implementation x
budget, mean +- sample standard deviation over seeds, and (with speed
records) the Rust-vs-PyTorch training speed medians.

usage: python3 scripts/models-table.py [--since 2026-12-07T06:00:00Z] [--write-readme]
           [--results-dir bench/results/models]

A run record is a line with "valid" and "test" (models/src/record.rs or
python_ref/models/train.py); records without "impl" are Rust's (written
before the field existed). The budget column comes from how a run stopped
("5 epochs" for max_epochs, "1080 s" for a time budget, "early stop at N"
when validation NDCG@10 stopped improving), so budget-limited rows say so.
If one (model, data, impl, budget, seed) was run more than once, the latest
record counts. Speed records (speed.jsonl, from scripts/models-speed.py) are
summarised per model, implementation, thread count and CPU as medians.

--write-readme replaces what lies between the README's
`<!-- models-table:start -->` and `<!-- models-table:end -->` markers.
"""

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")
START, END = "<!-- models-table:start -->", "<!-- models-table:end -->"


def dataset_name(path):
    """`data/Beauty.txt` -> Beauty, `.../Toys_and_Games.txt` -> Toys."""
    return Path(path).stem.split("_")[0]


def model_name(record):
    """The model, with the record's `variant` (a non-default setting) if any."""
    variant = record.get("variant")
    return f"{record['model']} ({variant})" if variant else record["model"]


def budget(record):
    stopped = record.get("stopped_by", "")
    if m := re.match(r"max_epochs \((\d+)\)", stopped):
        return f"{m.group(1)} epochs"
    if m := re.match(r"time budget \((\d+(?:\.\d+)?) s\)", stopped):
        return f"{m.group(1)} s"
    if stopped.startswith("early stopping"):
        return f"early stop ({record['epochs']} epochs)"
    return stopped or "?"


def read(results_dir, since):
    runs, speed = [], []
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON: {e}")
            if since and record.get("date", "") < since:
                continue
            record.setdefault("impl", "rust")
            if "valid" in record and "test" in record:
                runs.append(record)
            elif "sequences_per_s" in record and "round" in record:
                speed.append(record)
    return runs, speed


def mean_std(values):
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def results_table(runs):
    latest = {}
    for r in sorted(runs, key=lambda r: r.get("date", "")):
        latest[(model_name(r), dataset_name(r["dataset"]), r["impl"], budget(r), r["seed"])] = r
    groups = defaultdict(list)
    for (model, data, impl, bud, _), r in latest.items():
        groups[(data, model, impl, bud)].append(r)
    header = (
        "| data | model | impl | budget | seeds | valid NDCG@10 | test HR@5 | test HR@10 | test HR@20 "
        "| test NDCG@5 | test NDCG@10 | test NDCG@20 | s/epoch (wall) | CPU-s/epoch | commits |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for (data, model, impl, bud), rs in sorted(groups.items()):
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        cells = [data, model, impl, bud, seeds, mean_std([r["valid"]["ndcg@10"] for r in rs])]
        cells += [mean_std([r["test"][m] for r in rs]) for m in METRICS]
        for key in ("wall_s_per_epoch", "cpu_s_per_epoch"):
            values = [r[key] for r in rs if r.get(key) is not None]
            cells.append(f"{statistics.median(values):.0f}" if values else "-")
        cells.append(" ".join(sorted({r.get("commit", "?")[:7] for r in rs})))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_table(speed):
    groups = defaultdict(list)
    for r in speed:
        groups[(r["model"], r["machine"]["cpu"], r["threads"], r["batch"])].append(r)
    lines = [
        "| model | CPU, threads, batch | runs | Rust seq/s | PyTorch seq/s | Rust / PyTorch "
        "| Rust CPU-s/step | PyTorch CPU-s/step | Rust peak MB | PyTorch peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, cpu, threads, batch), rs in sorted(groups.items()):
        by = {impl: [r for r in rs if r["impl"] == impl] for impl in ("rust", "pytorch")}
        if not all(by.values()):
            continue

        def med(impl, key):
            return statistics.median(r[key] for r in by[impl])

        ratio = med("rust", "sequences_per_s") / med("pytorch", "sequences_per_s")
        lines.append(
            f"| {model} | {cpu}, {threads}, {batch} | {len(by['rust'])} + {len(by['pytorch'])} "
            f"| {med('rust', 'sequences_per_s'):.0f} | {med('pytorch', 'sequences_per_s'):.0f} | {ratio:.2f}x "
            f"| {med('rust', 'cpu_s_per_step'):.2f} | {med('pytorch', 'cpu_s_per_step'):.2f} "
            f"| {med('rust', 'peak_rss_mb'):.0f} | {med('pytorch', 'peak_rss_mb'):.0f} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", default=str(ROOT / "bench" / "results" / "models"))
    ap.add_argument("--since", help="only records dated at or after this ISO time (e.g. 2026-12-07T06:00:00Z)")
    ap.add_argument("--write-readme", action="store_true", help="replace the README's marked block")
    args = ap.parse_args()
    runs, speed = read(args.results_dir, args.since)
    text = "Results (mean ± std over seeds; metrics at the best validation epoch):\n\n" + results_table(runs)
    if speed:
        text += "\n\nTraining speed (medians of alternating runs, `scripts/models-speed.py`):\n\n" + speed_table(speed)
    if not args.write_readme:
        print(text)
        return
    readme = ROOT / "README.md"
    content = readme.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{readme}: expected the markers {START} and {END}")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    print(f"wrote the table into {readme}")


if __name__ == "__main__":
    main()

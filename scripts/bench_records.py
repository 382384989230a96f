#!/usr/bin/env python3
"""Turns one criterion run (plus the PyTorch peers of the same run) into the
JSON-lines records DESIGN section 5 asks for under bench/results/.

Criterion groups are named `<op>_<pass>/<backend>/<dtype>` with ids such as
`H4_V1000000_D64_T51200`; `copy/<backend>` is the copy bandwidth the memory
floor is computed from (bytes read + written per second). A throughput in
bytes gives `gbps` and a memory floor; one in elements counts FLOPs (the
matrix ops, e.g. experts) and gives `tflops`, and a floor from the matrix
rate the joined peer measured (`matmul_tflops`) when there is one. An id
token without digits names the activation (`..._swiglu`). A peer file holds
JSON lines from python_ref/*_torch_peer.py; for each record the fastest peer
variant with the same op, pass, dtype and shape is joined in.

usage: bench_records.py CRITERION_DIR --device NAME --commit SHA --command CMD
                        [--peers FILE ...] > records.jsonl
"""

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

SHAPE_TOKEN = re.compile(r"^([A-Za-z]+)(\d+|all)$")
ACTIVATIONS = ("none", "relu", "gelu", "silu", "swiglu")


def criterion_results(root):
    """(group, id, median ns, throughput bytes or None, throughput FLOPs or
    None) for every benchmark."""
    for meta_path in sorted(Path(root).glob("**/new/benchmark.json")):
        meta = json.loads(meta_path.read_text())
        estimates = json.loads((meta_path.parent / "estimates.json").read_text())
        throughput = meta.get("throughput") or {}
        yield (meta["group_id"], meta.get("function_id") or meta.get("value_str"),
               estimates["median"]["point_estimate"], throughput.get("Bytes"), throughput.get("Elements"))


def parse_shape(text):
    shape = {}
    for token in text.split("_"):
        match = SHAPE_TOKEN.match(token)
        if match:
            key, value = match.groups()
            shape[key] = value if value == "all" else int(value)
        elif token in ACTIVATIONS:
            shape["activation"] = token
    return shape


def shape_key(record, keys):
    return tuple((k, record.get(k)) for k in keys)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("criterion_dir")
    parser.add_argument("--device", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--command", required=True)
    parser.add_argument("--peers", nargs="*", default=[])
    args = parser.parse_args()

    results = list(criterion_results(args.criterion_dir))
    copy_gbps = {}
    for group, _, median_ns, throughput, _ in results:
        if group.startswith("copy/") and throughput:
            copy_gbps[group.split("/")[1]] = throughput / median_ns
    peers = []
    for path in args.peers:
        peers += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

    date = datetime.date.today().isoformat()
    for group, bench_id, median_ns, throughput, flops in results:
        parts = group.split("/")
        if parts[0] == "copy" or len(parts) != 3:
            continue
        op, _, pass_name = parts[0].rpartition("_")
        backend, dtype = parts[1], parts[2]
        shape = parse_shape(bench_id)
        record = {"op": op, "pass": pass_name, "backend": backend, "dtype": dtype, **shape}
        record["median_ms"] = median_ns / 1e6
        if throughput:
            record["gbps"] = throughput / median_ns
            if backend in copy_gbps:
                record["floor_ms"] = throughput / copy_gbps[backend] / 1e6
        if flops:
            record["tflops"] = flops / median_ns / 1e3
        matching = [
            p for p in peers
            if p.get("op") == op and p.get("pass") == pass_name and p.get("dtype") == dtype
            and shape_key(p, shape) == shape_key(record, shape)
        ]
        if matching:
            best = min(matching, key=lambda p: p["median_ms"])
            record["peer"] = f"{best.get('backend', 'torch')}:{best.get('variant', '')}".rstrip(":")
            record["peer_median_ms"] = best["median_ms"]
            if flops and best.get("matmul_tflops"):
                record["floor_ms"] = flops / (best["matmul_tflops"] * 1e12) * 1e3
        record.update(device=args.device, commit=args.commit, date=date, command=args.command)
        print(json.dumps(record))
    if not results:
        print(f"bench_records: no criterion results under {args.criterion_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

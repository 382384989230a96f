#!/usr/bin/env python3
"""Turns one criterion run (plus the PyTorch peers of the same run) into the
JSON-lines records DESIGN section 5 asks for under bench/results/: one record
per (op, pass, backend, dtype, shape) with `op`, `pass`, `backend`, `dtype`,
the shape parameters, `median_ms`, `gbps` and/or `tflops`, `floor_ms`, `peer`,
`peer_median_ms`, `device`, `commit`, `date` and `command` (always present;
null where there is nothing to put: no copy bandwidth or matrix rate for the
floor, no peer of that benchmark in the run).

Criterion groups (benches/*.rs) are named `<op>[_<qualifier>]_<pass>/<backend>/<dtype>`:
- `<pass>` is `fwd`, `bwd`, or `fwdbwd`: a forward then a backward in one
  timed iteration. DESIGN knows only fwd and bwd, so `fwdbwd` becomes pass
  "bwd" with `includes_fwd: true`; every other bwd record has
  `includes_fwd: false` (a peer record without the field counts as false).
- `<qualifier>` says which benchmark of the op it is, as the fields in
  QUALIFIERS: the scoring groups `scoring_ce_*` (`function: cross_entropy`,
  `mixing: logits`), `scoring_mos_*` (cross_entropy, `mixing: probabilities`,
  the mixture of softmaxes) and `scoring_topk_fwd` (`function: topk`, logits
  mixing). A group this script does not know is reported and skipped (exit 1).
- FIXED adds what a bench holds fixed but a peer can vary: routing computes
  the load-balance and z losses (`losses: true`), the experts bench has no
  bias (`bias: false`).
The id is the shape, `_`-separated tokens `<key><int>` (`H4_V1000000_D64_T51200`,
`T51200_E4_k2_Din64_Dout64_swiglu`, `B256_H4_D32_V100000_n100`); the one
token without digits allowed is the activation (`..._swiglu`).

`copy/<backend>` is the copy bandwidth (bytes read + written per second) the
memory floor is computed from. A throughput in bytes gives `gbps` and that
memory floor; one in elements counts FLOPs (experts, scoring) and gives
`tflops`, and a floor from the matrix rate the joined peer measured in the
same run in that dtype (`matmul_tflops`); no other floor term (bytes of a
FLOP-counted op, exponentials) is computed here.

The peer files hold JSON lines from python_ref/*_torch_peer.py. A record is
joined with the fastest peer record of the same `op`, `pass`, `includes_fwd`,
`dtype`, shape keys and qualifier/fixed fields (a peer must carry each of
them with the same value), measured on the record's backend (PEER_BACKENDS:
torch peers run on CUDA, so a `cpu` record gets no torch peer), and not
marked `bound: true` (a ceiling or a part of the work, such as the experts
`dense` matmul or scoring's bare `matmul` and `topk`, not a whole
implementation). `peer` is `<backend>:<variant>` of that peer.

usage: bench_records.py CRITERION_DIR --device NAME --commit SHA --command CMD
                        [--cpu-device NAME] [--peers FILE ...] > records.jsonl
(--device names the GPU, the `cpu` records get --cpu-device, by default the
model name in /proc/cpuinfo)
"""

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path

SHAPE_TOKEN = re.compile(r"^([A-Za-z]+)(\d+|all)$")
ACTIVATIONS = ("none", "relu", "gelu", "silu", "swiglu")
# Group pass token -> (DESIGN pass, includes_fwd).
PASSES = {"fwd": ("fwd", None), "bwd": ("bwd", False), "fwdbwd": ("bwd", True)}
# Per op, the qualifier between op and pass -> fields naming the benchmark.
QUALIFIERS = {
    "scoring": {
        "ce": dict(function="cross_entropy", mixing="logits"),
        "mos": dict(function="cross_entropy", mixing="probabilities"),
        "topk": dict(function="topk", mixing="logits"),
    },
}
# What a bench holds fixed that its peer has a switch for.
FIXED = {
    "routing": dict(losses=True),
    "experts": dict(bias=False),
}
# Peer backend -> the moerec backend it is the peer of.
PEER_BACKENDS = {"torch": "cuda"}
# Fields compared with a default when one side lacks them.
DEFAULTS = {"includes_fwd": False}


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
        else:
            raise ValueError(f"id {text!r}: token {token!r} is neither <key><int> nor an activation")
    return shape


def parse_group(group):
    """The identity fields of a benchmark group `<op>[_<qualifier>]_<pass>/<backend>/<dtype>`:
    (fields, keys the peer must match) or ValueError."""
    parts = group.split("/")
    if len(parts) != 3:
        raise ValueError(f"group {group!r}: expected <op>_<pass>/<backend>/<dtype>")
    name, backend, dtype = parts
    tokens = name.split("_")
    if len(tokens) < 2 or tokens[-1] not in PASSES:
        raise ValueError(f"group {group!r}: no pass ({', '.join(PASSES)}) at the end of {name!r}")
    op, qualifier, pass_token = tokens[0], "_".join(tokens[1:-1]), tokens[-1]
    known = QUALIFIERS.get(op, {})
    if qualifier not in known and (qualifier or known):
        raise ValueError(f"group {group!r}: op {op!r} has qualifiers {sorted(known)}, not {qualifier!r}")
    pass_name, includes_fwd = PASSES[pass_token]
    fields = {"op": op, "pass": pass_name}
    if includes_fwd is not None:
        fields["includes_fwd"] = includes_fwd
    fields.update(backend=backend, dtype=dtype)
    extra = {**known.get(qualifier, {}), **FIXED.get(op, {})}
    fields.update(extra)
    match_keys = ["op", "pass", "includes_fwd", "dtype", *extra]
    return fields, match_keys


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def same(peer, record, key):
    return peer.get(key, DEFAULTS.get(key)) == record.get(key, DEFAULTS.get(key))


def best_peer(peers, record, match_keys):
    matching = [
        p for p in peers
        if PEER_BACKENDS.get(p.get("backend")) == record["backend"] and not p.get("bound", False)
        and all(same(p, record, key) for key in match_keys)
    ]
    return min(matching, key=lambda p: p["median_ms"]) if matching else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("criterion_dir")
    parser.add_argument("--device", required=True, help="the GPU's name, as the driver reports it")
    parser.add_argument("--cpu-device", help="the name the cpu records get (default: /proc/cpuinfo's model name)")
    parser.add_argument("--commit", required=True)
    parser.add_argument("--command", required=True)
    parser.add_argument("--peers", nargs="*", default=[])
    args = parser.parse_args()
    devices = {"cpu": args.cpu_device or cpu_name()}

    results = list(criterion_results(args.criterion_dir))
    copy_gbps = {}
    for group, _, median_ns, throughput, _ in results:
        if group.startswith("copy/") and throughput:
            copy_gbps[group.split("/")[1]] = throughput / median_ns
    peers = []
    for path in args.peers:
        peers += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

    date = datetime.date.today().isoformat()
    failed = not results
    without_peer = 0
    written = 0
    for group, bench_id, median_ns, throughput, flops in results:
        if group.startswith("copy/"):
            continue
        try:
            record, match_keys = parse_group(group)
            shape = parse_shape(bench_id)
        except ValueError as error:
            print(f"bench_records: skipped {group}/{bench_id}: {error}", file=sys.stderr)
            failed = True
            continue
        record.update(shape)
        match_keys += list(shape)
        backend = record["backend"]
        record["median_ms"] = median_ns / 1e6
        floor_ms = None
        if throughput:
            record["gbps"] = throughput / median_ns
            if backend in copy_gbps:
                floor_ms = throughput / copy_gbps[backend] / 1e6
        if flops:
            record["tflops"] = flops / median_ns / 1e3
        best = best_peer(peers, record, match_keys)
        if best and flops and best.get("matmul_tflops"):
            floor_ms = flops / (best["matmul_tflops"] * 1e12) * 1e3
        record["floor_ms"] = floor_ms
        record["peer"] = record["peer_median_ms"] = None
        if best:
            record["peer"] = f"{best.get('backend', 'torch')}:{best.get('variant', '')}".rstrip(":")
            record["peer_median_ms"] = best["median_ms"]
        elif backend in PEER_BACKENDS.values():
            without_peer += 1
        record.update(device=devices.get(backend, args.device), commit=args.commit, date=date,
                      command=args.command)
        print(json.dumps(record))
        written += 1
    if not results:
        print(f"bench_records: no criterion results under {args.criterion_dir}", file=sys.stderr)
    elif without_peer:
        print(f"bench_records: {without_peer} of {written} records on a peer's backend have no peer",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/bench_records.py joins every moerec benchmark with its PyTorch peer.

The criterion group names and id formats are read from benches/*.rs, so a
renamed group or a new id format fails here until the script knows it. The
peer lines are what python_ref/*_torch_peer.py emit for the same shapes: the
scoring and experts ones are built from those modules' own tables
(VARIANTS, VARIANT_FIELDS, identity, BOUNDS).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import experts_torch_peer
import scoring_torch_peer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_records.py"
BENCHES = ROOT / "benches"
OPS = ("embedding", "routing", "experts", "scoring")

# DESIGN 5: the fields of every record (peer ones checked separately).
REQUIRED = ("op", "pass", "backend", "dtype", "median_ms", "floor_ms", "peer", "peer_median_ms",
            "device", "commit", "date", "command")
# The shape keys each op's torch peer emits.
SHAPE_KEYS = {
    "embedding": {"H", "V", "D", "T"},
    "routing": {"T", "E", "k"},
    "experts": {"T", "E", "k", "Din", "Dout", "activation"},
    "scoring": {"B", "H", "D", "V"},
}
# One id per group, in the formats of the bench sources (checked below).
SAMPLE_IDS = {
    "embedding": "H4_V1000000_D64_T51200",
    "routing": "T65536_E64_k8",
    "experts": "T51200_E16_k2_Din128_Dout256_swiglu",
    "scoring": "B256_H4_D32_V100000",
    "scoring_topk_fwd": "B256_H4_D32_V100000_n100",
}
# The dtypes the CUDA benches and their peers share (the embedding backward is
# measured under f32 alone; the experts peer is bf16 only).
DTYPES = {"embedding_fwd": ("f32", "bf16"), "embedding_bwd": ("f32",)}
MATMUL_TFLOPS = 500.0
COPY_GBPS = 2000.0


def bench_source(op):
    return (BENCHES / f"{op}.rs").read_text()


def loop_values(source, var):
    """The first strings of the tuples of `for (var, ...) in [("a", ..), ...]`."""
    match = re.search(r"for \(\s*" + var + r"\s*,[^)]*\)\s+in\s+\[(.*?)\]\s*\{", source, re.S)
    assert match, f"cannot expand {{{var}}}: no `for ({var}, ..) in [..]` in the bench"
    return re.findall(r'\(\s*"(\w+)"', match.group(1))


def group_names(op):
    """The `<name>` of every `benchmark_group(format!("<name>/{backend}/{dtype}"))`."""
    source = bench_source(op)
    templates = re.findall(r'benchmark_group\(format!\("([^"/]+)/\{backend\}/\{dtype\}"\)\)', source)
    assert templates, f"benches/{op}.rs: no benchmark_group(format!(\"../{{backend}}/{{dtype}}\"))"
    names = []
    for template in templates:
        expanded = [template]
        for var in re.findall(r"\{(\w+)\}", template):
            expanded = [name.replace(f"{{{var}}}", value) for name in expanded
                        for value in loop_values(source, var)]
        names += expanded
    return names


def id_patterns(op):
    """Each `BenchmarkId::from_parameter(format!("..."))` of the bench as a regex."""
    templates = re.findall(r'BenchmarkId::from_parameter\(format!\("([^"]+)"\)\)', bench_source(op))
    assert templates, f"benches/{op}.rs: no BenchmarkId::from_parameter(format!(..))"
    return [re.compile(re.sub(r"\\\{\w+\\\}", r"\\d+", re.escape(t))) for t in templates]


def sample_id(group):
    return SAMPLE_IDS.get(group, SAMPLE_IDS[group.split("_")[0]])


def groups():
    return [(op, name) for op in OPS for name in group_names(op)]


def test_groups_found():
    names = [name for _, name in groups()]
    assert len(names) == len(set(names))
    # The ones this test was written against; more may come.
    for name in ("embedding_fwd", "embedding_bwd", "routing_fwd", "routing_bwd", "experts_fwd",
                 "experts_bwd", "scoring_ce_fwd", "scoring_ce_fwdbwd", "scoring_mos_fwd",
                 "scoring_mos_fwdbwd", "scoring_topk_fwd"):
        assert name in names


def test_peer_tables():
    assert set(scoring_torch_peer.VARIANT_FIELDS) == set(scoring_torch_peer.VARIANTS)
    assert set(experts_torch_peer.BOUNDS) <= set(experts_torch_peer.VARIANTS)
    assert scoring_torch_peer.identity("bwd", "logits_ce", True) == {
        "pass": "bwd", "includes_fwd": True, "variant": "logits_ce", "function": "cross_entropy",
        "mixing": "logits", "bound": False}


@pytest.mark.parametrize("op", OPS)
def test_sample_ids_follow_the_bench_formats(op):
    patterns = id_patterns(op)
    samples = {sample_id(name) for name in group_names(op)}
    for sample in samples:
        assert any(p.fullmatch(sample) for p in patterns), f"{sample} is no id format of benches/{op}.rs"
    for pattern in patterns:
        assert any(pattern.fullmatch(s) for s in samples), f"benches/{op}.rs id {pattern.pattern} untested"


def write_benchmark(root, group, bench_id, median_ns, throughput):
    directory = root / group.replace("/", "_") / bench_id / "new"
    directory.mkdir(parents=True)
    meta = {"group_id": group, "function_id": None, "value_str": bench_id, "throughput": throughput,
            "full_id": f"{group}/{bench_id}", "directory_name": f"{group.replace('/', '_')}/{bench_id}"}
    (directory / "benchmark.json").write_text(json.dumps(meta))
    estimate = {"confidence_interval": {"confidence_level": 0.95, "lower_bound": median_ns,
                                        "upper_bound": median_ns},
                "point_estimate": median_ns, "standard_error": 0.0}
    (directory / "estimates.json").write_text(json.dumps({"mean": estimate, "median": estimate}))


def shape_of(op, bench_id):
    """The peer's shape fields for a bench id (the peers' own key names)."""
    shape = {}
    for token in bench_id.split("_"):
        match = re.fullmatch(r"([A-Za-z]+)(\d+)", token)
        if match:
            shape[match.group(1)] = int(match.group(2))
        else:
            shape["activation"] = token
    shape.pop("n", None)  # the scoring peer's n comes with VARIANT_FIELDS
    assert set(shape) == SHAPE_KEYS[op]
    return shape


class Peers:
    """Fake peer lines, each with its own median so the joined one is known."""

    def __init__(self):
        self.lines = []
        self.next_ms = 1.0

    def add(self, **fields):
        self.next_ms += 1.0
        record = {"backend": "torch", "device": "Fake GPU", "median_ms": self.next_ms, **fields}
        self.lines.append(record)
        return record


def peer_lines(peers, op, dtype, shape):
    """What python_ref/<op>_torch_peer.py emits for one (dtype, shape)."""
    base = dict(op=op, dtype=dtype, **shape)
    if op == "embedding":
        peers.add(**base, **{"pass": "fwd", "variant": "gather"})
        peers.add(**base, **{"pass": "bwd", "variant": "index_add"})
        peers.add(**base, **{"pass": "bwd", "variant": "autograd"})
    elif op == "routing":
        for pass_ in ("fwd", "bwd"):
            peers.add(**base, **{"pass": pass_}, losses=True)
            # A --no-losses run of the same shape is a different benchmark.
            peers.add(**base, **{"pass": pass_}, losses=False, median_ms=0.001)
    elif op == "experts":
        for variant in experts_torch_peer.VARIANTS:
            for pass_ in ("fwd", "bwd"):
                fields = {"pass": pass_, "variant": variant, "bound": variant in experts_torch_peer.BOUNDS}
                record = peers.add(**base, **fields, bias=False, matmul_tflops=MATMUL_TFLOPS)
                if record["bound"]:
                    record["median_ms"] = 0.001  # the fastest, and still not the peer
                # A --bias run of the same shape is a different benchmark.
                peers.add(**base, **fields, bias=True, matmul_tflops=MATMUL_TFLOPS, median_ms=0.002)
    elif op == "scoring":
        for variant in scoring_torch_peer.VARIANTS:
            fields = scoring_torch_peer.VARIANT_FIELDS[variant]
            passes = [("fwd", None)]
            if fields["function"] == "cross_entropy":
                passes += [("bwd", True), ("bwd", False)]
            for pass_, includes_fwd in passes:
                record = peers.add(**base, **scoring_torch_peer.identity(pass_, variant, includes_fwd),
                                   matmul_tflops=MATMUL_TFLOPS)
                if record["bound"]:
                    record["median_ms"] = 0.001
    else:
        raise AssertionError(op)


def expected_peer(peers, record):
    """The fastest peer line of the record's benchmark, found independently of
    the script: every identity field of the record that a peer line has."""
    identity = {k: v for k, v in record.items()
                if k not in ("backend", "median_ms", "gbps", "tflops", "floor_ms", "peer",
                             "peer_median_ms", "device", "commit", "date", "command")}
    candidates = [p for p in peers.lines
                  if not p.get("bound") and all(p.get(k, False if k == "includes_fwd" else None) == v
                                                for k, v in identity.items())]
    return min(candidates, key=lambda p: p["median_ms"]) if candidates else None


def run_script(criterion, peers_path, *extra):
    command = [sys.executable, str(SCRIPT), str(criterion), "--device", "Fake GPU", "--cpu-device",
               "Fake CPU", "--commit", "abc1234", "--command", "cargo bench", *extra]
    if peers_path:
        command += ["--peers", str(peers_path)]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture
def run(tmp_path):
    """A fake criterion run of every group on cuda (and one on the cpu), its
    peer lines, and the script's records."""
    criterion = tmp_path / "criterion"
    peers = Peers()
    benchmarks = []
    write_benchmark(criterion, "copy/cuda", "bytes1073741824", 1e6, {"Bytes": int(COPY_GBPS * 1e6)})
    write_benchmark(criterion, "copy/cpu", "bytes268435456", 1e6, {"Bytes": int(20 * 1e6)})
    for op, name in groups():
        elements = "Throughput::Elements" in bench_source(op)
        for dtype in DTYPES.get(name, ("bf16",)):
            bench_id = sample_id(name)
            group = f"{name}/cuda/{dtype}"
            throughput = {"Elements": 10**12} if elements else {"Bytes": 10**9}
            write_benchmark(criterion, group, bench_id, 2e6, throughput)
            benchmarks.append((op, group, bench_id))
    done = set()
    for op, group, bench_id in benchmarks:
        dtype = group.split("/")[2]
        if (op, dtype, bench_id) not in done:
            done.add((op, dtype, bench_id))
            peer_lines(peers, op, dtype, shape_of(op, bench_id))
    # A cpu benchmark: torch peers of the same shape are no peers of it.
    write_benchmark(criterion, "routing_fwd/cpu/bf16", SAMPLE_IDS["routing"], 3e6, {"Bytes": 10**9})
    peers_path = tmp_path / "peers.jsonl"
    peers_path.write_text("".join(json.dumps(p) + "\n" for p in peers.lines))
    result = run_script(criterion, peers_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    return benchmarks, peers, records


def test_every_benchmark_gets_a_record(run):
    benchmarks, _, records = run
    cuda = [r for r in records if r["backend"] == "cuda"]
    assert len(cuda) == len(benchmarks)
    assert {r["op"] for r in cuda} == set(OPS)


def test_records_have_the_design_fields(run):
    _, _, records = run
    for record in records:
        for field in REQUIRED:
            assert field in record, (field, record)
        assert record["pass"] in ("fwd", "bwd")
        assert record["op"] in OPS
        assert ("gbps" in record) or ("tflops" in record)
        assert SHAPE_KEYS[record["op"]] <= set(record)
        assert record["commit"] == "abc1234" and record["command"] == "cargo bench"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", record["date"])
        if record["pass"] == "bwd":
            assert isinstance(record["includes_fwd"], bool)


def test_every_cuda_record_joins_its_fastest_peer(run):
    _, peers, records = run
    for record in records:
        if record["backend"] != "cuda":
            continue
        assert record["peer"] is not None, record
        assert record["floor_ms"] is not None, record
        assert record["device"] == "Fake GPU"
        best = expected_peer(peers, record)
        assert best is not None, record
        assert record["peer_median_ms"] == best["median_ms"], (record, best)
        assert record["peer"] == (f"torch:{best['variant']}" if "variant" in best else "torch")


def test_distinct_benchmarks_do_not_collide(run):
    _, _, records = run
    keys = [tuple(sorted((k, v) for k, v in r.items() if k not in ("median_ms", "gbps", "tflops", "floor_ms",
                                                                    "peer", "peer_median_ms")))
            for r in records]
    assert len(keys) == len(set(keys))
    # And no two records share a peer line: each joined its own benchmark.
    joined = [(r["peer"], r["peer_median_ms"]) for r in records if r["peer"]]
    assert len(joined) == len(set(joined))


def test_scoring_records(run):
    _, _, records = run
    scoring = {(r["pass"], r.get("includes_fwd"), r["function"], r.get("mixing")): r
               for r in records if r["op"] == "scoring"}
    assert set(scoring) == {
        ("fwd", None, "cross_entropy", "logits"), ("bwd", True, "cross_entropy", "logits"),
        ("fwd", None, "cross_entropy", "probabilities"), ("bwd", True, "cross_entropy", "probabilities"),
        ("fwd", None, "topk", "logits"),
    }
    assert scoring[("bwd", True, "cross_entropy", "logits")]["peer"] == "torch:logits_ce"
    assert scoring[("bwd", True, "cross_entropy", "probabilities")]["peer"] == "torch:probabilities_ce"
    topk = scoring[("fwd", None, "topk", "logits")]
    assert topk["peer"] == "torch:scores_topk" and topk["n"] == 100
    # The FLOP floor comes from the peer's matrix rate: 1e12 FLOPs at 500 TFLOP/s.
    assert topk["floor_ms"] == pytest.approx(1e12 / (MATMUL_TFLOPS * 1e12) * 1e3)


def test_fixed_fields_and_bounds(run):
    _, _, records = run
    for record in records:
        if record["op"] == "routing":
            assert record["losses"] is True
        if record["op"] == "experts":
            assert record["bias"] is False
            assert record["peer"] != "torch:dense"
    embedding = [r for r in records if r["op"] == "embedding" and r["backend"] == "cuda"]
    # Bytes over the copy bandwidth: 1e9 bytes at 2000 GB/s.
    assert all(r["floor_ms"] == pytest.approx(0.5) for r in embedding)


def test_cpu_records_get_no_torch_peer(run):
    _, _, records = run
    (cpu,) = [r for r in records if r["backend"] == "cpu"]
    assert cpu["peer"] is None and cpu["peer_median_ms"] is None
    assert cpu["device"] == "Fake CPU"


def test_unknown_group_is_reported(tmp_path):
    criterion = tmp_path / "criterion"
    write_benchmark(criterion, "scoring_fwd/cuda/bf16", SAMPLE_IDS["scoring"], 1e6, {"Elements": 10**9})
    write_benchmark(criterion, "scoring_xent_fwd/cuda/bf16", SAMPLE_IDS["scoring"], 1e6, {"Elements": 10**9})
    write_benchmark(criterion, "routing_fwd/cuda/bf16", "T4096_E8_k2_odd", 1e6, {"Bytes": 10**9})
    write_benchmark(criterion, "routing_fwd/cuda/bf16", "T4096_E8_k2", 1e6, {"Bytes": 10**9})
    result = run_script(criterion, None)
    assert result.returncode == 1
    assert result.stderr.count("skipped") == 3
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["op"] == "routing" and record["peer"] is None

"""Smoke test of the PyTorch twins' trainer (train.py), as models/tests/smoke.rs
for the Rust side: a few steps on a slice of Beauty (lr 0.01, so that twelve
steps show it), the loss falls, metrics are computed, the record has the Rust
record's fields, a resumed run ends where an uninterrupted one does, nothing overwrites a checkpoint unasked, and
bad data is refused naming file, line and value.

Without torch the tests skip, unless MOEREC_REQUIRE_TORCH=1 (CI).
"""

import json
import os
import re
from pathlib import Path

import pytest

if os.environ.get("MOEREC_REQUIRE_TORCH") == "1":
    import torch  # noqa: F401
else:
    pytest.importorskip("torch")

from models import train  # noqa: E402

BEAUTY = train.ROOT / "data" / "Beauty.txt"
RUST_RECORDS = train.ROOT / "bench" / "results" / "models" / "epochs5.jsonl"


@pytest.fixture(scope="module")
def beauty_slice(tmp_path_factory):
    path = tmp_path_factory.mktemp("slice") / "beauty300.txt"
    with open(BEAUTY) as f:
        path.write_text("".join(next(f) for _ in range(300)))
    return path


def run(data, tmp, *extra, model="sasrec", epochs=4):
    results = tmp / "runs.jsonl"
    argv = [
        "--model", model, "--data", str(data), "--seed", "9", "--dim", "32", "--batch-size", "64",
        "--max-steps-per-epoch", "3", "--max-epochs", str(epochs), "--patience", "100",
        "--lr", "0.01", "--time-budget", "0", "--quiet", "--results", str(results), *extra,
    ]  # fmt: skip
    assert train.main(argv) == 0
    return json.loads(results.read_text().splitlines()[-1])


@pytest.mark.parametrize("model", ["sasrec", "fame"])
def test_loss_falls_metrics_are_computed_and_the_record_has_rusts_fields(beauty_slice, tmp_path, model):
    record = run(beauty_slice, tmp_path, model=model)
    losses = record["epoch_losses"]
    assert losses[3] < losses[0] - 0.05, f"loss did not fall: {losses}"
    for metrics in (record["valid"], record["test"]):
        hr = [metrics[f"hr@{k}"] for k in train.CUTOFFS]
        ndcg = [metrics[f"ndcg@{k}"] for k in train.CUTOFFS]
        assert hr == sorted(hr) and hr[-1] <= 1, metrics
        assert all(0 <= n <= h for n, h in zip(ndcg, hr)), metrics
    assert record["impl"] == "pytorch" and record["epoch_steps"] == [3] * 4
    records = [json.loads(line) for line in RUST_RECORDS.read_text().splitlines()]
    rust_fields = set(next(r for r in reversed(records) if r.get("impl", "rust") == "rust"))
    assert rust_fields <= set(record), f"missing: {rust_fields - set(record)}"


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(beauty_slice, tmp_path):
    whole = run(beauty_slice, tmp_path)
    ckpt = tmp_path / "ckpt.pt"
    run(beauty_slice, tmp_path, "--checkpoint", str(ckpt), epochs=2)
    resumed = run(beauty_slice, tmp_path, "--checkpoint", str(ckpt), "--resume")
    for key in ("valid", "test", "best_epoch", "epochs"):
        assert resumed[key] == whole[key], key
    assert resumed["epoch_losses"] == whole["epoch_losses"][2:]


@pytest.mark.parametrize(
    "text, declared, message",
    [
        ("1 2 3 4\n2 5 x 6\n", None, "d.txt:2: malformed item id 'x'"),
        ("1 2 0 4\n", None, "d.txt:1: item id 0"),
        ("1 2 3 40\n", 30, "d.txt:1: item id 40 is beyond the declared catalog of 30"),
        ("1 2 3 4\n2 4\n", None, "d.txt:2: user 2 has 1 item(s)"),
        ("", None, "d.txt:0: empty file"),
    ],
)
def test_bad_data_names_file_line_and_value(text, declared, message):
    with pytest.raises(train.DataError, match=re.escape(message)):
        train.parse(text, "d.txt", declared)


def test_an_existing_checkpoint_is_not_overwritten(beauty_slice, tmp_path, capsys):
    ckpt = tmp_path / "exists.pt"
    ckpt.write_bytes(b"keep")
    argv = ["--data", str(beauty_slice), "--checkpoint", str(ckpt), "--max-epochs", "1", "--quiet"]
    assert train.main(argv) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert Path(ckpt).read_bytes() == b"keep"

"""One-step parity of the Rust models and their PyTorch twins.

The Rust example `parity_dump` writes each model's initial weights, one
training batch, and its loss and gradients (f32); here the twin runs the same
forward and backward from those weights in float64 (the f32 weights are exact
in it), and the loss and every parameter's gradient must agree within DESIGN's
f32 tolerance for reductions: `|a - r| <= 1e-4 * (|r| + max|r|)`, max over
the tensor. Perturbing one weight must break the agreement, so the comparison
can fail.

The evaluation check: the same weights (a small synthetic catalog written by
`parity_dump`) ranked by the Rust evaluation (models/src/eval.rs) and by the
twin's trainer (train.py) give the same top-20 lists, up to items whose
scores tie within the tolerance, and train.py's metrics equal Rust's.

Needs torch (scripts/torch-env.sh) and cargo. Without torch the tests skip,
unless MOEREC_REQUIRE_TORCH=1 (CI), which turns a missing torch into a failure.
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import golden

if os.environ.get("MOEREC_REQUIRE_TORCH") == "1":
    import torch
else:
    torch = pytest.importorskip("torch")

from models import fame, fuxi, sasrec, train, xsmoe  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-4
# Gradients that are zero in exact arithmetic (a key bias shifts every score of
# a softmax row equally) come out of the f32 side as rounding noise: ~1e-13 for
# the Amazon models, up to ~1.3e-11 for XSMoE (d = 128, the catalog-wide side
# network): the tolerance's scale is at least this magnitude.
GRAD_FLOOR = 1e-6
MODELS = {
    "sasrec": sasrec.loss,
    "fame_logits": fame.loss,
    "fame_probabilities": fame.loss,
    "fuxi_alpha": fuxi.loss,
    "fuxi_mme": fuxi.loss,
    "fuxi_mme_concatenated": fuxi.loss,
    "xsmoe": xsmoe.loss,
}
# The weight perturbed to show the comparison can fail.
PERTURBED = {name: "block0.uvqk" if name.startswith("fuxi") else "block0.query.weight" for name in MODELS}


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    subprocess.run(
        ["cargo", "run", "--release", "--quiet", "-p", "moerec-models", "--example", "parity_dump", "--", str(out)],
        cwd=ROOT,
        check=True,
    )
    return out


def load(path):
    tensors, _ = golden.read(path)
    names = [k[len("param.") :] for k in tensors if k.startswith("param.")]
    params = {n: torch.tensor(np.asarray(tensors[f"param.{n}"], dtype=np.float64), requires_grad=True) for n in names}
    grads = {n: np.asarray(tensors[f"grad.{n}"], dtype=np.float32) for n in names}
    c = [int(v) for v in np.asarray(tensors["config"]).ravel()]
    config = dict(dim=c[0], heads=c[1], blocks=c[2], max_len=c[3], facets=c[4], experts=c[5], mixing=c[6])
    if "config.fuxi" in tensors:
        tables, experts, k = (int(v) for v in np.asarray(tensors["config.fuxi"]).ravel())
        temperature, balance = (float(v) for v in np.asarray(tensors["config.fuxi_f"]).ravel())
        config.update(tables=tables, experts=experts, k=k, temperature=temperature, balance=balance)
    if "config.xsmoe" in tensors:
        consts = {
            k[len("const.") :]: torch.tensor(np.asarray(v, dtype=np.float64)) for k, v in tensors.items() if k.startswith("const.")
        }
        config.update(layers=int(np.asarray(tensors["config.xsmoe"]).ravel()[0]), consts=consts)
    batch = [torch.tensor(np.asarray(tensors[f"batch.{k}"]).astype(np.int64)) for k in ("inputs", "rows", "targets")]
    return params, grads, float(np.asarray(tensors["loss"]).ravel()[0]), batch, config


def mismatches(params, rust_grads, rust_loss, batch, config, model):
    """Names (and the loss) where the twin disagrees with Rust beyond RTOL."""
    for p in params.values():
        p.grad = None
    loss = MODELS[model](params, *batch, config)
    loss.backward()
    bad = []
    if abs(loss.item() - rust_loss) > RTOL * 2 * abs(loss.item()):
        bad.append(f"loss: torch {loss.item()} rust {rust_loss}")
    for name, p in params.items():
        want = p.grad.numpy() if p.grad is not None else np.zeros(rust_grads[name].shape)
        scale = max(float(np.abs(want).max()), GRAD_FLOOR)
        ratio = float((np.abs(rust_grads[name] - want) / (np.abs(want) + scale)).max())
        if ratio > RTOL:
            bad.append(f"{name}: max |diff| / (|r| + max|r|) = {ratio:.3e}")
    return bad


@pytest.mark.parametrize("model", sorted(MODELS))
def test_loss_and_every_gradient_match(dumps, model):
    params, grads, loss, batch, config = load(dumps / f"{model}.safetensors")
    assert not mismatches(params, grads, loss, batch, config, model)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_perturbed_weight_breaks_parity(dumps, model):
    params, grads, loss, batch, config = load(dumps / f"{model}.safetensors")
    with torch.no_grad():
        params[PERTURBED[model]][3, 5] += 0.05
    bad = mismatches(params, grads, loss, batch, config, model)
    assert bad, "parity still held after perturbing a weight: the comparison cannot fail"


def load_eval(path):
    tensors, _ = golden.read(path)
    params = {
        k[len("param.") :]: torch.tensor(np.asarray(v, dtype=np.float64)) for k, v in tensors.items() if k.startswith("param.")
    }
    c = [int(v) for v in np.asarray(tensors["config"]).ravel()]
    config = dict(
        num_items=params["items"].shape[0] - 1,
        dim=c[0],
        heads=c[1],
        blocks=c[2],
        max_len=c[3],
        dropout=0.0,
        facets=c[4],
        experts=c[5],
        mixing=c[6],
    )
    return params, config, tensors


def evaluation_mismatches(dumps, model, params, config, tensors):
    """Where train.py's evaluation disagrees with Rust's on the dumped weights."""
    kind = model.split("_")[0]
    num_items, sequences = train.load(dumps / "eval_data.txt")
    assert num_items == config["num_items"]
    _, valid, test = train.split(sequences)
    keys = [f"{m}@{k}" for m in ("hr", "ndcg") for k in train.CUTOFFS]
    bad = []
    for name, cases in (("valid", valid), ("test", test)):
        rust_top = np.asarray(tensors[f"eval.{name}.top"]).astype(np.int64).tolist()
        rust_metrics = np.asarray(tensors[f"eval.{name}.metrics"], dtype=np.float64)
        # Informative: a random model over 100 items hits often, so the lists and metrics are not all misses.
        assert rust_metrics[2] > 0.05, f"{name}: HR@20 {rust_metrics[2]}: the check would be vacuous"
        # train.py's metrics of Rust's lists are Rust's metrics.
        from_rust_lists = train.metrics(rust_top, cases)
        if not np.allclose([from_rust_lists[k] for k in keys], rust_metrics, rtol=0, atol=1e-12):
            bad.append(f"{name}: metrics of Rust's lists {from_rust_lists} vs Rust's {rust_metrics}")
        # The twin ranks alike: a list may differ only where the scores at a
        # position tie within tolerance.
        twin_top = train.rankings(kind, params, config, cases, batch_size=32)
        differing = 0
        for case, ours, theirs in zip(cases, twin_top, rust_top):
            if ours == theirs:
                continue
            differing += 1
            s, eligible = train.ranking_scores(kind, params, config, [case])
            s, eligible = s[0].numpy(), eligible[0].numpy()
            theirs_idx = np.asarray(theirs) - 1
            if len(set(theirs)) != len(theirs) or not eligible[theirs_idx].all():
                bad.append(f"{name}: Rust ranked an excluded item or one twice: {theirs}")
            gap = np.abs(s[theirs_idx] - s[np.asarray(ours) - 1]).max()
            if gap > RTOL * np.abs(s[eligible]).max():
                bad.append(f"{name}: Rust {theirs} vs twin {ours} (score gap {gap:.3e})")
        twin = train.metrics(twin_top, cases)
        diff = max(abs(twin[k] - r) for k, r in zip(keys, rust_metrics))
        if diff > differing / len(cases) + 1e-12:
            bad.append(f"{name}: metrics differ by {diff}, {differing} lists differ")
    return bad


@pytest.mark.parametrize("model", ["fame_logits", "fame_probabilities", "sasrec"])
def test_both_evaluations_rank_and_score_alike(dumps, model):
    params, config, tensors = load_eval(dumps / f"eval_{model}.safetensors")
    assert not evaluation_mismatches(dumps, model, params, config, tensors)


def test_the_evaluation_check_can_fail(dumps):
    params, config, tensors = load_eval(dumps / "eval_sasrec.safetensors")
    params["items"][7, :8] += 0.5  # not a constant shift: the final layer norm removes those
    assert evaluation_mismatches(dumps, "sasrec", params, config, tensors)

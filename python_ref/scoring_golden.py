"""Golden files for `scoring`: `python python_ref/scoring_golden.py`.

Writes `tests/golden/scoring/<case>.safetensors`, one per case below, each
seeded from its own name so adding a case never changes the others.

Inputs: `U` [B, H, D], `G` [B, H], `X` [H, V, D] or [V, D] (shared) in the case
dtype; `item_bias` [V] F32 and `excluded` [n] U32 (duplicates included) when
the case has them; `targets` [B] U32 (ignored rows hold the ignore id, which
may be >= V); `dloss` [B] F32; `dS` [B, V] F32; `history_offsets` [B+1] and
`history_ids` U32 when the case has a history.

Expected outputs (float64 reference on the dtype-rounded inputs, stored F32):
`S` [B, V] (`scoring.scores`: mixed logits with -inf at excluded items for
Logits mixing, mixture probabilities with 0 there for Probabilities mixing),
`loss` [B], `lse` ([B] or [B, H]), `ce_dU`, `ce_dG`, `ce_dX`, `ce_ditem_bias`
(cross-entropy backward from dloss), `scores_dU`, `scores_dG`, `scores_dX`,
`scores_ditem_bias` (scores backward from dS), `topk_ids` [B, n] U32 and
`topk_values` [B, n]. The ditem_bias gradients are stored even when the case
has no item bias (the gradient at a zero bias).

Metadata: `dtype`, `mixing` ("logits" | "probabilities"), `shared`
("true" | "false"), `scale` (exact in f32), `ignore` ("none" or the id), `n`.

Every case is checked to have no near-ties among each row's n + 1 best
eligible items (relative gap >= 1e-5 of the row's largest |score|), so a
float32 implementation must return the same top-k ids. The `ties` cases use
small-integer U, X and bias with duplicated item rows: duplicates tie exactly
in any arithmetic and pin the tie-break to the lower id; all other gaps are
checked as above.
"""

from dataclasses import dataclass

import numpy as np

import golden
import scoring

OUT_DIR = golden.out_dir("scoring")
MAX_TOTAL_BYTES = 2 * 1024 * 1024
U32_MAX = 2**32 - 1
MIN_RELATIVE_GAP = 1e-5


@dataclass(frozen=True)
class Case:
    name: str
    mixing: str
    shared: bool
    H: int
    D: int
    V: int
    B: int
    dtype: str = "f32"
    scale: float = 1.0
    bias: bool = False
    excluded: bool = False  # a few ids with duplicates (and the ignore id when < V)
    ignore: int | None = None
    ignored_rows: float = 0.3  # fraction of rows (at least one) whose target is the ignore id
    history: bool = False
    n: int = 10
    inputs: str = "normal"  # "normal" | "ties" | "large" (see `_inputs`)


CASES = [
    # H = 1: plain SASRec softmax cross-entropy.
    Case("h1_logits", "logits", False, 1, 16, 37, 8),
    Case("h1_probabilities_shared_bf16", "probabilities", True, 1, 5, 37, 3, dtype="bf16"),
    Case("h1_d1_b1_probabilities", "probabilities", False, 1, 1, 37, 1, n=3),
    # H = 2, both mixings, per-head and shared.
    Case("h2_logits_bias", "logits", False, 2, 16, 100, 8, bias=True),
    Case("h2_logits_shared_excluded", "logits", True, 2, 16, 100, 8, scale=0.5, excluded=True),
    Case("h2_probabilities_bias_excluded_history", "probabilities", False, 2, 16, 100, 8,
         bias=True, excluded=True, history=True),
    Case("h2_probabilities_shared", "probabilities", True, 2, 32, 100, 3),
    # H = 4, reduced-precision inputs.
    Case("h4_logits_bf16_pad0", "logits", False, 4, 5, 100, 8, dtype="bf16", bias=True,
         excluded=True, ignore=0, history=True),
    Case("h4_logits_shared_f16", "logits", True, 4, 32, 37, 3, dtype="f16", scale=1.25),
    Case("h4_probabilities_bf16_ignore_big", "probabilities", False, 4, 32, 37, 8,
         dtype="bf16", scale=2.0, ignore=42),
    Case("h4_probabilities_shared_f16_v300", "probabilities", True, 4, 5, 300, 8, dtype="f16",
         bias=True, excluded=True, history=True),
    # V = 300.
    Case("v300_logits_f16_ignore_max", "logits", False, 2, 5, 300, 3, dtype="f16",
         excluded=True, ignore=U32_MAX),
    Case("v300_probabilities_shared_bf16", "probabilities", True, 4, 16, 300, 8, dtype="bf16",
         scale=0.5, bias=True),
    # B = 0 and B = 1.
    Case("b0_logits", "logits", False, 2, 16, 37, 0, bias=True, excluded=True, history=True),
    Case("b0_probabilities_shared_bf16", "probabilities", True, 4, 5, 100, 0, dtype="bf16",
         ignore=0, excluded=True),
    Case("b1_logits_shared_f16", "logits", True, 4, 32, 300, 1, dtype="f16", history=True),
    # Exact ties (small integers, duplicated rows): tie-break to the lower id.
    Case("ties_logits", "logits", False, 2, 5, 37, 3, bias=True, excluded=True, n=12,
         inputs="ties"),
    Case("ties_probabilities_shared_bf16", "probabilities", True, 2, 16, 100, 3, dtype="bf16",
         history=True, n=7, inputs="ties"),
    # Large logits (scale 64): the log-sum-exps must be shifted.
    Case("large_logits", "logits", False, 4, 16, 100, 3, scale=64.0, excluded=True, n=5,
         inputs="large"),
    Case("large_probabilities_shared_bf16", "probabilities", True, 2, 32, 37, 8, dtype="bf16",
         scale=64.0, bias=True, n=1, inputs="large"),
    # Ignored targets: every row, and the padding item (excluded and ignored).
    Case("all_ignored_logits", "logits", False, 2, 5, 37, 3, excluded=True, ignore=37,
         ignored_rows=1.0),
    Case("pad0_probabilities_f16", "probabilities", False, 2, 16, 100, 8, dtype="f16",
         excluded=True, ignore=0, ignored_rows=0.5, bias=True),
]


def _inputs(case, rng):
    """float64 U, G, X and item bias (or None), before rounding."""
    b, h, d, v = case.B, case.H, case.D, case.V
    x_shape = (v, d) if case.shared else (h, v, d)
    if case.inputs == "ties":
        # Small-integer U, X and bias, items v and v + distinct sharing their
        # rows: those tie exactly in any arithmetic (same operands, same
        # operations). The gate logits stay generic so that items with
        # different per-head logits do not tie by accident.
        u = rng.integers(-2, 3, size=(b, h, d)).astype(np.float64)
        base = rng.integers(-2, 3, size=x_shape[:-2] + (_distinct(case), d)).astype(np.float64)
        x = np.take(base, _row_group(case), axis=-2)
        g = rng.normal(0.0, 1.0, size=(b, h))
        bias = rng.integers(-1, 2, size=_distinct(case)).astype(np.float64)[_row_group(case)]
        return u, g, x, bias if case.bias else None
    u = rng.normal(0.0, 1.0, size=(b, h, d))
    g = rng.normal(0.0, 1.0, size=(b, h))
    x = rng.normal(0.0, 1.0, size=x_shape) / np.sqrt(d) * 2.0
    bias = rng.normal(0.0, 1.0, size=v) if case.bias else None
    return u, g, x, bias


def _excluded(case, rng):
    if not case.excluded:
        return None
    ids = rng.choice(case.V, size=3, replace=False)
    if case.ignore is not None and case.ignore < case.V:
        ids[0] = case.ignore  # the padding item: excluded and ignored
    return ids[[0, 1, 0, 2, 1]].astype(np.uint32)


def _targets(case, rng, excluded):
    eligible = np.ones(case.V, dtype=bool)
    if excluded is not None:
        eligible[excluded] = False
    targets = rng.choice(np.flatnonzero(eligible), size=case.B)
    if case.ignore is not None and case.B:
        count = max(1, round(case.ignored_rows * case.B))
        targets[rng.choice(case.B, size=count, replace=False)] = case.ignore
    return targets.astype(np.uint32)


def _history(case, rng):
    if not case.history:
        return None, None
    lengths = rng.integers(0, 7, size=case.B)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint32)
    ids = rng.integers(0, case.V, size=int(offsets[-1])).astype(np.uint32)
    return offsets, ids


def _distinct(case):
    return max(1, case.V // 4) if case.inputs == "ties" else case.V


def _row_group(case):
    """[V]: in the ties cases, items v and v + V // 4 share rows and bias."""
    return np.arange(case.V) % _distinct(case)


def _tie_keys(case, u, x, bias):
    """[B, V] labels: equal labels in a row mean equal per-head logits
    s[b, :, v], computed exactly from small integers in any arithmetic, so
    their scores tie exactly everywhere. Outside the ties cases every item
    has its own label."""
    if case.inputs != "ties":
        return np.broadcast_to(np.arange(case.V), (case.B, case.V))
    spec = "bhd,vd->bvh" if case.shared else "bhd,hvd->bvh"
    s = case.scale * np.einsum(spec, u, x) + (0.0 if bias is None else bias[:, None])
    keys = np.zeros((case.B, case.V), dtype=np.int64)
    for row in range(case.B):
        _, keys[row] = np.unique(s[row], axis=0, return_inverse=True)
    return keys


def _check_separated(case, values, eligible_rows, keys):
    """Raise unless each row's n + 1 best eligible scores are either exact
    ties of equal per-head logits or clearly apart."""
    for row, eligible in enumerate(eligible_rows):
        cand = np.flatnonzero(eligible)
        val = values[row, cand]
        finite = np.abs(val[np.isfinite(val)])
        order = np.lexsort((cand, -val))[: case.n + 1]
        top, top_key = val[order], keys[row, cand[order]]
        gaps = top[:-1] - top[1:]
        floor = MIN_RELATIVE_GAP * finite.max()
        exact = (gaps == 0) & (top_key[:-1] == top_key[1:])
        if np.any((gaps < floor) & ~exact):
            raise SystemExit(f"{case.name}: row {row} has near-tied top-k scores {top}")


def build(case):
    """(tensors, metadata) of one case."""
    rng = golden.case_rng(case.name)
    u, g, x, bias = _inputs(case, rng)
    u, g, x = (golden.round_to(a, case.dtype) for a in (u, g, x))
    bias = None if bias is None else golden.round_to(bias, "f32")
    excluded = _excluded(case, rng)
    targets = _targets(case, rng, excluded)
    offsets, history = _history(case, rng)
    dloss = rng.normal(0.0, 1.0, size=case.B).astype(np.float32)
    d_scores = rng.normal(0.0, 1.0, size=(case.B, case.V)).astype(np.float32)

    args = dict(U=u, G=g, X=x)
    opts = dict(scale=case.scale, item_bias=bias, mixing=case.mixing, excluded=excluded)
    s = scoring.scores(**args, **opts)
    loss, lse = scoring.cross_entropy(targets, **args, **opts, ignore=case.ignore)
    ce = scoring.cross_entropy_backward(
        dloss.astype(np.float64), targets, **args, **opts, ignore=case.ignore
    )
    sc = scoring.scores_backward(d_scores.astype(np.float64), **args, **opts)
    ids, values = scoring.topk(
        case.n, **args, **opts, history_offsets=offsets, history_ids=history
    )
    rows = []
    for row in range(case.B):
        eligible = np.ones(case.V, dtype=bool)
        if excluded is not None:
            eligible[excluded] = False
        if history is not None:
            eligible[history[offsets[row] : offsets[row + 1]]] = False
        rows.append(eligible)
    _check_separated(case, s, rows, _tie_keys(case, u, x, bias))

    tensors = {
        "U": golden.stored(u, case.dtype),
        "G": golden.stored(g, case.dtype),
        "X": golden.stored(x, case.dtype),
        "targets": targets,
        "dloss": dloss,
        "dS": d_scores,
        "S": golden.f32(s),
        "loss": golden.f32(loss),
        "lse": golden.f32(lse),
        "topk_ids": ids,
        "topk_values": golden.f32(values),
    }
    for prefix, grads in (("ce_", ce), ("scores_", sc)):
        for name, grad in zip(("dU", "dG", "dX", "ditem_bias"), grads):
            tensors[prefix + name] = golden.f32(grad)
    if bias is not None:
        tensors["item_bias"] = golden.f32(bias)
    if excluded is not None:
        tensors["excluded"] = excluded
    if history is not None:
        tensors["history_offsets"] = offsets
        tensors["history_ids"] = history
    metadata = {
        "dtype": case.dtype,
        "mixing": case.mixing,
        "shared": golden.flag(case.shared),
        "scale": repr(float(case.scale)),
        "ignore": golden.optional(case.ignore),
        "n": str(case.n),
    }
    return tensors, metadata


def main():
    golden.write_cases(OUT_DIR, CASES, build, MAX_TOTAL_BYTES)


if __name__ == "__main__":
    main()

"""Golden files for `routing`: `python python_ref/routing_golden.py`.

Writes `tests/golden/routing/<case>.safetensors`, one per case below, each
seeded from its own name so adding a case never changes the others. Inputs:
`logits` [T, E] in the case dtype, optional `expert_mask` [E] U32,
`token_mask` [T] U32, `selection_bias` [E] F32 (omitted when absent),
`dweights` [T * G, k] F32. Expected outputs (from the float64 reference on the
dtype-rounded logits): `indices`, `weights`, `scores`, `counts`, `offsets`,
`token_of_row`, `row_of_slot`, `gate_mass`, `lb_loss` [1], `z_loss` [1],
`dlogits`. Metadata: `dtype`, `k` (resolved), `k_all`, `score`,
`renormalize`, `lb_coef`, `z_coef` (dyadic, so exact in f32), `groups`.
"""

from dataclasses import dataclass

import numpy as np

import golden
import routing

OUT_DIR = golden.out_dir("routing")
MAX_TOTAL_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    T: int
    E: int
    k: object  # int or "all"
    score: str = "softmax"
    renormalize: bool = False
    dtype: str = "f32"
    logits: str = "normal"  # generator, see `_logits`
    expert_mask: bool = False
    token_mask: bool = False
    bias: str = "none"  # "none" | "normal" | "ties" | "far"
    lb_coef: float = 0.0625
    z_coef: float = 0.0009765625
    groups: int = 1


CASES = [
    Case("softmax_k2", 16, 8, 2),
    Case("softmax_k2_renorm", 16, 8, 2, renormalize=True),
    Case("sigmoid_k2", 16, 8, 2, score="sigmoid"),
    Case("sigmoid_k2_renorm", 16, 8, 2, score="sigmoid", renormalize=True),
    Case("softmax_k1_bf16", 16, 8, 1, dtype="bf16"),
    Case("softmax_k1_renorm_f16", 16, 8, 1, renormalize=True, dtype="f16"),
    Case("e1_softmax_kall", 7, 1, "all"),
    Case("e1_sigmoid_k1_renorm_bf16", 5, 1, 1, score="sigmoid", renormalize=True, dtype="bf16"),
    Case("dense_softmax_e5_kall", 12, 5, "all", lb_coef=0.5, z_coef=0.125),
    Case("dense_softmax_e7_kall_renorm_bf16", 12, 7, "all", renormalize=True, dtype="bf16"),
    Case("dense_sigmoid_e5_kall_f16", 9, 5, "all", score="sigmoid", dtype="f16"),
    Case("e144_k8_softmax_bf16", 24, 144, 8, dtype="bf16"),
    Case("e160_k2_sigmoid_renorm", 20, 160, 2, score="sigmoid", renormalize=True),
    Case("expert_mask_k2", 16, 8, 2, logits="poison_inactive", expert_mask=True),
    Case("expert_mask_kall_sigmoid_renorm", 10, 7, "all", score="sigmoid",
         renormalize=True, expert_mask=True),
    Case("token_mask_k2_renorm_bf16", 16, 8, 2, renormalize=True, dtype="bf16",
         logits="poison_invalid", token_mask=True),
    Case("both_masks_bias_k3_sigmoid_f16", 16, 6, 3, score="sigmoid", dtype="f16",
         expert_mask=True, token_mask=True, bias="normal"),
    Case("bias_k2_softmax", 32, 8, 2, bias="normal", lb_coef=1.0),
    Case("bias_k4_sigmoid_renorm_bf16", 16, 16, 4, score="sigmoid", renormalize=True,
         dtype="bf16", bias="normal"),
    Case("ties_k3", 8, 8, 3, logits="ties"),
    Case("ties_bias_k2", 8, 6, 2, logits="key_ties", bias="ties"),
    Case("ties_bf16_k2_renorm", 12, 32, 2, renormalize=True, dtype="bf16", logits="coarse"),
    Case("large_softmax_k2", 16, 8, 2, logits="large"),
    Case("large_sigmoid_k2_renorm_bf16", 16, 8, 2, score="sigmoid", renormalize=True,
         dtype="bf16", logits="large"),
    Case("neginf_softmax_k3", 12, 6, 3, logits="neginf", lb_coef=0.25),
    Case("neginf_sigmoid_kall_renorm_f16", 12, 6, "all", score="sigmoid", renormalize=True,
         dtype="f16", logits="neginf"),
    # Issue 14: sigmoids and selected softmax scores that underflow f32.
    Case("underflow_sigmoid_k1", 8, 4, 1, score="sigmoid", logits="underflow", lb_coef=1.0),
    Case("underflow_sigmoid_k2_renorm", 8, 4, 2, score="sigmoid", renormalize=True,
         logits="underflow", lb_coef=1.0),
    Case("underflow_bias_softmax_k2_renorm", 8, 5, 2, renormalize=True, logits="underflow",
         bias="far"),
    # Grouped routing: FAME's per-head routers (k = all), and every option per group.
    Case("grouped_fame_h4_n4_kall", 12, 16, "all", groups=4, lb_coef=0.5, z_coef=0.125),
    Case("grouped_h3_k2_sigmoid_renorm_masks_bias_bf16", 16, 18, 2, score="sigmoid",
         renormalize=True, dtype="bf16", expert_mask=True, token_mask=True, bias="normal", groups=3),
    Case("grouped_h2_kall_masked_renorm_f16", 10, 10, "all", renormalize=True, dtype="f16",
         expert_mask=True, groups=2),
    Case("grouped_h5_n1_k1", 6, 5, 1, groups=5, lb_coef=1.0),
    Case("grouped_h2_n40_k3_neginf", 9, 80, 3, logits="neginf", groups=2),
    Case("grouped_t0_h2", 0, 8, 2, groups=2),
    Case("t0_softmax_k2", 0, 8, 2),
    Case("t1_sigmoid_k8", 1, 8, 8, score="sigmoid"),
    Case("no_valid_token_k2", 4, 8, 2, token_mask=True, logits="all_invalid"),
    Case("t64_e64_k8_softmax_bf16", 64, 64, 8, dtype="bf16"),
    Case("t64_e64_k8_sigmoid_renorm", 64, 64, 8, score="sigmoid", renormalize=True,
         expert_mask=True, token_mask=True, bias="normal"),
]


def _logits(case, rng):
    """float64 logits [T, E] for the case's generator."""
    T, E = case.T, case.E
    z = rng.normal(0.0, 2.0, size=(T, E))
    kind = case.logits
    if kind == "ties":
        # Small integers and both zeros: many exact ties, -0 must equal +0.
        z = rng.integers(-2, 3, size=(T, E)).astype(np.float64)
        z[z == 0] = rng.choice([0.0, -0.0], size=int((z == 0).sum()))
        z[0] = 1.0  # one row entirely tied
    elif kind == "key_ties":
        pass  # the ties are made with the bias, see `_bias`
    elif kind == "coarse":
        z = np.round(rng.normal(0.0, 1.0, size=(T, E)) * 4) / 4
    elif kind == "large":
        # |z| >= 1000 keeps sigmoid at exactly 0 or 1 in f32 and float64 alike;
        # the softmax of all but the row max underflows, so most scores are 0
        # while the logits (and the selection) still differ.
        z = np.sign(z) * (1000.0 + np.abs(z) * 5e3)
        # Rows 0-1: near-equal large logits whose scores differ in the last bits.
        z[0, :] = 1.0e4 + np.arange(E) * 2.0**-10
        z[1, :] = -1.0e4 - np.arange(E)[::-1] * 2.0**-10
    elif kind == "underflow":
        # Below about -87 the sigmoids are subnormal or 0 in f32; every other
        # row keeps one moderate logit.
        z = rng.uniform(-120.0, -85.0, size=(T, E))
        z[1::2, 0] = rng.normal(0.0, 2.0, size=len(z[1::2]))
    elif kind == "neginf":
        finite = z[np.arange(T), rng.integers(0, E, size=T)]
        z[rng.random((T, E)) < 0.4] = -np.inf
        # Every row keeps at least one finite logit (else NonFinite).
        z[np.arange(T), rng.integers(0, E, size=T)] = finite
        if T:
            z[0, :] = -np.inf  # a row with a single finite logit per group
            n = E // case.groups
            z[0, n // 2 :: n] = 0.75
    return z


def _expert_mask(case, rng):
    """With groups, the same number off in every group (so k = "all" works)."""
    n = case.E // case.groups
    m = np.ones((case.groups, n), dtype=np.uint32)
    if case.expert_mask:
        for row in m:
            row[rng.choice(n, size=max(1, n // 3), replace=False)] = 0
    return m.ravel()


def _token_mask(case, rng):
    m = np.ones(case.T, dtype=np.uint32)
    if case.token_mask:
        m[rng.random(case.T) < 0.3] = 0
        if case.logits == "all_invalid":
            m[:] = 0
    return m


def _bias(case, rng, z):
    if case.bias == "normal":
        return rng.normal(0.0, 1.0, size=case.E).astype(np.float32)
    if case.bias == "far":
        # Large enough to select experts whose scores underflow.
        return rng.normal(0.0, 60.0, size=case.E).astype(np.float32)
    if case.bias == "ties":
        # z + bias equal (exactly, in f32) across several experts per row.
        bias = (rng.integers(-4, 5, size=case.E) / 4).astype(np.float32)
        key = rng.integers(-2, 3, size=z.shape) / 2
        z[...] = key - bias.astype(np.float64)
        return bias
    return None


def build(case):
    """(tensors, metadata) of one case."""
    rng = golden.case_rng(case.name)
    z = _logits(case, rng)
    bias = _bias(case, rng, z)
    emask = _expert_mask(case, rng)
    tmask = _token_mask(case, rng)
    if case.logits == "poison_inactive":
        z[:, emask == 0] = np.nan
        z[0, emask == 0] = np.inf
    if case.logits in ("poison_invalid", "all_invalid"):
        z[tmask == 0] = np.nan
    zr = golden.round_to(z, case.dtype)
    opts = dict(
        k=case.k,
        score=case.score,
        renormalize=case.renormalize,
        expert_mask=emask if case.expert_mask else None,
        token_mask=tmask if case.token_mask else None,
        selection_bias=bias,
        groups=case.groups,
    )
    out = routing.forward(zr, **opts)
    k = out["k"]
    dweights = rng.normal(0.0, 1.0, size=(case.T * case.groups, k)).astype(np.float32)
    dz = routing.backward(zr, dweights, case.lb_coef, case.z_coef, **opts)

    tensors = {
        "logits": golden.stored(z, case.dtype),
        "dweights": dweights,
        "indices": out["indices"],
        "weights": golden.f32(out["weights"]),
        "scores": golden.f32(out["scores"]),
        "counts": out["counts"],
        "offsets": out["offsets"],
        "token_of_row": out["token_of_row"],
        "row_of_slot": out["row_of_slot"],
        "gate_mass": golden.f32(out["gate_mass"]),
        "lb_loss": golden.f32([out["lb_loss"]]),
        "z_loss": golden.f32([out["z_loss"]]),
        "dlogits": golden.f32(dz),
    }
    if case.expert_mask:
        tensors["expert_mask"] = emask
    if case.token_mask:
        tensors["token_mask"] = tmask
    if bias is not None:
        tensors["selection_bias"] = bias
    metadata = {
        "dtype": case.dtype,
        "k": str(k),
        "k_all": golden.flag(case.k == "all"),
        "score": case.score,
        "renormalize": golden.flag(case.renormalize),
        "lb_coef": repr(float(case.lb_coef)),
        "z_coef": repr(float(case.z_coef)),
        "groups": str(case.groups),
    }
    return tensors, metadata


def main():
    golden.write_cases(OUT_DIR, CASES, build, MAX_TOTAL_BYTES)


if __name__ == "__main__":
    main()

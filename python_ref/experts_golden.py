"""Golden files for `experts`: `python python_ref/experts_golden.py`.

Writes `tests/golden/experts/<case>.safetensors`, one per case below, each
seeded from its own name so adding a case never changes the others. Plans come
from `routing.forward` on random logits (shaped per case to make empty,
one-row and all-rows experts, or invalid tokens), so they are real plans.

Inputs: `x` [T, Din] (variant "tokens") or `x_rows` [R, Din] (variant
"rows"), `W` [E, Din, Dout'] (Dout' = 2*Dout for swiglu), `bias` [E, Dout']
(omitted when absent), `res` [T, Dout] (omitted when absent), all in the case
dtype; `rho` [T] F32 (omitted when absent); the plan `counts` [E], `offsets`
[E+1], `token_of_row` [R], `row_of_slot` [T, k] U32; `weights` [T, k] F32
(slots of invalid tokens hold 0.5: an empty slot must ignore its weight);
`dy` [R, Dout] F32 (the layer's upstream gradient) and `dout` [T, Dout] F32
(combine's).

Expected, from the float64 reference on the dtype-rounded inputs:
- forward, in the case dtype: `h` [R, Dout'] (what Saved holds), `y` [R, Dout]
  (act of the unrounded h, then rounded), `out` [T, Dout] (combine of the
  stored y);
- F32: `util` [E]; `dh`, `dx` [T, Din] or `dx_rows` [R, Din], `dW`, and `db`
  (only with a bias); combine's `dy_combine` [R, Dout], `dweights` [T, k],
  `dres` [T, Dout] (with res), `drho` [T] (with rho).
The layer backward takes act'(h) at the *stored* h (rounded to the dtype), as
an implementation whose Saved holds h in the input type must; combine's
inputs are the stored y. For relu, dy is 0 wherever |h| < 1e-4, so relu'(0)
and the sign of an h that float32 and float64 round differently never matter.

Metadata: `dtype`, `activation`, `variant`, `k` (resolved), `E`, `Din`, `Dout`.
"""

from dataclasses import dataclass

import numpy as np

import experts
import golden
import routing

OUT_DIR = golden.out_dir("experts")
MAX_TOTAL_BYTES = 3 * 1024 * 1024
RELU_DEAD_ZONE = 1e-4


@dataclass(frozen=True)
class Case:
    activation: str
    dtype: str
    T: int
    E: int
    k: object  # int or "all"
    Din: int
    Dout: int
    variant: str = "tokens"
    bias: bool = False
    res: bool = False
    rho: bool = False
    # "routed": plain top-k of normal logits; "empty": experts 0, E/2, E-1
    # masked out (no rows); "one_row": expert 0 gets exactly one row;
    # "one_expert": every row to expert E/2 (k = 1); "masked": ~30% invalid
    # tokens (empty slots).
    plan: str = "routed"

    @property
    def name(self):
        parts = [] if self.plan == "routed" else [self.plan]
        parts += [self.activation, self.dtype]
        if self.variant == "rows":
            parts.append("rows")
        parts += [f"t{self.T}", f"e{self.E}", f"k{self.k}", f"d{self.Din}x{self.Dout}"]
        parts += [flag for flag in ("bias", "res", "rho") if getattr(self, flag)]
        return "_".join(parts)


C = Case
CASES = [
    # Every activation x dtype, odd and even widths, both variants.
    C("none", "f32", 13, 4, 2, 7, 5, bias=True, res=True),
    C("none", "bf16", 40, 8, 2, 16, 8),
    C("none", "f16", 13, 4, 1, 8, 8, variant="rows", bias=True, res=True, rho=True),
    C("relu", "f32", 40, 8, 2, 16, 16, bias=True, res=True, rho=True),
    C("relu", "bf16", 13, 4, "all", 7, 5, bias=True, res=True),
    C("relu", "f16", 40, 8, 1, 12, 8),
    C("gelu", "f32", 13, 4, 1, 7, 5, bias=True, res=True, rho=True),
    C("gelu", "bf16", 40, 8, 2, 16, 16, variant="rows", bias=True),
    C("gelu", "f16", 13, 8, "all", 8, 4, res=True),
    C("silu", "f32", 13, 4, 2, 7, 5, variant="rows"),
    C("silu", "bf16", 40, 4, 2, 16, 8, bias=True, res=True, rho=True),
    C("silu", "f16", 13, 8, 2, 7, 5, bias=True),
    C("swiglu", "f32", 13, 4, 2, 7, 5, bias=True),
    C("swiglu", "bf16", 40, 8, 2, 16, 8, res=True, rho=True),
    C("swiglu", "f16", 40, 4, 1, 8, 12, bias=True),
    C("swiglu", "bf16", 13, 4, "all", 10, 5, variant="rows", bias=True),
    # Unbalanced plans.
    C("gelu", "f32", 13, 8, 2, 7, 5, bias=True, res=True, plan="empty"),
    C("swiglu", "bf16", 40, 8, 1, 16, 8, bias=True, plan="empty"),
    C("silu", "f32", 13, 4, 2, 7, 5, bias=True, plan="one_row"),
    C("none", "bf16", 40, 8, 1, 8, 5, variant="rows", bias=True, plan="one_row"),
    C("relu", "f32", 13, 4, 1, 7, 5, bias=True, res=True, rho=True, plan="one_expert"),
    C("swiglu", "bf16", 40, 8, 1, 16, 8, bias=True, plan="one_expert"),
    C("gelu", "f32", 13, 1, 1, 7, 5, bias=True, res=True),
    C("swiglu", "bf16", 40, 1, "all", 8, 5, res=True, rho=True),
    C("gelu", "f32", 13, 4, 2, 7, 5, bias=True, res=True, rho=True, plan="masked"),
    C("swiglu", "bf16", 40, 8, 2, 16, 8, bias=True, res=True, plan="masked"),
    # Tiny and empty batches.
    C("none", "f32", 1, 8, 2, 7, 5, bias=True),
    C("gelu", "bf16", 1, 4, "all", 7, 5, res=True, rho=True),
    C("silu", "f32", 0, 4, 2, 7, 5, bias=True, res=True, rho=True),
    # Widths past one 64/128-wide tile, odd remainders.
    C("swiglu", "bf16", 96, 4, 2, 136, 72, bias=True),
    C("none", "f32", 128, 4, 1, 130, 66, bias=True, res=True, rho=True),
]


def _route(case, rng):
    """routing.forward output (plan and weights) for the case's plan kind."""
    T, E = case.T, case.E
    z = rng.normal(0.0, 2.0, size=(T, E))
    expert_mask = token_mask = None
    if case.plan == "empty":
        expert_mask = np.ones(E, dtype=np.uint32)
        expert_mask[[0, E // 2, E - 1]] = 0
    elif case.plan == "one_row":
        z[:, 0] = -np.inf
        z[T // 2, 0] = 8.0
    elif case.plan == "one_expert":
        z[:, E // 2] = 20.0
    elif case.plan == "masked":
        token_mask = (rng.random(T) >= 0.3).astype(np.uint32)
        token_mask[[0, -1]] = [0, 1]
    out = routing.forward(
        golden.round_to(z, "f32"), case.k, renormalize=case.k not in (1, "all"),
        expert_mask=expert_mask, token_mask=token_mask,
    )
    counts = out["counts"]
    expect = {
        "empty": lambda: np.all(counts[[0, E // 2, E - 1]] == 0),
        "one_row": lambda: counts[0] == 1,
        "one_expert": lambda: counts[E // 2] == T,
        "masked": lambda: np.any(out["row_of_slot"] == experts.U32_MAX),
    }.get(case.plan, lambda: True)
    if not expect():
        raise AssertionError(f"{case.name}: the plan is not of kind {case.plan!r}: counts {counts}")
    return out


def build(case):
    """(tensors, metadata) of one case."""
    rng = golden.case_rng(case.name)
    plan = _route(case, rng)
    k = plan["k"]
    T, E, Din, Dout = case.T, case.E, case.Din, case.Dout
    R = int(plan["offsets"][-1])
    width = 2 * Dout if case.activation == "swiglu" else Dout
    rnd = lambda a: golden.round_to(a, case.dtype)  # noqa: E731

    x = rnd(rng.normal(size=(R if case.variant == "rows" else T, Din)))
    W = rnd(rng.normal(0.0, Din**-0.5, size=(E, Din, width)))
    bias = rnd(rng.normal(0.0, 0.5, size=(E, width))) if case.bias else None
    res = rnd(rng.normal(size=(T, Dout))) if case.res else None
    rho = rng.uniform(0.5, 1.5, size=T).astype(np.float32) if case.rho else None
    dy = rng.normal(size=(R, Dout)).astype(np.float32)
    dout = rng.normal(size=(T, Dout)).astype(np.float32)
    ros = plan["row_of_slot"]
    weights = np.where(ros == experts.U32_MAX, 0.5, plan["weights"]).astype(np.float32)

    y, h = experts.layer_forward(x, plan, W, bias, case.activation, case.variant)
    h_saved = rnd(h)
    y_stored = rnd(y)
    if case.activation == "relu":
        dy[np.abs(h_saved) < RELU_DEAD_ZONE] = 0.0
    dh, dx, dW, db = experts.layer_backward(
        dy, h_saved, x, plan, W, ros, case.activation, case.variant
    )
    rho64 = None if rho is None else rho.astype(np.float64)
    w64 = weights.astype(np.float64)
    out, util = experts.combine(y_stored, w64, ros, plan, res, rho64)
    dy_c, dweights, dres, drho = experts.combine_backward(dout, y_stored, w64, ros, res, rho64)

    st = lambda a: golden.stored(a, case.dtype)  # noqa: E731
    x_name, dx_name = ("x_rows", "dx_rows") if case.variant == "rows" else ("x", "dx")
    tensors = {
        x_name: st(x),
        "W": st(W),
        "counts": plan["counts"],
        "offsets": plan["offsets"],
        "token_of_row": plan["token_of_row"],
        "row_of_slot": ros,
        "weights": weights,
        "dy": dy,
        "dout": dout,
        "h": st(h_saved),
        "y": st(y_stored),
        "out": st(out),
        "util": golden.f32(util),
        "dh": golden.f32(dh),
        dx_name: golden.f32(dx),
        "dW": golden.f32(dW),
        "dy_combine": golden.f32(dy_c),
        "dweights": golden.f32(dweights),
    }
    if bias is not None:
        tensors["bias"] = st(bias)
        tensors["db"] = golden.f32(db)
    if res is not None:
        tensors["res"] = st(res)
        tensors["dres"] = golden.f32(dres)
    if rho is not None:
        tensors["rho"] = rho
        tensors["drho"] = golden.f32(drho)
    metadata = {
        "dtype": case.dtype,
        "activation": case.activation,
        "variant": case.variant,
        "k": str(k),
        "E": str(E),
        "Din": str(Din),
        "Dout": str(Dout),
    }
    return tensors, metadata


def main():
    golden.write_cases(OUT_DIR, CASES, build, MAX_TOTAL_BYTES)


if __name__ == "__main__":
    main()

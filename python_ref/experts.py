"""Float64 reference of the grouped expert matmul (`experts`, DESIGN.md 4.3).

`layer_forward` / `layer_backward` are one expert layer over a dispatch plan
(counts [E], offsets [E+1], token_of_row [R]; DESIGN.md 4.2), in the `tokens`
variant (x [T, Din], gathered through token_of_row) or the `rows` variant
(x_rows [R, Din], already in plan order). `combine` / `combine_backward` mix
the expert rows back into tokens through row_of_slot [T, k] and the routing
weights, with XSMoE's optional backbone candidate `rho * res`, and measure
per-expert utilisation. Callers round inputs to the element type first
(`golden.round_to`); everything here is float64.

Choices where DESIGN.md leaves room (the Rust side follows the same ones):
- `layer_backward` evaluates act'(h) at the h it is given, never at a
  recomputed one: the op's Saved holds h in the input type, so the golden
  files pass h rounded to that type, as a bf16 implementation sees it.
- Relu'(0) = 0. Gelu is exact (erf) and its derivative is Phi(h) + h phi(h).
- SwiGlu splits h into halves: gate a = h[:, :Dout], up g = h[:, Dout:],
  y = silu(a) * g; dh = [dy * g * silu'(a), dy * silu(a)].
- `db` is the sum of dh whether or not the forward had a bias (the golden
  files store it only when it had one).
- A slot of row_of_slot holding U32_MAX is empty: it reads no row, its weight
  is ignored (whatever it holds) and its dweight is 0; a token with no rows gets
  dx = 0 and out = rho * res (or 0). Every row must be named by exactly one
  slot, of the token token_of_row names; else ValueError.
- `rho` without `res` is a ValueError (it would scale nothing). With `res` and
  no `rho`, rho = 1 and there is no drho.
- util[e] sums |w| * ||y[r]||_2 over e's rows in plan order (row r's slot
  gives w); an expert with no rows gets 0. Rows of a token whose slot is
  empty do not exist, so nothing else contributes.
- Plans are checked for consistency, not for order: the math does not need
  ascending tokens within an expert, so hand-made plans need not have them.
  Errors: ValueError for bad shapes and inconsistent plans (InvalidArgument /
  ShapeMismatch in Rust), IndexError naming the lowest position for a
  token_of_row or row_of_slot entry out of range (IndexOutOfRange).
"""

import math
from collections.abc import Mapping

import numpy as np

from routing import _sigmoid  # the overflow-free logistic function, shared

__all__ = [
    "U32_MAX",
    "ACTIVATIONS",
    "VARIANTS",
    "check_plan",
    "check_row_of_slot",
    "activate",
    "activate_backward",
    "layer_forward",
    "layer_backward",
    "combine",
    "combine_backward",
]

U32_MAX = 0xFFFFFFFF
ACTIVATIONS = ("none", "relu", "gelu", "silu", "swiglu")
VARIANTS = ("tokens", "rows")

_erf = np.vectorize(math.erf, otypes=[np.float64])


# ---------------------------------------------------------------- argument checks


def _ints(a, name):
    """A 1-D or 2-D integer array as int64 (empty arrays of any dtype pass)."""
    arr = np.asarray(a)
    if arr.size and arr.dtype.kind not in "ui":
        raise ValueError(f"{name}: expected integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _floats(a, ndim, name):
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {arr.shape}")
    return arr


def _shape(arr, shape, name):
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")


def _plan_parts(plan):
    """(counts, offsets, token_of_row) from a mapping or a sequence."""
    if isinstance(plan, Mapping):
        try:
            return tuple(plan[k] for k in ("counts", "offsets", "token_of_row"))
        except KeyError as err:
            raise ValueError(f"plan: missing {err.args[0]!r}") from None
    try:
        counts, offsets, token_of_row = plan[:3]
    except (TypeError, ValueError):
        raise ValueError("plan: expected (counts, offsets, token_of_row) or a mapping") from None
    return counts, offsets, token_of_row


def check_plan(plan, num_experts, num_tokens=None):
    """Validate a dispatch plan; return (counts, offsets, token_of_row) as int64.

    `plan` is a mapping with keys counts, offsets, token_of_row (e.g. the dict
    `routing.forward` returns) or a sequence (counts, offsets, token_of_row).
    token_of_row entries must be < num_tokens when it is given.
    """
    counts, offsets, token_of_row = _plan_parts(plan)
    counts = _ints(counts, "counts")
    offsets = _ints(offsets, "offsets")
    token_of_row = _ints(token_of_row, "token_of_row")
    E = num_experts
    if counts.shape != (E,):
        raise ValueError(f"counts: expected shape ({E},) (E from W), got {counts.shape}")
    if offsets.shape != (E + 1,):
        raise ValueError(f"offsets: expected shape ({E + 1},), got {offsets.shape}")
    if np.any(counts < 0):
        e = int(np.flatnonzero(counts < 0)[0])
        raise ValueError(f"counts[{e}]: expected >= 0, got {counts[e]}")
    if offsets[0] != 0:
        raise ValueError(f"offsets[0]: expected 0, got {offsets[0]}")
    bad = np.diff(offsets) != counts
    if bad.any():
        e = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"offsets[{e + 1}]: expected offsets[{e}] + counts[{e}] = "
            f"{offsets[e] + counts[e]}, got {offsets[e + 1]}"
        )
    R = int(offsets[-1])
    if R >= 2**32:
        raise ValueError(f"offsets[{E}]: expected R < 2^32 rows, got {R}")
    if token_of_row.shape != (R,):
        raise ValueError(f"token_of_row: expected shape ({R},) (offsets[E]), got {token_of_row.shape}")
    if num_tokens is not None:
        bad = (token_of_row < 0) | (token_of_row >= num_tokens)
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise IndexError(
                f"token_of_row[{r}] = {token_of_row[r]} is out of range for {num_tokens} tokens"
            )
    return counts, offsets, token_of_row


def check_row_of_slot(row_of_slot, num_tokens, num_rows, token_of_row=None):
    """Validate row_of_slot [T, k] (U32_MAX = empty slot); return it as int64.

    Every row in 0..num_rows must be named by exactly one slot, and, when
    token_of_row is given, by a slot of token token_of_row[row].
    """
    ros = _ints(row_of_slot, "row_of_slot")
    if ros.ndim != 2 or ros.shape[0] != num_tokens or ros.shape[1] < 1:
        raise ValueError(f"row_of_slot: expected shape ({num_tokens}, k >= 1), got {ros.shape}")
    valid = ros != U32_MAX
    bad = valid & ((ros < 0) | (ros >= num_rows))
    if bad.any():
        t, j = (int(i) for i in np.argwhere(bad)[0])
        raise IndexError(
            f"row_of_slot[{t}, {j}] = {ros[t, j]} is out of range for {num_rows} rows"
        )
    named = np.bincount(ros[valid], minlength=num_rows)
    if np.any(named != 1):
        r = int(np.flatnonzero(named != 1)[0])
        raise ValueError(f"row_of_slot: expected every row named by one slot, row {r} by {named[r]}")
    if token_of_row is not None:
        tokens = np.broadcast_to(np.arange(num_tokens)[:, None], ros.shape)
        bad = valid & (token_of_row[np.where(valid, ros, 0)] != tokens)
        if bad.any():
            t, j = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"row_of_slot[{t}, {j}] = {ros[t, j]}: token_of_row of that row is "
                f"{token_of_row[ros[t, j]]}, expected {t}"
            )
    return ros


def _activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")
    return name


def _out_width(width, activation):
    """Dout from the width of W's last dim (2 * Dout for SwiGlu)."""
    if activation == "swiglu":
        if width % 2:
            raise ValueError(f"W: expected an even last dim [E, Din, 2*Dout] for swiglu, got {width}")
        return width // 2
    return width


def _expert_of_row(counts):
    return np.repeat(np.arange(len(counts)), counts)


# ---------------------------------------------------------------- activations


def _phi_cdf(x):
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


def _silu_grad(x):
    s = _sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def activate(h, activation):
    """y = act(h); for swiglu h is [.., 2*Dout] and y is [.., Dout]."""
    h = np.asarray(h, dtype=np.float64)
    activation = _activation(activation)
    if activation == "none":
        return h.copy()
    if activation == "relu":
        return np.maximum(h, 0.0)
    if activation == "gelu":
        return h * _phi_cdf(h)
    if activation == "silu":
        return h * _sigmoid(h)
    d = _out_width(h.shape[-1], activation)
    gate, up = h[..., :d], h[..., d:]
    return gate * _sigmoid(gate) * up


def activate_backward(dy, h, activation):
    """dh = dy * act'(h) (the vector-Jacobian product for swiglu)."""
    h = np.asarray(h, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    activation = _activation(activation)
    if activation == "none":
        return dy.copy()
    if activation == "relu":
        return dy * (h > 0)
    if activation == "gelu":
        pdf = np.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
        return dy * (_phi_cdf(h) + h * pdf)
    if activation == "silu":
        return dy * _silu_grad(h)
    d = _out_width(h.shape[-1], activation)
    gate, up = h[..., :d], h[..., d:]
    return np.concatenate([dy * up * _silu_grad(gate), dy * gate * _sigmoid(gate)], axis=-1)


# ---------------------------------------------------------------- layer


def _layer_args(x, plan, W, variant):
    """Validated (x, counts, offsets, token_of_row, x_rows, W)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    W = _floats(W, 3, "W")
    E, Din, _ = W.shape
    if E < 1:
        raise ValueError("W: expected E >= 1 experts, got 0")
    x = _floats(x, 2, "x_rows" if variant == "rows" else "x")
    counts, offsets, token_of_row = check_plan(plan, E, x.shape[0] if variant == "tokens" else None)
    R = int(offsets[-1])
    if variant == "tokens":
        _shape(x, (x.shape[0], Din), "x")
        x_rows = x[token_of_row]
    else:
        _shape(x, (R, Din), "x_rows")
        x_rows = x
    return x, counts, offsets, token_of_row, x_rows, W


def layer_forward(x, plan, W, bias=None, activation="none", variant="tokens"):
    """One expert layer: (y [R, Dout], h [R, Dout']), rows in plan order.

    x: [T, Din] (variant "tokens") or x_rows [R, Din] (variant "rows");
    plan: see `check_plan`; W: [E, Din, Dout'] with Dout' = 2*Dout for swiglu
    else Dout; bias: [E, Dout'] or None.
    h[r] = x[token_of_row[r]] @ W[e(r)] + bias[e(r)], y = act(h).
    """
    activation = _activation(activation)
    _, _, offsets, _, x_rows, W = _layer_args(x, plan, W, variant)
    E, _, width = W.shape
    _out_width(width, activation)
    if bias is not None:
        bias = _floats(bias, 2, "bias")
        _shape(bias, (E, width), "bias")
    h = np.zeros((int(offsets[-1]), width))
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        h[lo:hi] = x_rows[lo:hi] @ W[e]
        if bias is not None:
            h[lo:hi] += bias[e]
    return activate(h, activation), h


def layer_backward(dy, h, x, plan, W, row_of_slot=None, activation="none", variant="tokens"):
    """Backward of `layer_forward` from dy [R, Dout] and the saved h.

    Returns (dh [R, Dout'], dx, dW [E, Din, Dout'], db [E, Dout']). dx is
    [T, Din] for "tokens" (row_of_slot [T, k] required: dx[t] sums
    dh[r] @ W[e(r)]^T over t's rows in slot order; a token with no rows gets 0)
    or dx_rows [R, Din] for "rows". dW[e] = sum_r x_r^T dh[r] and
    db[e] = sum_r dh[r] over e's rows in plan order; no rows, exact zeros.
    """
    activation = _activation(activation)
    x, counts, offsets, token_of_row, x_rows, W = _layer_args(x, plan, W, variant)
    E, Din, width = W.shape
    dout = _out_width(width, activation)
    R = int(offsets[-1])
    h = _floats(h, 2, "h")
    _shape(h, (R, width), "h")
    dy = _floats(dy, 2, "dy")
    _shape(dy, (R, dout), "dy")
    if variant == "tokens":
        if row_of_slot is None:
            raise ValueError("row_of_slot: required for variant 'tokens' (the dx sum)")
        ros = check_row_of_slot(row_of_slot, x.shape[0], R, token_of_row)
    elif row_of_slot is not None:
        check_row_of_slot(row_of_slot, np.shape(row_of_slot)[0], R, token_of_row)

    dh = activate_backward(dy, h, activation)
    dx_rows = np.zeros((R, Din))
    dW = np.zeros((E, Din, width))
    db = np.zeros((E, width))
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        dx_rows[lo:hi] = dh[lo:hi] @ W[e].T
        dW[e] = x_rows[lo:hi].T @ dh[lo:hi]
        db[e] = dh[lo:hi].sum(axis=0)
    if variant == "rows":
        return dh, dx_rows, dW, db
    dx = np.zeros_like(x)
    for j in range(ros.shape[1]):  # slot order
        valid = ros[:, j] != U32_MAX
        dx[valid] += dx_rows[ros[valid, j]]
    return dh, dx, dW, db


# ---------------------------------------------------------------- combine


def _combine_args(y, weights, row_of_slot, token_of_row, res, rho):
    y = _floats(y, 2, "y")
    weights = _floats(weights, 2, "weights")
    T = weights.shape[0]
    ros = check_row_of_slot(row_of_slot, T, y.shape[0], token_of_row)
    _shape(weights, ros.shape, "weights")
    if res is not None:
        res = _floats(res, 2, "res")
        _shape(res, (T, y.shape[1]), "res")
    if rho is not None:
        if res is None:
            raise ValueError("rho: given without res (it scales res)")
        rho = _floats(rho, 1, "rho")
        _shape(rho, (T,), "rho")
    valid = ros != U32_MAX
    # Empty slots read row 0 below, with weight 0, so nothing of theirs counts.
    rows = np.where(valid, ros, 0)
    w = np.where(valid, weights, 0.0)
    return y, w, valid, rows, res, rho


def combine(y, weights, row_of_slot, plan, res=None, rho=None):
    """Mix expert rows into tokens: (out [T, Dout], util [E]).

    out[t] = rho[t] * res[t] + sum_j weights[t, j] * y[row_of_slot[t, j]]
    (slots in order; rho = 1 without it, no first term without res);
    util[e] = sum over e's rows r of ||weights[t, j] * y[r]||_2.
    plan: see `check_plan` (E is len(counts)).
    """
    counts = _ints(_plan_parts(plan)[0], "counts")
    if counts.ndim != 1:
        raise ValueError(f"counts: expected 1 dim [E], got shape {counts.shape}")
    T = np.shape(weights)[0] if np.ndim(weights) == 2 else None
    counts, offsets, token_of_row = check_plan(plan, len(counts), T)
    y, w, valid, rows, res, rho = _combine_args(y, weights, row_of_slot, token_of_row, res, rho)
    if y.shape[0] != offsets[-1]:
        raise ValueError(f"y: expected {offsets[-1]} rows (offsets[E]), got {y.shape[0]}")
    T, k = w.shape
    out = np.zeros((T, y.shape[1]))
    if res is not None:
        out += res if rho is None else rho[:, None] * res
    for j in range(k):
        out += w[:, j, None] * y[rows[:, j]]
    # |w| ||y[r]|| per row, then per expert in plan order.
    per_row = np.zeros(y.shape[0])
    per_row[rows[valid]] = np.abs(w[valid]) * np.linalg.norm(y[rows[valid]], axis=1)
    util = np.array([per_row[offsets[e] : offsets[e + 1]].sum() for e in range(len(counts))])
    return out, util


def combine_backward(dout, y, weights, row_of_slot, res=None, rho=None):
    """Backward of `combine`: (dy [R, Dout], dweights [T, k], dres, drho).

    dy[r] = weights[t, j] * dout[t] for the slot (t, j) naming r;
    dweights[t, j] = <dout[t], y[r]> (0 for an empty slot);
    dres = rho * dout (dout without rho; None without res);
    drho[t] = <dout[t], res[t]> (None without rho).
    """
    y, w, valid, rows, res, rho = _combine_args(y, weights, row_of_slot, None, res, rho)
    T, k = w.shape
    dout = _floats(dout, 2, "dout")
    _shape(dout, (T, y.shape[1]), "dout")
    dy = np.zeros_like(y)
    dweights = np.zeros((T, k))
    for j in range(k):
        v = valid[:, j]
        dy[rows[v, j]] = w[v, j, None] * dout[v]
        dweights[v, j] = np.einsum("td,td->t", dout[v], y[rows[v, j]])
    dres = None if res is None else (dout.copy() if rho is None else rho[:, None] * dout)
    drho = None if rho is None else np.einsum("td,td->t", dout, res)
    return dy, dweights, dres, drho

"""Float64 reference of the fused gated multi-head scores (`scoring`, DESIGN.md 4.4).

User states `U [B, H, D]`, gate logits `G [B, H]` (`g = softmax_h G`), item
tables `X [H, V, D]` (per head) or `[V, D]` (shared by all heads), `scale`,
optional `item_bias [V]`, mixing "logits" or "probabilities", optional
`excluded` item ids. Per-head logits are

    s[b, h, v] = scale * <U[b, h], X[h or shared, v]> + item_bias[v].

Logits mixing: `S[b, v] = sum_h g[b, h] s[b, h, v]`, `P = softmax_v S`.
Probabilities mixing: `P[b, v] = sum_h g[b, h] softmax_v(s[b, h, .])[v]`.
Every softmax over v runs over the eligible (not excluded) items only.

Functions: `mixed_logits`, `probabilities`, `scores` (+ `scores_backward`),
`topk`, `cross_entropy` (+ `cross_entropy_backward`). Callers round inputs to
the element type first (`golden.round_to`); everything here is float64.

Choices where DESIGN.md leaves room (the Rust side follows the same ones):
- `scores` returns the quantity `topk` ranks by, so that "topk is the exact
  top-n of `scores`" holds for both mixings: the mixed logits S for Logits
  mixing, the mixture probabilities P for Probabilities mixing (the mixed
  logits S do not rank a mixture of softmaxes). `mixed_logits` and
  `probabilities` give either quantity for either mixing.
- Excluded items: S = -inf (so softmax_v S gives them probability 0 and a
  top-n over S never picks them), P = 0. `scores_backward` ignores dS at
  excluded items (S or P is a constant there): they contribute exact zeros.
- Every item excluded: S is all -inf, P all 0 and every lse -inf; cross
  entropy of a row that is not ignored then fails (its target is excluded)
  and topk fails (fewer than n eligible).
- `cross_entropy` returns the log-sum-exps of every row, ignored rows
  included: `[B]` (lse_v S) for Logits mixing, `[B, H]` (lse_v s[b, h, .])
  for Probabilities mixing.
- Targets are checked row by row in ascending order: a row whose target
  equals `ignore` is skipped (ignore may be >= V), a target >= V is
  IndexError, an excluded target is ValueError; the first offending row wins.
- topk: n >= 1; history offsets must start at 0, never decrease and end at
  len(history ids) (ValueError); a history id >= V is IndexError (lowest
  position). History lists may repeat ids and may hold excluded ids.
  Values are those of `scores`; ordering: numbers descending, NaN after every
  number, ties (and NaNs among themselves) to the lower id; -0 equals +0.
- `ditem_bias` is returned even without `item_bias` (the gradient at a zero
  bias); dX has the layout of X ([V, D] shared: summed over heads).
"""

import numpy as np

__all__ = [
    "MIXINGS",
    "mixed_logits",
    "probabilities",
    "scores",
    "scores_backward",
    "topk",
    "cross_entropy",
    "cross_entropy_backward",
]

MIXINGS = ("logits", "probabilities")


# ---------------------------------------------------------------- arguments


def _check_ids(ids, bound, name):
    """ids as int64 [n]; IndexError naming the lowest position >= bound."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "ui"):
        raise TypeError(f"{name}: expected a 1-D integer array, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    bad = (ids < 0) | (ids >= bound)
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise IndexError(f"{name}[{position}] = {ids[position]} is out of range for {bound} items")
    return ids


class _Args:
    """Validated operands: u [B, H, D], gates logits, table, bias [V], eligible [V]."""

    def __init__(self, user, gate_logits, table, scale, item_bias, mixing, excluded):
        self.user = np.asarray(user, dtype=np.float64)
        self.gate_logits = np.asarray(gate_logits, dtype=np.float64)
        self.table = np.asarray(table, dtype=np.float64)
        if self.user.ndim != 3:
            raise ValueError(f"U: expected 3 dims [B, H, D], got shape {self.user.shape}")
        b, h, d = self.user.shape
        if h < 1 or d < 1:
            raise ValueError(f"U: expected H >= 1 and D >= 1, got shape {self.user.shape}")
        if self.gate_logits.shape != (b, h):
            raise ValueError(f"G: expected shape ({b}, {h}), got {self.gate_logits.shape}")
        if self.table.ndim == 2:
            self.shared = True
            v, dx = self.table.shape
        elif self.table.ndim == 3:
            self.shared = False
            hx, v, dx = self.table.shape
            if hx != h:
                raise ValueError(f"X: expected {h} heads, got shape {self.table.shape}")
        else:
            raise ValueError(f"X: expected [H, V, D] or [V, D], got shape {self.table.shape}")
        if dx != d:
            raise ValueError(f"X: expected width D = {d}, got shape {self.table.shape}")
        if v < 1:
            raise ValueError(f"X: expected V >= 1 items, got shape {self.table.shape}")
        if mixing not in MIXINGS:
            raise ValueError(f"mixing: expected one of {MIXINGS}, got {mixing!r}")
        if item_bias is None:
            self.bias = np.zeros(v)
        else:
            self.bias = np.asarray(item_bias, dtype=np.float64)
            if self.bias.shape != (v,):
                raise ValueError(f"item_bias: expected shape ({v},), got {self.bias.shape}")
        self.eligible = np.ones(v, dtype=bool)
        if excluded is not None:
            self.eligible[_check_ids(excluded, v, "excluded")] = False
        self.scale = float(scale)
        self.mixing = mixing
        self.B, self.H, self.D, self.V = b, h, d, v

    def head_logits(self):
        """s [B, H, V] over every item (excluded ones included)."""
        spec = "bhd,vd->bhv" if self.shared else "bhd,hvd->bhv"
        return self.scale * np.einsum(spec, self.user, self.table) + self.bias

    def gates(self):
        """g [B, H] and log g [B, H]."""
        log_g = self.gate_logits - _lse(self.gate_logits, np.ones(self.H, dtype=bool))[..., None]
        return np.exp(log_g), log_g

    def from_head_grad(self, ds):
        """(dU, dX, ditem_bias) from ds [B, H, V] (zero at excluded items)."""
        ds = np.where(self.eligible, ds, 0.0)
        if self.shared:
            du = self.scale * np.einsum("bhv,vd->bhd", ds, self.table)
            dx = self.scale * np.einsum("bhv,bhd->vd", ds, self.user)
            dx[~self.eligible, :] = 0.0
        else:
            du = self.scale * np.einsum("bhv,hvd->bhd", ds, self.table)
            dx = self.scale * np.einsum("bhv,bhd->hvd", ds, self.user)
            dx[:, ~self.eligible, :] = 0.0
        dbias = ds.sum(axis=(0, 1))
        dbias[~self.eligible] = 0.0
        return du, dx, dbias


def _lse(x, eligible):
    """log-sum-exp over the last axis restricted to `eligible` ([V] bool);
    -inf where no entry is eligible."""
    xe = x[..., eligible]
    if xe.shape[-1] == 0:
        return np.full(x.shape[:-1], -np.inf)
    m = xe.max(axis=-1)
    finite_m = np.where(np.isfinite(m), m, 0.0)
    return finite_m + np.log(np.exp(xe - finite_m[..., None]).sum(axis=-1))


def _softmax(x, eligible):
    """softmax over the last axis restricted to `eligible`; 0 elsewhere."""
    lse = _lse(x, eligible)
    out = np.zeros_like(x)
    if eligible.any():
        out[..., eligible] = np.exp(x[..., eligible] - lse[..., None])
    return out


def _gate_backward(g, dg):
    """dG from dL/dg through g = softmax_h G."""
    return g * (dg - (g * dg).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- scores


def _mixed(a, s, g):
    out = np.full((a.B, a.V), -np.inf)
    out[:, a.eligible] = np.einsum("bh,bhv->bv", g, s[:, :, a.eligible])
    return out


def _probabilities(a, s, g):
    if a.mixing == "logits":
        return _softmax(_mixed(a, s, g), a.eligible)
    return np.einsum("bh,bhv->bv", g, _softmax(s, a.eligible))


def mixed_logits(U, G, X, *, scale=1.0, item_bias=None, excluded=None):
    """S [B, V] = sum_h g[b, h] s[b, h, v]; -inf at excluded items."""
    a = _Args(U, G, X, scale, item_bias, "logits", excluded)
    return _mixed(a, a.head_logits(), a.gates()[0])


def probabilities(U, G, X, *, scale=1.0, item_bias=None, mixing="logits", excluded=None):
    """P [B, V] of either mixing; 0 at excluded items; each row sums to 1."""
    a = _Args(U, G, X, scale, item_bias, mixing, excluded)
    return _probabilities(a, a.head_logits(), a.gates()[0])


def _scores(a):
    s = a.head_logits()
    g = a.gates()[0]
    return _mixed(a, s, g) if a.mixing == "logits" else _probabilities(a, s, g)


def scores(U, G, X, *, scale=1.0, item_bias=None, mixing="logits", excluded=None):
    """The materialised scores [B, V]: S (Logits mixing) or P (Probabilities)."""
    return _scores(_Args(U, G, X, scale, item_bias, mixing, excluded))


def scores_backward(dS, U, G, X, *, scale=1.0, item_bias=None, mixing="logits", excluded=None):
    """(dU [B, H, D], dG [B, H], dX (layout of X), ditem_bias [V]) of
    L = sum over eligible (b, v) of dS[b, v] * scores[b, v]."""
    a = _Args(U, G, X, scale, item_bias, mixing, excluded)
    ds_out = np.asarray(dS, dtype=np.float64)
    if ds_out.shape != (a.B, a.V):
        raise ValueError(f"dS: expected shape ({a.B}, {a.V}), got {ds_out.shape}")
    ds_out = np.where(a.eligible, ds_out, 0.0)
    s = a.head_logits()
    g = a.gates()[0]
    if a.mixing == "logits":
        ds = g[:, :, None] * ds_out[:, None, :]
        dg = np.einsum("bv,bhv->bh", ds_out[:, a.eligible], s[:, :, a.eligible])
    else:
        q = _softmax(s, a.eligible)  # [B, H, V]
        dg = np.einsum("bhv,bv->bh", q, ds_out)  # <q_h, dP>
        ds = g[:, :, None] * q * (ds_out[:, None, :] - dg[:, :, None])
    du, dx, dbias = a.from_head_grad(ds)
    return du, _gate_backward(g, dg), dx, dbias


# ---------------------------------------------------------------- top-k


def _history_sets(offsets, ids, b, v):
    """Per-row history item ids as int64 arrays from CSR (offsets [B+1], ids)."""
    if offsets is None and ids is None:
        return [np.zeros(0, dtype=np.int64)] * b
    if offsets is None or ids is None:
        raise ValueError("history: expected both offsets and ids, or neither")
    offsets = np.asarray(offsets)
    if offsets.shape != (b + 1,) or (offsets.size and offsets.dtype.kind not in "ui"):
        raise ValueError(f"history offsets: expected {b + 1} integers, got {offsets.dtype} {offsets.shape}")
    offsets = offsets.astype(np.int64)
    ids = _check_ids(ids, v, "history ids")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != len(ids):
        raise ValueError(
            f"history offsets: expected 0, non-decreasing, ending at {len(ids)}; got {offsets.tolist()}"
        )
    return [ids[offsets[r] : offsets[r + 1]] for r in range(b)]


def topk(
    n,
    U,
    G,
    X,
    *,
    scale=1.0,
    item_bias=None,
    mixing="logits",
    excluded=None,
    history_offsets=None,
    history_ids=None,
):
    """(ids [B, n] uint32, values [B, n]): the n best eligible items per row by
    `scores`, best first, ties to the lower id, NaN below every number.
    Excluded items and the row's history items are skipped; a row with fewer
    than n eligible items is ValueError."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    n = int(n)
    a = _Args(U, G, X, scale, item_bias, mixing, excluded)
    history = _history_sets(history_offsets, history_ids, a.B, a.V)
    values = _scores(a)
    out_ids = np.zeros((a.B, n), dtype=np.uint32)
    out_values = np.zeros((a.B, n))
    for row in range(a.B):
        eligible = a.eligible.copy()
        eligible[history[row]] = False
        cand = np.flatnonzero(eligible)
        if len(cand) < n:
            raise ValueError(f"topk: row {row} has {len(cand)} eligible items, expected at least n = {n}")
        val = values[row, cand]
        nan = np.isnan(val)
        # lexsort: last key first. NaN after numbers, then descending value,
        # then ascending id (cand is ascending, the sort is stable).
        order = np.lexsort((cand, -np.where(nan, 0.0, val), nan))[:n]
        out_ids[row] = cand[order]
        out_values[row] = val[order]
    return out_ids, out_values


# ---------------------------------------------------------------- cross entropy


def _check_targets(targets, ignore, a):
    """(targets int64 [B] with ignored rows set to 0, active rows bool [B])."""
    targets = np.asarray(targets)
    if targets.shape != (a.B,) or (targets.size and targets.dtype.kind not in "ui"):
        raise ValueError(f"targets: expected {a.B} integers, got {targets.dtype} {targets.shape}")
    targets = targets.astype(np.int64)
    active = np.ones(a.B, dtype=bool) if ignore is None else targets != int(ignore)
    for row in np.flatnonzero(active):
        t = targets[row]
        if t < 0 or t >= a.V:
            raise IndexError(f"targets[{row}] = {t} is out of range for {a.V} items")
        if not a.eligible[t]:
            raise ValueError(f"targets[{row}] = {t} is an excluded item")
    return np.where(active, targets, 0), active


def _cross_entropy(a, targets, active):
    """(loss [B], lse, intermediates) on validated arguments."""
    s = a.head_logits()
    g, log_g = a.gates()
    rows = np.arange(a.B)
    loss = np.zeros(a.B)
    if a.mixing == "logits":
        mixed = _mixed(a, s, g)
        lse = _lse(mixed, a.eligible)  # [B]
        loss[active] = lse[active] - mixed[rows[active], targets[active]]
        return loss, lse, dict(s=s, g=g, mixed=mixed)
    lse = _lse(s, a.eligible)  # [B, H]
    # log P[b, y] = lse_h (log g_h + s[b, h, y] - lse_h), in log space so that
    # a P that underflows still has a finite loss and responsibilities.
    log_joint = log_g + s[rows, :, targets] - lse  # [B, H]
    log_p = _lse(log_joint, np.ones(a.H, dtype=bool))
    loss[active] = -log_p[active]
    return loss, lse, dict(s=s, g=g, log_joint=log_joint, log_p=log_p)


def cross_entropy(
    targets, U, G, X, *, ignore=None, scale=1.0, item_bias=None, mixing="logits", excluded=None
):
    """(loss [B], lse): loss_b = -log P[b, targets[b]], 0 for ignored rows;
    lse is [B] (Logits mixing) or [B, H] (Probabilities mixing)."""
    a = _Args(U, G, X, scale, item_bias, mixing, excluded)
    targets, active = _check_targets(targets, ignore, a)
    loss, lse, _ = _cross_entropy(a, targets, active)
    return loss, lse


def cross_entropy_backward(
    dloss, targets, U, G, X, *, ignore=None, scale=1.0, item_bias=None, mixing="logits", excluded=None
):
    """(dU [B, H, D], dG [B, H], dX (layout of X), ditem_bias [V]) of
    L = sum_b dloss[b] * loss[b]. Ignored rows and excluded items give exact zeros."""
    a = _Args(U, G, X, scale, item_bias, mixing, excluded)
    targets, active = _check_targets(targets, ignore, a)
    dloss = np.asarray(dloss, dtype=np.float64)
    if dloss.shape != (a.B,):
        raise ValueError(f"dloss: expected shape ({a.B},), got {dloss.shape}")
    _, lse, saved = _cross_entropy(a, targets, active)
    weight = np.where(active, dloss, 0.0)
    s, g = saved["s"], saved["g"]
    rows = np.arange(a.B)
    onehot = np.zeros((a.B, a.V))
    onehot[rows[active], targets[active]] = 1.0
    if a.mixing == "logits":
        p = np.zeros((a.B, a.V))
        p[:, a.eligible] = np.exp(saved["mixed"][:, a.eligible] - lse[:, None])
        d_mixed = weight[:, None] * (p - onehot)  # dL/dS
        ds = g[:, :, None] * d_mixed[:, None, :]
        dg = np.einsum("bv,bhv->bh", d_mixed[:, a.eligible], s[:, :, a.eligible])
        dG = _gate_backward(g, dg)
    else:
        q = _softmax(s, a.eligible)  # [B, H, V]
        # Responsibilities r_h = g_h q[h, y] / P[y]: dloss/dG = g - r and
        # dloss/ds[h, v] = r_h (q[h, v] - [v = y]).
        resp = np.zeros((a.B, a.H))
        resp[active] = np.exp(saved["log_joint"][active] - saved["log_p"][active, None])
        ds = (weight[:, None] * resp)[:, :, None] * (q - onehot[:, None, :])
        dG = weight[:, None] * (g - resp)
    du, dx, dbias = a.from_head_grad(ds)
    # A zero weight times a negative value is -0; the contract says zeros.
    dG[~active] = 0.0
    du[~active] = 0.0
    return du, dG, dx, dbias

"""Float64 reference of top-k routing (`routing`, DESIGN.md 4.2).

Grouped routing (`groups=G`, FAME's per-head routers): the E experts form G
groups of N = E / G consecutive experts and each token routes once within
each group. The reference composes G independent ungrouped routers over the
column blocks of the logits (the Rust kernels generalise one router
instead): indices are global (g * N + n), the routing rows are the (token,
group) pairs r = t * G + g, so indices, weights, row_of_slot and dweights are
[T * G, k] and token_of_row names routing rows; one plan covers all E
experts. lb_loss and z_loss are the means over the groups of each group's
losses (every group sees the same T' valid tokens), so their gradients are
each group's scaled by 1 / G. k counts experts per group; "all" needs the
same number of active experts in every group.

`forward` computes scores, the top-k selection, routing weights, the dispatch
plan and the statistics (load-balance loss, z-loss, gate mass); `backward`
gives the exact gradient of

    L = sum(dweights * weights) + lb_coef * lb_loss + z_coef * z_loss

with respect to the logits, holding the selection (indices) and the load
fractions f fixed, as the contract says.

Choices where DESIGN.md leaves room (the Rust side follows the same ones):
- The selection key is computed in float32 arithmetic,
  `float32(z) + float32(selection_bias)`, then -0 is canonicalised to +0: the
  Rust backends add in f32, so the selection (integers) is bit-identical
  rather than subject to float64-vs-float32 rounding.
- NonFinite reports the lowest offending position in row-major order among
  active columns of valid tokens: a NaN/+inf at (row, column); for a row whose
  active logits are all -inf, (row, first active column).
- An absent optional equals its neutral value: all experts active, all tokens
  valid, zero bias. Mask entries must be 0 or 1; anything else and a
  non-finite selection bias are ValueError (InvalidArgument on the Rust side).
- Scores of invalid tokens are 0 (the row takes no part in anything).
- The shares p / sum(p) of lb_loss (over the active experts) and the
  renormalised weights (over the selected ones) are exact ratios even where
  the scores underflow: each score is taken relative to the largest logit of
  the set first (`_relative`). The sum is then at least 1, so a token's
  selected scores never "sum to 0" (a lone renormalised weight is 1 for every
  finite logit), and the functions are continuous in the logits. The Rust
  backends compute the same ratios in f32, where the sigmoids of logits below
  about -87 underflow.
- The backward never divides by a sum of scores: a ratio y = u / sum(u) of
  unnormalised scores u (e^z, or sigmoid(z)) has dL/dz_i = y_i l_i (g_i -
  <g, y>) with l = d log u / dz (1, or 1 - sigmoid(z)).
- With no valid token (T' = 0) both losses are 0 and the gradient is 0.
"""

import numpy as np

__all__ = ["NonFinite", "U32_MAX", "forward", "backward"]

U32_MAX = np.uint32(0xFFFFFFFF)

SCORES = ("softmax", "sigmoid")


class NonFinite(ValueError):
    """NaN or +inf in an active logit of a valid token, or a valid token whose
    active logits are all -inf. Mirrors `Error::NonFinite { row, column }`."""

    def __init__(self, row, column, what):
        super().__init__(f"logits[{row}, {column}] is {what}")
        self.row = row
        self.column = column


def _mask(mask, n, name):
    """Bool mask from an optional 0/1 vector of length n (None = all ones)."""
    if mask is None:
        return np.ones(n, dtype=bool)
    m = np.asarray(mask)
    if m.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {m.shape}")
    if not np.all((m == 0) | (m == 1)):
        raise ValueError(f"{name}: expected entries 0 or 1, got {np.unique(m)}")
    return m == 1


def _check(logits, k, score, expert_mask, token_mask, selection_bias, groups):
    """Validate arguments; return (Z, k, active, valid, bias32)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits: expected 2 dims [T, E], got shape {z.shape}")
    t, e = z.shape
    if e == 0:
        raise ValueError("logits: expected E >= 1 experts, got 0")
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1 or e % groups:
        raise ValueError(f"groups: expected a divisor of E = {e}, got {groups!r}")
    active = _mask(expert_mask, e, "expert_mask")
    valid = _mask(token_mask, t, "token_mask")
    per_group = active.reshape(groups, e // groups).sum(axis=1)
    if isinstance(k, str):
        if k != "all":
            raise ValueError(f"k: expected an int or 'all', got {k!r}")
        if np.any(per_group != per_group[0]):
            raise ValueError(f"k: 'all' needs as many active experts in every group, got {per_group.tolist()}")
        k = int(per_group[0])
    elif isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k: expected an int or 'all', got {k!r}")
    k = int(k)
    fewest = int(per_group.min())
    if not 1 <= k <= fewest:
        raise ValueError(f"k: expected 1..={fewest} (active experts of a group), got {k}")
    if selection_bias is None:
        bias = np.zeros(e, dtype=np.float32)
    else:
        bias = np.asarray(selection_bias, dtype=np.float32)
        if bias.shape != (e,):
            raise ValueError(f"selection_bias: expected shape ({e},), got {bias.shape}")
        if not np.all(np.isfinite(bias)):
            raise ValueError("selection_bias: expected finite values")
    _check_finite(z, active, valid, groups)
    return z, k, active, valid, bias


def _check_finite(z, active, valid, groups):
    """Raise NonFinite at the lowest offending position in row-major order;
    an all -inf row of a group reports the group's first active column."""
    n = z.shape[1] // groups
    for row in np.flatnonzero(valid):
        for g in range(groups):
            cols = g * n + np.flatnonzero(active[g * n : (g + 1) * n])
            zr = z[row, cols]
            bad = np.isnan(zr) | (zr == np.inf)
            if bad.any():
                j = int(np.argmax(bad))
                what = "NaN" if np.isnan(zr[j]) else "+inf"
                raise NonFinite(int(row), int(cols[j]), what)
            if np.all(zr == -np.inf):
                raise NonFinite(int(row), int(cols[0]), "-inf in a group whose active logits are all -inf")


def _sigmoid(x):
    """Overflow-free logistic function (sigmoid(-inf) = 0)."""
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _scores(z, active, valid, score):
    """p [T, E]: softmax over active experts or sigmoid of each; 0 elsewhere."""
    p = np.zeros_like(z)
    zv = z[np.ix_(valid, active)]
    if zv.size:
        if score == "softmax":
            ex = np.exp(zv - zv.max(axis=1, keepdims=True))
            pv = ex / ex.sum(axis=1, keepdims=True)
        else:
            pv = _sigmoid(zv)
        p[np.ix_(valid, active)] = pv
    return p


def _relative(z, anchor, score):
    """Unnormalised score of z relative to that of anchor >= z (broadcast):
    exp(z - anchor), or sigmoid(z) / sigmoid(anchor), which below 0 is
    exp(z - anchor) (1 + exp(anchor)) / (1 + exp(z)), exact where both
    sigmoids underflow."""
    if score == "softmax":
        return np.exp(z - anchor)
    anchor = np.broadcast_to(anchor, np.shape(z))
    with np.errstate(over="ignore", invalid="ignore"):
        low = np.exp(z - anchor) * (1.0 + np.exp(anchor)) / (1.0 + np.exp(z))
        high = _sigmoid(np.array(z, dtype=np.float64)) / _sigmoid(np.array(anchor, dtype=np.float64))
    return np.where(anchor >= 0, high, low)


def _ratio(z, score):
    """u / sum(u) along the last axis, u relative to the row's largest z."""
    r = _relative(z, z.max(axis=-1, keepdims=True), score)
    return r / r.sum(axis=-1, keepdims=True)


def _select(z, k, active, valid, bias):
    """indices [T, k] uint32: the k largest keys among active experts."""
    t, _ = z.shape
    cols = np.flatnonzero(active)
    # float32 arithmetic on purpose, see the module docstring; `+ 0` maps -0 to +0.
    key = (z[:, cols].astype(np.float32) + bias[cols]) + np.float32(0)
    # Stable sort on the negated key: descending key, ties to the lower index.
    # (-inf keys become +inf and sort last among equals, as they should.)
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    idx = np.full((t, k), U32_MAX, dtype=np.uint32)
    idx[valid] = cols[order[valid]].astype(np.uint32)
    return idx


def _plan(idx, valid, e):
    """Dispatch plan: counts, offsets, token_of_row, row_of_slot."""
    t, k = idx.shape
    tokens = np.flatnonzero(valid)
    experts = idx[valid].astype(np.int64)  # [T', k]
    counts = np.bincount(experts.ravel(), minlength=e).astype(np.int64)
    offsets = np.zeros(e + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    token_of_row = np.empty(int(offsets[-1]), dtype=np.int64)
    row_of_slot = np.full((t, k), U32_MAX, dtype=np.uint32)
    fill = offsets[:-1].copy()
    # Visiting tokens in ascending order places them ascending within an expert.
    for tt, row in zip(tokens, experts):
        for j, ex in enumerate(row):
            token_of_row[fill[ex]] = tt
            row_of_slot[tt, j] = fill[ex]
            fill[ex] += 1
    return (
        counts.astype(np.uint32),
        offsets.astype(np.uint32),
        token_of_row.astype(np.uint32),
        row_of_slot,
    )


def _shares(z, active, valid, score):
    """q [T, E] = p / sum(p) over the active experts of each valid token."""
    q = np.zeros_like(z)
    zv = z[np.ix_(valid, active)]
    if zv.size:
        q[np.ix_(valid, active)] = _ratio(zv, score)
    return q


def _lse(z, active, valid):
    """log-sum-exp over active experts per valid token: [T']."""
    zv = z[np.ix_(valid, active)]
    m = zv.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(zv - m).sum(axis=1, keepdims=True)))[:, 0]


def _forward(z, k, score, renormalize, active, valid, bias):
    """Forward on validated arguments; also returns intermediates for backward."""
    t, e = z.shape
    e_active = int(active.sum())
    n_valid = int(valid.sum())
    p = _scores(z, active, valid, score)
    idx = _select(z, k, active, valid, bias)
    vi = np.flatnonzero(valid)
    weights = np.zeros((t, k))
    if renormalize:
        weights[vi] = _ratio(np.take_along_axis(z[vi], idx[vi].astype(np.int64), axis=1), score)
    else:
        weights[vi] = np.take_along_axis(p[vi], idx[vi].astype(np.int64), axis=1)
    q = _shares(z, active, valid, score)
    counts, offsets, token_of_row, row_of_slot = _plan(idx, valid, e)

    gate_mass = np.zeros(e)
    np.add.at(gate_mass, idx[vi].astype(np.int64).ravel(), weights[vi].ravel())

    if n_valid:
        f = counts / (n_valid * k)
        P = q[vi].mean(axis=0)
        lb_loss = e_active * float((f * P).sum())
        z_loss = float(np.mean(_lse(z, active, valid) ** 2))
    else:
        f = np.zeros(e)
        lb_loss = 0.0
        z_loss = 0.0

    out = {
        "scores": p,
        "indices": idx,
        "weights": weights,
        "counts": counts,
        "offsets": offsets,
        "token_of_row": token_of_row,
        "row_of_slot": row_of_slot,
        "lb_loss": lb_loss,
        "z_loss": z_loss,
        "gate_mass": gate_mass,
        "k": k,
    }
    return out, {"f": f, "q": q}


def _grouped(z, groups):
    """The column slices of the G groups."""
    n = z.shape[1] // groups
    return [slice(g * n, (g + 1) * n) for g in range(groups)]


def forward(
    logits,
    k,
    score="softmax",
    renormalize=False,
    expert_mask=None,
    token_mask=None,
    selection_bias=None,
    groups=1,
):
    """Top-k routing forward in float64 (DESIGN.md 4.2).

    logits [T, E] (already rounded to the element type by the caller); k an int
    in 1..=E' or "all" (= E', the number of active experts; per group with
    groups); score "softmax" or "sigmoid"; expert_mask [E] and token_mask [T]
    with 1 = active / valid; selection_bias [E] (float32), added to the
    selection key only; groups G dividing E (see the module docstring).

    Returns a dict: scores [T, E], indices [T * G, k] uint32, weights
    [T * G, k], counts [E], offsets [E+1], token_of_row [R], row_of_slot
    [T * G, k] (uint32), lb_loss, z_loss (floats), gate_mass [E], and k (the
    resolved int). Invalid tokens get indices / row_of_slot U32_MAX and zero
    scores and weights. Raises ValueError on bad arguments, NonFinite on bad
    logits.
    """
    z, k, active, valid, bias = _check(logits, k, score, expert_mask, token_mask, selection_bias, groups)
    t, e = z.shape
    parts = [_forward(z[:, g], k, score, renormalize, active[g], valid, bias[g])[0] for g in _grouped(z, groups)]
    n = e // groups
    indices = np.stack(
        [np.where(part["indices"] == U32_MAX, U32_MAX, part["indices"] + np.uint32(g * n)) for g, part in enumerate(parts)],
        axis=1,
    ).reshape(t * groups, k).astype(np.uint32)
    counts, offsets, token_of_row, row_of_slot = _plan(indices, np.repeat(valid, groups), e)
    return {
        "scores": np.concatenate([part["scores"] for part in parts], axis=1),
        "indices": indices,
        "weights": np.stack([part["weights"] for part in parts], axis=1).reshape(t * groups, k),
        "counts": counts,
        "offsets": offsets,
        "token_of_row": token_of_row,
        "row_of_slot": row_of_slot,
        "lb_loss": float(np.mean([part["lb_loss"] for part in parts])),
        "z_loss": float(np.mean([part["z_loss"] for part in parts])),
        "gate_mass": np.concatenate([part["gate_mass"] for part in parts]),
        "k": k,
    }


def backward(
    logits,
    dweights,
    lb_coef,
    z_coef,
    k,
    score="softmax",
    renormalize=False,
    expert_mask=None,
    token_mask=None,
    selection_bias=None,
    groups=1,
):
    """dZ [T, E] (float64): gradient of
    sum(dweights * weights) + lb_coef * lb_loss + z_coef * z_loss
    w.r.t. logits, with the selection and f fixed; dweights [T * G, k].
    Options as in `forward`. Inactive experts and invalid tokens get exact
    zeros.
    """
    z, k, active, valid, bias = _check(logits, k, score, expert_mask, token_mask, selection_bias, groups)
    t, e = z.shape
    dw = np.asarray(dweights, dtype=np.float64)
    if dw.shape != (t * groups, k):
        raise ValueError(f"dweights: expected shape ({t * groups}, {k}), got {dw.shape}")
    dw = dw.reshape(t, groups, k)
    return np.concatenate(
        [
            _backward(z[:, g], dw[:, i], lb_coef / groups, z_coef / groups, k, score, renormalize, active[g], valid, bias[g])
            for i, g in enumerate(_grouped(z, groups))
        ],
        axis=1,
    ).reshape(t, e)


def _backward(z, dw, lb_coef, z_coef, k, score, renormalize, active, valid, bias):
    """dZ of one ungrouped router on validated arguments."""
    t, e = z.shape
    out, saved = _forward(z, k, score, renormalize, active, valid, bias)
    dz = np.zeros((t, e))
    n_valid = int(valid.sum())
    if n_valid == 0:
        return dz
    p = out["scores"]
    vi = np.flatnonzero(valid)
    idx = out["indices"][vi].astype(np.int64)  # [T', k]
    pv = p[vi]  # [T', E], inactive columns 0
    dwv = dw[vi]

    # dL/dv with v = log u, u the unnormalised scores, term by term.
    h = np.zeros_like(pv)
    if renormalize:
        # w = u / sum(u) over the selected experts: dL/dv_j = w_j (dw_j - <dw, w>).
        wv = out["weights"][vi]
        inner = (dwv * wv).sum(axis=1, keepdims=True)
        np.put_along_axis(h, idx, wv * (dwv - inner), axis=1)
    else:
        g = np.zeros_like(pv)
        np.put_along_axis(g, idx, dwv, axis=1)
        if score == "softmax":
            h += pv * (g - (pv * g).sum(axis=1, keepdims=True))
        else:
            h += pv * g

    # lb term: L = sum_e c_e sum_t q[t, e] with c_e = lb_coef * E' * f_e / T'
    # and q = u / sum_active(u): dL/dv_e = q_e (c_e - <c, q>).
    e_active = int(active.sum())
    c = lb_coef * e_active * saved["f"] / n_valid * active
    q = saved["q"][vi]
    h += q * (c[None, :] - (q * c[None, :]).sum(axis=1, keepdims=True))

    dzv = h if score == "softmax" else h * (1.0 - pv)

    # z-loss: d lse^2 / dz = 2 lse * softmax(z) over active experts.
    za = z[np.ix_(valid, active)]
    lse = _lse(z, active, valid)[:, None]
    soft = np.exp(za - lse)
    dzv[:, active] += z_coef * 2.0 * lse * soft / n_valid

    dzv[:, ~active] = 0.0
    dz[vi] = dzv
    return dz

"""Tests of the float64 scoring reference (DESIGN.md 4.4) and its golden files."""

import itertools
import math
import zlib

import numpy as np
import pytest

import golden
import scoring
import scoring_golden
from gradcheck import central_differences

MIXINGS = scoring.MIXINGS


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# One row, H = 2, D = 1, V = 3, g = [1/4, 3/4]: s0 = [1, 0, -1], s1 = [0, 2, 4].
HAND = dict(
    U=np.array([[[1.0], [2.0]]]),
    G=np.array([[0.0, math.log(3.0)]]),
    X=np.array([[[1.0], [0.0], [-1.0]], [[0.0], [1.0], [2.0]]]),
)
HAND_S = np.array([[0.25, 1.5, 2.75]])
HAND_P = 0.25 * _softmax(np.array([1.0, 0.0, -1.0])) + 0.75 * _softmax(np.array([0.0, 2.0, 4.0]))


def _random(rng, b, h, d, v, shared=False):
    shape = (v, d) if shared else (h, v, d)
    return dict(
        U=rng.normal(size=(b, h, d)), G=rng.normal(size=(b, h)), X=rng.normal(size=shape) * 0.7
    )


# ---------------------------------------------------------------- forward, by hand


def test_mixed_logits_hand_checked():
    np.testing.assert_allclose(scoring.mixed_logits(**HAND), HAND_S, rtol=1e-15)
    np.testing.assert_allclose(scoring.scores(**HAND), HAND_S, rtol=1e-15)
    np.testing.assert_allclose(
        scoring.probabilities(**HAND), _softmax(HAND_S), rtol=1e-14
    )


def test_probabilities_mixing_hand_checked():
    p = scoring.scores(**HAND, mixing="probabilities")
    np.testing.assert_allclose(p, HAND_P[None], rtol=1e-14)
    np.testing.assert_allclose(
        scoring.probabilities(**HAND, mixing="probabilities"), p, rtol=1e-15
    )
    assert p.sum() == pytest.approx(1.0, rel=1e-15)
    # The mixture is not the softmax of the mixed logits.
    assert np.abs(p - _softmax(HAND_S)).max() > 0.01


def test_scale_and_item_bias_hand_checked():
    bias = np.array([0.5, -1.0, 0.0])
    s0 = 2 * np.array([1.0, 0.0, -1.0]) + bias
    s1 = 2 * np.array([0.0, 2.0, 4.0]) + bias
    got = scoring.mixed_logits(**HAND, scale=2.0, item_bias=bias)
    np.testing.assert_allclose(got, [0.25 * s0 + 0.75 * s1], rtol=1e-15)
    got = scoring.scores(**HAND, scale=2.0, item_bias=bias, mixing="probabilities")
    np.testing.assert_allclose(got, [0.25 * _softmax(s0) + 0.75 * _softmax(s1)], rtol=1e-14)


def test_cross_entropy_hand_checked():
    targets = np.array([1], dtype=np.uint32)
    loss, lse = scoring.cross_entropy(targets, **HAND)
    lse_s = math.log(sum(math.exp(x) for x in HAND_S[0]))
    assert lse.shape == (1,) and lse[0] == pytest.approx(lse_s, rel=1e-15)
    assert loss[0] == pytest.approx(lse_s - 1.5, rel=1e-14)
    loss, lse = scoring.cross_entropy(targets, **HAND, mixing="probabilities")
    assert loss[0] == pytest.approx(-math.log(HAND_P[1]), rel=1e-14)
    assert lse.shape == (1, 2)
    np.testing.assert_allclose(
        lse[0], [math.log(math.e + 1 + 1 / math.e), math.log(1 + math.e**2 + math.e**4)], rtol=1e-15
    )


def test_cross_entropy_gradient_hand_checked():
    # Logits mixing: dS = P - onehot, ds_h = g_h dS, dU_h = sum_v ds_h,v X_h,v.
    targets = np.array([2], dtype=np.uint32)
    du, dg, dx, db = scoring.cross_entropy_backward(np.array([1.0]), targets, **HAND)
    d_s = _softmax(HAND_S[0]) - [0, 0, 1]
    np.testing.assert_allclose(db, d_s, atol=1e-15)  # sum_h g_h = 1
    np.testing.assert_allclose(du[0, :, 0], [0.25 * (d_s @ [1, 0, -1]), 0.75 * (d_s @ [0, 1, 2])], atol=1e-15)
    np.testing.assert_allclose(dx[0, :, 0], 0.25 * 1.0 * d_s, atol=1e-15)
    np.testing.assert_allclose(dx[1, :, 0], 0.75 * 2.0 * d_s, atol=1e-15)
    dgate = np.array([d_s @ [1, 0, -1], d_s @ [0, 2, 4]])
    g = np.array([0.25, 0.75])
    np.testing.assert_allclose(dg[0], g * (dgate - g @ dgate), atol=1e-15)


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("shared", [False, True])
def test_one_head_is_plain_softmax_cross_entropy(mixing, shared):
    rng = np.random.default_rng(zlib.crc32(f"h1{mixing}{shared}".encode()))
    args = _random(rng, 4, 1, 5, 9, shared)
    bias = rng.normal(size=9)
    targets = rng.integers(0, 9, 4).astype(np.uint32)
    table = args["X"] if shared else args["X"][0]
    logits = 1.5 * args["U"][:, 0, :] @ table.T + bias
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    loss, _ = scoring.cross_entropy(targets, **args, scale=1.5, item_bias=bias, mixing=mixing)
    np.testing.assert_allclose(loss, -log_p[np.arange(4), targets], rtol=1e-13)
    p = scoring.probabilities(**args, scale=1.5, item_bias=bias, mixing=mixing)
    np.testing.assert_allclose(p, np.exp(log_p), rtol=1e-13)
    # The gate of a single head carries no gradient.
    _, dg, _, _ = scoring.cross_entropy_backward(
        np.ones(4), targets, **args, scale=1.5, item_bias=bias, mixing=mixing
    )
    np.testing.assert_allclose(dg, 0.0, atol=1e-15)


def test_shared_logits_mixing_collapses_to_one_dot_product():
    rng = np.random.default_rng(1)
    args = _random(rng, 3, 4, 6, 11, shared=True)
    bias = rng.normal(size=11)
    g = _softmax(args["G"])
    user = np.einsum("bh,bhd->bd", g, args["U"])
    expect = 0.75 * user @ args["X"].T + bias
    got = scoring.mixed_logits(**args, scale=0.75, item_bias=bias)
    np.testing.assert_allclose(got, expect, rtol=1e-13)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_shared_table_equals_per_head_copies(mixing):
    rng = np.random.default_rng(2)
    args = _random(rng, 3, 3, 4, 7, shared=True)
    copies = dict(args, X=np.stack([args["X"]] * 3))
    opts = dict(scale=1.25, item_bias=rng.normal(size=7), mixing=mixing, excluded=[4])
    np.testing.assert_allclose(scoring.scores(**args, **opts), scoring.scores(**copies, **opts))
    targets = np.array([0, 6, 2], dtype=np.uint32)
    dloss = np.array([1.0, -0.5, 2.0])
    shared = scoring.cross_entropy_backward(dloss, targets, **args, **opts)
    per_head = scoring.cross_entropy_backward(dloss, targets, **copies, **opts)
    assert shared[2].shape == (7, 4) and per_head[2].shape == (3, 7, 4)
    for i in (0, 1, 3):
        np.testing.assert_allclose(shared[i], per_head[i], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(shared[2], per_head[2].sum(0), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- exclusions


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("shared", [False, True])
def test_exclusion_equals_a_smaller_catalog(mixing, shared):
    rng = np.random.default_rng(zlib.crc32(f"excl{mixing}{shared}".encode()))
    v = 8
    args = _random(rng, 3, 2, 3, v, shared)
    bias = rng.normal(size=v)
    excluded = np.array([5, 0, 5, 3, 0], dtype=np.uint32)  # duplicates allowed
    keep = np.array([1, 2, 4, 6, 7])
    small = dict(args, X=args["X"][keep] if shared else args["X"][:, keep])
    opts = dict(scale=0.5, mixing=mixing)
    full = scoring.scores(**args, **opts, item_bias=bias, excluded=excluded)
    reduced = scoring.scores(**small, **opts, item_bias=bias[keep])
    np.testing.assert_allclose(full[:, keep], reduced, rtol=1e-13)
    fill = -np.inf if mixing == "logits" else 0.0
    assert np.all(full[:, [0, 3, 5]] == fill)
    p = scoring.probabilities(**args, **opts, item_bias=bias, excluded=excluded)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-14)
    assert np.all(p[:, [0, 3, 5]] == 0)

    targets = np.array([1, 7, 4], dtype=np.uint32)
    loss, lse = scoring.cross_entropy(targets, **args, **opts, item_bias=bias, excluded=excluded)
    small_targets = np.searchsorted(keep, targets).astype(np.uint32)
    loss_small, lse_small = scoring.cross_entropy(small_targets, **small, **opts, item_bias=bias[keep])
    np.testing.assert_allclose(loss, loss_small, rtol=1e-13)
    np.testing.assert_allclose(lse, lse_small, rtol=1e-13)

    dloss = np.array([0.5, 1.0, -2.0])
    du, dg, dx, db = scoring.cross_entropy_backward(
        dloss, targets, **args, **opts, item_bias=bias, excluded=excluded
    )
    du_s, dg_s, dx_s, db_s = scoring.cross_entropy_backward(
        dloss, small_targets, **small, **opts, item_bias=bias[keep]
    )
    np.testing.assert_allclose(du, du_s, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dg, dg_s, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(db[keep], db_s, rtol=1e-12, atol=1e-15)
    assert np.all(db[[0, 3, 5]] == 0)
    items = (slice(None),) if shared else (slice(None), slice(None))
    np.testing.assert_allclose(dx[items[:-1] + (keep,)], dx_s, rtol=1e-12, atol=1e-15)
    assert np.all(dx[items[:-1] + ([0, 3, 5],)] == 0)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_scores_backward_ignores_ds_at_excluded_items(mixing):
    rng = np.random.default_rng(3)
    args = _random(rng, 2, 2, 3, 6)
    ds = rng.normal(size=(2, 6))
    opts = dict(mixing=mixing, excluded=[1, 4, 4], item_bias=rng.normal(size=6))
    base = scoring.scores_backward(ds, **args, **opts)
    ds[:, [1, 4]] = rng.normal(size=(2, 2)) * 100
    moved = scoring.scores_backward(ds, **args, **opts)
    for a, b in zip(base, moved):
        np.testing.assert_array_equal(a, b)
    assert np.all(base[2][:, [1, 4]] == 0) and np.all(base[3][[1, 4]] == 0)


def test_every_item_excluded():
    rng = np.random.default_rng(4)
    args = _random(rng, 2, 2, 3, 3)
    everything = [2, 1, 0]
    assert np.all(scoring.scores(**args, excluded=everything) == -np.inf)
    assert np.all(scoring.scores(**args, excluded=everything, mixing="probabilities") == 0)
    for mixing in MIXINGS:
        with pytest.raises(ValueError, match="excluded"):
            scoring.cross_entropy(np.array([0, 0], np.uint32), **args, excluded=everything, mixing=mixing)
        # Only ignored rows: zero losses and gradients, -inf log-sum-exps.
        targets = np.array([7, 7], np.uint32)
        loss, lse = scoring.cross_entropy(targets, **args, ignore=7, excluded=everything, mixing=mixing)
        assert np.all(loss == 0) and np.all(lse == -np.inf)
        grads = scoring.cross_entropy_backward(
            np.ones(2), targets, **args, ignore=7, excluded=everything, mixing=mixing
        )
        assert all(np.all(g == 0) for g in grads)
        with pytest.raises(ValueError, match="eligible"):
            scoring.topk(1, **args, excluded=everything, mixing=mixing)


def test_excluded_out_of_range_names_lowest_position():
    with pytest.raises(IndexError, match=r"excluded\[1\] = 3 .* 3 items"):
        scoring.scores(**HAND, excluded=np.array([0, 3, 2, 9], np.uint32))
    with pytest.raises(IndexError, match="excluded"):
        scoring.cross_entropy(np.array([1], np.uint32), **HAND, excluded=[5])


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("ignore", [0, 2, 5, 2**32 - 1])
def test_ignored_rows_have_zero_loss_and_gradient(mixing, ignore):
    rng = np.random.default_rng(zlib.crc32(f"ign{mixing}{ignore}".encode()))
    args = _random(rng, 5, 3, 4, 6)
    excluded = [ignore] if ignore < 6 else None
    targets = np.array([1, ignore, 3, ignore, 4], dtype=np.uint32)
    opts = dict(mixing=mixing, excluded=excluded, ignore=ignore)
    loss, lse = scoring.cross_entropy(targets, **args, **opts)
    assert loss[1] == 0 and loss[3] == 0 and np.all(loss[[0, 2, 4]] > 0)
    assert np.all(np.isfinite(lse))  # every row keeps its lse
    du, dg, dx, db = scoring.cross_entropy_backward(rng.normal(size=5), targets, **args, **opts)
    assert np.all(du[[1, 3]] == 0) and np.all(dg[[1, 3]] == 0)
    assert np.all(du[[0, 2, 4]] != 0)
    # The kept rows alone give the same loss and table gradients.
    kept = [0, 2, 4]
    sub = dict(U=args["U"][kept], G=args["G"][kept], X=args["X"])
    dloss = rng.normal(size=5)
    full = scoring.cross_entropy_backward(dloss, targets, **args, **opts)
    part = scoring.cross_entropy_backward(dloss[kept], targets[kept], **sub, mixing=mixing, excluded=excluded)
    np.testing.assert_allclose(full[2], part[2], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(full[3], part[3], rtol=1e-12, atol=1e-15)


def test_target_errors():
    t = lambda *ids: np.array(ids, dtype=np.uint32)  # noqa: E731
    with pytest.raises(IndexError, match=r"targets\[1\] = 3 .* 3 items"):
        scoring.cross_entropy(t(0, 3, 9), **_batch3())
    # ignore is checked before the range check.
    loss, _ = scoring.cross_entropy(t(0, 3, 3), **_batch3(), ignore=3)
    assert loss[1:].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"targets\[0\] = 2 is an excluded"):
        scoring.cross_entropy(t(2, 1, 0), **_batch3(), excluded=[2, 2])
    # The first offending row wins, whatever the kind.
    with pytest.raises(ValueError, match=r"targets\[1\]"):
        scoring.cross_entropy(t(0, 2, 7), **_batch3(), excluded=[2])
    with pytest.raises(IndexError, match=r"targets\[1\]"):
        scoring.cross_entropy(t(0, 7, 2), **_batch3(), excluded=[2])
    with pytest.raises(IndexError):
        scoring.cross_entropy_backward(np.ones(3), t(0, 7, 2), **_batch3())
    with pytest.raises(ValueError, match="targets"):
        scoring.cross_entropy(t(0, 1), **_batch3())
    with pytest.raises(ValueError, match="dloss"):
        scoring.cross_entropy_backward(np.ones(2), t(0, 1, 2), **_batch3())


def _batch3():
    rng = np.random.default_rng(5)
    return _random(rng, 3, 2, 2, 3)


# ---------------------------------------------------------------- large logits


@pytest.mark.parametrize("mixing", MIXINGS)
def test_large_logits_are_stable(mixing):
    rng = np.random.default_rng(zlib.crc32(f"large{mixing}".encode()))
    args = _random(rng, 4, 3, 8, 20)
    targets = rng.integers(0, 20, 4).astype(np.uint32)
    loss, lse = scoring.cross_entropy(targets, **args, scale=1e3, mixing=mixing)
    assert np.all(np.isfinite(loss)) and np.all(loss >= 0) and np.all(np.isfinite(lse))
    assert loss.max() > 100  # far beyond what exp() of the raw logits survives
    grads = scoring.cross_entropy_backward(np.ones(4), targets, **args, scale=1e3, mixing=mixing)
    assert all(np.all(np.isfinite(g)) for g in grads)
    p = scoring.probabilities(**args, scale=1e3, mixing=mixing)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-13)
    # A constant shift of every logit changes nothing (sum_h g_h = 1).
    shifted, lse_shifted = scoring.cross_entropy(
        targets, **args, scale=1e3, item_bias=np.full(20, 1e5), mixing=mixing
    )
    np.testing.assert_allclose(shifted, loss, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(lse_shifted, lse + 1e5, rtol=1e-12)


def test_large_logits_loss_by_hand():
    # Logits mixing, H = 1: loss = S_max - S_y + log(1 + tiny) = 2000 exactly in float64.
    args = dict(U=np.array([[[1.0]]]), G=np.zeros((1, 1)), X=np.array([[[1.0], [-1.0]]]))
    loss, _ = scoring.cross_entropy(np.array([1], np.uint32), **args, scale=1e3)
    assert loss[0] == 2000.0
    loss, _ = scoring.cross_entropy(np.array([1], np.uint32), **args, scale=1e3, mixing="probabilities")
    assert loss[0] == 2000.0


# ---------------------------------------------------------------- top-k


def test_topk_ties_to_lower_id_and_nan_last():
    args = dict(U=np.ones((1, 1, 1)), G=np.zeros((1, 1)), X=np.zeros((1, 7, 1)))
    bias = np.array([1.0, np.nan, -np.inf, 2.0, 1.0, np.nan, -0.0])
    ids, values = scoring.topk(7, **args, item_bias=bias)
    assert ids.dtype == np.uint32
    assert ids.tolist() == [[3, 0, 4, 6, 2, 1, 5]]
    np.testing.assert_array_equal(values, [[2.0, 1.0, 1.0, 0.0, -np.inf, np.nan, np.nan]])
    # -0 ties with +0.
    bias = np.array([0.0, -0.0, 0.0, -0.0])
    args["X"] = np.zeros((1, 4, 1))
    assert scoring.topk(4, **args, item_bias=bias)[0].tolist() == [[0, 1, 2, 3]]
    bias = np.array([-0.0, 0.0, -1.0, -0.0])
    assert scoring.topk(3, **args, item_bias=bias)[0].tolist() == [[0, 1, 3]]


def test_topk_skips_excluded_and_history():
    # Scores 0..9 ascending in the id, two rows.
    args = dict(U=np.ones((2, 1, 1)), G=np.zeros((2, 1)), X=np.arange(10.0).reshape(1, 10, 1))
    offsets = np.array([0, 3, 3], dtype=np.uint32)
    history = np.array([8, 6, 8], dtype=np.uint32)
    ids, values = scoring.topk(
        3, **args, excluded=[9, 7, 9], history_offsets=offsets, history_ids=history
    )
    assert ids.tolist() == [[5, 4, 3], [8, 6, 5]]
    np.testing.assert_array_equal(values, [[5, 4, 3], [8, 6, 5]])
    # Exactly enough eligible items, then one too few.
    ids, _ = scoring.topk(5, **args, excluded=[9, 7], history_offsets=offsets, history_ids=history)
    assert ids[0].tolist() == [5, 4, 3, 2, 1]
    with pytest.raises(ValueError, match="row 0 has 6 eligible items"):
        scoring.topk(7, **args, excluded=[9, 7], history_offsets=offsets, history_ids=history)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_topk_is_the_top_of_scores(mixing):
    rng = np.random.default_rng(zlib.crc32(f"topk{mixing}".encode()))
    args = _random(rng, 5, 3, 4, 40)
    opts = dict(mixing=mixing, scale=2.0, item_bias=rng.normal(size=40), excluded=[3, 3, 17])
    offsets = np.array([0, 2, 2, 7, 8, 12], dtype=np.uint32)
    history = rng.integers(0, 40, 12).astype(np.uint32)
    ids, values = scoring.topk(6, **args, **opts, history_offsets=offsets, history_ids=history)
    full = scoring.scores(**args, **opts)
    for row in range(5):
        eligible = np.ones(40, bool)
        eligible[[3, 17]] = False
        eligible[history[offsets[row] : offsets[row + 1]]] = False
        cand = np.flatnonzero(eligible)
        expect = cand[np.argsort(-full[row, cand], kind="stable")[:6]]
        assert ids[row].tolist() == expect.tolist()
        np.testing.assert_array_equal(values[row], full[row, expect])
    # For Probabilities mixing the ranking is by P, not by the mixed logits.
    if mixing == "probabilities":
        ids_p, _ = scoring.topk(6, **args, **opts)
        ids_s, _ = scoring.topk(6, **args, **dict(opts, mixing="logits"))
        assert ids_p.tolist() != ids_s.tolist()


def test_topk_probabilities_differs_from_mixed_logits_by_hand():
    # g = [1/2, 1/2]. Head 0 is confident about item 0, head 1 spreads over
    # items 1 and 2: item 0 has the larger P but the smaller mixed logit.
    args = dict(
        U=np.ones((1, 2, 1)),
        G=np.zeros((1, 2)),
        X=np.array([[[10.0], [0.0], [0.0]], [[-10.0], [5.0], [5.0]]]),
    )
    assert scoring.topk(1, **args)[0].tolist() == [[1]]  # S = [0, 2.5, 2.5]
    ids, values = scoring.topk(2, **args, mixing="probabilities")
    assert ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(values, scoring.scores(**args, mixing="probabilities")[:, [0, 1]])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(n=0), ValueError, "n"),
        (dict(n=2.0), ValueError, "n"),
        (dict(n=True), ValueError, "n"),
        (dict(n=4), ValueError, "eligible"),
        (dict(n=1, history_offsets=[0, 1]), ValueError, "history"),
        (dict(n=1, history_offsets=[0, 2], history_ids=[0]), ValueError, "history offsets"),
        (dict(n=1, history_offsets=[1, 1], history_ids=[0]), ValueError, "history offsets"),
        (dict(n=1, history_offsets=[0], history_ids=[]), ValueError, "history offsets"),
        (dict(n=1, history_offsets=[0, 2], history_ids=[1, 3]), IndexError, r"history ids\[1\] = 3"),
    ],
)
def test_topk_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        scoring.topk(**kwargs, **HAND)


# ---------------------------------------------------------------- sizes and shapes


@pytest.mark.parametrize("mixing", MIXINGS)
@pytest.mark.parametrize("shared", [False, True])
def test_empty_batch(mixing, shared):
    rng = np.random.default_rng(6)
    args = _random(rng, 0, 3, 5, 4, shared)
    opts = dict(mixing=mixing, item_bias=np.ones(4), excluded=[1])
    assert scoring.scores(**args, **opts).shape == (0, 4)
    du, dg, dx, db = scoring.scores_backward(np.zeros((0, 4)), **args, **opts)
    assert du.shape == (0, 3, 5) and dg.shape == (0, 3) and dx.shape == args["X"].shape
    assert not dx.any() and not db.any() and db.shape == (4,)
    empty = np.zeros(0, dtype=np.uint32)
    loss, lse = scoring.cross_entropy(empty, **args, **opts)
    assert loss.shape == (0,) and lse.shape == ((0,) if mixing == "logits" else (0, 3))
    du, dg, dx, db = scoring.cross_entropy_backward(np.zeros(0), empty, **args, **opts)
    assert du.shape == (0, 3, 5) and not dx.any() and not db.any()
    ids, values = scoring.topk(3, **args, **opts, history_offsets=[0], history_ids=empty)
    assert ids.shape == (0, 3) and ids.dtype == np.uint32 and values.shape == (0, 3)


def test_bad_shapes():
    u, g, x = HAND["U"], HAND["G"], HAND["X"]
    with pytest.raises(ValueError, match="U"):
        scoring.scores(u[0], g, x)
    with pytest.raises(ValueError, match="G"):
        scoring.scores(u, g[:, :1], x)
    with pytest.raises(ValueError, match="X: expected 2 heads"):
        scoring.scores(u, g, x[:1])
    with pytest.raises(ValueError, match="X: expected width"):
        scoring.scores(u, g, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="X"):
        scoring.scores(u, g, np.zeros((2, 0, 1)))
    with pytest.raises(ValueError, match="item_bias"):
        scoring.scores(u, g, x, item_bias=np.zeros(2))
    with pytest.raises(ValueError, match="mixing"):
        scoring.scores(u, g, x, mixing="experts")
    with pytest.raises(ValueError, match="dS"):
        scoring.scores_backward(np.zeros((1, 2)), u, g, x)


# ---------------------------------------------------------------- gradients


def _assert_gradients(loss, args, bias, grads):
    """(dU, dG, dX, ditem_bias) against central differences of loss()."""
    arrays = (args["U"], args["G"], args["X"], bias)
    fd = [central_differences(loss, arr) for arr in arrays]
    for name, got, expect in zip(("dU", "dG", "dX", "ditem_bias"), grads, fd):
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-8, err_msg=name)
        assert np.abs(got).max() > 1e-3, name


GRAD_GRID = list(itertools.product(MIXINGS, [False, True], [False, True]))


@pytest.mark.parametrize("mixing,shared,options", GRAD_GRID)
def test_scores_backward_matches_finite_differences(mixing, shared, options):
    rng = np.random.default_rng(zlib.crc32(f"sgrad{mixing}{shared}{options}".encode()))
    b, h, d, v = 3, 3, 2, 5
    args = _random(rng, b, h, d, v, shared)
    bias = rng.normal(size=v)
    opts = dict(mixing=mixing)
    if options:
        opts.update(scale=1.75, excluded=[3, 0, 3])
    ds = rng.normal(size=(b, v))
    eligible = np.ones(v, bool)
    if options:
        eligible[[0, 3]] = False

    def loss():
        return float((ds * scoring.scores(**args, **opts, item_bias=bias))[:, eligible].sum())

    _assert_gradients(loss, args, bias, scoring.scores_backward(ds, **args, **opts, item_bias=bias))


@pytest.mark.parametrize("mixing,shared,options", GRAD_GRID)
def test_cross_entropy_backward_matches_finite_differences(mixing, shared, options):
    rng = np.random.default_rng(zlib.crc32(f"cegrad{mixing}{shared}{options}".encode()))
    b, h, d, v = 4, 3, 2, 5
    args = _random(rng, b, h, d, v, shared)
    bias = rng.normal(size=v)
    targets = np.array([1, 4, 2, 1], dtype=np.uint32)
    opts = dict(mixing=mixing)
    if options:
        targets[2] = 9  # ignored, >= V
        opts.update(scale=0.6, excluded=[3, 0, 3], ignore=9)
    dloss = rng.normal(size=b)

    def loss():
        return float(dloss @ scoring.cross_entropy(targets, **args, **opts, item_bias=bias)[0])

    du, dg, dx, db = scoring.cross_entropy_backward(dloss, targets, **args, **opts, item_bias=bias)
    _assert_gradients(loss, args, bias, (du, dg, dx, db))
    if options:
        assert np.all(du[2] == 0) and np.all(dg[2] == 0)
        assert np.all(db[[0, 3]] == 0)
        assert np.all((dx[[0, 3]] if shared else dx[:, [0, 3]]) == 0)


# ---------------------------------------------------------------- golden files


@pytest.mark.parametrize("case", scoring_golden.CASES, ids=lambda c: c.name)
def test_golden_file_up_to_date(case):
    """The committed file equals what the generator makes now."""
    golden.assert_up_to_date(scoring_golden, case, missing=pytest.fail)


@pytest.mark.parametrize("case", scoring_golden.CASES, ids=lambda c: c.name)
def test_golden_file_matches_reference_from_stored_inputs(case):
    """Re-derive the expected outputs from the stored inputs alone, as the Rust
    tests will, so the file is self-consistent."""
    t, meta = golden.read(golden.case_path(scoring_golden.OUT_DIR, case))
    f64 = lambda name: t[name].astype(np.float64)  # noqa: E731
    ignore = None if meta["ignore"] == "none" else int(meta["ignore"])
    opts = dict(
        scale=float(meta["scale"]),
        mixing=meta["mixing"],
        item_bias=f64("item_bias") if "item_bias" in t else None,
        excluded=t.get("excluded"),
    )
    args = dict(U=f64("U"), G=f64("G"), X=f64("X"))
    assert (args["X"].ndim == 2) == (meta["shared"] == "true")
    f32 = golden.f32

    def check(name, regenerated):  # NumPy's sums: golden.REGENERATION_RTOL
        golden.assert_regenerated(t[name], f32(regenerated), "F32", name)

    check("S", scoring.scores(**args, **opts))
    loss, lse = scoring.cross_entropy(t["targets"], **args, **opts, ignore=ignore)
    check("loss", loss)
    check("lse", lse)
    ce = scoring.cross_entropy_backward(f64("dloss"), t["targets"], **args, **opts, ignore=ignore)
    sc = scoring.scores_backward(f64("dS"), **args, **opts)
    for prefix, grads in (("ce_", ce), ("scores_", sc)):
        for name, grad in zip(("dU", "dG", "dX", "ditem_bias"), grads):
            if prefix + name in t:
                check(prefix + name, grad)
    ids, values = scoring.topk(
        int(meta["n"]),
        **args,
        **opts,
        history_offsets=t.get("history_offsets"),
        history_ids=t.get("history_ids"),
    )
    np.testing.assert_array_equal(t["topk_ids"], ids)
    check("topk_values", values)


def test_golden_files_are_the_generated_cases():
    names = {path.stem for path in scoring_golden.OUT_DIR.glob("*.safetensors")}
    assert names == {case.name for case in scoring_golden.CASES}


def test_golden_cases_cover_the_options():
    cases = scoring_golden.CASES
    assert len({c.name for c in cases}) == len(cases)
    assert {c.dtype for c in cases} == {"f32", "bf16", "f16"}
    assert {(c.mixing, c.shared) for c in cases} == set(itertools.product(MIXINGS, [False, True]))
    assert {1, 2, 4} <= {c.H for c in cases}
    assert {0, 1, 3, 8} <= {c.B for c in cases}
    assert any(c.D % 2 for c in cases) and any(c.D % 2 == 0 for c in cases)
    assert any(c.scale != 1.0 for c in cases) and any(c.bias for c in cases)
    assert any(c.excluded for c in cases) and any(c.history for c in cases)
    assert any(c.ignore is not None and c.ignore >= c.V for c in cases)
    assert any(c.ignore is not None and c.ignore < c.V for c in cases)
    assert {c.inputs for c in cases} >= {"normal", "ties", "large"}
    assert golden.total_bytes(scoring_golden.OUT_DIR) < scoring_golden.MAX_TOTAL_BYTES

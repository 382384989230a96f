"""Tests of the float64 routing reference (DESIGN.md 4.2) and its golden files."""

import itertools
import math
import zlib

import numpy as np
import pytest

import golden
import routing
import routing_golden
from routing import U32_MAX, NonFinite

# ---------------------------------------------------------------- forward, by hand


def test_softmax_topk_hand_checked():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    out = routing.forward(np.log(p)[None, :], 2)
    np.testing.assert_allclose(out["scores"], p[None, :], rtol=1e-12)
    assert out["indices"].tolist() == [[3, 2]]
    assert out["indices"].dtype == np.uint32
    np.testing.assert_allclose(out["weights"], [[0.4, 0.3]], rtol=1e-12)
    out = routing.forward(np.log(p)[None, :], 2, renormalize=True)
    np.testing.assert_allclose(out["weights"], [[4 / 7, 3 / 7]], rtol=1e-12)


def test_sigmoid_hand_checked():
    z = np.array([[0.0, math.log(3.0), -math.log(3.0)]])
    out = routing.forward(z, 2, score="sigmoid")
    np.testing.assert_allclose(out["scores"], [[0.5, 0.75, 0.25]], rtol=1e-12)
    assert out["indices"].tolist() == [[1, 0]]
    np.testing.assert_allclose(out["weights"], [[0.75, 0.5]], rtol=1e-12)
    out = routing.forward(z, 2, score="sigmoid", renormalize=True)
    np.testing.assert_allclose(out["weights"], [[0.6, 0.4]], rtol=1e-12)
    # lb: P = p / sum p = [0.5, 0.75, 0.25] / 1.5; f = [1/2, 1/2, 0]; E' = 3.
    assert out["lb_loss"] == pytest.approx(3 * (0.5 * 0.5 / 1.5 + 0.5 * 0.75 / 1.5))


def test_plan_hand_checked():
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-np.inf, 1.0, -np.inf]])
    out = routing.forward(z, 2)
    assert out["indices"].tolist() == [[2, 1], [0, 1], [1, 0]]
    assert out["counts"].tolist() == [2, 3, 1]
    assert out["offsets"].tolist() == [0, 2, 5, 6]
    assert out["token_of_row"].tolist() == [1, 2, 0, 1, 2, 0]
    assert out["row_of_slot"].tolist() == [[5, 2], [0, 3], [4, 1]]
    w = out["weights"]
    np.testing.assert_allclose(
        out["gate_mass"], [w[1, 0] + w[2, 1], w[0, 1] + w[1, 1] + w[2, 0], w[0, 0]], rtol=1e-12
    )
    assert w[2].tolist() == [1.0, 0.0]  # -inf takes no mass


def test_losses_hand_checked():
    # Perfectly balanced: lb_loss = 1 for either score function.
    for score in ("softmax", "sigmoid"):
        out = routing.forward(np.array([[3.0, 0.0], [0.0, 3.0]]), 1, score=score)
        assert out["lb_loss"] == pytest.approx(1.0, rel=1e-12)
    out = routing.forward(np.array([[0.0, 0.0], [1.0, 1.0]]), 1)
    assert out["z_loss"] == pytest.approx((math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2)
    # All on expert 0: f = [1, 0], P_0 = mean softmax([2, 0])[0].
    z = np.array([[2.0, 0.0], [2.0, 0.0]])
    out = routing.forward(z, 1)
    assert out["lb_loss"] == pytest.approx(2 * 1 / (1 + math.exp(-2)))


def test_dense_kall_is_softmax_and_balanced():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 4))
    out = routing.forward(z, "all")
    assert out["k"] == 4
    ex = np.exp(z - z.max(1, keepdims=True))
    p = ex / ex.sum(1, keepdims=True)
    np.testing.assert_allclose(out["scores"], p, rtol=1e-12)
    np.testing.assert_allclose(np.take_along_axis(p, out["indices"].astype(int), 1), out["weights"])
    assert out["lb_loss"] == pytest.approx(1.0)  # f = 1/E for every expert
    np.testing.assert_allclose(out["gate_mass"], p.sum(0), rtol=1e-12)


def test_softmax_renormalized_is_softmax_over_selected():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(6, 9))
    out = routing.forward(z, 3, renormalize=True)
    sel = np.take_along_axis(z, out["indices"].astype(int), 1)
    ex = np.exp(sel - sel.max(1, keepdims=True))
    np.testing.assert_allclose(out["weights"], ex / ex.sum(1, keepdims=True), rtol=1e-12)


def test_selection_is_topk_of_scores_without_bias():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(20, 7)).astype(np.float32).astype(np.float64)
    for score in ("softmax", "sigmoid"):
        out = routing.forward(z, 3, score=score)
        expect = np.argsort(-out["scores"], axis=1, kind="stable")[:, :3]
        assert out["indices"].tolist() == expect.tolist()


def test_e1():
    z = np.array([[0.5], [-2.0]])
    out = routing.forward(z, "all")
    assert out["indices"].tolist() == [[0], [0]]
    assert out["scores"].tolist() == [[1.0], [1.0]]
    out = routing.forward(z, 1, score="sigmoid", renormalize=True)
    assert out["weights"].tolist() == [[1.0], [1.0]]


# ---------------------------------------------------------------- ties and keys


def test_ties_go_to_lower_index():
    out = routing.forward(np.array([[1.0, 2.0, 2.0, 1.0, 2.0]]), 4)
    assert out["indices"].tolist() == [[1, 2, 4, 0]]


def test_negative_zero_equals_positive_zero():
    for z in ([[-0.0, 0.0, -1.0]], [[0.0, -0.0, -1.0]]):
        assert routing.forward(np.array(z), 2)["indices"].tolist() == [[0, 1]]


def test_bias_changes_selection_not_scores():
    z = np.array([[1.0, 1.5, 0.5]])
    bias = np.array([0.0, 0.0, 2.0], dtype=np.float32)
    plain = routing.forward(z, 1)
    biased = routing.forward(z, 1, selection_bias=bias)
    assert plain["indices"].tolist() == [[1]]
    assert biased["indices"].tolist() == [[2]]
    np.testing.assert_array_equal(plain["scores"], biased["scores"])
    assert biased["weights"][0, 0] == plain["scores"][0, 2]


def test_bias_key_ties():
    # Keys 1.5, 1.5, 1.5: ties to the lower index even though p differs.
    z = np.array([[1.0, 1.5, 0.5]])
    bias = np.array([0.5, 0.0, 1.0], dtype=np.float32)
    assert routing.forward(z, 3, selection_bias=bias)["indices"].tolist() == [[0, 1, 2]]


def test_key_is_summed_in_float32():
    # 2^24 + 1 rounds to 2^24 in f32, tying with expert 0 (float64 would not).
    z = np.array([[2.0**24, 2.0**24]])
    bias = np.array([0.0, 1.0], dtype=np.float32)
    assert routing.forward(z, 1, selection_bias=bias)["indices"].tolist() == [[0]]


def test_neginf_selected_last_by_index():
    z = np.array([[-np.inf, 0.0, -np.inf, -np.inf]])
    bias = np.array([5.0, 0.0, 0.0, 9.0], dtype=np.float32)
    out = routing.forward(z, 3, selection_bias=bias)
    assert out["indices"].tolist() == [[1, 0, 2]]
    assert out["weights"].tolist() == [[1.0, 0.0, 0.0]]


# ---------------------------------------------------------------- masks


def test_expert_mask():
    z = np.array([[5.0, 1.0, np.nan, 0.0], [0.0, 1.0, 2.0, np.inf]])
    mask = np.array([0, 1, 1, 0])
    with pytest.raises(NonFinite) as err:  # the NaN sits in an active column
        routing.forward(z, 1, expert_mask=mask)
    assert (err.value.row, err.value.column) == (0, 2)
    z[0, 2] = 3.0
    out = routing.forward(z, "all", expert_mask=mask)
    assert out["k"] == 2
    assert out["indices"].tolist() == [[2, 1], [2, 1]]
    assert np.all(out["scores"][:, [0, 3]] == 0)
    np.testing.assert_allclose(out["scores"].sum(1), 1.0)
    assert out["counts"].tolist() == [0, 2, 2, 0]
    ref = routing.forward(z[:, 1:3], "all")
    assert out["lb_loss"] == pytest.approx(ref["lb_loss"])
    assert out["z_loss"] == pytest.approx(ref["z_loss"])
    with pytest.raises(ValueError, match="k"):
        routing.forward(z, 3, expert_mask=mask)


def test_token_mask():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(5, 6))
    z[1] = np.nan  # ignored: the token is invalid
    mask = np.array([1, 0, 1, 1, 0])
    out = routing.forward(z, 2, token_mask=mask)
    assert out["indices"][1].tolist() == [U32_MAX, U32_MAX]
    assert out["row_of_slot"][4].tolist() == [U32_MAX, U32_MAX]
    assert np.all(out["weights"][[1, 4]] == 0) and np.all(out["scores"][[1, 4]] == 0)
    assert out["offsets"][-1] == 6 and len(out["token_of_row"]) == 6
    ref = routing.forward(z[mask == 1], 2)
    for name in ("counts", "gate_mass"):
        np.testing.assert_allclose(out[name], ref[name])
    assert out["lb_loss"] == pytest.approx(ref["lb_loss"])
    assert out["z_loss"] == pytest.approx(ref["z_loss"])
    np.testing.assert_array_equal(out["indices"][mask == 1], ref["indices"])


@pytest.mark.parametrize("t", [0, 3])
def test_no_valid_token(t):
    z = np.full((t, 4), np.nan)
    out = routing.forward(z, 2, token_mask=np.zeros(t, dtype=np.uint32))
    assert out["indices"].shape == (t, 2)
    assert out["counts"].tolist() == [0] * 4 and out["offsets"].tolist() == [0] * 5
    assert out["token_of_row"].shape == (0,)
    assert out["lb_loss"] == 0.0 and out["z_loss"] == 0.0
    dz = routing.backward(z, np.ones((t, 2)), 1.0, 1.0, 2, token_mask=np.zeros(t))
    assert dz.shape == (t, 4) and np.all(dz == 0)


def test_plan_invariants_random():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(40, 13))
    tmask = (rng.random(40) < 0.8).astype(np.uint32)
    emask = (rng.random(13) < 0.7).astype(np.uint32)
    out = routing.forward(z, 3, expert_mask=emask, token_mask=tmask)
    idx, offs, tor, ros = out["indices"], out["offsets"], out["token_of_row"], out["row_of_slot"]
    assert offs[-1] == 3 * tmask.sum()
    np.testing.assert_array_equal(np.diff(offs.astype(int)), out["counts"])
    assert np.all(emask[idx[tmask == 1]] == 1)
    for e in range(13):
        rows = tor[offs[e] : offs[e + 1]]
        assert np.all(np.diff(rows.astype(int)) > 0)  # ascending tokens
    for t in np.flatnonzero(tmask):
        for j in range(3):
            r = ros[t, j]
            assert tor[r] == t and offs[idx[t, j]] <= r < offs[idx[t, j] + 1]


# ---------------------------------------------------------------- backward


def _loss(z, dw, lb_coef, z_coef, opts):
    out = routing.forward(z, **opts)
    return (dw * out["weights"]).sum() + lb_coef * out["lb_loss"] + z_coef * out["z_loss"], out


def _separated_logits(rng, t, e, bias):
    """Logits whose keys (z + bias) are >= 0.25 apart in every row, so a 1e-5
    perturbation never flips the selection; a few -inf entries."""
    keys = np.stack([rng.permutation(e) for _ in range(t)]) * 0.25 + rng.normal(0, 0.02, (t, e))
    z = keys - (0.0 if bias is None else bias.astype(np.float64))
    z[0, 0] = -np.inf
    return z


def _assert_finite_differences(z, dw, lb_coef, z_coef, opts, dz):
    """dz equals central differences of the loss at every finite logit, with
    steps too small to change the selection."""
    _, base = _loss(z, dw, lb_coef, z_coef, opts)
    h = 1e-5
    fd = np.zeros_like(z)
    for i, j in np.ndindex(*z.shape):
        if not np.isfinite(z[i, j]):
            continue
        zp, zm = z.copy(), z.copy()
        zp[i, j] += h
        zm[i, j] -= h
        lp, outp = _loss(zp, dw, lb_coef, z_coef, opts)
        lm, outm = _loss(zm, dw, lb_coef, z_coef, opts)
        np.testing.assert_array_equal(outp["indices"], base["indices"])  # selection held
        np.testing.assert_array_equal(outm["indices"], base["indices"])
        fd[i, j] = (lp - lm) / (2 * h)
    np.testing.assert_allclose(dz, fd, atol=1e-7, rtol=1e-6)


OPTION_GRID = list(
    itertools.product(
        ["softmax", "sigmoid"], [False, True], [1, 2, "all"], ["none", "expert", "token", "both"], [False, True]
    )
)


@pytest.mark.parametrize("score,renormalize,k,masks,with_bias", OPTION_GRID)
def test_backward_matches_finite_differences(score, renormalize, k, masks, with_bias):
    rng = np.random.default_rng(zlib.crc32(repr((score, renormalize, k, masks, with_bias)).encode()))
    t, e = 5, 6
    bias = rng.normal(0, 1, e).astype(np.float32) if with_bias else None
    z = _separated_logits(rng, t, e, bias)
    emask = np.array([1, 1, 0, 1, 1, 0]) if masks in ("expert", "both") else None
    tmask = np.array([1, 0, 1, 1, 1]) if masks in ("token", "both") else None
    if emask is not None:
        z[1, 2] = np.nan  # inactive: must be ignored and get a zero gradient
    opts = dict(k=k, score=score, renormalize=renormalize, expert_mask=emask,
                token_mask=tmask, selection_bias=bias)
    k_res = routing.forward(z, **opts)["k"]
    dw = rng.normal(size=(t, k_res))
    lb_coef, z_coef = 0.7, 0.3
    dz = routing.backward(z, dw, lb_coef, z_coef, **opts)
    assert np.all(np.isfinite(dz))

    _assert_finite_differences(z, dw, lb_coef, z_coef, opts, dz)
    if emask is not None:
        assert np.all(dz[:, emask == 0] == 0)
    if tmask is not None:
        assert np.all(dz[tmask == 0] == 0)
    assert np.any(dz != 0)


@pytest.mark.parametrize("term", ["weights", "lb", "z"])
def test_backward_each_term_nonzero(term):
    """Each term of L reaches dZ on its own (guards against a dropped term)."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=(4, 5))
    dw = rng.normal(size=(4, 2)) if term == "weights" else np.zeros((4, 2))
    for score in ("softmax", "sigmoid"):
        dz = routing.backward(z, dw, float(term == "lb"), float(term == "z"), 2, score=score)
        assert np.abs(dz).max() > 1e-3


def test_renormalised_weights_are_exact_ratios_where_the_scores_underflow():
    # The sigmoids of -2000 and -1000 are 0 even in float64; their ratio is e^-1000.
    z = np.array([[-2000.0, -1000.0, -3000.0]])
    out = routing.forward(z, 2, score="sigmoid", renormalize=True)
    assert out["weights"].tolist() == [[1.0, 0.0]]
    dz = routing.backward(z, np.ones((1, 2)), 1.0, 0.0, 2, score="sigmoid", renormalize=True)
    assert np.all(dz == 0)
    for score in ("softmax", "sigmoid"):
        for logit in (-90.0, -104.0, -2000.0):  # a lone renormalised weight is 1
            assert routing.forward(np.array([[logit]]), 1, score=score, renormalize=True)["weights"][0, 0] == 1.0
        # The bias selects two experts whose scores underflow: a softmax over [-800, -801].
        z = np.array([[0.0, -800.0, -801.0]])
        out = routing.forward(z, 2, score=score, renormalize=True, selection_bias=np.float32([0, 900, 900]))
        np.testing.assert_allclose(out["weights"], [[1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))]], rtol=1e-12)


@pytest.mark.parametrize(
    "logits,kwargs,dweights,lb_coef,expected",
    [
        # Issue 14: dividing by a token's subnormal sum of sigmoids gave NaN / -inf.
        ([[5, 0], [-100, -200]], dict(k=1), [[0], [0]], 1.0,
         [[1.4906182315961641e-03, -1.1135898949934156e-01], [0.0, -3.7200759760208366e-44]]),
        ([[5, 0], [-90, -95]], dict(k=1), [[0], [0]], 1.0,
         [[1.4906182315961641e-03, -1.1135898949934156e-01], [6.64805667079025e-3, -6.64805667079015e-3]]),
        ([[-200, -95]], dict(k="all", renormalize=True), [[1, 0]], 0.0, [[-2.5065674758999535e-46, 0.0]]),
    ],
)
def test_sigmoid_gradient_where_the_scores_underflow(logits, kwargs, dweights, lb_coef, expected):
    z = np.array(logits, dtype=np.float64)
    dz = routing.backward(z, np.array(dweights, dtype=np.float64), lb_coef, 0.0, score="sigmoid", **kwargs)
    np.testing.assert_allclose(dz, expected, rtol=1e-9, atol=1e-50)
    # The same far below float64's underflow (e^-800 = 0): a shift of every
    # logit by -700 changes sigmoid ratios by less than e^-89.
    dz = routing.backward(z - 700, np.array(dweights, dtype=np.float64), lb_coef, 0.0, score="sigmoid", **kwargs)
    assert np.all(np.isfinite(dz))


# ---------------------------------------------------------------- groups


def test_grouped_hand_checked():
    z = np.array([[0.0, 1.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    out = routing.forward(z, "all", groups=2)
    assert out["k"] == 2
    assert out["indices"].tolist() == [[1, 0], [2, 3], [0, 1], [2, 3]]
    assert out["token_of_row"].tolist() == [0, 2, 0, 2, 1, 3, 1, 3]
    assert out["row_of_slot"].tolist() == [[2, 0], [4, 6], [1, 3], [5, 7]]
    assert out["weights"][1].tolist() == [0.5, 0.5]
    np.testing.assert_allclose(out["weights"].sum(axis=1), 1.0, rtol=1e-12)
    assert out["lb_loss"] == pytest.approx(1.0)  # k = all: balanced in every group
    lse = [np.log(np.exp(0) + np.exp(1)), 2 + np.log(2), 3 + np.log(1 + np.exp(-3)), np.log(2)]
    assert out["z_loss"] == pytest.approx(np.mean(np.square(lse)))


def test_one_group_is_plain_routing():
    rng = np.random.default_rng(6)
    z = rng.normal(size=(7, 6))
    for k in (2, "all"):
        plain, grouped = routing.forward(z, k), routing.forward(z, k, groups=1)
        for name, value in plain.items():
            np.testing.assert_array_equal(np.asarray(grouped[name]), np.asarray(value))


def test_grouped_load_balance_is_the_mean_over_groups():
    # Group 0 all on its expert 0 (loss 2 * f . P), group 1 balanced (loss 1).
    z = np.array([[2.0, 0.0, 3.0, 0.0], [2.0, 0.0, 0.0, 3.0]])
    out = routing.forward(z, 1, groups=2)
    p0 = 1 / (1 + np.exp(-2.0))
    assert out["lb_loss"] == pytest.approx((2 * p0 + 1.0) / 2)
    assert out["counts"].tolist() == [2, 0, 1, 1]


@pytest.mark.parametrize(
    "score,renormalize,k,masks",
    [("softmax", False, "all", False), ("sigmoid", True, 2, True), ("softmax", True, 1, True), ("sigmoid", False, 1, False)],
)
def test_grouped_backward_matches_finite_differences(score, renormalize, k, masks):
    rng = np.random.default_rng(zlib.crc32(repr((score, renormalize, k, masks)).encode()))
    t, groups, n = 4, 3, 4
    z = np.concatenate([_separated_logits(rng, t, n, None) for _ in range(groups)], axis=1)
    emask = np.array([1, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1]) if masks else None
    tmask = np.array([1, 1, 0, 1]) if masks else None
    opts = dict(k=k, score=score, renormalize=renormalize, expert_mask=emask, token_mask=tmask, groups=groups)
    k_res = routing.forward(z, **opts)["k"]
    dw = rng.normal(size=(t * groups, k_res))
    lb_coef, z_coef = 0.7, 0.3
    dz = routing.backward(z, dw, lb_coef, z_coef, **opts)
    _assert_finite_differences(z, dw, lb_coef, z_coef, opts, dz)
    assert np.any(dz != 0)


def test_grouped_errors():
    z = np.zeros((2, 6))
    for groups in (0, 4, 2.0, True):
        with pytest.raises(ValueError, match="groups"):
            routing.forward(z, 1, groups=groups)
    with pytest.raises(ValueError, match="k"):
        routing.forward(z, 4, groups=2)
    with pytest.raises(ValueError, match="k"):  # groups of 3 and 2 active experts
        routing.forward(z, "all", groups=2, expert_mask=[1, 1, 1, 0, 1, 1])
    assert routing.forward(z, 2, groups=2, expert_mask=[1, 1, 1, 0, 1, 1])["k"] == 2
    with pytest.raises(ValueError, match="dweights"):
        routing.backward(z, np.zeros((2, 1)), 0.0, 0.0, 1, groups=2)
    z[1, 3:] = -np.inf  # token 1's second group: all -inf
    with pytest.raises(NonFinite) as err:
        routing.forward(z, 1, groups=2, expert_mask=[1, 1, 1, 0, 1, 1])
    assert (err.value.row, err.value.column) == (1, 4)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_position_is_lowest_row_major(bad):
    z = np.zeros((3, 4))
    z[2, 0] = bad
    z[1, 3] = bad
    z[1, 2] = -np.inf  # allowed
    with pytest.raises(NonFinite) as err:
        routing.forward(z, 1)
    assert (err.value.row, err.value.column) == (1, 3)
    with pytest.raises(NonFinite):
        routing.backward(z, np.zeros((3, 1)), 0.0, 0.0, 1)


def test_nonfinite_all_neginf_reports_first_active_column():
    z = np.zeros((2, 4))
    z[1] = -np.inf
    with pytest.raises(NonFinite) as err:
        routing.forward(z, 1, expert_mask=[0, 1, 1, 1])
    assert (err.value.row, err.value.column) == (1, 1)
    assert isinstance(err.value, ValueError)


def test_nonfinite_ignored_outside_active_valid():
    z = np.zeros((2, 3))
    z[0, 0] = np.nan
    z[1] = np.inf
    routing.forward(z, 1, expert_mask=[0, 1, 1], token_mask=[1, 0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k"),
        (dict(k=5), "k"),
        (dict(k="top"), "k"),
        (dict(k=True), "k"),
        (dict(k=2.0), "k"),
        (dict(k=1, score="relu"), "score"),
        (dict(k=1, expert_mask=[1, 2, 1, 1]), "expert_mask"),
        (dict(k=1, expert_mask=[1, 1]), "expert_mask"),
        (dict(k="all", expert_mask=[0, 0, 0, 0]), "k"),
        (dict(k=1, token_mask=[1, 1, 1]), "token_mask"),
        (dict(k=1, selection_bias=[0.0, 1.0]), "selection_bias"),
        (dict(k=1, selection_bias=[0.0, np.nan, 0.0, 0.0]), "selection_bias"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        routing.forward(np.zeros((2, 4)), **kwargs)
    assert not isinstance(err.value, NonFinite)


def test_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        routing.forward(np.zeros(4), 1)
    with pytest.raises(ValueError, match="logits"):
        routing.forward(np.zeros((2, 0)), 1)
    with pytest.raises(ValueError, match="dweights"):
        routing.backward(np.zeros((2, 4)), np.zeros((2, 3)), 0.0, 0.0, 2)


# ---------------------------------------------------------------- golden files


@pytest.mark.parametrize("case", routing_golden.CASES, ids=lambda c: c.name)
def test_golden_file_up_to_date(case):
    """The committed file equals what the generator makes now."""
    golden.assert_up_to_date(routing_golden, case, missing=pytest.skip)


def test_golden_cases_cover_the_options():
    cases = routing_golden.CASES
    assert len({c.name for c in cases}) == len(cases)
    assert {c.dtype for c in cases} == {"f32", "bf16", "f16"}
    assert {c.score for c in cases} == {"softmax", "sigmoid"}
    assert any(c.k == "all" for c in cases) and any(c.E == 1 for c in cases)
    assert {0, 1} <= {c.T for c in cases}
    assert any(c.expert_mask and c.token_mask and c.bias != "none" for c in cases)
    assert golden.total_bytes(routing_golden.OUT_DIR) < routing_golden.MAX_TOTAL_BYTES

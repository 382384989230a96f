"""Tests of the float64 experts reference (DESIGN.md 4.3) and its golden files."""

import itertools
import math
import zlib

import numpy as np
import pytest

import experts
import experts_golden
import golden
import routing
from experts import U32_MAX
from gradcheck import central_differences as _fd

ACTS = experts.ACTIVATIONS


def _plan_from_indices(idx, E):
    """A dispatch plan from expert indices [T, k] (rows grouped by expert,
    ascending token), written out independently of routing.py."""
    T, k = idx.shape
    counts = np.array([(idx == e).sum() for e in range(E)], dtype=np.uint32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
    token_of_row, row_of_slot = [], np.full((T, k), U32_MAX, dtype=np.uint32)
    for e in range(E):
        for t in range(T):
            for j in range(k):
                if idx[t, j] == e:
                    row_of_slot[t, j] = len(token_of_row)
                    token_of_row.append(t)
    plan = {"counts": counts, "offsets": offsets, "token_of_row": np.array(token_of_row, dtype=np.uint32)}
    return plan, row_of_slot


def _random_case(seed, T, E, k, Din, Dout, activation, bias=True):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(E)[:k] for _ in range(T)]) if T else np.zeros((0, k), int)
    plan, ros = _plan_from_indices(idx, E)
    width = 2 * Dout if activation == "swiglu" else Dout
    x = rng.normal(size=(T, Din))
    W = rng.normal(0, Din**-0.5, size=(E, Din, width))
    b = rng.normal(0, 0.5, size=(E, width)) if bias else None
    return rng, idx, plan, ros, x, W, b


# ---------------------------------------------------------------- forward, by hand


def test_forward_hand_checked():
    # Token 0 -> experts (1, 0); token 1 -> expert 1; token 2 -> expert 0.
    # Rows: expert 0 has tokens 0, 2; expert 1 has tokens 0, 1.
    plan = {"counts": [2, 2], "offsets": [0, 2, 4], "token_of_row": [0, 2, 0, 1]}
    x = np.array([[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]])
    W = np.array([[[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]], [[2.0, 1.0, 0.0], [1.0, -1.0, 1.0]]])
    b = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    y, h = experts.layer_forward(x, plan, W, b)
    expect = [[1, 2, 1], [0, 1, 0], [3, -1, 2], [4, 4, -1]]
    np.testing.assert_array_equal(h, expect)
    np.testing.assert_array_equal(y, expect)
    y, _ = experts.layer_forward(x, plan, W, b, "relu")
    np.testing.assert_array_equal(y, np.maximum(expect, 0))


def test_activations_hand_checked():
    h = np.array([[-1.0, 0.0, 1.0, 2.0]])
    phi1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # 0.8413447460685429
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    np.testing.assert_allclose(experts.activate(h, "none"), h)
    np.testing.assert_array_equal(experts.activate(h, "relu"), [[0, 0, 1, 2]])
    np.testing.assert_allclose(
        experts.activate(h, "gelu"), [[-(1 - phi1), 0, phi1, 2 * 0.9772498680518208]], rtol=1e-13
    )
    np.testing.assert_allclose(
        experts.activate(h, "silu"), [[-sig(-1), 0, sig(1), 2 * sig(2)]], rtol=1e-13
    )
    # swiglu: halves [a | g], y = silu(a) * g; never interleaved.
    np.testing.assert_allclose(experts.activate(h, "swiglu"), [[-sig(-1) * 1.0, 0.0]], rtol=1e-13)
    h2 = np.array([[2.0, 3.0, 5.0, 7.0]])
    np.testing.assert_allclose(experts.activate(h2, "swiglu"), [[2 * sig(2) * 5, 3 * sig(3) * 7]])


def test_activation_derivatives_hand_checked():
    h = np.array([[-1.0, 0.0, 1.0]])
    dy = np.ones_like(h)
    pdf1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
    phi1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    np.testing.assert_array_equal(experts.activate_backward(dy, h, "relu"), [[0, 0, 1]])
    np.testing.assert_allclose(
        experts.activate_backward(dy, h, "gelu"), [[1 - phi1 - pdf1, 0.5, phi1 + pdf1]], rtol=1e-13
    )
    s = 1 / (1 + math.exp(-1))
    np.testing.assert_allclose(
        experts.activate_backward(dy, h, "silu"),
        [[(1 - s) * (1 - s), 0.5, s * (1 + (1 - s))]],
        rtol=1e-13,
    )


def test_forward_matches_per_row_loop():
    for act, bias in itertools.product(ACTS, [False, True]):
        _, idx, plan, ros, x, W, b = _random_case(7, 9, 5, 2, 7, 5, act, bias)
        y, h = experts.layer_forward(x, plan, W, b, act)
        assert h.shape == (18, W.shape[2]) and y.shape == (18, 5)
        for t, j in np.ndindex(*idx.shape):
            e, r = idx[t, j], ros[t, j]
            hr = x[t] @ W[e] + (b[e] if bias else 0)
            np.testing.assert_allclose(h[r], hr, rtol=1e-13, atol=1e-14)
            np.testing.assert_allclose(y[r], experts.activate(hr[None], act)[0], rtol=1e-13, atol=1e-14)


def test_rows_variant_equals_gathered_tokens():
    for act in ACTS:
        _, _, plan, ros, x, W, b = _random_case(8, 11, 4, 2, 6, 3, act)
        x_rows = x[np.asarray(plan["token_of_row"], dtype=int)]
        y, h = experts.layer_forward(x, plan, W, b, act)
        y2, h2 = experts.layer_forward(x_rows, plan, W, b, act, variant="rows")
        np.testing.assert_array_equal(h, h2)
        np.testing.assert_array_equal(y, y2)
        dy = np.random.default_rng(1).normal(size=y.shape)
        dh, dx, dW, db = experts.layer_backward(dy, h, x, plan, W, ros, act)
        dh2, dx_rows, dW2, db2 = experts.layer_backward(dy, h, x_rows, plan, W, activation=act, variant="rows")
        np.testing.assert_array_equal(dh, dh2)
        np.testing.assert_allclose(dW, dW2, rtol=1e-13)
        np.testing.assert_allclose(db, db2, rtol=1e-13)
        assert dx_rows.shape == x_rows.shape
        # Summing dx_rows back onto tokens gives dx.
        back = np.zeros_like(x)
        np.add.at(back, np.asarray(plan["token_of_row"], dtype=int), dx_rows)
        np.testing.assert_allclose(dx, back, rtol=1e-12, atol=1e-14)


def test_plan_from_routing_accepted():
    rng = np.random.default_rng(3)
    out = routing.forward(rng.normal(size=(10, 6)), 2)
    x, W = rng.normal(size=(10, 4)), rng.normal(size=(6, 4, 3))
    y, h = experts.layer_forward(x, out, W, activation="gelu")
    tor = out["token_of_row"].astype(int)
    e_of_row = np.repeat(np.arange(6), out["counts"].astype(int))
    np.testing.assert_allclose(h, np.einsum("rd,rdo->ro", x[tor], W[e_of_row]), rtol=1e-12)
    experts.layer_backward(np.ones_like(y), h, x, out, W, out["row_of_slot"], "gelu")


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("act,variant,bias", list(itertools.product(ACTS, experts.VARIANTS, [False, True])))
def test_layer_backward_matches_finite_differences(act, variant, bias):
    seed = zlib.crc32(repr((act, variant, bias)).encode())
    rng, _, plan, ros, x, W, b = _random_case(seed, 6, 4, 2, 5, 3, act, bias)
    if variant == "rows":
        x = rng.normal(size=(12, 5))
    b_used = b if bias else np.zeros((4, W.shape[2]))
    y, h = experts.layer_forward(x, plan, W, b_used, act, variant)
    if act == "relu":
        assert np.abs(h).min() > 1e-3  # no kink within reach of eps
    dy = rng.normal(size=y.shape)
    dh, dx, dW, db = experts.layer_backward(dy, h, x, plan, W, ros, act, variant)

    loss = lambda: (dy * experts.layer_forward(x, plan, W, b_used, act, variant)[0]).sum()  # noqa: E731
    np.testing.assert_allclose(dx, _fd(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dW, _fd(loss, W), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, _fd(loss, b_used), rtol=1e-6, atol=1e-8)
    hh = h.copy()
    np.testing.assert_allclose(dh, _fd(lambda: (dy * experts.activate(hh, act)).sum(), hh), rtol=1e-6, atol=1e-8)
    assert np.abs(dx).max() > 1e-3 and np.abs(dW).max() > 1e-3


def test_backward_uses_the_given_h():
    # Saved holds h in the input type: act' is taken at the h passed in.
    _, _, plan, ros, x, W, b = _random_case(4, 5, 3, 2, 4, 3, "gelu")
    _, h = experts.layer_forward(x, plan, W, b, "gelu")
    dy = np.ones((10, 3))
    h_bf16 = golden.round_to(h, "bf16")
    dh, *_ = experts.layer_backward(dy, h_bf16, x, plan, W, ros, "gelu")
    np.testing.assert_array_equal(dh, experts.activate_backward(dy, h_bf16, "gelu"))
    assert not np.array_equal(dh, experts.activate_backward(dy, h, "gelu"))


def test_dx_sums_slots_by_hand():
    idx = np.array([[1, 0], [2, 1], [0, 2]])
    plan, ros = _plan_from_indices(idx, 3)
    rng = np.random.default_rng(5)
    x, W = rng.normal(size=(3, 4)), rng.normal(size=(3, 4, 2))
    y, h = experts.layer_forward(x, plan, W)
    dy = rng.normal(size=y.shape)
    dh, dx, dW, db = experts.layer_backward(dy, h, x, plan, W, ros)
    np.testing.assert_array_equal(dh, dy)
    for t in range(3):
        expect = sum(dy[ros[t, j]] @ W[idx[t, j]].T for j in range(2))
        np.testing.assert_allclose(dx[t], expect, rtol=1e-13)
    for e in range(3):
        slots = [(t, j) for t in range(3) for j in range(2) if idx[t, j] == e]
        expect = sum(np.outer(x[t], dy[ros[t, j]]) for t, j in slots)
        np.testing.assert_allclose(dW[e], expect, rtol=1e-13)
        np.testing.assert_allclose(db[e], sum(dy[ros[t, j]] for t, j in slots), rtol=1e-13)


def test_tokens_without_rows_get_zero_dx():
    z = np.random.default_rng(6).normal(size=(5, 4))
    out = routing.forward(z, 2, token_mask=[1, 0, 1, 1, 0])
    x, W = np.ones((5, 3)), np.ones((4, 3, 2))
    y, h = experts.layer_forward(x, out, W, activation="silu")
    _, dx, _, _ = experts.layer_backward(np.ones_like(y), h, x, out, W, out["row_of_slot"], "silu")
    assert np.all(dx[[1, 4]] == 0) and np.all(dx[[0, 2, 3]] != 0)


@pytest.mark.parametrize("act", ACTS)
def test_empty_experts_get_exact_zeros(act):
    idx = np.array([[1], [3], [1], [1]])  # experts 0 and 2 get no rows
    plan, ros = _plan_from_indices(idx, 4)
    assert plan["counts"].tolist() == [0, 3, 0, 1]
    rng = np.random.default_rng(9)
    width = 4 if act == "swiglu" else 2
    x, W, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3, width)), rng.normal(size=(4, width))
    y, h = experts.layer_forward(x, plan, W, b, act)
    dh, dx, dW, db = experts.layer_backward(np.ones_like(y), h, x, plan, W, ros, act)
    for e in (0, 2):
        assert np.all(dW[e] == 0) and np.all(db[e] == 0)
        assert not np.signbit(dW[e]).any()  # +0, not -0
    # One-row expert: dW is the outer product of its row.
    np.testing.assert_allclose(dW[3], np.outer(x[1], dh[3]), rtol=1e-13)
    np.testing.assert_allclose(db[3], dh[3], rtol=1e-13)
    out, util = experts.combine(y, np.ones((4, 1)), ros, plan)
    assert util[0] == 0 and util[2] == 0 and util[1] > 0


def test_all_rows_to_one_expert_is_a_dense_matmul():
    rng = np.random.default_rng(10)
    plan, ros = _plan_from_indices(np.full((6, 1), 2), 4)
    x, W, b = rng.normal(size=(6, 5)), rng.normal(size=(4, 5, 3)), rng.normal(size=(4, 3))
    y, h = experts.layer_forward(x, plan, W, b, "silu")
    np.testing.assert_allclose(h, x @ W[2] + b[2], rtol=1e-13)
    dy = rng.normal(size=y.shape)
    dh, dx, dW, db = experts.layer_backward(dy, h, x, plan, W, ros, "silu")
    np.testing.assert_allclose(dx, dh @ W[2].T, rtol=1e-13)
    np.testing.assert_allclose(dW[2], x.T @ dh, rtol=1e-13)
    assert np.all(dW[[0, 1, 3]] == 0) and np.all(db[[0, 1, 3]] == 0)


def test_e1():
    rng = np.random.default_rng(11)
    out = routing.forward(rng.normal(size=(4, 1)), "all")
    x, W = rng.normal(size=(4, 3)), rng.normal(size=(1, 3, 4))
    y, h = experts.layer_forward(x, out, W, activation="swiglu")
    np.testing.assert_allclose(h, x @ W[0], rtol=1e-13)
    assert y.shape == (4, 2)
    _, dx, dW, _ = experts.layer_backward(np.ones_like(y), h, x, out, W, out["row_of_slot"], "swiglu")
    assert dx.shape == (4, 3) and dW.shape == (1, 3, 4)


def test_empty_batch():
    plan, ros = _plan_from_indices(np.zeros((0, 2), int), 3)
    x, W = np.zeros((0, 4)), np.ones((3, 4, 6))
    y, h = experts.layer_forward(x, plan, W, np.ones((3, 6)), "swiglu")
    assert y.shape == (0, 3) and h.shape == (0, 6)
    dh, dx, dW, db = experts.layer_backward(np.zeros((0, 3)), h, x, plan, W, ros, "swiglu")
    assert dx.shape == (0, 4) and not dW.any() and not db.any()
    out, util = experts.combine(y, np.zeros((0, 2)), ros, plan)
    assert out.shape == (0, 3) and util.tolist() == [0, 0, 0]


# ---------------------------------------------------------------- combine


def test_combine_hand_checked():
    # Two tokens, k = 2; token 1's second slot is empty (its weight ignored).
    plan = {"counts": [2, 1], "offsets": [0, 2, 3], "token_of_row": [0, 1, 0]}
    ros = np.array([[2, 0], [1, U32_MAX]], dtype=np.uint32)
    y = np.array([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0]])
    w = np.array([[0.5, -2.0], [0.25, 99.0]])
    out, util = experts.combine(y, w, ros, plan)
    np.testing.assert_array_equal(out, [[-2.0, 1.0], [0.75, 1.0]])
    # expert 0: rows 0 (|-2| * 1) and 1 (0.25 * 5); expert 1: row 2 (0.5 * 2).
    np.testing.assert_array_equal(util, [2.0 + 1.25, 1.0])
    res = np.array([[1.0, 1.0], [2.0, -2.0]])
    out, _ = experts.combine(y, w, ros, plan, res=res)
    np.testing.assert_array_equal(out, [[-1.0, 2.0], [2.75, -1.0]])
    out, _ = experts.combine(y, w, ros, plan, res=res, rho=np.array([2.0, 0.5]))
    np.testing.assert_array_equal(out, [[0.0, 3.0], [1.75, 0.0]])

    dout = np.array([[1.0, 2.0], [-1.0, 3.0]])
    dy, dw, dres, drho = experts.combine_backward(dout, y, w, ros, res, np.array([2.0, 0.5]))
    np.testing.assert_array_equal(dy, [[-2.0, -4.0], [-0.25, 0.75], [0.5, 1.0]])
    np.testing.assert_array_equal(dw, [[4.0, 1.0], [9.0, 0.0]])
    np.testing.assert_array_equal(dres, [[2.0, 4.0], [-0.5, 1.5]])
    np.testing.assert_array_equal(drho, [3.0, -8.0])
    dy2, dw2, dres2, drho2 = experts.combine_backward(dout, y, w, ros)
    np.testing.assert_array_equal(dy2, dy)
    np.testing.assert_array_equal(dw2, dw)
    assert dres2 is None and drho2 is None
    _, _, dres3, drho3 = experts.combine_backward(dout, y, w, ros, res)
    np.testing.assert_array_equal(dres3, dout)
    assert drho3 is None


@pytest.mark.parametrize("res,rho", [(False, False), (True, False), (True, True)])
def test_combine_backward_matches_finite_differences(res, rho):
    rng = np.random.default_rng(zlib.crc32(repr((res, rho)).encode()))
    z = rng.normal(size=(6, 5))
    out = routing.forward(z, 2, renormalize=True, token_mask=[1, 1, 0, 1, 1, 1])
    ros = out["row_of_slot"]
    y = rng.normal(size=(10, 3))
    w = rng.normal(size=(6, 2))  # any sign; empty slots hold garbage
    r = rng.normal(size=(6, 3)) if res else None
    p = rng.uniform(0.5, 1.5, size=6) if rho else None
    dout = rng.normal(size=(6, 3))
    dy, dw, dres, drho = experts.combine_backward(dout, y, w, ros, r, p)
    loss = lambda: (dout * experts.combine(y, w, ros, out, r, p)[0]).sum()  # noqa: E731
    np.testing.assert_allclose(dy, _fd(loss, y), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(dw, _fd(loss, w), rtol=1e-7, atol=1e-9)
    assert np.all(dw[2] == 0)
    if res:
        np.testing.assert_allclose(dres, _fd(loss, r), rtol=1e-7, atol=1e-9)
    if rho:
        np.testing.assert_allclose(drho, _fd(loss, p), rtol=1e-7, atol=1e-9)


def test_util_matches_weighted_norms():
    rng = np.random.default_rng(12)
    out = routing.forward(rng.normal(size=(9, 5)), 3)
    y = rng.normal(size=(27, 4))
    w = out["weights"]
    _, util = experts.combine(y, w, out["row_of_slot"], out)
    expect = np.zeros(5)
    for t, j in np.ndindex(9, 3):
        e = out["indices"][t, j]
        expect[e] += np.linalg.norm(w[t, j] * y[out["row_of_slot"][t, j]])
    np.testing.assert_allclose(util, expect, rtol=1e-13)


# ---------------------------------------------------------------- errors


def _ok():
    plan = {"counts": [1, 2], "offsets": [0, 1, 3], "token_of_row": [1, 0, 1]}
    ros = np.array([[1, U32_MAX], [0, 2]], dtype=np.uint32)
    return plan, ros, np.zeros((2, 3)), np.zeros((2, 3, 4))


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(counts=[1, 2, 0]), ValueError, "counts"),
        (dict(counts=[1.0, 2.0]), ValueError, "counts"),
        (dict(counts=[-1, 4], offsets=[0, -1, 3]), ValueError, r"counts\[0\]"),
        (dict(offsets=[0, 1]), ValueError, "offsets"),
        (dict(offsets=[1, 2, 4], token_of_row=[0, 1, 1, 0]), ValueError, r"offsets\[0\]"),
        (dict(offsets=[0, 2, 3]), ValueError, r"offsets\[1\]"),
        (dict(token_of_row=[1, 0]), ValueError, "token_of_row"),
        (dict(token_of_row=[1, 0, 2]), IndexError, r"token_of_row\[2\] = 2 .* 2 tokens"),
        (dict(row_of_slot=[[1, 3], [0, 2]]), IndexError, r"row_of_slot\[0, 1\] = 3"),
        (dict(row_of_slot=[[1, 1], [0, 2]]), ValueError, "row 1 by 2"),
        (dict(row_of_slot=[[1, U32_MAX], [0, U32_MAX]]), ValueError, "row 2 by 0"),
        (dict(row_of_slot=[[0, U32_MAX], [1, 2]]), ValueError, r"row_of_slot\[0, 0\]"),
        (dict(row_of_slot=[[1], [0]]), ValueError, "row 2 by 0"),
        (dict(row_of_slot=np.zeros((3, 2))), ValueError, "row_of_slot"),
        (dict(x=np.zeros((2, 4))), ValueError, "x"),
        (dict(x=np.zeros(3)), ValueError, "x"),
        (dict(W=np.zeros((3, 3, 4))), ValueError, "counts"),
        (dict(W=np.zeros((3, 4))), ValueError, "W"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(activation="swiglu", W=np.zeros((2, 3, 5))), ValueError, "swiglu"),
        (dict(variant="gathered"), ValueError, "variant"),
        (dict(bias=np.zeros((2, 3))), ValueError, "bias"),
        (dict(dy=np.zeros((3, 3))), ValueError, "dy"),
        (dict(h=np.zeros((2, 4))), ValueError, "h"),
        (dict(row_of_slot=None), ValueError, "row_of_slot"),
    ],
)
def test_bad_layer_arguments(change, err, match):
    plan, ros, x, W = _ok()
    args = dict(plan, row_of_slot=ros, x=x, W=W, activation="relu", variant="tokens", bias=None)
    args.update(change)
    width = args["W"].shape[-1] if np.ndim(args["W"]) == 3 else 4
    dout = width // 2 if args["activation"] == "swiglu" else width
    args.setdefault("dy", np.zeros((3, dout)))
    args.setdefault("h", np.zeros((3, width)))
    plan = {key: args[key] for key in ("counts", "offsets", "token_of_row")}
    with pytest.raises(err, match=match):
        experts.layer_forward(args["x"], plan, args["W"], args["bias"], args["activation"], args["variant"])
        experts.layer_backward(
            args["dy"], args["h"], args["x"], plan, args["W"], args["row_of_slot"],
            args["activation"], args["variant"],
        )


def test_error_baseline_is_valid():
    plan, ros, x, W = _ok()
    experts.layer_forward(x, plan, W, activation="relu")  # the baseline is valid
    y, h = experts.layer_forward(x, plan, W)
    experts.layer_backward(np.zeros((3, 4)), h, x, plan, W, ros)
    experts.combine(np.zeros((3, 4)), np.zeros((2, 2)), ros, plan, np.zeros((2, 4)), np.ones(2))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(y=np.zeros((4, 4))), "row 3 by 0"),
        (dict(weights=np.zeros((2, 3))), "weights"),
        (dict(res=np.zeros((2, 3))), "res"),
        (dict(rho=np.ones(2)), "rho"),
        (dict(res=np.zeros((2, 4)), rho=np.ones(3)), "rho"),
        (dict(dout=np.zeros((2, 3))), "dout"),
    ],
)
def test_bad_combine_arguments(change, match):
    plan, ros, _, _ = _ok()
    args = dict(y=np.zeros((3, 4)), weights=np.zeros((2, 2)), res=None, rho=None, dout=np.zeros((2, 4)))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        experts.combine(args["y"], args["weights"], ros, plan, args["res"], args["rho"])
        experts.combine_backward(args["dout"], args["y"], args["weights"], ros, args["res"], args["rho"])


# ---------------------------------------------------------------- golden files


@pytest.mark.parametrize("case", experts_golden.CASES, ids=lambda c: c.name)
def test_golden_file_up_to_date(case):
    """The committed file equals what the generator makes now."""
    golden.assert_up_to_date(experts_golden, case, missing=pytest.skip)


@pytest.mark.parametrize("case", experts_golden.CASES, ids=lambda c: c.name)
def test_golden_file_is_consistent(case):
    """Independent checks on the stored tensors: plan shape, the h/y/out
    relations, dtype rounding and the kind of plan the case promises."""
    tensors, metadata = experts_golden.build(case)
    t = {name: golden.values(v) for name, v in tensors.items()}
    E, k, Din, Dout = (int(metadata[key]) for key in ("E", "k", "Din", "Dout"))
    counts, ros = t["counts"].astype(int), t["row_of_slot"]
    R = int(counts.sum())
    width = 2 * Dout if case.activation == "swiglu" else Dout
    x = t["x_rows" if case.variant == "rows" else "x"]
    assert x.shape == ((R if case.variant == "rows" else case.T), Din)
    assert t["W"].shape == (E, Din, width) and t["h"].shape == (R, width)
    assert t["y"].shape == t["dy"].shape == t["dy_combine"].shape == (R, Dout)
    assert ros.shape == t["weights"].shape == (case.T, k)
    assert t["dW"].shape == (E, Din, width)
    assert ("db" in t) == ("bias" in t) == case.bias
    assert ("dres" in t) == ("res" in t) == case.res and ("drho" in t) == case.rho
    for name in ("x", "x_rows", "W", "bias", "res", "h", "y", "out"):
        if name in t:
            np.testing.assert_array_equal(golden.round_to(t[name], case.dtype), t[name], err_msg=name)
    # y = act(h) up to the dtype rounding of both.
    tol = {"f32": 1e-5, "bf16": 3e-2, "f16": 3e-3}[case.dtype]
    act = experts.activate(t["h"].astype(np.float64), case.activation)
    np.testing.assert_allclose(t["y"], act, rtol=tol, atol=tol * max(1.0, np.abs(act).max(initial=0)))
    # Empty experts have exact-zero dW.
    assert np.all(t["dW"][counts == 0] == 0)
    if case.plan == "empty":
        assert counts[[0, E // 2, E - 1]].tolist() == [0, 0, 0]
    if case.plan == "one_row":
        assert counts[0] == 1
    if case.plan == "one_expert":
        assert counts[E // 2] == R == case.T
    if case.plan == "masked":
        empty = ros == U32_MAX
        assert empty.any() and np.all(t["dweights"][empty] == 0)
        assert np.all(t["weights"][empty] == 0.5)
        dead = empty.all(axis=1)
        dx_name = "dx_rows" if case.variant == "rows" else "dx"
        if case.variant == "tokens":
            assert np.all(t[dx_name][dead] == 0)


def test_golden_cases_cover_the_options():
    cases = experts_golden.CASES
    assert len({c.name for c in cases}) == len(cases)
    assert {(c.activation, c.dtype) for c in cases} >= set(itertools.product(ACTS, ("f32", "bf16", "f16")))
    assert {c.variant for c in cases} == set(experts.VARIANTS)
    assert {c.plan for c in cases} == {"routed", "empty", "one_row", "one_expert", "masked"}
    assert {c.E for c in cases} >= {1, 4, 8} and {c.k for c in cases} >= {1, 2, "all"}
    assert {c.T for c in cases} >= {0, 1, 13, 40}
    assert any(c.Din % 2 and c.Dout % 2 for c in cases)
    for flag in ("bias", "res", "rho"):
        assert {getattr(c, flag) for c in cases} == {False, True}


def test_golden_files_are_the_generated_cases_and_small():
    paths = list(experts_golden.OUT_DIR.glob("*.safetensors"))
    if not paths:
        pytest.skip("golden/experts not generated; run python_ref/experts_golden.py")
    assert {p.stem for p in paths} == {c.name for c in experts_golden.CASES}
    assert sum(p.stat().st_size for p in paths) < experts_golden.MAX_TOTAL_BYTES


def test_plan_forms():
    plan, ros, x, W = _ok()
    as_tuple = (plan["counts"], plan["offsets"], plan["token_of_row"])
    np.testing.assert_array_equal(experts.layer_forward(x, as_tuple, W)[1], experts.layer_forward(x, plan, W)[1])
    with pytest.raises(ValueError, match="offsets"):
        experts.layer_forward(x, {"counts": [1, 2], "token_of_row": [1, 0, 1]}, W)
    with pytest.raises(ValueError, match="plan"):
        experts.combine(np.zeros((3, 4)), np.zeros((2, 2)), ros, {"offsets": [0, 1, 3]})
    with pytest.raises(ValueError, match="plan"):
        experts.layer_forward(x, 3, W)

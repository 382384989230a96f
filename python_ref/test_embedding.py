import numpy as np
import pytest

import embedding
import embedding_golden
import golden


def _table(heads, rows, width):
    # Every entry distinct, so a wrong head, row or column shows.
    return np.arange(heads * rows * width, dtype=np.float64).reshape(heads, rows, width) + 1


def test_forward_gathers_per_head_rows():
    table = _table(2, 4, 3)
    y = embedding.forward(table, np.array([3, 0, 3], dtype=np.uint32))
    assert y.shape == (3, 2, 3)
    np.testing.assert_array_equal(y[0, 0], [10, 11, 12])
    np.testing.assert_array_equal(y[0, 1], [22, 23, 24])
    np.testing.assert_array_equal(y[1, 1], [13, 14, 15])
    np.testing.assert_array_equal(y[2], y[0])


@pytest.mark.parametrize("padding", [1, 4, 9, 2**32 - 1])
def test_forward_padding_gives_zero_rows(padding):
    table = _table(2, 4, 3)
    ids = np.array([0, padding, 2, padding], dtype=np.uint32)
    y = embedding.forward(table, ids, padding)
    assert not y[[1, 3]].any()
    np.testing.assert_array_equal(y[2], table[:, 2, :])


def test_forward_padding_below_v_is_only_zero_at_padding():
    table = _table(1, 3, 2)
    y = embedding.forward(table, np.array([1, 2], dtype=np.uint32), padding=2)
    np.testing.assert_array_equal(y[0, 0], table[0, 1])
    assert not y[1].any()


@pytest.mark.parametrize(
    "padding, message",
    [(None, r"ids\[1\] = 7 .* 5 rows"), (7, r"ids\[3\] = 5 .* 5 rows"), (10, r"ids\[1\] = 7")],
)
def test_out_of_range_names_lowest_position(padding, message):
    ids = np.array([0, 7, 4, 5, 9], dtype=np.uint32)
    with pytest.raises(IndexError, match=message):
        embedding.forward(_table(2, 5, 3), ids, padding)
    with pytest.raises(IndexError, match=message):
        embedding.backward(np.zeros((5, 2, 3)), ids, 5, padding)


def test_empty_batch():
    table = _table(3, 4, 2)
    ids = np.zeros(0, dtype=np.uint32)
    assert embedding.forward(table, ids).shape == (0, 3, 2)
    rows, values = embedding.backward(np.zeros((0, 3, 2)), ids, 4)
    assert rows.shape == (0,) and rows.dtype == np.uint32
    assert values.shape == (3, 0, 2)
    assert not embedding.densify(rows, values, 4).any()


def _numeric_gradient(table, ids, dy, padding):
    """dL/dW by central differences of L = sum(dy * forward(W))."""
    grad = np.zeros_like(table)
    step = 1e-3
    for index in np.ndindex(table.shape):
        plus, minus = table.copy(), table.copy()
        plus[index] += step
        minus[index] -= step
        loss_plus = np.sum(dy * embedding.forward(plus, ids, padding))
        loss_minus = np.sum(dy * embedding.forward(minus, ids, padding))
        grad[index] = (loss_plus - loss_minus) / (2 * step)
    return grad


@pytest.mark.parametrize("padding", [None, 2, 6, 2**32 - 1])
def test_backward_matches_finite_differences(padding):
    rng = np.random.default_rng(0)
    heads, rows, width = 2, 6, 3
    table = rng.standard_normal((heads, rows, width))
    ids = np.array([2, 5, 2, 0, 2, 5, 3], dtype=np.uint32)
    if padding == 2**32 - 1:
        ids[[1, 4]] = padding
    dy = rng.standard_normal((len(ids), heads, width))
    grad_rows, values = embedding.backward(dy, ids, rows, padding)
    dense = embedding.densify(grad_rows, values, rows)
    np.testing.assert_allclose(dense, _numeric_gradient(table, ids, dy, padding), atol=1e-8)


@pytest.mark.parametrize("padding", [None, 2, 6, 2**32 - 1])
def test_backward_rows_are_sorted_unique_without_padding(padding):
    ids = np.array([5, 2, 2, 0, 5, 3] + ([] if padding is None else [padding]), dtype=np.uint32)
    rows, _ = embedding.backward(np.ones((len(ids), 1, 1)), ids, 6, padding)
    expected = sorted(set(ids.tolist()) - {padding})
    assert rows.dtype == np.uint32
    np.testing.assert_array_equal(rows, expected)


def test_backward_sums_duplicates():
    ids = np.array([1, 1, 1, 0], dtype=np.uint32)
    dy = np.arange(4 * 2 * 1, dtype=np.float64).reshape(4, 2, 1)
    rows, values = embedding.backward(dy, ids, 2)
    np.testing.assert_array_equal(rows, [0, 1])
    np.testing.assert_array_equal(values[:, 0, 0], [6, 7])
    np.testing.assert_array_equal(values[:, 1, 0], [0 + 2 + 4, 1 + 3 + 5])


def test_backward_sums_in_ascending_token_order():
    # In float64, (1 + 1e16) - 1e16 == 0 but (-1e16 + 1e16) + 1 == 1.
    dy = np.array([1.0, 1e16, -1e16]).reshape(3, 1, 1)
    _, values = embedding.backward(dy, np.zeros(3, dtype=np.uint32), 1)
    assert values[0, 0, 0] == 0.0


def test_backward_all_padding_is_empty():
    rows, values = embedding.backward(np.ones((3, 2, 4)), np.full(3, 1, np.uint32), 3, padding=1)
    assert rows.shape == (0,) and values.shape == (2, 0, 4)


def _sparse_gradient(rng, heads, width):
    rows = np.array([0, 3, 4], dtype=np.uint32)
    return rows, rng.standard_normal((heads, len(rows), width))


def test_sgd_matches_loop():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((2, 6, 3))
    rows, values = _sparse_gradient(rng, 2, 3)
    updated = embedding.sgd(table, rows, values, 0.25)
    expected = table.copy()
    for h in range(2):
        for u, n in enumerate(rows):
            for d in range(3):
                expected[h, n, d] = table[h, n, d] - 0.25 * values[h, u, d]
    np.testing.assert_allclose(updated, expected, rtol=1e-15)
    np.testing.assert_array_equal(updated[:, [1, 2, 5]], table[:, [1, 2, 5]])


def test_adagrad_matches_loop():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((2, 6, 3))
    state = rng.uniform(0.1, 1.0, (2, 6))
    rows, values = _sparse_gradient(rng, 2, 3)
    lr, eps = 0.1, 1e-8
    new_table, new_state = embedding.adagrad(table, state, rows, values, lr, eps)
    expected_table, expected_state = table.copy(), state.copy()
    for h in range(2):
        for u, n in enumerate(rows):
            g = [float(values[h, u, d]) for d in range(3)]
            accumulated = state[h, n] + sum(x * x for x in g) / 3
            expected_state[h, n] = accumulated
            for d in range(3):
                expected_table[h, n, d] = table[h, n, d] - lr * g[d] / (accumulated**0.5 + eps)
    np.testing.assert_allclose(new_state, expected_state, rtol=1e-14)
    np.testing.assert_allclose(new_table, expected_table, rtol=1e-14)
    np.testing.assert_array_equal(new_table[:, [1, 2, 5]], table[:, [1, 2, 5]])
    np.testing.assert_array_equal(new_state[:, [1, 2, 5]], state[:, [1, 2, 5]])
    # Inputs are not modified in place.
    assert not np.shares_memory(new_table, table)


def test_golden_files_are_the_generated_cases():
    names = {path.stem for path in embedding_golden.OUT_DIR.glob("*.safetensors")}
    assert names == {case.name for case in embedding_golden.CASES}


@pytest.mark.parametrize(
    "name", ["bf16_h4_v50_d16_t200_pad3", "f16_h4_v97_d1_t200_pad102", "f32_h4_v50_d16_t0"]
)
def test_golden_file_round_trips(name):
    """Re-read a written file and check it against the reference."""
    case = next(case for case in embedding_golden.CASES if case.name == name)
    tensors, metadata = golden.read(embedding_golden.OUT_DIR / f"{name}.safetensors")
    assert metadata == {
        "dtype": case.dtype,
        "padding": "none" if case.padding is None else str(case.padding),
        "lr": embedding_golden.LR,
        "eps": embedding_golden.EPS,
    }
    stored_types = {"f32": np.float32, "bf16": np.float32, "f16": np.float16}[case.dtype]
    assert tensors["table"].dtype == stored_types and tensors["ids"].dtype == np.uint32
    table = tensors["table"].astype(np.float64)
    ids, padding = tensors["ids"], case.padding
    assert table.shape == (case.heads, case.rows, case.width) and ids.shape == (case.tokens,)
    np.testing.assert_array_equal(golden.round_to(table, case.dtype), table)

    # A gather is exact; the rest comes from NumPy sums, whose last bit is not
    # portable across processors (golden.REGENERATION_RTOL).
    tag = {"f32": "F32", "bf16": "BF16", "f16": "F16"}[case.dtype]
    y = golden.round_to(embedding.forward(table, ids, padding), case.dtype)
    np.testing.assert_array_equal(tensors["y"], y)
    rows, values = embedding.backward(tensors["dy"], ids, case.rows, padding)
    np.testing.assert_array_equal(tensors["grad_rows"], rows)
    golden.assert_regenerated(tensors["grad_values"], values.astype(np.float32), "F32", "grad_values")

    grad = tensors["grad_values"]
    lr, eps = float(metadata["lr"]), float(metadata["eps"])
    sgd_table = embedding.sgd(table, rows, grad, lr)
    golden.assert_regenerated(tensors["sgd_table"], golden.round_to(sgd_table, case.dtype), tag, "sgd_table")
    adagrad_table, state = embedding.adagrad(table, tensors["adagrad_state"], rows, grad, lr, eps)
    golden.assert_regenerated(
        tensors["adagrad_table"], golden.round_to(adagrad_table, case.dtype), tag, "adagrad_table"
    )
    golden.assert_regenerated(tensors["adagrad_state_out"], state.astype(np.float32), "F32", "adagrad_state_out")


def test_golden_files_are_up_to_date():
    """Regenerating every case reproduces the files on disk (integers exactly,
    floats within golden.REGENERATION_RTOL)."""
    for case in embedding_golden.CASES:
        on_disk = golden.case_path(embedding_golden.OUT_DIR, case)
        golden.assert_file_matches(on_disk, *embedding_golden.case_tensors(case))

"""Float64 reference for the per-head multi-embedding lookup (DESIGN 4.1).

Tables `W: [H, V, D]`, ids `[T]`, optional padding id (a zero row in forward,
never a gradient row; it may be >= V, then it is only a sentinel). Backward is
sparse: sorted unique rows `[U]` and values `[H, U, D]`; `densify`, `sgd` and
`adagrad` are the helpers built on it. Callers round inputs to the element
type first (`golden.round_to`); everything here is float64.
"""

import numpy as np

__all__ = ["forward", "backward", "densify", "sgd", "adagrad"]


def _check_ids(ids, num_rows, padding):
    """The ids as int64, after checking them against `num_rows`.

    Raises IndexError naming the lowest offending position, as the library's
    `IndexOutOfRange { position, index, bound }` does.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "ui"):
        raise TypeError(f"ids: expected a 1-D integer array, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    bad = (ids < 0) | (ids >= num_rows)
    if padding is not None:
        bad &= ids != padding
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise IndexError(
            f"ids[{position}] = {ids[position]} is out of range for {num_rows} rows"
        )
    return ids


def forward(table, ids, padding=None):
    """Y[t, h, :] = W[h, ids[t], :]; a padding id gives a zero row. -> [T, H, D]"""
    table = np.asarray(table, dtype=np.float64)
    num_heads, num_rows, width = table.shape
    ids = _check_ids(ids, num_rows, padding)
    is_padding = ids == padding if padding is not None else np.zeros(ids.shape, bool)
    # Padding may be >= V, so it must not reach the gather.
    gathered = table[:, np.where(is_padding, 0, ids), :]  # [H, T, D]
    gathered[:, is_padding, :] = 0.0
    return np.ascontiguousarray(gathered.transpose(1, 0, 2)).reshape(
        len(ids), num_heads, width
    )


def backward(dy, ids, num_rows, padding=None):
    """Sparse gradient of the lookup: (rows [U] uint32, values [H, U, D]).

    rows are the sorted unique ids, padding excluded; values[h, u, :] sums
    dy[t, h, :] over the t with ids[t] == rows[u], in ascending t.
    """
    dy = np.asarray(dy, dtype=np.float64)
    ids = _check_ids(ids, num_rows, padding)
    num_tokens, num_heads, width = dy.shape
    if num_tokens != len(ids):
        raise ValueError(f"dy: expected {len(ids)} token rows, got {num_tokens}")
    kept = ids != padding if padding is not None else np.ones(ids.shape, bool)
    rows = np.unique(ids[kept])
    slot_of_row = {int(n): u for u, n in enumerate(rows)}
    values = np.zeros((num_heads, len(rows), width))
    # An explicit loop fixes the summation order the contract names.
    for t in np.flatnonzero(kept):
        values[:, slot_of_row[int(ids[t])], :] += dy[t]
    return rows.astype(np.uint32), values


def densify(rows, values, num_rows):
    """The sparse gradient as a dense [H, V, D] array (zero off `rows`)."""
    values = np.asarray(values, dtype=np.float64)
    num_heads, _, width = values.shape
    dense = np.zeros((num_heads, num_rows, width))
    dense[:, np.asarray(rows, dtype=np.int64), :] = values
    return dense


def sgd(table, rows, values, lr):
    """New table with W[h, n, :] -= lr * g[h, n, :] for n in rows only."""
    table = np.array(table, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.int64)
    table[:, rows, :] -= lr * np.asarray(values, dtype=np.float64)
    return table


def adagrad(table, state, rows, values, lr, eps):
    """Row-wise Adagrad on `rows` only -> (new table [H, V, D], new state [H, V]).

    A[h, n] += mean_d g^2, then W[h, n, :] -= lr * g / (sqrt(A[h, n]) + eps)
    with the updated A.
    """
    table = np.array(table, dtype=np.float64)
    state = np.array(state, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.int64)
    grad = np.asarray(values, dtype=np.float64)
    state[:, rows] += np.mean(grad * grad, axis=2)
    table[:, rows, :] -= lr * grad / (np.sqrt(state[:, rows])[:, :, None] + eps)
    return table, state

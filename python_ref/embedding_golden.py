"""Writes the golden files for the embedding op: tests/golden/embedding/<case>.safetensors.

Run `python python_ref/embedding_golden.py` from anywhere; the output is
deterministic (each case seeds its own generator from its name, so adding a
case leaves the others' bytes unchanged).

Each file holds the inputs `table` [H, V, D] (case dtype), `ids` [T] U32,
`dy` [T, H, D] F32 and `adagrad_state` [H, V] F32, and the expected outputs
`y` (case dtype), `grad_rows` U32, `grad_values` F32, `sgd_table`,
`adagrad_table` (case dtype) and `adagrad_state_out` F32. Metadata: `dtype`,
`padding` ("none" or the id), `lr`, `eps`. Ids stay below V except padding:
out-of-range ids are tested in Rust.
"""

from dataclasses import dataclass

import numpy as np

import embedding
import golden

OUT_DIR = golden.out_dir("embedding")
LR = "0.1"
EPS = "1e-08"
U32_MAX = 2**32 - 1


@dataclass(frozen=True)
class Case:
    dtype: str
    heads: int
    rows: int  # V
    width: int  # D
    tokens: int  # T
    padding: int | None = None
    # "uniform": ids uniform in [0, V) with ~15% padding when padding is set;
    # "dup3": ids drawn from 3 values; "same": one id; "allpad": only padding.
    ids: str = "uniform"

    @property
    def name(self):
        name = f"{self.dtype}_h{self.heads}_v{self.rows}_d{self.width}_t{self.tokens}"
        if self.padding is not None:
            name += "_padmax" if self.padding == U32_MAX else f"_pad{self.padding}"
        if self.ids != "uniform":
            name += f"_{self.ids}"
        return name


CASES = [
    Case("f32", 1, 97, 16, 200),
    Case("f32", 4, 50, 16, 200, padding=3),
    Case("bf16", 4, 50, 16, 200, padding=3),
    Case("f16", 4, 50, 16, 200, padding=3),
    Case("f32", 1, 10, 1, 17),
    Case("bf16", 3, 97, 5, 200),
    Case("f16", 3, 97, 7, 17, padding=0),
    Case("f32", 3, 10, 33, 17, padding=15),  # padding = V + 5: a sentinel
    Case("bf16", 1, 50, 8, 200, padding=U32_MAX),
    Case("f16", 4, 97, 1, 200, padding=102),
    Case("f32", 3, 50, 7, 200, ids="dup3"),
    Case("bf16", 4, 10, 33, 200, padding=4, ids="dup3"),
    Case("f32", 4, 1, 8, 17, ids="same"),
    Case("f16", 1, 97, 16, 200, ids="same"),
    Case("f32", 4, 10, 16, 17, padding=2, ids="allpad"),
    Case("bf16", 3, 10, 5, 17, padding=U32_MAX, ids="allpad"),
    Case("f32", 4, 50, 16, 0),
    Case("bf16", 1, 10, 1, 0, padding=3),
    Case("f32", 1, 1, 1, 1),
    Case("f16", 3, 10, 8, 1, padding=7),
]


def _ids(case, rng):
    if case.ids == "uniform":
        ids = rng.integers(0, case.rows, case.tokens)
        if case.padding is not None:
            ids[rng.random(case.tokens) < 0.15] = case.padding
    elif case.ids == "dup3":
        values = rng.choice(case.rows, 3, replace=False)
        if case.padding is not None:
            values[0] = case.padding
        ids = rng.choice(values, case.tokens)
    elif case.ids == "same":
        ids = np.full(case.tokens, rng.integers(0, case.rows))
    elif case.ids == "allpad":
        ids = np.full(case.tokens, case.padding)
    else:
        raise ValueError(f"unknown id pattern {case.ids!r}")
    return ids.astype(np.uint32)


def case_tensors(case):
    """(tensors, metadata) of one golden file."""
    rng = golden.case_rng(case.name)
    shape = (case.heads, case.rows, case.width)
    table = golden.round_to(rng.standard_normal(shape), case.dtype)
    ids = _ids(case, rng)
    dy = rng.standard_normal((case.tokens, case.heads, case.width)).astype(np.float32)
    state = rng.uniform(0.1, 1.0, (case.heads, case.rows)).astype(np.float32)
    lr, eps = float(LR), float(EPS)

    y = embedding.forward(table, ids, case.padding)
    rows, values = embedding.backward(dy.astype(np.float64), ids, case.rows, case.padding)
    # The optimizers consume the f32 gradient the op returns, so the expected
    # tables are a function of the stored inputs alone.
    grad = values.astype(np.float32)
    sgd_table = embedding.sgd(table, rows, grad, lr)
    adagrad_table, state_out = embedding.adagrad(
        table, state.astype(np.float64), rows, grad, lr, eps
    )
    tensors = {
        "table": golden.stored(table, case.dtype),
        "ids": ids,
        "dy": dy,
        "y": golden.stored(y, case.dtype),
        "grad_rows": rows,
        "grad_values": grad,
        "adagrad_state": state,
        "sgd_table": golden.stored(sgd_table, case.dtype),
        "adagrad_table": golden.stored(adagrad_table, case.dtype),
        "adagrad_state_out": state_out.astype(np.float32),
    }
    metadata = {
        "dtype": case.dtype,
        "padding": golden.optional(case.padding),
        "lr": LR,
        "eps": EPS,
    }
    return tensors, metadata


def main():
    golden.write_cases(OUT_DIR, CASES, case_tensors)


if __name__ == "__main__":
    main()

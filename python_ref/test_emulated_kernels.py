"""The real kernels (kernels/grouping.cu, embedding.cu, routing.cu) run on the
CPU CUDA emulator (emu/, see emu/README.md), launched as the Rust crate
launches them, against the float64 references and plain NumPy.

Integers (ids, rows, indices, plans, status words) must match exactly, floats
within DESIGN's tolerance. Cases are small (the emulator runs one fiber per
CUDA thread) and seeded; they cycle through the thread schedules (forward,
reverse, random), so a missing barrier shows on one of them. The harness is
built once per source change into target/emu/ with g++, under AddressSanitizer
and UBSan when available; the module is skipped only when g++ is missing.
"""

import importlib.util
import itertools
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import embedding
import golden
import routing

_DRIVER = Path(__file__).resolve().parent.parent / "emu" / "driver.py"
_spec = importlib.util.spec_from_file_location("moerec_emu_driver", _DRIVER)
emu_driver = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = emu_driver
_spec.loader.exec_module(emu_driver)

SCHEDULES = ("forward", "reverse", "random:7")
CLEAN = np.uint64(2**64 - 1)  # STATUS_CLEAN
U32_MAX = 2**32 - 1


@pytest.fixture(scope="module")
def emu():
    if not emu_driver.have_compiler():
        pytest.skip(f"{emu_driver.CXX} not found: the CUDA emulator (emu/) builds the kernels with it")
    emu_driver.build()

    def run(op, inputs, schedule="forward", allow_warnings=()):
        out, stderr = emu_driver.run(op, inputs, schedule)
        warnings = [line for line in stderr.splitlines() if line.startswith("emu: warning")]
        unexpected = [w for w in warnings if not any(p.search(w) for p in allow_warnings)]
        assert not unexpected, "\n".join(unexpected)
        out["warnings"] = warnings
        return out

    return run


def schedule_of(*case):
    return SCHEDULES[zlib.crc32(repr(case).encode()) % len(SCHEDULES)]


def u64(x):
    return np.uint64(x)


def assert_close(name, got, ref, rtol):
    """DESIGN: |a - r| <= rtol * (|r| + max|r|), max over the tensor."""
    got, ref = np.asarray(got, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    if not ref.size:
        return
    bound = rtol * (np.abs(ref) + np.abs(ref).max())
    bad = ~(np.abs(got - ref) <= bound)
    if bad.any():
        i = int(np.argmax(bad))
        raise AssertionError(f"{name}[{i}]: got {got[i]!r}, expected {ref[i]!r} (rtol {rtol}, {bad.sum()} off)")


def assert_error(out, kind, position):
    assert out.get("error_kind") == kind, out.get("error_kind", "no error")
    assert int(out["error_position"][0]) == position, (int(out["error_position"][0]), position)


# ------------------------------------------------------------------ elements
POISON = {"f32": 0x7FC0DEAD, "bf16": 0x7FDE, "f16": 0x7EAD}  # harness alloc_uninit
ELEMENT_BYTES = {"f32": 4, "bf16": 2, "f16": 2}


def to_bits(x, dtype):
    """Values rounded to `dtype` (nearest even), as their bits."""
    if dtype == "f32":
        return np.asarray(x, np.float32).view(np.uint32)
    if dtype == "f16":
        return np.asarray(x, np.float32).astype(np.float16).view(np.uint16)
    return golden.to_bf16_bits(x)


def from_bits(bits, dtype):
    bits = np.asarray(bits)
    if dtype == "f32":
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    if dtype == "f16":
        return bits.astype(np.uint16).view(np.float16).astype(np.float64)
    return golden.from_bf16_bits(bits).astype(np.float64)


def elementwise_rtol(dtype):
    return 1e-5 if dtype == "f32" else 1e-2


def reduction_rtol(dtype):
    return 1e-4 if dtype == "f32" else 1e-2


# ---------------------------------------------------------------- emulator
def test_conversions_round_to_nearest_even(emu):
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.normal(0, 100, 2000), rng.normal(0, 1e-5, 500), rng.normal(0, 3e4, 500),
        [0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 1e-8, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 3.0 * 2.0**-25,
         2.0**-14, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 3.4e38, -3.4e38],
    ]).astype(np.float32)
    # Exact halfway cases for both formats, from random bits.
    bits = rng.integers(0, 2**32, 3000, dtype=np.uint64).astype(np.uint32)
    halfway = np.concatenate([(bits & ~np.uint32(0xFFFF)) | np.uint32(0x8000),
                              (bits & ~np.uint32(0x1FFF)) | np.uint32(0x1000)]).view(np.float32)
    x = np.concatenate([x, halfway[np.isfinite(halfway)]])
    out = emu("selftest", {"case": "convert", "x": x})
    np.testing.assert_array_equal(out["bf16"], golden.to_bf16_bits(x))
    with np.errstate(over="ignore"):  # beyond 65520 rounds to inf, as it should
        np.testing.assert_array_equal(out["f16"], x.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(out["bf16_back"], golden.from_bf16_bits(out["bf16"]))
    np.testing.assert_array_equal(out["f16_back"], out["f16"].view(np.float16).astype(np.float32))
    nan = emu("selftest", {"case": "convert", "x": np.array([np.nan], np.float32)})
    assert nan["bf16"][0] == 0x7FFF and nan["f16"][0] == 0x7FFF  # CUDA's canonical NaN


def test_warp_collectives_follow_cuda_definitions(emu):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 40, 64).astype(np.uint32)
    x[[3, 40]] = 77
    out = emu("selftest", {"case": "warp", "x": x}, schedule="random:3")["out"].reshape(64, 18)
    for t in range(64):
        lane, base = t % 32, t - t % 32
        w = x[base:base + 32]
        group = lambda width: lane - lane % width  # noqa: E731
        xor17 = lane ^ 17
        expected = [
            w[(lane * 7 + 3) % 32],
            w[lane - 3] if lane % 8 >= 3 else w[lane],
            w[lane + 5] if lane % 16 + 5 < 16 else w[lane],
            w[lane] if xor17 >= group(16) + 16 else w[xor17],
            sum(1 << i for i in range(32) if w[i] & 1),
            sum(1 << i for i in range(32) if w[i] % 5 == w[lane] % 5),
            int((w == 12345).any()), int((w < 1000).all()),
            int(w.sum()), int(w.max()), int(w.min()),
            w[lane ^ 2],
            sum(1 << i for i in range(group(8), group(8) + 8) if w[i] & 2),
            int((x & 1).sum()), 1,
            0xFFFFFFFF + 1 if (w // 1000 == w[lane] // 1000).all() else 0,
            w[lane + 1] if lane < 31 else w[lane],
            (w[lane + 1] if lane < 31 else w[lane]) ^ 0xABCD,
        ]
        assert list(out[t]) == [e & 0xFFFFFFFF for e in expected], t


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_missing_barrier_shows_under_every_schedule(emu, schedule):
    expected = np.arange(1, 257) % 256 + 1
    inputs = {"case": "barrier", "threads": np.uint32(256)}
    good = emu("selftest", {**inputs, "with_barrier": np.uint32(1)}, schedule)["out"][:256]
    bad = emu("selftest", {**inputs, "with_barrier": np.uint32(0)}, schedule)["out"][:256]
    np.testing.assert_array_equal(good, expected)
    assert not np.array_equal(bad, expected)


@pytest.mark.parametrize("case, message", [
    ("deadlock", r"deadlock: 63 of 64 threads wait at __syncthreads, 1 have exited"),
    ("bad_mask", r"__shfl_sync with mask 0x00000001, which leaves out the calling lane 1"),
    ("shared_overrun", r"wrote selftest_words\[\] \(dynamic shared memory\) at byte 400, past the 400 bytes"),
])
def test_emulator_reports_misuse(emu, case, message):
    with pytest.raises(emu_driver.EmulatorError, match=message):
        emu("selftest", {"case": case, "words": np.uint32(100)})


def test_sanitizer_catches_global_overrun(emu):
    if not emu_driver.sanitizers_work():
        pytest.skip("built without AddressSanitizer")
    with pytest.raises(emu_driver.EmulatorError, match=r"heap-buffer-overflow[\s\S]*emu_selftest_global_overrun"):
        emu("selftest", {"case": "global_overrun"})


def test_argument_wider_than_parameter_is_read_from_its_first_bytes(emu):
    out = emu("selftest", {"case": "argument", "value": u64(0x1234_5678_0000_0005)},
              allow_warnings=[re.compile("emu_selftest_argument")])
    assert (out["out"][:64] == 5).all()
    assert "parameter is 4 bytes, the launcher pushes 8" in out["warnings"][0]


# ----------------------------------------------------------------- grouping
def grouping_reference(keys, sentinel):
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    kept = sorted_keys != sentinel if sentinel is not None else np.ones(len(keys), bool)
    group_keys, starts = np.unique(sorted_keys[kept], return_index=True)
    return order, sorted_keys, group_keys, np.append(starts, kept.sum())


GROUPING_CASES = [  # (n, key_bound, sentinel, duplicate-heavy)
    (0, 5, 4, False), (1, 1, None, False), (1, 2, 1, False), (7, 8, 7, False), (300, 3, 2, True),
    (2047, 2, None, True), (2048, 9, 8, True), (2049, 257, 256, False), (3000, 2**32, None, False),
    (5000, 70001, 70000, True), (17000, 301, 300, False),
]


@pytest.mark.parametrize("n, key_bound, sentinel, heavy", GROUPING_CASES)
def test_grouping_is_a_stable_sort_by_key(emu, n, key_bound, sentinel, heavy):
    rng = np.random.default_rng(zlib.crc32(repr((n, key_bound)).encode()))
    top = min(key_bound, 2**32 - 1)  # no u32::MAX key: it is the default sentinel
    keys = rng.integers(0, min(top, 5) if heavy else top, n, dtype=np.uint64).astype(np.uint32)
    if sentinel is not None and n:
        keys[rng.random(n) < 0.2] = sentinel  # sentinel entries: no group, sorted last
    inputs = {"keys": keys, "key_bound": u64(key_bound)}
    if sentinel is not None:
        inputs["sentinel"] = np.uint32(sentinel)
    out = emu("grouping", inputs, schedule_of(n, key_bound))
    order, sorted_keys, group_keys, starts = grouping_reference(keys, sentinel)
    np.testing.assert_array_equal(out["order"], order)
    np.testing.assert_array_equal(out["sorted"], sorted_keys)
    assert out["count"][0] == len(group_keys)
    np.testing.assert_array_equal(out["group_keys"], group_keys)
    np.testing.assert_array_equal(out["starts"], starts)


def test_grouping_of_sentinels_only_has_no_group(emu):
    out = emu("grouping", {"keys": np.full(40, 9, np.uint32), "key_bound": u64(10), "sentinel": np.uint32(9)})
    assert out["count"][0] == 0 and list(out["starts"]) == [0]
    np.testing.assert_array_equal(out["order"], np.arange(40))


@pytest.mark.parametrize("n", [1, 2048, 2049, 6000])
def test_scan_is_exclusive(emu, n):
    data = np.random.default_rng(n).integers(0, 1000, n).astype(np.uint32)
    out = emu("scan", {"data": data}, schedule_of("scan", n))
    np.testing.assert_array_equal(out["data"], np.concatenate([[0], np.cumsum(data)[:-1]]).astype(np.uint32))


# ---------------------------------------------------------------- embedding
def embedding_inputs(table_bits, ids, padding, dtype, **extra):
    heads, rows, width = table_bits.shape
    inputs = {"dtype": dtype, "table": table_bits.ravel(), "ids": np.asarray(ids, np.uint32),
              "heads": u64(heads), "num_rows": u64(rows), "width": u64(width), **extra}
    if padding is not None:
        inputs["padding"] = np.uint32(padding)
    return inputs


def random_table(rng, heads, rows, width, dtype):
    values = rng.normal(size=(heads, rows, width))
    return to_bits(values, dtype).reshape(heads, rows, width)


def expected_unit(width, dtype, table_offset, out_offset):
    size = ELEMENT_BYTES[dtype]
    for unit in (16, 8, 4, 2):
        if unit >= size and all(b % unit == 0 for b in (width * size, table_offset * size, out_offset * size)):
            return unit
    return size


def run_forward(emu, table_bits, ids, padding, dtype, schedule, table_offset=0, out_offset=0):
    inputs = embedding_inputs(table_bits, ids, padding, dtype,
                              table_offset=u64(table_offset), out_offset=u64(out_offset))
    return emu("embedding_forward", inputs, schedule)


FORWARD_CASES = [  # (dtype, D, table_offset, out_offset): every copy unit, odd D, misaligned views
    ("f32", 4, 0, 0), ("f32", 8, 0, 0), ("f32", 2, 0, 0), ("f32", 6, 0, 0), ("f32", 1, 0, 0), ("f32", 3, 0, 0),
    ("f32", 4, 1, 0), ("f32", 4, 0, 2), ("bf16", 8, 0, 0), ("bf16", 4, 0, 0), ("bf16", 2, 0, 0), ("bf16", 1, 0, 0),
    ("bf16", 5, 0, 0), ("f16", 7, 0, 0), ("f16", 16, 0, 1), ("f16", 24, 4, 0),
]


@pytest.mark.parametrize("dtype, width, table_offset, out_offset", FORWARD_CASES)
def test_embedding_forward_every_copy_unit(emu, dtype, width, table_offset, out_offset):
    rng = np.random.default_rng(zlib.crc32(repr((dtype, width, table_offset, out_offset)).encode()))
    heads, rows, tokens = 3, 13, 97
    table = random_table(rng, heads, rows, width, dtype)
    ids = rng.integers(0, rows, tokens).astype(np.uint32)
    padding = 5
    ids[rng.random(tokens) < 0.2] = padding
    out = run_forward(emu, table, ids, padding, dtype, schedule_of(dtype, width), table_offset, out_offset)
    assert "error_kind" not in out, out.get("error_message")
    assert out["status"][0] == CLEAN
    assert out["unit"][0] == expected_unit(width, dtype, table_offset, out_offset)
    buffer = out["out_buffer"]
    assert (buffer[:out_offset] == POISON[dtype]).all(), "wrote before the output view"
    got = buffer[out_offset:].reshape(tokens, heads, width)
    expected = np.where((ids == padding)[:, None, None], 0, table[:, ids, :].transpose(1, 0, 2))
    np.testing.assert_array_equal(got, expected)  # a gather is exact
    ref = embedding.forward(from_bits(table, dtype), ids, padding)
    assert_close("y", from_bits(got, dtype), ref, elementwise_rtol(dtype))


@pytest.mark.parametrize("name, ids, padding, rows", [
    ("empty", [], 0, 4), ("one token", [3], None, 4), ("all padding", [2] * 50, 2, 4),
    ("padding >= V", [7, 0, 7, 3, 7], 7, 4), ("padding = u32::MAX", [U32_MAX, 1, U32_MAX], U32_MAX, 4),
    ("duplicate heavy", [1] * 900 + [0] * 300, None, 2),
])
def test_embedding_forward_edges(emu, name, ids, padding, rows):
    rng = np.random.default_rng(3)
    ids = np.asarray(ids, np.uint32)
    table = random_table(rng, 2, rows, 5, "f32")
    out = run_forward(emu, table, ids, padding, "f32", schedule_of(name))
    assert out["status"][0] == CLEAN and "error_kind" not in out
    got = out["out_buffer"].reshape(len(ids), 2, 5)
    ref = embedding.forward(from_bits(table, "f32"), ids, padding)
    np.testing.assert_array_equal(from_bits(got, "f32"), ref)


@pytest.mark.parametrize("ids, padding, position", [
    ([0, 7, 4, 5, 9], None, 1), ([0, 7, 4, 5, 9], 7, 3), ([0, 3, 2] * 400 + [6], 1, 1200),
])
def test_embedding_bad_id_reports_lowest_position(emu, ids, padding, position):
    table = random_table(np.random.default_rng(4), 2, 5, 3, "bf16")
    ids = np.asarray(ids, np.uint32)
    for op in ("embedding_forward", "embedding_backward"):
        inputs = embedding_inputs(table, ids, padding, "bf16", dy=np.zeros(len(ids) * 2 * 3, np.float32))
        out = emu(op, inputs, schedule_of(op, position))
        assert out["status"][0] == position
        assert_error(out, "IndexOutOfRange", position)
        assert out["error_index"][0] == ids[position]
    with pytest.raises(IndexError, match=rf"ids\[{position}\]"):
        embedding.forward(from_bits(table, "bf16"), ids, padding)


# The padding id travels as a u64 so that "no padding" (u64::MAX) equals no id;
# a u32 parameter once made id u32::MAX a silent padding row.
@pytest.mark.parametrize("op", ["embedding_forward", "embedding_backward"])
def test_embedding_id_u32_max_without_padding_is_out_of_range(emu, op):
    table = random_table(np.random.default_rng(5), 1, 4, 2, "f32")
    ids = np.array([1, U32_MAX, 2], np.uint32)
    out = emu(op, embedding_inputs(table, ids, None, "f32", dy=np.ones(6, np.float32)))
    assert_error(out, "IndexOutOfRange", 1)  # as the CPU backend and python_ref say


@pytest.mark.parametrize("op", ["embedding_forward", "embedding_backward"])
def test_embedding_launch_arguments_match_kernel_parameters(emu, op):
    table = random_table(np.random.default_rng(5), 1, 4, 2, "f32")
    emu(op, embedding_inputs(table, [1, 2], 0, "f32", dy=np.ones(4, np.float32)))


BACKWARD_CASES = [  # (T, H, V, D, padding, distribution)
    (0, 2, 5, 3, 1, "uniform"), (1, 1, 3, 1, None, "uniform"), (60, 2, 9, 3, 0, "uniform"),
    (300, 3, 4, 33, None, "duplicates"), (500, 1, 6, 2, 9, "all padding"), (2500, 1, 40, 3, 39, "duplicates"),
    (400, 2, 70000, 5, 80000, "uniform"),  # V + 1 > 2^16: three digit passes; padding >= V
]


@pytest.mark.parametrize("tokens, heads, rows, width, padding, kind", BACKWARD_CASES)
def test_embedding_backward_sums_in_token_order(emu, tokens, heads, rows, width, padding, kind):
    rng = np.random.default_rng(zlib.crc32(repr((tokens, rows, kind)).encode()))
    if kind == "all padding":
        ids = np.full(tokens, padding, np.uint32)
    elif kind == "duplicates":
        ids = rng.integers(0, 3, tokens).astype(np.uint32)
    else:
        ids = rng.integers(0, rows, tokens).astype(np.uint32)
    if padding is not None and kind != "all padding" and tokens:
        ids[rng.random(tokens) < 0.15] = padding
    dy = rng.normal(size=(tokens, heads, width)).astype(np.float32)
    table = np.zeros((heads, rows, width), np.uint32)
    inputs = embedding_inputs(table, ids, padding, "f32", dy=dy.ravel())
    del inputs["table"]
    out = emu("embedding_backward", inputs, schedule_of(tokens, rows, kind))
    assert "error_kind" not in out and out["status"][0] == CLEAN
    ref_rows, ref_values = embedding.backward(dy, ids, rows, padding)
    np.testing.assert_array_equal(out["rows"], ref_rows)
    assert_close("values", out["values"], ref_values, 1e-4)


UPDATE_CASES = [  # (kind, dtype, H, V, D, U)
    ("densify", "f32", 2, 9, 3, 4), ("sgd", "f32", 2, 9, 4, 5), ("sgd", "bf16", 1, 12, 7, 12),
    ("sgd", "f16", 3, 6, 2, 1), ("adagrad", "f32", 2, 11, 70, 6), ("adagrad", "bf16", 3, 8, 1, 5),
    ("adagrad", "f16", 1, 20, 33, 19), ("adagrad", "f32", 1, 5, 32, 0),
]


def run_update(emu, kind, dtype, table, state, rows, values, schedule):
    heads, num_rows, width = table.shape
    inputs = {"kind": kind, "dtype": dtype, "rows": np.asarray(rows, np.uint32), "values": values.ravel(),
              "heads": u64(heads), "num_rows": u64(num_rows), "width": u64(width),
              "lr": np.float32(0.25), "eps": np.float32(1e-3), "table": table.ravel(), "state": state.ravel()}
    return emu("embedding_update", inputs, schedule)


@pytest.mark.parametrize("kind, dtype, heads, num_rows, width, unique", UPDATE_CASES)
def test_embedding_sparse_updates(emu, kind, dtype, heads, num_rows, width, unique):
    rng = np.random.default_rng(zlib.crc32(repr((kind, dtype, width)).encode()))
    table = random_table(rng, heads, num_rows, width, dtype)
    state = rng.random((heads, num_rows)).astype(np.float32)
    rows = np.sort(rng.choice(num_rows, unique, replace=False)).astype(np.uint32)
    values = rng.normal(size=(heads, unique, width)).astype(np.float32)
    out = run_update(emu, kind, dtype, table, state, rows, values, schedule_of(kind, dtype, width))
    assert "error_kind" not in out and out["status"][0] == CLEAN
    w = from_bits(table, dtype)
    if kind == "densify":
        np.testing.assert_array_equal(out["dense"].reshape(w.shape), embedding.densify(rows, values, num_rows))
    elif kind == "sgd":
        got = out["table"].reshape(table.shape)
        assert_close("table", from_bits(got, dtype), embedding.sgd(w, rows, values, 0.25), elementwise_rtol(dtype))
        # The rounding itself: f32 arithmetic, then round to nearest even.
        step = w.astype(np.float32)[:, rows, :] - np.float32(0.25) * values
        expected = table.copy()
        expected[:, rows, :] = to_bits(step, dtype).reshape(step.shape)
        np.testing.assert_array_equal(got, expected)
    else:
        ref_table, ref_state = embedding.adagrad(w, state, rows, values, 0.25, 1e-3)
        assert_close("table", from_bits(out["table"], dtype), ref_table, reduction_rtol(dtype))
        assert_close("state", out["state"], ref_state, 1e-4)


@pytest.mark.parametrize("kind", ["densify", "sgd", "adagrad"])
@pytest.mark.parametrize("rows, position, error", [
    ([1, 3, 3, 6], 2, "InvalidArgument"), ([4, 2, 9], 1, "InvalidArgument"), ([0, 1, 12, 2], 2, "IndexOutOfRange"),
    ([15, 5, 5], 0, "IndexOutOfRange"),
])
def test_embedding_bad_sparse_rows_leave_table_untouched(emu, kind, rows, position, error):
    rng = np.random.default_rng(6)
    table = random_table(rng, 2, 10, 3, "bf16")
    state = rng.random((2, 10)).astype(np.float32)
    values = rng.normal(size=(2, len(rows), 3)).astype(np.float32)
    out = run_update(emu, kind, "bf16", table, state, rows, values, schedule_of(kind, position))
    assert out["status"][0] == position
    assert_error(out, error, position)
    if kind == "densify":
        assert not out["dense"].any()
    else:
        np.testing.assert_array_equal(out["table"], table.ravel())
    if kind == "adagrad":
        np.testing.assert_array_equal(out["state"], state.ravel())


# ------------------------------------------------------------------ routing
def routing_inputs(z_bits, dtype, k, score, renormalize, emask, tmask, bias, dweights, **extra):
    tokens, experts = z_bits.shape
    inputs = {"dtype": dtype, "logits": z_bits.ravel(), "tokens": u64(tokens), "experts": u64(experts),
              "k": u64(0 if k == "all" else k), "score": score, "renormalize": np.uint32(renormalize),
              "dweights": np.asarray(dweights, np.float32).ravel(), "lb_coef": np.float32(0.5),
              "z_coef": np.float32(0.125), **extra}
    for name, value, kind in (("expert_mask", emask, np.uint32), ("token_mask", tmask, np.uint32),
                              ("selection_bias", bias, np.float32)):
        if value is not None:
            inputs[name] = np.asarray(value, kind)
    return inputs


def check_routing(emu, z, k, score="softmax", renormalize=False, emask=None, tmask=None, bias=None, dtype="f32",
                  schedule="forward", seed=0, groups=1, **extra):
    z_bits = to_bits(z, dtype).reshape(z.shape)
    z = from_bits(z_bits, dtype)  # the reference rounds inputs to the element type first
    ref = routing.forward(z, k, score, renormalize, emask, tmask, bias, groups)
    dw = np.random.default_rng(seed).normal(size=(z.shape[0] * groups, ref["k"])).astype(np.float32)
    dz = routing.backward(z, dw, 0.5, 0.125, k, score, renormalize, emask, tmask, bias, groups)
    inputs = routing_inputs(z_bits, dtype, k, score, renormalize, emask, tmask, bias, dw, groups=u64(groups), **extra)
    out = emu("routing", inputs, schedule)
    assert "error_kind" not in out, out.get("error_message")
    assert (out["report"][:2] == CLEAN).all() and out["backward_status"][0] == CLEAN
    tokens, kk = z.shape[0] * groups, ref["k"]
    for name in ("indices", "row_of_slot"):
        np.testing.assert_array_equal(out[name].reshape(tokens, kk), ref[name], err_msg=name)
    for name in ("counts", "offsets", "token_of_row"):
        np.testing.assert_array_equal(out[name], ref[name], err_msg=name)
    assert out["report"][2] == len(ref["token_of_row"])
    rtol = reduction_rtol(dtype)
    assert_close("weights", out["weights"], ref["weights"], rtol)
    assert_close("gate_mass", out["gate_mass"], ref["gate_mass"], rtol)
    assert_close("lb_loss", out["lb_loss"], [ref["lb_loss"]], rtol)
    assert_close("z_loss", out["z_loss"], [ref["z_loss"]], rtol)
    assert_close("dlogits", out["dlogits"], dz, rtol)
    return out


def random_logits(rng, tokens, experts, masked, k):
    z = rng.normal(0, 2, size=(tokens, experts))
    z[rng.random((tokens, experts)) < 0.05] = -np.inf
    z[:, 0] = rng.normal(size=tokens)  # every row keeps a finite logit
    z[rng.random((tokens, experts)) < 0.05] = 0.5  # ties
    emask = tmask = bias = None
    if masked:
        emask = (rng.random(experts) < 0.75).astype(np.uint32)
        emask[0] = 1
        tmask = (rng.random(tokens) < 0.8).astype(np.uint32)
        bias = rng.normal(size=experts).astype(np.float32)
        if k != "all":
            k = min(k, int(emask.sum()))
    return z, k, emask, tmask, bias


# (T, E): one expert, E not a power of two, E < 32 (several groups per warp),
# E > 32 (several experts per lane); k from 1 to all; both scores, with and
# without renormalisation; masks and bias. Every other case (by its hash)
# forces the other selection path, several rows per group and a grid-stride
# backward through the coverage knobs.
ROUTING_CASES = [
    (shape, k, score, renormalize, masked)
    for shape, k, (score, renormalize), masked in itertools.product(
        [(40, 1), (37, 5), (21, 8), (30, 144), (9, 384)], [1, 2, 8, "all"],
        [("softmax", False), ("softmax", True), ("sigmoid", False), ("sigmoid", True)], [False, True])
    if k == "all" or k <= shape[1]
]


def routing_case_id(case):
    (tokens, experts), k, score, renormalize, masked = case
    return f"{tokens}x{experts}-k{k}-{score}" + ("-renorm" if renormalize else "") + ("-masked" if masked else "")


@pytest.mark.parametrize("shape, k, score, renormalize, masked", ROUTING_CASES, ids=map(routing_case_id, ROUTING_CASES))
def test_routing_matches_reference(emu, shape, k, score, renormalize, masked):
    case = (shape, k, score, renormalize, masked)
    seed = zlib.crc32(repr(case).encode())
    z, k, emask, tmask, bias = random_logits(np.random.default_rng(seed), *shape, masked, k)
    forced = seed % 2 == 1
    extra = {}
    if forced:
        extra = {"selection": "rank" if seed % 4 == 1 else "rounds", "forward_blocks": u64(2),
                 "max_backward_blocks": u64(2)}
    out = check_routing(emu, z, k, score, renormalize, emask, tmask, bias, schedule=schedule_of(*case), seed=seed,
                        **extra)
    if forced and shape[0] > out["forward_groups_per_block"][0] * 2:
        assert out["rows_per_group"][0] > 1


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("shape, k", [((33, 6), 2), ((17, 40), 8)])
def test_routing_half_precision_logits(emu, dtype, shape, k):
    rng = np.random.default_rng(zlib.crc32(repr((dtype, shape)).encode()))
    z, k, emask, tmask, bias = random_logits(rng, *shape, True, k)
    check_routing(emu, z, k, "sigmoid", True, emask, tmask, bias, dtype=dtype, schedule=schedule_of(dtype, shape))


@pytest.mark.parametrize("name, tokens, experts, k", [
    ("no tokens", 0, 6, 2), ("one token", 1, 7, 3), ("one expert", 5, 1, "all"), ("k = all, E = 33", 6, 33, "all"),
    ("opt-in shared memory", 3, 2500, 2),
])
def test_routing_edges(emu, name, tokens, experts, k):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    z = rng.normal(size=(tokens, experts))
    out = check_routing(emu, z, k, "softmax", False, schedule=schedule_of(name))
    if name == "opt-in shared memory":
        assert out["forward_shared_bytes"][0] > 48 * 1024


# Grouped routing (FAME's per-head routers): (T, G, N), k per group.
GROUPED_ROUTING_CASES = [
    ((13, 4, 4), "all", "softmax", False), ((11, 3, 6), 2, "sigmoid", True), ((9, 5, 1), 1, "softmax", True),
    ((7, 2, 40), 3, "softmax", True), ((10, 3, 5), "all", "sigmoid", False),
]


@pytest.mark.parametrize("shape, k, score, renormalize", GROUPED_ROUTING_CASES, ids=map(repr, GROUPED_ROUTING_CASES))
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_routing_matches_reference(emu, shape, k, score, renormalize, masked):
    tokens, groups, n = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, k, score, renormalize, masked)).encode()))
    z = rng.normal(0, 2, size=(tokens, groups * n))
    z[rng.random(z.shape) < 0.05] = -np.inf
    z[:, ::n] = rng.normal(size=(tokens, groups))  # every group of every row keeps a finite logit
    emask = tmask = bias = None
    if masked:
        pattern = (rng.random(n) < 0.75).astype(np.uint32)
        pattern[0] = 1
        emask = np.tile(pattern, groups)
        tmask = (rng.random(tokens) < 0.8).astype(np.uint32)
        bias = rng.normal(size=groups * n).astype(np.float32)
        if k != "all":
            k = min(k, int(pattern.sum()))
    check_routing(emu, z, k, score, renormalize, emask, tmask, bias, groups=groups, schedule=schedule_of(*shape))


def test_routing_all_tokens_masked(emu):
    z = np.random.default_rng(8).normal(size=(6, 5))
    z[2, 1] = np.nan  # invalid tokens are not checked
    out = check_routing(emu, z, 2, "softmax", True, tmask=np.zeros(6, np.uint32))
    assert (out["indices"] == U32_MAX).all() and out["report"][2] == 0


def run_routing_error(emu, z, k, emask=None, tmask=None, schedule="forward", **extra):
    dw = np.ones((z.shape[0], k if k != "all" else z.shape[1]), np.float32)
    inputs = routing_inputs(to_bits(z, "f32").reshape(z.shape), "f32", k, "softmax", False, emask, tmask, None, dw,
                            backward="always", **extra)
    return emu("routing", inputs, schedule)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_routing_non_finite_reports_lowest_position(emu, bad):
    z = np.zeros((3, 4))
    z[2, 0] = bad
    z[1, 3] = bad
    z[1, 2] = -np.inf
    for selection in ("rounds", "rank"):
        out = run_routing_error(emu, z, 1, selection=selection, schedule="reverse")
        assert out["report"][0] == 1 * 4 + 3 and out["backward_status"][0] == 1 * 4 + 3
        assert_error(out, "NonFinite", 7)
        assert (out["error_row"][0], out["error_column"][0]) == (1, 3)
    with pytest.raises(routing.NonFinite) as info:
        routing.forward(z, 1)
    assert (info.value.row, info.value.column) == (1, 3)


def test_routing_non_finite_position_with_several_experts_per_lane(emu):
    z = np.random.default_rng(2).normal(size=(4, 70))  # group of 32 lanes: lane 5 owns columns 5, 37, 69
    z[1, 37] = np.nan
    z[1, 69] = np.inf
    z[2, 3] = np.nan
    z[3] = -np.inf
    out = run_routing_error(emu, z, 2, schedule="random:5")
    assert out["report"][0] == 1 * 70 + 37 and out["backward_status"][0] == 1 * 70 + 37
    z[:3] = 0.0
    out = run_routing_error(emu, z, 2, emask=(np.arange(70) >= 40).astype(np.uint32))
    assert out["report"][0] == 3 * 70 + 40  # an all -inf row: its first active column


def test_routing_all_minus_inf_row_reports_first_active_column(emu):
    z = np.zeros((2, 4))
    z[1] = -np.inf
    out = run_routing_error(emu, z, 1, emask=np.array([0, 1, 1, 1]))
    assert out["report"][0] == 1 * 4 + 1 and out["backward_status"][0] == 1 * 4 + 1


def test_routing_bad_token_mask_value(emu):
    z = np.zeros((3, 4))
    z[0, 1] = np.nan
    out = run_routing_error(emu, z, 1, tmask=np.array([1, 1, 7]))
    assert out["report"][1] == 2 and out["report"][0] == 1
    assert_error(out, "InvalidArgument", 2)


def test_routing_masked_out_non_finite_is_ignored(emu):
    z = np.zeros((2, 3))
    z[0, 0] = np.nan
    z[1] = np.inf
    out = run_routing_error(emu, z, 1, emask=np.array([0, 1, 1]), tmask=np.array([1, 0]))
    assert "error_kind" not in out and out["report"][0] == CLEAN
    assert out["indices"].tolist() == [1, U32_MAX]


def test_routing_nan_row_with_rank_selection_is_reported(emu):
    z = np.random.default_rng(1).normal(size=(4, 8))
    z[2, :] = np.nan
    out = run_routing_error(emu, z, 8, selection="rank")
    assert out["report"][0] == 16 and out["backward_status"][0] == 16


# ------------------------------------------------------------- golden files
# The files the Rust tests compare both backends with (tests/golden/), here
# through the kernels, with the Rust tests' tolerances.
def golden_files(op):
    return sorted(golden.out_dir(op).glob("*.safetensors"))


@pytest.mark.parametrize("path", golden_files("embedding"), ids=lambda p: p.stem)
def test_embedding_golden_file(emu, path):
    t, meta = golden.read(path)
    dtype = meta["dtype"]
    padding = None if meta["padding"] == "none" else int(meta["padding"])
    lr, eps = np.float32(float(meta["lr"])), np.float32(float(meta["eps"]))
    table = to_bits(t["table"], dtype).reshape(t["table"].shape)
    heads, rows, width = table.shape
    inputs = embedding_inputs(table, t["ids"], padding, dtype, dy=t["dy"].astype(np.float32).ravel())
    out = emu("embedding_forward", inputs, schedule_of(path.stem))
    np.testing.assert_array_equal(out["out_buffer"], to_bits(t["y"], dtype).ravel())
    out = emu("embedding_backward", inputs)
    np.testing.assert_array_equal(out["rows"], t["grad_rows"])
    assert_close("values", out["values"], t["grad_values"], 1e-4)
    update = {"dtype": dtype, "rows": t["grad_rows"].astype(np.uint32), "values": t["grad_values"].ravel(),
              "heads": u64(heads), "num_rows": u64(rows), "width": u64(width), "lr": lr, "eps": eps,
              "table": table.ravel(), "state": t["adagrad_state"].ravel()}
    out = emu("embedding_update", {**update, "kind": "sgd"})
    assert_close("sgd", from_bits(out["table"], dtype), t["sgd_table"], elementwise_rtol(dtype))
    out = emu("embedding_update", {**update, "kind": "adagrad"}, "reverse")
    assert_close("adagrad", from_bits(out["table"], dtype), t["adagrad_table"], reduction_rtol(dtype))
    assert_close("adagrad state", out["state"], t["adagrad_state_out"], 1e-4)


@pytest.mark.parametrize("path", golden_files("routing"), ids=lambda p: p.stem)
def test_routing_golden_file(emu, path):
    t, meta = golden.read(path)
    dtype = meta["dtype"]
    k = "all" if meta["k_all"] == "true" else int(meta["k"])
    z_bits = to_bits(t["logits"], dtype).reshape(t["logits"].shape)
    inputs = routing_inputs(z_bits, dtype, k, meta["score"], meta["renormalize"] == "true", t.get("expert_mask"),
                            t.get("token_mask"), t.get("selection_bias"), t["dweights"],
                            lb_coef=np.float32(float(meta["lb_coef"])), z_coef=np.float32(float(meta["z_coef"])),
                            groups=u64(int(meta["groups"])))
    out = emu("routing", inputs, schedule_of(path.stem))
    assert "error_kind" not in out, out.get("error_message")
    for name in ("indices", "counts", "offsets", "token_of_row", "row_of_slot"):
        np.testing.assert_array_equal(out[name], t[name].ravel(), err_msg=name)
    for name in ("weights", "gate_mass", "lb_loss", "z_loss", "dlogits"):
        assert_close(name, out[name], t[name], reduction_rtol(dtype))


# ------------------------------------------------------------- determinism
def test_results_do_not_depend_on_the_thread_schedule(emu):
    """DESIGN: bitwise-identical outputs whatever the order threads run in."""
    z, k, emask, tmask, bias = random_logits(np.random.default_rng(9), 50, 12, True, 3)
    dw = np.random.default_rng(10).normal(size=(50, 3))
    inputs = routing_inputs(to_bits(z, "f32").reshape(z.shape), "f32", k, "softmax", True, emask, tmask, bias, dw,
                            forward_blocks=u64(2))
    keys = np.random.default_rng(11).integers(0, 9, 3000).astype(np.uint32)
    runs = [(emu("routing", inputs, s), emu("grouping", {"keys": keys, "key_bound": u64(9)}, s)) for s in SCHEDULES]
    for other in runs[1:]:
        for first, second in zip(runs[0], other):
            for name, value in first.items():
                if name != "warnings":
                    np.testing.assert_array_equal(second[name], value, err_msg=name)

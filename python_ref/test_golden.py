"""The golden-file comparison itself: a regeneration that differs in the last
bits (another processor's BLAS or SIMD sums) passes, a wrong value fails."""

import numpy as np
import pytest

import golden
import scoring_golden

RTOL = golden.REGENERATION_RTOL


def _case_with(tag):
    """A committed scoring case with a float32 output, and that output."""
    case = next(c for c in scoring_golden.CASES if c.B > 0 and c.dtype == tag)
    tensors, metadata = scoring_golden.build(case)
    return case, tensors, metadata


def _write_modified(tmp_path, tensors, metadata, name, change):
    modified = dict(tensors)
    modified[name] = change(np.array(golden.values(tensors[name])))
    path = tmp_path / "case.safetensors"
    golden.write(path, modified, metadata)
    return path


@pytest.mark.parametrize("factor, passes", [(0.5, True), (4.0, False)])
def test_f32_value_off_by_a_multiple_of_the_tolerance(tmp_path, factor, passes):
    _, tensors, metadata = _case_with("f32")

    def nudge(loss):
        # The bound at element 0 is rtol * (|r| + max|r|).
        bound = RTOL["F32"] * (abs(float(loss.flat[0])) + float(np.abs(loss).max()))
        loss.flat[0] = np.float32(loss.flat[0] + factor * bound)
        return loss

    path = _write_modified(tmp_path, tensors, metadata, "loss", nudge)
    if passes:
        golden.assert_file_matches(path, tensors, metadata)
    else:
        with pytest.raises(AssertionError, match="loss"):
            golden.assert_file_matches(path, tensors, metadata)


def test_one_ulp_f32_difference_passes(tmp_path):
    _, tensors, metadata = _case_with("f32")
    path = _write_modified(
        tmp_path, tensors, metadata, "loss", lambda v: np.nextafter(v, np.float32(np.inf))
    )
    golden.assert_file_matches(path, tensors, metadata)


def test_integer_output_must_match_exactly(tmp_path):
    _, tensors, metadata = _case_with("f32")
    path = _write_modified(tmp_path, tensors, metadata, "topk_ids", lambda ids: ids ^ np.uint32(1))
    with pytest.raises(AssertionError, match="topk_ids"):
        golden.assert_file_matches(path, tensors, metadata)


def test_non_finite_values_must_match_exactly():
    committed = np.array([1.0, -np.inf, np.nan], np.float32)
    golden.assert_regenerated(committed, committed.copy(), "F32", "x")
    with pytest.raises(AssertionError, match="non-finite"):
        golden.assert_regenerated(committed, np.array([1.0, np.inf, np.nan], np.float32), "F32", "x")
    with pytest.raises(AssertionError, match="non-finite"):
        golden.assert_regenerated(committed, np.array([1.0, -np.inf, 0.0], np.float32), "F32", "x")


@pytest.mark.parametrize("tag", ["BF16", "F16"])
def test_half_types_allow_one_rounding_flip_not_two(tag):
    # Values near 1: one ulp of the stored type is a rounding that went the
    # other way; three ulps is a wrong value.
    ulp = {"BF16": 2.0**-7, "F16": 2.0**-10}[tag]
    r = np.array([1.0, 1.5, -1.25], np.float32)
    golden.assert_regenerated(r + np.float32(ulp), r, tag, "y")
    with pytest.raises(AssertionError, match="y"):
        golden.assert_regenerated(r + np.float32(3 * ulp), r, tag, "y")

"""Golden-file I/O shared by every reference: a minimal safetensors writer/reader.

safetensors is an 8-byte little-endian header length, a JSON header mapping each
tensor name to {dtype, shape, data_offsets}, then the raw little-endian bytes.
It is written by hand here because NumPy has no bfloat16: a bf16 tensor is held
as its uint16 bit pattern and tagged "BF16" through `Bf16Bits`.

Besides the format, the scaffolding every `<op>_golden.py` generator and its
`test_<op>.py` share: the output folder, the per-case seed, metadata strings,
writing all cases under a size budget, and comparing a file with what the
generator makes now.

Conventions for every golden file (the Rust tests rely on them):
- one file per case, `tests/golden/<op>/<case>.safetensors`;
- scalars and options live in the `__metadata__` map as strings
  (`"none"` for an absent optional);
- float inputs are stored in the op's element type; expected float outputs are
  stored in the type the op returns (input type for forward activations, F32
  for everything else); ids and plans are U32.
"""

import json
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "Bf16Bits",
    "to_bf16_bits",
    "from_bf16_bits",
    "round_to",
    "stored",
    "encode",
    "write",
    "read",
    "GOLDEN_DIR",
    "out_dir",
    "case_rng",
    "f32",
    "flag",
    "optional",
    "case_path",
    "write_cases",
    "total_bytes",
    "values",
    "REGENERATION_RTOL",
    "assert_regenerated",
    "assert_file_matches",
    "assert_up_to_date",
]

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"


class Bf16Bits:
    """A uint16 array holding bfloat16 bit patterns."""

    def __init__(self, bits):
        self.bits = np.ascontiguousarray(bits, dtype=np.uint16)


def to_bf16_bits(x):
    """Round float values to bfloat16 (nearest even) and return their bits."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    rounding = 0x7FFF + ((u >> 16) & 1)
    bits = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    bits[nan] = 0x7FC0
    return bits


def from_bf16_bits(bits):
    """bfloat16 bit patterns to float32 (exact)."""
    u = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16
    return u.view(np.float32)


def round_to(x, dtype):
    """Round to the element type `dtype` ("f32", "bf16", "f16") and return float64."""
    if dtype == "f32":
        return np.asarray(x, dtype=np.float32).astype(np.float64)
    if dtype == "f16":
        return np.asarray(x, dtype=np.float16).astype(np.float64)
    if dtype == "bf16":
        return from_bf16_bits(to_bf16_bits(x)).astype(np.float64)
    raise ValueError(f"unknown dtype {dtype!r}")


def stored(x, dtype):
    """The array to write for values `x` stored in element type `dtype`."""
    if dtype == "f32":
        return np.asarray(x, dtype=np.float32)
    if dtype == "f16":
        return np.asarray(x, dtype=np.float16)
    if dtype == "bf16":
        return Bf16Bits(to_bf16_bits(x))
    raise ValueError(f"unknown dtype {dtype!r}")


_NUMPY_TAGS = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.float16): "F16",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint8): "U8",
}


def _tag_and_bytes(value):
    if isinstance(value, Bf16Bits):
        return "BF16", list(value.bits.shape), value.bits.astype("<u2").tobytes()
    arr = np.ascontiguousarray(value)
    tag = _NUMPY_TAGS.get(arr.dtype)
    if tag is None:
        raise TypeError(f"unsupported dtype {arr.dtype}")
    return tag, list(arr.shape), arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def encode(tensors, metadata=None):
    """The bytes of a file holding `tensors` (name -> ndarray or Bf16Bits) and
    string `metadata`."""
    header = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        tag, shape, blob = _tag_and_bytes(tensors[name])
        header[name] = {
            "dtype": tag,
            "shape": shape,
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *blobs])


def write(path, tensors, metadata=None):
    """Write `tensors` (name -> ndarray or Bf16Bits) and string `metadata`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(tensors, metadata))


_TAG_NUMPY = {tag: dt for dt, tag in _NUMPY_TAGS.items()}


def read(path):
    """Read a file written by `write`: (name -> ndarray, metadata). BF16 comes
    back as float32 values."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    metadata = header.pop("__metadata__", {})
    body = data[8 + n :]
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        raw = body[start:end]
        if info["dtype"] == "BF16":
            arr = from_bf16_bits(np.frombuffer(raw, dtype="<u2"))
        else:
            arr = np.frombuffer(raw, dtype=_TAG_NUMPY[info["dtype"]].newbyteorder("<"))
        out[name] = arr.reshape(info["shape"]).copy()
    return out, metadata


# ---------------------------------------------------------------- generators and tests


def out_dir(op):
    """`tests/golden/<op>`, where `<op>_golden.py` writes its cases."""
    return GOLDEN_DIR / op


def case_rng(name):
    """The generator of one case, seeded from its name alone, so adding a case
    never changes the others' bytes."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def f32(x):
    """`x` as a float32 array (how expected float outputs are stored)."""
    return np.asarray(x, dtype=np.float32)


def flag(value):
    """A boolean option as a metadata string."""
    return "true" if value else "false"


def optional(value):
    """An optional scalar as a metadata string: "none" when absent."""
    return "none" if value is None else str(value)


def case_path(directory, case):
    """`directory/<case.name>.safetensors`: the golden file of one case."""
    return Path(directory) / f"{case.name}.safetensors"


def write_cases(directory, cases, build, max_total_bytes=None):
    """Write `build(case)` -> (tensors, metadata) of every case to
    `directory/<case.name>.safetensors`, then report the total size; exit
    with an error when it reaches `max_total_bytes`."""
    directory = Path(directory)
    total = 0
    for case in cases:
        path = case_path(directory, case)
        write(path, *build(case))
        total += path.stat().st_size
    if max_total_bytes is not None and total >= max_total_bytes:
        raise SystemExit(
            f"golden/{directory.name} is {total} bytes, expected < {max_total_bytes}"
        )
    print(f"wrote {len(cases)} cases, {total} bytes, to {directory}")


def total_bytes(directory):
    """The size of every golden file in `directory`."""
    return sum(path.stat().st_size for path in Path(directory).glob("*.safetensors"))


def values(x):
    """What `read` gives back for a tensor passed to `write`: BF16 bits as
    float32 values, anything else as an array."""
    return from_bf16_bits(x.bits) if isinstance(x, Bf16Bits) else np.asarray(x)


# How far a regenerated float may lie from the committed one, per stored type,
# in DESIGN 3's form |a - r| <= rtol * (|r| + max|r|). The references compute in
# float64 with NumPy, whose sums (BLAS kernels, SIMD loops) are ordered
# differently on other processors and NumPy versions, so the last bit of the
# rounded result is not portable. F32: about 8 ulps, 10 to 100 times below
# DESIGN's 1e-5/1e-4. BF16/F16: one ulp of the stored type (a value near a
# rounding boundary may round either way), below DESIGN's 1e-2. Integers (ids,
# plans, counts) and non-finite values must match exactly.
REGENERATION_RTOL = {"F64": 1e-12, "F32": 1e-6, "F16": 2.0**-11, "BF16": 2.0**-8}


def _tag_of(value):
    """The safetensors dtype tag `value` is stored under."""
    if isinstance(value, Bf16Bits):
        return "BF16"
    return _NUMPY_TAGS[np.asarray(value).dtype]


def assert_regenerated(committed, regenerated, tag, name):
    """Assert a committed tensor equals a regeneration of it: integers exactly,
    floats within REGENERATION_RTOL[tag] (NaN and infinities exactly)."""
    committed, regenerated = np.asarray(committed), np.asarray(regenerated)
    assert committed.shape == regenerated.shape, f"{name}: shape {committed.shape} != {regenerated.shape}"
    if tag not in REGENERATION_RTOL:
        np.testing.assert_array_equal(committed, regenerated, err_msg=name)
        return
    a, r = committed.astype(np.float64), regenerated.astype(np.float64)
    finite = np.isfinite(r)
    np.testing.assert_array_equal(np.isfinite(a), finite, err_msg=f"{name}: non-finite values")
    np.testing.assert_array_equal(a[~finite], r[~finite], err_msg=f"{name}: non-finite values")
    if not finite.any():
        return
    a, r = a[finite], r[finite]
    rtol = REGENERATION_RTOL[tag]
    bound = rtol * (np.abs(r) + np.abs(r).max())
    over = ~(np.abs(a - r) <= bound)
    if over.any():
        i = int(np.argmax(np.where(over, np.abs(a - r) / np.maximum(bound, np.finfo(float).tiny), 0)))
        raise AssertionError(
            f"{name}: {int(over.sum())} of {a.size} finite values differ by more than rtol {rtol} "
            f"(|a - r| <= rtol * (|r| + max|r|)); worst: committed {a[i]!r}, regenerated {r[i]!r}"
        )


def assert_file_matches(path, tensors, metadata):
    """Assert the file at `path` holds `tensors` and `metadata` (what a
    generator's build returns): same metadata, names and dtypes, integers
    equal, floats within REGENERATION_RTOL."""
    stored_tensors, stored_metadata = read(path)
    assert stored_metadata == metadata
    assert sorted(stored_tensors) == sorted(tensors)
    for name, value in tensors.items():
        v = values(value)
        assert stored_tensors[name].dtype == v.dtype, name
        assert_regenerated(stored_tensors[name], v, _tag_of(value), name)


def assert_up_to_date(generator, case, missing):
    """Assert the committed file of `case` matches what the generator module
    (`<op>_golden`, with OUT_DIR and build) makes now (`assert_file_matches`). Where the file was never
    generated, `missing(message)` is called: pytest.skip or pytest.fail."""
    path = case_path(generator.OUT_DIR, case)
    if not path.exists():
        missing(f"{path} not generated; run python_ref/{generator.__name__}.py")
    assert_file_matches(path, *generator.build(case))

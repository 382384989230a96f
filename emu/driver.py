"""Build and run the CUDA emulator harness (emu/README.md).

    python3 emu/driver.py            # builds target/emu/moerec_emu, prints its path

`build()` compiles each translation unit (emu/tu/*.cpp: one kernel file
each; emu/harness/*.cpp) with g++ into target/emu/, under AddressSanitizer
and UBSan when the toolchain has them (EMU_SANITIZE=0 turns them off), and
rebuilds a unit only when its command or one of the files it includes
changed. `run(op, inputs)` writes the inputs as a bundle, runs one op and
returns its outputs.
"""

import concurrent.futures
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

EMU_DIR = Path(__file__).resolve().parent
ROOT = EMU_DIR.parent
BUILD_DIR = ROOT / "target" / "emu"
BINARY = BUILD_DIR / "moerec_emu"

CXX = os.environ.get("EMU_CXX", "g++")
BASE_FLAGS = [
    "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer",
    # Kernels reinterpret memory freely (as nvcc allows); binary32 without
    # contraction, so results do not depend on -march.
    "-fno-strict-aliasing", "-ffp-contract=off",
    "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable",
    f"-I{EMU_DIR / 'shim'}",
]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
# The environment a run needs: sanitizer reports fail the run, no leak check.
RUN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=86",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=87",
}


class EmulatorError(RuntimeError):
    """The harness failed: an emulator error, a sanitizer report, a crash."""

    def __init__(self, op, returncode, stderr):
        super().__init__(f"moerec_emu {op} exited with {returncode}:\n{stderr}")
        self.returncode = returncode
        self.stderr = stderr


def have_compiler():
    return shutil.which(CXX) is not None


def sources():
    """(source, sanitized): kernels and the runtime under the sanitizers; the
    harness's host code (a mirror of the Rust launchers) without, which
    halves the build. Every allocation still goes through the sanitizer's
    allocator, so kernel accesses past a buffer are caught."""
    kernels = sorted((EMU_DIR / "tu").glob("*.cpp")) + [EMU_DIR / "cuda_emu_runtime.cpp"]
    return [(s, True) for s in kernels] + [(s, False) for s in sorted((EMU_DIR / "harness").glob("*.cpp"))]


def sanitizers_work():
    """Whether CXX can build and run a sanitized program (cached per compiler)."""
    if os.environ.get("EMU_SANITIZE", "1") == "0":
        return False
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    stamp = BUILD_DIR / "sanitizers.stamp"
    key = hashlib.sha256(version.encode()).hexdigest()
    if stamp.exists() and stamp.read_text().split(" ")[0] == key:
        return stamp.read_text().split(" ")[1] == "yes"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("int main() { return 0; }\n")
        exe = Path(tmp) / "probe"
        ok = subprocess.run([CXX, *SANITIZE_FLAGS, str(src), "-o", str(exe)], capture_output=True).returncode == 0
        ok = ok and subprocess.run([str(exe)], capture_output=True, env={**os.environ, **RUN_ENV}).returncode == 0
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{key} {'yes' if ok else 'no'}")
    return ok


def _digest(command, dep_file):
    """Hash of a compile command and every file its last build read, or None."""
    if not dep_file.exists():
        return None
    text = dep_file.read_text().replace("\\\n", " ")
    deps = text.split(":", 1)[1].split() if ":" in text else []
    h = hashlib.sha256("\0".join(command).encode())
    for dep in sorted(set(deps)):
        path = Path(dep)
        if not path.exists():
            return None
        h.update(dep.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _compile(source, flags, compiler_version):
    obj_dir = BUILD_DIR / "obj"
    name = f"{source.parent.name}_{source.stem}"
    obj, dep, stamp = (obj_dir / f"{name}{ext}" for ext in (".o", ".d", ".stamp"))
    command = [CXX, *flags, "-c", str(source), "-o", str(obj), "-MMD", "-MF", str(dep)]
    key = [compiler_version, *command]
    if obj.exists() and stamp.exists() and stamp.read_text() == _digest(key, dep):
        return obj, False
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {source} failed:\n{' '.join(command)}\n{result.stderr}")
    stamp.write_text(_digest(key, dep) or "")
    return obj, True


def build(verbose=False):
    """Builds (or reuses) target/emu/moerec_emu and returns its path."""
    (BUILD_DIR / "obj").mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR / "build.lock", "w") as lock:  # one build at a time (pytest -n, two shells)
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(verbose)


def _build(verbose):
    sanitize = SANITIZE_FLAGS if sanitizers_work() else []
    flags = BASE_FLAGS + sanitize
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda s: _compile(s[0], BASE_FLAGS + (sanitize if s[1] else []), version),
                                sources()))
    objects = [obj for obj, _ in results]
    link = [CXX, *flags, *map(str, objects), "-o", str(BINARY)]
    link_stamp = BUILD_DIR / "moerec_emu.stamp"
    key = hashlib.sha256("\0".join(link).encode() + b"".join(o.read_bytes() for o in objects)).hexdigest()
    if any(rebuilt for _, rebuilt in results) or not BINARY.exists() or not link_stamp.exists() \
            or link_stamp.read_text() != key:
        result = subprocess.run(link, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"linking failed:\n{' '.join(link)}\n{result.stderr}")
        link_stamp.write_text(key)
        if verbose:
            print(f"built {BINARY}", file=sys.stderr)
    return BINARY


# ---------------------------------------------------------------- bundles
_DTYPES = {"u8": np.uint8, "u16": np.uint16, "u32": np.uint32, "u64": np.uint64,
           "i32": np.int32, "f32": np.float32, "f64": np.float64}
_TAGS = {np.dtype(v): k for k, v in _DTYPES.items()}


def write_bundle(path, arrays):
    """arrays: name -> str, or an array / scalar with one of the _DTYPES."""
    with open(path, "wb") as f:
        f.write(b"EMU1" + struct.pack("<I", len(arrays)))
        for name, value in arrays.items():
            if isinstance(value, str):
                tag, data = "str", value.encode()
            else:
                a = np.ascontiguousarray(value)
                if a.dtype not in _TAGS:
                    raise TypeError(f"{name}: unsupported dtype {a.dtype}")
                tag, data = _TAGS[a.dtype], a.tobytes()
            for s in (name.encode(), tag.encode()):
                f.write(struct.pack("<I", len(s)) + s)
            f.write(struct.pack("<Q", len(data)) + data)


def read_bundle(path):
    data = Path(path).read_bytes()
    if data[:4] != b"EMU1":
        raise ValueError(f"{path}: not an EMU1 bundle")
    (count,) = struct.unpack_from("<I", data, 4)
    pos, out = 8, {}
    for _ in range(count):
        strings = []
        for _ in range(2):
            (n,) = struct.unpack_from("<I", data, pos)
            strings.append(data[pos + 4:pos + 4 + n].decode())
            pos += 4 + n
        (n,) = struct.unpack_from("<Q", data, pos)
        raw = data[pos + 8:pos + 8 + n]
        pos += 8 + n
        name, tag = strings
        out[name] = raw.decode() if tag == "str" else np.frombuffer(raw, dtype=_DTYPES[tag]).copy()
    return out


def run(op, inputs, schedule="forward", timeout=120, binary=None):
    """Runs `moerec_emu op` on `inputs` (see write_bundle) and returns
    (outputs, stderr). EMU_SCHEDULE is `schedule`. Raises EmulatorError when
    the harness fails (an error the emulator or a sanitizer found)."""
    binary = binary or BINARY
    with tempfile.TemporaryDirectory(prefix="emu-") as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        write_bundle(src, inputs)
        env = {**os.environ, **RUN_ENV, "EMU_SCHEDULE": schedule}
        try:
            result = subprocess.run([str(binary), op, str(src), str(dst)], capture_output=True, text=True,
                                    timeout=timeout, env=env)
        except subprocess.TimeoutExpired as e:
            raise EmulatorError(op, "a timeout", f"no result after {timeout} s: a kernel loops forever, or waits "
                                "for another block (blocks run one after another)\n" + (e.stderr or b"").decode()) from e
        # ASan's notice about swapcontext: the runtime annotates every switch.
        stderr = "\n".join(line for line in result.stderr.splitlines()
                           if "doesn't fully support makecontext/swapcontext" not in line)
        if result.returncode != 0:
            raise EmulatorError(op, result.returncode, stderr)
        return read_bundle(dst), stderr


if __name__ == "__main__":
    print(build(verbose=True))

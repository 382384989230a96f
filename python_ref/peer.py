"""What every PyTorch peer benchmark (`<op>_torch_peer.py`) shares: the common
command-line flags, CUDA-event timing, the copy-bandwidth yardstick of the
floors (DESIGN 5), the run's identity fields and the JSON-lines output.

`--device cpu` runs a peer on the CPU instead (PyTorch's CPU kernels,
`--threads` intra-op threads, wall-clock timing with `time.perf_counter`):
the peer of moerec's CPU backend, which `benches/cpu_peers.rs` runs beside
it, shape by shape. The peers build their tensors on `device()` and call
`synchronize()` / `empty_cache()` / `peak_extra_bytes()`, which do the right
thing (or nothing) for the chosen device.

torch is imported inside the functions that need it, so this module (and the
peers) import without torch, as pytest collection in python_ref/ does.
"""

import argparse
import datetime
import json
import math
import shlex
import statistics
import subprocess
import sys
import time

__all__ = [
    "log",
    "device",
    "is_cpu",
    "synchronize",
    "empty_cache",
    "peak_extra_bytes",
    "argument_parser",
    "parse_args",
    "run_info",
    "median_ms",
    "copy_gbps",
    "matmul_tflops",
    "l2_bytes",
    "rotations",
    "top_ks",
    "JsonLines",
]


_DEVICE = "cuda"


def device():
    """The torch device the peer runs on (`--device`)."""
    import torch

    return torch.device(_DEVICE)


def is_cpu():
    return _DEVICE == "cpu"


def synchronize():
    """Wait for queued device work (nothing to wait for on the CPU)."""
    if not is_cpu():
        import torch

        torch.cuda.synchronize()


def empty_cache():
    if not is_cpu():
        import torch

        torch.cuda.empty_cache()


def peak_extra_bytes(step):
    """Peak device memory `step(0)` allocates beyond what is allocated before
    it; None on the CPU (torch keeps no such count there)."""
    if is_cpu():
        return None
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def log(msg):
    """A note on stderr (skipped shapes, measured rates)."""
    print(msg, file=sys.stderr, flush=True)


def argument_parser(doc):
    """The parser of a peer, described by the first line of its docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0])


def parse_args(ap, op, *, iters, min_iters, warmup=None):
    """Add the flags every peer has, parse, check them and that CUDA is there.

    `--warmup` (untimed calls, default `warmup`; left out where None), `--iters`
    (timed calls, default `iters`, at least `min_iters` for the median, at
    most 3 on the CPU) and
    `--out` (a file the JSON lines are also appended to).
    """
    import torch

    if warmup is not None:
        ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--iters", type=int, default=iters, help=f"timed iterations (>= {min_iters})")
    ap.add_argument("--out", help="append the JSON lines to this file")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--threads", type=int, help="intra-op threads on the CPU (default: torch's)")
    args = ap.parse_args()
    # On the CPU one call of a large shape takes seconds, and wall-clock
    # timing has no launch jitter to average out: 3 calls give a median.
    if args.device == "cpu":
        min_iters = min(min_iters, 3)
    if args.iters < min_iters:
        ap.error(f"--iters: expected >= {min_iters} (the median needs them)")
    global _DEVICE
    _DEVICE = args.device
    if is_cpu():
        if args.threads:
            torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        sys.exit(f"{op}_torch_peer: no CUDA device")
    return args


def cpu_name():
    """The processor's model name, as /proc/cpuinfo gives it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def run_info(*, commit=True):
    """The fields that say where and how a record was made: device, commit
    (the short HEAD, or "unknown"; left out with commit=False), date (UTC) and
    command (the command line, shell-quoted)."""
    import torch

    if is_cpu():
        info = dict(device=cpu_name(), threads=torch.get_num_threads())
    else:
        info = dict(device=torch.cuda.get_device_name(torch.device("cuda")))
    if commit:
        info["commit"] = _commit()
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info["command"] = shlex.join(["python", *sys.argv])
    return info


def median_ms(step, warmup, iters, *, back_to_back=False, sync_warmup=False):
    """Median CUDA-event time in ms of `step(i)`, i in range(iters), after the
    untimed calls `step(i)`, i in range(warmup).

    By default each call has its own pair of events and is waited for before
    the next. back_to_back records every call and its events first and
    synchronises once, so the calls run back to back on the device.
    sync_warmup waits for the warmup calls before the first timed one.
    """
    import torch

    for i in range(warmup):
        step(i)
    if is_cpu():
        times = []
        for i in range(iters):
            start = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    if sync_warmup:
        torch.cuda.synchronize()
    if back_to_back:
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(iters)
        ]
        for i, (start, stop) in enumerate(events):
            start.record()
            step(i)
            stop.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(stop) for start, stop in events)
    times = []
    for i in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        step(i)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_gbps(warmup, iters, **timing):
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus
    written, of a 1 GiB copy timed by `median_ms(..., **timing)`."""
    import torch

    n = 1 << (28 if is_cpu() else 30)
    src = torch.empty(n, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src), warmup, iters, **timing)
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def matmul_tflops(warmup, iters, dtype="bf16", n=8192, **timing):
    """Dense matmul rate in TFLOP/s of an n^3 torch.matmul in `dtype` ("bf16"
    or "f32"; TF32 as the caller has set it) timed by
    `median_ms(..., **timing)`: the matrix rate of the FLOP floors (DESIGN 5)."""
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    if is_cpu():
        n = min(n, 1024)
    a = torch.randn(n, n, device=device(), dtype=torch_dtype)
    b = torch.randn(n, n, device=device(), dtype=torch_dtype)
    ms = median_ms(lambda i: torch.matmul(a, b), warmup, iters, **timing)
    del a, b
    return 2 * n**3 / (ms * 1e-3) / 1e12


def l2_bytes():
    """The device's L2 size (50 MiB where torch does not say); on the CPU the
    last-level cache (32 MiB where sysfs does not say)."""
    import torch

    if is_cpu():
        try:
            with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
                return int(f.read().strip().rstrip("K")) << 10
        except (OSError, ValueError):
            return 32 << 20

    return getattr(torch.cuda.get_device_properties(torch.device("cuda")), "L2_cache_size", 50 << 20)


def rotations(working_bytes, budget_bytes, most):
    """How many copies of a working set to rotate over so that the calls
    together touch `budget_bytes` (and each starts cold): 1 to `most`."""
    return max(1, min(most, math.ceil(budget_bytes / max(working_bytes, 1))))


def top_ks(ks, experts):
    """The distinct k of `--k` values (ints, or "all" for every expert) that
    fit `experts` experts, ascending."""
    resolved = sorted({experts if k == "all" else int(k) for k in ks})
    return [k for k in resolved if 1 <= k <= experts]


class JsonLines:
    """Where records go: each is printed as one JSON line on stdout and, when
    `path` is given, appended to that file. Use as a context manager."""

    def __init__(self, path):
        self.file = open(path, "a") if path else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.file:
            self.file.close()
            self.file = None

    def emit(self, record):
        line = json.dumps(record)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

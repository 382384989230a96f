"""PyTorch peer for `experts` (DESIGN.md 4.3 and 5) on the GPU.

    python python_ref/experts_torch_peer.py [--shapes recsys llm] [--out bench/results/experts.jsonl]

Times one expert layer, bf16 (or `--dtype f32`), forward and backward, in
three formulations:
- `loop`: the usual MoE code. The plan is a stable argsort of the top-k
  expert ids of random logits (made outside the timed region: the op takes the
  plan as given); timed: the gather x[token_of_row], one matmul per expert on
  its slice (torch.split with host-side split sizes, also precomputed — real
  code syncs for them every step, so this favours torch), `torch.addmm`
  with the expert's bias (`torch.mm` without), torch.cat, activation.
- `grouped_mm`: the gather, then one `torch._grouped_mm(x_rows, W, offs=ends)`
  (a private op, torch >= 2.8; skipped where absent or where it raises). Its
  requirements as of torch 2.8/2.9: bf16 operands, CUDA sm_90 (sm_80 support
  came later), `offs` int32 [E] of cumulative row ends, and K = Din and
  N = Dout' a multiple of 8 elements (16-byte aligned strides). A W it rejects
  is retried once converted (untimed) to column-major layout per expert. Bias is added by a per-row gather.
- `dense`: one torch.matmul [R, Din] @ [Din, Dout'] of the same FLOPs on
  pre-gathered rows, plus the activation: the ceiling of any grouped form,
  emitted with `bound: true` (the others `bound: false`), so that
  scripts/bench_records.py never joins it as the op's peer.
Backward is `torch.autograd.grad` of y w.r.t. x (or x_rows), W (and bias) from
a random dy, graph retained, everything bf16 (the op returns f32 gradients;
torch's bf16 ones move fewer bytes). The gather's backward is index_add
(float atomics, not deterministic); the moerec op sums slots in order.
`--passes` picks what is timed: `fwd` (no autograd graph), `bwd` (the
backward alone, on the retained graph) and `fwdbwd` (forward with the graph
and `autograd.grad`, emitted as pass "bwd" with `includes_fwd: true`; the
others carry `includes_fwd: false`). `--rows` gives each layer `x_rows:
[R, Din]` already in plan order (moerec's `layer_forward_rows`, the second
layer of an FFN): no gather, and dx is `[R, Din]`.

`--device cpu --threads N --dtype f32` times the same on the CPU (one copy
of the operands, wall-clock timing; `torch._grouped_mm` takes f32 there),
the peer `benches/cpu_peers.rs` runs beside moerec's CPU backend.

FLOPs: fwd 2 R Din Dout', bwd 4 R Din Dout' (dx and dW), R = T k, Dout' =
2 Dout for swiglu. floor_ms (DESIGN 5) is the larger of FLOPs over the
measured bf16 matmul rate (an 8192^3 torch.matmul) and the op's contract
bytes over the copy bandwidth (bytes read + written by a 1 GiB
device-to-device copy): fwd reads x, W, bias, token_of_row and writes h
(Saved) and y; bwd reads dy (f32), h, x, W, the plan and writes dx, dW, db
(f32). Before timing, every variant's y is checked on sampled rows against
an f32 product (DESIGN tolerance, rtol 1e-2) and the grouped_mm gradients
against the loop's. Working sets under 128 MiB are timed across rotating
copies of x and W so the 50 MB L2 does not flatter them.

Shape sets: recsys (T = 51200 = 256 x 200; Din, Dout in {64, 128, 256, 512};
E in {4, 8, 16, 64}; k in {1, 2, E}) and llm (T = 16384; Din = Dout in
{2048, 4096}; E in {8, 16, 64}; k = 2). --din/--dout/--E/--k/--T replace a
set's lists. One JSON line per record on stdout; `--out FILE` also appends
them there. Shapes that run out of memory are reported on stderr and skipped.
"""

import peer
from peer import log

SHAPE_SETS = {
    "recsys": dict(T=[51200], Din=[64, 128, 256, 512], Dout=[64, 128, 256, 512],
                   E=[4, 8, 16, 64], k=["1", "2", "all"], square=False),
    "llm": dict(T=[16384], Din=[2048, 4096], Dout=[2048, 4096], E=[8, 16, 64], k=["2"],
                square=True),
}
ACTIVATIONS = ("none", "relu", "gelu", "silu", "swiglu")
VARIANTS = ("loop", "grouped_mm", "dense")
PASSES = ("fwd", "bwd", "fwdbwd")
DTYPES = ("bf16", "f32")
# DESIGN 3: rtol of products by input type.
RTOL = {"bf16": 1e-2, "f32": 1e-4}
# Variants that are a bound on the op, not an implementation of it: emitted
# with `bound: true`, never joined as the peer (scripts/bench_records.py).
BOUNDS = ("dense",)
ROTATE_BYTES = 128 << 20
MAX_BUFFERS = 16
SAMPLE_ROWS = 256


def time_ms(fn, warmup, iters):
    """Median time of fn(i) in ms, CUDA events around each call, warmup awaited."""
    return peer.median_ms(fn, warmup, iters, sync_warmup=True)


def activate(torch, h, activation):
    F = torch.nn.functional
    if activation == "none":
        return h
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h, approximate="none")  # exact, as the contract
    if activation == "silu":
        return F.silu(h)
    gate, up = h.chunk(2, dim=-1)  # halves, not interleaved
    return F.silu(gate) * up


class Plan:
    """A dispatch plan from the top-k of random logits (DESIGN 4.2 layout)."""

    def __init__(self, torch, T, E, k, gen):
        logits = torch.randn(T, E, device=peer.device(), generator=gen)
        flat = torch.topk(logits, k, dim=-1).indices.reshape(-1)
        order = torch.argsort(flat, stable=True)  # grouped by expert, tokens ascending
        self.token_of_row = order // k
        counts = torch.bincount(flat, minlength=E)
        self.ends = torch.cumsum(counts, 0).to(torch.int32)  # grouped_mm's offs
        self.expert_of_row = torch.repeat_interleave(torch.arange(E, device=peer.device()), counts)
        self.split_sizes = counts.tolist()
        self.R = T * k


def make_layer(torch, variant, plan, activation, rows=False):
    """fn(x, W, b) -> (y, h) for a variant; x is [T, Din] (x_rows [R, Din] in
    plan order with `rows`, and always for dense)."""
    def gather(x):
        return x if rows else x.index_select(0, plan.token_of_row)

    if variant == "loop":
        def layer(x, W, b):
            parts = gather(x).split(plan.split_sizes)
            if b is None:
                h = torch.cat([p @ W[e] for e, p in enumerate(parts)])
            else:
                h = torch.cat([torch.addmm(b[e], p, W[e]) for e, p in enumerate(parts)])
            return activate(torch, h, activation), h
    elif variant == "grouped_mm":
        def layer(x, W, b):
            h = torch._grouped_mm(gather(x), W, offs=plan.ends)
            if b is not None:
                h = h + b.index_select(0, plan.expert_of_row)
            return activate(torch, h, activation), h
    else:
        def layer(x_rows, W, b):
            h = x_rows @ W[0] if b is None else torch.addmm(b[0], x_rows, W[0])
            return activate(torch, h, activation), h
    return layer


def check_close(torch, name, got, ref, rtol=RTOL["bf16"]):
    """DESIGN 3 tolerance: |a - r| <= rtol (|r| + max|r|)."""
    got, ref = got.float(), ref.float()
    err = (got - ref).abs()
    bound = rtol * (ref.abs() + ref.abs().max())
    if not bool((err <= bound).all()):
        worst = float((err - bound).max())
        raise AssertionError(f"{name}: exceeds tolerance by {worst:.3g} (max |ref| {float(ref.abs().max()):.3g})")


def reference_rows(torch, rows, x, W, b, plan, activation, dense, in_plan_order=False):
    """f32 y of the sampled rows, expert by expert (x_rows in plan order with
    in_plan_order)."""
    if dense:
        h = x[rows].float() @ W[0].float()
        if b is not None:
            h = h + b[0].float()
        return activate(torch, h, activation)
    experts = plan.expert_of_row[rows]
    out = None
    for e in torch.unique(experts).tolist():
        sel = (experts == e).nonzero().squeeze(1)
        sources = rows[sel] if in_plan_order else plan.token_of_row[rows[sel]]
        h = x[sources].float() @ W[e].float()
        if b is not None:
            h = h + b[e].float()
        y = activate(torch, h, activation)
        if out is None:
            out = y.new_empty(len(rows), y.shape[1])
        out[sel] = y
    return out


def bench_shape(torch, shape, args, rates):
    """Yield the records of one shape (every variant, each of args.passes)."""
    T, E, k, Din, Dout, activation = (shape[n] for n in ("T", "E", "k", "Din", "Dout", "activation"))
    width = 2 * Dout if activation == "swiglu" else Dout
    R = T * k
    inputs = R if args.rows else T  # rows of x (x_rows with --rows)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    size = dtype.itemsize
    flops = {"fwd": 2.0 * R * Din * width, "bwd": 4.0 * R * Din * width}
    flops["fwdbwd"] = flops["fwd"] + flops["bwd"]
    bias_elems = E * width if args.bias else 0
    contract_bytes = {
        "fwd": size * (inputs * Din + E * Din * width + bias_elems) + 4 * R + size * R * (width + Dout),
        "bwd": 4 * R * Dout + size * (R * width + inputs * Din + E * Din * width) + 4 * (2 * R + E + 1)
        + 4 * (inputs * Din + E * Din * width + bias_elems),
    }
    contract_bytes["fwdbwd"] = contract_bytes["fwd"] + contract_bytes["bwd"]
    gen = torch.Generator(device=peer.device()).manual_seed(T * 1_000_003 + E * 1009 + k * 31 + Din + Dout)
    plan = Plan(torch, T, E, k, gen)
    working = size * (inputs * Din + E * Din * width + R * (Din + width + Dout))
    # On the CPU one copy, as moerec's side of benches/cpu_peers.rs uses.
    n_buf = 1 if peer.is_cpu() else peer.rotations(working, ROTATE_BYTES, MAX_BUFFERS)

    def weights(variant):
        """W as the variant holds it: one [E, Din, Dout'] tensor for grouped_mm;
        a list of E separate [Din, Dout'] tensors for the loop (as nn.Linear
        experts are: indexing one tensor would make autograd write E full-size
        gradients); a list of one for dense."""
        experts = 1 if variant == "dense" else E
        W = torch.randn(experts, Din, width, device=peer.device(), generator=gen).mul_(Din**-0.5).to(dtype)
        if variant != "grouped_mm":
            W = [w.clone() for w in W.unbind(0)]
        b = torch.randn(experts, width, device=peer.device(), generator=gen).mul_(0.5).to(dtype) if args.bias else None
        return W, b

    dy = torch.randn(R, Dout, device=peer.device(), generator=gen).to(dtype)
    rows = torch.randperm(R, device=peer.device(), generator=gen)[: min(R, SAMPLE_ROWS)]
    for variant in args.variants:
        if variant == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            log(f"skip grouped_mm: torch {torch.__version__} has no torch._grouped_mm")
            continue
        dense = variant == "dense"
        layer_fn = make_layer(torch, variant, plan, activation, args.rows)
        bufs, graphs = [], []
        try:
            for _ in range(n_buf):
                W, b = weights(variant)
                x = torch.randn(R if dense else inputs, Din, device=peer.device(), generator=gen).to(dtype)
                bufs.append((x, W, b))
            try:
                with torch.no_grad():
                    y0, _ = layer_fn(*bufs[0])
            except RuntimeError as err:
                if variant != "grouped_mm":
                    raise
                # Same logical W, column-major per expert; converted once, untimed.
                log(f"grouped_mm rejected row-major W ({err}); trying column-major")
                bufs = [(x, W.transpose(1, 2).contiguous().transpose(1, 2), b) for x, W, b in bufs]
                with torch.no_grad():
                    y0, _ = layer_fn(*bufs[0])
            ref = reference_rows(torch, rows, *bufs[0], plan, activation, dense, args.rows)
            check_close(torch, f"{variant} y", y0[rows], ref, RTOL[args.dtype])
            del y0, ref

            turn = [0]

            def next_buf():
                turn[0] = (turn[0] + 1) % len(bufs)
                return turn[0]

            def fwd(_):
                with torch.no_grad():
                    layer_fn(*bufs[next_buf()])

            leaves = []
            for x, W, b in bufs:
                operands = [x, *(W if isinstance(W, list) else [W]), b]
                leaves.append([t.requires_grad_(True) for t in operands if t is not None])
                if "bwd" in args.passes:
                    graphs.append(layer_fn(x, W, b)[0])

            def bwd(_):
                i = next_buf()
                torch.autograd.grad(graphs[i], leaves[i], dy, retain_graph=True)

            def fwdbwd(_):
                i = next_buf()
                torch.autograd.grad(layer_fn(*bufs[i])[0], leaves[i], dy)

            steps = {"fwd": fwd, "bwd": bwd, "fwdbwd": fwdbwd}
            passes = [p for p in PASSES if p in args.passes]
            try:
                steps["bwd" if "bwd" in passes else "fwdbwd"](0)
            except RuntimeError as err:
                if variant != "grouped_mm" or isinstance(err, torch.cuda.OutOfMemoryError):
                    raise
                log(f"skip grouped_mm bwd: {err}")
                passes = [p for p in passes if p == "fwd"]
            for pass_ in passes:
                fn = steps[pass_]
                ms = time_ms(fn, args.warmup, args.iters)
                floor_ms = max(flops[pass_] / (rates["tflops"] * 1e12),
                               contract_bytes[pass_] / (rates["gbps"] * 1e9)) * 1e3
                identity = {"pass": pass_}
                if pass_ != "fwd":
                    identity = {"pass": "bwd", "includes_fwd": pass_ == "fwdbwd"}
                yield {
                    "op": "experts",
                    **identity,
                    "variant": variant,
                    "bound": variant in BOUNDS,
                    "backend": "torch",
                    "dtype": args.dtype,
                    "T": T,
                    "E": E,
                    "k": k,
                    "Din": Din,
                    "Dout": Dout,
                    "activation": activation,
                    "bias": args.bias,
                    "rows": args.rows,
                    "shapes": shape["set"],
                    "median_ms": round(ms, 5),
                    "tflops": round(flops[pass_] / (ms * 1e-3) / 1e12, 4),
                    "floor_ms": round(floor_ms, 5),
                    "matmul_tflops": round(rates["tflops"], 3),
                    "copy_gbps": round(rates["gbps"], 1),
                }
        except torch.cuda.OutOfMemoryError as err:
            log(f"skip {variant} T={T} E={E} k={k} Din={Din} Dout={Dout}: out of memory ({err})")
        except RuntimeError as err:
            if variant != "grouped_mm":
                raise
            log(f"skip grouped_mm T={T} E={E} k={k} Din={Din} Dout={Dout}: {err}")
        finally:
            bufs.clear()
            graphs.clear()
            peer.empty_cache()


def compare_grouped_with_loop(torch, args):
    """Gradients of grouped_mm against the loop on one small shape, before timing."""
    if "grouped_mm" not in args.variants or not hasattr(torch, "_grouped_mm"):
        return
    T, E, k, Din, Dout = 512, 8, 2, 64, 64
    gen = torch.Generator(device=peer.device()).manual_seed(7)
    plan = Plan(torch, T, E, k, gen)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    for activation in args.activation:
        width = 2 * Dout if activation == "swiglu" else Dout
        x = torch.randn(T, Din, device=peer.device(), generator=gen).to(dtype)
        W = (torch.randn(E, Din, width, device=peer.device(), generator=gen) / Din**0.5).to(dtype)
        dy = torch.randn(T * k, Dout, device=peer.device(), generator=gen).to(dtype)
        grads = {}
        for variant in ("loop", "grouped_mm"):
            xi, Wi = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
            try:
                y, _ = make_layer(torch, variant, plan, activation)(xi, Wi, None)
                grads[variant] = (y.detach(), *torch.autograd.grad(y, [xi, Wi], dy))
            except RuntimeError as err:
                log(f"grouped_mm check skipped ({activation}): {err}")
                return
        for name, a, b in zip(("y", "dx", "dW"), grads["grouped_mm"], grads["loop"]):
            check_close(torch, f"grouped_mm {name} vs loop ({activation})", a, b, RTOL[args.dtype])


def shapes(args):
    for set_name in args.shapes:
        spec = dict(SHAPE_SETS[set_name])
        for key, override in (("T", args.T), ("Din", args.din), ("Dout", args.dout), ("E", args.E), ("k", args.k)):
            if override:
                spec[key] = override
        for activation in args.activation:
            for T in spec["T"]:
                for E in spec["E"]:
                    for k in peer.top_ks(spec["k"], E):
                        for Din in spec["Din"]:
                            for Dout in spec["Dout"]:
                                if spec["square"] and Din != Dout:
                                    continue
                                yield dict(set=set_name, T=T, E=E, k=k, Din=Din, Dout=Dout,
                                           activation=activation)


def main():
    import torch

    ap = peer.argument_parser(__doc__)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPE_SETS), choices=sorted(SHAPE_SETS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--activation", nargs="+", default=["swiglu"], choices=ACTIVATIONS)
    ap.add_argument("--bias", action="store_true", help="experts with a bias [E, Dout']")
    ap.add_argument("--T", type=int, nargs="+")
    ap.add_argument("--din", type=int, nargs="+")
    ap.add_argument("--dout", type=int, nargs="+")
    ap.add_argument("--E", type=int, nargs="+")
    ap.add_argument("--k", nargs="+", help="ints or 'all' (= E)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--passes", nargs="+", default=["fwd", "bwd"], choices=PASSES)
    ap.add_argument("--rows", action="store_true",
                    help="x_rows [R, Din] in plan order (layer_forward_rows): no gather")
    args = peer.parse_args(ap, "experts", warmup=5, iters=20, min_iters=10)
    torch.backends.cuda.matmul.allow_tf32 = False  # bf16 products accumulate in f32 anyway

    info = peer.run_info()
    compare_grouped_with_loop(torch, args)
    rates = {
        "gbps": peer.copy_gbps(args.warmup, args.iters, sync_warmup=True),
        # Dense matmul rate (f32 accumulation) of an 8192^3 product (1024^3 on the CPU).
        "tflops": peer.matmul_tflops(args.warmup, args.iters, args.dtype, sync_warmup=True),
    }
    log(f"{info['device']}: copy {rates['gbps']:.0f} GB/s, {args.dtype} matmul {rates['tflops']:.1f} TFLOP/s")
    with peer.JsonLines(args.out) as out:
        for shape in shapes(args):
            for rec in bench_shape(torch, shape, args, rates):
                rec.update(info)
                out.emit(rec)


if __name__ == "__main__":
    main()

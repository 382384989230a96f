"""PyTorch peer for `scoring` on the GPU or the CPU: the yardstick of bench/results.

    python python_ref/scoring_torch_peer.py [--out bench/results/scoring.jsonl]
        [--B 256 1024 4096] [--H 1 2 4 8] [--D 16 32 64] [--V 10000 100000 1000000]
        [--dtype bf16 f32] [--variant ...] [--iters 20]

What it times, per (dtype, B, H, D, V), with per-head tables, gate logits G,
an f32 item bias, scale 1 and uniform targets, no exclusions:
- `logits_ce` (fwd, bwd, bwd with fwd): Logits mixing. The gate is folded
  into the user states, `S = ((g * U) as [B, H*D]) @ items^T + bias`, one
  matmul materialising S [B, V], upcast to f32, then `F.cross_entropy(
  reduction="none")`. fwd runs under no_grad; pass "bwd" with
  `includes_fwd: true` is forward plus `torch.autograd.grad` to U, G, the
  table and the bias in one timed call (the peer of the moerec
  `scoring_*_fwdbwd` benches: the moerec backward recomputes the scores);
  pass "bwd" with `includes_fwd: false` replays `autograd.grad` on a
  retained graph.
- `probabilities_ce` (fwd, bwd, bwd with fwd): Probabilities mixing, the
  mixture-of-softmaxes in log space: per-head logits [H, B, V] by one batched
  matmul, f32 `log_softmax` over V, gather the targets, then
  `-logsumexp_h(log_softmax(G) + log q)`.
- `matmul` (fwd): the bare `[B, H*D] @ [H*D, V]` in the input dtype, the
  ceiling the issue names (bf16 is the one that matters; f32 is run too).
- `scores_topk` (fwd): the `logits_ce` scores followed by `torch.topk(n=100)`
  (comparable to the fused top-k, which never materialises S); `topk` (fwd):
  `torch.topk` alone on precomputed f32 scores.

Every record names what it measures as the moerec benchmarks do (see
scripts/bench_records.py, which joins the two): `function` (cross_entropy,
topk, or scores for the bare matmul), `mixing` (logits or probabilities;
none for `matmul`), `n` for the top-k variants, `includes_fwd` on bwd
records, and `bound: true` for `matmul` and `topk`, a ceiling or a part of
the work rather than an implementation of the op, never joined as its peer
(VARIANT_FIELDS). `matmul_tflops` is the dense matmul rate of an 8192^3
torch.matmul in the record's dtype, measured once per dtype, which the FLOP
floor of the joined moerec record is computed from.

Layout: torch gets the table as `items [V, H*D]` (all heads of an item in one
row), the layout its single matmul wants; the op's `[H, V, D]` would cost the
peer a permute copy per call, so this favours torch. Gradients of bf16
leaves come out bf16 (the op returns f32), which also favours torch. TF32
and reduced-precision bf16 reductions are switched off (DESIGN 3: f32
arithmetic unless the caller opts in).

Shapes whose materialised f32 tensor (B*V for the logits variants, B*H*V for
the probabilities one) exceeds `--max-materialised` bytes (8e9) are skipped
with a note on stderr. FLOPs are the op's: 2*B*V*H*D per score pass, so fwd
counts 2, bwd 4 (dU and dX) and bwd with fwd 6 times B*V*H*D. Timing: CUDA events
around each call, `--warmup` calls first, the median of `--iters` (>= 10; >= 3
on the CPU). `--passes` picks the cross-entropy passes timed.
`peak_extra_bytes` is torch.cuda.max_memory_allocated during one more call
minus what was allocated before it. Where inputs plus the materialised
scores fit in twice the L2, calls rotate over several input sets.

`--device cpu --threads N --dtype f32` times the same on the CPU (see
peer.py; no peak memory there), the peer `benches/cpu_peers.rs` runs beside
moerec's CPU backend.

Before timing, each shape is validated on its first input set: the folded
matmul against a per-head einsum on a few rows, and for H = 1 the two
mixings' losses against each other. One JSON line per record on stdout;
`--out FILE` also appends them there.
"""

import math

import peer

DTYPES = ("bf16", "f32")
VARIANTS = ("logits_ce", "probabilities_ce", "matmul", "scores_topk", "topk")
PASSES = ("fwd", "fwdbwd", "bwd")
TOPK_N = 100
MAX_SETS = 8
# What each variant measures, in the fields the moerec records carry.
VARIANT_FIELDS = {
    "logits_ce": dict(function="cross_entropy", mixing="logits", bound=False),
    "probabilities_ce": dict(function="cross_entropy", mixing="probabilities", bound=False),
    "matmul": dict(function="scores", bound=True),
    "scores_topk": dict(function="topk", mixing="logits", n=TOPK_N, bound=False),
    "topk": dict(function="topk", mixing="logits", n=TOPK_N, bound=True),
}


def identity(pass_, variant, includes_fwd=None):
    """The fields naming a record: pass (fwd or bwd), includes_fwd (bwd only),
    variant and VARIANT_FIELDS[variant]."""
    fields = {"pass": pass_}
    if pass_ == "bwd":
        fields["includes_fwd"] = bool(includes_fwd)
    fields["variant"] = variant
    fields.update(VARIANT_FIELDS[variant])
    return fields


def logits_scores(torch, U, G, items, bias):
    """S [B, V] f32 = (g * U) @ items^T + bias, one matmul."""
    B, H, D = U.shape
    g = torch.softmax(G.float(), dim=-1).to(U.dtype)
    user = (g[:, :, None] * U).reshape(B, H * D)
    return torch.matmul(user, items.t()).float() + bias


def logits_ce(torch, F, U, G, items, bias, targets):
    return F.cross_entropy(logits_scores(torch, U, G, items, bias), targets, reduction="none")


def probabilities_ce(torch, U, G, items, bias, targets):
    """-log sum_h g_h softmax_v(s[b, h, .])[y_b], in log space."""
    B, H, D = U.shape
    V = items.shape[0]
    per_head = items.view(V, H, D).permute(1, 2, 0)  # [H, D, V], a view
    s = torch.matmul(U.transpose(0, 1), per_head).float() + bias  # [H, B, V]
    log_q = torch.log_softmax(s, dim=-1)
    log_q_y = log_q.gather(2, targets.view(1, B, 1).expand(H, B, 1))[:, :, 0]  # [H, B]
    return -torch.logsumexp(torch.log_softmax(G.float(), dim=-1) + log_q_y.t(), dim=1)


def main():
    import torch
    import torch.nn.functional as F

    ap = peer.argument_parser(__doc__)
    ap.add_argument("--B", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--H", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--D", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--V", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES,
                    help="which passes of the cross-entropy variants to time (fwdbwd: forward "
                         "plus backward in one call; bwd: the backward on a retained graph)")
    ap.add_argument("--max-materialised", type=float, default=8e9,
                    help="skip shapes whose materialised f32 scores exceed this many bytes")
    args = peer.parse_args(ap, "scoring", warmup=3, iters=20, min_iters=10)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    device = peer.device()
    l2_bytes = peer.l2_bytes()
    torch_dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    common = dict(op="scoring", backend="torch", **peer.run_info())
    rates = {}
    for dtype in args.dtype:
        rates[dtype] = peer.matmul_tflops(args.warmup, args.iters, dtype)
        peer.log(f"{common['device']}: {dtype} matmul {rates[dtype]:.1f} TFLOP/s")
    out = peer.JsonLines(args.out)

    def emit(pass_, variant, dtype, shape, step, flops, includes_fwd=None):
        ms = peer.median_ms(step, args.warmup, args.iters)
        record = dict(common, **identity(pass_, variant, includes_fwd), dtype=dtype)
        record.update(shape)
        record.update(
            median_ms=round(ms, 5),
            tflops=None if flops is None else round(flops / (ms * 1e-3) / 1e12, 3),
            matmul_tflops=round(rates[dtype], 4),
            peak_extra_bytes=peer.peak_extra_bytes(step),
        )
        out.emit(record)

    def validate(dt, U, G, items, bias, targets):
        rows = min(U.shape[0], 8)
        B, H, D = U.shape
        V = items.shape[0]
        u, gl, x, y = U[:rows].float(), G[:rows].float(), items.float(), targets[:rows]
        s = torch.einsum("bhd,vhd->bhv", u, x.view(V, H, D)) + bias  # [rows, H, V]
        expect = torch.einsum("bh,bhv->bv", torch.softmax(gl, -1), s)
        got = logits_scores(torch, U[:rows], G[:rows], items, bias)
        tol = 1e-4 if dt == "f32" else 3e-2
        scale = expect.abs().max().item()
        assert (got - expect).abs().max().item() <= tol * (1 + scale), "logits scores"
        if H == 1:
            a = logits_ce(torch, F, U[:rows], G[:rows], items, bias, y)
            b = probabilities_ce(torch, U[:rows], G[:rows], items, bias, y)
            assert torch.allclose(a, b, rtol=tol, atol=tol), "H = 1: the two mixings differ"

    for dtype in args.dtype:
        dt = torch_dtypes[dtype]
        elt = torch.finfo(dt).bits // 8
        for B in args.B:
            for H in args.H:
                for D in args.D:
                    for V in args.V:
                        shape = dict(B=B, H=H, D=D, V=V)
                        logits_bytes = 4 * B * V
                        input_bytes = (B * H * D + B * H + V * H * D) * elt + 4 * V + 4 * B
                        working = input_bytes + logits_bytes
                        sets = peer.rotations(working, 2 * l2_bytes, MAX_SETS)
                        gen = torch.Generator(device=device).manual_seed(B * 7919 + H * 131 + D * 17 + V)
                        inputs = []
                        for _ in range(sets):
                            U = torch.randn(B, H, D, device=device, generator=gen).to(dt)
                            G = torch.randn(B, H, device=device, generator=gen).to(dt)
                            items = (torch.randn(V, H * D, device=device, generator=gen) / math.sqrt(D)).to(dt)
                            bias = torch.randn(V, device=device, generator=gen)
                            targets = torch.randint(0, V, (B,), device=device, generator=gen)
                            inputs.append((U, G, items, bias, targets))
                        if logits_bytes <= args.max_materialised:
                            validate(dtype, *inputs[0])
                        score_flops = 2 * B * V * H * D
                        for variant in args.variant:
                            materialised = 4 * B * V * (H if variant == "probabilities_ce" else 1)
                            if materialised > args.max_materialised:
                                peer.log(f"skip {variant} {dtype} {shape}: {materialised:.3g} bytes "
                                         f"materialised")
                                continue
                            run_variant(torch, F, variant, dtype, shape, inputs, score_flops, emit,
                                        args.passes)
                        del inputs
                        peer.empty_cache()
    out.close()


def run_variant(torch, F, variant, dtype, shape, inputs, score_flops, emit, passes=PASSES):
    """Time one variant on one shape (of the cross-entropy variants, the
    `passes` asked for)."""
    sets = len(inputs)

    if variant == "matmul":
        users = [U.reshape(U.shape[0], -1) for U, *_ in inputs]

        def step(i):
            torch.matmul(users[i % sets], inputs[i % sets][2].t())

        emit("fwd", variant, dtype, shape, step, score_flops)
        return

    if variant == "topk":
        with torch.no_grad():
            scores = [logits_scores(torch, *inp[:4]) for inp in inputs]

        def step(i):
            torch.topk(scores[i % sets], TOPK_N, dim=1)

        emit("fwd", variant, dtype, shape, step, None)
        del scores
        return

    if variant == "scores_topk":

        def step(i):
            with torch.no_grad():
                torch.topk(logits_scores(torch, *inputs[i % sets][:4]), TOPK_N, dim=1)

        emit("fwd", variant, dtype, shape, step, score_flops)
        return

    def loss_of(U, G, items, bias, targets):
        if variant == "logits_ce":
            return logits_ce(torch, F, U, G, items, bias, targets)
        return probabilities_ce(torch, U, G, items, bias, targets)

    def fwd(i):
        with torch.no_grad():
            loss_of(*inputs[i % sets])

    if "fwd" in passes:
        emit("fwd", variant, dtype, shape, fwd, score_flops)
    if "fwdbwd" not in passes and "bwd" not in passes:
        return

    leaves = [tuple(t.detach().requires_grad_(True) for t in inp[:4]) for inp in inputs]
    dloss = torch.randn(shape["B"], device=inputs[0][0].device)

    def fwd_bwd(i):
        leaf = leaves[i % sets]
        loss = loss_of(*leaf, inputs[i % sets][4])
        torch.autograd.grad(loss, leaf, dloss)

    if "fwdbwd" in passes:
        emit("bwd", variant, dtype, shape, fwd_bwd, 3 * score_flops, includes_fwd=True)
    if "bwd" not in passes:
        return

    graphs = [loss_of(*leaf, inp[4]) for leaf, inp in zip(leaves, inputs)]

    def bwd(i):
        torch.autograd.grad(graphs[i % sets], leaves[i % sets], dloss, retain_graph=True)

    emit("bwd", variant, dtype, shape, bwd, 2 * score_flops, includes_fwd=False)
    del graphs, leaves


if __name__ == "__main__":
    main()

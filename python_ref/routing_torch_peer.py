"""PyTorch peer for `routing` on the GPU: the yardstick of bench/results.

    python python_ref/routing_torch_peer.py [--out bench/results/routing.jsonl]

What it times, per (dtype, T, E, k):
- fwd: f32 softmax over the logits, torch.topk, the weights, the sort-based
  dispatch plan (stable argsort of the expert ids, bincount, cumsum, scatter of
  row_of_slot), plus the load-balance and z losses, which the moerec op
  computes in the same call (`--no-losses` drops them);
- bwd (`includes_fwd: false`): autograd from dweights and the loss
  coefficients to dZ (f32), replayed on a retained graph;
- bwd with `includes_fwd: true`: the forward with autograd recording, then
  that backward (a training step's whole routing cost).

Floors (DESIGN.md 5) are bytes over the copy bandwidth measured here, read plus
written by a large device-to-device copy. fwd reads T*E logits and writes
indices, weights, counts, offsets, token_of_row and row_of_slot; bwd reads the
logits, dweights and indices and writes dZ. Working sets under ~128 MiB are
timed across rotating copies so the 50 MB L2 does not flatter them. One JSON
line per record on stdout; `--out FILE` also appends them there.
"""

import peer

DTYPES = {"f32": 4, "bf16": 2}
ROTATE_BYTES = 128 << 20


def route(torch, z32, k, losses):
    """Forward of the peer; returns (weights, plan tensors, aux loss)."""
    T, E = z32.shape
    p = torch.softmax(z32, dim=-1)
    weights, idx = torch.topk(p, k, dim=-1, sorted=True)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # rows grouped by expert, tokens ascending
    token_of_row = (order // k).to(torch.int32)
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    row_of_slot = torch.empty_like(flat, dtype=torch.int32)
    row_of_slot[order] = torch.arange(flat.numel(), device=flat.device, dtype=torch.int32)
    aux = None
    if losses:
        f = counts.float() / max(T * k, 1)
        lb = E * (f * p.mean(0)).sum()
        zl = torch.logsumexp(z32, dim=-1).pow(2).mean()
        aux = 0.01 * lb + 0.001 * zl
    plan = (idx, counts, offsets, token_of_row, row_of_slot.view(T, k))
    return weights, plan, aux


def validate(torch, z32, k, weights, plan):
    """Cheap consistency checks before anything is timed (llm.c habit)."""
    idx, counts, offsets, token_of_row, row_of_slot = plan
    T = z32.shape[0]
    assert int(offsets[-1]) == T * k == int(counts.sum())
    rows = row_of_slot.reshape(-1).long()
    tokens = torch.arange(T, device=z32.device).repeat_interleave(k)
    assert torch.equal(token_of_row[rows].long(), tokens)
    p = torch.softmax(z32, -1)
    assert torch.allclose(weights, p.gather(1, idx))


def bench_case(torch, dtype, T, E, k, args, bw):
    """Yield the fwd and bwd records of one shape."""
    elt = DTYPES[dtype]
    tdtype = torch.float32 if dtype == "f32" else torch.bfloat16
    plan_bytes = 4 * (E + (E + 1) + 2 * T * k)
    fwd_bytes = T * E * elt + 8 * T * k + plan_bytes
    bwd_bytes = T * E * elt + 8 * T * k + 4 * T * E
    n_buf = peer.rotations(fwd_bytes + 4 * T * E, ROTATE_BYTES, 2048)

    gen = torch.Generator(device=peer.device()).manual_seed(T * 1009 + E * 31 + k)
    bufs = [torch.randn(T, E, device=peer.device(), dtype=tdtype, generator=gen) for _ in range(n_buf)]
    dweights = torch.randn(T, k, device=peer.device(), generator=gen)
    turn = [0]

    def next_buf():
        turn[0] = (turn[0] + 1) % n_buf
        return turn[0]

    def fwd(_):
        with torch.no_grad():
            route(torch, bufs[next_buf()].float(), k, args.losses)

    # Validate on the first buffer before timing.
    weights, plan, _ = route(torch, bufs[0].float(), k, args.losses)
    validate(torch, bufs[0].float(), k, weights, plan)

    # One retained graph per buffer; autograd.grad w.r.t. the f32 view gives
    # the f32 dZ of the contract and accumulates into nothing.
    graphs = []
    for z in bufs:
        z32 = z.float().requires_grad_(True)
        w, _, aux = route(torch, z32, k, args.losses)
        total = (w * dweights).sum() + (aux if aux is not None else 0.0)
        graphs.append((total, z32))

    def bwd(_):
        total, z32 = graphs[next_buf()]
        torch.autograd.grad(total, z32, retain_graph=True)

    def fwd_bwd(_):
        z32 = bufs[next_buf()].float().detach().requires_grad_(True)
        w, _, aux = route(torch, z32, k, args.losses)
        total = (w * dweights).sum() + (aux if aux is not None else 0.0)
        torch.autograd.grad(total, z32)

    passes = (
        ("fwd", None, fwd, fwd_bytes),
        ("bwd", False, bwd, bwd_bytes),
        ("bwd", True, fwd_bwd, fwd_bytes + bwd_bytes),
    )
    for pass_, includes_fwd, fn, nbytes in passes:
        ms = peer.median_ms(fn, args.warmup, args.iters)
        identity = {"pass": pass_} if includes_fwd is None else {"pass": pass_, "includes_fwd": includes_fwd}
        yield {
            "op": "routing",
            **identity,
            "backend": "torch",
            "dtype": dtype,
            "T": T,
            "E": E,
            "k": k,
            "median_ms": round(ms, 5),
            "gbps": round(nbytes / (ms * 1e-3) / 1e9, 2),
            "floor_ms": round(nbytes / (bw * 1e9) * 1e3, 5),
            "copy_gbps": round(bw, 1),
            "losses": args.losses,
        }
    del graphs, bufs
    peer.empty_cache()


def main():
    import torch

    ap = peer.argument_parser(__doc__)
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 65536, 262144])
    ap.add_argument("--E", type=int, nargs="+", default=[4, 8, 16, 64, 160, 256])
    ap.add_argument("--k", nargs="+", default=["1", "2", "8", "all"], help="ints or 'all' (= E)")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "f32"], choices=sorted(DTYPES))
    ap.add_argument("--no-losses", dest="losses", action="store_false")
    args = peer.parse_args(ap, "routing", warmup=5, iters=25, min_iters=20)

    info = peer.run_info()
    bw = peer.copy_gbps(args.warmup, args.iters)
    with peer.JsonLines(args.out) as out:
        for dtype in args.dtype:
            for T in args.T:
                for E in args.E:
                    for k in peer.top_ks(args.k, E):
                        for rec in bench_case(torch, dtype, T, E, k, args, bw):
                            rec.update(info)
                            out.emit(rec)


if __name__ == "__main__":
    main()

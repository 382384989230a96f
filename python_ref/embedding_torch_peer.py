"""PyTorch peer benchmark for the embedding op (DESIGN 4.1 and 5).

Run on a GPU machine with torch: `python python_ref/embedding_torch_peer.py
[--out FILE] [--iters N]`. Prints one JSON line per (pass, variant, dtype, H,
V, D, T) and appends them to FILE if given. `--H/--V/--D/--T` (all four) pick
one shape instead of the sweep, `--dtype` and `--variant` a subset;
`--device cpu --threads N` runs it on the CPU, beside moerec's CPU backend
(`benches/cpu_peers.rs -- embedding`).

Formulations, the fastest fair ones for each pass:
- fwd: a single `F.embedding` gather on the table viewed as [H*V, D] with
  per-head offset ids `ids[:, None] + h*V`, which yields [T, H, D] in one
  launch (a per-head loop needs H launches plus a stack copy). The offset add
  is timed because the op takes plain ids.
- bwd "index_add": `index_add_` of dy [T*H, D] f32 into a dense f32 [H*V, D]
  gradient (float atomics, so not deterministic; the zero fill is not timed,
  which favours torch).
- bwd "unique_index_add": what moerec's backward returns, the sparse
  gradient: `torch.unique(ids, sorted=True, return_inverse=True)` (sorted
  unique rows) and `index_add_` of dy [T, H*D] into fresh zeros [U, H*D]
  (the unique rows' sums, laid out [U, H, D] where moerec's are [H, U, D];
  the transpose is not timed, which favours torch).
- step "index_add_sgd": the fused sparse SGD step, backward and update in
  one: `index_add_` of dy into the table itself with `alpha=-lr` (each
  token's row subtracted in turn instead of the sum once, the same update
  within rounding). moerec's peer of `backward` + `sgd`.
- bwd "autograd": `torch.autograd.grad` through `F.embedding(sparse=False)`,
  torch's sort-based dense backward; its gradient is in the table's dtype and
  it allocates and zeroes the dense gradient every call.
Ids are int32 (4 bytes, as the op's u32), uniform in [0, V) from a fixed
seed, no padding.

Bytes are the op's contract (DESIGN 5), not what torch moves: fwd reads
T*H*D elements and T ids and writes T*H*D elements; bwd reads dy (T*H*D*4)
and ids and writes U*H*D*4 for the U unique ids. floor_ms is those bytes over
the copy bandwidth (bytes read + written by a 1 GiB device-to-device copy).
Where the bytes an iteration touches fit in twice the L2, the benchmark
rotates over several sets of ids and dy (and of tables, where a table fits
too) so each iteration starts cold.
"""

import itertools

import peer

TRAINING = dict(V=10**6, T=256 * 200)
SERVING = dict(V=10**5, T=256)
HEADS = (1, 4, 8)
WIDTHS = (16, 32, 64, 128)
DTYPES = ("f32", "bf16")
MAX_SETS = 16
WARMUP = 5
VARIANTS = ("gather", "index_add", "unique_index_add", "index_add_sgd", "autograd")
LR = 0.01


def main():
    import torch
    import torch.nn.functional as F

    parser = peer.argument_parser(__doc__)
    for key in ("H", "V", "D", "T"):
        parser.add_argument(f"--{key}", type=int, help="one shape instead of the sweep (all four)")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = peer.parse_args(parser, "embedding", iters=50, min_iters=20, warmup=WARMUP)
    shape_args = (args.H, args.V, args.D, args.T)
    if any(v is not None for v in shape_args) and None in shape_args:
        parser.error("--H, --V, --D and --T go together")
    if any(v is not None and v < 1 for v in shape_args):
        parser.error("--H, --V, --D and --T must be >= 1")

    device = peer.device()
    torch.manual_seed(0)
    l2_bytes = peer.l2_bytes()
    torch_dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    common = dict(op="embedding", backend="torch", **peer.run_info(commit=False))

    def median_ms(step):
        """Median of per-iteration times of step(i), run back to back after warmup."""
        return peer.median_ms(step, args.warmup, args.iters, back_to_back=True)

    copy_gbps = peer.copy_gbps(args.warmup, args.iters, back_to_back=True)
    out = peer.JsonLines(args.out)

    def emit(pass_, variant, dtype, heads, rows, width, tokens, ms, nbytes):
        record = dict(common, **{"pass": pass_, "variant": variant, "dtype": dtype})
        record.update(H=heads, V=rows, D=width, T=tokens, median_ms=ms)
        record.update(gbps=nbytes / ms / 1e6, floor_ms=nbytes / copy_gbps / 1e6)
        out.emit(record)

    if args.H is None:
        sweep = itertools.product((TRAINING, SERVING), args.dtype, HEADS, WIDTHS)
    else:
        sweep = [(dict(V=args.V, T=args.T), dtype, args.H, args.D) for dtype in args.dtype]
    for size, dtype, heads, width in sweep:
        rows, tokens = size["V"], size["T"]
        element = torch.finfo(torch_dtypes[dtype]).bits // 8
        gathered = tokens * heads * width
        table_bytes = heads * rows * width * element
        touched = gathered * (element + 4) + tokens * 4
        sets = peer.rotations(touched, 2 * l2_bytes, MAX_SETS)
        # A table that fits in L2 would stay there: rotate copies too.
        copies = sets if table_bytes < 2 * l2_bytes else 1
        offsets = torch.arange(heads, device=device, dtype=torch.int32) * rows
        tables = [
            torch.randn(heads * rows, width, dtype=torch_dtypes[dtype], device=device)
            for _ in range(copies)
        ]
        generator = torch.Generator(device=device).manual_seed(heads * 1009 + rows * 31 + width + tokens)
        ids = [
            torch.randint(0, rows, (tokens,), dtype=torch.int32, device=device, generator=generator)
            for _ in range(sets)
        ]
        dys = [torch.randn(tokens * heads, width, device=device) for _ in range(sets)]
        shape = (dtype, heads, rows, width, tokens)

        def forward(i):
            j = i % sets
            return F.embedding(ids[j][:, None] + offsets, tables[j % copies])

        if "gather" in args.variant:
            fwd_bytes = 2 * gathered * element + tokens * 4
            emit("fwd", "gather", *shape, median_ms(forward), fwd_bytes)

        unique = torch.unique(ids[0]).numel()
        bwd_bytes = gathered * 4 + tokens * 4 + unique * heads * width * 4

        if "index_add" in args.variant:
            grads = [torch.zeros(heads * rows, width, device=device) for _ in range(copies)]

            def index_add(i):
                j = i % sets
                flat_ids = (ids[j][:, None] + offsets).view(-1)
                grads[j % copies].index_add_(0, flat_ids, dys[j])

            emit("bwd", "index_add", *shape, median_ms(index_add), bwd_bytes)
            del grads

        if "unique_index_add" in args.variant:

            def unique_index_add(i):
                j = i % sets
                rows_, inverse = torch.unique(ids[j], sorted=True, return_inverse=True)
                values = torch.zeros(rows_.numel(), heads * width, device=device)
                return rows_, values.index_add_(0, inverse, dys[j].view(tokens, heads * width))

            emit("bwd", "unique_index_add", *shape, median_ms(unique_index_add), bwd_bytes)

        if "index_add_sgd" in args.variant and dtype == "f32":
            # Reads and writes the U rows of every head besides the backward.
            step_bytes = bwd_bytes + 2 * unique * heads * width * element

            def index_add_sgd(i):
                j = i % sets
                flat_ids = (ids[j][:, None] + offsets).view(-1)
                tables[j % copies].index_add_(0, flat_ids, dys[j], alpha=-LR)

            emit("step", "index_add_sgd", *shape, median_ms(index_add_sgd), step_bytes)

        leaves = outputs = dys_out = None
        if "autograd" in args.variant:
            leaves = [table.requires_grad_() for table in tables]
            outputs = [
                F.embedding((ids[j][:, None] + offsets).view(-1), leaves[j % copies])
                for j in range(sets)
            ]
            # autograd needs dy in the output's dtype.
            dys_out = [dy.to(torch_dtypes[dtype]) for dy in dys]

            def autograd(i):
                j = i % sets
                leaf = leaves[j % copies]
                torch.autograd.grad(outputs[j], leaf, dys_out[j], retain_graph=True)

            emit("bwd", "autograd", *shape, median_ms(autograd), bwd_bytes)
        del tables, leaves, outputs, ids, dys, dys_out
        peer.empty_cache()
    out.close()


if __name__ == "__main__":
    main()

//! moerec's CPU backend beside PyTorch on the CPU, in one run, shape by
//! shape: each round times moerec in this process, then the op's peer
//! (`python_ref/<op>_torch_peer.py --device cpu`, same thread count) for the
//! same shape, so both see the same machine load; the report gives medians
//! over the rounds, the ratio moerec / peer per round (median, min, max: the
//! noise) and, for scoring, the ratio to a bare gemm of the same product
//! timed in the same round.
//!
//! ```sh
//! MOEREC_TORCH_PYTHON=/path/to/python-with-torch \
//!     cargo bench --bench cpu_peers -- [scoring] [scoring-train] [routing] [embedding] [experts] [--rounds 3] [--full] [--heads 4]
//! ```
//!
//! Without `MOEREC_TORCH_PYTHON` the peer is skipped (ratios null).
//! `--heads N` runs the scoring groups at that H only (1 or 4).
//! `scoring`: B = 256, H in {1, 4}, D = 64, V = 10^5; `scoring-train` (or
//! `--full`): the seed models' training shapes, rows 256 x 50, H in {1, 4},
//! D = 64, V = 12,102; `routing` (or `--full`): T = 65,536, E = 64, k = 2,
//! f32, forward and backward with the losses; `embedding` (or `--full`): the
//! lookup forward, backward and backward + SGD at H = 4, V = 10^6, D = 64,
//! T = 51,200 and at Fuxi-MME's training shape (T = 256 x 50, V = 12,102,
//! D = 16, and D = 64); `experts` (or `--full`): the
//! expert layers of issue 13 and of the seed models (`EXPERT_LAYERS`),
//! forward and forward+backward. The peer runs with `OMP_WAIT_POLICY=PASSIVE` and
//! `THP_MEM_ALLOC_ENABLE=1` (huge pages for its large tensors, as moerec's). Threads: rayon's pool (`RAYON_NUM_THREADS`),
//! passed to torch as `--threads`. JSON lines go to stdout and are appended
//! to `MOEREC_BENCH_OUT` (default `bench/results/cpu/cpu_peers.jsonl`), each
//! with the processor, threads, commit (`MOEREC_BENCH_COMMIT` overrides it,
//! for a baseline binary built from other sources), date and command.

use gemm::Parallelism;
use moerec::embedding;
use moerec::experts::{self, Activation};
use moerec::routing::{self, RoutingOptions, TopK};
use moerec::scoring::{self, Mixing, Scoring};
use moerec::{Device, Tensor, TensorRef};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;
use std::time::Instant;

/// Median wall time in ms of `iters` calls after one warm-up call.
fn median_ms(iters: usize, mut step: impl FnMut()) -> f64 {
    step();
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            step();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Deterministic values in [-0.5, 0.5) from a multiplicative hash.
fn values(len: usize, salt: u64) -> Vec<f32> {
    (0..len as u64)
        .map(|i| {
            let h = (i ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
            h as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn git(args: &[&str]) -> String {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// One measured quantity: moerec's times, the peer's and the yardstick's
/// (a bare gemm), one entry per round.
#[derive(Default)]
struct Series {
    moerec: Vec<f64>,
    peer: Vec<f64>,
    bound: Vec<f64>,
}

/// The peer's medians for one shape: (variant, pass) -> ms.
/// `flag value` pairs as command-line arguments.
fn flag_args<V: ToString>(pairs: impl IntoIterator<Item = (&'static str, V)>) -> Vec<String> {
    pairs
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
        .collect()
}

/// Runs the op's peer on the CPU in f32, `iters` timed calls after one
/// warm-up call, with the op's own `args`.
fn run_peer(python: &str, op: &str, iters: usize, args: &[String], threads: usize) -> BTreeMap<(String, String), f64> {
    let script = format!("python_ref/{op}_torch_peer.py");
    let output = Command::new(python)
        .arg(&script)
        .args(["--device", "cpu", "--threads", &threads.to_string()])
        .args(["--dtype", "f32", "--warmup", "1", "--iters", &iters.to_string()])
        // OpenMP workers that spin while waiting steal the cores from each
        // other on a shared machine; rayon's park.
        .env("OMP_WAIT_POLICY", "PASSIVE")
        // moerec's large host buffers ask for transparent huge pages; this
        // is PyTorch's switch for the same (off by default), without which
        // its fresh outputs pay a page fault per 4 KiB.
        .env("THP_MEM_ALLOC_ENABLE", "1")
        .args(args)
        .output();
    let mut medians = BTreeMap::new();
    let output = match output {
        Ok(output) if output.status.success() => output,
        Ok(output) => {
            eprintln!("{script} failed: {}", String::from_utf8_lossy(&output.stderr));
            return medians;
        }
        Err(error) => {
            eprintln!("{script}: {error}");
            return medians;
        }
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let field = |name: &str| -> Option<&str> {
            let start = line.find(&format!("\"{name}\": "))? + name.len() + 4;
            let rest = &line[start..];
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            Some(rest[..end].trim_matches('"'))
        };
        let pass = match (field("pass"), field("includes_fwd")) {
            (Some("bwd"), Some("true")) => "fwdbwd",
            (Some("bwd"), _) => "bwd",
            (Some(pass), _) => pass,
            _ => continue,
        };
        // Peers with one variant per op (routing) name none.
        let variant = field("variant").unwrap_or(op);
        if let Some(ms) = field("median_ms").and_then(|v| v.parse().ok()) {
            medians.insert((variant.to_string(), pass.to_string()), ms);
        }
    }
    medians
}

struct Context {
    python: Option<String>,
    threads: usize,
    rounds: usize,
    records: Vec<String>,
    common: String,
}

impl Context {
    /// Emits one record: `fields` names the op, function, pass and shape (JSON
    /// members), `peer` and `bound` what the ratios are taken against.
    fn record(&mut self, fields: &str, series: &Series, peer: &str, bound: &str) {
        let ratios = |other: &[f64]| -> Option<(f64, f64, f64)> {
            if other.len() != series.moerec.len() || other.is_empty() {
                return None;
            }
            let r: Vec<f64> = series.moerec.iter().zip(other).map(|(m, o)| m / o).collect();
            let min = r.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = r.iter().cloned().fold(0.0, f64::max);
            Some((median(&r), min, max))
        };
        let json_ratio = |r: Option<(f64, f64, f64)>| match r {
            Some((med, min, max)) => format!("{med:.3}, \"min\": {min:.3}, \"max\": {max:.3}"),
            None => "null".into(),
        };
        let ms = |v: &[f64]| {
            if v.is_empty() {
                "null".into()
            } else {
                format!("{:.3}", median(v))
            }
        };
        let line = format!(
            "{{{fields}, \"backend\": \"cpu\", \"dtype\": \"f32\", \
             \"median_ms\": {}, \"rounds_ms\": {:?}, \"peer\": \"{peer}\", \"peer_median_ms\": {}, \
             \"ratio_to_peer\": {{\"median\": {}}}, \"bound\": \"{bound}\", \"bound_median_ms\": {}, \
             \"ratio_to_bound\": {{\"median\": {}}}, {}}}",
            ms(&series.moerec),
            series
                .moerec
                .iter()
                .map(|t| (t * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>(),
            ms(&series.peer),
            json_ratio(ratios(&series.peer)),
            ms(&series.bound),
            json_ratio(ratios(&series.bound)),
            self.common
        );
        println!("{line}");
        self.records.push(line);
    }
}

/// `c = a b` for row-major `a: [m, k]` and `b` given as `bt: [n, k]`, on
/// rayon's threads: the bare product a scoring pass is measured against.
fn gemm_abt(m: usize, n: usize, k: usize, a: &[f32], bt: &[f32], c: &mut [f32], threads: usize) {
    assert!(a.len() == m * k && bt.len() == n * k && c.len() == m * n);
    // SAFETY: a is [m, k], bt [n, k], c [m, n], all row-major and checked
    // above; c is distinct from a and bt.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            bt.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(threads),
        )
    }
}

fn bench_scoring(ctx: &mut Context, batch: usize, heads: usize, width: usize, items: usize) {
    let device = Device::cpu();
    let user = Tensor::from_vec(values(batch * heads * width, 1), &[batch, heads, width], &device).unwrap();
    let gates = Tensor::from_vec(values(batch * heads, 2), &[batch, heads], &device).unwrap();
    let table = Tensor::from_vec(values(heads * items * width, 3), &[heads, items, width], &device).unwrap();
    let targets: Vec<u32> = (0..batch as u64).map(|b| ((b * 7919) % items as u64) as u32).collect();
    let targets = Tensor::from_vec(targets, &[batch], &device).unwrap();
    let dloss = Tensor::from_vec(vec![1.0f32; batch], &[batch], &device).unwrap();
    let n = 100.min(items);
    // The yardsticks: [B, H*D] x [H*D, V] (Logits, top-n), and per head
    // [B, D] x [D, V] followed by e^x of every product (Probabilities).
    let a = values(batch * heads * width, 4);
    let bt = values(items * heads * width, 5);
    let mut c = vec![0f32; batch * items];
    let shape = format!("\"B\": {batch}, \"H\": {heads}, \"D\": {width}, \"V\": {items}");
    let iters = if batch * items * heads * width > 2_000_000_000 {
        3
    } else {
        5
    };
    let mut series: BTreeMap<(&str, &str), Series> = BTreeMap::new();
    for round in 0..ctx.rounds {
        let threads = ctx.threads;
        let gemm_ms = median_ms(iters, || {
            gemm_abt(batch, items, heads * width, &a, &bt, &mut c, threads)
        });
        let gemm_exp_ms = median_ms(iters, || {
            for h in 0..heads {
                let bt = &bt[h * width * items..][..width * items];
                gemm_abt(batch, items, width, &a[..batch * width], bt, &mut c, threads);
                let exps = |chunk: &mut [f32]| chunk.iter_mut().for_each(|x| *x = x.exp());
                rayon::scope(|s| {
                    for chunk in c.chunks_mut(1 << 16) {
                        s.spawn(move |_| exps(chunk));
                    }
                });
            }
        });
        for (name, mixing) in [
            ("logits_ce", Mixing::Logits),
            ("probabilities_ce", Mixing::Probabilities),
        ] {
            let inputs = Scoring::new(&user, &gates, &table).with_mixing(mixing);
            let fwd = median_ms(iters, || drop(scoring::cross_entropy(&inputs, &targets, None).unwrap()));
            let both = median_ms(iters.min(3), || {
                let (_, saved) = scoring::cross_entropy(&inputs, &targets, None).unwrap();
                drop(scoring::cross_entropy_backward(&inputs, &dloss, &saved).unwrap());
            });
            let bound = if mixing == Mixing::Logits { gemm_ms } else { gemm_exp_ms };
            let entry = series.entry((name, "fwd")).or_default();
            entry.moerec.push(fwd);
            entry.bound.push(bound);
            let entry = series.entry((name, "fwdbwd")).or_default();
            entry.moerec.push(both);
            entry.bound.push(3.0 * gemm_ms);
        }
        for (name, mixing) in [
            ("scores_topk", Mixing::Logits),
            ("probabilities_topk", Mixing::Probabilities),
        ] {
            let inputs = Scoring::new(&user, &gates, &table).with_mixing(mixing);
            let ms = median_ms(iters, || drop(scoring::topk(&inputs, n, None).unwrap()));
            let entry = series.entry((name, "fwd")).or_default();
            entry.moerec.push(ms);
            entry
                .bound
                .push(if mixing == Mixing::Logits { gemm_ms } else { gemm_exp_ms });
        }
        if let Some(python) = ctx.python.clone() {
            // As many timed calls as moerec's, and only the passes compared
            // (not the backward on a retained graph): at the training shapes
            // one call of the peer takes seconds.
            let mut args: Vec<String> = [
                "--max-materialised",
                "3e9",
                "--passes",
                "fwd",
                "fwdbwd",
                "--variant",
                "logits_ce",
                "probabilities_ce",
                "scores_topk",
            ]
            .map(String::from)
            .to_vec();
            args.extend(flag_args([
                ("--B", batch),
                ("--H", heads),
                ("--D", width),
                ("--V", items),
            ]));
            let peer = run_peer(&python, "scoring", iters, &args, ctx.threads);
            for ((name, pass), entry) in series.iter_mut() {
                if let Some(&ms) = peer.get(&(name.to_string(), pass.to_string())) {
                    entry.peer.push(ms);
                }
            }
        }
        eprintln!("scoring {shape}: round {} of {} done", round + 1, ctx.rounds);
    }
    for ((name, pass), s) in &series {
        let (function, bound) = match *name {
            "logits_ce" | "probabilities_ce" if *pass == "fwdbwd" => ("cross_entropy", "3 x gemm [B, H*D] x [H*D, V]"),
            "logits_ce" => ("cross_entropy", "gemm [B, H*D] x [H*D, V]"),
            "probabilities_ce" => ("cross_entropy", "H x gemm [B, D] x [D, V] + e^x of each product"),
            "scores_topk" => ("topk", "gemm [B, H*D] x [H*D, V]"),
            _ => ("topk", "H x gemm [B, D] x [D, V] + e^x of each product"),
        };
        let mixing = if name.starts_with("prob") {
            "probabilities"
        } else {
            "logits"
        };
        let fields = format!(
            "\"op\": \"scoring\", \"function\": \"{function}\", \"mixing\": \"{mixing}\", \"pass\": \"{pass}\", {shape}"
        );
        ctx.record(&fields, s, &format!("torch {name}"), bound);
    }
}

/// Routing forward, backward and forward + backward (with the load-balance
/// and z losses) of `tokens` rows over `experts` experts, top-`k`, f32
/// logits, beside `routing_torch_peer.py` at the same shape. The bound is a
/// copy of the logits.
fn bench_routing(ctx: &mut Context, tokens: usize, experts: usize, k: usize) {
    let device = Device::cpu();
    let logits = values(tokens * experts, 11).iter().map(|v| 8.0 * v).collect();
    let data = Tensor::from_vec(logits, &[tokens, experts], &device).unwrap();
    let options = RoutingOptions::new(TopK::K(k));
    let dweights = Tensor::from_vec(values(tokens * k, 12), &[tokens, k], &device).unwrap();
    let shape = format!("\"T\": {tokens}, \"E\": {experts}, \"k\": {k}");
    let mut series: BTreeMap<&str, Series> = BTreeMap::new();
    for round in 0..ctx.rounds {
        let source = values(tokens * experts, 13);
        let mut copy = vec![0f32; tokens * experts];
        let copy_ms = median_ms(9, || copy.copy_from_slice(&source));
        let fwd = median_ms(9, || drop(routing::forward(&data, &options).unwrap()));
        let (_, saved) = routing::forward(&data, &options).unwrap();
        let bwd = median_ms(9, || {
            drop(routing::backward(&data, &dweights, 0.01, 0.001, &saved).unwrap())
        });
        let both = median_ms(9, || {
            let (_, saved) = routing::forward(&data, &options).unwrap();
            drop(routing::backward(&data, &dweights, 0.01, 0.001, &saved).unwrap())
        });
        for (pass, ms) in [("fwd", fwd), ("bwd", bwd), ("fwdbwd", both)] {
            let entry = series.entry(pass).or_default();
            entry.moerec.push(ms);
            entry.bound.push(copy_ms);
        }
        if let Some(python) = ctx.python.clone() {
            let args = flag_args([("--T", tokens), ("--E", experts), ("--k", k)]);
            let peer = run_peer(&python, "routing", 9, &args, ctx.threads);
            for (pass, entry) in series.iter_mut() {
                if let Some(&ms) = peer.get(&("routing".to_string(), pass.to_string())) {
                    entry.peer.push(ms);
                }
            }
        }
        eprintln!("routing {shape}: round {} of {} done", round + 1, ctx.rounds);
    }
    for (pass, s) in &series {
        let fields = format!("\"op\": \"routing\", \"function\": \"{pass}\", \"pass\": \"{pass}\", {shape}");
        ctx.record(&fields, s, "torch routing (with losses)", "copy of the [T, E] logits");
    }
}

/// The lookup forward, backward and fused SGD step of `tokens` uniform ids
/// (no padding) in `heads` tables `[V, D]` f32, beside
/// `embedding_torch_peer.py` at the same shape (its own uniform ids, same
/// distribution). The backward is compared with the peer that returns the
/// same thing, the sparse gradient (`torch.unique` + `index_add_` into the
/// unique rows), and with `index_add_` into a dense gradient whose zero fill
/// is not timed; backward + `sgd` with `index_add_(alpha = -lr)` into the
/// table. The bound is a copy of `[T, H, D]` f32 (dy, or the forward's output).
fn bench_embedding(ctx: &mut Context, heads: usize, rows: usize, width: usize, tokens: usize) {
    let device = Device::cpu();
    // Operands in moerec's own allocation (Tensor::zeros: huge pages from
    // 4 MiB), as the peer's are in PyTorch's with THP_MEM_ALLOC_ENABLE: a
    // table in 4 KiB pages costs a TLB miss per looked-up row on either side.
    let own = |data: Vec<f32>, shape: &[usize]| {
        let mut tensor = Tensor::zeros(shape, &device).unwrap();
        tensor.as_mut_slice().unwrap().copy_from_slice(&data);
        tensor
    };
    let mut table = own(values(heads * rows * width, 21), &[heads, rows, width]);
    let ids: Vec<u32> = (0..tokens as u64)
        .map(|t| ((t ^ 0x5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32 % rows as u32)
        .collect();
    let ids = Tensor::from_vec(ids, &[tokens], &device).unwrap();
    let dy = own(values(tokens * heads * width, 22), &[tokens, heads, width]);
    let shape = format!("\"H\": {heads}, \"V\": {rows}, \"D\": {width}, \"T\": {tokens}");
    let iters = 9;
    // (function, pass, peer variant, peer pass) of each record.
    let records = [
        ("forward", "fwd", "gather", "fwd"),
        ("backward", "bwd", "unique_index_add", "bwd"),
        ("backward", "bwd", "index_add", "bwd"),
        ("backward+sgd", "step", "index_add_sgd", "step"),
    ];
    let mut series: BTreeMap<(&str, &str), Series> = BTreeMap::new();
    for round in 0..ctx.rounds {
        let source = values(tokens * heads * width, 23);
        let mut copy = vec![0f32; tokens * heads * width];
        let copy_ms = median_ms(iters, || copy.copy_from_slice(&source));
        let fwd = median_ms(iters, || drop(embedding::forward(&table, &ids, None).unwrap()));
        let (_, saved) = embedding::forward(&table, &ids, None).unwrap();
        let bwd = median_ms(iters, || drop(embedding::backward(&dy, &saved).unwrap()));
        let step = median_ms(iters, || {
            let grad = embedding::backward(&dy, &saved).unwrap();
            embedding::sgd(&mut table, &grad, 0.01).unwrap();
        });
        for (function, _, variant, _) in records {
            let entry = series.entry((function, variant)).or_default();
            entry.moerec.push(match function {
                "forward" => fwd,
                "backward" => bwd,
                _ => step,
            });
            entry.bound.push(copy_ms);
        }
        if let Some(python) = ctx.python.clone() {
            let mut args = vec!["--variant".to_string()];
            args.extend(records.iter().map(|r| r.2.to_string()));
            args.extend(flag_args([
                ("--H", heads),
                ("--V", rows),
                ("--D", width),
                ("--T", tokens),
            ]));
            let peer = run_peer(&python, "embedding", iters, &args, ctx.threads);
            for (function, _, variant, peer_pass) in records {
                if let Some(&ms) = peer.get(&(variant.to_string(), peer_pass.to_string())) {
                    series.get_mut(&(function, variant)).unwrap().peer.push(ms);
                }
            }
        }
        eprintln!("embedding {shape}: round {} of {} done", round + 1, ctx.rounds);
    }
    for (function, pass, variant, _) in records {
        let fields = format!("\"op\": \"embedding\", \"function\": \"{function}\", \"pass\": \"{pass}\", {shape}");
        let peer = match variant {
            "unique_index_add" => "torch unique + index_add_ (sparse, rows [U, H, D])",
            "index_add" => "torch index_add_ into a dense [H*V, D] (zero fill untimed)",
            "index_add_sgd" => "torch index_add_(alpha=-lr) into the table",
            _ => "torch F.embedding on [H*V, D] with offset ids",
        };
        ctx.record(&fields, &series[&(function, variant)], peer, "copy of [T, H, D] f32");
    }
}

/// One expert layer benchmarked by [`bench_experts`]: the op's shape and
/// variant as a model calls it.
struct ExpertLayer {
    /// What calls the layer this way (the record's `function`).
    name: &'static str,
    tokens: usize,
    experts: usize,
    /// Experts per token; None is k = All (every token to every expert).
    k: Option<usize>,
    din: usize,
    dout: usize,
    activation: Activation,
    bias: bool,
    /// `layer_forward_rows` on `x_rows: [R, Din]` in plan order (the second
    /// layer of an FFN) instead of `layer_forward` on `x: [T, Din]`.
    rows: bool,
}

/// The expert layers of issue 13 and of the seed models, f32: the issue's
/// T = 51,200 (256 x 200), 256 -> 256, E = 8, k = 2, SwiGlu; FAME's query
/// experts (rows 256 x 50, D = 64 -> dh = 16, H·N = 16 experts, k = All,
/// bias, no activation); Fuxi-MME's FFN (rows 256 x 50, D = 64, E = 4, k = 2:
/// the SwiGlu layer up and the rows layer down).
const EXPERT_LAYERS: [ExpertLayer; 4] = [
    ExpertLayer {
        name: "layer",
        tokens: 51_200,
        experts: 8,
        k: Some(2),
        din: 256,
        dout: 256,
        activation: Activation::SwiGlu,
        bias: false,
        rows: false,
    },
    ExpertLayer {
        name: "fame_query_experts",
        tokens: 12_800,
        experts: 16,
        k: None,
        din: 64,
        dout: 16,
        activation: Activation::None,
        bias: true,
        rows: false,
    },
    ExpertLayer {
        name: "fuxi_mme_up",
        tokens: 12_800,
        experts: 4,
        k: Some(2),
        din: 64,
        dout: 64,
        activation: Activation::SwiGlu,
        bias: false,
        rows: false,
    },
    ExpertLayer {
        name: "fuxi_mme_down",
        tokens: 12_800,
        experts: 4,
        k: Some(2),
        din: 64,
        dout: 64,
        activation: Activation::None,
        bias: false,
        rows: true,
    },
];

/// One expert layer's forward (`y` and the saved `h`) and forward+backward
/// (plus `dx`, `dW` and, with a bias, `db`), f32, beside
/// `experts_torch_peer.py` at the same shape: the faster per round of its
/// per-expert `torch.mm`/`addmm` loop and `torch._grouped_mm`, both with
/// the gather (unless `rows`), bias and activation, gradients by
/// `autograd.grad`. Plans come from `routing::forward` on fixed logits (the
/// peer's from the top-k of its own random logits: both near-balanced),
/// outside the timed region. The bound is a bare gemm of the same FLOPs,
/// `[R, Din] x [Din, Dout']` (3 of them for fwd+bwd).
fn bench_experts(ctx: &mut Context, layer: &ExpertLayer) {
    let ExpertLayer {
        tokens,
        experts: count,
        din,
        dout,
        activation,
        ..
    } = *layer;
    let device = Device::cpu();
    let logits = values(tokens * count, 21).iter().map(|v| 8.0 * v).collect();
    let logits = Tensor::from_vec(logits, &[tokens, count], &device).unwrap();
    let top_k = layer.k.map_or(TopK::All, TopK::K);
    let plan = routing::forward(&logits, &RoutingOptions::new(top_k)).unwrap().0.plan;
    let k = layer.k.unwrap_or(count);
    let (rows, width) = (tokens * k, activation.width(dout));
    let inputs = if layer.rows { rows } else { tokens };
    let x = Tensor::from_vec(values(inputs * din, 22), &[inputs, din], &device).unwrap();
    let scale = 2.0 / (din as f32).sqrt();
    let w = values(count * din * width, 23).iter().map(|v| scale * v).collect();
    let w = Tensor::from_vec(w, &[count, din, width], &device).unwrap();
    let bias = layer
        .bias
        .then(|| Tensor::from_vec(values(count * width, 24), &[count, width], &device).unwrap());
    let dy = Tensor::from_vec(values(rows * dout, 25), &[rows, dout], &device).unwrap();
    let forward = || {
        let bias = bias.as_ref().map(TensorRef::from);
        if layer.rows {
            experts::layer_forward_rows(&x, &plan, &w, bias, activation).unwrap()
        } else {
            experts::layer_forward(&x, &plan, &w, bias, activation).unwrap()
        }
    };
    let a = values(rows * din, 26);
    let bt = values(width * din, 27);
    let mut c = vec![0f32; rows * width];
    let iters = if rows * din * width > 1 << 30 { 3 } else { 5 };
    let activation_name = format!("{activation:?}").to_lowercase();
    let shape = format!(
        "\"T\": {tokens}, \"E\": {count}, \"k\": {k}, \"Din\": {din}, \"Dout\": {dout}, \
         \"activation\": \"{activation_name}\", \"bias\": {}, \"rows\": {}",
        layer.bias, layer.rows
    );
    let mut series: BTreeMap<&str, Series> = BTreeMap::new();
    for round in 0..ctx.rounds {
        let threads = ctx.threads;
        let gemm_ms = median_ms(iters, || gemm_abt(rows, width, din, &a, &bt, &mut c, threads));
        let fwd = median_ms(iters, || drop(forward()));
        let both = median_ms(iters, || {
            let (_, saved) = forward();
            drop(experts::layer_backward(&dy, &x, &plan, &w, &saved).unwrap());
        });
        for (pass, ms, bound) in [("fwd", fwd, gemm_ms), ("fwdbwd", both, 3.0 * gemm_ms)] {
            let entry = series.entry(pass).or_default();
            entry.moerec.push(ms);
            entry.bound.push(bound);
        }
        if let Some(python) = ctx.python.clone() {
            let mut args: Vec<String> = [
                "--shapes",
                "recsys",
                "--variants",
                "loop",
                "grouped_mm",
                "--passes",
                "fwd",
                "fwdbwd",
            ]
            .map(String::from)
            .to_vec();
            let k_arg = layer.k.map_or("all".to_string(), |k| k.to_string());
            args.extend(flag_args([
                ("--T", tokens.to_string()),
                ("--E", count.to_string()),
                ("--k", k_arg),
                ("--din", din.to_string()),
                ("--dout", dout.to_string()),
                ("--activation", activation_name.clone()),
            ]));
            args.extend(
                [("--bias", layer.bias), ("--rows", layer.rows)]
                    .into_iter()
                    .filter(|&(_, on)| on)
                    .map(|(flag, _)| flag.to_string()),
            );
            let peer = run_peer(&python, "experts", iters, &args, ctx.threads);
            for (pass, entry) in series.iter_mut() {
                let best = ["loop", "grouped_mm"]
                    .iter()
                    .filter_map(|variant| peer.get(&(variant.to_string(), pass.to_string())))
                    .copied()
                    .reduce(f64::min);
                if let Some(ms) = best {
                    entry.peer.push(ms);
                }
            }
        }
        eprintln!(
            "experts {} {shape}: round {} of {} done",
            layer.name,
            round + 1,
            ctx.rounds
        );
    }
    for (pass, s) in &series {
        let fields = format!(
            "\"op\": \"experts\", \"function\": \"{}\", \"pass\": \"{pass}\", {shape}",
            layer.name
        );
        let bound = if *pass == "fwd" {
            "gemm [R, Din] x [Din, Dout']"
        } else {
            "3 x gemm [R, Din] x [Din, Dout']"
        };
        ctx.record(&fields, s, "torch min(loop of mm/addmm, _grouped_mm)", bound);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name);
    let rounds = flag("--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let full = flag("--full").is_some();
    // The peer's scoring calls at the training shapes take minutes; one H
    // at a time fits a session.
    let heads_filter: Option<usize> = flag("--heads")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok());
    let scoring_heads: Vec<usize> = [1, 4]
        .into_iter()
        .filter(|h| heads_filter.map_or(true, |f| f == *h))
        .collect();
    assert!(
        !scoring_heads.is_empty(),
        "--heads: expected 1 or 4, got {heads_filter:?}"
    );
    let ops: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["scoring", "scoring-train", "routing", "embedding", "experts"].contains(a))
        .collect();
    let threads = rayon::current_num_threads();
    let command = format!("cargo bench --bench cpu_peers -- {}", args.join(" "));
    let common = format!(
        "\"device\": \"{}\", \"threads\": {threads}, \"commit\": \"{}\", \"date\": \"{}\", \"command\": \"{}\"",
        cpu_name(),
        // A baseline binary built from other sources says which.
        std::env::var("MOEREC_BENCH_COMMIT").unwrap_or_else(|_| git(&["rev-parse", "--short", "HEAD"])),
        Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        command.trim()
    );
    let python = std::env::var("MOEREC_TORCH_PYTHON").ok();
    if python.is_none() {
        eprintln!("note: MOEREC_TORCH_PYTHON not set; the PyTorch peer is skipped");
    }
    let mut ctx = Context {
        python,
        threads,
        rounds,
        records: Vec::new(),
        common,
    };
    if ops.is_empty() || ops.contains(&"scoring") {
        for &heads in &scoring_heads {
            bench_scoring(&mut ctx, 256, heads, 64, 100_000);
        }
    }
    if full || ops.contains(&"scoring-train") {
        for &heads in &scoring_heads {
            bench_scoring(&mut ctx, 256 * 50, heads, 64, 12_102);
        }
    }
    if full || ops.contains(&"routing") {
        bench_routing(&mut ctx, 65_536, 64, 2);
    }
    if full || ops.contains(&"embedding") {
        // Issue 13's shape, then Fuxi-MME's lookup at the training shape
        // (tables [4, V+1, D/4], D = 64) and the same at D = 64 per head.
        for (heads, rows, width, tokens) in [
            (4, 1_000_000, 64, 51_200),
            (4, 12_102, 16, 12_800),
            (4, 12_102, 64, 12_800),
        ] {
            bench_embedding(&mut ctx, heads, rows, width, tokens);
        }
    }
    if full || ops.contains(&"experts") {
        for layer in &EXPERT_LAYERS {
            bench_experts(&mut ctx, layer);
        }
    }
    let out = std::env::var("MOEREC_BENCH_OUT").unwrap_or_else(|_| "bench/results/cpu/cpu_peers.jsonl".into());
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)
        .unwrap();
    for line in &ctx.records {
        writeln!(file, "{line}").unwrap();
    }
}

//! Top-k routing (DESIGN 4.2) against the NumPy golden files, CPU against
//! CUDA, determinism, and every error case. Each body runs on every device
//! present.

mod common;

use common::{assert_close, for_each_golden, rtol, Golden, Rng};
use half::{bf16, f16};
use moerec::routing::{self, RoutingOptions, Score, TopK};
use moerec::{DType, Device, Element, Error, FloatElement, Tensor, TensorRef};

fn tensor<T: Element>(data: Vec<T>, shape: &[usize], device: &Device) -> Tensor<T> {
    Tensor::from_vec(data, shape, device).unwrap()
}

/// Everything a forward and a backward produce, on the host.
#[derive(Debug, Clone, PartialEq)]
struct Outputs {
    indices: Vec<u32>,
    weights: Vec<f32>,
    counts: Vec<u32>,
    offsets: Vec<u32>,
    token_of_row: Vec<u32>,
    row_of_slot: Vec<u32>,
    gate_mass: Vec<f32>,
    lb_loss: f32,
    z_loss: f32,
    dlogits: Vec<f32>,
}

impl Outputs {
    /// The floats as bits, for bitwise comparisons.
    fn float_bits(&self) -> Vec<u32> {
        [&self.weights, &self.gate_mass, &self.dlogits]
            .into_iter()
            .flatten()
            .chain([&self.lb_loss, &self.z_loss])
            .map(|x| x.to_bits())
            .collect()
    }
}

/// A routing problem on the host; `run` puts it on a device.
struct Problem<T> {
    tokens: usize,
    experts: usize,
    logits: Vec<T>,
    k: TopK,
    score: Score,
    renormalize: bool,
    expert_mask: Option<Vec<u32>>,
    token_mask: Option<Vec<u32>>,
    selection_bias: Option<Vec<f32>>,
    dweights: Vec<f32>,
    lb_coef: f32,
    z_coef: f32,
    groups: usize,
}

impl<T: FloatElement> Problem<T> {
    fn run(&self, device: &Device) -> moerec::Result<Outputs> {
        let logits = tensor(self.logits.clone(), &[self.tokens, self.experts], device);
        let expert_mask = self.expert_mask.clone().map(|m| tensor(m, &[self.experts], device));
        let token_mask = self.token_mask.clone().map(|m| tensor(m, &[self.tokens], device));
        let bias = self.selection_bias.clone().map(|b| tensor(b, &[self.experts], device));
        let mut options = RoutingOptions::new(self.k)
            .with_score(self.score)
            .with_renormalize(self.renormalize)
            .with_groups(self.groups);
        options.expert_mask = expert_mask.as_ref().map(TensorRef::from);
        options.token_mask = token_mask.as_ref().map(TensorRef::from);
        options.selection_bias = bias.as_ref().map(TensorRef::from);
        let (out, saved) = routing::forward(&logits, &options)?;
        let (k, rows) = (saved.config().k, self.tokens * self.groups);
        let dweights = tensor(self.dweights[..rows * k].to_vec(), &[rows, k], device);
        let dlogits = routing::backward(&logits, &dweights, self.lb_coef, self.z_coef, &saved)?;
        assert_eq!(out.indices.shape(), &[rows, k]);
        assert_eq!(dlogits.shape(), &[self.tokens, self.experts]);
        Ok(Outputs {
            indices: out.indices.to_vec()?,
            weights: out.weights.to_vec()?,
            counts: out.plan.counts.to_vec()?,
            offsets: out.plan.offsets.to_vec()?,
            token_of_row: out.plan.token_of_row.to_vec()?,
            row_of_slot: out.plan.row_of_slot.to_vec()?,
            gate_mass: out.gate_mass.to_vec()?,
            lb_loss: out.lb_loss.to_vec()?[0],
            z_loss: out.z_loss.to_vec()?[0],
            dlogits: dlogits.to_vec()?,
        })
    }

    /// Fresh logits N(0, 2)-ish with a few exact ties and -inf entries, and
    /// the options asked for; one group.
    fn random(seed: u64, tokens: usize, experts: usize, k: TopK, score: Score, masked: bool) -> Problem<T> {
        Self::random_grouped(seed, tokens, experts, 1, k, score, masked)
    }

    /// As `random`, with `groups` groups of experts (the expert mask repeats
    /// one group's pattern, so every group has as many active experts).
    fn random_grouped(
        seed: u64,
        tokens: usize,
        experts: usize,
        groups: usize,
        k: TopK,
        score: Score,
        masked: bool,
    ) -> Problem<T> {
        let group_experts = experts / groups;
        let mut rng = Rng::new(seed);
        let mut logits: Vec<T> = (0..tokens * experts)
            .map(|_| match rng.below(40) {
                0 => T::from_f32(f32::NEG_INFINITY),
                1 => T::from_f32(0.5),
                _ => T::from_f32(2.0 * rng.signed_unit()),
            })
            .collect();
        for row in logits.chunks_mut(group_experts) {
            row[0] = T::from_f32(rng.signed_unit()); // never an all -inf row
        }
        let expert_mask = masked.then(|| {
            let mut mask: Vec<u32> = (0..group_experts).map(|_| u32::from(rng.below(4) != 0)).collect();
            mask[0] = 1;
            mask.repeat(groups)
        });
        let active = expert_mask
            .as_ref()
            .map_or(group_experts, |m| m[..group_experts].iter().sum::<u32>() as usize);
        let k = match k {
            TopK::K(k) => TopK::K(k.min(active)),
            all => all,
        };
        Problem {
            tokens,
            experts,
            logits,
            k,
            score,
            renormalize: seed % 2 == 0,
            expert_mask,
            token_mask: masked.then(|| (0..tokens).map(|_| u32::from(rng.below(5) != 0)).collect()),
            selection_bias: masked.then(|| (0..experts).map(|_| rng.signed_unit()).collect()),
            dweights: (0..tokens * experts).map(|_| rng.signed_unit()).collect(),
            lb_coef: 0.5,
            z_coef: 0.125,
            groups,
        }
    }
}

fn golden_problem<T: FloatElement>(golden: &Golden) -> Problem<T> {
    let logits = golden.tensor("logits");
    let (tokens, experts) = (logits.shape[0], logits.shape[1]);
    let optional_u32 = |name: &str| golden.tensors.get(name).map(|t| t.u32());
    Problem {
        tokens,
        experts,
        logits: logits.elements::<T>(),
        k: match golden.meta("k_all") {
            "true" => TopK::All,
            _ => TopK::K(golden.meta("k").parse().unwrap()),
        },
        score: match golden.meta("score") {
            "softmax" => Score::Softmax,
            "sigmoid" => Score::Sigmoid,
            other => panic!("{}: unknown score {other}", golden.name),
        },
        renormalize: golden.meta("renormalize") == "true",
        expert_mask: optional_u32("expert_mask"),
        token_mask: optional_u32("token_mask"),
        selection_bias: golden.tensors.get("selection_bias").map(|t| t.f32()),
        dweights: golden.tensor("dweights").f32(),
        lb_coef: golden.meta("lb_coef").parse().unwrap(),
        z_coef: golden.meta("z_coef").parse().unwrap(),
        groups: golden.meta("groups").parse().unwrap(),
    }
}

fn check_golden<T: FloatElement>(golden: &Golden, device: &Device) {
    let what = |part: &str| format!("{} on {device}: {part}", golden.name);
    let out = golden_problem::<T>(golden).run(device).unwrap();
    for (name, actual) in [
        ("indices", &out.indices),
        ("counts", &out.counts),
        ("offsets", &out.offsets),
        ("token_of_row", &out.token_of_row),
        ("row_of_slot", &out.row_of_slot),
    ] {
        assert_eq!(actual, &golden.tensor(name).u32(), "{}", what(name));
    }
    let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    for (name, actual) in [
        ("weights", f64s(&out.weights)),
        ("gate_mass", f64s(&out.gate_mass)),
        ("lb_loss", vec![f64::from(out.lb_loss)]),
        ("z_loss", vec![f64::from(out.z_loss)]),
        ("dlogits", f64s(&out.dlogits)),
    ] {
        assert_close(&what(name), &actual, &golden.tensor(name).values, rtol::<T>(true));
    }
}

fn matches_the_numpy_golden_files(device: &Device) {
    for_each_golden!("routing", check_golden, device);
}

fn outputs_and_saved_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<routing::Routing>();
    check::<routing::Saved>();
}

fn a_hand_checked_plan(device: &Device) {
    let inf = f32::NEG_INFINITY;
    let logits = tensor(vec![1.0f32, 2.0, 3.0, 0.0, 0.0, 0.0, inf, 1.0, inf], &[3, 3], device);
    let (out, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(2))).unwrap();
    assert_eq!(out.indices.to_vec().unwrap(), vec![2, 1, 0, 1, 1, 0], "{device}");
    assert_eq!(out.plan.counts.to_vec().unwrap(), vec![2, 3, 1]);
    assert_eq!(out.plan.offsets.to_vec().unwrap(), vec![0, 2, 5, 6]);
    assert_eq!(out.plan.token_of_row.to_vec().unwrap(), vec![1, 2, 0, 1, 2, 0]);
    assert_eq!(out.plan.row_of_slot.to_vec().unwrap(), vec![5, 2, 0, 3, 4, 1]);
    let weights = out.weights.to_vec().unwrap();
    assert_eq!(&weights[4..], &[1.0, 0.0], "{device}: -inf takes no mass");
}

fn assert_parity(what: &str, cpu: &Outputs, gpu: &Outputs) {
    assert_eq!(cpu.indices, gpu.indices, "{what}: indices");
    assert_eq!(cpu.counts, gpu.counts, "{what}: counts");
    assert_eq!(cpu.offsets, gpu.offsets, "{what}: offsets");
    assert_eq!(cpu.token_of_row, gpu.token_of_row, "{what}: token_of_row");
    assert_eq!(cpu.row_of_slot, gpu.row_of_slot, "{what}: row_of_slot");
    // Both backends compute in f32 from the same inputs: the f32 tolerance
    // for reductions, whatever the element type.
    let tolerance = rtol::<f32>(true);
    let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    assert_close(
        &format!("{what}: weights"),
        &f64s(&gpu.weights),
        &f64s(&cpu.weights),
        tolerance,
    );
    assert_close(
        &format!("{what}: gate_mass"),
        &f64s(&gpu.gate_mass),
        &f64s(&cpu.gate_mass),
        tolerance,
    );
    assert_close(
        &format!("{what}: losses"),
        &f64s(&[gpu.lb_loss, gpu.z_loss]),
        &f64s(&[cpu.lb_loss, cpu.z_loss]),
        tolerance,
    );
    assert_close(
        &format!("{what}: dlogits"),
        &f64s(&gpu.dlogits),
        &f64s(&cpu.dlogits),
        tolerance,
    );
}

fn parity_case<T: FloatElement>(cuda: &Device, tokens: usize, experts: usize, k: TopK, masked: bool) {
    for score in [Score::Softmax, Score::Sigmoid] {
        let seed = (tokens * 7919 + experts * 31 + masked as usize) as u64 + score as u64;
        let problem = Problem::<T>::random(seed, tokens, experts, k, score, masked);
        let what = format!("{:?} T{tokens} E{experts} {k:?} {score:?} masked {masked}", T::DTYPE);
        let cpu = problem.run(&Device::cpu()).unwrap();
        let gpu = problem.run(cuda).unwrap();
        assert_parity(&what, &cpu, &gpu);
    }
}

fn cpu_and_cuda_agree_on_fresh_inputs(cuda: &Device) {
    for &(tokens, experts) in &[
        (700, 1),
        (700, 5),
        (500, 144),
        (500, 160),
        (300, 384),
        (200, 1024),
        (3, 8),
    ] {
        for k in [TopK::K(1), TopK::K(2), TopK::K(8), TopK::All] {
            if matches!(k, TopK::K(k) if k > experts) {
                continue;
            }
            for masked in [false, true] {
                parity_case::<f32>(cuda, tokens, experts, k, masked);
                parity_case::<bf16>(cuda, tokens, experts, k, masked);
            }
        }
    }
    parity_case::<f16>(cuda, 5000, 64, TopK::K(8), true);
    // Many forward blocks (statistics summed over several partial rows), and
    // an expert count that opts in to more shared memory.
    parity_case::<bf16>(cuda, 70_000, 8, TopK::K(2), true);
    parity_case::<f32>(cuda, 64, 4096, TopK::K(4), false);
    // Grouped: FAME's heads, groups of one expert, and rows wider than a warp.
    for &(tokens, experts, groups, k) in &[
        (300, 32, 4, TopK::All),
        (300, 24, 3, TopK::K(2)),
        (200, 6, 6, TopK::K(1)),
        (100, 200, 2, TopK::K(8)),
    ] {
        for masked in [false, true] {
            for score in [Score::Softmax, Score::Sigmoid] {
                let seed = (tokens * 31 + experts * 7 + groups) as u64 + score as u64;
                let problem = Problem::<bf16>::random_grouped(seed, tokens, experts, groups, k, score, masked);
                let what = format!("T{tokens} E{experts} G{groups} {k:?} {score:?} masked {masked}");
                assert_parity(
                    &what,
                    &problem.run(&Device::cpu()).unwrap(),
                    &problem.run(cuda).unwrap(),
                );
            }
        }
    }
}

fn outputs_are_bitwise_identical_across_runs_and_thread_counts(device: &Device) {
    let plain = Problem::<bf16>::random(42, 3000, 96, TopK::K(4), Score::Softmax, true);
    let grouped = Problem::<bf16>::random_grouped(43, 1000, 96, 4, TopK::K(3), Score::Sigmoid, true);
    for problem in [plain, grouped] {
        let first = problem.run(device).unwrap();
        let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let second = single.install(|| problem.run(device).unwrap());
        assert_eq!(first.indices, second.indices, "{device}");
        assert_eq!(first.token_of_row, second.token_of_row, "{device}");
        assert_eq!(first.float_bits(), second.float_bits(), "{device}: floats");
    }
}

fn the_plan_groups_rows_by_expert_in_ascending_token_order(device: &Device) {
    let problem = Problem::<f32>::random(7, 2000, 13, TopK::K(3), Score::Sigmoid, true);
    let out = problem.run(device).unwrap();
    let token_mask = problem.token_mask.as_ref().unwrap();
    let valid = token_mask.iter().filter(|&&m| m == 1).count();
    assert_eq!(out.token_of_row.len(), 3 * valid, "{device}");
    assert_eq!(*out.offsets.last().unwrap() as usize, 3 * valid);
    for e in 0..13 {
        let rows = &out.token_of_row[out.offsets[e] as usize..out.offsets[e + 1] as usize];
        assert_eq!(rows.len() as u32, out.counts[e]);
        assert!(rows.windows(2).all(|w| w[0] < w[1]), "{device}: expert {e}");
        assert!(rows.is_empty() || problem.expert_mask.as_ref().unwrap()[e] == 1);
    }
    for (t, &valid) in token_mask.iter().enumerate() {
        for j in t * 3..(t + 1) * 3 {
            let (expert, row) = (out.indices[j], out.row_of_slot[j]);
            if valid == 0 {
                assert_eq!((expert, row, out.weights[j]), (u32::MAX, u32::MAX, 0.0));
                continue;
            }
            assert_eq!(out.token_of_row[row as usize] as usize, t);
            assert!(out.offsets[expert as usize] <= row && row < out.offsets[expert as usize + 1]);
        }
        if valid == 0 {
            assert!(out.dlogits[t * 13..(t + 1) * 13].iter().all(|&d| d == 0.0), "{device}");
        }
    }
}

fn an_empty_batch_gives_empty_outputs_and_zero_losses(device: &Device) {
    let mut problem = Problem::<f32>::random(3, 0, 6, TopK::K(2), Score::Softmax, false);
    problem.lb_coef = 1.0;
    let out = problem.run(device).unwrap();
    assert!(out.indices.is_empty() && out.token_of_row.is_empty() && out.dlogits.is_empty());
    assert_eq!(out.counts, vec![0; 6], "{device}");
    assert_eq!(out.offsets, vec![0; 7], "{device}");
    assert_eq!((out.lb_loss, out.z_loss), (0.0, 0.0), "{device}");
}

fn single_expert_and_dense_routing_work(device: &Device) {
    let logits = tensor(vec![0.5f32, -2.0], &[2, 1], device);
    let (out, _) = routing::forward(&logits, &RoutingOptions::new(TopK::All)).unwrap();
    assert_eq!(out.indices.to_vec().unwrap(), vec![0, 0], "{device}");
    assert_eq!(out.weights.to_vec().unwrap(), vec![1.0, 1.0], "{device}");
    assert_eq!(out.lb_loss.to_vec().unwrap(), vec![1.0], "{device}: balanced");
}

fn zeros(shape: &[usize], device: &Device) -> Tensor<f32> {
    Tensor::zeros(shape, device).unwrap()
}

fn k_zero_is_refused(device: &Device) {
    let error = routing::forward(&zeros(&[2, 4], device), &RoutingOptions::new(TopK::K(0))).unwrap_err();
    assert!(
        matches!(error, Error::InvalidArgument { argument: "k", .. }),
        "{device}: {error}"
    );
}

fn k_above_the_active_experts_is_refused(device: &Device) {
    let logits = zeros(&[2, 4], device);
    let error = routing::forward(&logits, &RoutingOptions::new(TopK::K(5))).unwrap_err();
    assert!(
        matches!(error, Error::InvalidArgument { argument: "k", .. }),
        "{device}: {error}"
    );
    let mask = tensor(vec![0u32, 1, 1, 0], &[4], device);
    let options = RoutingOptions::new(TopK::K(3)).with_expert_mask(&mask);
    let error = routing::forward(&logits, &options).unwrap_err();
    assert!(
        matches!(error, Error::InvalidArgument { argument: "k", .. }),
        "{device}: {error}"
    );
    let none_active = tensor(vec![0u32; 4], &[4], device);
    let options = RoutingOptions::new(TopK::All).with_expert_mask(&none_active);
    let error = routing::forward(&logits, &options).unwrap_err();
    assert!(
        matches!(error, Error::InvalidArgument { argument: "k", .. }),
        "{device}: {error}"
    );
}

fn malformed_logits_are_shape_errors(device: &Device) {
    let options = RoutingOptions::new(TopK::K(1));
    for shape in [&[4][..], &[2, 0], &[1, 2, 2]] {
        let logits = zeros(shape, device);
        let error = routing::forward(&logits, &options).unwrap_err();
        assert!(
            matches!(error, Error::ShapeMismatch { argument: "logits", .. }),
            "{device}: {error}"
        );
    }
}

fn masks_and_bias_of_the_wrong_shape_are_refused(device: &Device) {
    let logits = zeros(&[2, 4], device);
    let short = tensor(vec![1u32; 3], &[3], device);
    let options = RoutingOptions::new(TopK::K(1));
    let error = routing::forward(&logits, &options.clone().with_expert_mask(&short)).unwrap_err();
    assert!(
        matches!(
            error,
            Error::ShapeMismatch {
                argument: "expert_mask",
                ..
            }
        ),
        "{error}"
    );
    let error = routing::forward(&logits, &options.clone().with_token_mask(&short)).unwrap_err();
    assert!(
        matches!(
            error,
            Error::ShapeMismatch {
                argument: "token_mask",
                ..
            }
        ),
        "{error}"
    );
    let bias = tensor(vec![0f32; 2], &[2], device);
    let error = routing::forward(&logits, &options.with_selection_bias(&bias)).unwrap_err();
    assert!(
        matches!(
            error,
            Error::ShapeMismatch {
                argument: "selection_bias",
                ..
            }
        ),
        "{error}"
    );
}

fn mask_entries_other_than_zero_and_one_are_refused(device: &Device) {
    let mut logits = vec![0f32; 3 * 4];
    logits[5] = f32::NAN; // the mask is checked before the logits
    let logits = tensor(logits, &[3, 4], device);
    let options = RoutingOptions::new(TopK::K(1));
    let expert_mask = tensor(vec![1u32, 2, 1, 1], &[4], device);
    let error = routing::forward(&logits, &options.clone().with_expert_mask(&expert_mask)).unwrap_err();
    assert!(
        matches!(
            error,
            Error::InvalidArgument {
                argument: "expert_mask",
                ..
            }
        ),
        "{error}"
    );
    let token_mask = tensor(vec![1u32, 1, 7], &[3], device);
    let error = routing::forward(&logits, &options.with_token_mask(&token_mask)).unwrap_err();
    assert_eq!(
        error,
        Error::InvalidArgument {
            argument: "token_mask",
            message: "expected entries 0 or 1, got 7 at position 2".into()
        },
        "{device}"
    );
}

fn a_non_finite_selection_bias_is_refused(device: &Device) {
    let logits = zeros(&[2, 4], device);
    let bias = tensor(vec![0.0, f32::INFINITY, 0.0, 0.0], &[4], device);
    let options = RoutingOptions::new(TopK::K(1)).with_selection_bias(&bias);
    let error = routing::forward(&logits, &options).unwrap_err();
    assert!(
        matches!(
            error,
            Error::InvalidArgument {
                argument: "selection_bias",
                ..
            }
        ),
        "{error}"
    );
}

fn nan_and_positive_infinity_report_the_lowest_position_in_both_passes(device: &Device) {
    for bad in [f32::NAN, f32::INFINITY] {
        let mut values = vec![0f32; 3 * 4];
        values[2 * 4] = bad;
        values[4 + 3] = bad;
        values[4 + 2] = f32::NEG_INFINITY; // allowed
        let logits = tensor(values, &[3, 4], device);
        let expected = Error::NonFinite {
            argument: "logits",
            row: 1,
            column: 3,
        };
        let options = RoutingOptions::new(TopK::K(1));
        assert_eq!(routing::forward(&logits, &options).unwrap_err(), expected, "{device}");

        let clean = zeros(&[3, 4], device);
        let (_, saved) = routing::forward(&clean, &options).unwrap();
        let dweights = zeros(&[3, 1], device);
        let error = routing::backward(&logits, &dweights, 0.0, 0.0, &saved).unwrap_err();
        assert_eq!(error, expected, "{device}: backward");
    }
}

fn an_all_negative_infinity_row_reports_its_first_active_column(device: &Device) {
    let mut values = vec![0f32; 2 * 4];
    values[4..].fill(f32::NEG_INFINITY);
    let logits = tensor(values, &[2, 4], device);
    let mask = tensor(vec![0u32, 1, 1, 1], &[4], device);
    let options = RoutingOptions::new(TopK::K(1)).with_expert_mask(&mask);
    let expected = Error::NonFinite {
        argument: "logits",
        row: 1,
        column: 1,
    };
    assert_eq!(routing::forward(&logits, &options).unwrap_err(), expected, "{device}");
}

fn non_finite_logits_of_inactive_experts_and_invalid_tokens_are_ignored(device: &Device) {
    let logits = tensor(
        vec![f32::NAN, 0.0, 0.0, f32::INFINITY, f32::INFINITY, f32::INFINITY],
        &[2, 3],
        device,
    );
    let expert_mask = tensor(vec![0u32, 1, 1], &[3], device);
    let token_mask = tensor(vec![1u32, 0], &[2], device);
    let options = RoutingOptions::new(TopK::K(1))
        .with_expert_mask(&expert_mask)
        .with_token_mask(&token_mask);
    let (out, saved) = routing::forward(&logits, &options).unwrap();
    assert_eq!(out.indices.to_vec().unwrap(), vec![1, u32::MAX], "{device}");
    let dweights = tensor(vec![1f32, 1.0], &[2, 1], device);
    let dlogits = routing::backward(&logits, &dweights, 1.0, 1.0, &saved).unwrap();
    let dlogits = dlogits.to_vec().unwrap();
    assert_eq!(dlogits[0], 0.0, "{device}: inactive expert");
    assert_eq!(&dlogits[3..], &[0.0; 3], "{device}: invalid token");
}

fn dweights_of_the_wrong_shape_are_refused(device: &Device) {
    let logits = zeros(&[2, 4], device);
    let (_, saved) = routing::forward(&logits, &RoutingOptions::new(TopK::K(2))).unwrap();
    let dweights = zeros(&[2, 3], device);
    let error = routing::backward(&logits, &dweights, 0.0, 0.0, &saved).unwrap_err();
    assert!(
        matches!(
            error,
            Error::ShapeMismatch {
                argument: "dweights",
                ..
            }
        ),
        "{error}"
    );
}

fn backward_logits_must_match_the_forward(device: &Device) {
    let logits = zeros(&[2, 4], device);
    let (_, saved) = routing::forward(&logits, &RoutingOptions::new(TopK::K(2))).unwrap();
    let dweights = zeros(&[2, 2], device);
    let other_dtype = tensor(vec![bf16::ZERO; 8], &[2, 4], device);
    let error = routing::backward(&other_dtype, &dweights, 0.0, 0.0, &saved).unwrap_err();
    assert_eq!(
        error,
        Error::DtypeMismatch {
            argument: "logits",
            expected: DType::F32,
            actual: DType::BF16
        },
        "{device}"
    );
    let other_shape = zeros(&[2, 5], device);
    let error = routing::backward(&other_shape, &dweights, 0.0, 0.0, &saved).unwrap_err();
    assert!(
        matches!(error, Error::ShapeMismatch { argument: "logits", .. }),
        "{error}"
    );
    let error = routing::backward(&logits, &dweights, f32::NAN, 0.0, &saved).unwrap_err();
    assert!(
        matches!(
            error,
            Error::InvalidArgument {
                argument: "lb_coef",
                ..
            }
        ),
        "{error}"
    );
}

fn operands_on_different_devices_are_refused(cuda: &Device) {
    let logits = zeros(&[2, 4], cuda);
    let mask = tensor(vec![1u32; 4], &[4], &Device::cpu());
    let options = RoutingOptions::new(TopK::K(1)).with_expert_mask(&mask);
    let error = routing::forward(&logits, &options).unwrap_err();
    assert!(
        matches!(
            error,
            Error::DeviceMismatch {
                argument: "expert_mask",
                ..
            }
        ),
        "{error}"
    );
    let (_, saved) = routing::forward(&logits, &RoutingOptions::new(TopK::K(1))).unwrap();
    let dweights = zeros(&[2, 1], &Device::cpu());
    let error = routing::backward(&logits, &dweights, 0.0, 0.0, &saved).unwrap_err();
    assert!(
        matches!(
            error,
            Error::DeviceMismatch {
                argument: "dweights",
                ..
            }
        ),
        "{error}"
    );
}

fn the_backend_checks_its_config() {
    use moerec::routing::RoutingConfig;
    let config = RoutingConfig::new(2, 3, TopK::K(2), Score::Softmax, false, None).unwrap();
    let mask = [1u32, 0, 0];
    let error = routing::cpu::forward(&[0f32; 6], Some(&mask), None, None, &config).unwrap_err();
    assert!(matches!(error, Error::InvalidArgument { .. }), "{error}");
    let error = routing::cpu::forward(&[0f32; 5], None, None, None, &config).unwrap_err();
    assert!(
        matches!(error, Error::ShapeMismatch { argument: "logits", .. }),
        "{error}"
    );
}

/// Forward and backward of a small f32 problem with no masks on `device`:
/// (weights, dlogits).
#[allow(clippy::too_many_arguments)]
fn weights_and_gradient(
    device: &Device,
    logits: Vec<f32>,
    shape: [usize; 2],
    options: RoutingOptions<'_>,
    dweights: Vec<f32>,
    lb_coef: f32,
    z_coef: f32,
) -> (Vec<f32>, Vec<f32>) {
    let logits = tensor(logits, &shape, device);
    let (out, saved) = routing::forward(&logits, &options).unwrap();
    let k = saved.config().k;
    let dweights = tensor(dweights, &[shape[0], k], device);
    let dlogits = routing::backward(&logits, &dweights, lb_coef, z_coef, &saved).unwrap();
    (out.weights.to_vec().unwrap(), dlogits.to_vec().unwrap())
}

fn assert_close_f32(what: &str, actual: &[f32], expected: &[f64]) {
    assert!(actual.iter().all(|x| x.is_finite()), "{what}: {actual:?}");
    let actual: Vec<f64> = actual.iter().map(|&x| f64::from(x)).collect();
    assert_close(what, &actual, expected, rtol::<f32>(true));
}

// Issue 14: the load-balance gradient divided by the sum of a token's
// sigmoids, which is subnormal when all its logits are below about -87.
fn the_sigmoid_load_balance_gradient_is_finite_where_the_sigmoids_underflow(device: &Device) {
    // Float64: q_i (1 - p_i) (c_i - <c, q>) with c = E' f / T' = [1, 0].
    let cases: [([f32; 4], [f64; 4]); 2] = [
        (
            [5.0, 0.0, -100.0, -200.0],
            [1.490_618_231_596_164e-3, -1.1135898949934156e-1, 0.0, -3.72e-44],
        ),
        (
            [5.0, 0.0, -90.0, -95.0],
            [
                1.490_618_231_596_164e-3,
                -1.1135898949934156e-1,
                6.64805667079025e-3,
                -6.64805667079015e-3,
            ],
        ),
    ];
    for (logits, expected) in &cases {
        let options = RoutingOptions::new(TopK::K(1)).with_score(Score::Sigmoid);
        let (_, dlogits) = weights_and_gradient(device, logits.to_vec(), [2, 2], options, vec![0.0; 2], 1.0, 0.0);
        assert_close_f32(&format!("{device}: {logits:?}"), &dlogits, expected);
    }
}

// Issue 14: the renormalised weights' gradient divided by the subnormal sum
// of the selected sigmoids.
fn the_renormalised_gradient_is_finite_where_the_selected_scores_underflow(device: &Device) {
    let options = RoutingOptions::new(TopK::All)
        .with_score(Score::Sigmoid)
        .with_renormalize(true);
    let (weights, dlogits) =
        weights_and_gradient(device, vec![-200.0, -95.0], [1, 2], options, vec![1.0, 0.0], 0.0, 0.0);
    assert_close_f32(&format!("{device}: weights"), &weights, &[1.0, 0.0]);
    // Exact: [-2.5e-46, 0], below the smallest f32.
    assert!(dlogits.iter().all(|d| d.abs() < 1e-30), "{device}: {dlogits:?}");
}

// The decision for issue 14: renormalised weights and load-balance shares are
// exact ratios even where the scores underflow f32, so they are continuous in
// the logits (a lone renormalised weight was 1 at -90 and 0 at -104).
fn renormalised_weights_are_exact_ratios_where_the_scores_underflow(device: &Device) {
    for score in [Score::Sigmoid, Score::Softmax] {
        let options = RoutingOptions::new(TopK::K(1)).with_score(score).with_renormalize(true);
        let (weights, _) = weights_and_gradient(device, vec![-104.0], [1, 1], options, vec![1.0], 0.0, 0.0);
        assert_eq!(weights, vec![1.0], "{device} {score:?}");
    }
    // The bias selects two experts whose softmax scores underflow: the
    // weights are the softmax over the selected logits, [-95, -96].
    let bias = tensor(vec![0.0f32, 200.0, 200.0], &[3], device);
    for score in [Score::Sigmoid, Score::Softmax] {
        let options = RoutingOptions::new(TopK::K(2))
            .with_score(score)
            .with_renormalize(true)
            .with_selection_bias(&bias);
        let (weights, dlogits) = weights_and_gradient(
            device,
            vec![0.0, -95.0, -96.0],
            [1, 3],
            options,
            vec![1.0, 0.0],
            0.0,
            0.0,
        );
        let (w1, w2) = (1.0 / (1.0 + (-1f64).exp()), 1.0 / (1.0 + 1f64.exp()));
        assert_close_f32(&format!("{device} {score:?}: weights"), &weights, &[w1, w2]);
        // d w1 / dz = w1 w2 (1 - p) for z1, -w1 w2 (1 - p) for z2; p ~ 0.
        assert_close_f32(
            &format!("{device} {score:?}: dlogits"),
            &dlogits,
            &[0.0, w1 * w2, -w1 * w2],
        );
    }
}

/// Grouped routing is G routers side by side: each group's indices (offset to
/// global experts), weights, counts and gate mass are those of an ungrouped
/// router over its columns; the losses are the means over the groups, so the
/// gradients are each group's with coefficients / G; the plan's rows name
/// routing rows t * G + g.
fn grouped_routing_is_each_group_routed_alone(device: &Device) {
    let (tokens, groups, group_experts) = (37, 3, 5);
    let experts = groups * group_experts;
    let tolerance = rtol::<f32>(true);
    let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    for (seed, k) in [(1, TopK::K(1)), (2, TopK::K(2)), (3, TopK::All)] {
        for score in [Score::Softmax, Score::Sigmoid] {
            let grouped = Problem::<f32>::random_grouped(seed, tokens, experts, groups, k, score, true);
            let out = grouped.run(device).unwrap();
            let kk = out.indices.len() / (tokens * groups);
            let what = format!("{device} {k:?} {score:?}");
            let mut token_of_row = Vec::new();
            let mut losses = [0f64; 2];
            for g in 0..groups {
                let columns = g * group_experts..(g + 1) * group_experts;
                let alone = Problem::<f32> {
                    tokens,
                    experts: group_experts,
                    logits: grouped
                        .logits
                        .chunks(group_experts)
                        .skip(g)
                        .step_by(groups)
                        .flatten()
                        .copied()
                        .collect(),
                    expert_mask: grouped.expert_mask.as_ref().map(|m| m[columns.clone()].to_vec()),
                    selection_bias: grouped.selection_bias.as_ref().map(|b| b[columns.clone()].to_vec()),
                    dweights: grouped.dweights[..tokens * groups * kk]
                        .chunks(kk)
                        .skip(g)
                        .step_by(groups)
                        .flatten()
                        .copied()
                        .collect(),
                    lb_coef: grouped.lb_coef / groups as f32,
                    z_coef: grouped.z_coef / groups as f32,
                    groups: 1,
                    token_mask: grouped.token_mask.clone(),
                    ..grouped
                }
                .run(device)
                .unwrap();
                for t in 0..tokens {
                    let (row, slots) = (t * groups + g, t * kk..(t + 1) * kk);
                    let global: Vec<u32> = alone.indices[slots.clone()]
                        .iter()
                        .map(|&e| if e == u32::MAX { e } else { e + columns.start as u32 })
                        .collect();
                    assert_eq!(out.indices[row * kk..(row + 1) * kk], global, "{what}: indices");
                    assert_eq!(
                        out.weights[row * kk..(row + 1) * kk],
                        alone.weights[slots],
                        "{what}: weights"
                    );
                    let dlogits: Vec<f32> = (0..group_experts)
                        .map(|c| out.dlogits[t * experts + columns.start + c])
                        .collect();
                    assert_close(
                        &format!("{what}: dlogits"),
                        &f64s(&dlogits),
                        &f64s(&alone.dlogits[t * group_experts..(t + 1) * group_experts]),
                        tolerance,
                    );
                }
                assert_eq!(out.counts[columns.clone()], alone.counts[..], "{what}: counts");
                assert_close(
                    &format!("{what}: gate mass"),
                    &f64s(&out.gate_mass[columns.clone()]),
                    &f64s(&alone.gate_mass),
                    tolerance,
                );
                token_of_row.push(
                    alone
                        .token_of_row
                        .iter()
                        .map(|&t| t * groups as u32 + g as u32)
                        .collect::<Vec<_>>(),
                );
                losses[0] += f64::from(alone.lb_loss) / groups as f64;
                losses[1] += f64::from(alone.z_loss) / groups as f64;
            }
            let actual = f64s(&[out.lb_loss, out.z_loss]);
            assert_close(&format!("{what}: losses"), &actual, &losses, tolerance);
            // Rows grouped by expert: group 0's experts first.
            assert_eq!(out.token_of_row, token_of_row.concat(), "{what}: token_of_row");
        }
    }
}

fn grouped_routing_refuses_what_plain_routing_refuses(device: &Device) {
    let logits = zeros(&[2, 6], device);
    for groups in [0, 4] {
        let options = RoutingOptions::new(TopK::K(1)).with_groups(groups);
        let error = routing::forward(&logits, &options).unwrap_err();
        assert!(
            matches!(error, Error::InvalidArgument { argument: "groups", .. }),
            "{device}: {error}"
        );
    }
    let mask = tensor(vec![1u32, 1, 1, 0, 1, 1], &[6], device);
    for k in [TopK::K(3), TopK::All] {
        let options = RoutingOptions::new(k).with_groups(2).with_expert_mask(&mask);
        let error = routing::forward(&logits, &options).unwrap_err();
        assert!(
            matches!(error, Error::InvalidArgument { argument: "k", .. }),
            "{device} {k:?}: {error}"
        );
    }
    let options = RoutingOptions::new(TopK::K(2)).with_groups(2).with_expert_mask(&mask);
    let (out, saved) = routing::forward(&logits, &options).unwrap();
    assert_eq!(out.indices.shape(), &[4, 2], "{device}");
    let error = routing::backward(&logits, &zeros(&[2, 2], device), 0.0, 0.0, &saved).unwrap_err();
    assert!(
        matches!(
            error,
            Error::ShapeMismatch {
                argument: "dweights",
                ..
            }
        ),
        "{device}: {error}"
    );

    // Token 1's second group is all -inf: its first active column, 4.
    let mut values = vec![0f32; 12];
    values[9..].fill(f32::NEG_INFINITY);
    let bad = tensor(values, &[2, 6], device);
    let expected = Error::NonFinite {
        argument: "logits",
        row: 1,
        column: 4,
    };
    assert_eq!(routing::forward(&bad, &options).unwrap_err(), expected, "{device}");
    let dweights = zeros(&[4, 2], device);
    let error = routing::backward(&bad, &dweights, 0.0, 0.0, &saved).unwrap_err();
    assert_eq!(error, expected, "{device}: backward");
}

/// Grouped routing computes what issue 10's workaround computed with one
/// router: each (token, head) row over all H*N experts, -inf at the other
/// heads' experts, k = N — the same plan, weights, losses and gradients, from
/// H times fewer logits.
fn grouped_routing_equals_one_router_with_other_groups_at_negative_infinity(device: &Device) {
    let (tokens, heads, n) = (45, 4, 3);
    let experts = heads * n;
    for score in [Score::Softmax, Score::Sigmoid] {
        let mut grouped = Problem::<f32>::random_grouped(11, tokens, experts, heads, TopK::All, score, false);
        // The workaround cannot tell a -inf of its own head from the others'.
        grouped
            .logits
            .iter_mut()
            .filter(|z| z.is_infinite())
            .for_each(|z| *z = -3.0);
        let masked_logits: Vec<f32> = grouped
            .logits
            .chunks(n)
            .enumerate()
            .flat_map(|(row, own)| {
                (0..experts).map(move |e| {
                    if e / n == row % heads {
                        own[e % n]
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let masked = Problem::<f32> {
            tokens: tokens * heads,
            logits: masked_logits,
            k: TopK::K(n),
            groups: 1,
            dweights: grouped.dweights.clone(),
            token_mask: None,
            expert_mask: None,
            selection_bias: None,
            ..grouped
        };
        let (a, b) = (grouped.run(device).unwrap(), masked.run(device).unwrap());
        let own_columns: Vec<f32> = b
            .dlogits
            .chunks(experts)
            .enumerate()
            .flat_map(|(row, all)| all[(row % heads) * n..(row % heads + 1) * n].to_vec())
            .collect();
        assert_parity(
            &format!("{device} {score:?}"),
            &a,
            &Outputs {
                dlogits: own_columns,
                ..b
            },
        );
    }
}

common::harness::test_main! {
    devices: [
        grouped_routing_equals_one_router_with_other_groups_at_negative_infinity,
        grouped_routing_is_each_group_routed_alone,
        the_sigmoid_load_balance_gradient_is_finite_where_the_sigmoids_underflow,
        outputs_are_bitwise_identical_across_runs_and_thread_counts,
        matches_the_numpy_golden_files,
        a_hand_checked_plan,
        the_plan_groups_rows_by_expert_in_ascending_token_order,
        an_empty_batch_gives_empty_outputs_and_zero_losses,
        single_expert_and_dense_routing_work,
        k_zero_is_refused,
        k_above_the_active_experts_is_refused,
        malformed_logits_are_shape_errors,
        masks_and_bias_of_the_wrong_shape_are_refused,
        mask_entries_other_than_zero_and_one_are_refused,
        a_non_finite_selection_bias_is_refused,
        nan_and_positive_infinity_report_the_lowest_position_in_both_passes,
        an_all_negative_infinity_row_reports_its_first_active_column,
        non_finite_logits_of_inactive_experts_and_invalid_tokens_are_ignored,
        dweights_of_the_wrong_shape_are_refused,
        backward_logits_must_match_the_forward,
        the_renormalised_gradient_is_finite_where_the_selected_scores_underflow,
        renormalised_weights_are_exact_ratios_where_the_scores_underflow,
        grouped_routing_refuses_what_plain_routing_refuses,
    ],
    cuda: [
        cpu_and_cuda_agree_on_fresh_inputs,
        operands_on_different_devices_are_refused,
    ],
    host: [
        outputs_and_saved_are_send_and_sync,
        the_backend_checks_its_config,
    ],
}

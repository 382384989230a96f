//! The grouped expert matmul (DESIGN 4.3) against the NumPy golden files and
//! a float64 reference on hand-made and routed plans, CPU against CUDA,
//! determinism, and every error case. Each body runs on every device present.

mod common;

use common::{assert_close, for_each_golden, rtol, widen, Golden, Rng};
use half::{bf16, f16};
use moerec::experts::{self, Activation, LayerSaved, Variant};
use moerec::routing::{self, DispatchPlan, RoutingOptions, TopK};
use moerec::{Device, Error, FloatElement, Tensor, TensorRef};

const EMPTY: u32 = u32::MAX;

fn tensor<T: moerec::Element>(data: Vec<T>, shape: &[usize], device: &Device) -> Tensor<T> {
    Tensor::from_vec(data, shape, device).unwrap()
}

fn activation_of(name: &str) -> Activation {
    match name {
        "none" => Activation::None,
        "relu" => Activation::Relu,
        "gelu" => Activation::Gelu,
        "silu" => Activation::Silu,
        "swiglu" => Activation::SwiGlu,
        other => panic!("unknown activation {other}"),
    }
}

fn plan_on(
    counts: Vec<u32>,
    offsets: Vec<u32>,
    token_of_row: Vec<u32>,
    row_of_slot: Vec<u32>,
    k: usize,
    device: &Device,
) -> DispatchPlan {
    let (experts, rows, tokens) = (counts.len(), token_of_row.len(), row_of_slot.len() / k);
    DispatchPlan {
        counts: tensor(counts, &[experts], device),
        offsets: tensor(offsets, &[experts + 1], device),
        token_of_row: tensor(token_of_row, &[rows], device),
        row_of_slot: tensor(row_of_slot, &[tokens, k], device),
    }
}

fn copy_plan(plan: &DispatchPlan, device: &Device) -> DispatchPlan {
    DispatchPlan {
        counts: plan.counts.to_device(device).unwrap(),
        offsets: plan.offsets.to_device(device).unwrap(),
        token_of_row: plan.token_of_row.to_device(device).unwrap(),
        row_of_slot: plan.row_of_slot.to_device(device).unwrap(),
    }
}

/// The forward of either variant.
fn layer_forward<T: FloatElement>(
    variant: Variant,
    x: &Tensor<T>,
    plan: &DispatchPlan,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
    activation: Activation,
) -> (Tensor<T>, LayerSaved<T>) {
    match variant {
        Variant::Tokens => experts::layer_forward(x, plan, w, bias.map(TensorRef::from), activation),
        Variant::Rows => experts::layer_forward_rows(x, plan, w, bias.map(TensorRef::from), activation),
    }
    .unwrap()
}

// ------------------------------------------------------------ golden files

fn check_golden<T: FloatElement>(golden: &Golden, device: &Device) {
    let what = |part: &str| format!("{} on {device}: {part}", golden.name);
    let input = |name: &str| {
        let t = golden.tensor(name);
        tensor(t.elements::<T>(), &t.shape, device)
    };
    let optional = |name: &str| golden.tensors.contains_key(name).then(|| input(name));
    let f32_input = |name: &str| {
        let t = golden.tensor(name);
        tensor(t.f32(), &t.shape, device)
    };
    let k: usize = golden.meta("k").parse().unwrap();
    let plan = plan_on(
        golden.tensor("counts").u32(),
        golden.tensor("offsets").u32(),
        golden.tensor("token_of_row").u32(),
        golden.tensor("row_of_slot").u32(),
        k,
        device,
    );
    let activation = activation_of(golden.meta("activation"));
    let rows_variant = golden.meta("variant") == "rows";
    let x = input(if rows_variant { "x_rows" } else { "x" });
    let w = input("W");
    let bias = optional("bias");
    let product = rtol::<T>(true);

    let variant = if rows_variant { Variant::Rows } else { Variant::Tokens };
    let (y, saved) = layer_forward(variant, &x, &plan, &w, bias.as_ref(), activation);
    assert_eq!(saved.shape().variant, variant);
    let expect = |name: &str, actual: Vec<f64>| {
        let reference = golden.tensor(name);
        assert_close(&what(name), &actual, &reference.values, product);
    };
    assert_eq!(y.shape(), golden.tensor("y").shape.as_slice(), "{}", what("y shape"));
    expect("y", widen(&y.to_vec().unwrap()));
    expect("h", widen(&saved.h().to_vec().unwrap()));

    let grads = experts::layer_backward(&f32_input("dy"), &x, &plan, &w, &saved).unwrap();
    expect(
        if rows_variant { "dx_rows" } else { "dx" },
        widen(&grads.dx.to_vec().unwrap()),
    );
    expect("dW", widen(&grads.dweights.to_vec().unwrap()));
    assert_eq!(grads.dbias.is_some(), bias.is_some(), "{}", what("dbias presence"));
    if let Some(dbias) = &grads.dbias {
        expect("db", widen(&dbias.to_vec().unwrap()));
    }

    // The combine starts from the stored y, as the reference does.
    let y_stored = input("y");
    let weights = f32_input("weights");
    let res = optional("res");
    let rho = golden.tensors.contains_key("rho").then(|| f32_input("rho"));
    let (res, rho) = (res.as_ref().map(TensorRef::from), rho.as_ref().map(TensorRef::from));
    let (out, util) = experts::combine(&y_stored, &weights, &plan, res.clone(), rho.clone()).unwrap();
    expect("out", widen(&out.to_vec().unwrap()));
    expect("util", widen(&util.to_vec().unwrap()));
    let grads =
        experts::combine_backward(&f32_input("dout"), &y_stored, &weights, &plan, res.clone(), rho.clone()).unwrap();
    expect("dy_combine", widen(&grads.dy.to_vec().unwrap()));
    expect("dweights", widen(&grads.dweights.to_vec().unwrap()));
    assert_eq!(grads.dres.is_some(), res.is_some(), "{}", what("dres presence"));
    if let Some(dres) = &grads.dres {
        expect("dres", widen(&dres.to_vec().unwrap()));
    }
    assert_eq!(grads.drho.is_some(), rho.is_some(), "{}", what("drho presence"));
    if let Some(drho) = &grads.drho {
        expect("drho", widen(&drho.to_vec().unwrap()));
    }
}

fn matches_the_numpy_golden_files(device: &Device) {
    for_each_golden!("experts", check_golden, device);
}

// ------------------------------------------------------------ float64 reference

/// A plan from each token's expert per slot (None: an empty slot), rows
/// grouped by expert, ascending token within an expert.
fn plan_from_choices(choices: &[Vec<Option<usize>>], experts: usize, k: usize, device: &Device) -> DispatchPlan {
    let mut rows_of: Vec<Vec<(usize, usize)>> = vec![Vec::new(); experts];
    for (t, slots) in choices.iter().enumerate() {
        assert_eq!(slots.len(), k);
        for (j, e) in slots.iter().enumerate() {
            if let Some(e) = e {
                rows_of[*e].push((t, j));
            }
        }
    }
    let counts: Vec<u32> = rows_of.iter().map(|r| r.len() as u32).collect();
    let offsets: Vec<u32> = std::iter::once(0)
        .chain(counts.iter().scan(0, |acc, &c| {
            *acc += c;
            Some(*acc)
        }))
        .collect();
    let mut token_of_row = Vec::new();
    let mut row_of_slot = vec![EMPTY; choices.len() * k];
    for (t, j) in rows_of.iter().flatten() {
        row_of_slot[t * k + j] = token_of_row.len() as u32;
        token_of_row.push(*t as u32);
    }
    plan_on(counts, offsets, token_of_row, row_of_slot, k, device)
}

/// The plan of `routing::forward` (CPU) on random logits.
fn routed_plan(rng: &mut Rng, tokens: usize, experts: usize, k: TopK) -> (DispatchPlan, Tensor<f32>) {
    let logits: Vec<f32> = (0..tokens * experts).map(|_| 3.0 * rng.signed_unit()).collect();
    let logits = tensor(logits, &[tokens, experts], &Device::cpu());
    let (routed, _) = routing::forward(&logits, &RoutingOptions::new(k)).unwrap();
    (routed.plan, routed.weights)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn act(activation: Activation, h: f64) -> f64 {
    match activation {
        Activation::Relu => h.max(0.0),
        Activation::Gelu => h * 0.5 * (1.0 + libm::erf(h / std::f64::consts::SQRT_2)),
        Activation::Silu => h * sigmoid(h),
        Activation::None | Activation::SwiGlu => h,
    }
}

fn act_grad(activation: Activation, h: f64) -> f64 {
    match activation {
        Activation::Relu => f64::from(u8::from(h > 0.0)),
        Activation::Gelu => {
            let pdf = (-0.5 * h * h).exp() / (2.0 * std::f64::consts::PI).sqrt();
            0.5 * (1.0 + libm::erf(h / std::f64::consts::SQRT_2)) + h * pdf
        }
        Activation::Silu => sigmoid(h) * (1.0 + h * (1.0 - sigmoid(h))),
        Activation::None | Activation::SwiGlu => 1.0,
    }
}

/// Every output of one layer + combine, widened to f64.
#[derive(Debug, PartialEq)]
struct Outputs {
    h: Vec<f64>,
    y: Vec<f64>,
    dx: Vec<f64>,
    dweights: Vec<f64>,
    dbias: Vec<f64>,
    out: Vec<f64>,
    util: Vec<f64>,
    dy_combine: Vec<f64>,
    dslot_weights: Vec<f64>,
    dres: Vec<f64>,
    drho: Vec<f64>,
}

/// One layer problem on host data; its operands are rounded to T when run.
struct Problem {
    variant: Variant,
    activation: Activation,
    experts: usize,
    din: usize,
    dout: usize,
    k: usize,
    counts: Vec<u32>,
    offsets: Vec<u32>,
    token_of_row: Vec<u32>,
    row_of_slot: Vec<u32>,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    slot_weights: Vec<f32>,
    res: Option<Vec<f32>>,
    rho: Option<Vec<f32>>,
    dy: Vec<f32>,
    dout_grad: Vec<f32>,
}

impl Problem {
    fn new(
        plan: &DispatchPlan,
        variant: Variant,
        activation: Activation,
        din: usize,
        dout: usize,
        seed: u64,
    ) -> Problem {
        let mut rng = Rng::new(seed);
        let counts = plan.counts.to_vec().unwrap();
        let (tokens, k) = (plan.row_of_slot.shape()[0], plan.row_of_slot.shape()[1]);
        let rows = plan.token_of_row.len();
        let width = activation.width(dout);
        let mut floats = |n: usize, scale: f32| (0..n).map(|_| scale * rng.signed_unit()).collect::<Vec<f32>>();
        let inputs = if variant == Variant::Rows { rows } else { tokens };
        Problem {
            variant,
            activation,
            experts: counts.len(),
            din,
            dout,
            k,
            offsets: plan.offsets.to_vec().unwrap(),
            token_of_row: plan.token_of_row.to_vec().unwrap(),
            row_of_slot: plan.row_of_slot.to_vec().unwrap(),
            counts,
            x: floats(inputs * din, 1.0),
            w: floats(plan.counts.len() * din * width, 1.5 / (din as f32).sqrt()),
            bias: Some(floats(plan.counts.len() * width, 0.5)),
            slot_weights: floats(tokens * k, 1.0),
            res: Some(floats(tokens * dout, 1.0)),
            rho: Some(floats(tokens, 1.0)),
            dy: floats(rows * dout, 1.0),
            dout_grad: floats(tokens * dout, 1.0),
        }
    }

    fn without_extras(mut self) -> Problem {
        self.bias = None;
        self.rho = None;
        self.res = None;
        self
    }

    fn tokens(&self) -> usize {
        self.row_of_slot.len() / self.k
    }

    fn rows(&self) -> usize {
        self.token_of_row.len()
    }

    fn width(&self) -> usize {
        self.activation.width(self.dout)
    }

    fn plan(&self, device: &Device) -> DispatchPlan {
        plan_on(
            self.counts.clone(),
            self.offsets.clone(),
            self.token_of_row.clone(),
            self.row_of_slot.clone(),
            self.k,
            device,
        )
    }

    fn rounded<T: FloatElement>(values: &[f32]) -> Vec<T> {
        values.iter().map(|&v| T::from_f32(v)).collect()
    }

    /// Runs every op of the layer on `device` in type T.
    fn run<T: FloatElement>(&self, device: &Device) -> Outputs {
        let (tokens, rows, din, dout, width) = (self.tokens(), self.rows(), self.din, self.dout, self.width());
        let plan = self.plan(device);
        let inputs = self.x.len() / din;
        let x = tensor(Self::rounded::<T>(&self.x), &[inputs, din], device);
        let w = tensor(Self::rounded::<T>(&self.w), &[self.experts, din, width], device);
        let bias = self
            .bias
            .as_ref()
            .map(|b| tensor(Self::rounded::<T>(b), &[self.experts, width], device));
        let (y, saved) = layer_forward(self.variant, &x, &plan, &w, bias.as_ref(), self.activation);
        let dy = tensor(self.dy.clone(), &[rows, dout], device);
        let grads = experts::layer_backward(&dy, &x, &plan, &w, &saved).unwrap();
        let slot_weights = tensor(self.slot_weights.clone(), &[tokens, self.k], device);
        let res = self
            .res
            .as_ref()
            .map(|r| tensor(Self::rounded::<T>(r), &[tokens, dout], device));
        let rho = self.rho.as_ref().map(|r| tensor(r.clone(), &[tokens], device));
        let (res, rho) = (res.as_ref().map(TensorRef::from), rho.as_ref().map(TensorRef::from));
        let (out, util) = experts::combine(&y, &slot_weights, &plan, res.clone(), rho.clone()).unwrap();
        let dout_grad = tensor(self.dout_grad.clone(), &[tokens, dout], device);
        let combined = experts::combine_backward(&dout_grad, &y, &slot_weights, &plan, res, rho).unwrap();
        let floats = |t: Option<&Tensor<f32>>| t.map_or_else(Vec::new, |t| widen(&t.to_vec().unwrap()));
        Outputs {
            h: widen(&saved.h().to_vec().unwrap()),
            y: widen(&y.to_vec().unwrap()),
            dx: floats(Some(&grads.dx)),
            dweights: floats(Some(&grads.dweights)),
            dbias: floats(grads.dbias.as_ref()),
            out: widen(&out.to_vec().unwrap()),
            util: floats(Some(&util)),
            dy_combine: floats(Some(&combined.dy)),
            dslot_weights: floats(Some(&combined.dweights)),
            dres: floats(combined.dres.as_ref()),
            drho: floats(combined.drho.as_ref()),
        }
    }

    /// The float64 reference on the T-rounded operands. The backward takes
    /// act' at `h_saved` and the combine reads `y_saved` (the op's own
    /// rounded h and y), as the contract says.
    fn reference<T: FloatElement>(&self, h_saved: &[f64], y_saved: &[f64]) -> Outputs {
        let wide = |v: &[f32]| v.iter().map(|&x| T::from_f32(x).to_f32() as f64).collect::<Vec<f64>>();
        let (x, w) = (wide(&self.x), wide(&self.w));
        let bias = self.bias.as_deref().map(wide);
        let res = self.res.as_deref().map(wide);
        let (tokens, rows, din, dout, width, k) =
            (self.tokens(), self.rows(), self.din, self.dout, self.width(), self.k);
        let expert_of_row: Vec<usize> = (0..self.experts)
            .flat_map(|e| std::iter::repeat(e).take(self.counts[e] as usize))
            .collect();
        let source = |r: usize| match self.variant {
            Variant::Tokens => self.token_of_row[r] as usize,
            Variant::Rows => r,
        };
        let swiglu = self.activation == Activation::SwiGlu;
        let mut h = vec![0f64; rows * width];
        let mut y = vec![0f64; rows * dout];
        for r in 0..rows {
            let e = expert_of_row[r];
            for c in 0..width {
                let mut v = bias.as_ref().map_or(0.0, |b| b[e * width + c]);
                for i in 0..din {
                    v += x[source(r) * din + i] * w[(e * din + i) * width + c];
                }
                h[r * width + c] = v;
            }
            for c in 0..dout {
                y[r * dout + c] = if swiglu {
                    let (g, u) = (h[r * width + c], h[r * width + dout + c]);
                    g * sigmoid(g) * u
                } else {
                    act(self.activation, h[r * width + c])
                };
            }
        }
        let mut dh = vec![0f64; rows * width];
        for r in 0..rows {
            for c in 0..dout {
                let g = self.dy[r * dout + c] as f64;
                if swiglu {
                    let (a, u) = (h_saved[r * width + c], h_saved[r * width + dout + c]);
                    dh[r * width + c] = g * u * act_grad(Activation::Silu, a);
                    dh[r * width + dout + c] = g * a * sigmoid(a);
                } else {
                    dh[r * width + c] = g * act_grad(self.activation, h_saved[r * width + c]);
                }
            }
        }
        let mut dx = vec![0f64; x.len()];
        let mut dweights = vec![0f64; w.len()];
        let mut dbias = vec![0f64; self.experts * width];
        for r in 0..rows {
            let e = expert_of_row[r];
            let target = match self.variant {
                Variant::Tokens => source(r),
                Variant::Rows => r,
            };
            for c in 0..width {
                dbias[e * width + c] += dh[r * width + c];
                for i in 0..din {
                    dx[target * din + i] += dh[r * width + c] * w[(e * din + i) * width + c];
                    dweights[(e * din + i) * width + c] += x[source(r) * din + i] * dh[r * width + c];
                }
            }
        }
        let mut out = vec![0f64; tokens * dout];
        let mut util = vec![0f64; self.experts];
        let mut dy_combine = vec![0f64; rows * dout];
        let mut dslot_weights = vec![0f64; tokens * k];
        let mut dres = vec![0f64; res.as_ref().map_or(0, Vec::len)];
        let mut drho = vec![0f64; self.rho.as_ref().map_or(0, Vec::len)];
        for t in 0..tokens {
            let scale = self.rho.as_ref().map_or(1.0, |rho| rho[t] as f64);
            for c in 0..dout {
                let g = self.dout_grad[t * dout + c] as f64;
                if let Some(res) = &res {
                    out[t * dout + c] = scale * res[t * dout + c];
                    dres[t * dout + c] = scale * g;
                    if !drho.is_empty() {
                        drho[t] += g * res[t * dout + c];
                    }
                }
            }
            for j in 0..k {
                let row = self.row_of_slot[t * k + j];
                if row == EMPTY {
                    continue;
                }
                let (r, wt) = (row as usize, self.slot_weights[t * k + j] as f64);
                let mut norm = 0.0;
                for c in 0..dout {
                    let (v, g) = (y_saved[r * dout + c], self.dout_grad[t * dout + c] as f64);
                    out[t * dout + c] += wt * v;
                    norm += v * v;
                    dy_combine[r * dout + c] = wt * g;
                    dslot_weights[t * k + j] += g * v;
                }
                util[expert_of_row[r]] += wt.abs() * norm.sqrt();
            }
        }
        Outputs {
            h,
            y,
            dx,
            dweights,
            dbias: if self.bias.is_some() { dbias } else { Vec::new() },
            out,
            util,
            dy_combine,
            dslot_weights,
            dres,
            drho,
        }
    }
}

/// `forward_rtol` for the outputs in the input type (h, y, out), `grad_rtol`
/// for the f32 ones computed from them (gradients, utilisation).
fn assert_outputs_close(what: &str, actual: &Outputs, expected: &Outputs, forward_rtol: f64, grad_rtol: f64) {
    let pairs = [
        ("h", &actual.h, &expected.h, forward_rtol),
        ("y", &actual.y, &expected.y, forward_rtol),
        ("dx", &actual.dx, &expected.dx, grad_rtol),
        ("dweights", &actual.dweights, &expected.dweights, grad_rtol),
        ("dbias", &actual.dbias, &expected.dbias, grad_rtol),
        ("out", &actual.out, &expected.out, forward_rtol),
        ("util", &actual.util, &expected.util, grad_rtol),
        ("dy_combine", &actual.dy_combine, &expected.dy_combine, grad_rtol),
        (
            "dslot_weights",
            &actual.dslot_weights,
            &expected.dslot_weights,
            grad_rtol,
        ),
        ("dres", &actual.dres, &expected.dres, grad_rtol),
        ("drho", &actual.drho, &expected.drho, grad_rtol),
    ];
    for (name, a, e, rtol) in pairs {
        assert_close(&format!("{what}: {name}"), a, e, rtol);
    }
}

/// Checks a problem on a device against the reference, and CUDA against the
/// CPU. The reference takes the device's own h and y, so on the CPU the f32
/// outputs computed from them meet the f32 tolerance whatever T. On CUDA the
/// bf16/f16 backward products are exactly split operands summed by tensor
/// cores, whose accumulation order and rounding the hardware leaves
/// unspecified (DESIGN 6; EMU_MMA=truncate models one such): held to T's
/// tolerance. Across devices h and y may differ by a rounding of T, and so
/// may the gradients.
fn check_problem<T: FloatElement>(what: &str, problem: &Problem, device: &Device) {
    let outputs = problem.run::<T>(device);
    let reference = problem.reference::<T>(&outputs.h, &outputs.y);
    let label = format!("{what} ({}) on {device}", T::DTYPE);
    let grad_rtol = if device.is_cuda() {
        rtol::<T>(true)
    } else {
        rtol::<f32>(true)
    };
    assert_outputs_close(&label, &outputs, &reference, rtol::<T>(true), grad_rtol);
    if device.is_cuda() {
        assert_outputs_close(
            &format!("{label} against the CPU"),
            &outputs,
            &problem.run::<T>(&Device::cpu()),
            rtol::<T>(true),
            rtol::<T>(true),
        );
    }
}

fn check_all_dtypes(what: &str, problem: &Problem, device: &Device) {
    check_problem::<f32>(what, problem, device);
    check_problem::<bf16>(what, problem, device);
    check_problem::<f16>(what, problem, device);
}

const ACTIVATIONS: [Activation; 5] = [
    Activation::None,
    Activation::Relu,
    Activation::Gelu,
    Activation::Silu,
    Activation::SwiGlu,
];

fn hand_made_plans_match_the_reference(device: &Device) {
    let cpu = Device::cpu();
    let mut rng = Rng::new(7);
    let mut pick = |n: usize| rng.below(n as u32) as usize;
    // (name, experts, k, choices)
    let tokens = 37;
    let empty_experts: Vec<Vec<Option<usize>>> = (0..tokens)
        .map(|t| vec![Some([1, 2, 4][t % 3]), Some([4, 1, 2][t % 3])])
        .collect();
    let mut one_row: Vec<Vec<Option<usize>>> = (0..tokens).map(|t| vec![Some(1 + t % 2)]).collect();
    one_row[17] = vec![Some(0)];
    let all_to_one: Vec<Vec<Option<usize>>> = (0..tokens).map(|_| vec![Some(2)]).collect();
    let single_expert: Vec<Vec<Option<usize>>> = (0..tokens).map(|_| vec![Some(0)]).collect();
    let masked: Vec<Vec<Option<usize>>> = (0..tokens)
        .map(|t| {
            if t % 4 == 1 {
                vec![None, None, None]
            } else {
                vec![Some(pick(5)), None, Some(5)]
            }
        })
        .collect();
    let plans = [
        ("empty experts", 6, 2, empty_experts),
        ("one-row expert", 3, 1, one_row),
        ("all rows to one expert", 4, 1, all_to_one),
        ("E = 1", 1, 1, single_expert),
        ("empty slots", 6, 3, masked),
    ];
    for (p, (name, experts, k, choices)) in plans.iter().enumerate() {
        let plan = plan_from_choices(choices, *experts, *k, &cpu);
        for (a, &activation) in ACTIVATIONS.iter().enumerate() {
            let variant = if a % 2 == 0 { Variant::Tokens } else { Variant::Rows };
            let (din, dout) = [(7, 5), (16, 8), (13, 3)][(p + a) % 3];
            let problem = Problem::new(&plan, variant, activation, din, dout, (p * 10 + a) as u64);
            let what = format!("{name}, {activation:?}, {variant:?}, {din}x{dout}");
            check_all_dtypes(&what, &problem, device);
            check_problem::<bf16>(&format!("{what}, no bias/res/rho"), &problem.without_extras(), device);
        }
    }
}

fn routed_plans_at_tile_and_chunk_sizes_match_the_reference(device: &Device) {
    let mut rng = Rng::new(11);
    // Rows past one 64/128-row tile and one 256-row chunk, widths past one
    // 64-column tile, aligned (tensor cores) and odd.
    let cases = [
        (700, 3, TopK::K(2), 32, 24, Activation::SwiGlu),
        (700, 3, TopK::K(2), 33, 70, Activation::Gelu),
        (300, 5, TopK::All, 72, 136, Activation::Relu),
        (520, 8, TopK::K(1), 16, 64, Activation::Silu),
        (90, 2, TopK::K(1), 130, 9, Activation::None),
    ];
    for (i, (tokens, experts, k, din, dout, activation)) in cases.into_iter().enumerate() {
        let (plan, _) = routed_plan(&mut rng, tokens, experts, k);
        let problem = Problem::new(&plan, Variant::Tokens, activation, din, dout, 100 + i as u64);
        let what = format!("T {tokens}, E {experts}, {k:?}, {din}x{dout}, {activation:?}");
        check_problem::<f32>(&what, &problem, device);
        check_problem::<bf16>(&what, &problem, device);
    }
}

fn an_empty_batch_gives_empty_outputs(device: &Device) {
    let plan = plan_from_choices(&[], 3, 2, &Device::cpu());
    let problem = Problem::new(&plan, Variant::Tokens, Activation::SwiGlu, 5, 4, 1);
    let outputs = problem.run::<f32>(&Device::cpu());
    assert!(outputs.h.is_empty() && outputs.y.is_empty() && outputs.dx.is_empty() && outputs.out.is_empty());
    assert_eq!(outputs.dweights, vec![0.0; 3 * 5 * 8]);
    assert_eq!(outputs.util, vec![0.0; 3]);
    check_all_dtypes("T = 0", &problem, device);
}

// ------------------------------------------------------------ determinism

fn outputs_are_bitwise_identical_across_runs_and_thread_counts(device: &Device) {
    let mut rng = Rng::new(3);
    let (plan, _) = routed_plan(&mut rng, 1500, 4, TopK::K(2));
    let problem = Problem::new(&plan, Variant::Tokens, Activation::Gelu, 48, 40, 9);
    let bits = |o: &Outputs| format!("{o:?}");
    let first = problem.run::<bf16>(device);
    assert_eq!(bits(&first), bits(&problem.run::<bf16>(device)), "{device}: two runs");
    let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let second = single.install(|| problem.run::<bf16>(device));
    assert_eq!(bits(&first), bits(&second), "{device}: one thread");
}

// ------------------------------------------------------------ errors

struct Small {
    x: Tensor<f32>,
    w: Tensor<f32>,
    plan: DispatchPlan,
}

/// T = 3, E = 2, k = 2, Din = 2, Dout = 3: token 0 -> (0, 1), token 1 ->
/// (1, empty), token 2 -> (0, 1).
fn small(device: &Device) -> Small {
    let choices = vec![vec![Some(0), Some(1)], vec![Some(1), None], vec![Some(0), Some(1)]];
    Small {
        x: tensor(vec![0.5f32; 6], &[3, 2], device),
        w: tensor(vec![0.25f32; 12], &[2, 2, 3], device),
        plan: plan_from_choices(&choices, 2, 2, device),
    }
}

fn with_part(plan: &DispatchPlan, part: &str, values: Vec<u32>, shape: &[usize]) -> DispatchPlan {
    let device = plan.counts.device();
    let mut copy = copy_plan(plan, &device);
    let replacement = tensor(values, shape, &device);
    match part {
        "counts" => copy.counts = replacement,
        "offsets" => copy.offsets = replacement,
        "token_of_row" => copy.token_of_row = replacement,
        _ => copy.row_of_slot = replacement,
    }
    copy
}

fn forward_error(s: &Small, plan: &DispatchPlan) -> Error {
    experts::layer_forward(&s.x, plan, &s.w, None, Activation::None).unwrap_err()
}

fn backward_error(s: &Small, plan: &DispatchPlan) -> Error {
    let (_, saved) = experts::layer_forward(&s.x, &s.plan, &s.w, None, Activation::None).unwrap();
    let dy = tensor(vec![1f32; 5 * 3], &[5, 3], &s.x.device());
    experts::layer_backward(&dy, &s.x, plan, &s.w, &saved).unwrap_err()
}

fn combine_error(s: &Small, plan: &DispatchPlan) -> Error {
    let device = s.x.device();
    let y = tensor(vec![1f32; 5 * 3], &[5, 3], &device);
    let weights = tensor(vec![1f32; 6], &[3, 2], &device);
    let forward = experts::combine(&y, &weights, plan, None, None).unwrap_err();
    let dout = tensor(vec![1f32; 9], &[3, 3], &device);
    let backward = experts::combine_backward(&dout, &y, &weights, plan, None, None).unwrap_err();
    assert_eq!(forward, backward, "combine and its backward disagree");
    forward
}

/// Every check of a bad plan, on one device: the errors, in order.
fn plan_errors(device: &Device) -> Vec<Error> {
    let s = small(device);
    // counts [2, 3], offsets [0, 2, 5], token_of_row [0, 2, 0, 1, 2],
    // row_of_slot [0, 2, 3, MAX, 1, 4].
    let mut errors = Vec::new();
    let bad_offsets = with_part(&s.plan, "offsets", vec![0, 3, 5], &[3]);
    let short_total = with_part(&s.plan, "offsets", vec![0, 2, 4], &[3]);
    let nonzero_start = with_part(&s.plan, "offsets", vec![1, 3, 6], &[3]);
    for plan in [&bad_offsets, &short_total, &nonzero_start] {
        let error = forward_error(&s, plan);
        assert!(
            matches!(
                error,
                Error::InvalidArgument {
                    argument: "plan.offsets",
                    ..
                }
            ),
            "{device}: {error}"
        );
        errors.push(error);
    }
    let bad_token = with_part(&s.plan, "token_of_row", vec![0, 2, 0, 3, 9], &[5]);
    let error = forward_error(&s, &bad_token);
    let expected = Error::IndexOutOfRange {
        argument: "plan.token_of_row",
        position: 3,
        index: 3,
        bound: 3,
    };
    assert_eq!(error, expected, "{device}");
    assert_eq!(combine_error(&s, &bad_token), expected, "{device}");
    errors.push(error);

    let row_out_of_range = with_part(&s.plan, "row_of_slot", vec![0, 2, 3, EMPTY, 1, 5], &[3, 2]);
    let expected = Error::IndexOutOfRange {
        argument: "plan.row_of_slot",
        position: 5,
        index: 5,
        bound: 5,
    };
    assert_eq!(backward_error(&s, &row_out_of_range), expected, "{device}");
    assert_eq!(combine_error(&s, &row_out_of_range), expected, "{device}");
    let wrong_token = with_part(&s.plan, "row_of_slot", vec![0, 1, 3, EMPTY, 2, 4], &[3, 2]);
    let named_twice = with_part(&s.plan, "row_of_slot", vec![0, 0, 3, EMPTY, 1, 4], &[3, 2]);
    let unnamed = with_part(&s.plan, "row_of_slot", vec![0, 2, EMPTY, EMPTY, 1, 4], &[3, 2]);
    for plan in [&wrong_token, &named_twice, &unnamed] {
        let error = combine_error(&s, plan);
        assert!(
            matches!(
                error,
                Error::InvalidArgument {
                    argument: "plan.row_of_slot",
                    ..
                }
            ),
            "{device}: {error}"
        );
        assert_eq!(backward_error(&s, plan), error, "{device}");
        errors.push(error);
    }
    // The forward does not read row_of_slot; the rows variant not token_of_row.
    experts::layer_forward(&s.x, &wrong_token, &s.w, None, Activation::None).unwrap();
    let x_rows = tensor(vec![0.5f32; 10], &[5, 2], device);
    experts::layer_forward_rows(&x_rows, &bad_token, &s.w, None, Activation::None).unwrap();
    errors
}

fn inconsistent_plans_are_refused_with_the_same_error_everywhere(device: &Device) {
    let errors = plan_errors(device);
    if device.is_cuda() {
        assert_eq!(plan_errors(&Device::cpu()), errors, "the CPU and CUDA errors differ");
    }
}

fn malformed_operands_are_shape_errors(device: &Device) {
    let s = small(device);
    let shape_error = |result: Result<(Tensor<f32>, LayerSaved<f32>), Error>, argument: &str| match result {
        Err(Error::ShapeMismatch { argument: a, .. }) if a == argument => {}
        other => panic!("{device}: expected a shape error on {argument}, got {other:?}"),
    };
    let forward = |x: &Tensor<f32>, w: &Tensor<f32>, bias: Option<&Tensor<f32>>, activation| {
        experts::layer_forward(x, &s.plan, w, bias.map(TensorRef::from), activation)
    };
    shape_error(
        forward(&s.x, &tensor(vec![0f32; 12], &[2, 6], device), None, Activation::None),
        "weights",
    );
    shape_error(
        forward(&s.x, &tensor(vec![0f32; 0], &[2, 2, 0], device), None, Activation::None),
        "weights",
    );
    shape_error(forward(&s.x, &s.w, None, Activation::SwiGlu), "weights");
    shape_error(
        forward(&tensor(vec![0f32; 9], &[3, 3], device), &s.w, None, Activation::None),
        "x",
    );
    let bias = tensor(vec![0f32; 4], &[2, 2], device);
    shape_error(forward(&s.x, &s.w, Some(&bias), Activation::None), "bias");
    let wrong_rows = tensor(vec![0f32; 8], &[4, 2], device);
    shape_error(
        experts::layer_forward_rows(&wrong_rows, &s.plan, &s.w, None, Activation::None),
        "x_rows",
    );
    let three_experts = tensor(vec![0.25f32; 18], &[3, 2, 3], device);
    shape_error(forward(&s.x, &three_experts, None, Activation::None), "plan.counts");
    let long_offsets = with_part(&s.plan, "offsets", vec![0, 2, 5, 5], &[4]);
    shape_error(
        experts::layer_forward(&s.x, &long_offsets, &s.w, None, Activation::None),
        "plan.offsets",
    );

    let (_, saved) = experts::layer_forward(&s.x, &s.plan, &s.w, None, Activation::None).unwrap();
    let dy = tensor(vec![0f32; 5 * 2], &[5, 2], device);
    assert!(matches!(
        experts::layer_backward(&dy, &s.x, &s.plan, &s.w, &saved),
        Err(Error::ShapeMismatch { argument: "dy", .. })
    ));
    let dy = tensor(vec![0f32; 5 * 3], &[5, 3], device);
    let flat = with_part(&s.plan, "row_of_slot", vec![0, 2, 3, EMPTY, 1, 4], &[6, 1]);
    assert!(matches!(
        experts::layer_backward(&dy, &s.x, &flat, &s.w, &saved),
        Err(Error::ShapeMismatch {
            argument: "plan.row_of_slot",
            ..
        })
    ));
    let other_x = tensor(vec![0f32; 8], &[4, 2], device);
    assert!(matches!(
        experts::layer_backward(&dy, &other_x, &s.plan, &s.w, &saved),
        Err(Error::InvalidArgument { argument: "x", .. })
    ));

    let y = tensor(vec![1f32; 15], &[5, 3], device);
    let weights = tensor(vec![1f32; 6], &[3, 2], device);
    let res = tensor(vec![1f32; 9], &[3, 3], device);
    let rho = tensor(vec![1f32; 3], &[3], device);
    assert!(matches!(
        experts::combine(&y, &weights, &s.plan, None, &rho),
        Err(Error::InvalidArgument { argument: "rho", .. })
    ));
    let dout = tensor(vec![1f32; 9], &[3, 3], device);
    assert!(matches!(
        experts::combine_backward(&dout, &y, &weights, &s.plan, None, &rho),
        Err(Error::InvalidArgument { argument: "rho", .. })
    ));
    let short_res = tensor(vec![1f32; 6], &[3, 2], device);
    assert!(matches!(
        experts::combine(&y, &weights, &s.plan, &short_res, None),
        Err(Error::ShapeMismatch { argument: "res", .. })
    ));
    let wide_weights = tensor(vec![1f32; 9], &[3, 3], device);
    assert!(matches!(
        experts::combine(&y, &wide_weights, &s.plan, &res, &rho),
        Err(Error::ShapeMismatch {
            argument: "weights",
            ..
        })
    ));
    let short_y = tensor(vec![1f32; 12], &[4, 3], device);
    assert!(matches!(
        experts::combine(&short_y, &weights, &s.plan, None, None),
        Err(Error::ShapeMismatch { argument: "y", .. })
    ));
    let short_dout = tensor(vec![1f32; 6], &[3, 2], device);
    assert!(matches!(
        experts::combine_backward(&short_dout, &y, &weights, &s.plan, None, None),
        Err(Error::ShapeMismatch { argument: "dout", .. })
    ));
}

fn operands_on_different_devices_are_refused(cuda: &Device) {
    let (host, gpu) = (small(&Device::cpu()), small(cuda));
    assert!(matches!(
        experts::layer_forward(&host.x, &host.plan, &gpu.w, None, Activation::None),
        Err(Error::DeviceMismatch {
            argument: "weights",
            ..
        })
    ));
    assert!(matches!(
        experts::layer_forward(&gpu.x, &host.plan, &gpu.w, None, Activation::None),
        Err(Error::DeviceMismatch {
            argument: "plan.counts",
            ..
        })
    ));
    let (_, saved) = experts::layer_forward(&gpu.x, &gpu.plan, &gpu.w, None, Activation::None).unwrap();
    let dy = tensor(vec![0f32; 15], &[5, 3], &Device::cpu());
    assert!(matches!(
        experts::layer_backward(&dy, &gpu.x, &gpu.plan, &gpu.w, &saved),
        Err(Error::DeviceMismatch { argument: "dy", .. })
    ));
    let y = tensor(vec![1f32; 15], &[5, 3], cuda);
    let weights = tensor(vec![1f32; 6], &[3, 2], &Device::cpu());
    assert!(matches!(
        experts::combine(&y, &weights, &gpu.plan, None, None),
        Err(Error::DeviceMismatch {
            argument: "weights",
            ..
        })
    ));
}

fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<LayerSaved<bf16>>();
    send_sync::<experts::LayerGrads>();
    send_sync::<experts::CombineGrads>();
}

// Issue 14, item 4: at +-inf every activation takes its limit (act(+inf) =
// +inf, act'(+inf) = 1, act(-inf) = act'(-inf) = 0) on both backends; the
// formulas alone give inf * 0 = NaN, which CUDA returned where the CPU
// returned -inf.
fn activations_take_their_limits_at_infinity(device: &Device) {
    let logits = tensor(vec![1.0f32, 0.0, 0.0, 1.0], &[2, 2], device);
    let (routed, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(1))).unwrap();
    // Finite inputs whose product overflows: token 0 (expert 0) has
    // h = +inf, token 1 (expert 1) h = -inf.
    let x = tensor(vec![3e38f32, -3e38], &[2, 1], device);
    let dy = tensor(vec![1.0f32; 2], &[2, 1], device);
    for activation in [Activation::Relu, Activation::Gelu, Activation::Silu] {
        let w = tensor(vec![10.0f32, 10.0], &[2, 1, 1], device);
        let (y, saved) = experts::layer_forward(&x, &routed.plan, &w, None, activation).unwrap();
        assert_eq!(
            y.to_vec().unwrap(),
            vec![f32::INFINITY, 0.0],
            "{device:?} {activation:?}"
        );
        let grads = experts::layer_backward(&dy, &x, &routed.plan, &w, &saved).unwrap();
        // dx = dh W^T = 10 act'(h): 10 at +inf, 0 at -inf.
        assert_eq!(grads.dx.to_vec().unwrap(), vec![10.0, 0.0], "{device:?} {activation:?}");
    }
    // SwiGlu: gate +-inf, up 2: y = silu(gate) * up, dgate = dy up silu'(gate),
    // dup = dy silu(gate).
    let w = tensor(vec![10.0f32, 0.0, 10.0, 0.0], &[2, 1, 2], device);
    let bias = tensor(vec![0.0f32, 2.0, 0.0, 2.0], &[2, 2], device);
    let (y, saved) = experts::layer_forward(&x, &routed.plan, &w, &bias, Activation::SwiGlu).unwrap();
    assert_eq!(y.to_vec().unwrap(), vec![f32::INFINITY, 0.0], "{device:?} SwiGlu");
    let grads = experts::layer_backward(&dy, &x, &routed.plan, &w, &saved).unwrap();
    // dx = dgate * 1 + dup * 0: dup * 0 is NaN at +inf (dup = inf), 0 at -inf.
    let dx = grads.dx.to_vec().unwrap();
    assert_eq!(dx[1], 0.0, "{device:?} SwiGlu dx {dx:?}");
    let dbias = grads.dbias.to_vec().unwrap();
    assert_eq!(dbias, vec![2.0, f32::INFINITY, 0.0, 0.0], "{device:?} SwiGlu dbias");
}

common::harness::test_main! {
    devices: [
        inconsistent_plans_are_refused_with_the_same_error_everywhere,
        outputs_are_bitwise_identical_across_runs_and_thread_counts,
        an_empty_batch_gives_empty_outputs,
        routed_plans_at_tile_and_chunk_sizes_match_the_reference,
        hand_made_plans_match_the_reference,
        matches_the_numpy_golden_files,
        malformed_operands_are_shape_errors,
        activations_take_their_limits_at_infinity,
    ],
    cuda: [
        operands_on_different_devices_are_refused,
    ],
    host: [
        handles_are_send_and_sync,
    ],
}

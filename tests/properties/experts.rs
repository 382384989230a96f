//! experts: layer forward (tokens and rows variants), combine, both backwards.

use super::*;

#[derive(Clone, Copy, Debug)]
struct Case {
    tokens: usize,
    experts: usize,
    k: usize,
    din: usize,
    dout: usize,
    activation: Activation,
    bias: bool,
    residual: usize,
    poisoned: bool,
    /// An operand of the wrong shape (index into [`WRONG_SHAPE`]; 0: none).
    wrong_shape: usize,
    seed: u64,
}

/// The operands a case may give the wrong shape, as the errors name them:
/// "x" is the expert weights with one input row too many (the weights fix
/// Din, so the error names x), "weights" the combine's mixing weights with
/// one column too many; "rho without res" passes rho alone.
const WRONG_SHAPE: [&str; 9] = [
    "",
    "x",
    "bias",
    "weights",
    "res",
    "rho",
    "dout",
    "dy",
    "rho without res",
];

impl Case {
    /// 1 if `argument` is the operand this case gives the wrong shape.
    fn extra(&self, argument: &str) -> usize {
        usize::from(self.wrong_shape != 0 && WRONG_SHAPE[self.wrong_shape] == argument)
    }
}

struct Data<T> {
    logits: Vec<f32>,
    x: Vec<T>,
    weights: Vec<T>,
    bias: Vec<T>,
    second: Vec<T>,
    mix: Vec<f32>,
    res: Vec<T>,
    rho: Vec<f32>,
    dy: Vec<f32>,
    dout: Vec<f32>,
}

fn layer<T: FloatElement>(case: Case, device: &Device, data: &Data<T>) -> Outcome {
    let Case {
        tokens,
        experts,
        k,
        din,
        dout,
        activation,
        ..
    } = case;
    let width = activation.width(dout);
    let logits = t(data.logits.clone(), &[tokens, experts], device)?;
    let (routed, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(k)))?;
    let plan = &routed.plan;
    let rows = routed.plan.token_of_row.len();
    let x = t(data.x.clone(), &[tokens, din], device)?;
    let weight_din = din + case.extra("x");
    let weights = t(
        data.weights[..experts * weight_din * width].to_vec(),
        &[experts, weight_din, width],
        device,
    )?;
    let bias = t(data.bias.clone(), &[experts, width + case.extra("bias")], device)?;
    let bias = case.bias.then_some(TensorRef::from(&bias));
    let (y, saved) = experts::layer_forward(&x, plan, &weights, bias, activation)?;
    // A second layer on the rows (the rows variant), no activation.
    let second = t(data.second.clone(), &[experts, dout, dout], device)?;
    let (z, saved_rows) = experts::layer_forward_rows(&y, plan, &second, None, Activation::None)?;
    let mix = t(data.mix.clone(), &[tokens, k + case.extra("weights")], device)?;
    let res = t(data.res.clone(), &[tokens, dout + case.extra("res")], device)?;
    let rho = t(data.rho.clone(), &[tokens + case.extra("rho")], device)?;
    let (res, rho) = match case.residual {
        _ if case.extra("rho without res") == 1 => (None, Some(TensorRef::from(&rho))),
        0 => (None, None),
        1 => (Some(TensorRef::from(&res)), None),
        _ => (Some(TensorRef::from(&res)), Some(TensorRef::from(&rho))),
    };
    let (out, util) = experts::combine(&z, &mix, plan, res.clone(), rho.clone())?;
    let dout_t = t(data.dout.clone(), &[tokens, dout + case.extra("dout")], device)?;
    let combine_grads = experts::combine_backward(&dout_t, &z, &mix, plan, res, rho)?;
    let rows_grads = experts::layer_backward(&combine_grads.dy, &y, plan, &second, &saved_rows)?;
    let dy_width = dout + case.extra("dy");
    let dy = t(data.dy[..rows * dy_width].to_vec(), &[rows, dy_width], device)?;
    let grads = experts::layer_backward(&dy, &x, plan, &weights, &saved)?;
    let (elementwise, reduction) = (1e-5f64.max(reduction_rtol::<T>() / 10.0), reduction_rtol::<T>());
    let mut outputs = vec![
        f("h", saved.h(), reduction)?,
        f("y", &y, reduction)?,
        f("z", &z, reduction)?,
        f("out", &out, reduction)?,
        f("util", &util, reduction)?,
        f("combine dy", &combine_grads.dy, elementwise)?,
        f("combine dweights", &combine_grads.dweights, reduction)?,
        f("rows dx", &rows_grads.dx, reduction)?,
        f("rows dweights", &rows_grads.dweights, reduction)?,
        f("dx", &grads.dx, reduction)?,
        f("dweights", &grads.dweights, reduction)?,
    ];
    for (name, grad) in [
        ("dbias", &grads.dbias),
        ("dres", &combine_grads.dres),
        ("drho", &combine_grads.drho),
    ] {
        if let Some(grad) = grad {
            outputs.push(f(name, grad, reduction)?);
        }
    }
    Ok(outputs)
}

fn run<T: FloatElement>(case: Case, trial: &Device) {
    let Case {
        tokens,
        experts,
        k,
        din,
        dout,
        activation,
        ..
    } = case;
    let mut rng = Rng::new(case.seed);
    let width = activation.width(dout);
    let mut data: Data<T> = Data {
        logits: floats(&mut rng, tokens * experts, 2.0),
        x: floats(&mut rng, tokens * din, 1.0),
        weights: floats(&mut rng, experts * (din + 1) * width, 1.0),
        bias: floats(&mut rng, experts * (width + case.extra("bias")), 1.0),
        second: floats(&mut rng, experts * dout * dout, 1.0),
        mix: floats(&mut rng, tokens * (k + case.extra("weights")), 1.0),
        res: floats(&mut rng, tokens * (dout + case.extra("res")), 1.0),
        rho: floats(&mut rng, tokens + case.extra("rho"), 1.0),
        dy: floats(&mut rng, tokens * k * (dout + case.extra("dy")), 1.0),
        dout: floats(&mut rng, tokens * (dout + case.extra("dout")), 1.0),
    };
    let poisoned = case.poisoned && poison(&mut rng, &mut data.x, 0.2);
    let outcome = check_everywhere(trial, "experts", !poisoned, |device| layer(case, device, &data));
    // The documented error of the one wrong operand, where the case passes it.
    let passed = match WRONG_SHAPE[case.wrong_shape] {
        "bias" => case.bias,
        "res" => case.residual >= 1,
        "rho" => case.residual >= 2,
        _ => true,
    };
    let as_predicted = match (WRONG_SHAPE[case.wrong_shape], &outcome) {
        ("", Ok(_)) => true,
        (_, Ok(_)) => !passed,
        ("rho without res", Err(Error::InvalidArgument { argument, .. })) => *argument == "rho",
        (wrong, Err(Error::ShapeMismatch { argument, .. })) => passed && *argument == wrong,
        _ => false,
    };
    assert!(as_predicted, "{case:?}: {outcome:?}");
    if outcome.is_err() {
        return;
    }
    if poisoned {
        return;
    }
    assert_no_nan("experts", &outcome);
    // dx against central differences of sum(y * dy), for the smooth
    // activations in f32 (Relu's kink would need a margin).
    if T::DTYPE != moerec::DType::F32 || activation == Activation::Relu {
        return;
    }
    let Ok(outputs) = &outcome else { return };
    let Out::F(_, dx, _) = &outputs[9] else { unreachable!() };
    let x0: Vec<f32> = data.x.iter().map(|v| v.to_f32()).collect();
    let loss = |point: &[f32]| -> Option<f64> {
        let device = Device::cpu();
        let logits = t(data.logits.clone(), &[tokens, experts], &device).ok()?;
        let (routed, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(k))).ok()?;
        let x = t(point.iter().map(|&v| T::from_f32(v)).collect(), &[tokens, din], &device).ok()?;
        let weights = t(
            data.weights[..experts * din * width].to_vec(),
            &[experts, din, width],
            &device,
        )
        .ok()?;
        let bias = t(data.bias.clone(), &[experts, width], &device).ok()?;
        let (y, _) = experts::layer_forward(
            &x,
            &routed.plan,
            &weights,
            case.bias.then_some(TensorRef::from(&bias)),
            activation,
        )
        .ok()?;
        let y = y.to_vec().ok()?;
        Some(
            y.iter()
                .zip(&data.dy)
                .map(|(y, d)| f64::from(y.to_f32()) * f64::from(*d))
                .sum(),
        )
    };
    assert_central_differences("experts dx", &x0, dx, loss);
}

/// The experts properties on `trial` (module docs of tests/properties.rs).
pub(super) fn experts_properties(trial: &Device) {
    for_each_seed(|config| {
        proptest!(config, |(
            tokens in 0usize..6, experts in 1usize..5, k in 1usize..4,
            din in prop::sample::select(vec![1usize, 2, 3, 5, 8]), dout in prop::sample::select(vec![1usize, 2, 3, 5]),
            activation in prop::sample::select(vec![Activation::None, Activation::Relu, Activation::Gelu, Activation::Silu, Activation::SwiGlu]),
            bias in any::<bool>(), residual in 0usize..3, poisoned in prop::bool::weighted(0.2),
            wrong_shape in prop::sample::select(vec![0usize, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
            dtype in 0usize..3, seed in any::<u64>(),
        )| {
            let k = k.min(experts);
            let case = Case { tokens, experts, k, din, dout, activation, bias, residual, poisoned, wrong_shape, seed };
            match dtype {
                0 => run::<f32>(case, trial),
                1 => run::<bf16>(case, trial),
                _ => run::<f16>(case, trial),
            }
        });
    });
}

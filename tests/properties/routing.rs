//! routing: forward (indices, weights, plan, losses, gate mass) and backward.

use super::*;

#[derive(Clone, Copy, Debug)]
struct Case {
    tokens: usize,
    experts: usize,
    k: usize,
    sigmoid: bool,
    renormalize: bool,
    expert_mask: bool,
    token_mask: bool,
    bias: bool,
    poisoned: bool,
    seed: u64,
}

/// Everything the forward and backward return, and the loss the backward
/// differentiates for `dweights` and the coefficients.
fn route<T: FloatElement>(
    case: Case,
    device: &Device,
    logits: &[T],
    masks: &(Vec<u32>, Vec<u32>, Vec<f32>),
    dweights: &[f32],
    coefs: (f32, f32),
) -> Outcome {
    let Case { tokens, experts, .. } = case;
    let logits = t(logits.to_vec(), &[tokens, experts], device)?;
    let expert_mask = t(masks.0.clone(), &[experts], device)?;
    let token_mask = t(masks.1.clone(), &[tokens], device)?;
    let bias = t(masks.2.clone(), &[experts], device)?;
    let k = if case.k == 0 { TopK::All } else { TopK::K(case.k) };
    let mut options = RoutingOptions::new(k)
        .with_score(if case.sigmoid { Score::Sigmoid } else { Score::Softmax })
        .with_renormalize(case.renormalize);
    if case.expert_mask {
        options = options.with_expert_mask(&expert_mask);
    }
    if case.token_mask {
        options = options.with_token_mask(&token_mask);
    }
    if case.bias {
        options = options.with_selection_bias(&bias);
    }
    let (routed, saved) = routing::forward(&logits, &options)?;
    let slots = routed.indices.len();
    let dweights = t(dweights[..slots].to_vec(), routed.indices.shape(), device)?;
    let dlogits = routing::backward(&logits, &dweights, coefs.0, coefs.1, &saved)?;
    let rtol = reduction_rtol::<T>();
    Ok(vec![
        u("indices", &routed.indices)?,
        f("weights", &routed.weights, rtol)?,
        u("counts", &routed.plan.counts)?,
        u("offsets", &routed.plan.offsets)?,
        u("token_of_row", &routed.plan.token_of_row)?,
        u("row_of_slot", &routed.plan.row_of_slot)?,
        f("lb_loss", &routed.lb_loss, rtol)?,
        f("z_loss", &routed.z_loss, rtol)?,
        f("gate_mass", &routed.gate_mass, rtol)?,
        f("dlogits", &dlogits, rtol)?,
    ])
}

/// The documented NonFinite of the forward, without masks: the lowest
/// (token, expert) holding NaN or +inf, or a token whose logits are all -inf
/// (at column 0).
fn expected_non_finite(logits: &[f32], experts: usize) -> Option<(u64, u64)> {
    logits.chunks(experts).enumerate().find_map(|(row, values)| {
        if let Some(column) = values.iter().position(|v| v.is_nan() || *v == f32::INFINITY) {
            Some((row as u64, column as u64))
        } else if values.iter().all(|v| *v == f32::NEG_INFINITY) {
            Some((row as u64, 0))
        } else {
            None
        }
    })
}

fn run<T: FloatElement>(case: Case) {
    let Case { tokens, experts, .. } = case;
    let mut rng = Rng::new(case.seed);
    let mut logits = floats::<T>(&mut rng, tokens * experts, 4.0);
    let poisoned = case.poisoned && poison(&mut rng, &mut logits, 0.15);
    let masks = (
        (0..experts)
            .map(|_| u32::from(unit(&mut rng) < 0.7))
            .collect::<Vec<_>>(),
        (0..tokens).map(|_| u32::from(unit(&mut rng) < 0.7)).collect::<Vec<_>>(),
        floats::<f32>(&mut rng, experts, 1.0),
    );
    let dweights = floats::<f32>(&mut rng, tokens * experts.max(case.k), 1.0);
    let coefs = (unit(&mut rng) as f32, unit(&mut rng) as f32 * 0.1);
    let outcome = check_everywhere("routing", !poisoned, |device| {
        route(case, device, &logits, &masks, &dweights, coefs)
    });

    let active = if case.expert_mask {
        masks.0.iter().filter(|&&m| m == 1).count()
    } else {
        experts
    };
    if case.k > active || active == 0 {
        assert!(
            matches!(outcome, Err(Error::InvalidArgument { .. })),
            "{case:?}: {outcome:?}"
        );
        return;
    }
    let widened: Vec<f32> = logits.iter().map(|v| v.to_f32()).collect();
    if !case.expert_mask && !case.token_mask {
        match (expected_non_finite(&widened, experts), &outcome) {
            (None, Ok(_)) => {}
            (
                Some((row, column)),
                Err(Error::NonFinite {
                    argument: "logits",
                    row: r,
                    column: c,
                }),
            ) => {
                assert_eq!((row, column), (*r, *c))
            }
            (expected, outcome) => panic!("{case:?}: expected NonFinite at {expected:?}, got {outcome:?}"),
        }
    }
    if poisoned {
        return;
    }
    assert_no_nan("routing", &outcome);
    // Gradients: central differences of sum(weights * dweights) + lb lb_loss
    // + z z_loss, where the perturbation leaves the selection unchanged.
    if T::DTYPE != moerec::DType::F32 {
        return;
    }
    let Ok(outputs) = &outcome else { return };
    let (Out::U(_, indices), Out::F(_, dlogits, _)) = (&outputs[0], &outputs[9]) else {
        unreachable!()
    };
    let loss = |point: &[f32]| -> Option<f64> {
        let point: Vec<T> = point.iter().map(|&v| T::from_f32(v)).collect();
        let outputs = route(case, &Device::cpu(), &point, &masks, &dweights, coefs).ok()?;
        let (Out::U(_, idx), Out::F(_, w, _), Out::F(_, lb, _), Out::F(_, z, _)) =
            (&outputs[0], &outputs[1], &outputs[6], &outputs[7])
        else {
            unreachable!()
        };
        if idx != indices {
            return None;
        }
        let weighted: f64 = w
            .iter()
            .zip(&dweights)
            .map(|(&w, &d)| f64::from(w) * f64::from(d))
            .sum();
        Some(weighted + f64::from(coefs.0) * f64::from(lb[0]) + f64::from(coefs.1) * f64::from(z[0]))
    };
    assert_central_differences("routing dlogits", &widened, dlogits, loss);
}

proptest! {
    #![proptest_config(config())]
    #[test]
    fn routing_properties(
        tokens in 0usize..6, experts in 1usize..6, k in 0usize..7, sigmoid in any::<bool>(),
        renormalize in any::<bool>(), expert_mask in prop::bool::weighted(0.3),
        token_mask in prop::bool::weighted(0.3), bias in prop::bool::weighted(0.3),
        poisoned in prop::bool::weighted(0.2), dtype in 0usize..3, seed in any::<u64>(),
    ) {
        let case = Case { tokens, experts, k, sigmoid, renormalize, expert_mask, token_mask, bias, poisoned, seed };
        match dtype {
            0 => run::<f32>(case),
            1 => run::<bf16>(case),
            _ => run::<f16>(case),
        }
    }
}

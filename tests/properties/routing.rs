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
    /// A deliberately bad mask or bias (0: none; see [`Bad`]).
    bad: usize,
    poisoned: bool,
    seed: u64,
}

/// The bad operands a case may hold (`Case::bad`), each with the error the
/// forward documents for it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bad {
    None,
    ExpertMaskLength,
    TokenMaskLength,
    BiasLength,
    ExpertMaskValue,
    TokenMaskValue,
    BiasValue,
}

const BAD: [Bad; 7] = [
    Bad::None,
    Bad::ExpertMaskLength,
    Bad::TokenMaskLength,
    Bad::BiasLength,
    Bad::ExpertMaskValue,
    Bad::TokenMaskValue,
    Bad::BiasValue,
];

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
    let expert_mask = t(masks.0.clone(), &[masks.0.len()], device)?;
    let token_mask = t(masks.1.clone(), &[masks.1.len()], device)?;
    let bias = t(masks.2.clone(), &[masks.2.len()], device)?;
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

/// The documented NonFinite of the forward: over the valid tokens
/// (`token_mask`) and the active experts (`expert_mask`), the lowest
/// (token, expert) holding NaN or +inf, or a token whose active logits are
/// all -inf (at its first active column).
fn expected_non_finite(
    logits: &[f32],
    experts: usize,
    expert_mask: Option<&[u32]>,
    token_mask: Option<&[u32]>,
) -> Option<Error> {
    let active: Vec<usize> = (0..experts)
        .filter(|&e| expert_mask.map_or(true, |m| m[e] == 1))
        .collect();
    logits.chunks(experts).enumerate().find_map(|(row, values)| {
        if token_mask.is_some_and(|m| m[row] != 1) {
            return None;
        }
        let column = match active
            .iter()
            .find(|&&c| values[c].is_nan() || values[c] == f32::INFINITY)
        {
            Some(&c) => c,
            None if active.iter().all(|&c| values[c] == f32::NEG_INFINITY) => active[0],
            None => return None,
        };
        Some(Error::NonFinite {
            argument: "logits",
            row: row as u64,
            column: column as u64,
        })
    })
}

/// An `InvalidArgument` naming `argument` (and `position` in its message).
fn invalid_at(error: &Error, argument: &str, position: Option<usize>) -> bool {
    match error {
        Error::InvalidArgument { argument: a, message } => {
            *a == argument && position.map_or(true, |p| message.contains(&format!("at position {p}")))
        }
        _ => false,
    }
}

fn run<T: FloatElement>(case: Case, trial: &Device) {
    let Case { tokens, experts, .. } = case;
    let bad = BAD[case.bad];
    let mut rng = Rng::new(case.seed);
    let mut logits = floats::<T>(&mut rng, tokens * experts, 4.0);
    let poisoned = case.poisoned && poison(&mut rng, &mut logits, 0.15);
    let mut masks = (
        (0..experts)
            .map(|_| u32::from(unit(&mut rng) < 0.7))
            .collect::<Vec<_>>(),
        (0..tokens).map(|_| u32::from(unit(&mut rng) < 0.7)).collect::<Vec<_>>(),
        floats::<f32>(&mut rng, experts, 1.0),
    );
    let dweights = floats::<f32>(&mut rng, tokens * experts.max(case.k), 1.0);
    let coefs = (unit(&mut rng) as f32, unit(&mut rng) as f32 * 0.1);
    // The bad value goes to a random position; the error names the lowest.
    fn spoil(rng: &mut Rng, values: &mut [u32]) {
        if !values.is_empty() {
            let at = pick(rng, values.len());
            values[at] = [2, 7, u32::MAX][pick(rng, 3)];
        }
    }
    match bad {
        Bad::ExpertMaskLength => masks.0.push(1),
        Bad::TokenMaskLength => masks.1.push(1),
        Bad::BiasLength => {
            masks.2.pop();
        }
        Bad::ExpertMaskValue => spoil(&mut rng, &mut masks.0),
        Bad::TokenMaskValue => spoil(&mut rng, &mut masks.1),
        Bad::BiasValue => {
            let at = pick(&mut rng, experts);
            masks.2[at] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][pick(&mut rng, 3)];
        }
        Bad::None => {}
    }
    let outcome = check_everywhere(trial, "routing", !poisoned, |device| {
        route(case, device, &logits, &masks, &dweights, coefs)
    });

    // The documented error, in the order the forward checks: operand
    // shapes, expert mask values, k, bias values, token mask values, logits.
    let first_bad = |values: &[u32]| values.iter().position(|&m| m > 1);
    let active = if case.expert_mask {
        masks.0.iter().filter(|&&m| m == 1).count()
    } else {
        experts
    };
    let k = if case.k == 0 { active } else { case.k };
    let widened: Vec<f32> = logits.iter().map(|v| v.to_f32()).collect();
    let shape_error =
        |argument: &str| matches!(&outcome, Err(Error::ShapeMismatch { argument: a, .. }) if *a == argument);
    let invalid =
        |argument: &str, position: Option<usize>| outcome.as_ref().is_err_and(|e| invalid_at(e, argument, position));
    let as_predicted = if case.expert_mask && masks.0.len() != experts {
        shape_error("expert_mask")
    } else if case.token_mask && masks.1.len() != tokens {
        shape_error("token_mask")
    } else if case.bias && masks.2.len() != experts {
        shape_error("selection_bias")
    } else if let Some(p) = first_bad(&masks.0).filter(|_| case.expert_mask) {
        invalid("expert_mask", Some(p))
    } else if k == 0 || k > active {
        invalid("k", None)
    } else if let Some(p) = masks.2.iter().position(|b| !b.is_finite()).filter(|_| case.bias) {
        invalid("selection_bias", Some(p))
    } else if let Some(p) = first_bad(&masks.1).filter(|_| case.token_mask) {
        invalid("token_mask", Some(p))
    } else {
        let expert_mask = case.expert_mask.then_some(&masks.0[..]);
        let token_mask = case.token_mask.then_some(&masks.1[..]);
        match (
            expected_non_finite(&widened, experts, expert_mask, token_mask),
            &outcome,
        ) {
            (None, Ok(_)) => true,
            (Some(expected), Err(error)) => expected == *error,
            _ => false,
        }
    };
    assert!(as_predicted, "{case:?}: {bad:?}, got {outcome:?}");
    if outcome.is_err() {
        return;
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

/// The routing properties on `trial` (module docs of tests/properties.rs).
pub(super) fn routing_properties(trial: &Device) {
    for_each_seed(|config| {
        proptest!(config, |(
            tokens in 0usize..6, experts in 1usize..6, k in 0usize..7, sigmoid in any::<bool>(),
            renormalize in any::<bool>(), expert_mask in prop::bool::weighted(0.3),
            token_mask in prop::bool::weighted(0.3), bias in prop::bool::weighted(0.3),
            poisoned in prop::bool::weighted(0.2), dtype in 0usize..3, seed in any::<u64>(),
            bad in prop::sample::select(vec![0usize, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6]),
        )| {
            let case = Case {
                tokens, experts, k, sigmoid, renormalize, expert_mask, token_mask, bias, bad, poisoned, seed,
            };
            match dtype {
                0 => run::<f32>(case, trial),
                1 => run::<bf16>(case, trial),
                _ => run::<f16>(case, trial),
            }
        });
    });
}

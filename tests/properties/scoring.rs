//! scoring: scores, their backward, cross-entropy, its backward, top-n.

use super::*;

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    heads: usize,
    width: usize,
    items: usize,
    shared: bool,
    probabilities: bool,
    scale: f32,
    bias: bool,
    excluded: usize,
    bad_ids: bool,
    ignore: bool,
    n: usize,
    history: usize,
    poisoned: bool,
    seed: u64,
}

struct Data<T> {
    user: Vec<T>,
    gates: Vec<T>,
    items: Vec<T>,
    bias: Vec<f32>,
    excluded: Vec<u32>,
    targets: Vec<u32>,
    dscores: Vec<f32>,
    dloss: Vec<f32>,
    offsets: Vec<u32>,
    history: Vec<u32>,
}

/// Runs `op` on the case's operands on `device`.
fn with_inputs<T: FloatElement>(
    case: Case,
    device: &Device,
    data: &Data<T>,
    op: impl FnOnce(&Scoring<'_, T>) -> Outcome,
) -> Outcome {
    let Case {
        batch,
        heads,
        width,
        items,
        ..
    } = case;
    let user = t(data.user.clone(), &[batch, heads, width], device)?;
    let gates = t(data.gates.clone(), &[batch, heads], device)?;
    let table_shape = if case.shared {
        vec![items, width]
    } else {
        vec![heads, items, width]
    };
    let table = t(data.items.clone(), &table_shape, device)?;
    let bias = t(data.bias.clone(), &[items], device)?;
    let excluded = t(data.excluded.clone(), &[data.excluded.len()], device)?;
    let mut inputs = Scoring::new(&user, &gates, &table)
        .with_scale(case.scale)
        .with_mixing(if case.probabilities {
            Mixing::Probabilities
        } else {
            Mixing::Logits
        })
        .with_excluded(&excluded);
    if case.bias {
        inputs = inputs.with_item_bias(&bias);
    }
    op(&inputs)
}

fn gradients(grads: &scoring::Gradients, rtol: f64) -> Result<Vec<Out>, Error> {
    Ok(vec![
        f("d user", &grads.user, rtol)?,
        f("d gate_logits", &grads.gate_logits, rtol)?,
        f("d items", &grads.items, rtol)?,
        f("d item_bias", &grads.item_bias, rtol)?,
    ])
}

fn cross_entropy<T: FloatElement>(case: Case, device: &Device, data: &Data<T>) -> Outcome {
    let rtol = reduction_rtol::<T>();
    with_inputs(case, device, data, |inputs| {
        let targets = t(data.targets.clone(), &[case.batch], device)?;
        let ignore = case.ignore.then_some(u32::MAX);
        let (loss, saved) = scoring::cross_entropy(inputs, &targets, ignore)?;
        let grads = scoring::cross_entropy_backward(inputs, &t(data.dloss.clone(), &[case.batch], device)?, &saved)?;
        let mut outputs = vec![f("loss", &loss, rtol)?];
        outputs.extend(gradients(&grads, rtol)?);
        Ok(outputs)
    })
}

fn run<T: FloatElement>(case: Case) {
    let Case {
        batch,
        heads,
        width,
        items,
        ..
    } = case;
    let mut rng = Rng::new(case.seed);
    let table_heads = if case.shared { 1 } else { heads };
    let bad = if case.bad_ids { 0.2 } else { 0.0 };
    let mut data = Data {
        user: floats(&mut rng, batch * heads * width, 1.0),
        gates: floats(&mut rng, batch * heads, 2.0),
        items: floats(&mut rng, table_heads * items * width, 1.0),
        bias: floats(&mut rng, items, 1.0),
        excluded: ids(&mut rng, case.excluded, items, bad),
        targets: ids(&mut rng, batch, items, bad),
        dscores: floats(&mut rng, batch * items, 1.0),
        dloss: floats(&mut rng, batch, 1.0),
        offsets: Vec::new(),
        history: Vec::new(),
    };
    if case.ignore {
        data.targets
            .iter_mut()
            .filter(|_| unit(&mut rng) < 0.3)
            .for_each(|t| *t = u32::MAX);
    }
    if case.history > 0 {
        let mut offsets = vec![0u32];
        for _ in 0..batch {
            offsets.push(offsets.last().unwrap() + pick(&mut rng, 3) as u32);
        }
        if case.history == 2 && batch > 0 {
            offsets[batch] += 1; // does not end at the number of ids
        }
        data.history = ids(&mut rng, *offsets.last().unwrap() as usize, items, bad);
        if case.history == 2 && batch > 0 {
            data.history.pop();
        }
        data.offsets = offsets;
    }
    let poisoned = case.poisoned && {
        let a = poison(&mut rng, &mut data.user, 0.1);
        let b = poison(&mut rng, &mut data.items, 0.1);
        a || b
    };
    let finite = !poisoned;
    let rtol = reduction_rtol::<T>();

    let scores = check_everywhere("scores", finite, |device| {
        with_inputs(case, device, &data, |inputs| {
            let scores = scoring::scores(inputs)?;
            let grads = scoring::scores_backward(inputs, &t(data.dscores.clone(), &[batch, items], device)?)?;
            let mut outputs = vec![f("scores", &scores, rtol)?];
            outputs.extend(gradients(&grads, rtol)?);
            Ok(outputs)
        })
    });
    let ce = check_everywhere("cross_entropy", finite, |device| cross_entropy(case, device, &data));
    let n = [0usize, 1, 2, items, items + 1, 1 << 40][case.n];
    let top = check_everywhere("topk", finite, |device| {
        with_inputs(case, device, &data, |inputs| {
            let offsets = t(data.offsets.clone(), &[data.offsets.len()], device)?;
            let history_ids = t(data.history.clone(), &[data.history.len()], device)?;
            let history = (case.history > 0).then_some(History::new(&offsets, &history_ids));
            let best = scoring::topk(inputs, n, history)?;
            let (ids, values) = (best.ids.to_vec()?, best.values.to_vec()?);
            Ok(vec![Out::Ranked("topk", ids, values, n.max(1), rtol)])
        })
    });

    // The documented errors: the lowest excluded id >= V first, then the
    // lowest active target >= V or excluded.
    let excluded_error = data
        .excluded
        .iter()
        .position(|&id| id as usize >= items)
        .map(|position| Error::IndexOutOfRange {
            argument: "excluded",
            position: position as u64,
            index: u64::from(data.excluded[position]),
            bound: items as u64,
        });
    if let Some(error) = &excluded_error {
        assert_eq!(scores.as_ref().unwrap_err(), error);
        assert_eq!(ce.as_ref().unwrap_err(), error);
        assert_eq!(top.as_ref().unwrap_err(), error);
        return;
    }
    let eligible = |v: u32| (v as usize) < items && !data.excluded.contains(&v);
    let target_error = data.targets.iter().enumerate().find_map(|(row, &target)| {
        if case.ignore && target == u32::MAX {
            None
        } else if target as usize >= items {
            Some(("IndexOutOfRange", row))
        } else if !eligible(target) {
            Some(("InvalidArgument", row))
        } else {
            None
        }
    });
    match (target_error, &ce) {
        (None, Ok(_)) => {}
        (
            Some(("IndexOutOfRange", row)),
            Err(Error::IndexOutOfRange {
                argument: "targets",
                position,
                ..
            }),
        ) => {
            assert_eq!(*position, row as u64)
        }
        (
            Some(("InvalidArgument", _)),
            Err(Error::InvalidArgument {
                argument: "targets", ..
            }),
        ) => {}
        (expected, outcome) => panic!("{case:?}: expected {expected:?}, got {outcome:?}"),
    }
    assert!(scores.is_ok(), "{case:?}: {scores:?}");
    if n == 0 || (n > items && batch > 0) {
        // The history is checked first; without one the error is n's.
        let refused = match &top {
            Err(Error::InvalidArgument { argument: "n", .. }) => true,
            Err(_) => case.history > 0,
            Ok(_) => false,
        };
        assert!(refused, "{case:?} n = {n}: {top:?}");
    }
    if poisoned {
        return;
    }
    for outcome in [&scores, &ce, &top] {
        assert_no_nan("scoring", outcome);
    }
    // Cross-entropy gradients against central differences (f32).
    if T::DTYPE != moerec::DType::F32 || target_error.is_some() {
        return;
    }
    let Ok(outputs) = &ce else { return };
    let loss_at = |data: &Data<T>| -> Option<f64> {
        let outputs = cross_entropy(case, &Device::cpu(), data).ok()?;
        let Out::F(_, loss, _) = &outputs[0] else {
            unreachable!()
        };
        Some(
            loss.iter()
                .zip(&data.dloss)
                .map(|(l, d)| f64::from(*l) * f64::from(*d))
                .sum(),
        )
    };
    let widen = |values: &[T]| values.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    let narrow = |values: &[f32]| values.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
    let grad = |i: usize| match &outputs[i] {
        Out::F(_, g, _) => g.clone(),
        _ => unreachable!(),
    };
    let user0 = widen(&data.user);
    assert_central_differences("scoring d user", &user0, &grad(1), |p| {
        loss_at(&Data {
            user: narrow(p),
            ..data.clone_with()
        })
    });
    let gates0 = widen(&data.gates);
    assert_central_differences("scoring d gate_logits", &gates0, &grad(2), |p| {
        loss_at(&Data {
            gates: narrow(p),
            ..data.clone_with()
        })
    });
    let items0 = widen(&data.items);
    assert_central_differences("scoring d items", &items0, &grad(3), |p| {
        loss_at(&Data {
            items: narrow(p),
            ..data.clone_with()
        })
    });
}

impl<T: Clone> Data<T> {
    fn clone_with(&self) -> Data<T> {
        Data {
            user: self.user.clone(),
            gates: self.gates.clone(),
            items: self.items.clone(),
            bias: self.bias.clone(),
            excluded: self.excluded.clone(),
            targets: self.targets.clone(),
            dscores: self.dscores.clone(),
            dloss: self.dloss.clone(),
            offsets: self.offsets.clone(),
            history: self.history.clone(),
        }
    }
}

proptest! {
    #![proptest_config(config())]
    #[test]
    fn scoring_properties(
        batch in 0usize..4, heads in 1usize..4, width in prop::sample::select(vec![1usize, 2, 3, 5]),
        items in 1usize..10, shared in any::<bool>(), probabilities in any::<bool>(),
        scale in prop::sample::select(vec![1.0f32, 0.5, 3.0]), bias in any::<bool>(),
        excluded in 0usize..4, bad_ids in prop::bool::weighted(0.2), ignore in any::<bool>(),
        n in 0usize..6, history in 0usize..3, poisoned in prop::bool::weighted(0.15),
        dtype in 0usize..3, seed in any::<u64>(),
    ) {
        let case = Case {
            batch, heads, width, items, shared, probabilities, scale, bias, excluded, bad_ids, ignore, n,
            history, poisoned, seed,
        };
        match dtype {
            0 => run::<f32>(case),
            1 => run::<bf16>(case),
            _ => run::<f16>(case),
        }
    }
}

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
    /// An operand of the wrong shape (index into [`WRONG_SHAPE`]; 0: none).
    wrong_shape: usize,
    seed: u64,
}

/// The operands a case may give the wrong shape (one element too many along
/// one axis, or a second axis for `excluded`), as the errors name them.
const WRONG_SHAPE: [&str; 9] = [
    "",
    "gate_logits",
    "items",
    "item_bias",
    "excluded",
    "targets",
    "dscores",
    "dloss",
    "history.offsets",
];

impl Case {
    /// 1 if `argument` is the operand this case gives the wrong shape.
    fn extra(&self, argument: &str) -> usize {
        usize::from(self.wrong_shape != 0 && WRONG_SHAPE[self.wrong_shape] == argument)
    }
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
    let gates = t(data.gates.clone(), &[batch, heads + case.extra("gate_logits")], device)?;
    let item_width = width + case.extra("items");
    let table_shape = if case.shared {
        vec![items, item_width]
    } else {
        vec![heads, items, item_width]
    };
    let table = t(data.items.clone(), &table_shape, device)?;
    let bias = t(data.bias.clone(), &[items + case.extra("item_bias")], device)?;
    let excluded_shape = match case.extra("excluded") {
        0 => vec![data.excluded.len()],
        _ => vec![1, data.excluded.len()],
    };
    let excluded = t(data.excluded.clone(), &excluded_shape, device)?;
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
        let targets = t(data.targets.clone(), &[data.targets.len()], device)?;
        let ignore = case.ignore.then_some(u32::MAX);
        let (loss, saved) = scoring::cross_entropy(inputs, &targets, ignore)?;
        let dloss = t(data.dloss.clone(), &[data.dloss.len()], device)?;
        let grads = scoring::cross_entropy_backward(inputs, &dloss, &saved)?;
        let mut outputs = vec![f("loss", &loss, rtol)?];
        outputs.extend(gradients(&grads, rtol)?);
        Ok(outputs)
    })
}

/// A documented error: its kind, argument, and position (an index into the
/// argument) or a fragment its message must hold (an empty one: any).
#[derive(Clone, Debug)]
enum Expect {
    Shape(&'static str),
    Index(&'static str, usize),
    Invalid(&'static str, String),
}

/// Whether `outcome` is Ok when nothing is expected, else the expected error.
fn matches_expectation(expected: &Option<Expect>, outcome: &Outcome) -> bool {
    match (expected, outcome) {
        (None, Ok(_)) => true,
        (Some(Expect::Shape(argument)), Err(Error::ShapeMismatch { argument: a, .. })) => a == argument,
        (
            Some(Expect::Index(argument, at)),
            Err(Error::IndexOutOfRange {
                argument: a, position, ..
            }),
        ) => a == argument && *position == *at as u64,
        (Some(Expect::Invalid(argument, fragment)), Err(Error::InvalidArgument { argument: a, message })) => {
            a == argument && message.contains(fragment.as_str())
        }
        _ => false,
    }
}

fn run<T: FloatElement>(case: Case, trial: &Device) {
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
        gates: floats(&mut rng, batch * (heads + case.extra("gate_logits")), 2.0),
        items: floats(&mut rng, table_heads * items * (width + case.extra("items")), 1.0),
        bias: floats(&mut rng, items + case.extra("item_bias"), 1.0),
        excluded: ids(&mut rng, case.excluded, items, bad),
        targets: ids(&mut rng, batch + case.extra("targets"), items, bad),
        dscores: floats(&mut rng, batch * (items + case.extra("dscores")), 1.0),
        dloss: floats(&mut rng, batch + case.extra("dloss"), 1.0),
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
        if case.extra("history.offsets") == 1 {
            offsets.push(*offsets.last().unwrap());
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

    let scores = check_everywhere(trial, "scores", finite, |device| {
        with_inputs(case, device, &data, |inputs| {
            let scores = scoring::scores(inputs)?;
            let dscores = t(data.dscores.clone(), &[batch, items + case.extra("dscores")], device)?;
            let grads = scoring::scores_backward(inputs, &dscores)?;
            let mut outputs = vec![f("scores", &scores, rtol)?];
            outputs.extend(gradients(&grads, rtol)?);
            Ok(outputs)
        })
    });
    let ce = check_everywhere(trial, "cross_entropy", finite, |device| {
        cross_entropy(case, device, &data)
    });
    let n = [0usize, 1, 2, items, items + 1, 1 << 40][case.n];
    let top = check_everywhere(trial, "topk", finite, |device| {
        with_inputs(case, device, &data, |inputs| {
            let offsets = t(data.offsets.clone(), &[data.offsets.len()], device)?;
            let history_ids = t(data.history.clone(), &[data.history.len()], device)?;
            let history = (case.history > 0).then_some(History::new(&offsets, &history_ids));
            let best = scoring::topk(inputs, n, history)?;
            let (ids, values) = (best.ids.to_vec()?, best.values.to_vec()?);
            Ok(vec![Out::Ranked("topk", ids, values, n.max(1), rtol)])
        })
    });

    // The documented errors, in the order each op checks: operand shapes,
    // then its own arguments' shapes, excluded ids >= V, and its data.
    let operand_shape = ["gate_logits", "items", "item_bias", "excluded"]
        .into_iter()
        .find(|&a| case.extra(a) == 1 && (a != "item_bias" || case.bias))
        .map(Expect::Shape);
    let excluded_error = data
        .excluded
        .iter()
        .position(|&id| id as usize >= items)
        .map(|position| Expect::Index("excluded", position));
    let eligible = |v: u32| (v as usize) < items && !data.excluded.contains(&v);
    let target_error = data.targets.iter().enumerate().find_map(|(row, &target)| {
        if case.ignore && target == u32::MAX {
            None
        } else if target as usize >= items {
            Some(Expect::Index("targets", row))
        } else if !eligible(target) {
            Some(Expect::Invalid("targets", format!("targets[{row}]")))
        } else {
            None
        }
    });
    let shape_of = |argument: &'static str| (case.extra(argument) == 1).then_some(Expect::Shape(argument));
    let expected_scores = operand_shape.clone().or(excluded_error.clone()).or(shape_of("dscores"));
    let expected_ce = operand_shape
        .clone()
        .or(shape_of("targets"))
        .or(excluded_error.clone())
        .or(target_error.clone())
        .or(shape_of("dloss"));
    let history_error = || -> Option<Expect> {
        if case.history == 0 {
            return None;
        }
        let offsets = &data.offsets;
        let well_formed = offsets[0] == 0
            && offsets.windows(2).all(|w| w[0] <= w[1])
            && offsets[batch] as usize == data.history.len();
        if !well_formed {
            return Some(Expect::Invalid("history.offsets", String::new()));
        }
        data.history
            .iter()
            .position(|&id| id as usize >= items)
            .map(|position| Expect::Index("history.ids", position))
    };
    let too_few = || -> Option<Expect> {
        let eligible_count = (0..items as u32).filter(|&v| eligible(v)).count();
        (0..batch).find_map(|row| {
            let seen: std::collections::BTreeSet<u32> = match case.history {
                0 => Default::default(),
                _ => data.history[data.offsets[row] as usize..data.offsets[row + 1] as usize]
                    .iter()
                    .copied()
                    .filter(|&v| eligible(v))
                    .collect(),
            };
            (eligible_count - seen.len() < n).then(|| Expect::Invalid("n", format!("row {row} has")))
        })
    };
    let history_shape = shape_of("history.offsets").filter(|_| case.history > 0);
    let expected_top = operand_shape.clone().or(history_shape).or_else(|| {
        if n > items {
            excluded_error.clone().or_else(history_error).or_else(too_few)
        } else if n == 0 {
            excluded_error.clone().or(Some(Expect::Invalid("n", String::new())))
        } else {
            excluded_error.clone().or_else(history_error).or_else(too_few)
        }
    });
    for (what, expected, outcome) in [
        ("scores", &expected_scores, &scores),
        ("cross_entropy", &expected_ce, &ce),
        ("topk", &expected_top, &top),
    ] {
        assert!(
            matches_expectation(expected, outcome),
            "{case:?} n = {n}, {what}: expected {expected:?}, got {outcome:?}"
        );
    }
    let target_error = target_error
        .or(operand_shape)
        .or(shape_of("targets"))
        .or(shape_of("dloss"));
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

/// The scoring properties on `trial` (module docs of tests/properties.rs).
pub(super) fn scoring_properties(trial: &Device) {
    for_each_seed(|config| {
        proptest!(config, |(
            batch in 0usize..4, heads in 1usize..4, width in prop::sample::select(vec![1usize, 2, 3, 5]),
            items in 1usize..10, shared in any::<bool>(), probabilities in any::<bool>(),
            scale in prop::sample::select(vec![1.0f32, 0.5, 3.0]), bias in any::<bool>(),
            excluded in 0usize..4, bad_ids in prop::bool::weighted(0.2), ignore in any::<bool>(),
            n in 0usize..6, history in 0usize..3, poisoned in prop::bool::weighted(0.15),
            dtype in 0usize..3, seed in any::<u64>(),
            wrong_shape in prop::sample::select(vec![0usize, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
        )| {
            let case = Case {
                batch, heads, width, items, shared, probabilities, scale, bias, excluded, bad_ids, ignore, n,
                history, poisoned, wrong_shape, seed,
            };
            match dtype {
                0 => run::<f32>(case, trial),
                1 => run::<bf16>(case, trial),
                _ => run::<f16>(case, trial),
            }
        });
    });
}

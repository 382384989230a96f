//! embedding: forward, sparse backward, densify, SGD, row-wise Adagrad.

use super::*;

struct Case {
    heads: usize,
    rows: usize,
    width: usize,
    tokens: usize,
    padding: usize,
    bad_ids: bool,
    poisoned: bool,
    rates: usize,
    wrong_dy: bool,
    seed: u64,
}

fn run<T: FloatElement>(case: Case, trial: &Device) {
    let Case {
        heads,
        rows,
        width,
        tokens,
        ..
    } = case;
    let mut rng = Rng::new(case.seed);
    let mut table = floats::<T>(&mut rng, heads * rows * width, 1.0);
    let poisoned = case.poisoned && poison(&mut rng, &mut table, 0.2);
    let padding = match case.padding {
        0 => None,
        1 => Some(pick(&mut rng, rows) as u32),
        _ => Some(rows as u32 + 3),
    };
    let mut id_list = ids(&mut rng, tokens, rows, if case.bad_ids { 0.3 } else { 0.0 });
    if let Some(p) = padding {
        id_list
            .iter_mut()
            .filter(|_| unit(&mut rng) < 0.3)
            .for_each(|id| *id = p);
    }
    let dy_width = if case.wrong_dy { width + 1 } else { width };
    let dy = floats::<f32>(&mut rng, tokens * heads * dy_width, 1.0);
    let (lr, eps) = [
        (0.1f32, 1e-8f32),
        (-0.5, 1.0),
        (f32::NAN, 1e-8),
        (0.1, 0.0),
        (0.1, f32::INFINITY),
    ][case.rates];

    let expected = match id_list
        .iter()
        .position(|&id| id as usize >= rows && Some(id) != padding)
    {
        Some(position) => Some(("ids", Some(position as u64))),
        None if case.wrong_dy => Some(("dy", None)),
        None if !lr.is_finite() => Some(("lr", None)),
        None if !(eps.is_finite() && eps > 0.0) => Some(("eps", None)),
        None => None,
    };
    let outcome = check_everywhere(trial, "embedding", !poisoned, |device| {
        let table = t(table.clone(), &[heads, rows, width], device)?;
        let ids_t = t(id_list.clone(), &[tokens], device)?;
        let (looked_up, saved) = embedding::forward(&table, &ids_t, padding)?;
        let grad = embedding::backward(&t(dy.clone(), &[tokens, heads, dy_width], device)?, &saved)?;
        let dense = grad.densify()?;
        let mut sgd_table = table.try_clone()?;
        embedding::sgd(&mut sgd_table, &grad, lr)?;
        let mut adagrad_table = table.try_clone()?;
        let mut state = Tensor::zeros(&[heads, rows], device)?;
        embedding::adagrad(&mut adagrad_table, &mut state, &grad, lr, eps)?;
        Ok(vec![
            f("rows", &looked_up, 1e-5)?,
            u("grad.rows", grad.rows())?,
            f("grad.values", grad.values(), 1e-4)?,
            f("dense", &dense, 1e-4)?,
            f("sgd", &sgd_table, reduction_rtol::<T>())?,
            f("adagrad", &adagrad_table, reduction_rtol::<T>())?,
            f("state", &state, 1e-4)?,
        ])
    });
    match (expected, &outcome) {
        (None, Ok(_)) => {}
        (Some((argument, position)), Err(error)) => match error {
            Error::IndexOutOfRange {
                argument: a,
                position: p,
                ..
            } => assert_eq!((*a, Some(*p)), (argument, position), "{error}"),
            Error::InvalidArgument { argument: a, .. } | Error::ShapeMismatch { argument: a, .. } => {
                assert_eq!((*a, None), (argument, position), "{error}")
            }
            other => panic!("unexpected error {other}"),
        },
        (expected, outcome) => panic!("expected {expected:?}, got {outcome:?}"),
    }
    if !poisoned {
        assert_no_nan("embedding", &outcome);
    }
}

/// The embedding properties on `trial` (module docs of tests/properties.rs).
pub(super) fn embedding_properties(trial: &Device) {
    for_each_seed(|config| {
        proptest!(config, |(
            heads in 1usize..4, rows in 1usize..7, width in prop::sample::select(vec![1usize, 2, 3, 5, 8]),
            tokens in 0usize..9, padding in 0usize..3, bad_ids in prop::bool::weighted(0.3),
            poisoned in prop::bool::weighted(0.2), rates in prop::sample::select(vec![0usize, 0, 0, 1, 2, 3, 4]),
            wrong_dy in prop::bool::weighted(0.1), dtype in 0usize..3, seed in any::<u64>(),
        )| {
            let case = Case { heads, rows, width, tokens, padding, bad_ids, poisoned, rates, wrong_dy, seed };
            match dtype {
                0 => run::<f32>(case, trial),
                1 => run::<bf16>(case, trial),
                _ => run::<f16>(case, trial),
            }
        });
    });
}

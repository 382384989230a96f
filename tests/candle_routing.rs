//! `moerec::candle::route` against the same function in plain candle ops
//! (float64, candle's own backward): weights, load-balance loss and z-loss
//! forward, and the logits' gradient through all three.

mod candle_common;

use candle_common::{assert_close, assert_grads, candle_main, f64_var, values, var, TestResult};
use candle_core::{DType, Device, Tensor, D};
use moerec::candle::{route, RoutingOptions};
use moerec::routing::{Score, TopK};

const TOKENS: usize = 6;

/// The router in plain candle ops, given the op's selection (not
/// differentiable): `(weights [T*G, k], lb_loss, z_loss)`.
fn reference(
    z: &Tensor,
    options: &RoutingOptions,
    experts: usize,
    indices: &[u32],
    counts: &[u32],
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let groups = options.groups;
    let n = experts / groups;
    let rows = TOKENS * groups;
    let grouped = z.reshape((rows, n))?;
    let p = match options.score {
        Score::Softmax => {
            let max = grouped.max_keepdim(D::Minus1)?.detach();
            let e = grouped.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        }
        Score::Sigmoid => (grouped.neg()?.exp()? + 1.0)?.recip()?,
    };
    let k = indices.len() / rows;
    let local: Vec<u32> = indices.iter().map(|&e| e % n as u32).collect();
    let local = Tensor::from_vec(local, (rows, k), &Device::Cpu)?;
    let mut weights = p.gather(&local, 1)?;
    if options.renormalize {
        weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
    }
    // P_e = mean over tokens of p / sum of the group's p; f_e = counts / (T k).
    let share = p
        .broadcast_div(&p.sum_keepdim(D::Minus1)?)?
        .reshape((TOKENS, groups, n))?
        .mean(0)?;
    let f: Vec<f64> = counts.iter().map(|&c| f64::from(c) / (TOKENS * k) as f64).collect();
    let f = Tensor::from_vec(f, (groups, n), &Device::Cpu)?;
    let lb = ((share * f)?.sum_all()? * (n as f64 / groups as f64))?;
    let max = grouped.max_keepdim(D::Minus1)?.detach();
    let lse = grouped
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)?;
    let z_loss = lse.sqr()?.mean_all()?;
    Ok((weights, lb, z_loss))
}

fn check(device: &Device, options: RoutingOptions, experts: usize, seed: u64) -> TestResult {
    let logits = var(seed, &[TOKENS, experts], DType::F32, device)?;
    let theirs = f64_var(&logits)?;
    let routed = route(&logits, &options)?;
    let indices = routed.indices.flatten_all()?.to_vec1::<u32>()?;
    let counts = routed.plan.counts.to_vec()?;
    let (weights, lb, z_loss) = reference(&theirs, &options, experts, &indices, &counts)?;
    assert_close("weights", &routed.weights, &weights, 1e-5)?;
    assert_close("lb_loss", &routed.lb_loss, &lb, 1e-4)?;
    assert_close("z_loss", &routed.z_loss, &z_loss, 1e-4)?;
    let w = Tensor::from_vec(
        values(seed + 1, routed.weights.elem_count()),
        routed.weights.dims(),
        &Device::Cpu,
    )?;
    let (a, b) = (0.3, 0.05);
    let ours = ((routed.weights * w.to_device(device)?)?.sum_all()? + (routed.lb_loss * a)? + (routed.z_loss * b)?)?;
    let expected = ((weights * w.to_dtype(DType::F64)?)?.sum_all()? + (lb * a)? + (z_loss * b)?)?;
    assert_grads(
        &ours.backward()?,
        &expected.backward()?,
        &[("logits", &logits, &theirs)],
        1e-4,
    )
}

fn grouped_dense_router_of_fame(device: &Device) -> TestResult {
    check(
        device,
        RoutingOptions {
            groups: 3,
            ..RoutingOptions::new(TopK::All)
        },
        12,
        1,
    )
}

fn top_k_softmax_renormalised(device: &Device) -> TestResult {
    check(
        device,
        RoutingOptions {
            renormalize: true,
            ..RoutingOptions::new(TopK::K(2))
        },
        5,
        2,
    )
}

fn top_k_sigmoid_grouped(device: &Device) -> TestResult {
    check(
        device,
        RoutingOptions {
            score: Score::Sigmoid,
            groups: 2,
            ..RoutingOptions::new(TopK::K(2))
        },
        8,
        3,
    )
}

fn errors_name_the_argument(device: &Device) -> TestResult {
    let logits = var(4, &[TOKENS, 4], DType::F32, device)?;
    let error = route(&logits, &RoutingOptions::new(TopK::K(5)))
        .expect_err("k = 5 of 4")
        .to_string();
    assert!(error.contains('k'), "{error}");
    let mask = Tensor::new(&[1u32, 1], device)?;
    let options = RoutingOptions {
        expert_mask: Some(mask),
        ..RoutingOptions::new(TopK::K(1))
    };
    let error = route(&logits, &options)
        .expect_err("a mask of 2 for 4 experts")
        .to_string();
    assert!(error.contains("expert_mask"), "{error}");
    Ok(())
}

candle_main!(
    grouped_dense_router_of_fame,
    top_k_softmax_renormalised,
    top_k_sigmoid_grouped,
    errors_name_the_argument,
);

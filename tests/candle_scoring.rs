//! `moerec::candle` scoring ops against the same functions written in plain
//! candle ops (float64, with candle's own backward): forward within DESIGN's
//! tolerance, every gradient through `backward()` within tolerance.

mod candle_common;

use candle_common::{assert_close, assert_grads, candle_main, f64_var, values, var, TestResult};
use candle_core::{DType, Device, Tensor, Var, D};
use moerec::candle::{cross_entropy, scores, topk, ScoringOptions};
use moerec::scoring::Mixing;

/// A scoring problem: sizes and options.
#[derive(Clone, Copy)]
struct Case {
    batch: usize,
    heads: usize,
    width: usize,
    items: usize,
    shared: bool,
    mixing: Mixing,
    scale: f32,
    bias: bool,
    excluded: &'static [u32],
    dtype: DType,
}

const BASE: Case = Case {
    batch: 5,
    heads: 3,
    width: 7,
    items: 11,
    shared: false,
    mixing: Mixing::Logits,
    scale: 1.0,
    bias: false,
    excluded: &[],
    dtype: DType::F32,
};

struct Operands {
    user: Var,
    gates: Var,
    items: Var,
    bias: Option<Var>,
}

impl Case {
    fn operands(&self, seed: u64, device: &Device) -> candle_core::Result<Operands> {
        let items_shape = if self.shared {
            vec![self.items, self.width]
        } else {
            vec![self.heads, self.items, self.width]
        };
        Ok(Operands {
            user: var(seed, &[self.batch, self.heads, self.width], self.dtype, device)?,
            gates: var(seed + 1, &[self.batch, self.heads], self.dtype, device)?,
            items: var(seed + 2, &items_shape, self.dtype, device)?,
            bias: self
                .bias
                .then(|| var(seed + 3, &[self.items], DType::F32, device))
                .transpose()?,
        })
    }

    fn options(&self, operands: &Operands, device: &Device) -> candle_core::Result<ScoringOptions> {
        Ok(ScoringOptions {
            scale: self.scale,
            mixing: self.mixing,
            item_bias: operands.bias.as_ref().map(|b| b.as_tensor().clone()),
            excluded: if self.excluded.is_empty() {
                None
            } else {
                Some(Tensor::new(self.excluded, device)?)
            },
        })
    }

    fn rtol(&self) -> f64 {
        if self.dtype == DType::F32 {
            1e-4
        } else {
            1e-2
        }
    }

    /// `[V]` f64: 0, or a large negative number at excluded items (its
    /// exponential is exactly 0, like the op's exclusion).
    fn exclusion(&self) -> candle_core::Result<Tensor> {
        let mut mask = vec![0f64; self.items];
        for &id in self.excluded {
            mask[id as usize] = -1e30;
        }
        Tensor::from_vec(mask, self.items, &Device::Cpu)
    }

    /// The per-head logits `s [B, H, V]` in plain candle ops.
    fn head_logits(&self, r: &Operands) -> candle_core::Result<Tensor> {
        let (b, h, d, v) = (self.batch, self.heads, self.width, self.items);
        let s = if self.shared {
            r.user.reshape((b * h, d))?.matmul(&r.items.t()?)?.reshape((b, h, v))?
        } else {
            // [H, B, D] x [H, D, V] -> [H, B, V]
            let u = r.user.transpose(0, 1)?.contiguous()?;
            u.matmul(&r.items.transpose(1, 2)?.contiguous()?)?
                .transpose(0, 1)?
                .contiguous()?
        };
        let mut s = (s * self.scale as f64)?;
        if let Some(bias) = &r.bias {
            s = s.broadcast_add(&bias.reshape((1, 1, v))?)?;
        }
        s.broadcast_add(&self.exclusion()?.reshape((1, 1, v))?)
    }

    /// log-softmax over the last dimension, stable, in plain candle ops.
    fn log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let shifted = x.broadcast_sub(&max)?;
        shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
    }

    /// `log P[b, picked[b]]` `[B]` in plain candle ops (`picked: [B, 1]`);
    /// the logarithm is taken after the pick, so P = 0 at excluded items
    /// does not reach it.
    fn log_probability(&self, r: &Operands, picked: &Tensor) -> candle_core::Result<Tensor> {
        let s = self.head_logits(r)?;
        let log_g = Self::log_softmax(&r.gates)?; // [B, H]
        match self.mixing {
            Mixing::Logits => {
                let mixed = s.broadcast_mul(&log_g.exp()?.unsqueeze(2)?)?.sum(1)?;
                Self::log_softmax(&mixed)?.gather(picked, 1)?.squeeze(1)
            }
            Mixing::Probabilities => {
                let p = Self::log_softmax(&s)?.exp()?; // [B, H, V]
                let mixed = p.broadcast_mul(&log_g.exp()?.unsqueeze(2)?)?.sum(1)?;
                mixed.gather(picked, 1)?.squeeze(1)?.log()
            }
        }
    }

    /// The scores the op materialises: S (Logits) or P (Probabilities).
    fn scores(&self, r: &Operands) -> candle_core::Result<Tensor> {
        let s = self.head_logits(r)?;
        let g = Self::log_softmax(&r.gates)?.exp()?.unsqueeze(2)?;
        match self.mixing {
            Mixing::Logits => s.broadcast_mul(&g)?.sum(1),
            Mixing::Probabilities => Self::log_softmax(&s)?.exp()?.broadcast_mul(&g)?.sum(1),
        }
    }

    fn reference(&self, ours: &Operands) -> candle_core::Result<Operands> {
        Ok(Operands {
            user: f64_var(&ours.user)?,
            gates: f64_var(&ours.gates)?,
            items: f64_var(&ours.items)?,
            bias: ours.bias.as_ref().map(f64_var).transpose()?,
        })
    }
}

fn pairs<'a>(ours: &'a Operands, theirs: &'a Operands) -> Vec<(&'static str, &'a Var, &'a Var)> {
    let mut pairs = vec![
        ("user", &ours.user, &theirs.user),
        ("gate_logits", &ours.gates, &theirs.gates),
        ("items", &ours.items, &theirs.items),
    ];
    if let (Some(a), Some(b)) = (&ours.bias, &theirs.bias) {
        pairs.push(("item_bias", a, b));
    }
    pairs
}

fn check_cross_entropy(device: &Device, case: Case, seed: u64) -> TestResult {
    let ours = case.operands(seed, device)?;
    let theirs = case.reference(&ours)?;
    let options = case.options(&ours, device)?;
    let ignore = 2u32;
    let targets: Vec<u32> = (0..case.batch as u32)
        .map(|b| {
            let mut t = (b * 7 + 3) % case.items as u32;
            while case.excluded.contains(&t) {
                t = (t + 1) % case.items as u32;
            }
            if b == 1 {
                ignore
            } else {
                t
            }
        })
        .collect();
    let target_tensor = Tensor::new(targets.as_slice(), device)?;
    // Non-uniform row weights, so each row's dloss differs.
    let weights = Tensor::from_vec(values(seed + 9, case.batch), case.batch, &Device::Cpu)?;

    let loss = cross_entropy(
        &ours.user,
        &ours.gates,
        &ours.items,
        &target_tensor,
        Some(ignore),
        &options,
    )?;
    let grads = (&loss * weights.to_device(device)?)?.sum_all()?.backward()?;

    // Ignored rows pick any eligible item, then are masked to 0.
    let picked: Vec<u32> = targets
        .iter()
        .map(|&t| if t == ignore { targets[0] } else { t })
        .collect();
    let picked = Tensor::from_vec(picked, (case.batch, 1), &Device::Cpu)?;
    let keep = Tensor::from_vec(
        targets.iter().map(|&t| u8::from(t != ignore)).collect::<Vec<_>>(),
        case.batch,
        &Device::Cpu,
    )?;
    let nll = case.log_probability(&theirs, &picked)?.neg()?;
    let reference_loss = keep.where_cond(&nll, &nll.zeros_like()?)?;
    let reference_grads = (&reference_loss * weights.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;

    assert_close("loss", &loss, &reference_loss, case.rtol())?;
    assert_grads(&grads, &reference_grads, &pairs(&ours, &theirs), case.rtol())
}

fn cross_entropy_logits_per_head(device: &Device) -> TestResult {
    check_cross_entropy(device, BASE, 1)
}

fn cross_entropy_probabilities_per_head(device: &Device) -> TestResult {
    check_cross_entropy(
        device,
        Case {
            mixing: Mixing::Probabilities,
            ..BASE
        },
        2,
    )
}

fn cross_entropy_every_option_both_mixings_both_layouts(device: &Device) -> TestResult {
    for (i, mixing) in [Mixing::Logits, Mixing::Probabilities].into_iter().enumerate() {
        for shared in [false, true] {
            check_cross_entropy(
                device,
                Case {
                    mixing,
                    shared,
                    scale: 1.7,
                    bias: true,
                    excluded: &[0, 5, 5],
                    ..BASE
                },
                10 + i as u64,
            )?;
        }
    }
    Ok(())
}

fn cross_entropy_bf16_and_f16(device: &Device) -> TestResult {
    for dtype in [DType::BF16, DType::F16] {
        check_cross_entropy(
            device,
            Case {
                dtype,
                bias: true,
                mixing: Mixing::Probabilities,
                ..BASE
            },
            20,
        )?;
    }
    Ok(())
}

fn scores_forward_and_backward(device: &Device) -> TestResult {
    for mixing in [Mixing::Logits, Mixing::Probabilities] {
        for shared in [false, true] {
            let case = Case {
                mixing,
                shared,
                scale: 0.8,
                bias: true,
                excluded: &[3],
                ..BASE
            };
            let ours = case.operands(30, device)?;
            let theirs = case.reference(&ours)?;
            let s_device = scores(&ours.user, &ours.gates, &ours.items, &case.options(&ours, device)?)?;
            let s = s_device.detach();
            let reference = case.scores(&theirs)?;
            // Weights zero at the excluded item, whose score is -inf (Logits)
            // or 0 (Probabilities) and carries no gradient.
            let mut w = values(31, case.batch * case.items);
            for b in 0..case.batch {
                w[b * case.items + 3] = 0.0;
            }
            let w = Tensor::from_vec(w, (case.batch, case.items), &Device::Cpu)?;
            let keep = Tensor::from_vec(
                (0..case.items).map(|v| u8::from(v != 3)).collect::<Vec<_>>(),
                case.items,
                &Device::Cpu,
            )?;
            let keep = keep.broadcast_as((case.batch, case.items))?;
            let zeros = Tensor::zeros((case.batch, case.items), DType::F32, &Device::Cpu)?;
            let (s, keep_ours) = (s.to_device(&Device::Cpu)?, keep.to_device(device)?);
            let finite = keep.where_cond(&s, &zeros)?;
            assert_close(
                "scores",
                &finite,
                &keep.where_cond(&reference.to_dtype(DType::F32)?, &zeros)?,
                1e-4,
            )?;
            if mixing == Mixing::Logits {
                let at_excluded = s.narrow(1, 3, 1)?.flatten_all()?.to_vec1::<f32>()?;
                assert!(at_excluded.iter().all(|x| *x == f32::NEG_INFINITY));
            }
            // The gradient flows through the op's own (device) output.
            let ours_finite = keep_ours.where_cond(&s_device, &zeros.to_device(device)?)?;
            let grads = (ours_finite * w.to_device(device)?)?.sum_all()?.backward()?;
            let reference_grads = (reference * w.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
            assert_grads(&grads, &reference_grads, &pairs(&ours, &theirs), 1e-4)?;
        }
    }
    Ok(())
}

fn topk_matches_the_reference_ranking(device: &Device) -> TestResult {
    for mixing in [Mixing::Logits, Mixing::Probabilities] {
        let case = Case {
            mixing,
            bias: true,
            excluded: &[1],
            ..BASE
        };
        let ours = case.operands(40, device)?;
        let theirs = case.reference(&ours)?;
        // Row 0 has seen items 0 and 4, row 2 item 7.
        let offsets = Tensor::new(&[0u32, 2, 2, 3, 3, 3], device)?;
        let seen_ids = [0u32, 4, 7];
        let seen = Tensor::new(&seen_ids, device)?;
        let n = 4;
        let (ids, best) = topk(
            &ours.user,
            &ours.gates,
            &ours.items,
            n,
            Some((&offsets, &seen)),
            &case.options(&ours, device)?,
        )?;
        let reference = case.scores(&theirs)?.to_vec2::<f64>()?;
        let ids = ids.to_vec2::<u32>()?;
        let best = best.to_vec2::<f32>()?;
        for (b, row) in reference.iter().enumerate() {
            let history: &[u32] = match b {
                0 => &seen_ids[..2],
                2 => &seen_ids[2..],
                _ => &[],
            };
            let mut order: Vec<u32> = (0..case.items as u32)
                .filter(|v| *v != 1 && !history.contains(v))
                .collect();
            order.sort_by(|x, y| row[*y as usize].total_cmp(&row[*x as usize]).then(x.cmp(y)));
            assert_eq!(ids[b], order[..n], "row {b}");
            for (j, &id) in order[..n].iter().enumerate() {
                let r = row[id as usize];
                assert!(
                    (best[b][j] as f64 - r).abs() <= 1e-4 * (r.abs() + 1.0),
                    "row {b} value {j}"
                );
            }
        }
    }
    Ok(())
}

fn errors_name_the_argument(device: &Device) -> TestResult {
    let ours = BASE.operands(50, device)?;
    let options = BASE.options(&ours, device)?;
    let bad_targets = Tensor::new(&[0u32, 1, 2, 3, 99], device)?;
    let error = cross_entropy(&ours.user, &ours.gates, &ours.items, &bad_targets, None, &options)
        .expect_err("target 99 is out of range")
        .to_string();
    assert!(error.contains("targets") && error.contains("99"), "{error}");
    let short = Tensor::new(&[0u32, 1], device)?;
    let error = cross_entropy(&ours.user, &ours.gates, &ours.items, &short, None, &options)
        .expect_err("two targets for five rows")
        .to_string();
    assert!(error.contains("targets"), "{error}");
    let wrong_type = ours.gates.to_dtype(DType::F16)?;
    let error = cross_entropy(&ours.user, &wrong_type, &ours.items, &bad_targets, None, &options)
        .expect_err("mixed element types")
        .to_string();
    assert!(error.contains("gate_logits"), "{error}");
    let error = topk(&ours.user, &ours.gates, &ours.items, 12, None, &options)
        .expect_err("12 of 11 items")
        .to_string();
    assert!(error.contains('n'), "{error}");
    Ok(())
}

fn non_contiguous_operands_keep_their_gradient(device: &Device) -> TestResult {
    let case = BASE;
    let ours = case.operands(60, device)?;
    let theirs = case.reference(&ours)?;
    // The user states as the transpose of a [H, B, D] variable.
    let transposed = Var::from_tensor(&ours.user.transpose(0, 1)?.contiguous()?)?;
    let user = transposed.transpose(0, 1)?;
    let targets = Tensor::new(&[0u32, 1, 2, 3, 4], device)?;
    let loss = cross_entropy(
        &user,
        &ours.gates,
        &ours.items,
        &targets,
        None,
        &case.options(&ours, device)?,
    )?;
    let grads = loss.sum_all()?.backward()?;
    let picked = Tensor::new(&[[0u32], [1], [2], [3], [4]], &Device::Cpu)?;
    let reference = case.log_probability(&theirs, &picked)?.neg()?;
    let reference_grads = reference.sum_all()?.backward()?;
    assert_close("loss", &loss, &reference, 1e-4)?;
    let d_user = candle_common::grad(&grads, &transposed, "user")?.transpose(0, 1)?;
    assert_close(
        "duser",
        &d_user,
        candle_common::grad(&reference_grads, &theirs.user, "user")?,
        1e-4,
    )
}

candle_main!(
    cross_entropy_logits_per_head,
    cross_entropy_probabilities_per_head,
    cross_entropy_every_option_both_mixings_both_layouts,
    cross_entropy_bf16_and_f16,
    scores_forward_and_backward,
    topk_matches_the_reference_ranking,
    errors_name_the_argument,
    non_contiguous_operands_keep_their_gradient,
);

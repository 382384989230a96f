//! `moerec::candle` expert layer and combine against the same functions in
//! plain candle ops (float64, candle's own backward), on a plan from
//! `route`: forward and every gradient through `backward()`.

mod candle_common;

use candle_common::{assert_close, assert_grads, candle_main, f64_var, values, var, TestResult};
use candle_core::{DType, Device, Tensor, Var};
use moerec::candle::{combine, expert_layer, expert_layer_rows, route, Routed, RoutingOptions};
use moerec::experts::Activation;
use moerec::routing::TopK;

const TOKENS: usize = 6;
const EXPERTS: usize = 3;
const K: usize = 2;
const DIN: usize = 5;
const DOUT: usize = 4;

fn routed(device: &Device) -> candle_core::Result<Routed> {
    let logits = Tensor::from_vec(values(1, TOKENS * EXPERTS), (TOKENS, EXPERTS), device)?;
    route(&logits, &RoutingOptions::new(TopK::K(K)))
}

fn u32_tensor(t: &moerec::Tensor<u32>) -> candle_core::Result<Tensor> {
    let data = t.to_vec()?;
    let len = data.len();
    Tensor::from_vec(data, len, &Device::Cpu)
}

fn activate(h: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
    match activation {
        Activation::None => Ok(h.clone()),
        Activation::Relu => h.relu(),
        Activation::Gelu => (h * ((h / std::f64::consts::SQRT_2)?.erf()? + 1.0)?)? * 0.5,
        Activation::Silu => h / (h.neg()?.exp()? + 1.0)?,
        Activation::SwiGlu => {
            let width = h.dim(1)? / 2;
            let gate = h.narrow(1, 0, width)?;
            let silu = (&gate / (gate.neg()?.exp()? + 1.0)?)?;
            silu * h.narrow(1, width, width)?
        }
    }
}

/// `act(x_rows[r] W[e(r)] + b[e(r)])` per expert, in plain candle ops.
fn reference_layer(
    x_rows: &Tensor,
    routed: &Routed,
    w: &Tensor,
    b: &Tensor,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    let offsets = routed.plan.offsets.to_vec()?;
    let mut parts = Vec::new();
    for e in 0..EXPERTS {
        let (start, end) = (offsets[e] as usize, offsets[e + 1] as usize);
        if end > start {
            let rows = x_rows.narrow(0, start, end - start)?;
            parts.push(rows.matmul(&w.get(e)?)?.broadcast_add(&b.get(e)?)?);
        }
    }
    activate(&Tensor::cat(&parts, 0)?, activation)
}

fn layer_every_activation_with_bias(device: &Device) -> TestResult {
    let routed = routed(device)?;
    let token_of_row = u32_tensor(&routed.plan.token_of_row)?;
    for (i, activation) in [
        Activation::None,
        Activation::Relu,
        Activation::Gelu,
        Activation::Silu,
        Activation::SwiGlu,
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 10 * i as u64;
        let width = if activation == Activation::SwiGlu {
            2 * DOUT
        } else {
            DOUT
        };
        let x = var(seed, &[TOKENS, DIN], DType::F32, device)?;
        let w = var(seed + 1, &[EXPERTS, DIN, width], DType::F32, device)?;
        let b = var(seed + 2, &[EXPERTS, width], DType::F32, device)?;
        let (x64, w64, b64) = (f64_var(&x)?, f64_var(&w)?, f64_var(&b)?);
        let y = expert_layer(&x, &routed.plan, &w, Some(&b), activation)?;
        let expected = reference_layer(&x64.index_select(&token_of_row, 0)?, &routed, &w64, &b64, activation)?;
        assert_close("y", &y, &expected, 1e-4)?;
        let dy = Tensor::from_vec(values(seed + 3, y.elem_count()), y.dims(), &Device::Cpu)?;
        let grads = (y * dy.to_device(device)?)?.sum_all()?.backward()?;
        let reference = (expected * dy.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
        let pairs: [(&str, &Var, &Var); 3] = [("x", &x, &x64), ("weights", &w, &w64), ("bias", &b, &b64)];
        assert_grads(&grads, &reference, &pairs, 1e-4)?;
    }
    Ok(())
}

fn rows_variant_and_bf16(device: &Device) -> TestResult {
    let routed = routed(device)?;
    let rows = TOKENS * K;
    for (dtype, rtol) in [(DType::F32, 1e-4), (DType::BF16, 1e-2)] {
        let x = var(40, &[rows, DIN], dtype, device)?;
        let w = var(41, &[EXPERTS, DIN, DOUT], dtype, device)?;
        let b = var(42, &[EXPERTS, DOUT], dtype, device)?;
        let (x64, w64, b64) = (f64_var(&x)?, f64_var(&w)?, f64_var(&b)?);
        let y = expert_layer_rows(&x, &routed.plan, &w, Some(&b), Activation::Relu)?;
        let expected = reference_layer(&x64, &routed, &w64, &b64, Activation::Relu)?;
        assert_close("y", &y, &expected, rtol)?;
        let dy = Tensor::from_vec(values(43, y.elem_count()), y.dims(), &Device::Cpu)?;
        let grads = (y.to_dtype(DType::F32)? * dy.to_device(device)?)?
            .sum_all()?
            .backward()?;
        let reference = (expected * dy.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
        let pairs: [(&str, &Var, &Var); 3] = [("x_rows", &x, &x64), ("weights", &w, &w64), ("bias", &b, &b64)];
        assert_grads(&grads, &reference, &pairs, rtol)?;
    }
    Ok(())
}

fn combine_with_residual_and_rho(device: &Device) -> TestResult {
    let routed = routed(device)?;
    let row_of_slot = u32_tensor(&routed.plan.row_of_slot)?;
    let y = var(50, &[TOKENS * K, DOUT], DType::F32, device)?;
    let weights = Var::from_tensor(&routed.weights.detach())?;
    let res = var(51, &[TOKENS, DOUT], DType::F32, device)?;
    let rho = var(52, &[TOKENS], DType::F32, device)?;
    let (y64, w64, res64, rho64) = (f64_var(&y)?, f64_var(&weights)?, f64_var(&res)?, f64_var(&rho)?);
    let out = combine(&y, &weights, &routed.plan, Some(&res), Some(&rho))?;
    let gathered = y64.index_select(&row_of_slot, 0)?.reshape((TOKENS, K, DOUT))?;
    let mixed = gathered.broadcast_mul(&w64.unsqueeze(2)?)?.sum(1)?;
    let expected = (res64.broadcast_mul(&rho64.unsqueeze(1)?)? + mixed)?;
    assert_close("out", &out, &expected, 1e-4)?;
    let dout = Tensor::from_vec(values(53, out.elem_count()), out.dims(), &Device::Cpu)?;
    let grads = (out * dout.to_device(device)?)?.sum_all()?.backward()?;
    let reference = (expected * dout.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
    let pairs: [(&str, &Var, &Var); 4] = [
        ("y", &y, &y64),
        ("weights", &weights, &w64),
        ("res", &res, &res64),
        ("rho", &rho, &rho64),
    ];
    assert_grads(&grads, &reference, &pairs, 1e-4)
}

fn errors_name_the_argument(device: &Device) -> TestResult {
    let routed = routed(device)?;
    let x = var(60, &[TOKENS + 1, DIN], DType::F32, device)?;
    let w = var(61, &[EXPERTS, DIN, DOUT], DType::F32, device)?;
    let error = expert_layer_rows(&x, &routed.plan, &w, None, Activation::None)
        .expect_err("7 rows for a plan of 12")
        .to_string();
    assert!(error.contains("x_rows"), "{error}");
    let odd = var(62, &[EXPERTS, DIN, 3], DType::F32, device)?;
    let x = var(63, &[TOKENS, DIN], DType::F32, device)?;
    let error = expert_layer(&x, &routed.plan, &odd, None, Activation::SwiGlu)
        .expect_err("SwiGlu needs an even width")
        .to_string();
    assert!(error.contains("weights"), "{error}");
    Ok(())
}

candle_main!(
    layer_every_activation_with_bias,
    rows_variant_and_bf16,
    combine_with_residual_and_rho,
    errors_name_the_argument,
);

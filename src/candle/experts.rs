//! The grouped expert layer and combine (DESIGN 4.3) as candle ops, on the
//! dispatch plan [`super::route`] returns.

use super::autograd::{attach, Backward};
use super::{into_storage, to_candle, with_float, Borrowed, Shared};
use crate::ops::experts::{self, Activation};
use crate::ops::routing::DispatchPlan;
use candle_core::{DType, Tensor};
use std::sync::Arc;

/// An optional operand's storage, read-locked.
fn borrow_optional<'t>(argument: &'static str, tensor: &'t Option<Tensor>) -> Option<Borrowed<'t>> {
    tensor.as_ref().map(|t| Borrowed::new(argument, t))
}

/// The borrowed optional operand as a moerec operand, without a copy.
fn optional<'b, T: Shared>(borrowed: &'b Option<Borrowed<'_>>) -> crate::Result<Option<crate::TensorRef<'b, T>>> {
    borrowed.as_ref().map(Borrowed::get::<T>).transpose()
}

fn layer(
    rows_variant: bool,
    x: &Tensor,
    plan: &Arc<DispatchPlan>,
    weights: &Tensor,
    bias: Option<&Tensor>,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let device = x.device().clone();
    let weights = weights.contiguous()?;
    let bias = bias.map(Tensor::contiguous).transpose()?;
    let mut inputs = vec![x.clone(), weights.clone()];
    inputs.extend(bias.clone());
    with_float!("x", x.dtype(), T => {
        let ((storage, shape), saved) = {
            let (bx, bw, bb) = (Borrowed::new("x", &x), Borrowed::new("weights", &weights), borrow_optional("bias", &bias));
            let forward = if rows_variant { experts::layer_forward_rows } else { experts::layer_forward };
            let (y, saved) = forward(bx.get::<T>()?, plan, bw.get::<T>()?, optional::<T>(&bb)?, activation)?;
            (into_storage(y, &device)?, saved)
        };
        let plan = plan.clone();
        let backward: Backward = Box::new(move |dy| {
            let dy = dy.contiguous()?.to_dtype(DType::F32)?;
            let (bd, bx, bw) = (Borrowed::new("dy", &dy), Borrowed::new("x", &x), Borrowed::new("weights", &weights));
            let grads = experts::layer_backward(bd.get::<f32>()?, bx.get::<T>()?, &plan, bw.get::<T>()?, &saved)?;
            let mut out = vec![Some(to_candle(grads.dx, &device)?), Some(to_candle(grads.dweights, &device)?)];
            out.extend(grads.dbias.map(|d| to_candle(d, &device)).transpose()?.map(Some));
            Ok(out)
        });
        attach("moerec-expert-layer", storage, shape, &inputs.iter().collect::<Vec<_>>(), backward)
    })
}

/// One expert layer over the tokens `x: [T, Din]` (f32, bf16 or f16; with
/// grouped routing `[T * G, Din]`, the per-group inputs): `y: [R, Dout]` in
/// the input type, rows in plan order, `y[r] = act(x[token_of_row[r]] W[e] +
/// b[e])` — see [`crate::experts::layer_forward`]. `weights` is
/// `[E, Din, Dout']` (`Dout' = 2 Dout` for SwiGlu), `bias` `[E, Dout']`.
/// Every operand is borrowed, never copied. On the tape: gradients to `x`,
/// `weights` and `bias`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use moerec::candle::{expert_layer, route, RoutingOptions};
/// use moerec::experts::Activation;
/// use moerec::routing::TopK;
///
/// let device = Device::Cpu;
/// let logits = Tensor::rand(-1f32, 1.0, (5, 3), &device)?;
/// let routed = route(&logits, &RoutingOptions::new(TopK::K(2)))?;
/// let x = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (5, 4), &device)?)?;
/// let w = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (3, 4, 6), &device)?)?;
/// let y = expert_layer(&x, &routed.plan, &w, None, Activation::Gelu)?;
/// assert_eq!(y.dims(), &[10, 6]); // R = T * k rows
/// let grads = y.sum_all()?.backward()?;
/// assert!(grads.get(&x).is_some() && grads.get(&w).is_some());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn expert_layer(
    x: &Tensor,
    plan: &Arc<DispatchPlan>,
    weights: &Tensor,
    bias: Option<&Tensor>,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    layer(false, x, plan, weights, bias, activation)
}

/// [`expert_layer`] on `x_rows: [R, Din]` already in plan order (the second
/// layer of an expert FFN); see [`crate::experts::layer_forward_rows`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use moerec::candle::{expert_layer, expert_layer_rows, route, RoutingOptions};
/// use moerec::experts::Activation;
/// use moerec::routing::TopK;
///
/// let device = Device::Cpu;
/// let routed = route(&Tensor::rand(-1f32, 1.0, (5, 3), &device)?, &RoutingOptions::new(TopK::K(1)))?;
/// let x = Tensor::rand(-1f32, 1.0, (5, 4), &device)?;
/// let up = Tensor::rand(-1f32, 1.0, (3, 4, 16), &device)?;
/// let down = Tensor::rand(-1f32, 1.0, (3, 8, 4), &device)?;
/// let h = expert_layer(&x, &routed.plan, &up, None, Activation::SwiGlu)?; // [5, 8]
/// let y = expert_layer_rows(&h, &routed.plan, &down, None, Activation::None)?;
/// assert_eq!(y.dims(), &[5, 4]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn expert_layer_rows(
    x_rows: &Tensor,
    plan: &Arc<DispatchPlan>,
    weights: &Tensor,
    bias: Option<&Tensor>,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    layer(true, x_rows, plan, weights, bias, activation)
}

/// Combines the expert rows back into tokens:
/// `out[t] = rho[t] * res[t] + sum_j weights[t, j] * y[row_of_slot[t, j]]`,
/// `[T, Dout]` in y's type — see [`crate::experts::combine`]. `y: [R, Dout]`,
/// `weights: [T, k]` f32 (the routing weights), `res: [T, Dout]` in y's
/// type and `rho: [T]` f32 optional, all borrowed (never copied). On the tape: gradients to `y`, `weights`, `res` and `rho`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use moerec::candle::{combine, expert_layer, route, RoutingOptions};
/// use moerec::experts::Activation;
/// use moerec::routing::TopK;
///
/// let device = Device::Cpu;
/// let logits = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (5, 3), &device)?)?;
/// let routed = route(&logits, &RoutingOptions::new(TopK::K(2)))?;
/// let x = Tensor::rand(-1f32, 1.0, (5, 4), &device)?;
/// let w = Tensor::rand(-1f32, 1.0, (3, 4, 4), &device)?;
/// let y = expert_layer(&x, &routed.plan, &w, None, Activation::Silu)?;
/// let out = combine(&y, &routed.weights, &routed.plan, Some(&x), None)?; // residual
/// assert_eq!(out.dims(), &[5, 4]);
/// let grads = out.sum_all()?.backward()?;
/// assert!(grads.get(&logits).is_some()); // through the routing weights
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn combine(
    y: &Tensor,
    weights: &Tensor,
    plan: &Arc<DispatchPlan>,
    res: Option<&Tensor>,
    rho: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    Ok(combine_with_utilisation(y, weights, plan, res, rho)?.0)
}

/// [`combine`] that also returns each expert's utilisation
/// `util[e] = sum over e's rows of ||weights[t, j] * y[r]||_2` (`[E]` f32,
/// no gradient; DESIGN 4.3): what XSMoE prunes by.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use moerec::candle::{combine_with_utilisation, route, RoutingOptions};
/// use moerec::routing::TopK;
///
/// let device = Device::Cpu;
/// // Two tokens, both routed to both experts with weights 0.5.
/// let routed = route(&Tensor::zeros((2, 2), candle_core::DType::F32, &device)?, &RoutingOptions::new(TopK::All))?;
/// // Rows in plan order: expert 0's two tokens, then expert 1's.
/// let y = Tensor::new(&[[3f32, 4.0], [0.0, 2.0], [1.0, 0.0], [0.0, 0.0]], &device)?;
/// let (out, utilisation) = combine_with_utilisation(&y, &routed.weights, &routed.plan, None, None)?;
/// assert_eq!(out.dims(), &[2, 2]);
/// assert_eq!(utilisation.to_vec1::<f32>()?, vec![3.5, 0.5]); // 0.5 * (5 + 2), 0.5 * 1
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn combine_with_utilisation(
    y: &Tensor,
    weights: &Tensor,
    plan: &Arc<DispatchPlan>,
    res: Option<&Tensor>,
    rho: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let y = y.contiguous()?;
    let device = y.device().clone();
    let weights = weights.contiguous()?;
    let res = res.map(Tensor::contiguous).transpose()?;
    let rho = rho.map(Tensor::contiguous).transpose()?;
    let mut inputs = vec![y.clone(), weights.clone()];
    inputs.extend(res.clone());
    inputs.extend(rho.clone());
    with_float!("y", y.dtype(), T => {
        let (storage, shape, utilisation) = {
            let (by, bw) = (Borrowed::new("y", &y), Borrowed::new("weights", &weights));
            let (bres, brho) = (borrow_optional("res", &res), borrow_optional("rho", &rho));
            let (out, utilisation) =
                experts::combine(by.get::<T>()?, bw.get::<f32>()?, plan, optional::<T>(&bres)?, optional::<f32>(&brho)?)?;
            let (storage, shape) = into_storage(out, &device)?;
            (storage, shape, to_candle(utilisation, &device)?)
        };
        let plan = plan.clone();
        let backward: Backward = Box::new(move |dout| {
            let dout = dout.contiguous()?.to_dtype(DType::F32)?;
            let (bd, by, bw) = (Borrowed::new("dout", &dout), Borrowed::new("y", &y), Borrowed::new("weights", &weights));
            let (bres, brho) = (borrow_optional("res", &res), borrow_optional("rho", &rho));
            let grads = experts::combine_backward(
                bd.get::<f32>()?,
                by.get::<T>()?,
                bw.get::<f32>()?,
                &plan,
                optional::<T>(&bres)?,
                optional::<f32>(&brho)?,
            )?;
            let candle = |grad| to_candle(grad, &device);
            let mut out = vec![Some(candle(grads.dy)?), Some(candle(grads.dweights)?)];
            // Gradients only for the inputs attached: res and rho when given.
            out.extend(grads.dres.map(candle).transpose()?.map(Some));
            out.extend(grads.drho.map(candle).transpose()?.map(Some));
            Ok(out)
        });
        let out = attach("moerec-combine", storage, shape, &inputs.iter().collect::<Vec<_>>(), backward)?;
        Ok((out, utilisation))
    })
}

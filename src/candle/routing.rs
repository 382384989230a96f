//! Top-k routing (DESIGN 4.2) as a candle op: weights and both auxiliary
//! losses on the tape, indices and the dispatch plan as plain values.

use super::autograd::{attach, Backward};
use super::{to_candle, with_float, Borrowed};
use crate::error::Error;
use crate::ops::routing::{self, DispatchPlan, Score, TopK};
use candle_core::{CpuStorage, Shape, Storage, Tensor};
use std::sync::Arc;

/// The options of [`route`]: those of [`crate::routing::RoutingOptions`],
/// with the masks and the bias as candle tensors.
#[derive(Clone, Debug)]
pub struct RoutingOptions {
    /// Experts per valid token (per group with `groups > 1`).
    pub k: TopK,
    /// The score function.
    pub score: Score,
    /// Divide the weights by the sum of the selected scores.
    pub renormalize: bool,
    /// G, the expert groups (FAME: the heads); 1 for plain routing.
    pub groups: usize,
    /// `[E]` u32, 1 = active, 0 = inactive.
    pub expert_mask: Option<Tensor>,
    /// `[T]` u32, 1 = valid, 0 = invalid (e.g. sequence padding).
    pub token_mask: Option<Tensor>,
    /// `[E]` f32, added to the selection key only.
    pub selection_bias: Option<Tensor>,
}

impl RoutingOptions {
    /// Softmax, no renormalisation, one group, no masks, no bias.
    pub fn new(k: TopK) -> Self {
        RoutingOptions {
            k,
            score: Score::Softmax,
            renormalize: false,
            groups: 1,
            expert_mask: None,
            token_mask: None,
            selection_bias: None,
        }
    }
}

/// What [`route`] returns: R = T·G routing rows.
#[derive(Clone, Debug)]
pub struct Routed {
    /// `[R, k]` f32, on the tape (differentiable in the logits).
    pub weights: Tensor,
    /// Scalar f32 load-balance loss, on the tape.
    pub lb_loss: Tensor,
    /// Scalar f32 z-loss, on the tape.
    pub z_loss: Tensor,
    /// `[R, k]` u32: the selected experts, best first.
    pub indices: Tensor,
    /// `[E]` f32: the weight routed to each expert (no gradient).
    pub gate_mass: Tensor,
    /// The dispatch plan the expert ops take (moerec tensors).
    pub plan: Arc<DispatchPlan>,
}

/// A small operand (mask, bias) as an owned moerec tensor: a copy of `[E]`
/// or `[T]` elements.
fn small<T: super::Shared>(
    argument: &'static str,
    tensor: &Option<Tensor>,
) -> candle_core::Result<Option<crate::Tensor<T>>> {
    tensor
        .as_ref()
        .map(|t| -> candle_core::Result<crate::Tensor<T>> {
            let t = t.contiguous()?;
            let borrowed = Borrowed::new(argument, &t);
            Ok(borrowed.get::<T>()?.to_tensor()?)
        })
        .transpose()
}

/// Routes `logits: [T, E]` (f32, bf16 or f16): see
/// [`crate::routing::forward`]. `weights`, `lb_loss` and `z_loss` are on
/// candle's tape — a loss `sum(w * weights) + a * lb_loss + b * z_loss`
/// gives the logits the gradient of [`crate::routing::backward`] with
/// `dweights = w`, `lb_coef = a`, `z_coef = b`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use moerec::candle::{route, RoutingOptions};
/// use moerec::routing::TopK;
///
/// let device = Device::Cpu;
/// // Two tokens, two heads of two experts each (FAME's router, k = all).
/// let logits = Var::from_tensor(&Tensor::new(&[[0f32, 1.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]], &device)?)?;
/// let routed = route(&logits, &RoutingOptions { groups: 2, ..RoutingOptions::new(TopK::All) })?;
/// assert_eq!(routed.weights.dims(), &[4, 2]);
/// let loss = (routed.weights.sum_all()? + (routed.lb_loss * 0.01)?)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&logits).expect("the logits get a gradient").dims(), &[2, 4]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn route(logits: &Tensor, options: &RoutingOptions) -> candle_core::Result<Routed> {
    let logits = logits.contiguous()?;
    let expert_mask = small::<u32>("expert_mask", &options.expert_mask)?;
    let token_mask = small::<u32>("token_mask", &options.token_mask)?;
    let selection_bias = small::<f32>("selection_bias", &options.selection_bias)?;
    let mut moerec_options = routing::RoutingOptions::new(options.k)
        .with_score(options.score)
        .with_renormalize(options.renormalize)
        .with_groups(options.groups);
    if let Some(mask) = &expert_mask {
        moerec_options = moerec_options.with_expert_mask(mask);
    }
    if let Some(mask) = &token_mask {
        moerec_options = moerec_options.with_token_mask(mask);
    }
    if let Some(bias) = &selection_bias {
        moerec_options = moerec_options.with_selection_bias(bias);
    }
    let dtype = logits.dtype();
    let (routed, saved) = with_float!("logits", dtype, T => {
        let borrowed = Borrowed::new("logits", &logits);
        routing::forward(borrowed.get::<T>()?, &moerec_options).map_err(candle_core::Error::from)
    })?;
    let weight_shape = routed.weights.shape().to_vec();
    let [rows, k] = weight_shape[..] else {
        return Err(Error::invalid("weights", format!("expected [R, k], got {weight_shape:?}")).into());
    };
    let slots = routed.weights.len();
    // The differentiable outputs packed in one tensor: weights, lb, z.
    let mut packed = routed.weights.into_vec()?;
    packed.extend(routed.lb_loss.into_vec()?);
    packed.extend(routed.z_loss.into_vec()?);
    let input = logits.clone();
    let backward: Backward = Box::new(move |grad| {
        let grad = grad.contiguous()?;
        let borrowed = Borrowed::new("grad", &grad);
        let all = borrowed.get::<f32>()?;
        let host = all
            .as_slice()
            .ok_or_else(|| Error::invalid("grad", "expected CPU storage"))?;
        let (dweights, coefficients) = host.split_at(slots);
        let dweights = crate::TensorRef::from_slice(dweights, &weight_shape)?;
        let dlogits = with_float!("logits", dtype, T => {
            let borrowed = Borrowed::new("logits", &logits);
            routing::backward(borrowed.get::<T>()?, dweights, coefficients[0], coefficients[1], &saved)
                .map_err(candle_core::Error::from)
        })?;
        Ok(vec![Some(to_candle(dlogits)?)])
    });
    let packed = attach(
        "moerec-routing",
        Storage::Cpu(CpuStorage::F32(packed)),
        Shape::from(slots + 2),
        &[&input],
        backward,
    )?;
    Ok(Routed {
        weights: packed.narrow(0, 0, slots)?.reshape((rows, k))?,
        lb_loss: packed.narrow(0, slots, 1)?.reshape(())?,
        z_loss: packed.narrow(0, slots + 1, 1)?.reshape(())?,
        indices: to_candle(routed.indices)?,
        gate_mass: to_candle(routed.gate_mass)?,
        plan: Arc::new(routed.plan),
    })
}

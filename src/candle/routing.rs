//! Top-k routing (DESIGN 4.2) as a candle op: weights and both auxiliary
//! losses on the tape, indices and the dispatch plan as plain values.

use super::autograd::{attach, Backward};
use super::{into_storage, to_candle, with_float, Borrowed};
use crate::cuda::driver_error;
use crate::error::Error;
use crate::ops::routing::{self, DispatchPlan, Score, TopK};
use crate::tensor::alloc_uninit;
use candle_core::Tensor;
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

/// Moerec f32 tensors laid end to end in one flat tensor, on their device
/// (a device-to-device copy on CUDA).
fn pack(parts: [crate::Tensor<f32>; 3]) -> crate::Result<crate::Tensor<f32>> {
    let len = parts.iter().map(crate::Tensor::len).sum::<usize>();
    match parts[0].device() {
        crate::Device::Cpu => {
            let mut all = Vec::with_capacity(len);
            for part in parts {
                all.extend(part.into_vec()?);
            }
            crate::Tensor::from_vec(all, &[len], &crate::Device::Cpu)
        }
        crate::Device::Cuda(device) => {
            let stream = device.stream();
            let mut all = alloc_uninit::<f32>(stream, len)?;
            let mut offset = 0;
            for part in &parts {
                let source = part.device_slice()?;
                let end = offset + source.len();
                if end > offset {
                    let mut target = all
                        .try_slice_mut(offset..end)
                        .ok_or_else(|| Error::invalid("weights", format!("{offset}..{end} beyond {len} elements")))?;
                    stream
                        .memcpy_dtod(source, &mut target)
                        .map_err(driver_error("cuMemcpyDtoDAsync"))?;
                }
                offset = end;
            }
            crate::Tensor::from_cuda_slice(all, &[len], &device)
        }
    }
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
    let contiguous = |t: &Option<Tensor>| t.as_ref().map(Tensor::contiguous).transpose();
    let (expert_mask, token_mask, selection_bias) = (
        contiguous(&options.expert_mask)?,
        contiguous(&options.token_mask)?,
        contiguous(&options.selection_bias)?,
    );
    let borrowed = [
        ("expert_mask", &expert_mask),
        ("token_mask", &token_mask),
        ("selection_bias", &selection_bias),
    ]
    .map(|(argument, tensor)| tensor.as_ref().map(|t| Borrowed::new(argument, t)));
    let [expert_mask, token_mask, selection_bias] = &borrowed;
    let moerec_options = routing::RoutingOptions {
        expert_mask: expert_mask.as_ref().map(Borrowed::get::<u32>).transpose()?,
        token_mask: token_mask.as_ref().map(Borrowed::get::<u32>).transpose()?,
        selection_bias: selection_bias.as_ref().map(Borrowed::get::<f32>).transpose()?,
        ..routing::RoutingOptions::new(options.k)
            .with_score(options.score)
            .with_renormalize(options.renormalize)
            .with_groups(options.groups)
    };
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
    let device = logits.device().clone();
    // The differentiable outputs packed in one tensor: weights, lb, z.
    let (storage, shape) = into_storage(pack([routed.weights, routed.lb_loss, routed.z_loss])?, &device)?;
    let input = logits.clone();
    let output_device = device.clone();
    let backward: Backward = Box::new(move |grad| {
        let grad = grad.contiguous()?;
        // The loss coefficients are arguments of the backward kernels: 8
        // bytes read back (the backward waits for its data check anyway).
        let coefficients = grad.narrow(0, slots, 2)?.to_vec1::<f32>()?;
        let dweights = grad.narrow(0, 0, slots)?;
        let borrowed = Borrowed::new("grad", &dweights);
        let dweights = borrowed.get::<f32>()?.reshape(&weight_shape)?;
        let dlogits = with_float!("logits", dtype, T => {
            let borrowed = Borrowed::new("logits", &logits);
            routing::backward(borrowed.get::<T>()?, dweights, coefficients[0], coefficients[1], &saved)
                .map_err(candle_core::Error::from)
        })?;
        Ok(vec![Some(to_candle(dlogits, &device)?)])
    });
    let packed = attach("moerec-routing", storage, shape, &[&input], backward)?;
    Ok(Routed {
        weights: packed.narrow(0, 0, slots)?.reshape((rows, k))?,
        lb_loss: packed.narrow(0, slots, 1)?.reshape(())?,
        z_loss: packed.narrow(0, slots + 1, 1)?.reshape(())?,
        indices: to_candle(routed.indices, &output_device)?,
        gate_mass: to_candle(routed.gate_mass, &output_device)?,
        plan: Arc::new(routed.plan),
    })
}

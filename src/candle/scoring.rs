//! The fused gated scoring (DESIGN 4.4) as candle ops: cross-entropy and
//! materialised scores with their gradients, and top-n.

use super::autograd::{attach, Backward};
use super::{to_candle, with_float, Borrowed, Shared};
use crate::dtype::FloatElement;
use crate::ops::scoring::{self, History, Mixing, Scoring};
use candle_core::{Device, Tensor};

/// Everything the scoring ops take beside the user states, gate logits and
/// item tables.
#[derive(Clone, Debug)]
pub struct ScoringOptions {
    /// 1 / temperature (default 1).
    pub scale: f32,
    /// How the heads' scores are fused (default [`Mixing::Logits`]).
    pub mixing: Mixing,
    /// `[V]` f32 added to every head's logits (e.g. `-log popularity`);
    /// differentiable.
    pub item_bias: Option<Tensor>,
    /// `[n]` u32 item ids left out of every softmax and top-n (e.g. the
    /// padding item).
    pub excluded: Option<Tensor>,
}

impl Default for ScoringOptions {
    fn default() -> Self {
        ScoringOptions {
            scale: 1.0,
            mixing: Mixing::Logits,
            item_bias: None,
            excluded: None,
        }
    }
}

/// The operands made contiguous, in the order their gradients come back:
/// user, gate logits, items, then the item bias if there is one.
struct Operands {
    float: Vec<Tensor>,
    excluded: Option<Tensor>,
    scale: f32,
    mixing: Mixing,
}

impl Operands {
    fn new(user: &Tensor, gate_logits: &Tensor, items: &Tensor, options: &ScoringOptions) -> candle_core::Result<Self> {
        let mut float = vec![user.contiguous()?, gate_logits.contiguous()?, items.contiguous()?];
        if let Some(bias) = &options.item_bias {
            float.push(bias.contiguous()?);
        }
        Ok(Operands {
            float,
            excluded: options.excluded.as_ref().map(Tensor::contiguous).transpose()?,
            scale: options.scale,
            mixing: options.mixing,
        })
    }

    fn borrow(&self) -> Locked<'_> {
        const NAMES: [&str; 4] = ["user", "gate_logits", "items", "item_bias"];
        Locked {
            float: self
                .float
                .iter()
                .zip(NAMES)
                .map(|(t, name)| Borrowed::new(name, t))
                .collect(),
            excluded: self.excluded.as_ref().map(|t| Borrowed::new("excluded", t)),
            scale: self.scale,
            mixing: self.mixing,
        }
    }

    fn inputs(&self) -> Vec<&Tensor> {
        self.float.iter().collect()
    }
}

/// The operands' storage, read-locked while an op runs on it.
struct Locked<'t> {
    float: Vec<Borrowed<'t>>,
    excluded: Option<Borrowed<'t>>,
    scale: f32,
    mixing: Mixing,
}

impl Locked<'_> {
    fn scoring<T: Shared + FloatElement>(&self) -> crate::Result<Scoring<'_, T>> {
        let mut inputs = Scoring::new(
            self.float[0].get::<T>()?,
            self.float[1].get::<T>()?,
            self.float[2].get::<T>()?,
        )
        .with_scale(self.scale)
        .with_mixing(self.mixing);
        if let Some(bias) = self.float.get(3) {
            inputs = inputs.with_item_bias(bias.get::<f32>()?);
        }
        if let Some(excluded) = &self.excluded {
            inputs = inputs.with_excluded(excluded.get::<u32>()?);
        }
        Ok(inputs)
    }
}

/// The gradients in the operands' order (the item bias only when given).
fn gradients(grads: scoring::Gradients, with_bias: bool, device: &Device) -> candle_core::Result<Vec<Option<Tensor>>> {
    let mut out = vec![
        Some(to_candle(grads.user, device)?),
        Some(to_candle(grads.gate_logits, device)?),
        Some(to_candle(grads.items, device)?),
    ];
    if with_bias {
        out.push(Some(to_candle(grads.item_bias, device)?));
    }
    Ok(out)
}

/// The fused gated cross-entropy `loss[b] = -log P[b, targets[b]]`, `[B]`
/// f32 (0 where the target is `ignore`), on candle's tape: its backward
/// gives the gradients of `user: [B, H, D]`, `gate_logits: [B, H]`,
/// `items: [H, V, D]` or `[V, D]` and the item bias. Nothing of size
/// `B * V` is allocated, forward or backward. `targets: [B]` u32.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use moerec::candle::{cross_entropy, ScoringOptions};
/// use moerec::scoring::Mixing;
///
/// let device = Device::Cpu;
/// let user = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (3, 2, 4), &device)?)?;
/// let gates = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (3, 2), &device)?)?;
/// let items = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (7, 4), &device)?)?; // shared by both heads
/// let bias = Var::from_tensor(&Tensor::zeros(7, candle_core::DType::F32, &device)?)?;
/// let options = ScoringOptions {
///     mixing: Mixing::Probabilities,
///     scale: 2.0,
///     item_bias: Some(bias.as_tensor().clone()),
///     excluded: Some(Tensor::new(&[0u32], &device)?), // the padding item
/// };
/// let targets = Tensor::new(&[3u32, 6, 0], &device)?;
/// // Row 2's target is the padding id: ignored, loss 0.
/// let loss = cross_entropy(&user, &gates, &items, &targets, Some(0), &options)?;
/// assert_eq!(loss.to_vec1::<f32>()?[2], 0.0);
/// let grads = loss.sum_all()?.backward()?;
/// for var in [&user, &gates, &items, &bias] {
///     assert!(grads.get(var).is_some());
/// }
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn cross_entropy(
    user: &Tensor,
    gate_logits: &Tensor,
    items: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
    options: &ScoringOptions,
) -> candle_core::Result<Tensor> {
    let operands = Operands::new(user, gate_logits, items, options)?;
    let targets = targets.contiguous()?;
    let (loss, saved) = with_float!("user", user.dtype(), T => {
        let locked = operands.borrow();
        let target_ids = Borrowed::new("targets", &targets);
        scoring::cross_entropy(&locked.scoring::<T>()?, target_ids.get::<u32>()?, ignore)
            .map_err(candle_core::Error::from)
    })?;
    let device = user.device().clone();
    let (storage, shape) = super::into_storage(loss, &device)?;
    let with_bias = options.item_bias.is_some();
    let dtype = user.dtype();
    let inputs = operands.inputs().into_iter().cloned().collect::<Vec<_>>();
    let backward: Backward = Box::new(move |dloss| {
        let dloss = dloss.contiguous()?;
        let grads = with_float!("user", dtype, T => {
            let locked = operands.borrow();
            let dloss = Borrowed::new("dloss", &dloss);
            scoring::cross_entropy_backward(&locked.scoring::<T>()?, dloss.get::<f32>()?, &saved)
                .map_err(candle_core::Error::from)
        })?;
        gradients(grads, with_bias, &device)
    });
    attach(
        "moerec-cross-entropy",
        storage,
        shape,
        &inputs.iter().collect::<Vec<_>>(),
        backward,
    )
}

/// The materialised scores `[B, V]` f32 on candle's tape: the mixed logits S
/// for Logits mixing (-inf at excluded items), the probabilities P for
/// Probabilities mixing (0 there). For small catalogs and evaluation;
/// training uses [`cross_entropy`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use moerec::candle::{scores, ScoringOptions};
///
/// let device = Device::Cpu;
/// let user = Tensor::rand(-1f32, 1.0, (2, 1, 4), &device)?;
/// let gates = Tensor::zeros((2, 1), candle_core::DType::F32, &device)?;
/// let items = Tensor::rand(-1f32, 1.0, (1, 6, 4), &device)?;
/// let s = scores(&user, &gates, &items, &ScoringOptions::default())?;
/// assert_eq!(s.dims(), &[2, 6]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn scores(
    user: &Tensor,
    gate_logits: &Tensor,
    items: &Tensor,
    options: &ScoringOptions,
) -> candle_core::Result<Tensor> {
    let operands = Operands::new(user, gate_logits, items, options)?;
    let out = with_float!("user", user.dtype(), T => {
        let locked = operands.borrow();
        scoring::scores(&locked.scoring::<T>()?).map_err(candle_core::Error::from)
    })?;
    let device = user.device().clone();
    let (storage, shape) = super::into_storage(out, &device)?;
    let with_bias = options.item_bias.is_some();
    let dtype = user.dtype();
    let inputs = operands.inputs().into_iter().cloned().collect::<Vec<_>>();
    let backward: Backward = Box::new(move |dscores| {
        let dscores = dscores.contiguous()?;
        let grads = with_float!("user", dtype, T => {
            let locked = operands.borrow();
            let dscores = Borrowed::new("dscores", &dscores);
            scoring::scores_backward(&locked.scoring::<T>()?, dscores.get::<f32>()?).map_err(candle_core::Error::from)
        })?;
        gradients(grads, with_bias, &device)
    });
    attach(
        "moerec-scores",
        storage,
        shape,
        &inputs.iter().collect::<Vec<_>>(),
        backward,
    )
}

/// The `n` best items of every row, best first (ties to the lower id),
/// without materialising `[B, V]`: ids `[B, n]` u32 and values `[B, n]` f32
/// (S for Logits mixing, P for Probabilities), off the tape. Skips the
/// excluded items and, with `history = Some((offsets, ids))` (CSR, u32:
/// `offsets: [B + 1]`), each row's own history. Fewer than `n` eligible
/// items in a row is an error.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use moerec::candle::{topk, ScoringOptions};
///
/// let device = Device::Cpu;
/// let user = Tensor::new(&[[[1f32, 0.0]], [[0.0, 1.0]]], &device)?; // [2, 1, 2]
/// let gates = Tensor::zeros((2, 1), candle_core::DType::F32, &device)?;
/// let items = Tensor::new(&[[0f32, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]], &device)?; // [4, 2]
/// // Row 0 has already seen item 1.
/// let offsets = Tensor::new(&[0u32, 1, 1], &device)?;
/// let seen = Tensor::new(&[1u32], &device)?;
/// let (ids, _values) = topk(&user, &gates, &items, 1, Some((&offsets, &seen)), &ScoringOptions::default())?;
/// assert_eq!(ids.to_vec2::<u32>()?, vec![vec![3], vec![2]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn topk(
    user: &Tensor,
    gate_logits: &Tensor,
    items: &Tensor,
    n: usize,
    history: Option<(&Tensor, &Tensor)>,
    options: &ScoringOptions,
) -> candle_core::Result<(Tensor, Tensor)> {
    let operands = Operands::new(user, gate_logits, items, options)?;
    let history = history
        .map(|(offsets, ids)| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((offsets.contiguous()?, ids.contiguous()?))
        })
        .transpose()?;
    let best = with_float!("user", user.dtype(), T => {
        let locked = operands.borrow();
        let borrowed = history
            .as_ref()
            .map(|(offsets, ids)| (Borrowed::new("history.offsets", offsets), Borrowed::new("history.ids", ids)));
        let history = borrowed
            .as_ref()
            .map(|(offsets, ids)| -> crate::Result<History<'_>> { Ok(History::new(offsets.get::<u32>()?, ids.get::<u32>()?)) })
            .transpose()?;
        scoring::topk(&locked.scoring::<T>()?, n, history).map_err(candle_core::Error::from)
    })?;
    Ok((
        to_candle(best.ids, user.device())?,
        to_candle(best.values, user.device())?,
    ))
}

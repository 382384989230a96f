//! Fused gated multi-head scoring (DESIGN 4.4): FAME's next-item prediction.
//!
//! Per-head logits `s[b, h, v] = scale * <U[b, h], X[h or shared, v]> + item_bias[v]`
//! are fused by the gate `g = softmax_h G` either as logits
//! (`S = sum_h g_h s_h`, `P = softmax_v S`) or as probabilities
//! (`P = sum_h g_h softmax_v s_h`, a mixture of softmaxes). Every softmax runs
//! over the items that are not excluded.
//!
//! - [`scores`] materialises `[B, V]` for small catalogs: the mixed logits S
//!   (Logits mixing, -inf at excluded items) or the probabilities P
//!   (Probabilities mixing, 0 there) — the quantity [`topk`] ranks by.
//! - [`topk`] returns the n best items per row without materialising `[B, V]`.
//! - [`cross_entropy`] keeps only per-row log-sum-exps and the targets'
//!   logits ([`Saved`], O(B * H)); its backward recomputes the scores tile
//!   by tile. Nothing of size `B * V` is allocated
//!   ([`workspace_bytes`] and, per device, [`workspace_bytes_on`] bound the
//!   memory beyond inputs and outputs).
//!
//! Non-finite inputs are not checked here: NaN and ±inf in `U`, `G`, `X` or
//! `item_bias` reach the outputs they enter by IEEE arithmetic (which of
//! those elements come out NaN rather than ±inf may differ between backends).
//! Ignored rows and excluded items are never read into any sum, so they
//! contribute exact zeros whatever they hold: an excluded item's `dX` rows
//! and bias gradient are 0, an ignored row's loss and gradients are 0, and a
//! gate-gradient term whose item sum is exactly 0 counts as 0 (an infinite
//! user value with no eligible item gives `dG = 0`, not NaN). Both backends
//! follow this rule.
//!
//! Where a gradient is exactly 0 because the heads agree, both backends give
//! exact zeros, not rounding noise: a row whose one eligible item is its
//! target (cross-entropy, either mixing) or any row with one eligible item
//! (Probabilities `scores`) has zero gradients; heads that give the target
//! the same probability have zero cross-entropy `dG`. The gate-softmax
//! backward is taken relative to one head's term and the mixture's
//! `g_h - r_h` through `expm1` of the heads' log-probability differences
//! for that reason.
//!
//! On a CUDA device every op queues its kernels on the device's stream and
//! synchronises once, to read the status word of the data checks (excluded
//! ids, targets, histories) and return the error the CPU gives for the same
//! input. The backend layer ([`cuda`]) leaves that word on the device.
//!
//! ```
//! use moerec::scoring::{self, Mixing, Scoring};
//! use moerec::{Device, Tensor};
//!
//! let device = Device::cpu();
//! // Two sequences, two heads of width 3, a catalog of five items per head.
//! let user = Tensor::from_vec(vec![0.1f32; 2 * 2 * 3], &[2, 2, 3], &device)?;
//! let gates = Tensor::from_vec(vec![0.0f32, 1.0, 0.5, 0.5], &[2, 2], &device)?;
//! let items = Tensor::from_vec((0..30).map(|i| i as f32 / 30.0).collect(), &[2, 5, 3], &device)?;
//! let inputs = Scoring::new(&user, &gates, &items).with_mixing(Mixing::Probabilities);
//!
//! let targets = Tensor::from_vec(vec![4u32, 0], &[2], &device)?;
//! let (loss, saved) = scoring::cross_entropy(&inputs, &targets, None)?;
//! assert!(loss.to_vec()?.iter().all(|l| *l > 0.0));
//! let dloss = Tensor::from_vec(vec![1.0f32; 2], &[2], &device)?;
//! let grads = scoring::cross_entropy_backward(&inputs, &dloss, &saved)?;
//! assert_eq!(grads.items.shape(), &[2, 5, 3]);
//!
//! let best = scoring::topk(&inputs, 2, None)?;
//! assert_eq!(best.ids.shape(), &[2, 2]);
//! # Ok::<(), moerec::Error>(())
//! ```

pub mod cpu;
pub mod cuda;
mod status;

use crate::cuda::CudaDevice;
use crate::device::Device;
use crate::dtype::FloatElement;
use crate::error::{Error, Result};
use crate::ops::check_len;
use crate::tensor::Tensor;
use crate::tensor_ref::TensorRef;
use status::{check_status, excluded_sources, StatusSources};
use std::sync::Arc;

/// How the heads' scores are fused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mixing {
    /// Mix the logits, then one softmax: `P = softmax_v sum_h g_h s_h`.
    #[default]
    Logits,
    /// Mix the per-head softmaxes: `P = sum_h g_h softmax_v s_h`.
    Probabilities,
}

/// What the cross-entropy keeps per row for its backward, each `[B]` for
/// Logits mixing and `[B, H]` for Probabilities (host slices or device
/// views, for the backend layer).
#[derive(Debug)]
pub struct RowTerms<S> {
    /// The log-sum-exps of the scores over the eligible items.
    pub lse: S,
    /// The targets' scores as they entered `lse` (unspecified in ignored
    /// rows).
    pub target_logits: S,
}

/// The sizes of a scoring problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoringShape {
    /// B, rows (sequences).
    pub batch: usize,
    /// H
    pub heads: usize,
    /// D, the per-head width.
    pub width: usize,
    /// V, the catalog size.
    pub num_items: usize,
    /// Whether one `[V, D]` table serves every head.
    pub shared: bool,
}

impl ScoringShape {
    /// Checks the backend buffers' lengths against the shape.
    pub(crate) fn check_buffers(
        &self,
        user: usize,
        gate_logits: usize,
        items: usize,
        item_bias: Option<usize>,
    ) -> Result<()> {
        self.check_lengths(
            ["user", "gate_logits", "items", "item_bias"],
            [user, gate_logits, items],
            item_bias,
        )
    }

    /// Checks the gradient buffers' lengths: those of the operands.
    pub(crate) fn check_gradient_buffers(
        &self,
        user: usize,
        gate_logits: usize,
        items: usize,
        item_bias: usize,
    ) -> Result<()> {
        self.check_lengths(
            ["d_user", "d_gate_logits", "d_items", "d_item_bias"],
            [user, gate_logits, items],
            Some(item_bias),
        )
    }

    fn check_lengths(&self, names: [&'static str; 4], lengths: [usize; 3], item_bias: Option<usize>) -> Result<()> {
        let table_heads = if self.shared { 1 } else { self.heads };
        let expected = [
            self.batch * self.heads * self.width,
            self.batch * self.heads,
            table_heads * self.num_items * self.width,
        ];
        for ((name, actual), expected) in names.iter().zip(lengths).zip(expected) {
            check_len(name, actual, expected)?;
        }
        match item_bias {
            Some(len) => check_len(names[3], len, self.num_items),
            None => Ok(()),
        }
    }
}

/// The operands every scoring op takes; the forward and the backward are
/// given the same ones. Each is owned ([`Tensor`], passed as `&tensor`) or
/// borrowed ([`TensorRef`]: host memory or a cudarc view), never copied.
#[derive(Clone)]
pub struct Scoring<'a, T: FloatElement> {
    /// `U: [B, H, D]`
    pub user: TensorRef<'a, T>,
    /// `G: [B, H]`, gate logits.
    pub gate_logits: TensorRef<'a, T>,
    /// `X: [H, V, D]` per head, or `[V, D]` shared by all heads.
    pub items: TensorRef<'a, T>,
    /// 1 / temperature.
    pub scale: f32,
    /// `[V]` f32, e.g. `-log popularity`.
    pub item_bias: Option<TensorRef<'a, f32>>,
    /// How the heads' scores are fused.
    pub mixing: Mixing,
    /// Item ids left out of every softmax and top-n (duplicates allowed).
    pub excluded: Option<TensorRef<'a, u32>>,
}

impl<'a, T: FloatElement> Scoring<'a, T> {
    /// Logits mixing, scale 1, no bias, nothing excluded.
    pub fn new(
        user: impl Into<TensorRef<'a, T>>,
        gate_logits: impl Into<TensorRef<'a, T>>,
        items: impl Into<TensorRef<'a, T>>,
    ) -> Self {
        Scoring {
            user: user.into(),
            gate_logits: gate_logits.into(),
            items: items.into(),
            scale: 1.0,
            item_bias: None,
            mixing: Mixing::Logits,
            excluded: None,
        }
    }

    /// Sets `scale` (1 / temperature).
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// Adds `item_bias: [V]` f32 to every head's logits.
    pub fn with_item_bias(mut self, item_bias: impl Into<TensorRef<'a, f32>>) -> Self {
        self.item_bias = Some(item_bias.into());
        self
    }

    /// Sets how the heads are fused.
    pub fn with_mixing(mut self, mixing: Mixing) -> Self {
        self.mixing = mixing;
        self
    }

    /// Leaves these item ids out of every softmax and top-n.
    pub fn with_excluded(mut self, excluded: impl Into<TensorRef<'a, u32>>) -> Self {
        self.excluded = Some(excluded.into());
        self
    }

    /// Checks shapes and devices; returns the sizes and the device.
    fn check(&self) -> Result<(ScoringShape, Device)> {
        let (batch, heads, width) = match *self.user.shape() {
            [b, h, d] if h > 0 && d > 0 => (b, h, d),
            _ => return Err(Error::shape("user", "[B, H, D] with H, D >= 1", self.user.shape())),
        };
        self.gate_logits.expect_shape("gate_logits", &[batch, heads])?;
        let (num_items, shared) = match *self.items.shape() {
            [v, d] if d == width && v > 0 => (v, true),
            [h, v, d] if h == heads && d == width && v > 0 => (v, false),
            _ => {
                return Err(Error::shape(
                    "items",
                    format!("[{heads}, V, {width}] or [V, {width}] with V >= 1"),
                    self.items.shape(),
                ))
            }
        };
        let device = self.user.device();
        self.gate_logits.expect_device("gate_logits", &device)?;
        self.items.expect_device("items", &device)?;
        if let Some(bias) = &self.item_bias {
            bias.expect_shape("item_bias", &[num_items])?;
            bias.expect_device("item_bias", &device)?;
        }
        if let Some(excluded) = &self.excluded {
            if excluded.shape().len() != 1 {
                return Err(Error::shape("excluded", "[n]", excluded.shape()));
            }
            excluded.expect_device("excluded", &device)?;
        }
        let shape = ScoringShape {
            batch,
            heads,
            width,
            num_items,
            shared,
        };
        Ok((shape, device))
    }

    fn host(&self, shape: ScoringShape) -> Result<cpu::Operands<'a, T>> {
        Ok(cpu::Operands {
            user: self.user.host()?,
            gate_logits: self.gate_logits.host()?,
            items: self.items.host()?,
            item_bias: self.item_bias.as_ref().map(|b| b.host()).transpose()?,
            excluded: self.excluded.as_ref().map(|e| e.host()).transpose()?.unwrap_or(&[]),
            scale: self.scale,
            mixing: self.mixing,
            shape,
        })
    }

    fn device(&self, shape: ScoringShape) -> Result<cuda::Operands<'_, T>> {
        Ok(cuda::Operands {
            user: self.user.cuda_view()?,
            gate_logits: self.gate_logits.cuda_view()?,
            items: self.items.cuda_view()?,
            item_bias: self.item_bias.as_ref().map(|b| b.cuda_view()).transpose()?,
            excluded: self.excluded.as_ref().map(|e| e.cuda_view()).transpose()?,
            scale: self.scale,
            mixing: self.mixing,
            shape,
        })
    }
}

/// Gradients of the scoring operands, f32, in their layouts.
#[derive(Debug)]
pub struct Gradients {
    /// `[B, H, D]`
    pub user: Tensor<f32>,
    /// `[B, H]`
    pub gate_logits: Tensor<f32>,
    /// The layout of the items (`[H, V, D]` or `[V, D]`).
    pub items: Tensor<f32>,
    /// `[V]`, returned also without an item bias (the gradient at zero).
    pub item_bias: Tensor<f32>,
}

/// What [`cross_entropy_backward`] needs beyond the operands: the targets,
/// the ignored id, the per-row log-sum-exps (`[B]` for Logits mixing,
/// `[B, H]` for Probabilities) and the targets' logits as they entered them
/// (same shape) — O(B * H), never O(B * V). The backward forms the heads'
/// log-probabilities of the target, `s_h(y) - lse_h`, from the very values
/// the loss was computed from, so that they are exactly 0 where the forward's
/// are (a row with one eligible item) instead of the rounding difference of
/// a second evaluation of `s_h(y)`.
#[derive(Debug)]
pub struct Saved {
    targets: Tensor<u32>,
    ignore: Option<u32>,
    lse: Tensor<f32>,
    target_logits: Tensor<f32>,
    mixing: Mixing,
    shape: ScoringShape,
}

impl Saved {
    /// The per-row log-sum-exps.
    pub fn lse(&self) -> &Tensor<f32> {
        &self.lse
    }

    /// The targets' logits as they entered [`Saved::lse`] (unspecified in
    /// ignored rows).
    pub fn target_logits(&self) -> &Tensor<f32> {
        &self.target_logits
    }
}

/// The n best items of every row: ids `[B, n]` and their scores `[B, n]`,
/// best first.
#[derive(Debug)]
pub struct TopK {
    /// `[B, n]` u32: the items, best first.
    pub ids: Tensor<u32>,
    /// `[B, n]` f32: their scores (S or P).
    pub values: Tensor<f32>,
}

/// Per-row history lists in CSR form, skipped by [`topk`]: row b's items are
/// `ids[offsets[b]..offsets[b + 1]]`.
#[derive(Clone)]
pub struct History<'a> {
    /// `[B + 1]`, starting at 0, non-decreasing, ending at `ids.len()`.
    pub offsets: TensorRef<'a, u32>,
    /// Item ids, each below V.
    pub ids: TensorRef<'a, u32>,
}

impl<'a> History<'a> {
    /// The history lists from their offsets `[B + 1]` and ids `[n]`.
    pub fn new(offsets: impl Into<TensorRef<'a, u32>>, ids: impl Into<TensorRef<'a, u32>>) -> Self {
        History {
            offsets: offsets.into(),
            ids: ids.into(),
        }
    }
}

fn zeros_like_gradients(shape: ScoringShape, device: &Device) -> Result<Gradients> {
    let items_shape: Vec<usize> = if shape.shared {
        vec![shape.num_items, shape.width]
    } else {
        vec![shape.heads, shape.num_items, shape.width]
    };
    Ok(Gradients {
        user: Tensor::zeros(&[shape.batch, shape.heads, shape.width], device)?,
        gate_logits: Tensor::zeros(&[shape.batch, shape.heads], device)?,
        items: Tensor::zeros(&items_shape, device)?,
        item_bias: Tensor::zeros(&[shape.num_items], device)?,
    })
}

fn gradients_mut(grads: &mut Gradients) -> Result<cpu::GradientsMut<'_>> {
    Ok(cpu::GradientsMut {
        user: grads.user.host_mut()?,
        gate_logits: grads.gate_logits.host_mut()?,
        items: grads.items.host_mut()?,
        item_bias: grads.item_bias.host_mut()?,
    })
}

fn device_gradients_mut(grads: &mut Gradients) -> Result<cuda::GradientsMut<'_>> {
    Ok(cuda::GradientsMut {
        user: grads.user.device_slice_mut()?.as_view_mut(),
        gate_logits: grads.gate_logits.device_slice_mut()?.as_view_mut(),
        items: grads.items.device_slice_mut()?.as_view_mut(),
        item_bias: grads.item_bias.device_slice_mut()?.as_view_mut(),
    })
}

/// The materialised scores `[B, V]` f32: the mixed logits S for Logits
/// mixing (-inf at excluded items), the probabilities P for Probabilities
/// mixing (0 at excluded items). For small catalogs and evaluation.
///
/// ```
/// use moerec::scoring::{self, Scoring};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// // One row, one head of width 1, three items shared by the heads: S = 2 * x.
/// let user = Tensor::from_vec(vec![2.0f32], &[1, 1, 1], &device)?;
/// let gates = Tensor::from_vec(vec![0.0f32], &[1, 1], &device)?;
/// let items = Tensor::from_vec(vec![1.0f32, 0.0, -1.0], &[3, 1], &device)?;
/// let inputs = Scoring::new(&user, &gates, &items);
/// assert_eq!(scoring::scores(&inputs)?.to_vec()?, vec![2.0, 0.0, -2.0]);
/// let excluded = Tensor::from_vec(vec![1u32], &[1], &device)?;
/// let masked = scoring::scores(&inputs.with_excluded(&excluded))?;
/// assert_eq!(masked.to_vec()?, vec![2.0, f32::NEG_INFINITY, -2.0]);
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn scores<T: FloatElement>(inputs: &Scoring<'_, T>) -> Result<Tensor<f32>> {
    let (shape, device) = inputs.check()?;
    let mut out = Tensor::zeros(&[shape.batch, shape.num_items], &device)?;
    match &device {
        Device::Cpu => cpu::scores(inputs.host(shape)?, out.host_mut()?)?,
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let mut status = cuda_device.new_status(stream)?;
            cuda::scores(
                cuda_device,
                stream,
                &inputs.device(shape)?,
                &mut out.device_slice_mut()?.as_view_mut(),
                &mut status.as_view_mut(),
            )?;
            check_status(stream, &status, shape.num_items, excluded_sources(inputs))?;
        }
    }
    Ok(out)
}

/// Gradients of `sum over (b, v) of dscores[b, v] * scores[b, v]` (excluded
/// items contribute nothing). `dscores` is `[B, V]` f32.
///
/// ```
/// use moerec::scoring::{self, Scoring};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// // One row, one head of width 1, three items shared by the heads: S = 2 * x.
/// let user = Tensor::from_vec(vec![2.0f32], &[1, 1, 1], &device)?;
/// let gates = Tensor::from_vec(vec![0.0f32], &[1, 1], &device)?;
/// let items = Tensor::from_vec(vec![1.0f32, 0.0, -1.0], &[3, 1], &device)?;
/// let inputs = Scoring::new(&user, &gates, &items);
/// let dscores = Tensor::from_vec(vec![1.0f32, 0.0, 0.0], &[1, 3], &device)?;
/// let grads = scoring::scores_backward(&inputs, &dscores)?;
/// assert_eq!(grads.user.to_vec()?, vec![1.0]); // x_0
/// assert_eq!(grads.items.to_vec()?, vec![2.0, 0.0, 0.0]); // u at item 0
/// assert_eq!(grads.item_bias.to_vec()?, vec![1.0, 0.0, 0.0]);
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn scores_backward<'d, T: FloatElement>(
    inputs: &Scoring<'_, T>,
    dscores: impl Into<TensorRef<'d, f32>>,
) -> Result<Gradients> {
    let dscores = dscores.into();
    let (shape, device) = inputs.check()?;
    dscores.expect_shape("dscores", &[shape.batch, shape.num_items])?;
    dscores.expect_device("dscores", &device)?;
    let mut grads = zeros_like_gradients(shape, &device)?;
    match &device {
        Device::Cpu => cpu::scores_backward(inputs.host(shape)?, dscores.host()?, gradients_mut(&mut grads)?)?,
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let mut status = cuda_device.new_status(stream)?;
            cuda::scores_backward(
                cuda_device,
                stream,
                &inputs.device(shape)?,
                &dscores.cuda_view()?,
                &mut device_gradients_mut(&mut grads)?,
                &mut status.as_view_mut(),
            )?;
            check_status(stream, &status, shape.num_items, excluded_sources(inputs))?;
        }
    }
    Ok(grads)
}

/// The n best items of every row by S (Logits mixing) or P (Probabilities),
/// best first, ties to the lower id, NaN below every number, skipping the
/// excluded items and the row's history. A row with fewer than n eligible
/// items is [`Error::InvalidArgument`].
///
/// ```
/// use moerec::scoring::{self, Scoring};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// // One row, one head of width 1, three items shared by the heads: S = 2 * x.
/// let user = Tensor::from_vec(vec![2.0f32], &[1, 1, 1], &device)?;
/// let gates = Tensor::from_vec(vec![0.0f32], &[1, 1], &device)?;
/// let items = Tensor::from_vec(vec![1.0f32, 0.0, -1.0], &[3, 1], &device)?;
/// let inputs = Scoring::new(&user, &gates, &items);
/// let best = scoring::topk(&inputs, 2, None)?;
/// assert_eq!((best.ids.to_vec()?, best.values.to_vec()?), (vec![0, 1], vec![2.0, 0.0]));
/// // Only three items: n = 4 is refused (the error prints with Display).
/// println!("{}", scoring::topk(&inputs, 4, None).unwrap_err());
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn topk<T: FloatElement>(inputs: &Scoring<'_, T>, n: usize, history: Option<History<'_>>) -> Result<TopK> {
    let (shape, device) = inputs.check()?;
    if let Some(history) = &history {
        history.offsets.expect_shape("history.offsets", &[shape.batch + 1])?;
        if history.ids.shape().len() != 1 {
            return Err(Error::shape("history.ids", "[n]", history.ids.shape()));
        }
        history.offsets.expect_device("history.offsets", &device)?;
        history.ids.expect_device("history.ids", &device)?;
    }
    if n > shape.num_items {
        check_unreachable_topk(inputs, shape, n, history)?;
        return Ok(TopK {
            ids: Tensor::zeros(&[0, n], &device)?,
            values: Tensor::zeros(&[0, n], &device)?,
        });
    }
    let mut ids = Tensor::zeros(&[shape.batch, n], &device)?;
    let mut values = Tensor::zeros(&[shape.batch, n], &device)?;
    match &device {
        Device::Cpu => {
            let history = history
                .as_ref()
                .map(|h| -> Result<cpu::HistoryRef<'_>> {
                    Ok(cpu::HistoryRef {
                        offsets: h.offsets.host()?,
                        ids: h.ids.host()?,
                    })
                })
                .transpose()?;
            cpu::topk(inputs.host(shape)?, n, history, ids.host_mut()?, values.host_mut()?)?
        }
        Device::Cuda(cuda_device) => cuda_topk(cuda_device, inputs, shape, n, history, &mut ids, &mut values)?,
    }
    Ok(TopK { ids, values })
}

/// `loss[b] = -log P[b, targets[b]]` f32 `[B]`, 0 for rows whose target is
/// `ignore` (checked before the range check; it may be >= V). A target >= V
/// is [`Error::IndexOutOfRange`], an excluded target
/// [`Error::InvalidArgument`]. Keeps only the per-row log-sum-exps and the
/// targets' logits ([`Saved`]).
///
/// ```
/// use moerec::scoring::{self, Scoring};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// // One row, one head of width 1, three items shared by the heads: S = 2 * x.
/// let user = Tensor::from_vec(vec![2.0f32], &[1, 1, 1], &device)?;
/// let gates = Tensor::from_vec(vec![0.0f32], &[1, 1], &device)?;
/// let items = Tensor::from_vec(vec![1.0f32, 0.0, -1.0], &[3, 1], &device)?;
/// let inputs = Scoring::new(&user, &gates, &items);
/// let targets = Tensor::from_vec(vec![0u32], &[1], &device)?;
/// let (loss, _saved) = scoring::cross_entropy(&inputs, &targets, None)?;
/// let expected = (1.0f32 + (-2.0f32).exp() + (-4.0f32).exp()).ln(); // lse(S) - S[0]
/// assert!((loss.to_vec()?[0] - expected).abs() < 1e-6);
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn cross_entropy<'t, T: FloatElement>(
    inputs: &Scoring<'_, T>,
    targets: impl Into<TensorRef<'t, u32>>,
    ignore: Option<u32>,
) -> Result<(Tensor<f32>, Saved)> {
    let targets = targets.into();
    let (shape, device) = inputs.check()?;
    targets.expect_shape("targets", &[shape.batch])?;
    targets.expect_device("targets", &device)?;
    let per_row = cpu::lse_per_row(inputs.mixing, shape.heads);
    let lse_shape: Vec<usize> = match inputs.mixing {
        Mixing::Logits => vec![shape.batch],
        Mixing::Probabilities => vec![shape.batch, shape.heads],
    };
    debug_assert_eq!(lse_shape.iter().product::<usize>(), shape.batch * per_row);
    let mut loss = Tensor::zeros(&[shape.batch], &device)?;
    let mut lse = Tensor::zeros(&lse_shape, &device)?;
    let mut target_logits = Tensor::zeros(&lse_shape, &device)?;
    match &device {
        Device::Cpu => cpu::cross_entropy(
            inputs.host(shape)?,
            targets.host()?,
            ignore,
            loss.host_mut()?,
            RowTerms {
                lse: lse.host_mut()?,
                target_logits: target_logits.host_mut()?,
            },
        )?,
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let mut status = cuda_device.new_status(stream)?;
            cuda::cross_entropy(
                cuda_device,
                stream,
                &inputs.device(shape)?,
                &targets.cuda_view()?,
                ignore,
                &mut loss.device_slice_mut()?.as_view_mut(),
                RowTerms {
                    lse: &mut lse.device_slice_mut()?.as_view_mut(),
                    target_logits: &mut target_logits.device_slice_mut()?.as_view_mut(),
                },
                &mut status.as_view_mut(),
            )?;
            let sources = StatusSources {
                targets: Some(&targets),
                ..excluded_sources(inputs)
            };
            check_status(stream, &status, shape.num_items, sources)?;
        }
    }
    let saved = Saved {
        targets: targets.to_tensor()?,
        ignore,
        lse,
        target_logits,
        mixing: inputs.mixing,
        shape,
    };
    Ok((loss, saved))
}

/// Gradients of `sum_b dloss[b] * loss[b]` (`dloss: [B]` f32), recomputing
/// the scores; ignored rows and excluded items contribute exact zeros. The
/// operands must be those the forward was given.
///
/// ```
/// use moerec::scoring::{self, Scoring};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// // One row, one head of width 1, three items shared by the heads: S = 2 * x.
/// let user = Tensor::from_vec(vec![2.0f32], &[1, 1, 1], &device)?;
/// let gates = Tensor::from_vec(vec![0.0f32], &[1, 1], &device)?;
/// let items = Tensor::from_vec(vec![1.0f32, 0.0, -1.0], &[3, 1], &device)?;
/// let inputs = Scoring::new(&user, &gates, &items);
/// let targets = Tensor::from_vec(vec![0u32], &[1], &device)?;
/// let (_, saved) = scoring::cross_entropy(&inputs, &targets, None)?;
/// let dloss = Tensor::from_vec(vec![1.0f32], &[1], &device)?;
/// let grads = scoring::cross_entropy_backward(&inputs, &dloss, &saved)?;
/// // d item_bias = P - onehot(target): it sums to zero.
/// let d_bias = grads.item_bias.to_vec()?;
/// assert!(d_bias[0] < 0.0 && d_bias.iter().sum::<f32>().abs() < 1e-6);
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn cross_entropy_backward<'d, T: FloatElement>(
    inputs: &Scoring<'_, T>,
    dloss: impl Into<TensorRef<'d, f32>>,
    saved: &Saved,
) -> Result<Gradients> {
    let dloss = dloss.into();
    let (shape, device) = inputs.check()?;
    if shape != saved.shape || inputs.mixing != saved.mixing {
        return Err(Error::InvalidArgument {
            argument: "inputs",
            message: format!(
                "the backward needs the forward's operands: saved {:?} with {:?} mixing, got {shape:?} with {:?}",
                saved.shape, saved.mixing, inputs.mixing
            ),
        });
    }
    dloss.expect_shape("dloss", &[shape.batch])?;
    dloss.expect_device("dloss", &device)?;
    saved.lse.expect_device("saved", &device)?;
    saved.target_logits.expect_device("saved", &device)?;
    let mut grads = zeros_like_gradients(shape, &device)?;
    match &device {
        Device::Cpu => cpu::cross_entropy_backward(
            inputs.host(shape)?,
            saved.targets.host()?,
            saved.ignore,
            dloss.host()?,
            RowTerms {
                lse: saved.lse.host()?,
                target_logits: saved.target_logits.host()?,
            },
            gradients_mut(&mut grads)?,
        )?,
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let mut status = cuda_device.new_status(stream)?;
            cuda::cross_entropy_backward(
                cuda_device,
                stream,
                &inputs.device(shape)?,
                &saved.targets.device_slice()?.as_view(),
                saved.ignore,
                &dloss.cuda_view()?,
                RowTerms {
                    lse: &saved.lse.device_slice()?.as_view(),
                    target_logits: &saved.target_logits.device_slice()?.as_view(),
                },
                &mut device_gradients_mut(&mut grads)?,
                &mut status.as_view_mut(),
            )?;
            let targets = saved.targets.as_tensor_ref();
            let sources = StatusSources {
                targets: Some(&targets),
                ..excluded_sources(inputs)
            };
            check_status(stream, &status, shape.num_items, sources)?;
        }
    }
    Ok(grads)
}

/// Bytes the cross-entropy (forward or backward) allocates beyond its inputs
/// and outputs on the CPU: O(B * H * D) per-row constants, V bytes of
/// exclusion flags, and per worker thread a few score and item tiles (see
/// [`cpu::workspace_bytes`]).
///
/// ```
/// use moerec::scoring::{self, ScoringShape};
///
/// let shape = ScoringShape { batch: 256, heads: 4, width: 64, num_items: 1_000_000, shared: false };
/// // O(B * H * D + V), never B * V.
/// assert!(scoring::workspace_bytes(shape) < 256 * 1_000_000);
/// ```
pub fn workspace_bytes(shape: ScoringShape) -> usize {
    cpu::workspace_bytes(shape)
}

/// Like [`workspace_bytes`] for the cross-entropy on `device`: on a CUDA
/// device, the device memory the forward or the backward allocates beyond
/// inputs and outputs (per-row constants and the user operand, O(B * H * D);
/// item-chunk partials, whose count depends on the shapes only; one byte per
/// item for the exclusion flags). `InvalidArgument` for shapes the CUDA
/// kernels cannot take.
///
/// ```
/// use moerec::scoring::{self, Mixing, ScoringShape};
/// use moerec::Device;
///
/// let shape = ScoringShape { batch: 256, heads: 4, width: 64, num_items: 1_000_000, shared: false };
/// let bytes = scoring::workspace_bytes_on(&Device::cpu(), shape, Mixing::Probabilities)?;
/// assert_eq!(bytes, scoring::workspace_bytes(shape));
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn workspace_bytes_on(device: &Device, shape: ScoringShape, mixing: Mixing) -> Result<usize> {
    match device {
        Device::Cpu => Ok(workspace_bytes(shape)),
        Device::Cuda(_) => cuda::cross_entropy_workspace_bytes(shape, mixing),
    }
}

/// The checks of a top-n request no row can meet (n > V), made before any
/// `[B, n]` buffer is allocated: the CPU's checks (excluded ids, history,
/// eligible items) on host copies of the operands they read, so both
/// devices give the error the CPU gives for the same input. Ok only for an
/// empty batch.
fn check_unreachable_topk<T: FloatElement>(
    inputs: &Scoring<'_, T>,
    shape: ScoringShape,
    n: usize,
    history: Option<History<'_>>,
) -> Result<()> {
    let excluded = inputs
        .excluded
        .as_ref()
        .map(TensorRef::to_vec)
        .transpose()?
        .unwrap_or_default();
    let eligible = cpu::eligible_items(&excluded, shape.num_items)?;
    let history = history
        .map(|h| -> Result<(Vec<u32>, Vec<u32>)> { Ok((h.offsets.to_vec()?, h.ids.to_vec()?)) })
        .transpose()?;
    let history = history.as_ref().map(|(offsets, ids)| cpu::HistoryRef { offsets, ids });
    cpu::topk_rows(&eligible, n, history, shape.batch)?;
    Ok(())
}

fn cuda_topk<T: FloatElement>(
    device: &Arc<CudaDevice>,
    inputs: &Scoring<'_, T>,
    shape: ScoringShape,
    n: usize,
    history: Option<History<'_>>,
    ids: &mut Tensor<u32>,
    values: &mut Tensor<f32>,
) -> Result<()> {
    let stream = device.stream();
    let mut status = device.new_status(stream)?;
    let operands = inputs.device(shape)?;
    let sources = StatusSources {
        history: history.as_ref(),
        n,
        ..excluded_sources(inputs)
    };
    if n == 0 {
        // The CPU checks the excluded ids first.
        cuda::check_excluded(device, stream, &operands, &mut status.as_view_mut())?;
        check_status(stream, &status, shape.num_items, sources)?;
        return Err(Error::invalid("n", "expected n >= 1, got 0"));
    }
    let device_history = history
        .as_ref()
        .map(|h| -> Result<cuda::DeviceHistory<'_>> {
            Ok(cuda::DeviceHistory {
                offsets: h.offsets.cuda_view()?,
                ids: h.ids.cuda_view()?,
            })
        })
        .transpose()?;
    cuda::topk(
        device,
        stream,
        &operands,
        n,
        device_history.as_ref(),
        &mut ids.device_slice_mut()?.as_view_mut(),
        &mut values.device_slice_mut()?.as_view_mut(),
        &mut status.as_view_mut(),
    )?;
    check_status(stream, &status, shape.num_items, sources)
}

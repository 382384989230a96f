//! Top-k routing (DESIGN 4.2): scores, the k best experts per token, their
//! weights, the dispatch plan, the auxiliary losses, and the backward.
//!
//! Scores are a softmax over the active experts or the sigmoid of each. The
//! selection takes the k largest keys `float32(z) + selection_bias` (-0 read
//! as +0), ties to the lower expert, so indices and plan are the same integers
//! on every backend. Invalid tokens (token mask 0) get indices and
//! `row_of_slot` `u32::MAX`, weights 0, no rows, and stay out of every
//! statistic.
//!
//! Where the scores underflow f32 (sigmoids of logits below about -87;
//! softmax scores far below the row's best, for experts a selection bias
//! picks): plain weights are the scores themselves, subnormal or 0. Ratios of
//! scores — renormalised weights `p / sum of the selected p` and the
//! load-balance shares `p / sum of the active p` — are exact: each score is
//! taken relative to the largest logit of its set before the division. They
//! are continuous in the logits (a lone renormalised weight is 1 for every
//! finite logit; a valid token's selected scores never sum to 0), and the
//! backward, their exact derivative, is finite for finite logits.
//!
//! ```
//! use moerec::routing::{self, RoutingOptions, TopK};
//! use moerec::{Device, Tensor};
//!
//! let device = Device::auto()?;
//! // Three tokens, three experts.
//! let logits = Tensor::from_vec(
//!     vec![1.0f32, 2.0, 3.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY],
//!     &[3, 3],
//!     &device,
//! )?;
//! let (routing, saved) = routing::forward(&logits, &RoutingOptions::new(TopK::K(2)))?;
//! assert_eq!(routing.indices.to_vec()?, vec![2, 1, 0, 1, 1, 0]); // ties to the lower expert
//! assert_eq!(routing.plan.counts.to_vec()?, vec![2, 3, 1]);
//! assert_eq!(routing.plan.offsets.to_vec()?, vec![0, 2, 5, 6]);
//! assert_eq!(routing.plan.token_of_row.to_vec()?, vec![1, 2, 0, 1, 2, 0]);
//! assert_eq!(routing.plan.row_of_slot.to_vec()?, vec![5, 2, 0, 3, 4, 1]);
//!
//! let dweights = Tensor::from_vec(vec![1.0f32; 6], &[3, 2], &device)?;
//! let dlogits = routing::backward(&logits, &dweights, 0.01, 0.001, &saved)?;
//! assert_eq!(dlogits.shape(), &[3, 3]);
//! # Ok::<(), moerec::Error>(())
//! ```

pub mod cpu;
pub mod cuda;

use crate::cuda::{read_element, read_status};
use crate::device::Device;
use crate::dtype::{DType, Element, FloatElement};
use crate::error::{Error, Result};
use crate::tensor::{alloc_uninit, Tensor};
use crate::tensor_ref::{optional_cuda_view, TensorRef};
use cudarc::driver::CudaSlice;

/// How many experts each valid token is routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopK {
    /// k experts, `1 <= k <=` the number of active experts.
    K(usize),
    /// Every active expert (the dense router of FAME and XSMoE).
    All,
}

/// The score function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Score {
    /// Softmax over the active experts.
    #[default]
    Softmax,
    /// The sigmoid of each logit.
    Sigmoid,
}

/// The options of [`forward`]; the masks and the bias live on the logits'
/// device.
#[derive(Debug, Clone)]
pub struct RoutingOptions<'a> {
    /// Experts per valid token.
    pub k: TopK,
    /// The score function.
    pub score: Score,
    /// Divide the weights by the sum of the selected scores (computed as an
    /// exact ratio where the scores underflow, so the weights sum to 1).
    pub renormalize: bool,
    /// `[E]` u32, 1 = active, 0 = inactive (takes no mass, never selected).
    pub expert_mask: Option<TensorRef<'a, u32>>,
    /// `[T]` u32, 1 = valid, 0 = invalid (e.g. sequence padding).
    pub token_mask: Option<TensorRef<'a, u32>>,
    /// `[E]` f32, finite, added to the selection key only.
    pub selection_bias: Option<TensorRef<'a, f32>>,
    /// G, the expert groups: each token routes once within each group of
    /// `N = E / G` consecutive experts (see [`RoutingOptions::with_groups`]).
    pub groups: usize,
}

impl<'a> RoutingOptions<'a> {
    /// Softmax, no renormalisation, every expert active, every token valid,
    /// no bias.
    pub fn new(k: TopK) -> Self {
        RoutingOptions {
            k,
            score: Score::Softmax,
            renormalize: false,
            expert_mask: None,
            token_mask: None,
            selection_bias: None,
            groups: 1,
        }
    }

    /// Sets the score function.
    pub fn with_score(mut self, score: Score) -> Self {
        self.score = score;
        self
    }

    /// Divides the weights by the sum of the selected scores.
    pub fn with_renormalize(mut self, renormalize: bool) -> Self {
        self.renormalize = renormalize;
        self
    }

    /// Sets the expert mask `[E]` (1 = active), borrowed (`&tensor` or a
    /// [`TensorRef`]).
    pub fn with_expert_mask(mut self, expert_mask: impl Into<TensorRef<'a, u32>>) -> Self {
        self.expert_mask = Some(expert_mask.into());
        self
    }

    /// Sets the token mask `[T]` (1 = valid), borrowed.
    pub fn with_token_mask(mut self, token_mask: impl Into<TensorRef<'a, u32>>) -> Self {
        self.token_mask = Some(token_mask.into());
        self
    }

    /// Sets the selection bias `[E]` f32, added to the selection key only;
    /// borrowed.
    pub fn with_selection_bias(mut self, selection_bias: impl Into<TensorRef<'a, f32>>) -> Self {
        self.selection_bias = Some(selection_bias.into());
        self
    }

    /// Grouped routing (FAME: group = head): the E experts form G groups of
    /// `N = E / G` consecutive experts (expert `e` is in group `e / N`), and
    /// each token routes once within each group, as if each group were a
    /// router of its own — scores, selection, renormalisation, masks and bias
    /// restricted to the group; `k` counts experts per group (`TopK::All`:
    /// every active expert of the group, which needs the same number active
    /// in every group). One dispatch plan covers all E experts.
    ///
    /// Logits stay `[T, E]` (`[T, G, N]` row-major); the masks and the bias
    /// stay `[E]` and `[T]`. The routing rows are the (token, group) pairs
    /// `r = t * G + g`: `indices`, `weights`, `row_of_slot` and `dweights` are
    /// `[T * G, k]`, and `token_of_row` names routing rows, so the expert
    /// layer takes `x: [T * G, Din]` (the per-group inputs, `[T, G, Din]`)
    /// and combine gives `[T * G, Dout]`, one output per token and group.
    ///
    /// Statistics: `lb_loss` is the mean over the groups of each group's
    /// load-balance loss (`N'_g * sum over its experts of f_e * P_e`, with
    /// `f_e = counts_e / (T' k)`), so 1.0 when every group is balanced;
    /// `z_loss` is the mean of `lse^2` over the valid (token, group) rows,
    /// each over its group's active logits. `G = 1` is plain routing.
    ///
    /// ```
    /// use moerec::routing::{self, RoutingOptions, TopK};
    /// use moerec::{Device, Tensor};
    ///
    /// let device = Device::auto()?;
    /// // Two tokens, two heads of two experts each (a FAME router, k = all).
    /// let logits = Tensor::from_vec(vec![0.0f32, 1.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0], &[2, 4], &device)?;
    /// let options = RoutingOptions::new(TopK::All).with_groups(2);
    /// let (routing, saved) = routing::forward(&logits, &options)?;
    /// // Rows (token 0, head 0), (0, 1), (1, 0), (1, 1); experts 2 and 3 are head 1's.
    /// assert_eq!(routing.indices.shape(), &[4, 2]);
    /// assert_eq!(routing.indices.to_vec()?, vec![1, 0, 2, 3, 0, 1, 2, 3]);
    /// assert_eq!(routing.plan.token_of_row.to_vec()?, vec![0, 2, 0, 2, 1, 3, 1, 3]);
    /// let weights = routing.weights.to_vec()?;
    /// assert_eq!(&weights[2..4], &[0.5, 0.5]); // head 1 of token 0: a tie
    ///
    /// let dweights = Tensor::from_vec(vec![1.0f32; 8], &[4, 2], &device)?;
    /// let dlogits = routing::backward(&logits, &dweights, 0.01, 0.0, &saved)?;
    /// assert_eq!(dlogits.shape(), &[2, 4]);
    /// # Ok::<(), moerec::Error>(())
    /// ```
    pub fn with_groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }
}

/// The weights of the two auxiliary losses in the objective the backward
/// differentiates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossCoefficients {
    /// Of the load-balance loss.
    pub lb: f32,
    /// Of the z-loss.
    pub z: f32,
}

/// The sizes and resolved options of one routing call, for the backend
/// layer. Build it with [`RoutingConfig::new`] or
/// [`RoutingConfig::new_grouped`], which check them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingConfig {
    /// T, token rows.
    pub tokens: usize,
    /// E, experts (all groups).
    pub experts: usize,
    /// G, expert groups; each token routes once within each group.
    pub groups: usize,
    /// Experts per valid token and group (`TopK::All` resolved).
    pub k: usize,
    /// E', the experts the mask leaves active (all groups).
    pub active_experts: usize,
    /// The score function.
    pub score: Score,
    /// Whether the weights are divided by the sum of the selected scores.
    pub renormalize: bool,
}

impl RoutingConfig {
    /// Checks the sizes and the expert mask (length E, entries 0 or 1) and
    /// resolves k against the active experts; one group.
    pub fn new(
        tokens: usize,
        experts: usize,
        k: TopK,
        score: Score,
        renormalize: bool,
        expert_mask: Option<&[u32]>,
    ) -> Result<RoutingConfig> {
        Self::new_grouped(tokens, experts, 1, k, score, renormalize, expert_mask)
    }

    /// As [`RoutingConfig::new`], with the experts in `groups` groups of
    /// `E / groups` (see [`RoutingOptions::with_groups`]): `groups` must
    /// divide E, and k must fit the group with the fewest active experts.
    pub fn new_grouped(
        tokens: usize,
        experts: usize,
        groups: usize,
        k: TopK,
        score: Score,
        renormalize: bool,
        expert_mask: Option<&[u32]>,
    ) -> Result<RoutingConfig> {
        if experts == 0 || experts >= u32::MAX as usize {
            return Err(Error::invalid(
                "logits",
                format!("expected 1 <= E < 2^32 - 1 experts, got {experts}"),
            ));
        }
        if groups == 0 || experts % groups != 0 {
            return Err(Error::invalid(
                "groups",
                format!("expected a divisor of E = {experts} (the experts), got {groups}"),
            ));
        }
        let active = active_per_group(expert_mask, experts, groups)?;
        let (fewest_group, fewest) = active
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|&(_, count)| count)
            .unwrap_or((0, 0));
        let of_group = if groups == 1 {
            String::new()
        } else {
            format!(" of group {fewest_group}, the fewest")
        };
        let k = match k {
            TopK::All => match active.iter().position(|&count| count != active[0]) {
                Some(group) => {
                    return Err(Error::invalid(
                        "k",
                        format!(
                        "TopK::All needs as many active experts in every group: group 0 has {}, group {group} has {}",
                        active[0], active[group]
                    ),
                    ))
                }
                None => fewest,
            },
            TopK::K(k) => k,
        };
        if k == 0 || k > fewest {
            return Err(Error::invalid(
                "k",
                format!("expected 1..={fewest} (the active experts{of_group}), got {k}"),
            ));
        }
        let slots = tokens.checked_mul(groups).and_then(|rows| rows.checked_mul(k));
        if !slots.is_some_and(|slots| slots < u32::MAX as usize) {
            return Err(Error::invalid(
                "logits",
                format!("T * G * k = {tokens} * {groups} * {k} dispatched rows: must be < 2^32 - 1"),
            ));
        }
        if tokens.checked_mul(experts).is_none() {
            return Err(Error::invalid(
                "logits",
                format!("[{tokens}, {experts}] has more elements than usize holds"),
            ));
        }
        Ok(RoutingConfig {
            tokens,
            experts,
            groups,
            k,
            active_experts: active.iter().sum(),
            score,
            renormalize,
        })
    }

    /// N = E / G, the experts of one group.
    pub fn group_experts(&self) -> usize {
        self.experts / self.groups
    }

    /// T * G, the routing rows: (token, group) pairs, `r = t * G + g`.
    pub fn routing_rows(&self) -> usize {
        self.tokens * self.groups
    }

    /// T * G * k, the (routing row, slot) positions.
    pub fn slots(&self) -> usize {
        self.routing_rows() * self.k
    }
}

/// The active experts of each of `groups` groups, checking a mask of E
/// entries 0 or 1.
fn active_per_group(expert_mask: Option<&[u32]>, experts: usize, groups: usize) -> Result<Vec<usize>> {
    let group_experts = experts / groups;
    let Some(mask) = expert_mask else {
        return Ok(vec![group_experts; groups]);
    };
    if mask.len() != experts {
        return Err(Error::shape("expert_mask", format!("[{experts}]"), &[mask.len()]));
    }
    if let Some(position) = mask.iter().position(|&m| m > 1) {
        return Err(mask_value_error("expert_mask", position, mask[position]));
    }
    Ok(mask
        .chunks(group_experts)
        .map(|group| group.iter().filter(|&&m| m == 1).count())
        .collect())
}

fn mask_value_error(argument: &'static str, position: usize, value: u32) -> Error {
    Error::invalid(
        argument,
        format!("expected entries 0 or 1, got {value} at position {position}"),
    )
}

/// A bias must have E finite entries.
fn check_selection_bias(bias: Option<&[f32]>, experts: usize) -> Result<()> {
    let Some(bias) = bias else { return Ok(()) };
    if bias.len() != experts {
        return Err(Error::shape("selection_bias", format!("[{experts}]"), &[bias.len()]));
    }
    match bias.iter().position(|b| !b.is_finite()) {
        Some(position) => Err(Error::invalid(
            "selection_bias",
            format!("expected finite values, got {} at position {position}", bias[position]),
        )),
        None => Ok(()),
    }
}

/// The error for the lowest non-finite logit at flat position `position`.
fn non_finite(position: u64, experts: usize) -> Error {
    Error::NonFinite {
        argument: "logits",
        row: position / experts as u64,
        column: position % experts as u64,
    }
}

/// Where each (token, slot) goes, grouped by expert (DESIGN 4.2).
#[derive(Debug)]
pub struct DispatchPlan {
    /// `[E]`: rows per expert.
    pub counts: Tensor<u32>,
    /// `[E + 1]`: expert e's rows are `offsets[e]..offsets[e + 1]`.
    pub offsets: Tensor<u32>,
    /// `[R]`: the token of each row (with groups, the routing row
    /// `t * G + g`); rows grouped by expert, ascending token within an expert.
    pub token_of_row: Tensor<u32>,
    /// `[T, k]` (`[T * G, k]` with groups): the row of each (token, slot);
    /// `u32::MAX` for invalid tokens.
    pub row_of_slot: Tensor<u32>,
}

/// The forward's outputs in a backend's buffers (`Vec` on the host,
/// `CudaSlice` on a device); layouts as in [`Routing`].
#[derive(Debug)]
pub struct RoutingBuffers<U, F> {
    /// `[T, k]`: the selected experts.
    pub indices: U,
    /// `[T, k]`: their weights.
    pub weights: F,
    /// `[E]`: rows per expert.
    pub counts: U,
    /// `[E + 1]`: the experts' row ranges.
    pub offsets: U,
    /// The R dispatched rows (on CUDA, room for T * G * k until the op API
    /// trims it to R).
    pub token_of_row: U,
    /// `[T, k]`: the row of each (token, slot).
    pub row_of_slot: U,
    /// `[E]`: the weights routed to each expert, summed.
    pub gate_mass: F,
    /// One element.
    pub lb_loss: F,
    /// One element.
    pub z_loss: F,
    /// `[E + 1]`: what the backward scales the loss gradients by.
    pub grad_scales: F,
}

/// A backend buffer that becomes a tensor without a copy.
trait IntoTensor<T: Element> {
    fn into_tensor(self, shape: &[usize], device: &Device) -> Result<Tensor<T>>;
}

impl<T: Element> IntoTensor<T> for Vec<T> {
    fn into_tensor(self, shape: &[usize], device: &Device) -> Result<Tensor<T>> {
        Tensor::from_vec(self, shape, device)
    }
}

impl<T: Element> IntoTensor<T> for CudaSlice<T> {
    fn into_tensor(self, shape: &[usize], device: &Device) -> Result<Tensor<T>> {
        let cuda_device = device.as_cuda().ok_or_else(|| Error::DeviceMismatch {
            argument: "buffer",
            expected: "cuda".into(),
            actual: device.to_string(),
        })?;
        Tensor::from_cuda_slice(self, shape, cuda_device)
    }
}

/// The op API's outputs and the backward's gradient scales from a backend's
/// buffers; R = `rows`.
fn into_tensors<U: IntoTensor<u32>, F: IntoTensor<f32>>(
    buffers: RoutingBuffers<U, F>,
    config: &RoutingConfig,
    rows: usize,
    device: &Device,
) -> Result<(Routing, Tensor<f32>)> {
    let RoutingConfig { experts, k, .. } = *config;
    let tokens = config.routing_rows();
    let plan = DispatchPlan {
        counts: buffers.counts.into_tensor(&[experts], device)?,
        offsets: buffers.offsets.into_tensor(&[experts + 1], device)?,
        token_of_row: buffers.token_of_row.into_tensor(&[rows], device)?,
        row_of_slot: buffers.row_of_slot.into_tensor(&[tokens, k], device)?,
    };
    let routing = Routing {
        indices: buffers.indices.into_tensor(&[tokens, k], device)?,
        weights: buffers.weights.into_tensor(&[tokens, k], device)?,
        plan,
        lb_loss: buffers.lb_loss.into_tensor(&[1], device)?,
        z_loss: buffers.z_loss.into_tensor(&[1], device)?,
        gate_mass: buffers.gate_mass.into_tensor(&[experts], device)?,
    };
    Ok((routing, buffers.grad_scales.into_tensor(&[experts + 1], device)?))
}

/// The outputs of [`forward`].
#[derive(Debug)]
pub struct Routing {
    /// `[T, k]` u32 (`[T * G, k]` with groups, global expert indices): the
    /// selected experts, best key first.
    pub indices: Tensor<u32>,
    /// `[T, k]` f32 (`[T * G, k]` with groups): their scores, or with `renormalize` their scores over
    /// the sum of the selected scores (exact where the scores underflow; see
    /// the module doc).
    pub weights: Tensor<f32>,
    /// The dispatch plan the expert layer takes.
    pub plan: DispatchPlan,
    /// `[1]` f32: `E' * sum_e f_e * P_e` (with groups, its mean over the
    /// groups).
    pub lb_loss: Tensor<f32>,
    /// `[1]` f32: the mean over valid tokens (and groups) of `lse(z)^2`.
    pub z_loss: Tensor<f32>,
    /// `[E]` f32: the sum of the weights routed to each expert.
    pub gate_mass: Tensor<f32>,
}

/// What [`backward`] needs beyond the logits (passed again): the selection,
/// copies of the masks, and the loss gradients' per-expert scales.
#[derive(Debug)]
pub struct Saved {
    config: RoutingConfig,
    dtype: DType,
    indices: Tensor<u32>,
    expert_mask: Option<Tensor<u32>>,
    token_mask: Option<Tensor<u32>>,
    /// `[E + 1]`: `E' * f_e / T'` per expert (0 when inactive), then `1 / T'`.
    grad_scales: Tensor<f32>,
}

impl Saved {
    /// The resolved sizes and options of the forward.
    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }
}

/// Routes `logits: [T, E]` (f32, bf16 or f16; arithmetic in f32), within
/// each of `options.groups` expert groups ([`RoutingOptions::with_groups`]).
///
/// Errors: [`Error::ShapeMismatch`] / [`Error::DeviceMismatch`] for operands
/// that do not fit the logits; [`Error::InvalidArgument`] for a group count
/// that does not divide E, k outside `1..=E'` (the fewest active experts of a
/// group), `TopK::All` with groups of different active counts, mask entries
/// other than 0 and 1, or a non-finite bias (all checked before the logits);
/// [`Error::NonFinite`] with the lowest (row, column) for a NaN or +inf active
/// logit of a valid token, or a valid token whose active logits in a group
/// are all -inf (reported at the group's first active column). On CUDA the expert mask and the bias are read to the host first
/// when given, and the op waits once for the data checks; each row is staged
/// in shared memory, which bounds E there (about 11,000 experts on an H100;
/// beyond the device's limit, [`Error::InvalidArgument`]).
///
/// ```
/// use moerec::routing::{self, RoutingOptions, TopK};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// // Three tokens, four experts, top-2 with renormalised weights.
/// let logits = Tensor::from_vec(
///     vec![2.0f32, 1.0, 0.0, -1.0, 0.0, 0.0, 3.0, 0.0, 1.0, 1.0, 1.0, 1.0],
///     &[3, 4],
///     &device,
/// )?;
/// let options = RoutingOptions::new(TopK::K(2)).with_renormalize(true);
/// let (routed, _saved) = routing::forward(&logits, &options)?;
/// // Ties go to the lower expert.
/// assert_eq!(routed.indices.to_vec()?, vec![0, 1, 2, 0, 0, 1]);
/// let weights = routed.weights.to_vec()?;
/// assert!((weights[0] + weights[1] - 1.0).abs() < 1e-6);
/// assert_eq!(routed.plan.counts.to_vec()?, vec![3, 2, 1, 0]);
/// # Ok::<(), moerec::Error>(())
/// ```
/// The logits are owned (`&tensor`) or borrowed ([`TensorRef`]), never copied.
pub fn forward<'l, T: FloatElement>(
    logits: impl Into<TensorRef<'l, T>>,
    options: &RoutingOptions<'_>,
) -> Result<(Routing, Saved)> {
    let logits = logits.into();
    let (tokens, experts) = match *logits.shape() {
        [tokens, experts] if experts > 0 => (tokens, experts),
        _ => return Err(Error::shape("logits", "[T, E] with E >= 1", logits.shape())),
    };
    let device = logits.device();
    let (expert_mask, token_mask, selection_bias) = (
        options.expert_mask.as_ref(),
        options.token_mask.as_ref(),
        options.selection_bias.as_ref(),
    );
    if let Some(mask) = expert_mask {
        mask.expect_device("expert_mask", &device)?;
        mask.expect_shape("expert_mask", &[experts])?;
    }
    if let Some(mask) = token_mask {
        mask.expect_device("token_mask", &device)?;
        mask.expect_shape("token_mask", &[tokens])?;
    }
    if let Some(bias) = selection_bias {
        bias.expect_device("selection_bias", &device)?;
        bias.expect_shape("selection_bias", &[experts])?;
    }
    let host_expert_mask = expert_mask.map(TensorRef::to_vec).transpose()?;
    let config = RoutingConfig::new_grouped(
        tokens,
        experts,
        options.groups,
        options.k,
        options.score,
        options.renormalize,
        host_expert_mask.as_deref(),
    )?;
    check_selection_bias(selection_bias.map(TensorRef::to_vec).transpose()?.as_deref(), experts)?;

    let (routing, grad_scales) = match &device {
        Device::Cpu => {
            let out = cpu::forward(
                logits.host()?,
                expert_mask.map(TensorRef::host).transpose()?,
                token_mask.map(TensorRef::host).transpose()?,
                selection_bias.map(TensorRef::host).transpose()?,
                &config,
            )?;
            let rows = out.token_of_row.len();
            into_tensors(out, &config, rows, &device)?
        }
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let mut report = cuda::new_report(stream)?;
            let token_mask = optional_cuda_view(token_mask)?;
            let mut out = cuda::forward(
                cuda_device,
                stream,
                &logits.cuda_view()?,
                optional_cuda_view(expert_mask)?.as_ref(),
                token_mask.as_ref(),
                optional_cuda_view(selection_bias)?.as_ref(),
                &config,
                &mut report.as_view_mut(),
            )?;
            // The one synchronisation: the data checks and the number of rows.
            let report = cuda::read_report(stream, &report)?;
            if let (Some(position), Some(mask)) = (report.bad_token_mask, token_mask) {
                let value = read_element(stream, &mask, position)?;
                return Err(mask_value_error("token_mask", position as usize, value));
            }
            if let Some(position) = report.non_finite {
                return Err(non_finite(position, experts));
            }
            let rows = report.rows as usize;
            out.token_of_row = cuda::first_rows(stream, out.token_of_row, rows)?;
            into_tensors(out, &config, rows, &device)?
        }
    };
    let saved = Saved {
        config,
        dtype: T::DTYPE,
        indices: routing.indices.try_clone()?,
        expert_mask: expert_mask.map(TensorRef::to_tensor).transpose()?,
        token_mask: token_mask.map(TensorRef::to_tensor).transpose()?,
        grad_scales,
    };
    Ok((routing, saved))
}

/// `dZ [T, E]` f32: the exact gradient of
/// `sum(dweights * weights) + lb_coef * lb_loss + z_coef * z_loss` with
/// respect to the logits, the selection and the load fractions `f` held
/// fixed. `logits` are the forward's, passed again; `dweights` is `[T, k]`
/// (`[T * G, k]` with groups).
/// Inactive experts and invalid tokens get exact zeros. The logits are
/// checked again ([`Error::NonFinite`]); on CUDA the op waits once for that
/// check.
///
/// ```
/// use moerec::routing::{self, RoutingOptions, TopK};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// let logits = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 0.0, 2.0, 0.0], &[2, 3], &device)?;
/// let (_, saved) = routing::forward(&logits, &RoutingOptions::new(TopK::K(1)))?;
/// let dweights = Tensor::from_vec(vec![1.0f32; 2], &[2, 1], &device)?;
/// let dlogits = routing::backward(&logits, &dweights, 0.0, 0.0, &saved)?;
/// // The selected softmax probability's gradient sums to zero over a row.
/// let d = dlogits.to_vec()?;
/// assert!((d[0] + d[1] + d[2]).abs() < 1e-6 && d[0] > 0.0);
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn backward<'l, 'd, T: FloatElement>(
    logits: impl Into<TensorRef<'l, T>>,
    dweights: impl Into<TensorRef<'d, f32>>,
    lb_coef: f32,
    z_coef: f32,
    saved: &Saved,
) -> Result<Tensor<f32>> {
    let (logits, dweights) = (logits.into(), dweights.into());
    let config = &saved.config;
    if T::DTYPE != saved.dtype {
        return Err(Error::DtypeMismatch {
            argument: "logits",
            expected: saved.dtype,
            actual: T::DTYPE,
        });
    }
    let device = saved.indices.device();
    logits.expect_device("logits", &device)?;
    logits.expect_shape("logits", &[config.tokens, config.experts])?;
    dweights.expect_device("dweights", &device)?;
    dweights.expect_shape("dweights", &[config.routing_rows(), config.k])?;
    for (argument, coefficient) in [("lb_coef", lb_coef), ("z_coef", z_coef)] {
        if !coefficient.is_finite() {
            return Err(Error::invalid(
                argument,
                format!("expected a finite value, got {coefficient}"),
            ));
        }
    }
    let shape = [config.tokens, config.experts];
    let coefficients = LossCoefficients { lb: lb_coef, z: z_coef };
    match &device {
        Device::Cpu => {
            let dlogits = cpu::backward(
                logits.host()?,
                saved.expert_mask.as_ref().map(Tensor::host).transpose()?,
                saved.token_mask.as_ref().map(Tensor::host).transpose()?,
                saved.indices.host()?,
                dweights.host()?,
                saved.grad_scales.host()?,
                coefficients,
                config,
            )?;
            Tensor::from_vec(dlogits, &shape, &device)
        }
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let mut dlogits = alloc_uninit::<f32>(stream, config.tokens * config.experts)?;
            let mut status = cuda_device.new_status(stream)?;
            let (expert_mask, token_mask) = (
                saved.expert_mask.as_ref().map(Tensor::as_tensor_ref),
                saved.token_mask.as_ref().map(Tensor::as_tensor_ref),
            );
            cuda::backward(
                cuda_device,
                stream,
                &logits.cuda_view()?,
                optional_cuda_view(expert_mask.as_ref())?.as_ref(),
                optional_cuda_view(token_mask.as_ref())?.as_ref(),
                &saved.indices.device_slice()?.as_view(),
                &dweights.cuda_view()?,
                &saved.grad_scales.device_slice()?.as_view(),
                coefficients,
                config,
                &mut dlogits.as_view_mut(),
                &mut status.as_view_mut(),
            )?;
            if let Some(position) = read_status(stream, &status)? {
                return Err(non_finite(position, config.experts));
            }
            Tensor::from_cuda_slice(dlogits, &shape, cuda_device)
        }
    }
}

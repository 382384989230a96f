//! Grouped expert matmul (DESIGN 4.3): one expert layer over a dispatch plan,
//! its backward, and the combine of expert rows back into tokens.
//!
//! `h[r] = x[token_of_row[r]] @ W[e(r)] + b[e(r)]`, `y[r] = act(h[r])`, rows in
//! plan order ([`layer_forward`]; [`layer_forward_rows`] takes rows already in
//! plan order, e.g. the second layer of an FFN). [`combine`] mixes the rows
//! back: `out[t] = rho[t] * res[t] + sum_j weights[t, j] * y[row_of_slot[t, j]]`,
//! and measures each expert's utilisation `sum over its rows of
//! ||weights[t, j] * y[r]||_2`. Gradients are f32 and deterministic: dx sums a
//! token's rows in slot order, dW and db sum an expert's rows in plan order,
//! no float atomics.
//!
//! The plan is taken as given and checked against the operands: counts and
//! offsets consistent with each other and with R, `token_of_row < T`, and
//! (where the op reads it) every row named by exactly one slot of its own
//! token in `row_of_slot`, whose empty slots hold `u32::MAX` (their weights
//! are ignored and their dweights are 0).
//!
//! ```
//! use moerec::experts::{self, Activation};
//! use moerec::routing::{self, RoutingOptions, TopK};
//! use moerec::{Device, Tensor};
//!
//! let device = Device::auto()?;
//! // Four tokens of width 3, two experts of width 2, top-1 routing.
//! let logits = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0], &[4, 2], &device)?;
//! let (routed, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(1)))?;
//! let x = Tensor::from_vec((0..12).map(|v| v as f32).collect(), &[4, 3], &device)?;
//! let w = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0], &[2, 3, 2], &device)?;
//! let (y, saved) = experts::layer_forward(&x, &routed.plan, &w, None, Activation::Relu)?;
//! assert_eq!(y.shape(), &[4, 2]);
//! // Expert 0 has tokens 0 and 2 (columns 0, 1 of x), expert 1 tokens 1 and 3 (columns 1, 2).
//! assert_eq!(y.to_vec()?, vec![0.0, 1.0, 6.0, 7.0, 4.0, 5.0, 10.0, 11.0]);
//!
//! let ones = Tensor::from_vec(vec![1.0f32; 4], &[4, 1], &device)?;
//! let (out, util) = experts::combine(&y, &ones, &routed.plan, None, None)?;
//! assert_eq!(out.to_vec()?, vec![0.0, 1.0, 4.0, 5.0, 6.0, 7.0, 10.0, 11.0]);
//! assert_eq!(util.shape(), &[2]);
//!
//! let dy = Tensor::from_vec(vec![1.0f32; 8], &[4, 2], &device)?;
//! let grads = experts::layer_backward(&dy, &x, &routed.plan, &w, &saved)?;
//! assert_eq!(grads.dx.shape(), &[4, 3]);
//! assert_eq!(grads.dweights.shape(), &[2, 3, 2]);
//! # Ok::<(), moerec::Error>(())
//! ```

pub mod cpu;
pub mod cuda;
mod plan;

use crate::device::Device;
use crate::dtype::{Element, FloatElement};
use crate::error::{Error, Result};
use crate::ops::routing::DispatchPlan;
use crate::optional::{OptionalGrad, OptionalOperand};
use crate::tensor::{alloc_uninit, element_count, host_filled, host_uninit, Tensor};
use crate::tensor_ref::{optional_cuda_view, TensorRef};
pub use plan::PlanParts;
use plan::{await_plan_check, check_plan_shapes, device_plan, host_plan, u32_count};
pub(crate) use plan::{check_plan, index_slots};
use std::marker::PhantomData;

/// The activation of an expert layer. Gelu is exact, `x Phi(x)`; SwiGlu
/// splits h into halves `[gate, up]` and gives `silu(gate) * up`.
///
/// Non-finite values: at ±inf every activation takes its limit on both
/// backends (Relu, Gelu, Silu: `act(+inf) = +inf` with derivative 1,
/// `act(-inf) = 0` with derivative 0), where the formulas alone would give
/// `inf * 0 = NaN`; everything else follows IEEE arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    /// The identity: `y = h`.
    None,
    /// `max(h, 0)`.
    Relu,
    /// The exact GELU, `h * Phi(h)` (erf).
    Gelu,
    /// `h * sigmoid(h)`.
    Silu,
    /// Needs `W: [E, Din, 2 Dout]` (and a bias `[E, 2 Dout]`).
    SwiGlu,
}

impl Activation {
    /// The width of h, of W's last dim and of the bias for outputs of width
    /// `dout`: `2 dout` for SwiGlu, else `dout`.
    pub fn width(self, dout: usize) -> usize {
        match self {
            Activation::SwiGlu => 2 * dout,
            _ => dout,
        }
    }

    /// The code the kernels take (kRelu, ... in kernels/experts.cu).
    pub(crate) fn code(self) -> u32 {
        match self {
            Activation::None => 0,
            Activation::Relu => 1,
            Activation::Gelu => 2,
            Activation::Silu => 3,
            Activation::SwiGlu => 4,
        }
    }
}

/// Which rows a layer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `x: [T, Din]`, gathered through `token_of_row`.
    Tokens,
    /// `x_rows: [R, Din]`, already in plan order.
    Rows,
}

/// The sizes and options of one expert layer, for the backend layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    /// E.
    pub experts: usize,
    /// Din.
    pub din: usize,
    /// Dout, the width of y; h, W's last dim and the bias are
    /// [`LayerShape::width`] wide.
    pub dout: usize,
    /// The activation applied to `h`.
    pub activation: Activation,
    /// Whether the input is token-major (gathered) or already in plan order.
    pub variant: Variant,
    /// Rows of x: T for [`Variant::Tokens`], R for [`Variant::Rows`].
    pub inputs: usize,
    /// R, the dispatched rows.
    pub rows: usize,
}

impl LayerShape {
    /// Dout' (`2 Dout` for SwiGlu).
    pub fn width(&self) -> usize {
        self.activation.width(self.dout)
    }

    /// T when the layer gathers tokens (the bound of `token_of_row`).
    pub fn tokens(&self) -> Option<usize> {
        (self.variant == Variant::Tokens).then_some(self.inputs)
    }
}

/// The sizes of one combine, for the backend layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CombineShape {
    /// T.
    pub tokens: usize,
    /// Slots per token.
    pub k: usize,
    /// R.
    pub rows: usize,
    /// E.
    pub experts: usize,
    /// The width of y, res and out.
    pub dout: usize,
}

/// What [`layer_backward`] needs beyond what the caller passes again (x,
/// the plan, W): h, the pre-activation, in the input type. `DBias` is the
/// type of the bias gradient [`layer_backward`] returns: `Tensor<f32>` when
/// the forward was given a bias itself, `Option<Tensor<f32>>` when it was
/// given an `Option` ([`OptionalOperand`]).
#[derive(Debug)]
pub struct LayerSaved<T: Element, DBias = Option<Tensor<f32>>> {
    h: Tensor<T>,
    shape: LayerShape,
    has_bias: bool,
    dbias: PhantomData<fn() -> DBias>,
}

impl<T: Element, DBias> LayerSaved<T, DBias> {
    /// `[R, Dout']`: `x W + b` before the activation.
    pub fn h(&self) -> &Tensor<T> {
        &self.h
    }

    /// The sizes and options of the forward that saved this.
    pub fn shape(&self) -> &LayerShape {
        &self.shape
    }
}

/// What [`layer_forward`] and [`layer_forward_rows`] return: `y: [R, Dout]`
/// and what the backward needs.
pub type LayerOutput<T, DBias> = (Tensor<T>, LayerSaved<T, DBias>);

/// The gradients of one layer, f32. `DBias` follows how the forward was
/// given its bias ([`LayerSaved`]).
#[derive(Debug)]
pub struct LayerGrads<DBias = Option<Tensor<f32>>> {
    /// `[T, Din]` ([`layer_forward`]) or `[R, Din]` ([`layer_forward_rows`]).
    pub dx: Tensor<f32>,
    /// `[E, Din, Dout']`; exact zeros for an expert without rows.
    pub dweights: Tensor<f32>,
    /// `[E, Dout']`: a plain tensor when the forward was given the bias
    /// itself, an `Option` (`None` without a bias) when given an `Option`.
    pub dbias: DBias,
}

/// The gradients of [`combine`], f32. `DRes` and `DRho` follow how
/// [`combine_backward`] was given `res` and `rho` ([`OptionalOperand`]):
/// plain tensors for the operands themselves, `Option`s for `Option`s.
#[derive(Debug)]
pub struct CombineGrads<DRes = Option<Tensor<f32>>, DRho = Option<Tensor<f32>>> {
    /// `[R, Dout]`: `weights[t, j] * dout[t]` for the slot naming the row.
    pub dy: Tensor<f32>,
    /// `[T, k]`: `<dout[t], y[row_of_slot[t, j]]>`, 0 for empty slots.
    pub dweights: Tensor<f32>,
    /// `[T, Dout]`: `rho * dout` (`dout` without `rho`).
    pub dres: DRes,
    /// `[T]`: `<dout[t], res[t]>`.
    pub drho: DRho,
}

/// The layer's shape from its operands, every shape and device checked.
fn layer_shape<T: FloatElement>(
    variant: Variant,
    x: &TensorRef<'_, T>,
    plan: &DispatchPlan,
    weights: &TensorRef<'_, T>,
    activation: Activation,
) -> Result<LayerShape> {
    let (experts, din, width) = match *weights.shape() {
        [experts, din, width] if experts > 0 && din > 0 && width > 0 => (experts, din, width),
        _ => {
            return Err(Error::shape(
                "weights",
                "[E, Din, Dout'] with every size >= 1",
                weights.shape(),
            ))
        }
    };
    if activation == Activation::SwiGlu && width % 2 != 0 {
        return Err(Error::shape(
            "weights",
            "[E, Din, 2 * Dout] (SwiGlu: an even last dim)",
            weights.shape(),
        ));
    }
    let device = x.device();
    weights.expect_device("weights", &device)?;
    let (rows, _) = check_plan_shapes(plan, experts, &device, None)?;
    let inputs = match (variant, x.shape()) {
        (Variant::Tokens, &[tokens, d]) if d == din => u32_count("x", "T", tokens)?,
        (Variant::Tokens, actual) => return Err(Error::shape("x", format!("[T, {din}]"), actual)),
        (Variant::Rows, _) => {
            x.expect_shape("x_rows", &[rows, din])?;
            rows
        }
    };
    Ok(LayerShape {
        experts,
        din,
        dout: if activation == Activation::SwiGlu {
            width / 2
        } else {
            width
        },
        activation,
        variant,
        inputs,
        rows,
    })
}

/// One expert layer over `x: [T, Din]` (f32, bf16 or f16): returns
/// `y: [R, Dout]` in the input type, rows in plan order, and what the backward
/// needs. `weights` is `[E, Din, Dout']` (`Dout' = 2 Dout` for SwiGlu), `bias`
/// `[E, Dout']`.
///
/// Errors: [`Error::ShapeMismatch`] / [`Error::DeviceMismatch`] naming the
/// operand; for a plan inconsistent with itself or with R,
/// [`Error::InvalidArgument`] on `plan.offsets`, and
/// [`Error::IndexOutOfRange`] for the lowest `token_of_row` entry >= T. On
/// CUDA the op waits once, for the plan check.
///
/// ```
/// use moerec::experts::{self, Activation};
/// use moerec::routing::{self, RoutingOptions, TopK};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// // Token 0 goes to expert 0, token 1 to expert 1 (top-1); width 1.
/// let logits = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], &[2, 2], &device)?;
/// let (routed, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(1)))?;
/// // Expert 0 doubles, expert 1 negates.
/// let w = Tensor::from_vec(vec![2.0f32, -1.0], &[2, 1, 1], &device)?;
/// let x = Tensor::from_vec(vec![1.0f32, 2.0], &[2, 1], &device)?;
/// let (y, _saved) = experts::layer_forward(&x, &routed.plan, &w, None, Activation::None)?;
/// assert_eq!(y.to_vec()?, vec![2.0, -2.0]);
/// let (y, saved) = experts::layer_forward(&x, &routed.plan, &w, None, Activation::Relu)?;
/// assert_eq!((y.to_vec()?, saved.h().to_vec()?), (vec![2.0, 0.0], vec![2.0, -2.0]));
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn layer_forward<'x, 'w, 'b, T: FloatElement, B: OptionalOperand<'b, T>>(
    x: impl Into<TensorRef<'x, T>>,
    plan: &DispatchPlan,
    weights: impl Into<TensorRef<'w, T>>,
    bias: B,
    activation: Activation,
) -> Result<LayerOutput<T, B::Grad>> {
    let bias = bias.into_operand();
    forward_variant(
        Variant::Tokens,
        &x.into(),
        plan,
        &weights.into(),
        bias.as_ref(),
        activation,
    )
}

/// [`layer_forward`] on `x_rows: [R, Din]`, already in plan order (e.g. the
/// output of a first layer); `token_of_row` is not read.
///
/// ```
/// use moerec::experts::{self, Activation};
/// use moerec::routing::{self, RoutingOptions, TopK};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// // Token 0 goes to expert 0, token 1 to expert 1 (top-1); width 1.
/// let logits = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], &[2, 2], &device)?;
/// let (routed, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(1)))?;
/// // Expert 0 doubles, expert 1 negates.
/// let w = Tensor::from_vec(vec![2.0f32, -1.0], &[2, 1, 1], &device)?;
/// let x = Tensor::from_vec(vec![1.0f32, 2.0], &[2, 1], &device)?;
/// // Rows already in plan order (here: row 0 of expert 0, row 1 of expert 1).
/// let x_rows = Tensor::from_vec(vec![3.0f32, 4.0], &[2, 1], &device)?;
/// let (y, _) = experts::layer_forward_rows(&x_rows, &routed.plan, &w, None, Activation::None)?;
/// assert_eq!(y.to_vec()?, vec![6.0, -4.0]);
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn layer_forward_rows<'x, 'w, 'b, T: FloatElement, B: OptionalOperand<'b, T>>(
    x_rows: impl Into<TensorRef<'x, T>>,
    plan: &DispatchPlan,
    weights: impl Into<TensorRef<'w, T>>,
    bias: B,
    activation: Activation,
) -> Result<LayerOutput<T, B::Grad>> {
    let bias = bias.into_operand();
    forward_variant(
        Variant::Rows,
        &x_rows.into(),
        plan,
        &weights.into(),
        bias.as_ref(),
        activation,
    )
}

fn forward_variant<T: FloatElement, DBias>(
    variant: Variant,
    x: &TensorRef<'_, T>,
    plan: &DispatchPlan,
    weights: &TensorRef<'_, T>,
    bias: Option<&TensorRef<'_, T>>,
    activation: Activation,
) -> Result<LayerOutput<T, DBias>> {
    let shape = layer_shape(variant, x, plan, weights, activation)?;
    let device = x.device();
    if let Some(bias) = bias {
        bias.expect_device("bias", &device)?;
        bias.expect_shape("bias", &[shape.experts, shape.width()])?;
    }
    let (rows, width) = (shape.rows, shape.width());
    let (h_len, y_len) = (
        element_count("h", &[rows, width])?,
        element_count("y", &[rows, shape.dout])?,
    );
    let (h, y) = match &device {
        Device::Cpu => {
            let (mut h, mut y) = (host_uninit::<T>("h", h_len)?, host_uninit::<T>("y", y_len)?);
            cpu::layer_forward_uninit(
                x.host()?,
                &host_plan(plan)?,
                weights.host()?,
                bias.map(TensorRef::host).transpose()?,
                &shape,
                &mut h.spare_capacity_mut()[..h_len],
                &mut y.spare_capacity_mut()[..y_len],
            )?;
            // SAFETY: layer_forward_uninit returned Ok, so it wrote all
            // h_len and y_len elements (no zeroing pass first).
            unsafe {
                h.set_len(h_len);
                y.set_len(y_len);
            }
            (
                Tensor::from_vec(h, &[rows, width], &device)?,
                Tensor::from_vec(y, &[rows, shape.dout], &device)?,
            )
        }
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let mut h = alloc_uninit::<T>(stream, h_len)?;
            let mut y = alloc_uninit::<T>(stream, y_len)?;
            let mut status = cuda_device.new_status(stream)?;
            cuda::layer_forward(
                cuda_device,
                stream,
                &x.cuda_view()?,
                &device_plan(plan)?,
                &weights.cuda_view()?,
                optional_cuda_view(bias)?.as_ref(),
                &shape,
                &mut h.as_view_mut(),
                &mut y.as_view_mut(),
                &mut status.as_view_mut(),
            )?;
            await_plan_check(stream, &status, plan, rows, shape.tokens(), None)?;
            (
                Tensor::from_cuda_slice(h, &[rows, width], cuda_device)?,
                Tensor::from_cuda_slice(y, &[rows, shape.dout], cuda_device)?,
            )
        }
    };
    let saved = LayerSaved {
        h,
        shape,
        has_bias: bias.is_some(),
        dbias: PhantomData,
    };
    Ok((y, saved))
}

/// The layer's gradients from `dy: [R, Dout]` f32: `dh = dy * act'(h)` at the
/// saved h, then `dx` (summed over each token's rows in slot order; the
/// tokens variant reads `row_of_slot`), `dW[e] = x_e^T dh_e` and
/// `db[e] = sum dh_e` over the expert's rows in plan order. `x`, `plan` and
/// `weights` are the forward's, passed again.
///
/// Errors as [`layer_forward`], plus, for the tokens variant,
/// [`Error::IndexOutOfRange`] for a `row_of_slot` entry >= R and
/// [`Error::InvalidArgument`] for a row named by a slot of another token, by
/// two slots or by none.
///
/// ```
/// use moerec::experts::{self, Activation};
/// use moerec::routing::{self, RoutingOptions, TopK};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// // Token 0 goes to expert 0, token 1 to expert 1 (top-1); width 1.
/// let logits = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], &[2, 2], &device)?;
/// let (routed, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(1)))?;
/// // Expert 0 doubles, expert 1 negates.
/// let w = Tensor::from_vec(vec![2.0f32, -1.0], &[2, 1, 1], &device)?;
/// let x = Tensor::from_vec(vec![1.0f32, 2.0], &[2, 1], &device)?;
/// let (_, saved) = experts::layer_forward(&x, &routed.plan, &w, None, Activation::None)?;
/// let dy = Tensor::from_vec(vec![1.0f32, 1.0], &[2, 1], &device)?;
/// let grads = experts::layer_backward(&dy, &x, &routed.plan, &w, &saved)?;
/// assert_eq!(grads.dx.to_vec()?, vec![2.0, -1.0]); // dy W^T
/// assert_eq!(grads.dweights.to_vec()?, vec![1.0, 2.0]); // x^T dy per expert
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn layer_backward<'d, 'x, 'w, T: FloatElement, DBias: OptionalGrad>(
    dy: impl Into<TensorRef<'d, f32>>,
    x: impl Into<TensorRef<'x, T>>,
    plan: &DispatchPlan,
    weights: impl Into<TensorRef<'w, T>>,
    saved: &LayerSaved<T, DBias>,
) -> Result<LayerGrads<DBias>> {
    let (dy, x, weights) = (dy.into(), x.into(), weights.into());
    let (x, weights) = (&x, &weights);
    let shape = layer_shape(saved.shape.variant, x, plan, weights, saved.shape.activation)?;
    if shape != saved.shape {
        return Err(Error::invalid(
            "x",
            format!("the operands give {shape:?}, the forward had {:?}", saved.shape),
        ));
    }
    let device = x.device();
    saved.h.expect_device("saved.h", &device)?;
    dy.expect_device("dy", &device)?;
    dy.expect_shape("dy", &[shape.rows, shape.dout])?;
    let tokens = shape.tokens();
    let (_, k) = check_plan_shapes(plan, shape.experts, &device, tokens)?;
    let (dx_len, width) = (shape.inputs * shape.din, shape.width());
    let weight_len = shape.experts * shape.din * width;
    let bias_len = shape.experts * width;
    let (dx, dweights, dbias) = match &device {
        Device::Cpu => {
            let mut dx = host_filled("dx", 0f32, dx_len)?;
            let mut dweights = host_filled("dweights", 0f32, weight_len)?;
            let mut dbias = saved
                .has_bias
                .then(|| host_filled("dbias", 0f32, bias_len))
                .transpose()?;
            cpu::layer_backward(
                dy.host()?,
                x.host()?,
                &host_plan(plan)?,
                weights.host()?,
                saved.h.host()?,
                &shape,
                k,
                &mut dx,
                &mut dweights,
                dbias.as_deref_mut(),
            )?;
            (
                Tensor::from_vec(dx, &[shape.inputs, shape.din], &device)?,
                Tensor::from_vec(dweights, weights.shape(), &device)?,
                dbias
                    .map(|d| Tensor::from_vec(d, &[shape.experts, width], &device))
                    .transpose()?,
            )
        }
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let mut dx = alloc_uninit::<f32>(stream, dx_len)?;
            let mut dweights = alloc_uninit::<f32>(stream, weight_len)?;
            let mut dbias = saved
                .has_bias
                .then(|| alloc_uninit::<f32>(stream, bias_len))
                .transpose()?;
            let mut status = cuda_device.new_status(stream)?;
            cuda::layer_backward(
                cuda_device,
                stream,
                &dy.cuda_view()?,
                &x.cuda_view()?,
                &device_plan(plan)?,
                &weights.cuda_view()?,
                &saved.h.device_slice()?.as_view(),
                &shape,
                k,
                &mut dx.as_view_mut(),
                &mut dweights.as_view_mut(),
                dbias.as_mut().map(|d| d.as_view_mut()).as_mut(),
                &mut status.as_view_mut(),
            )?;
            await_plan_check(stream, &status, plan, shape.rows, tokens, tokens.map(|_| k))?;
            (
                Tensor::from_cuda_slice(dx, &[shape.inputs, shape.din], cuda_device)?,
                Tensor::from_cuda_slice(dweights, weights.shape(), cuda_device)?,
                dbias
                    .map(|d| Tensor::from_cuda_slice(d, &[shape.experts, width], cuda_device))
                    .transpose()?,
            )
        }
    };
    Ok(LayerGrads {
        dx,
        dweights,
        dbias: DBias::from_computed("bias", dbias)?,
    })
}

/// The combine's shape from its operands, every shape and device checked.
fn combine_shape<T: FloatElement>(
    y: &TensorRef<'_, T>,
    weights: &TensorRef<'_, f32>,
    plan: &DispatchPlan,
    res: Option<&TensorRef<'_, T>>,
    rho: Option<&TensorRef<'_, f32>>,
) -> Result<CombineShape> {
    let device = y.device();
    weights.expect_device("weights", &device)?;
    let tokens = match *weights.shape() {
        [tokens, k] if k >= 1 => u32_count("weights", "T", tokens)?,
        _ => return Err(Error::shape("weights", "[T, k] with k >= 1", weights.shape())),
    };
    let experts = match *plan.counts.shape() {
        [experts] if experts >= 1 => experts,
        _ => return Err(Error::shape("plan.counts", "[E] with E >= 1", plan.counts.shape())),
    };
    let (rows, k) = check_plan_shapes(plan, experts, &device, Some(tokens))?;
    weights.expect_shape("weights", &[tokens, k])?;
    let dout = match *y.shape() {
        [r, dout] if r == rows && dout >= 1 => dout,
        _ => return Err(Error::shape("y", format!("[{rows}, Dout >= 1]"), y.shape())),
    };
    if let Some(res) = res {
        res.expect_device("res", &device)?;
        res.expect_shape("res", &[tokens, dout])?;
    }
    if let Some(rho) = rho {
        rho.expect_device("rho", &device)?;
        rho.expect_shape("rho", &[tokens])?;
        if res.is_none() {
            return Err(Error::invalid("rho", "given without res (it scales res)"));
        }
    }
    Ok(CombineShape {
        tokens,
        k,
        rows,
        experts,
        dout,
    })
}

/// Mixes the expert rows `y: [R, Dout]` back into tokens:
/// `out[t] = rho[t] * res[t] + sum_j weights[t, j] * y[row_of_slot[t, j]]`
/// (slots in order; `rho` = 1 when absent, no first term without `res`), in
/// y's type, and `util [E]` f32: the sum over each expert's rows of
/// `||weights[t, j] * y[r]||_2`. `weights: [T, k]` f32, `res: [T, Dout]`,
/// `rho: [T]` f32 (only with `res`).
///
/// Errors: shapes and devices as [`layer_forward`]; `rho` without `res` is
/// [`Error::InvalidArgument`]; the plan is checked as in [`layer_backward`].
///
/// ```
/// use moerec::experts::{self, Activation};
/// use moerec::routing::{self, RoutingOptions, TopK};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// // Token 0 goes to expert 0, token 1 to expert 1 (top-1); width 1.
/// let logits = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], &[2, 2], &device)?;
/// let (routed, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(1)))?;
/// // Expert 0 doubles, expert 1 negates.
/// let w = Tensor::from_vec(vec![2.0f32, -1.0], &[2, 1, 1], &device)?;
/// let x = Tensor::from_vec(vec![1.0f32, 2.0], &[2, 1], &device)?;
/// let (y, _) = experts::layer_forward(&x, &routed.plan, &w, None, Activation::None)?;
/// let mix = Tensor::from_vec(vec![0.5f32, 2.0], &[2, 1], &device)?;
/// let (out, util) = experts::combine(&y, &mix, &routed.plan, None, None)?;
/// assert_eq!(out.to_vec()?, vec![1.0, -4.0]); // weight * y of each token's row
/// assert_eq!(util.to_vec()?, vec![1.0, 4.0]); // ||weight * y|| per expert
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn combine<'y, 'w, 'r, 'p, T: FloatElement>(
    y: impl Into<TensorRef<'y, T>>,
    weights: impl Into<TensorRef<'w, f32>>,
    plan: &DispatchPlan,
    res: impl OptionalOperand<'r, T>,
    rho: impl OptionalOperand<'p, f32>,
) -> Result<(Tensor<T>, Tensor<f32>)> {
    let (y, weights) = (y.into(), weights.into());
    let (y, weights) = (&y, &weights);
    let (res, rho) = (res.into_operand(), rho.into_operand());
    let (res, rho) = (res.as_ref(), rho.as_ref());
    let shape = combine_shape(y, weights, plan, res, rho)?;
    let device = y.device();
    let out_shape = [shape.tokens, shape.dout];
    let out_len = element_count("out", &out_shape)?;
    match &device {
        Device::Cpu => {
            let mut out = host_filled("out", T::default(), out_len)?;
            let mut util = host_filled("util", 0f32, shape.experts)?;
            cpu::combine(
                y.host()?,
                weights.host()?,
                &host_plan(plan)?,
                res.map(TensorRef::host).transpose()?,
                rho.map(TensorRef::host).transpose()?,
                &shape,
                &mut out,
                &mut util,
            )?;
            Ok((
                Tensor::from_vec(out, &out_shape, &device)?,
                Tensor::from_vec(util, &[shape.experts], &device)?,
            ))
        }
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let mut out = alloc_uninit::<T>(stream, out_len)?;
            let mut util = alloc_uninit::<f32>(stream, shape.experts)?;
            let mut status = cuda_device.new_status(stream)?;
            cuda::combine(
                cuda_device,
                stream,
                &y.cuda_view()?,
                &weights.cuda_view()?,
                &device_plan(plan)?,
                optional_cuda_view(res)?.as_ref(),
                optional_cuda_view(rho)?.as_ref(),
                &shape,
                &mut out.as_view_mut(),
                &mut util.as_view_mut(),
                &mut status.as_view_mut(),
            )?;
            await_plan_check(stream, &status, plan, shape.rows, Some(shape.tokens), Some(shape.k))?;
            Ok((
                Tensor::from_cuda_slice(out, &out_shape, cuda_device)?,
                Tensor::from_cuda_slice(util, &[shape.experts], cuda_device)?,
            ))
        }
    }
}

/// The gradients of [`combine`] from `dout: [T, Dout]` f32 (utilisation is a
/// statistic and carries none); the operands are the forward's, passed again.
///
/// ```
/// use moerec::experts::{self, Activation};
/// use moerec::routing::{self, RoutingOptions, TopK};
/// use moerec::{Device, Tensor};
///
/// let device = Device::cpu();
/// // Token 0 goes to expert 0, token 1 to expert 1 (top-1); width 1.
/// let logits = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], &[2, 2], &device)?;
/// let (routed, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(1)))?;
/// // Expert 0 doubles, expert 1 negates.
/// let w = Tensor::from_vec(vec![2.0f32, -1.0], &[2, 1, 1], &device)?;
/// let x = Tensor::from_vec(vec![1.0f32, 2.0], &[2, 1], &device)?;
/// let (y, _) = experts::layer_forward(&x, &routed.plan, &w, None, Activation::None)?;
/// let mix = Tensor::from_vec(vec![0.5f32, 2.0], &[2, 1], &device)?;
/// let dout = Tensor::from_vec(vec![1.0f32, 1.0], &[2, 1], &device)?;
/// let grads = experts::combine_backward(&dout, &y, &mix, &routed.plan, None, None)?;
/// assert_eq!(grads.dy.to_vec()?, vec![0.5, 2.0]); // weight * dout
/// assert_eq!(grads.dweights.to_vec()?, vec![2.0, -2.0]); // <dout, y>
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn combine_backward<'d, 'y, 'w, 'r, 'p, T: FloatElement, R: OptionalOperand<'r, T>, P: OptionalOperand<'p, f32>>(
    dout: impl Into<TensorRef<'d, f32>>,
    y: impl Into<TensorRef<'y, T>>,
    weights: impl Into<TensorRef<'w, f32>>,
    plan: &DispatchPlan,
    res: R,
    rho: P,
) -> Result<CombineGrads<R::Grad, P::Grad>> {
    let (dout, y, weights) = (dout.into(), y.into(), weights.into());
    let (y, weights) = (&y, &weights);
    let (res, rho) = (res.into_operand(), rho.into_operand());
    let (res, rho) = (res.as_ref(), rho.as_ref());
    let shape = combine_shape(y, weights, plan, res, rho)?;
    let device = y.device();
    dout.expect_device("dout", &device)?;
    dout.expect_shape("dout", &[shape.tokens, shape.dout])?;
    let token_len = shape.tokens * shape.dout;
    let (dy_shape, slot_shape) = ([shape.rows, shape.dout], [shape.tokens, shape.k]);
    let (dy_len, slot_len) = (element_count("dy", &dy_shape)?, element_count("dweights", &slot_shape)?);
    let (dy, dweights, dres, drho) = match &device {
        Device::Cpu => {
            let mut dy = host_filled("dy", 0f32, dy_len)?;
            let mut dweights = host_filled("dweights", 0f32, slot_len)?;
            let mut dres = res.map(|_| host_filled("dres", 0f32, token_len)).transpose()?;
            let mut drho = rho.map(|_| host_filled("drho", 0f32, shape.tokens)).transpose()?;
            cpu::combine_backward(
                dout.host()?,
                y.host()?,
                weights.host()?,
                &host_plan(plan)?,
                res.map(TensorRef::host).transpose()?,
                rho.map(TensorRef::host).transpose()?,
                &shape,
                &mut dy,
                &mut dweights,
                dres.as_deref_mut(),
                drho.as_deref_mut(),
            )?;
            (
                Tensor::from_vec(dy, &dy_shape, &device)?,
                Tensor::from_vec(dweights, &slot_shape, &device)?,
                dres.map(|d| Tensor::from_vec(d, &[shape.tokens, shape.dout], &device))
                    .transpose()?,
                drho.map(|d| Tensor::from_vec(d, &[shape.tokens], &device))
                    .transpose()?,
            )
        }
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let mut dy = alloc_uninit::<f32>(stream, dy_len)?;
            let mut dweights = alloc_uninit::<f32>(stream, slot_len)?;
            let mut dres = res.map(|_| alloc_uninit::<f32>(stream, token_len)).transpose()?;
            let mut drho = rho.map(|_| alloc_uninit::<f32>(stream, shape.tokens)).transpose()?;
            let mut status = cuda_device.new_status(stream)?;
            cuda::combine_backward(
                cuda_device,
                stream,
                &dout.cuda_view()?,
                &y.cuda_view()?,
                &weights.cuda_view()?,
                &device_plan(plan)?,
                optional_cuda_view(res)?.as_ref(),
                optional_cuda_view(rho)?.as_ref(),
                &shape,
                &mut dy.as_view_mut(),
                &mut dweights.as_view_mut(),
                dres.as_mut().map(|d| d.as_view_mut()).as_mut(),
                drho.as_mut().map(|d| d.as_view_mut()).as_mut(),
                &mut status.as_view_mut(),
            )?;
            await_plan_check(stream, &status, plan, shape.rows, Some(shape.tokens), Some(shape.k))?;
            (
                Tensor::from_cuda_slice(dy, &dy_shape, cuda_device)?,
                Tensor::from_cuda_slice(dweights, &slot_shape, cuda_device)?,
                dres.map(|d| Tensor::from_cuda_slice(d, &[shape.tokens, shape.dout], cuda_device))
                    .transpose()?,
                drho.map(|d| Tensor::from_cuda_slice(d, &[shape.tokens], cuda_device))
                    .transpose()?,
            )
        }
    };
    Ok(CombineGrads {
        dy,
        dweights,
        dres: R::Grad::from_computed("res", dres)?,
        drho: P::Grad::from_computed("rho", drho)?,
    })
}

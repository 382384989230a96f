//! Optional operands (a bias, a residual, a mask) borrowed like the required
//! ones, whose gradient type follows how they were passed: the operand
//! itself gives a plain gradient, an `Option` gives an `Option`, so a caller
//! that passed a bias never unwraps its gradient.

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::tensor_ref::TensorRef;

mod sealed {
    /// Only this crate's operand and gradient types implement the traits.
    pub trait Sealed {}
}

/// An optional operand of an op: the operand itself — `&Tensor`, a
/// [`TensorRef`] or `&TensorRef`, never copied — or an `Option<TensorRef>`:
/// `None` when absent, `option.map(Into::into)` for a choice made at run
/// time. Where the op differentiates by the operand, its gradient has type
/// [`OptionalOperand::Grad`]: `Tensor<f32>` for the operand itself,
/// `Option<Tensor<f32>>` for an `Option`.
///
/// ```
/// use moerec::experts::{self, Activation};
/// use moerec::routing::{self, RoutingOptions, TopK};
/// use moerec::{Device, Tensor, TensorRef};
///
/// let device = Device::cpu();
/// let logits = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], &[2, 2], &device)?;
/// let (routed, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(1)))?;
/// let w = Tensor::from_vec(vec![2.0f32, -1.0], &[2, 1, 1], &device)?;
/// let x = Tensor::from_vec(vec![1.0f32, 2.0], &[2, 1], &device)?;
/// let bias = Tensor::from_vec(vec![0.5f32, 0.5], &[2, 1], &device)?;
/// let dy = Tensor::from_vec(vec![1.0f32, 1.0], &[2, 1], &device)?;
///
/// // The bias itself: its gradient is a plain tensor.
/// let (_, saved) = experts::layer_forward(&x, &routed.plan, &w, &bias, Activation::None)?;
/// let grads = experts::layer_backward(&dy, &x, &routed.plan, &w, &saved)?;
/// assert_eq!(grads.dbias.to_vec()?, vec![1.0, 1.0]);
///
/// // A bias chosen at run time: an `Option`, `None` when it was absent.
/// let maybe: Option<&Tensor<f32>> = None;
/// let (_, saved) = experts::layer_forward(&x, &routed.plan, &w, maybe.map(TensorRef::from), Activation::None)?;
/// let grads = experts::layer_backward(&dy, &x, &routed.plan, &w, &saved)?;
/// assert!(grads.dbias.is_none());
/// # Ok::<(), moerec::Error>(())
/// ```
pub trait OptionalOperand<'a, T: Element>: sealed::Sealed {
    /// The type of the operand's gradient.
    type Grad: OptionalGrad;

    /// The borrowed operand, if one was given.
    fn into_operand(self) -> Option<TensorRef<'a, T>>;
}

/// The gradient of an [`OptionalOperand`]: `Tensor<f32>` (the operand was
/// given) or `Option<Tensor<f32>>` (it may not have been).
pub trait OptionalGrad: sealed::Sealed + Sized {
    /// The gradient an op computed for `argument`: `Some` exactly when the
    /// operand was given.
    fn from_computed(argument: &'static str, grad: Option<Tensor<f32>>) -> Result<Self>;
}

impl<T: Element> sealed::Sealed for &Tensor<T> {}
impl<T: Element> sealed::Sealed for TensorRef<'_, T> {}
impl<T: Element> sealed::Sealed for &TensorRef<'_, T> {}
impl<T: Element> sealed::Sealed for Option<TensorRef<'_, T>> {}
impl sealed::Sealed for Tensor<f32> {}
impl sealed::Sealed for Option<Tensor<f32>> {}

impl<'a, T: Element> OptionalOperand<'a, T> for &'a Tensor<T> {
    type Grad = Tensor<f32>;

    fn into_operand(self) -> Option<TensorRef<'a, T>> {
        Some(self.into())
    }
}

impl<'a, T: Element> OptionalOperand<'a, T> for TensorRef<'a, T> {
    type Grad = Tensor<f32>;

    fn into_operand(self) -> Option<TensorRef<'a, T>> {
        Some(self)
    }
}

impl<'a, T: Element> OptionalOperand<'a, T> for &TensorRef<'a, T> {
    type Grad = Tensor<f32>;

    fn into_operand(self) -> Option<TensorRef<'a, T>> {
        Some(self.clone())
    }
}

impl<'a, T: Element> OptionalOperand<'a, T> for Option<TensorRef<'a, T>> {
    type Grad = Option<Tensor<f32>>;

    fn into_operand(self) -> Option<TensorRef<'a, T>> {
        self
    }
}

impl OptionalGrad for Tensor<f32> {
    fn from_computed(argument: &'static str, grad: Option<Tensor<f32>>) -> Result<Self> {
        // The ops compute a gradient for every operand given, so this error
        // would be an internal mistake; it is still not a panic.
        grad.ok_or_else(|| Error::invalid(argument, "given, but the op computed no gradient for it"))
    }
}

impl OptionalGrad for Option<Tensor<f32>> {
    fn from_computed(_: &'static str, grad: Option<Tensor<f32>>) -> Result<Self> {
        Ok(grad)
    }
}

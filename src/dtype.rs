//! Element types: f32, bf16 and f16 for values, u32 for ids and indices.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use std::fmt;

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `f32`.
    F32,
    /// `half::bf16`.
    BF16,
    /// `half::f16`.
    F16,
    /// `u32` (ids, indices, plans).
    U32,
}

impl DType {
    /// The suffix of the kernel entry points instantiated for this type.
    pub fn kernel_suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U32 => "u32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_suffix())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
    impl Sealed for u32 {}
}

/// A type a [`Tensor`](crate::Tensor) can hold.
pub trait Element:
    sealed::Sealed
    + Copy
    + Default
    + fmt::Debug
    + PartialEq
    + Send
    + Sync
    + bytemuck::Pod
    + DeviceRepr
    + ValidAsZeroBits
    + 'static
{
    /// The [`DType`] tag of this element type.
    const DTYPE: DType;
}

/// A floating-point element; all arithmetic happens in f32.
pub trait FloatElement: Element {
    /// The value widened to f32 (exact for every element type).
    fn to_f32(self) -> f32;
    /// Rounds to nearest even.
    fn from_f32(value: f32) -> Self;
}

impl Element for u32 {
    const DTYPE: DType = DType::U32;
}

macro_rules! float_element {
    ($ty:ty, $dtype:expr, $to:expr, $from:expr) => {
        impl Element for $ty {
            const DTYPE: DType = $dtype;
        }
        impl FloatElement for $ty {
            #[inline]
            fn to_f32(self) -> f32 {
                $to(self)
            }
            #[inline]
            fn from_f32(value: f32) -> Self {
                $from(value)
            }
        }
    };
}

float_element!(f32, DType::F32, |x: f32| x, |x: f32| x);
float_element!(bf16, DType::BF16, bf16::to_f32, bf16::from_f32);
float_element!(f16, DType::F16, f16::to_f32, f16::from_f32);

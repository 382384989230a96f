//! The per-head multi-embedding lookup (DESIGN 4.1) as candle ops: a lookup
//! with a dense table gradient on the tape, and a fused sparse SGD update
//! for training loops that update the table themselves.

use super::autograd::{attach, Backward};
#[cfg(feature = "candle-cuda")]
use super::on_stream_of;
use super::{into_storage, to_candle, with_float, Borrowed, Shared};
use crate::dtype::FloatElement;
use crate::error::Error;
use crate::ops::embedding::{self, Saved, SparseGrad, TableShape};
use crate::tensor_ref::TensorMut;
use candle_core::backend::BackendStorage;
#[cfg(feature = "candle-cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};

/// Looks up `ids` (u32, any shape) in `table: [H, V, D]`: returns
/// `ids.dims() ++ [H, D]` in the table's type, a zero row for the `padding`
/// id (which may be >= V). On the tape, the table's gradient is dense
/// `[H, V, D]` (padding rows zero); tied uses of the same table (e.g. as
/// the scoring items) add up in candle's gradient store. Any other id >= V
/// is an error naming its position.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use moerec::candle::embedding;
///
/// let device = Device::Cpu;
/// let table = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (2, 10, 4), &device)?)?;
/// let ids = Tensor::new(&[[3u32, 0], [9, 3]], &device)?;
/// let rows = embedding(&table, &ids, Some(0))?;
/// assert_eq!(rows.dims(), &[2, 2, 2, 4]);
/// let grads = rows.sum_all()?.backward()?;
/// let d_table = grads.get(&table).expect("the table gets a gradient");
/// assert_eq!(d_table.dims(), &[2, 10, 4]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn embedding(table: &Tensor, ids: &Tensor, padding: Option<u32>) -> candle_core::Result<Tensor> {
    let table = table.contiguous()?;
    let ids = ids.contiguous()?;
    let dtype = table.dtype();
    let device = table.device().clone();
    let ((storage, shape), saved) = with_float!("table", dtype, T => {
        let (t, i) = (Borrowed::new("table", &table), Borrowed::new("ids", &ids));
        let (rows, saved) = embedding::forward(t.get::<T>()?, i.get::<u32>()?, padding)?;
        Ok::<_, candle_core::Error>((into_storage(rows, &device)?, saved))
    })?;
    let backward: Backward = Box::new(move |dy| {
        let dy = dy.contiguous()?.to_dtype(candle_core::DType::F32)?;
        let d = Borrowed::new("dy", &dy);
        let dense = embedding::backward(d.get::<f32>()?, &saved)?.densify()?;
        Ok(vec![Some(to_candle(dense, &device)?)])
    });
    attach("moerec-embedding", storage, shape, &[&table], backward)
}

/// The fused sparse SGD step of a lookup, in place and off the tape:
/// `table[h, n, :] -= lr * g[h, n, :]` for the ids' unique rows, where `g`
/// is the lookup's gradient from `dy: ids.dims() ++ [H, D]` (f32) — no
/// dense `[H, V, D]` gradient is formed. `table` is the variable's tensor
/// (contiguous), f32, bf16 or f16 (rounded to nearest even).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use moerec::candle::embedding_sgd;
///
/// let device = Device::Cpu;
/// let table = Var::from_tensor(&Tensor::ones((1, 4, 2), candle_core::DType::F32, &device)?)?;
/// let ids = Tensor::new(&[2u32, 2], &device)?;
/// let dy = Tensor::ones((2, 1, 2), candle_core::DType::F32, &device)?;
/// embedding_sgd(&table, &ids, &dy, None, 0.5)?;
/// // Row 2 was looked up twice: 1 - 0.5 * 2.
/// assert_eq!(table.as_tensor().to_vec3::<f32>()?[0][2], vec![0.0, 0.0]);
/// assert_eq!(table.as_tensor().to_vec3::<f32>()?[0][1], vec![1.0, 1.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn embedding_sgd(
    table: &Tensor,
    ids: &Tensor,
    dy: &Tensor,
    padding: Option<u32>,
    lr: f32,
) -> candle_core::Result<()> {
    if !table.is_contiguous() {
        return Err(Error::invalid("table", "expected a contiguous table (it is updated in place)").into());
    }
    let shape = TableShape::of(table.dims())?;
    let ids = ids.contiguous()?;
    let dy = dy.contiguous()?;
    let grad = {
        let (i, d) = (Borrowed::new("ids", &ids), Borrowed::new("dy", &dy));
        let saved = Saved::for_ids(&i.get::<u32>()?, padding, shape)?;
        embedding::backward(d.get::<f32>()?, &saved)?
    };
    table.inplace_op1(&SparseSgd { grad, lr })
}

/// The in-place half of [`embedding_sgd`]: the sparse gradient applied to
/// the table's storage.
struct SparseSgd {
    grad: SparseGrad,
    lr: f32,
}

impl SparseSgd {
    /// The table's elements in `layout`'s range of `len`, checked.
    fn region(layout: &Layout, len: usize) -> crate::Result<std::ops::Range<usize>> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::invalid("table", "expected a contiguous table"))?;
        if start > end || end > len {
            return Err(Error::invalid(
                "table",
                format!("layout {start}..{end} beyond {len} elements"),
            ));
        }
        Ok(start..end)
    }

    fn host<T: Shared + FloatElement>(&self, data: &mut [T], layout: &Layout) -> crate::Result<()> {
        let range = Self::region(layout, data.len())?;
        embedding::sgd(
            TensorMut::from_slice(&mut data[range], layout.dims())?,
            &self.grad,
            self.lr,
        )
    }

    #[cfg(feature = "candle-cuda")]
    fn device<T: Shared + FloatElement>(&self, storage: &mut CudaStorage, layout: &Layout) -> crate::Result<()> {
        let device = on_stream_of(&storage.device)?;
        let data = storage
            .as_cuda_slice_mut::<T>()
            .map_err(|e| Error::invalid("table", e.to_string()))?;
        let range = Self::region(layout, data.len())?;
        let view = data
            .try_slice_mut(range)
            .ok_or_else(|| Error::invalid("table", "layout beyond the storage"))?;
        embedding::sgd(
            TensorMut::from_cuda_view(view, layout.dims(), &device)?,
            &self.grad,
            self.lr,
        )
    }
}

impl InplaceOp1 for SparseSgd {
    fn name(&self) -> &'static str {
        "moerec-embedding-sgd"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        match storage {
            CpuStorage::F32(data) => self.host(data, layout),
            CpuStorage::BF16(data) => self.host(data, layout),
            CpuStorage::F16(data) => self.host(data, layout),
            other => Err(Error::invalid(
                "table",
                format!("expected f32, bf16 or f16, got {:?}", other.dtype()),
            )),
        }
        .map_err(candle_core::Error::from)
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        with_float!("table", storage.dtype(), T => Ok(self.device::<T>(storage, layout)?))
    }
}

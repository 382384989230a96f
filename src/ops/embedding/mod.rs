//! Per-head multi-embedding lookup (DESIGN 4.1).
//!
//! `Y[t, h, :] = W[h, ids[t], :]` for tables `W: [H, V, D]` (H decoupled
//! tables, or the per-head projections of one), a zero row for the padding
//! id. The backward returns the gradient sparse — the sorted unique ids and
//! their rows — with helpers to densify it and to apply SGD or row-wise
//! Adagrad to the table in place.
//!
//! ```
//! use moerec::{embedding, Device, Tensor};
//!
//! let device = Device::auto()?;
//! let table = Tensor::from_vec(vec![0.5f32; 2 * 10 * 4], &[2, 10, 4], &device)?;
//! let ids = Tensor::from_vec(vec![3u32, 0, 3, 9], &[4], &device)?;
//! let (rows, saved) = embedding::forward(&table, &ids, Some(0))?;
//! assert_eq!(rows.shape(), &[4, 2, 4]);
//!
//! let dy = Tensor::from_vec(vec![1.0f32; 4 * 2 * 4], &[4, 2, 4], &device)?;
//! let grad = embedding::backward(&dy, &saved)?;
//! assert_eq!(grad.rows().to_vec()?, vec![3, 9]); // the padding id 0 is left out
//! assert_eq!(grad.values().shape(), &[2, 2, 4]);
//! assert_eq!(grad.values().to_vec()?[0], 2.0); // id 3 appears twice
//!
//! let mut table = table;
//! embedding::sgd(&mut table, &grad, 0.1)?;
//! # Ok::<(), moerec::Error>(())
//! ```

pub mod cpu;
pub mod cuda;

use crate::cuda::{read_element, read_status, CudaDevice};
use crate::device::Device;
use crate::dtype::FloatElement;
use crate::error::{Error, Result};
use crate::tensor::{alloc_uninit, element_count, host_uninit, Tensor};
use crate::tensor_ref::{TensorMut, TensorRef};
use cudarc::driver::{CudaStream, CudaView};
use std::sync::Arc;

/// The sizes of a table `[H, V, D]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableShape {
    /// H, the number of tables (heads).
    pub heads: usize,
    /// V, the rows (items) of each table.
    pub num_rows: usize,
    /// D, the width of a row.
    pub width: usize,
}

impl TableShape {
    /// Elements in the table.
    pub fn table_len(&self) -> usize {
        self.heads * self.num_rows * self.width
    }

    pub(crate) fn of(table: &[usize]) -> Result<TableShape> {
        match *table {
            [heads, num_rows, width] if heads > 0 && num_rows > 0 && width > 0 => {
                if num_rows > u32::MAX as usize {
                    return Err(Error::invalid(
                        "table",
                        format!("{num_rows} rows: ids are u32, V must be < 2^32"),
                    ));
                }
                Ok(TableShape { heads, num_rows, width })
            }
            _ => Err(Error::shape("table", "[H, V, D] with every size >= 1", table)),
        }
    }
}

/// The error for a sparse row at `position` that is out of range or not
/// above the previous one; the same on both backends.
pub(crate) fn row_error(position: usize, row: u32, num_rows: usize) -> Error {
    if row as usize >= num_rows {
        Error::IndexOutOfRange {
            argument: "grad.rows",
            position: position as u64,
            index: u64::from(row),
            bound: num_rows as u64,
        }
    } else {
        Error::invalid(
            "grad.rows",
            format!("rows must be strictly ascending; row {row} at position {position} is not"),
        )
    }
}

/// The optimiser's rates, checked by both backends before any update: a
/// finite `lr` and, for Adagrad, a finite `eps > 0` (`eps = 0` turns an
/// all-zero gradient row into `lr / 0 * 0 = NaN`).
pub(crate) fn check_rates(lr: f32, eps: Option<f32>) -> Result<()> {
    if !lr.is_finite() {
        return Err(Error::invalid(
            "lr",
            format!("expected a finite learning rate, got {lr}"),
        ));
    }
    match eps {
        Some(eps) if !(eps.is_finite() && eps > 0.0) => {
            Err(Error::invalid("eps", format!("expected a finite eps > 0, got {eps}")))
        }
        _ => Ok(()),
    }
}

/// What [`backward`] needs from the forward beyond `dy`: the ids (a copy,
/// 4 bytes per token) and the sizes.
#[derive(Debug)]
pub struct Saved {
    ids: Tensor<u32>,
    padding: Option<u32>,
    shape: TableShape,
}

#[cfg(feature = "candle")]
impl Saved {
    /// What the backward needs for `ids` looked up in a table of `shape`
    /// (a copy of the ids), for updates that skip the forward.
    pub(crate) fn for_ids(ids: &TensorRef<'_, u32>, padding: Option<u32>, shape: TableShape) -> Result<Saved> {
        check_token_count(ids.len())?;
        Ok(Saved {
            ids: ids.to_tensor()?,
            padding,
            shape,
        })
    }
}

/// The gradient of a table, sparse: `rows [U]` are the sorted unique ids
/// (never the padding) and `values [H, U, D]` f32 their summed gradients.
#[derive(Debug)]
pub struct SparseGrad {
    rows: Tensor<u32>,
    values: Tensor<f32>,
    shape: TableShape,
}

impl SparseGrad {
    /// A sparse gradient for a table of `shape`; `rows` must be strictly
    /// ascending and below V (checked when it is applied).
    pub fn new(rows: Tensor<u32>, values: Tensor<f32>, shape: TableShape) -> Result<SparseGrad> {
        TableShape::of(&[shape.heads, shape.num_rows, shape.width])?;
        if rows.shape().len() != 1 {
            return Err(Error::shape("rows", "[U]", rows.shape()));
        }
        values.expect_shape("values", &[shape.heads, rows.len(), shape.width])?;
        values.expect_device("values", &rows.device())?;
        Ok(SparseGrad { rows, values, shape })
    }

    /// `[U]`: the sorted unique rows.
    pub fn rows(&self) -> &Tensor<u32> {
        &self.rows
    }

    /// `[H, U, D]`: their summed gradients.
    pub fn values(&self) -> &Tensor<f32> {
        &self.values
    }

    /// The shape of the table this gradient belongs to.
    pub fn shape(&self) -> TableShape {
        self.shape
    }

    /// Adds this gradient into a dense f32 gradient of the same table, in
    /// place: `dense[h, n, :] += g[h, n, :]` on the gradient's rows. This
    /// merges the two gradients of a tied table (the lookup's, sparse, and
    /// the scoring's `dX`, dense). `dense` is `[H, V, D]`, or `[V, D]` when
    /// H = 1 (a table shared by every head).
    ///
    /// ```
    /// use moerec::{embedding, Device, Tensor};
    ///
    /// let device = Device::cpu();
    /// let table = Tensor::from_vec(vec![0.0f32; 5 * 2], &[1, 5, 2], &device)?;
    /// let ids = Tensor::from_vec(vec![4u32, 1, 4], &[3], &device)?;
    /// let (_, saved) = embedding::forward(&table, &ids, None)?;
    /// let dy = Tensor::from_vec(vec![1.0f32; 3 * 2], &[3, 1, 2], &device)?;
    /// let sparse = embedding::backward(&dy, &saved)?;
    /// // The scoring's gradient of the same table, shared by all heads: [V, D].
    /// let mut d_items = Tensor::from_vec(vec![0.5f32; 5 * 2], &[5, 2], &device)?;
    /// sparse.add_to(&mut d_items)?;
    /// assert_eq!(d_items.to_vec()?, vec![0.5, 0.5, 1.5, 1.5, 0.5, 0.5, 0.5, 0.5, 2.5, 2.5]);
    /// # Ok::<(), moerec::Error>(())
    /// ```
    pub fn add_to<'d>(&self, dense: impl Into<TensorMut<'d, f32>>) -> Result<()> {
        let dense = dense.into();
        let s = self.shape;
        let table = [s.heads, s.num_rows, s.width];
        let dense = if s.heads == 1 && dense.shape() == [s.num_rows, s.width] {
            dense.reshape(&table)?
        } else {
            dense
        };
        // `W - (-1) * g` is `W + g` exactly in f32: the SGD update is the merge.
        sgd(dense, self, -1.0).map_err(|e| match e {
            Error::ShapeMismatch { expected, actual, .. } => Error::ShapeMismatch {
                argument: "dense",
                expected: format!("{expected} (or [V, D] when H = 1)"),
                actual,
            },
            Error::DeviceMismatch { expected, actual, .. } => Error::DeviceMismatch {
                argument: "dense",
                expected,
                actual,
            },
            other => other,
        })
    }

    /// The dense gradient `[H, V, D]` f32.
    pub fn densify(&self) -> Result<Tensor<f32>> {
        let device = self.rows.device();
        let mut dense = Tensor::<f32>::zeros(&[self.shape.heads, self.shape.num_rows, self.shape.width], &device)?;
        match &device {
            Device::Cpu => cpu::densify(self.rows.host()?, self.values.host()?, self.shape, dense.host_mut()?)?,
            Device::Cuda(cuda_device) => {
                let out = dense.device_slice_mut()?;
                self.apply_on_cuda::<f32>(
                    cuda_device,
                    cuda::Update::Densify {
                        dense: &mut out.as_view_mut(),
                    },
                )?
            }
        }
        Ok(dense)
    }

    fn apply_on_cuda<T: FloatElement>(&self, device: &Arc<CudaDevice>, update: cuda::Update<'_, '_, T>) -> Result<()> {
        let stream = device.stream();
        let mut status = device.new_status(stream)?;
        let rows = self.rows.device_slice()?;
        cuda::apply_sparse(
            device,
            stream,
            &rows.as_view(),
            &self.values.device_slice()?.as_view(),
            self.shape,
            update,
            &mut status.as_view_mut(),
        )?;
        match read_status(stream, &status)? {
            None => Ok(()),
            Some(position) => Err(row_error(
                position as usize,
                read_element(stream, &rows.as_view(), position)?,
                self.shape.num_rows,
            )),
        }
    }

    fn expect_table<T: FloatElement>(&self, table: &TensorMut<'_, T>) -> Result<()> {
        let s = self.shape;
        table.expect_shape("table", &[s.heads, s.num_rows, s.width])?;
        table.expect_device("table", &self.rows.device())
    }
}

fn id_error(stream: &Arc<CudaStream>, ids: &CudaView<'_, u32>, position: u64, num_rows: usize) -> Result<Error> {
    Ok(Error::IndexOutOfRange {
        argument: "ids",
        position,
        index: u64::from(read_element(stream, ids, position)?),
        bound: num_rows as u64,
    })
}

/// Looks up `ids` (any shape, T elements) in `table: [H, V, D]`: returns
/// `[T, H, D]` (`ids.shape() ++ [H, D]`) in the table's type, and what the
/// backward needs. A `padding` id (which may be >= V) yields zero rows; any
/// other id >= V is [`Error::IndexOutOfRange`] with the lowest position.
///
/// ```
/// use moerec::{embedding, Device, Error, Tensor};
///
/// let device = Device::cpu();
/// let table = Tensor::from_vec((0..12).map(|x| x as f32).collect(), &[2, 3, 2], &device)?;
/// let ids = Tensor::from_vec(vec![2u32, 7], &[2], &device)?;
/// // 7 is the padding id (>= V, only a sentinel): its rows are zeros.
/// let (rows, _saved) = embedding::forward(&table, &ids, Some(7))?;
/// assert_eq!(rows.to_vec()?, vec![4.0, 5.0, 10.0, 11.0, 0.0, 0.0, 0.0, 0.0]);
/// // Without padding 7 is out of range; errors print with Display.
/// let error = embedding::forward(&table, &ids, None).unwrap_err();
/// println!("{error}");
/// assert!(matches!(error, Error::IndexOutOfRange { position: 1, index: 7, bound: 3, .. }));
/// # Ok::<(), moerec::Error>(())
/// ```
/// Operands are owned (`&tensor`) or borrowed ([`TensorRef`]), never copied
/// (the saved ids are: 4 bytes per token).
pub fn forward<'t, 'i, T: FloatElement>(
    table: impl Into<TensorRef<'t, T>>,
    ids: impl Into<TensorRef<'i, u32>>,
    padding: Option<u32>,
) -> Result<(Tensor<T>, Saved)> {
    let (table, ids) = (table.into(), ids.into());
    let shape = TableShape::of(table.shape())?;
    let device = table.device();
    ids.expect_device("ids", &device)?;
    check_token_count(ids.len())?;
    let mut out_shape = ids.shape().to_vec();
    out_shape.extend([shape.heads, shape.width]);
    let out_len = element_count("ids", &out_shape)?;
    let out = match &device {
        Device::Cpu => {
            let mut out = host_uninit("ids", out_len)?;
            cpu::gather(
                table.host()?,
                ids.host()?,
                padding,
                shape,
                &mut out.spare_capacity_mut()[..out_len],
            )?;
            // SAFETY: gather wrote all out_len elements (it returned Ok).
            unsafe { out.set_len(out_len) };
            Tensor::from_vec(out, &out_shape, &device)?
        }
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let mut out = alloc_uninit::<T>(stream, out_len)?;
            let mut status = cuda_device.new_status(stream)?;
            let id_slice = ids.cuda_view()?;
            cuda::forward(
                cuda_device,
                stream,
                &table.cuda_view()?,
                &id_slice,
                padding,
                shape,
                &mut out.as_view_mut(),
                &mut status.as_view_mut(),
            )?;
            if let Some(position) = read_status(stream, &status)? {
                return Err(id_error(stream, &id_slice, position, shape.num_rows)?);
            }
            Tensor::from_cuda_slice(out, &out_shape, cuda_device)?
        }
    };
    let saved = Saved {
        ids: ids.to_tensor()?,
        padding,
        shape,
    };
    Ok((out, saved))
}

fn check_token_count(tokens: usize) -> Result<()> {
    if tokens >= u32::MAX as usize {
        return Err(Error::invalid(
            "ids",
            format!("{tokens} tokens: positions are u32, T must be < 2^32 - 1"),
        ));
    }
    Ok(())
}

/// The sparse table gradient from `dy: [T, H, D]` f32: each unique id's rows
/// summed over its tokens in ascending position (deterministic), the padding
/// left out.
///
/// ```
/// use moerec::{embedding, Device, Tensor};
///
/// let device = Device::cpu();
/// let table = Tensor::from_vec(vec![0.0f32; 8], &[1, 4, 2], &device)?;
/// let ids = Tensor::from_vec(vec![3u32, 1, 3], &[3], &device)?;
/// let (_, saved) = embedding::forward(&table, &ids, None)?;
/// let dy = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 1, 2], &device)?;
/// let grad = embedding::backward(&dy, &saved)?;
/// assert_eq!(grad.rows().to_vec()?, vec![1, 3]); // sorted unique ids
/// // Id 3's two tokens summed in ascending order.
/// assert_eq!(grad.values().to_vec()?, vec![3.0, 4.0, 6.0, 8.0]);
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn backward<'d>(dy: impl Into<TensorRef<'d, f32>>, saved: &Saved) -> Result<SparseGrad> {
    let dy = dy.into();
    let shape = saved.shape;
    let device = saved.ids.device();
    dy.expect_device("dy", &device)?;
    let tokens = saved.ids.len();
    if dy.len() != tokens * shape.heads * shape.width || dy.shape().last() != Some(&shape.width) {
        return Err(Error::shape(
            "dy",
            format!("[{tokens}, {}, {}]", shape.heads, shape.width),
            dy.shape(),
        ));
    }
    let (rows, values) = match &device {
        Device::Cpu => {
            let (rows, values) = cpu::backward(dy.host()?, saved.ids.host()?, saved.padding, shape)?;
            let unique = rows.len();
            (
                Tensor::from_vec(rows, &[unique], &device)?,
                Tensor::from_vec(values, &[shape.heads, unique, shape.width], &device)?,
            )
        }
        Device::Cuda(cuda_device) => {
            let stream = cuda_device.stream();
            let ids = saved.ids.device_slice()?;
            let mut status = cuda_device.new_status(stream)?;
            let groups = cuda::backward_group(
                cuda_device,
                stream,
                &ids.as_view(),
                saved.padding,
                shape,
                &mut status.as_view_mut(),
            )?;
            // The one synchronisation: the id check and the number of rows,
            // which sizes the output.
            if let Some(position) = read_status(stream, &status)? {
                return Err(id_error(stream, &ids.as_view(), position, shape.num_rows)?);
            }
            let unique = read_element(stream, &groups.count.as_view(), 0)? as usize;
            let mut rows = alloc_uninit::<u32>(stream, unique)?;
            if unique > 0 {
                stream
                    .memcpy_dtod(&groups.keys.slice(..unique), &mut rows)
                    .map_err(crate::cuda::driver_error("cuMemcpyDtoDAsync"))?;
            }
            let mut values = alloc_uninit::<f32>(stream, shape.heads * unique * shape.width)?;
            cuda::backward_values(
                cuda_device,
                stream,
                &dy.cuda_view()?,
                &groups,
                unique,
                shape,
                &mut values.as_view_mut(),
            )?;
            (
                Tensor::from_cuda_slice(rows, &[unique], cuda_device)?,
                Tensor::from_cuda_slice(values, &[shape.heads, unique, shape.width], cuda_device)?,
            )
        }
    };
    Ok(SparseGrad { rows, values, shape })
}

/// SGD on the gradient's rows, in place: `W[h, n, :] -= lr * g[h, n, :]`
/// (bf16/f16 round to nearest even). Other rows are untouched. A non-finite
/// `lr` is [`Error::InvalidArgument`].
///
/// ```
/// use moerec::{embedding, Device, Tensor};
///
/// let device = Device::cpu();
/// let mut table = Tensor::from_vec(vec![1.0f32; 4], &[1, 2, 2], &device)?;
/// let ids = Tensor::from_vec(vec![1u32], &[1], &device)?;
/// let (_, saved) = embedding::forward(&table, &ids, None)?;
/// let dy = Tensor::from_vec(vec![1.0f32, -1.0], &[1, 1, 2], &device)?;
/// let grad = embedding::backward(&dy, &saved)?;
/// embedding::sgd(&mut table, &grad, 0.5)?;
/// assert_eq!(table.to_vec()?, vec![1.0, 1.0, 0.5, 1.5]);
/// // A non-finite learning rate is refused before anything is written.
/// println!("{}", embedding::sgd(&mut table, &grad, f32::NAN).unwrap_err());
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn sgd<'t, T: FloatElement>(table: impl Into<TensorMut<'t, T>>, grad: &SparseGrad, lr: f32) -> Result<()> {
    let mut table = table.into();
    grad.expect_table(&table)?;
    match table.device() {
        Device::Cpu => cpu::sgd(
            table.host_mut()?,
            grad.rows.host()?,
            grad.values.host()?,
            grad.shape,
            lr,
        ),
        Device::Cuda(cuda_device) => {
            let mut slice = table.cuda_view_mut()?;
            grad.apply_on_cuda(&cuda_device, cuda::Update::Sgd { table: &mut slice, lr })
        }
    }
}

/// Row-wise Adagrad on the gradient's rows, in place, with `state: [H, V]`
/// f32: `A[h, n] += mean_d g^2`, then `W[h, n, :] -= lr * g / (sqrt(A[h, n]) + eps)`.
/// `lr` must be finite and `eps` finite and > 0, else
/// [`Error::InvalidArgument`] (checked before the rows, nothing is
/// written): with `eps = 0` a row whose gradient and state are zero would
/// become NaN.
///
/// ```
/// use moerec::{embedding, Device, Tensor};
///
/// let device = Device::cpu();
/// let mut table = Tensor::from_vec(vec![1.0f32; 4], &[1, 2, 2], &device)?;
/// let ids = Tensor::from_vec(vec![1u32], &[1], &device)?;
/// let (_, saved) = embedding::forward(&table, &ids, None)?;
/// let dy = Tensor::from_vec(vec![1.0f32, -1.0], &[1, 1, 2], &device)?;
/// let grad = embedding::backward(&dy, &saved)?;
/// let mut state = Tensor::zeros(&[1, 2], &device)?;
/// embedding::adagrad(&mut table, &mut state, &grad, 0.5, 1e-8)?;
/// // state[0, 1] = mean(1^2, (-1)^2); the step is 0.5 / (sqrt(1) + 1e-8).
/// assert_eq!(state.to_vec()?, vec![0.0, 1.0]);
/// let updated = table.to_vec()?;
/// assert!((updated[2] - 0.5).abs() < 1e-6 && (updated[3] - 1.5).abs() < 1e-6);
/// // eps = 0 would turn an all-zero row into NaN: refused.
/// println!("{}", embedding::adagrad(&mut table, &mut state, &grad, 0.5, 0.0).unwrap_err());
/// # Ok::<(), moerec::Error>(())
/// ```
pub fn adagrad<'t, 's, T: FloatElement>(
    table: impl Into<TensorMut<'t, T>>,
    state: impl Into<TensorMut<'s, f32>>,
    grad: &SparseGrad,
    lr: f32,
    eps: f32,
) -> Result<()> {
    let (mut table, mut state) = (table.into(), state.into());
    grad.expect_table(&table)?;
    state.expect_shape("state", &[grad.shape.heads, grad.shape.num_rows])?;
    state.expect_device("state", &table.device())?;
    match table.device() {
        Device::Cpu => cpu::adagrad(
            table.host_mut()?,
            state.host_mut()?,
            grad.rows.host()?,
            grad.values.host()?,
            grad.shape,
            lr,
            eps,
        ),
        Device::Cuda(cuda_device) => {
            let mut table_slice = table.cuda_view_mut()?;
            let mut state_slice = state.cuda_view_mut()?;
            grad.apply_on_cuda(
                &cuda_device,
                cuda::Update::Adagrad {
                    table: &mut table_slice,
                    state: &mut state_slice,
                    lr,
                    eps,
                },
            )
        }
    }
}

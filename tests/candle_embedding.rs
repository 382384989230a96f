//! `moerec::candle` lookup against the same function in plain candle ops
//! (float64, candle's own backward), and the fused sparse update against the
//! reference's dense gradient step.

mod candle_common;

use candle_common::{assert_close, assert_grads, candle_main, f64_var, values, var, TestResult};
use candle_core::{DType, Device, Tensor};
use moerec::candle::{embedding, embedding_sgd};

const HEADS: usize = 3;
const ROWS: usize = 9;
const WIDTH: usize = 5;
const PADDING: u32 = 0;

/// `[2, 4]` ids with repeats and the padding id.
fn ids(device: &Device) -> candle_core::Result<(Vec<u32>, Tensor)> {
    let ids = vec![3u32, 0, 8, 3, 1, 3, 0, 7];
    let tensor = Tensor::from_vec(ids.clone(), (2, 4), device)?;
    Ok((ids, tensor))
}

/// The lookup in plain candle ops: `[2, 4, H, D]`, padding rows zero.
fn reference(table: &Tensor, ids: &[u32]) -> candle_core::Result<Tensor> {
    let flat = Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu)?;
    let rows = table.index_select(&flat, 1)?.transpose(0, 1)?; // [T, H, D]
    let keep: Vec<f64> = ids.iter().map(|&i| f64::from(u8::from(i != PADDING))).collect();
    let keep = Tensor::from_vec(keep, (ids.len(), 1, 1), &Device::Cpu)?;
    rows.broadcast_mul(&keep)?.reshape((2, 4, HEADS, WIDTH))
}

fn lookup_forward_and_dense_gradient(device: &Device) -> TestResult {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let table = var(1, &[HEADS, ROWS, WIDTH], dtype, device)?;
        let theirs = f64_var(&table)?;
        let (id_values, ids) = ids(device)?;
        let rows = embedding(&table, &ids, Some(PADDING))?;
        let expected = reference(&theirs, &id_values)?;
        // A gather is exact: the tolerance of element-wise work.
        assert_close("rows", &rows, &expected, 1e-5)?;
        let w = Tensor::from_vec(values(2, 2 * 4 * HEADS * WIDTH), (2, 4, HEADS, WIDTH), &Device::Cpu)?;
        let grads = (rows.to_dtype(DType::F32)? * w.to_device(device)?)?
            .sum_all()?
            .backward()?;
        let reference_grads = (expected * w.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
        // The gradient comes back in the table's type.
        let rtol = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
        assert_grads(&grads, &reference_grads, &[("table", &table, &theirs)], rtol)?;
    }
    Ok(())
}

fn tied_table_gradients_add_up(device: &Device) -> TestResult {
    // The same table looked up and used densely: candle sums both gradients.
    let table = var(3, &[1, ROWS, WIDTH], DType::F32, device)?;
    let theirs = f64_var(&table)?;
    let (id_values, ids) = ids(device)?;
    let ours = (embedding(&table, &ids, Some(PADDING))?.sum_all()? + table.sqr()?.sum_all()?)?;
    let grads = ours.backward()?;
    let flat = Tensor::from_vec(id_values.clone(), id_values.len(), &Device::Cpu)?;
    let keep: Vec<f64> = id_values.iter().map(|&i| f64::from(u8::from(i != PADDING))).collect();
    let keep = Tensor::from_vec(keep, (id_values.len(), 1, 1), &Device::Cpu)?;
    let looked_up = theirs.index_select(&flat, 1)?.transpose(0, 1)?.broadcast_mul(&keep)?;
    let reference = (looked_up.sum_all()? + theirs.sqr()?.sum_all()?)?;
    assert_grads(&grads, &reference.backward()?, &[("table", &table, &theirs)], 1e-4)
}

fn fused_sparse_sgd_equals_the_dense_step(device: &Device) -> TestResult {
    let lr = 0.3;
    for dtype in [DType::F32, DType::BF16] {
        let table = var(4, &[HEADS, ROWS, WIDTH], dtype, device)?;
        let theirs = f64_var(&table)?;
        let (id_values, ids) = ids(device)?;
        let dy = Tensor::from_vec(values(5, 2 * 4 * HEADS * WIDTH), (2, 4, HEADS, WIDTH), &Device::Cpu)?;
        let reference_grad = (reference(&theirs, &id_values)? * dy.to_dtype(DType::F64)?)?
            .sum_all()?
            .backward()?;
        let d_table = candle_common::grad(&reference_grad, &theirs, "table")?;
        let expected = (theirs.as_tensor() - (d_table * lr)?)?;
        embedding_sgd(&table, &ids, &dy.to_device(device)?, Some(PADDING), lr as f32)?;
        let rtol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        assert_close("table", table.as_tensor(), &expected, rtol)?;
    }
    Ok(())
}

fn errors_name_the_argument(device: &Device) -> TestResult {
    let table = var(6, &[HEADS, ROWS, WIDTH], DType::F32, device)?;
    let bad = Tensor::new(&[1u32, 9], device)?;
    let error = embedding(&table, &bad, None).expect_err("id 9 of 9 rows").to_string();
    assert!(error.contains("ids") && error.contains('9'), "{error}");
    let flat = Tensor::zeros(ROWS * WIDTH, DType::F32, device)?;
    let error = embedding(&flat, &bad, None).expect_err("a flat table").to_string();
    assert!(error.contains("table"), "{error}");
    let dy = Tensor::zeros((3, HEADS, WIDTH), DType::F32, device)?;
    let error = embedding_sgd(&table, &bad, &dy, None, 0.1)
        .expect_err("dy for 3 ids, 2 given")
        .to_string();
    assert!(error.contains("dy") || error.contains("ids"), "{error}");
    Ok(())
}

candle_main!(
    lookup_forward_and_dense_gradient,
    tied_table_gradients_add_up,
    fused_sparse_sgd_equals_the_dense_step,
    errors_name_the_argument,
);

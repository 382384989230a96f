//! The lookup (DESIGN 4.1) against the NumPy golden files, CPU against CUDA,
//! determinism, and every error case. Each body runs on every device present.

mod common;

use common::{assert_close, for_each_golden, rtol, widen, Golden, Rng};
use half::{bf16, f16};
use moerec::embedding::{self, SparseGrad, TableShape};
use moerec::{Device, Error, FloatElement, Tensor};

fn padding_of(golden: &Golden) -> Option<u32> {
    match golden.meta("padding") {
        "none" => None,
        value => Some(value.parse().unwrap()),
    }
}

fn tensor<T: moerec::Element>(data: Vec<T>, shape: &[usize], device: &Device) -> Tensor<T> {
    Tensor::from_vec(data, shape, device).unwrap()
}

fn check_golden<T: FloatElement>(golden: &Golden, device: &Device) {
    let what = |part: &str| format!("{} on {device}: {part}", golden.name);
    let table_ref = golden.tensor("table");
    let table = tensor(table_ref.elements::<T>(), &table_ref.shape, device);
    let ids_ref = golden.tensor("ids");
    let ids = tensor(ids_ref.u32(), &ids_ref.shape, device);
    let padding = padding_of(golden);

    let (y, saved) = embedding::forward(&table, &ids, padding).unwrap();
    let y_ref = golden.tensor("y");
    assert_eq!(y.shape(), y_ref.shape.as_slice(), "{}", what("y shape"));
    // A gather is exact.
    assert_eq!(widen(&y.to_vec().unwrap()), y_ref.values, "{}", what("y"));

    let dy_ref = golden.tensor("dy");
    let dy = tensor(dy_ref.f32(), &dy_ref.shape, device);
    let grad = embedding::backward(&dy, &saved).unwrap();
    assert_eq!(
        grad.rows().to_vec().unwrap(),
        golden.tensor("grad_rows").u32(),
        "{}",
        what("grad rows")
    );
    let values_ref = golden.tensor("grad_values");
    assert_eq!(
        grad.values().shape(),
        values_ref.shape.as_slice(),
        "{}",
        what("grad values shape")
    );
    let values = widen(&grad.values().to_vec().unwrap());
    assert_close(&what("grad values"), &values, &values_ref.values, rtol::<f32>(true));

    let shape = grad.shape();
    let mut dense_ref = vec![0f64; shape.table_len()];
    let rows = golden.tensor("grad_rows").u32();
    for h in 0..shape.heads {
        for (u, &row) in rows.iter().enumerate() {
            for d in 0..shape.width {
                dense_ref[(h * shape.num_rows + row as usize) * shape.width + d] =
                    values_ref.values[(h * rows.len() + u) * shape.width + d];
            }
        }
    }
    let dense = grad.densify().unwrap();
    assert_close(
        &what("dense grad"),
        &widen(&dense.to_vec().unwrap()),
        &dense_ref,
        rtol::<f32>(true),
    );

    let lr: f32 = golden.meta("lr").parse().unwrap();
    let eps: f32 = golden.meta("eps").parse().unwrap();
    // The optimizer references start from the stored f32 gradient.
    let stored_grad = SparseGrad::new(
        tensor(rows.clone(), &[rows.len()], device),
        tensor(values_ref.f32(), &values_ref.shape, device),
        shape,
    )
    .unwrap();
    let mut sgd_table = table.try_clone().unwrap();
    embedding::sgd(&mut sgd_table, &stored_grad, lr).unwrap();
    assert_close(
        &what("sgd table"),
        &widen(&sgd_table.to_vec().unwrap()),
        &golden.tensor("sgd_table").values,
        rtol::<T>(false),
    );

    let state_ref = golden.tensor("adagrad_state");
    let mut state = tensor(state_ref.f32(), &state_ref.shape, device);
    let mut adagrad_table = table.try_clone().unwrap();
    embedding::adagrad(&mut adagrad_table, &mut state, &stored_grad, lr, eps).unwrap();
    assert_close(
        &what("adagrad state"),
        &widen(&state.to_vec().unwrap()),
        &golden.tensor("adagrad_state_out").values,
        rtol::<T>(true),
    );
    assert_close(
        &what("adagrad table"),
        &widen(&adagrad_table.to_vec().unwrap()),
        &golden.tensor("adagrad_table").values,
        rtol::<T>(true),
    );
}

fn matches_the_numpy_golden_files(device: &Device) {
    for_each_golden!("embedding", check_golden, device);
}

/// Ids for parity and determinism runs: a few values repeated many times, a
/// sprinkling of padding, or nothing but padding.
fn random_ids(rng: &mut Rng, tokens: usize, num_rows: u32, padding: Option<u32>, distinct: u32) -> Vec<u32> {
    let pool: Vec<u32> = (0..distinct).map(|_| rng.below(num_rows)).collect();
    (0..tokens)
        .map(|_| match padding {
            Some(p) if rng.below(6) == 0 => p,
            _ => pool[rng.below(distinct) as usize],
        })
        .collect()
}

struct Outputs {
    y: Vec<f64>,
    rows: Vec<u32>,
    values: Vec<f32>,
    adagrad_table: Vec<f64>,
    adagrad_state: Vec<f32>,
}

fn run_all<T: FloatElement>(
    device: &Device,
    table: &[T],
    shape: TableShape,
    ids: &[u32],
    padding: Option<u32>,
    dy: &[f32],
) -> Outputs {
    let table = tensor(table.to_vec(), &[shape.heads, shape.num_rows, shape.width], device);
    let ids = tensor(ids.to_vec(), &[ids.len()], device);
    let (y, saved) = embedding::forward(&table, &ids, padding).unwrap();
    let dy = tensor(dy.to_vec(), &[ids.len(), shape.heads, shape.width], device);
    let grad = embedding::backward(&dy, &saved).unwrap();
    let mut updated = table;
    let mut state = tensor(
        vec![0.25f32; shape.heads * shape.num_rows],
        &[shape.heads, shape.num_rows],
        device,
    );
    embedding::adagrad(&mut updated, &mut state, &grad, 0.05, 1e-8).unwrap();
    Outputs {
        y: widen(&y.to_vec().unwrap()),
        rows: grad.rows().to_vec().unwrap(),
        values: grad.values().to_vec().unwrap(),
        adagrad_table: widen(&updated.to_vec().unwrap()),
        adagrad_state: state.to_vec().unwrap(),
    }
}

fn parity_case<T: FloatElement>(
    cuda: &Device,
    heads: usize,
    num_rows: usize,
    width: usize,
    tokens: usize,
    padding: Option<u32>,
    distinct: u32,
) {
    let mut rng = Rng::new((heads * 1_000_003 + num_rows * 101 + width * 7 + tokens) as u64);
    let shape = TableShape { heads, num_rows, width };
    let table: Vec<T> = rng.floats(shape.table_len());
    let ids = random_ids(&mut rng, tokens, num_rows as u32, padding, distinct);
    let dy: Vec<f32> = rng.floats(tokens * heads * width);
    let cpu = run_all(&Device::cpu(), &table, shape, &ids, padding, &dy);
    let gpu = run_all(cuda, &table, shape, &ids, padding, &dy);
    let what = format!("{:?} H{heads} V{num_rows} D{width} T{tokens} pad {padding:?}", T::DTYPE);
    assert_eq!(cpu.y, gpu.y, "{what}: forward");
    assert_eq!(cpu.rows, gpu.rows, "{what}: rows");
    let widen32 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    assert_close(
        &format!("{what}: values"),
        &widen32(&gpu.values),
        &widen32(&cpu.values),
        1e-5,
    );
    assert_close(
        &format!("{what}: adagrad state"),
        &widen32(&gpu.adagrad_state),
        &widen32(&cpu.adagrad_state),
        1e-4,
    );
    assert_close(
        &format!("{what}: adagrad table"),
        &gpu.adagrad_table,
        &cpu.adagrad_table,
        rtol::<T>(true),
    );
}

fn cpu_and_cuda_agree_on_fresh_inputs(cuda: &Device) {
    for &(heads, num_rows, width, tokens, padding, distinct) in &[
        (1, 1000, 16, 5000, None, 900),
        (4, 5000, 33, 3000, Some(7), 50),
        (3, 77, 5, 10_000, Some(100), 3), // duplicate-heavy, padding >= V
        (8, 300, 64, 512, Some(u32::MAX), 1),
        (2, 2_000_000, 8, 4096, None, 4000), // three-digit grouping keys
        (1, 9, 1, 1, Some(3), 1),
    ] {
        parity_case::<f32>(cuda, heads, num_rows, width, tokens, padding, distinct);
        parity_case::<bf16>(cuda, heads, num_rows, width, tokens, padding, distinct);
        parity_case::<f16>(cuda, heads, num_rows, width, tokens, padding, distinct);
    }
}

fn an_all_padding_batch_gives_zero_rows_and_an_empty_gradient(device: &Device) {
    let table = tensor(vec![1.5f32; 2 * 4 * 3], &[2, 4, 3], device);
    let ids = tensor(vec![9u32; 5], &[5], device);
    let (y, saved) = embedding::forward(&table, &ids, Some(9)).unwrap();
    assert!(y.to_vec().unwrap().iter().all(|&v| v == 0.0), "{device}");
    let dy = tensor(vec![1.0f32; 5 * 2 * 3], &[5, 2, 3], device);
    let grad = embedding::backward(&dy, &saved).unwrap();
    assert!(grad.rows().is_empty(), "{device}");
    assert_eq!(grad.values().shape(), &[2, 0, 3]);
    assert!(grad.densify().unwrap().to_vec().unwrap().iter().all(|&v| v == 0.0));
}

fn an_empty_batch_gives_empty_outputs(device: &Device) {
    let table = tensor(vec![1.0f32; 6], &[1, 3, 2], device);
    let ids = tensor(Vec::<u32>::new(), &[0], device);
    let (y, saved) = embedding::forward(&table, &ids, None).unwrap();
    assert_eq!(y.shape(), &[0, 1, 2]);
    let dy = tensor(Vec::<f32>::new(), &[0, 1, 2], device);
    let grad = embedding::backward(&dy, &saved).unwrap();
    assert!(grad.rows().is_empty() && grad.values().is_empty());
}

fn outputs_are_bitwise_identical_across_runs_and_thread_counts(device: &Device) {
    let shape = TableShape {
        heads: 4,
        num_rows: 3000,
        width: 24,
    };
    let mut rng = Rng::new(42);
    let table: Vec<bf16> = rng.floats(shape.table_len());
    let ids = random_ids(&mut rng, 20_000, 3000, Some(0), 40);
    let dy: Vec<f32> = rng.floats(20_000 * 4 * 24);
    let first = run_all(device, &table, shape, &ids, Some(0), &dy);
    let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let second = single.install(|| run_all(device, &table, shape, &ids, Some(0), &dy));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(first.rows, second.rows, "{device}");
    assert_eq!(bits(&first.values), bits(&second.values), "{device}: values");
    assert_eq!(
        bits(&first.adagrad_state),
        bits(&second.adagrad_state),
        "{device}: state"
    );
    assert_eq!(first.adagrad_table, second.adagrad_table, "{device}: table");
}

/// Many sparse rows (several blocks of the CPU's parallel update, one table
/// and several) against a float64 reference built here from the ids: the
/// lookup, the backward, densify and SGD touch every row they should, once.
fn large_sparse_updates_match_a_dense_reference(device: &Device) {
    for (heads, num_rows, width, tokens) in [(1, 5000, 3, 4000), (3, 2000, 16, 6000)] {
        let shape = TableShape { heads, num_rows, width };
        let mut rng = Rng::new(7 + heads as u64);
        let table: Vec<f32> = rng.floats(shape.table_len());
        let ids: Vec<u32> = (0..tokens).map(|_| rng.below(num_rows as u32 + 1)).collect();
        // num_rows itself is the padding (a sentinel >= V).
        let padding = Some(num_rows as u32);
        let dy: Vec<f32> = rng.floats(tokens * heads * width);
        let mut dense = vec![0f64; shape.table_len()];
        let mut expected_y = vec![0f64; tokens * heads * width];
        for (t, &id) in ids.iter().enumerate() {
            if Some(id) == padding {
                continue;
            }
            for h in 0..heads {
                for d in 0..width {
                    let at = (h * num_rows + id as usize) * width + d;
                    dense[at] += f64::from(dy[(t * heads + h) * width + d]);
                    expected_y[(t * heads + h) * width + d] = f64::from(table[at]);
                }
            }
        }
        let lr = 0.5;
        let expected_table: Vec<f64> = table.iter().zip(&dense).map(|(&w, g)| f64::from(w) - lr * g).collect();
        let what = format!("{device} H{heads} V{num_rows} D{width} T{tokens}");

        let mut table_t = tensor(table, &[heads, num_rows, width], device);
        let (y, saved) = embedding::forward(&table_t, &tensor(ids, &[tokens], device), padding).unwrap();
        assert_eq!(widen(&y.to_vec().unwrap()), expected_y, "{what}: forward");
        let grad = embedding::backward(&tensor(dy, &[tokens, heads, width], device), &saved).unwrap();
        assert!(grad.rows().len() > 1000, "{what}: {} rows", grad.rows().len());
        let densified = widen(&grad.densify().unwrap().to_vec().unwrap());
        assert_close(&format!("{what}: densify"), &densified, &dense, 1e-4);
        embedding::sgd(&mut table_t, &grad, lr as f32).unwrap();
        assert_close(
            &format!("{what}: sgd"),
            &widen(&table_t.to_vec().unwrap()),
            &expected_table,
            1e-4,
        );
    }
}

fn an_out_of_range_id_names_the_lowest_position(device: &Device) {
    let table = tensor(vec![0f32; 2 * 5 * 4], &[2, 5, 4], device);
    let ids = tensor(vec![0u32, 7, 12, 3, 5], &[5], device);
    let error = embedding::forward(&table, &ids, None).unwrap_err();
    let expected = Error::IndexOutOfRange {
        argument: "ids",
        position: 1,
        index: 7,
        bound: 5,
    };
    assert_eq!(error, expected, "{device}");
    // With 7 as the padding, 12 at position 2 is the first bad id.
    let error = embedding::forward(&table, &ids, Some(7)).unwrap_err();
    assert_eq!(
        error,
        Error::IndexOutOfRange {
            argument: "ids",
            position: 2,
            index: 12,
            bound: 5
        },
        "{device}"
    );
    // Without a padding id, u32::MAX is an id like any other (the CUDA
    // kernels once took it for the padding).
    let max_id = tensor(vec![0u32, u32::MAX], &[2], device);
    let expected = Error::IndexOutOfRange {
        argument: "ids",
        position: 1,
        index: u64::from(u32::MAX),
        bound: 5,
    };
    assert_eq!(
        embedding::forward(&table, &max_id, None).unwrap_err(),
        expected,
        "{device}"
    );
}

fn the_backward_checks_ids_too(device: &Device) {
    let table = tensor(vec![0f32; 5 * 2], &[1, 5, 2], device);
    let good = tensor(vec![1u32, 2], &[2], device);
    let (_, saved) = embedding::forward(&table, &good, None).unwrap();
    let dy = tensor(vec![0f32; 3 * 2], &[3, 1, 2], device);
    assert!(
        matches!(
            embedding::backward(&dy, &saved),
            Err(Error::ShapeMismatch { argument: "dy", .. })
        ),
        "{device}"
    );
}

fn malformed_tables_are_shape_errors(device: &Device) {
    let ids = tensor(vec![0u32], &[1], device);
    let flat = tensor(vec![0f32; 6], &[2, 3], device);
    assert!(matches!(
        embedding::forward(&flat, &ids, None),
        Err(Error::ShapeMismatch { argument: "table", .. })
    ));
    let empty = tensor(Vec::<f32>::new(), &[2, 0, 3], device);
    assert!(matches!(
        embedding::forward(&empty, &ids, None),
        Err(Error::ShapeMismatch { argument: "table", .. })
    ));
}

fn bad_sparse_rows_are_refused_and_leave_the_table_untouched(device: &Device) {
    let shape = TableShape {
        heads: 1,
        num_rows: 4,
        width: 2,
    };
    let original = vec![1f32; 8];
    let mut table = tensor(original.clone(), &[1, 4, 2], device);
    let values = tensor(vec![1f32; 4], &[1, 2, 2], device);

    let descending = SparseGrad::new(tensor(vec![2u32, 1], &[2], device), values.try_clone().unwrap(), shape).unwrap();
    let error = embedding::sgd(&mut table, &descending, 0.1).unwrap_err();
    assert!(
        matches!(
            error,
            Error::InvalidArgument {
                argument: "grad.rows",
                ..
            }
        ),
        "{device}: {error}"
    );

    let outside = SparseGrad::new(tensor(vec![1u32, 4], &[2], device), values, shape).unwrap();
    let error = embedding::sgd(&mut table, &outside, 0.1).unwrap_err();
    assert_eq!(
        error,
        Error::IndexOutOfRange {
            argument: "grad.rows",
            position: 1,
            index: 4,
            bound: 4
        },
        "{device}"
    );
    let mut state = tensor(vec![0f32; 4], &[1, 4], device);
    assert!(embedding::adagrad(&mut table, &mut state, &outside, 0.1, 1e-8).is_err());
    assert!(outside.densify().is_err());
    assert_eq!(table.to_vec().unwrap(), original, "{device}: table changed on Err");
}

fn optimizer_operands_are_checked(device: &Device) {
    let shape = TableShape {
        heads: 2,
        num_rows: 3,
        width: 2,
    };
    let grad = SparseGrad::new(
        tensor(vec![1u32], &[1], device),
        tensor(vec![1f32; 4], &[2, 1, 2], device),
        shape,
    )
    .unwrap();
    let mut wrong_table = tensor(vec![0f32; 12], &[2, 2, 3], device);
    assert!(matches!(
        embedding::sgd(&mut wrong_table, &grad, 0.1),
        Err(Error::ShapeMismatch { argument: "table", .. })
    ));
    let mut table = tensor(vec![0f32; 12], &[2, 3, 2], device);
    let mut wrong_state = tensor(vec![0f32; 3], &[3], device);
    assert!(matches!(
        embedding::adagrad(&mut table, &mut wrong_state, &grad, 0.1, 1e-8),
        Err(Error::ShapeMismatch { argument: "state", .. })
    ));
    let wrong_values = SparseGrad::new(
        tensor(vec![1u32], &[1], device),
        tensor(vec![1f32; 2], &[1, 1, 2], device),
        shape,
    );
    assert!(matches!(
        wrong_values,
        Err(Error::ShapeMismatch { argument: "values", .. })
    ));
}

fn operands_on_different_devices_are_refused(cuda: &Device) {
    let table = tensor(vec![0f32; 4], &[1, 2, 2], &Device::cpu());
    let ids = tensor(vec![0u32], &[1], cuda);
    assert!(matches!(
        embedding::forward(&table, &ids, None),
        Err(Error::DeviceMismatch { argument: "ids", .. })
    ));
}

fn device_names_are_parsed_and_bad_ones_refused() {
    assert_eq!(Device::parse("cpu").unwrap(), Device::cpu());
    assert!(matches!(
        Device::parse("gpu"),
        Err(Error::InvalidArgument {
            argument: "MOEREC_DEVICE",
            ..
        })
    ));
    assert!(matches!(Device::parse("cuda:x"), Err(Error::InvalidArgument { .. })));
    // auto never panics, whatever this machine has.
    let _ = Device::auto();
    if Device::cuda(0).is_err() {
        assert!(
            Device::parse("cuda:0").is_err(),
            "cuda:0 must be an error when no GPU is usable"
        );
    }
}

fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Device>();
    send_sync::<Tensor<bf16>>();
    send_sync::<embedding::Saved>();
    send_sync::<SparseGrad>();
}

// Issue 14, item 3: eps = 0 turned an all-zero gradient row into NaN
// (`lr / (sqrt(0) + 0) * 0`). Rates that cannot give a finite update are
// refused before anything is written.
fn adagrad_and_sgd_refuse_rates_that_give_nan(device: &Device) {
    let shape = TableShape {
        heads: 1,
        num_rows: 2,
        width: 2,
    };
    let grad = || {
        SparseGrad::new(
            tensor(vec![0u32, 1], &[2], device),
            tensor(vec![0.0f32, 0.0, 0.5, 0.5], &[1, 2, 2], device),
            shape,
        )
        .unwrap()
    };
    let mut table = tensor(vec![1.0f32; 4], &[1, 2, 2], device);
    let mut state = tensor(vec![0.0f32; 2], &[1, 2], device);
    for (lr, eps, argument) in [
        (0.1, 0.0, "eps"),
        (0.1, -1e-8, "eps"),
        (0.1, f32::NAN, "eps"),
        (0.1, f32::INFINITY, "eps"),
        (f32::NAN, 1e-8, "lr"),
        (f32::INFINITY, 1e-8, "lr"),
    ] {
        let error = embedding::adagrad(&mut table, &mut state, &grad(), lr, eps).unwrap_err();
        assert!(
            matches!(error, Error::InvalidArgument { argument: a, .. } if a == argument),
            "{device:?} lr {lr} eps {eps}: {error}"
        );
    }
    for lr in [f32::NAN, f32::NEG_INFINITY] {
        let error = embedding::sgd(&mut table, &grad(), lr).unwrap_err();
        assert!(
            matches!(error, Error::InvalidArgument { argument: "lr", .. }),
            "{error}"
        );
    }
    assert_eq!(
        table.to_vec().unwrap(),
        vec![1.0; 4],
        "{device:?}: a refused update wrote"
    );
    assert_eq!(state.to_vec().unwrap(), vec![0.0; 2]);
    // The smallest valid eps keeps the zero row finite (and unchanged).
    embedding::adagrad(&mut table, &mut state, &grad(), 0.1, f32::MIN_POSITIVE).unwrap();
    let table = table.to_vec().unwrap();
    assert_eq!(&table[..2], &[1.0, 1.0], "{device:?}");
    assert!(table.iter().all(|v| v.is_finite()), "{device:?}: {table:?}");
}

common::harness::test_main! {
    devices: [
        outputs_are_bitwise_identical_across_runs_and_thread_counts,
        matches_the_numpy_golden_files,
        an_all_padding_batch_gives_zero_rows_and_an_empty_gradient,
        an_empty_batch_gives_empty_outputs,
        large_sparse_updates_match_a_dense_reference,
        an_out_of_range_id_names_the_lowest_position,
        the_backward_checks_ids_too,
        malformed_tables_are_shape_errors,
        bad_sparse_rows_are_refused_and_leave_the_table_untouched,
        optimizer_operands_are_checked,
        adagrad_and_sgd_refuse_rates_that_give_nan,
    ],
    cuda: [
        cpu_and_cuda_agree_on_fresh_inputs,
        operands_on_different_devices_are_refused,
    ],
    host: [
        device_names_are_parsed_and_bad_ones_refused,
        handles_are_send_and_sync,
    ],
}

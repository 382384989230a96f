//! Fused gated multi-head scoring (DESIGN 4.4) against the NumPy golden
//! files, and every error case.

mod common;

use common::{golden_cases, rtol, widen, Golden};
use half::{bf16, f16};
use moerec::scoring::{self, History, Mixing, Scoring};
use moerec::{Device, Error, FloatElement, Tensor};

/// DESIGN 3's tolerance, with infinities (excluded items' -inf) compared
/// exactly and left out of max|r|.
fn assert_close(what: &str, actual: &[f64], reference: &[f64], rtol: f64) {
    assert_eq!(actual.len(), reference.len(), "{what}: length");
    let scale = reference
        .iter()
        .filter(|r| r.is_finite())
        .fold(0f64, |m, r| m.max(r.abs()));
    for (i, (&a, &r)) in actual.iter().zip(reference).enumerate() {
        if r.is_infinite() {
            assert_eq!(a, r, "{what}[{i}]");
        } else {
            assert!(
                (a - r).abs() <= rtol * (r.abs() + scale),
                "{what}[{i}]: got {a}, expected {r} (max|r| {scale})"
            );
        }
    }
}

fn tensor<T: moerec::Element>(data: Vec<T>, shape: &[usize], device: &Device) -> Tensor<T> {
    Tensor::from_vec(data, shape, device).unwrap()
}

struct Operands<T: FloatElement> {
    user: Tensor<T>,
    gates: Tensor<T>,
    items: Tensor<T>,
    bias: Option<Tensor<f32>>,
    excluded: Option<Tensor<u32>>,
    scale: f32,
    mixing: Mixing,
}

impl<T: FloatElement> Operands<T> {
    fn from_golden(golden: &Golden, device: &Device) -> Self {
        let load = |name: &str| {
            let t = golden.tensor(name);
            tensor(t.elements::<T>(), &t.shape, device)
        };
        Operands {
            user: load("U"),
            gates: load("G"),
            items: load("X"),
            bias: golden
                .tensors
                .get("item_bias")
                .map(|t| tensor(t.f32(), &t.shape, device)),
            excluded: golden
                .tensors
                .get("excluded")
                .map(|t| tensor(t.u32(), &t.shape, device)),
            scale: golden.meta("scale").parse().unwrap(),
            mixing: match golden.meta("mixing") {
                "logits" => Mixing::Logits,
                "probabilities" => Mixing::Probabilities,
                other => panic!("unknown mixing {other}"),
            },
        }
    }

    fn inputs(&self) -> Scoring<'_, T> {
        let mut inputs = Scoring::new(&self.user, &self.gates, &self.items)
            .with_scale(self.scale)
            .with_mixing(self.mixing);
        if let Some(bias) = &self.bias {
            inputs = inputs.with_item_bias(bias);
        }
        if let Some(excluded) = &self.excluded {
            inputs = inputs.with_excluded(excluded);
        }
        inputs
    }
}

fn check_gradients(what: &str, golden: &Golden, prefix: &str, grads: &scoring::Gradients, rtol: f64) {
    for (name, tensor) in [
        ("dU", &grads.user),
        ("dG", &grads.gate_logits),
        ("dX", &grads.items),
        ("ditem_bias", &grads.item_bias),
    ] {
        let reference = golden.tensor(&format!("{prefix}_{name}"));
        assert_eq!(
            tensor.shape(),
            reference.shape.as_slice(),
            "{what}: {prefix} {name} shape"
        );
        assert_close(
            &format!("{what}: {prefix} {name}"),
            &widen(&tensor.to_vec().unwrap()),
            &reference.values,
            rtol,
        );
    }
}

fn check_golden<T: FloatElement>(golden: &Golden, device: &Device) {
    let what = format!("{} on {device}", golden.name);
    let operands = Operands::<T>::from_golden(golden, device);
    let inputs = operands.inputs();
    let tol = rtol::<T>(true);

    let scores = scoring::scores(&inputs).unwrap();
    assert_close(
        &format!("{what}: S"),
        &widen(&scores.to_vec().unwrap()),
        &golden.tensor("S").values,
        tol,
    );

    let ds = golden.tensor("dS");
    let grads = scoring::scores_backward(&inputs, &tensor(ds.f32(), &ds.shape, device)).unwrap();
    check_gradients(&what, golden, "scores", &grads, tol);

    let targets = golden.tensor("targets");
    let ignore = match golden.meta("ignore") {
        "none" => None,
        id => Some(id.parse().unwrap()),
    };
    let (loss, saved) =
        scoring::cross_entropy(&inputs, &tensor(targets.u32(), &targets.shape, device), ignore).unwrap();
    assert_close(
        &format!("{what}: loss"),
        &widen(&loss.to_vec().unwrap()),
        &golden.tensor("loss").values,
        tol,
    );
    assert_close(
        &format!("{what}: lse"),
        &widen(&saved.lse().to_vec().unwrap()),
        &golden.tensor("lse").values,
        tol,
    );
    let dloss = golden.tensor("dloss");
    let grads = scoring::cross_entropy_backward(&inputs, &tensor(dloss.f32(), &dloss.shape, device), &saved).unwrap();
    check_gradients(&what, golden, "ce", &grads, tol);

    let n: usize = golden.meta("n").parse().unwrap();
    let history = match (golden.tensors.get("history_offsets"), golden.tensors.get("history_ids")) {
        (Some(offsets), Some(ids)) => Some((
            tensor(offsets.u32(), &offsets.shape, device),
            tensor(ids.u32(), &ids.shape, device),
        )),
        _ => None,
    };
    let best = scoring::topk(
        &inputs,
        n,
        history.as_ref().map(|(offsets, ids)| History { offsets, ids }),
    )
    .unwrap();
    assert_eq!(
        best.ids.to_vec().unwrap(),
        golden.tensor("topk_ids").u32(),
        "{what}: topk ids"
    );
    assert_close(
        &format!("{what}: topk values"),
        &widen(&best.values.to_vec().unwrap()),
        &golden.tensor("topk_values").values,
        tol,
    );
}

#[test]
fn matches_the_numpy_golden_files() {
    let device = Device::cpu();
    for golden in &golden_cases("scoring") {
        match golden.meta("dtype") {
            "f32" => check_golden::<f32>(golden, &device),
            "bf16" => check_golden::<bf16>(golden, &device),
            "f16" => check_golden::<f16>(golden, &device),
            other => panic!("{}: unknown dtype {other}", golden.name),
        }
    }
}

/// B = 2, H = 2, D = 3, V = 5, per-head tables.
fn small(device: &Device) -> (Tensor<f32>, Tensor<f32>, Tensor<f32>) {
    (
        tensor((0..12).map(|i| i as f32 / 10.0).collect(), &[2, 2, 3], device),
        tensor(vec![0.0, 1.0, 2.0, -1.0], &[2, 2], device),
        tensor((0..30).map(|i| (i % 7) as f32 / 7.0).collect(), &[2, 5, 3], device),
    )
}

#[test]
fn target_errors_name_the_row() {
    let device = Device::cpu();
    let (user, gates, items) = small(&device);
    let excluded = tensor(vec![3u32], &[1], &device);
    let inputs = Scoring::new(&user, &gates, &items).with_excluded(&excluded);
    let out_of_range = tensor(vec![1u32, 9], &[2], &device);
    assert_eq!(
        scoring::cross_entropy(&inputs, &out_of_range, None).unwrap_err(),
        Error::IndexOutOfRange {
            argument: "targets",
            position: 1,
            index: 9,
            bound: 5
        }
    );
    // The ignore id is checked first and may be >= V.
    assert!(scoring::cross_entropy(&inputs, &out_of_range, Some(9)).is_ok());
    let excluded_target = tensor(vec![3u32, 0], &[2], &device);
    assert!(matches!(
        scoring::cross_entropy(&inputs, &excluded_target, None),
        Err(Error::InvalidArgument {
            argument: "targets",
            ..
        })
    ));
}

#[test]
fn ignored_rows_have_zero_loss_and_zero_gradients() {
    let device = Device::cpu();
    let (user, gates, items) = small(&device);
    for mixing in [Mixing::Logits, Mixing::Probabilities] {
        let inputs = Scoring::new(&user, &gates, &items).with_mixing(mixing);
        let targets = tensor(vec![7u32, 2], &[2], &device);
        let (loss, saved) = scoring::cross_entropy(&inputs, &targets, Some(7)).unwrap();
        assert_eq!(loss.to_vec().unwrap()[0], 0.0);
        let grads = scoring::cross_entropy_backward(&inputs, &tensor(vec![1.0, 1.0], &[2], &device), &saved).unwrap();
        assert!(grads.user.to_vec().unwrap()[..6].iter().all(|&g| g == 0.0));
        assert!(grads.gate_logits.to_vec().unwrap()[..2].iter().all(|&g| g == 0.0));
    }
}

#[test]
fn malformed_operands_are_shape_errors() {
    let device = Device::cpu();
    let (user, gates, items) = small(&device);
    let wrong_gates = tensor(vec![0f32; 3], &[3], &device);
    assert!(matches!(
        scoring::scores(&Scoring::new(&user, &wrong_gates, &items)),
        Err(Error::ShapeMismatch {
            argument: "gate_logits",
            ..
        })
    ));
    let wrong_items = tensor(vec![0f32; 20], &[5, 4], &device);
    assert!(matches!(
        scoring::scores(&Scoring::new(&user, &gates, &wrong_items)),
        Err(Error::ShapeMismatch { argument: "items", .. })
    ));
    let bias = tensor(vec![0f32; 4], &[4], &device);
    assert!(matches!(
        scoring::scores(&Scoring::new(&user, &gates, &items).with_item_bias(&bias)),
        Err(Error::ShapeMismatch {
            argument: "item_bias",
            ..
        })
    ));
    let excluded = tensor(vec![0u32, 5], &[2], &device);
    assert_eq!(
        scoring::scores(&Scoring::new(&user, &gates, &items).with_excluded(&excluded)).unwrap_err(),
        Error::IndexOutOfRange {
            argument: "excluded",
            position: 1,
            index: 5,
            bound: 5
        }
    );
    let inputs = Scoring::new(&user, &gates, &items);
    let dscores = tensor(vec![0f32; 8], &[2, 4], &device);
    assert!(matches!(
        scoring::scores_backward(&inputs, &dscores),
        Err(Error::ShapeMismatch {
            argument: "dscores",
            ..
        })
    ));
    let (_, saved) = scoring::cross_entropy(&inputs, &tensor(vec![0u32, 1], &[2], &device), None).unwrap();
    let other_mixing = inputs.with_mixing(Mixing::Probabilities);
    assert!(matches!(
        scoring::cross_entropy_backward(&other_mixing, &tensor(vec![1f32; 2], &[2], &device), &saved),
        Err(Error::InvalidArgument { argument: "inputs", .. })
    ));
}

#[test]
fn topk_refuses_rows_with_too_few_eligible_items() {
    let device = Device::cpu();
    let (user, gates, items) = small(&device);
    let excluded = tensor(vec![0u32, 0, 1], &[3], &device);
    let inputs = Scoring::new(&user, &gates, &items).with_excluded(&excluded);
    assert!(scoring::topk(&inputs, 3, None).is_ok());
    assert!(matches!(
        scoring::topk(&inputs, 4, None),
        Err(Error::InvalidArgument { argument: "n", .. })
    ));
    assert!(matches!(
        scoring::topk(&inputs, 0, None),
        Err(Error::InvalidArgument { argument: "n", .. })
    ));
    // Row 1's history takes two more items: 5 - 2 excluded - 2 seen < 2.
    let offsets = tensor(vec![0u32, 0, 2], &[3], &device);
    let ids = tensor(vec![2u32, 4], &[2], &device);
    let history = Some(History {
        offsets: &offsets,
        ids: &ids,
    });
    assert!(matches!(
        scoring::topk(&inputs, 2, history),
        Err(Error::InvalidArgument { argument: "n", .. })
    ));
    let best = scoring::topk(&inputs, 1, history).unwrap();
    assert_eq!(best.ids.to_vec().unwrap()[1], 3, "row 1 can only pick item 3");
}

#[test]
fn malformed_histories_are_refused() {
    let device = Device::cpu();
    let (user, gates, items) = small(&device);
    let inputs = Scoring::new(&user, &gates, &items);
    let ids = tensor(vec![2u32, 9], &[2], &device);
    let decreasing = tensor(vec![0u32, 2, 1], &[3], &device);
    assert!(matches!(
        scoring::topk(
            &inputs,
            1,
            Some(History {
                offsets: &decreasing,
                ids: &ids
            })
        ),
        Err(Error::InvalidArgument {
            argument: "history.offsets",
            ..
        })
    ));
    let offsets = tensor(vec![0u32, 1, 2], &[3], &device);
    assert_eq!(
        scoring::topk(
            &inputs,
            1,
            Some(History {
                offsets: &offsets,
                ids: &ids
            })
        )
        .unwrap_err(),
        Error::IndexOutOfRange {
            argument: "history.ids",
            position: 1,
            index: 9,
            bound: 5
        }
    );
}

#[test]
fn an_empty_batch_gives_empty_outputs_and_zero_gradients() {
    let device = Device::cpu();
    let user = tensor(Vec::<f32>::new(), &[0, 2, 3], &device);
    let gates = tensor(Vec::<f32>::new(), &[0, 2], &device);
    let items = tensor(vec![0.5f32; 4 * 3], &[4, 3], &device);
    let inputs = Scoring::new(&user, &gates, &items);
    assert_eq!(scoring::scores(&inputs).unwrap().shape(), &[0, 4]);
    let (loss, saved) = scoring::cross_entropy(&inputs, &tensor(Vec::new(), &[0], &device), None).unwrap();
    assert!(loss.is_empty());
    let grads = scoring::cross_entropy_backward(&inputs, &tensor(Vec::new(), &[0], &device), &saved).unwrap();
    assert!(grads.items.to_vec().unwrap().iter().all(|&g| g == 0.0));
    assert_eq!(scoring::topk(&inputs, 2, None).unwrap().ids.shape(), &[0, 2]);
}

#[test]
fn cuda_operands_get_a_clear_error_until_the_kernels_land() {
    let Some(cuda) = common::cuda_device() else { return };
    let (user, gates, items) = small(&cuda);
    assert!(matches!(
        scoring::scores(&Scoring::new(&user, &gates, &items)),
        Err(Error::InvalidArgument { argument: "device", .. })
    ));
}

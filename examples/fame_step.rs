//! One FAME-style training step from the public op API alone, chained
//! through all four op families on the best device, forward and backward:
//! per-head item sub-embeddings (lookup), a dense router within each head
//! (grouped routing, k = all), the per-head experts and their mixture
//! (expert layer + combine with a residual), and the gated per-head
//! cross-entropy over the whole catalog, whose item table is the lookup's
//! (tied: the two gradients merge in one call).
//!
//!     cargo run --release --example fame_step
//!
//! `MOEREC_DEVICE=cpu|cuda|cuda:N` forces the device. The router logits
//! and gate logits would come from the model's attention; here they are
//! fixed inputs.

use moerec::experts::{self, Activation};
use moerec::routing::{self, RoutingOptions, TopK};
use moerec::scoring::{self, Scoring};
use moerec::{embedding, Device, Tensor};

const SEQUENCES: usize = 8;
const HEADS: usize = 4;
const EXPERTS_PER_HEAD: usize = 4;
const WIDTH: usize = 16;
const ITEMS: usize = 1000;
const PADDING: u32 = 0;

/// Errors print with Display (what went wrong, for which argument).
fn main() {
    if let Err(error) = run() {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

/// Deterministic values in `[-scale, scale)`.
fn values(seed: usize, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i + seed) * 7919 % 1000) as f32 / 500.0 - 1.0) * scale)
        .collect()
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::auto()?;
    println!("device: {device}");
    let (b, h, n, d) = (SEQUENCES, HEADS, EXPERTS_PER_HEAD, WIDTH);

    // Per-head item sub-embeddings [H, V, D], tied with the scoring table.
    let items = Tensor::from_vec(values(1, h * ITEMS * d, 0.1), &[h, ITEMS, d], &device)?;
    let last_items: Vec<u32> = (0..b as u32).map(|s| 1 + s * 37 % (ITEMS as u32 - 1)).collect();
    let ids = Tensor::from_vec(last_items, &[b], &device)?;
    let (states, lookup_saved) = embedding::forward(&items, &ids, Some(PADDING))?;
    let x = states.reshape(&[b * h, d])?; // one routing row per (sequence, head): no copy

    // A dense router within each head: one plan over all H * N experts.
    let router_logits = Tensor::from_vec(values(2, b * h * n, 1.0), &[b, h * n], &device)?;
    let options = RoutingOptions::new(TopK::All).with_groups(h);
    let (routed, routing_saved) = routing::forward(&router_logits, &options)?;

    // Each head's experts (D -> D, GELU, bias), mixed by the router, plus a
    // residual.
    let weights = Tensor::from_vec(values(3, h * n * d * d, 0.2), &[h * n, d, d], &device)?;
    let bias = Tensor::zeros(&[h * n, d], &device)?;
    let (y, layer_saved) = experts::layer_forward(&x, &routed.plan, &weights, &bias, Activation::Gelu)?;
    let (mixed, _utilisation) = experts::combine(&y, &routed.weights, &routed.plan, &x, None)?;
    let user = mixed.reshape(&[b, h, d])?;

    // Per-head scores over the whole catalog, fused by a gate over heads.
    let gate_logits = Tensor::from_vec(values(4, b * h, 1.0), &[b, h], &device)?;
    let excluded = Tensor::from_vec(vec![PADDING], &[1], &device)?;
    let inputs = Scoring::new(&user, &gate_logits, &items).with_excluded(&excluded);
    let targets = Tensor::from_vec((0..b as u32).map(|s| 2 + s * 101 % 900).collect(), &[b], &device)?;
    let (loss, ce_saved) = scoring::cross_entropy(&inputs, &targets, Some(PADDING))?;
    let losses = loss.to_vec()?;
    let mean = losses.iter().sum::<f32>() / b as f32;
    println!(
        "cross-entropy: {mean:.4} (lb {:?}, z {:?})",
        routed.lb_loss.to_vec()?,
        routed.z_loss.to_vec()?
    );

    // Backward, in reverse: scoring, combine, experts, routing, lookup.
    let dloss = Tensor::from_vec(vec![1.0 / b as f32; b], &[b], &device)?;
    let mut ce_grads = scoring::cross_entropy_backward(&inputs, &dloss, &ce_saved)?;
    let d_mixed = ce_grads.user.reshape(&[b * h, d])?;
    let combine_grads = experts::combine_backward(&d_mixed, &y, &routed.weights, &routed.plan, &x, None)?;
    let layer_grads = experts::layer_backward(&combine_grads.dy, &x, &routed.plan, &weights, &layer_saved)?;
    let d_router = routing::backward(&router_logits, &combine_grads.dweights, 0.01, 0.001, &routing_saved)?;

    // dx from the experts plus dres from the residual: the states' gradient.
    let mut d_states = layer_grads.dx.to_vec()?;
    let dres = combine_grads.dres.to_vec()?;
    d_states.iter_mut().zip(dres).for_each(|(a, r)| *a += r);
    let d_states = Tensor::from_vec(d_states, &[b, h, d], &device)?;
    let lookup_grad = embedding::backward(&d_states, &lookup_saved)?;
    // Tied table: the lookup's sparse gradient into the scoring's dense dX.
    lookup_grad.add_to(&mut ce_grads.items)?;

    let norm =
        |t: &Tensor<f32>| -> Result<f32, moerec::Error> { Ok(t.to_vec()?.iter().map(|v| v * v).sum::<f32>().sqrt()) };
    println!("|d items| (tied) = {:.5}", norm(&ce_grads.items)?);
    println!("|d expert weights| = {:.5}", norm(&layer_grads.dweights)?);
    println!("|d router logits| = {:.5}", norm(&d_router)?);
    println!("|d gate logits| = {:.5}", norm(&ce_grads.gate_logits)?);
    Ok(())
}

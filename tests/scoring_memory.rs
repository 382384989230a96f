//! The cross-entropy never allocates anything of size B * V: a counting
//! global allocator measures the peak memory beyond inputs and outputs, on a
//! catalog whose materialised `[B, V]` logits would not fit in the workspace
//! the op is allowed ([`scoring::workspace_bytes`]).

use moerec::scoring::{self, Mixing, Scoring, ScoringShape};
use moerec::{Device, Tensor};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; the
// counters are only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn cross_entropy_memory_stays_within_its_workspace() {
    let (batch, heads, width, num_items) = (64, 2, 8, 200_000);
    let device = Device::cpu();
    let user = Tensor::from_vec(
        (0..batch * heads * width)
            .map(|i| (i % 17) as f32 / 17.0 - 0.5)
            .collect(),
        &[batch, heads, width],
        &device,
    )
    .unwrap();
    let gates = Tensor::from_vec(vec![0.3f32; batch * heads], &[batch, heads], &device).unwrap();
    let items = Tensor::from_vec(
        (0..heads * num_items * width)
            .map(|i| (i % 29) as f32 / 29.0 - 0.5)
            .collect(),
        &[heads, num_items, width],
        &device,
    )
    .unwrap();
    let targets = Tensor::from_vec((0..batch as u32).map(|b| b * 3001).collect(), &[batch], &device).unwrap();
    let dloss = Tensor::from_vec(vec![1.0f32; batch], &[batch], &device).unwrap();
    let shape = ScoringShape {
        batch,
        heads,
        width,
        num_items,
        shared: false,
    };
    let allowed = scoring::workspace_bytes(shape);
    let materialised = batch * num_items * 4;
    assert!(
        materialised > allowed * 10,
        "the test must use a catalog whose [B, V] logits exceed the workspace"
    );

    for mixing in [Mixing::Logits, Mixing::Probabilities] {
        let inputs = Scoring::new(&user, &gates, &items).with_mixing(mixing);
        // Warm up rayon's pool and gemm's per-thread packing slab (one
        // cache-sized buffer a worker keeps for its life) so that these
        // one-time allocations are not counted.
        let (_, warm) = scoring::cross_entropy(&inputs, &targets, None).unwrap();
        drop(scoring::cross_entropy_backward(&inputs, &dloss, &warm).unwrap());

        let baseline = CURRENT.load(Ordering::SeqCst);
        PEAK.store(baseline, Ordering::SeqCst);
        let (loss, saved) = scoring::cross_entropy(&inputs, &targets, None).unwrap();
        let grads = scoring::cross_entropy_backward(&inputs, &dloss, &saved).unwrap();
        let outputs = 4 * (loss.len() + saved.lse().len() + saved.target_logits().len() + batch)
            + 4 * (grads.user.len() + grads.gate_logits.len() + grads.items.len() + grads.item_bias.len());
        let extra = PEAK.load(Ordering::SeqCst) - baseline - outputs;
        assert!(
            extra <= allowed,
            "{mixing:?}: {extra} bytes beyond inputs and outputs, allowed {allowed} (materialised logits: {materialised})"
        );
    }
}

//! One stream (issue 10, item 3): everything an op does — allocation,
//! zeroing, launches, frees — is ordered on the stream it runs on, a device
//! can run on a caller's stream and context, and event guards live until
//! their launch is queued. CUDA only. On the emulated device
//! (scripts/emu-test.sh) queued work runs only when something waits for it,
//! and a free racing with another stream's pending work is an error, so work
//! put on the wrong stream, or an event recorded too early, fails here.
//! Without a usable GPU every trial shows as ignored (tests/common/harness.rs).

mod common;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView};
use moerec::cuda::CudaDevice;
use moerec::experts::{self, CombineShape, PlanParts};
use moerec::routing::{self, DispatchPlan, RoutingOptions, TopK};
use moerec::{Device, Tensor};
use std::sync::Arc;

const TOKENS: usize = 37;
const EXPERTS: usize = 5;
const K: usize = 2;
const DOUT: usize = 24;

/// The operands of one combine (with a residual), on `device`.
struct Combine {
    y: Tensor<f32>,
    weights: Tensor<f32>,
    plan: DispatchPlan,
    res: Tensor<f32>,
}

impl Combine {
    fn new(device: &Device) -> Combine {
        let mut rng = common::Rng::new(10);
        let logits = Tensor::from_vec(rng.floats::<f32>(TOKENS * EXPERTS), &[TOKENS, EXPERTS], device).unwrap();
        let (routing, _) = routing::forward(&logits, &RoutingOptions::new(TopK::K(K))).unwrap();
        let rows = routing.plan.token_of_row.len();
        Combine {
            y: Tensor::from_vec(rng.floats::<f32>(rows * DOUT), &[rows, DOUT], device).unwrap(),
            weights: routing.weights,
            plan: routing.plan,
            res: Tensor::from_vec(rng.floats::<f32>(TOKENS * DOUT), &[TOKENS, DOUT], device).unwrap(),
        }
    }

    /// The op API's result (it waits for its data checks).
    fn reference(&self) -> Vec<f32> {
        let (out, _) = experts::combine(&self.y, &self.weights, &self.plan, &self.res, None).unwrap();
        out.to_vec().unwrap()
    }

    /// Queues the backend combine of `device` on `stream` and returns its
    /// output buffer and status word, without waiting for them.
    fn queue(&self, device: &CudaDevice, stream: &Arc<CudaStream>) -> (CudaSlice<f32>, CudaSlice<u64>) {
        fn slice(t: &Tensor<u32>) -> CudaView<'_, u32> {
            t.as_cuda_slice().unwrap().as_view()
        }
        let plan = PlanParts {
            counts: slice(&self.plan.counts),
            offsets: slice(&self.plan.offsets),
            token_of_row: slice(&self.plan.token_of_row),
            row_of_slot: slice(&self.plan.row_of_slot),
        };
        let shape = CombineShape {
            tokens: TOKENS,
            k: K,
            rows: self.y.shape()[0],
            experts: EXPERTS,
            dout: DOUT,
        };
        let mut out = stream.alloc_zeros::<f32>(TOKENS * DOUT).unwrap();
        let mut util = stream.alloc_zeros::<f32>(EXPERTS).unwrap();
        let mut status = stream.clone_htod(&[u64::MAX]).unwrap();
        experts::cuda::combine(
            device,
            stream,
            &self.y.as_cuda_slice().unwrap().as_view(),
            &self.weights.as_cuda_slice().unwrap().as_view(),
            &plan,
            Some(&self.res.as_cuda_slice().unwrap().as_view()),
            None,
            &shape,
            &mut out.as_view_mut(),
            &mut util.as_view_mut(),
            &mut status.as_view_mut(),
        )
        .unwrap();
        (out, status)
    }
}

fn cuda(device: &Device) -> Arc<CudaDevice> {
    device.as_cuda().expect("a CUDA trial gets a CUDA device").clone()
}

fn backend_work_on_a_callers_stream_stays_on_that_stream(device: &Device) {
    let device = cuda(device);
    let operands = Combine::new(&Device::Cuda(device.clone()));
    let expected = operands.reference();
    // The operands are complete; the combine runs on another stream of the
    // same context, whose temporaries (zeroed slot index, row norms) must be
    // zeroed, used and freed there.
    let stream = device.context().new_stream().unwrap();
    let (out, status) = operands.queue(&device, &stream);
    assert_eq!(stream.clone_dtoh(&status).unwrap(), vec![u64::MAX], "status");
    assert_eq!(stream.clone_dtoh(&out).unwrap(), expected);
}

fn a_device_on_a_callers_stream_runs_the_op_api_there(device: &Device) {
    let own = cuda(device);
    let expected = Combine::new(&Device::Cuda(own.clone())).reference();
    let stream = own.context().new_stream().unwrap();
    let device = Device::from_cuda_stream(stream.clone()).unwrap();
    assert_ne!(device, Device::Cuda(own.clone()), "another stream is another device");
    assert_eq!(device.as_cuda().unwrap().stream().cu_stream(), stream.cu_stream());
    assert_eq!(Combine::new(&device).reference(), expected);
}

/// A context that tracks events (cudarc's default, and candle's): a buffer
/// an op reads must stay protected from another stream's writes until the
/// kernel that reads it has run, so the op's read event must be recorded
/// after its launch.
fn read_events_are_recorded_after_the_launch(_: &Device) {
    let context = CudaContext::new(0).unwrap();
    assert!(context.is_event_tracking());
    let (ours, theirs) = (context.new_stream().unwrap(), context.new_stream().unwrap());
    let device = Device::from_cuda_stream(ours.clone()).unwrap();
    let mut operands = Combine::new(&device);
    let expected = operands.reference();
    let (out, _status) = operands.queue(device.as_cuda().unwrap(), &ours);
    // Another stream overwrites res; cudarc makes it wait for res's read
    // event first. That stream is waited for before the combine's.
    theirs.memset_zeros(operands.res.as_cuda_slice_mut().unwrap()).unwrap();
    theirs.synchronize().unwrap();
    assert_eq!(ours.clone_dtoh(&out).unwrap(), expected);
}

common::harness::test_main! {
    devices: [],
    cuda: [
        backend_work_on_a_callers_stream_stays_on_that_stream,
        a_device_on_a_callers_stream_runs_the_op_api_there,
        read_events_are_recorded_after_the_launch,
    ],
    host: [],
}

//! Builds a moerec device and a candle device in one process, with the CUDA
//! types of both coming from the one cudarc crate of the graph, and a moerec
//! device on candle's own stream.

use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaStream};
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let moerec_device = moerec::Device::auto()?;
    println!("moerec: {moerec_device}");
    if let Some(cuda) = moerec_device.as_cuda() {
        // Compiles only if candle's re-exported cudarc is moerec's cudarc.
        let context: &Arc<CudaContext> = cuda.context();
        let stream: &Arc<CudaStream> = cuda.stream();
        println!("one cudarc: context on device {}, stream {:?}", context.ordinal(), stream.cu_stream());
    }
    match candle_core::Device::new_cuda(0) {
        Ok(candle_device) => {
            let on_candle = moerec::Device::from_cuda_stream(candle_device.as_cuda_device()?.cuda_stream())?;
            println!("moerec on candle's stream: {on_candle}");
        }
        Err(error) => println!("candle: no CUDA device ({error})"),
    }
    Ok(())
}

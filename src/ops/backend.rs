//! The one place that picks a backend for an op, from the tensor's device and dtype and what
//! this build has.

use candle_core::{DType, Device, Tensor};

/// The backend a tensor's kernels run on.
pub(crate) enum Backend {
    /// The crate's own CPU kernels (f32 and f64).
    Cpu,
    /// cuDNN (feature `cudnn`).
    #[cfg(feature = "cudnn")]
    Cudnn,
    /// [`reference`](mod@reference): candle's own ops.
    Reference,
}

/// Picks the backend for `x`: `cpu` and `cudnn` list the dtypes the crate's CPU kernel and
/// its cuDNN kernel take for this op (the latter only counts in a `cudnn` build); an empty `x`
/// always takes the reference.
#[cfg_attr(not(feature = "cudnn"), allow(unused_variables))]
pub(crate) fn backend(x: &Tensor, cpu: &[DType], cudnn: &[DType]) -> Backend {
    // The crate's kernels split their work by channel and image; an empty tensor has no
    // pieces to split, and candle's element-wise ops handle it as it is.
    if x.elem_count() == 0 {
        return Backend::Reference;
    }
    match x.device() {
        Device::Cpu if cpu.contains(&x.dtype()) => Backend::Cpu,
        #[cfg(feature = "cudnn")]
        Device::Cuda(_) if cudnn.contains(&x.dtype()) => Backend::Cudnn,
        _ => Backend::Reference,
    }
}

pub(crate) const CPU_FLOATS: &[DType] = &[DType::F32, DType::F64];

/// The dtypes whose convolution and batch-norm gradients the plan's own backward pass takes
/// from cuDNN (f32: cuDNN's batch norm takes no other).
#[cfg(feature = "cudnn")]
pub(crate) const CUDNN_GRADIENTS: &[DType] = &[DType::F32];
#[cfg(not(feature = "cudnn"))]
pub(crate) const CUDNN_GRADIENTS: &[DType] = &[];

/// `true` when the plan's own backward pass computes a convolution's or a batch norm's
/// gradients for `x` with kernels of `x`'s device (`train/tape.rs`): a non-empty f32/f64
/// tensor on the CPU (the crate's kernels), an f32 one on CUDA with cuDNN. Elsewhere the layer
/// goes through candle's autograd on its own step.
pub(crate) fn has_native_gradients(x: &Tensor) -> bool {
    !matches!(backend(x, CPU_FLOATS, CUDNN_GRADIENTS), Backend::Reference)
}

/// `true` where the plan's own backward pass composes a layer's gradients from the separate
/// kernels of `x`'s device (`train/tape.rs`): off the CPU, whose fused kernels compute them in
/// one op, and everywhere when `forced` (`BackwardPass::PlanComposed`, which counts and tests
/// on the CPU what a GPU step runs).
pub(crate) fn composes_gradients(x: &Tensor, forced: bool) -> bool {
    forced || !x.device().is_cpu()
}

/// `true` when `x` takes the crate's own CPU kernels (a non-empty f32/f64 tensor on the CPU):
/// then the trainer's own backward pass may call their gradient kernels directly
/// (`train/tape.rs`, the layers' `forward_native`).
pub(crate) fn takes_cpu_kernels(x: &Tensor) -> bool {
    matches!(backend(x, CPU_FLOATS, &[]), Backend::Cpu)
}

/// `true` when `x` is a non-empty tensor on the CPU, of any dtype: where a training step may
/// run the trainer's own backward pass (`train/tape.rs`), whose layers that cannot compute
/// their gradients natively fall back to candle's autograd step by step.
pub(crate) fn on_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && x.elem_count() > 0
}

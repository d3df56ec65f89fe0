//! Kernels the layers run on: the GEMM-based convolution with its own backward pass, and
//! fused batch normalization and bias kernels, on the CPU; cuDNN forward and backward
//! convolutions on CUDA (feature `cudnn`).

use candle_core::Layout;

/// The elements of a contiguous CPU tensor, or an error naming the kernel.
pub(crate) fn contiguous_slice<'a, T>(
    data: &'a [T],
    layout: &Layout,
    kernel: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{kernel}: contiguous tensors expected"),
    }
}

/// Runs `$body` with `$a`, `$b` bound to the slices of two CPU storages of the same float
/// type (f32 or f64); the body returns a `Vec` of that type.
macro_rules! dispatch_pair {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $name:literal, |$a:ident, $b:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let $a = crate::ops::contiguous_slice(a, $l1, $name)?;
                let $b = crate::ops::contiguous_slice(b, $l2, $name)?;
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let $a = crate::ops::contiguous_slice(a, $l1, $name)?;
                let $b = crate::ops::contiguous_slice(b, $l2, $name)?;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!(concat!($name, ": f32 or f64 tensors of one dtype expected")),
        }
    };
}

pub(crate) mod batch_norm;
pub(crate) mod conv2d;
#[cfg(feature = "cudnn")]
pub(crate) mod cudnn_batch_norm;
#[cfg(feature = "cudnn")]
pub(crate) mod cudnn_conv;

pub use conv2d::{Conv2dGeometry, candle_conv2d, conv2d, use_cudnn_backward};

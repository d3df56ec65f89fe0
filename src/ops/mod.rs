//! Kernels the layers run on: the GEMM-based convolution with its own backward pass, and
//! fused batch normalization and bias kernels, on the CPU; cuDNN forward and backward
//! convolutions on CUDA (feature `cudnn`).

pub(crate) mod batch_norm;
pub(crate) mod conv2d;
#[cfg(feature = "cudnn")]
pub(crate) mod cudnn_conv;

pub use conv2d::{Conv2dGeometry, candle_conv2d, conv2d, use_cudnn_backward};

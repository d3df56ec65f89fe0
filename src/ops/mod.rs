//! Kernels the layers run on: the GEMM-based convolution with its own backward pass, and
//! fused batch normalization and bias kernels, on the CPU.

pub(crate) mod batch_norm;
pub(crate) mod conv2d;

pub use conv2d::{Conv2dGeometry, candle_conv2d, conv2d};

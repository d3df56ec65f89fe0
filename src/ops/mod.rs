//! The kernels layers run on, and the one place in the crate that chooses a backend.
//!
//! Each public function here (and in [`reference`](mod@reference)) checks its arguments, returning
//! [`Error::InvalidOpArgument`](crate::Error::InvalidOpArgument) naming the argument, never panicking; then it runs the fastest
//! kernel that this build has for the tensors' device and dtype:
//!
//! | function | CPU, f32/f64 | CUDA, feature `cudnn` | anything else |
//! |---|---|---|---|
//! | [`conv2d`] | im2col + GEMM, own backward (`cpu/conv2d.rs`); f32 on oneDNN with feature `onednn` (`onednn/`) | cuDNN forward, backward data and filter (`cudnn/conv2d.rs`) | [`reference::conv2d`] |
//! | [`conv2d_bias`], [`fused_conv2d`] | the same op, the bias and a ReLU applied as the output is written | [`conv2d`], then [`bias_add`], [`relu`] | the same |
//! | [`batch_norm_train`] | fused moments, normalize, analytic backward (`cpu/batch_norm.rs`) | cuDNN training kernels (`cudnn/batch_norm.rs`), f32 | [`reference::batch_norm_train`] |
//! | [`batch_norm_eval`] | fused normalize (`cpu/batch_norm.rs`) | [`reference::batch_norm_eval`] | [`reference::batch_norm_eval`] |
//! | [`fused_batch_norm_train`], [`fused_batch_norm_eval`] | the batch-norm kernels reading `max(x, 0)`, `a + b` or `max(a + b, 0)` and writing `max(y, 0)` (a [`Fusion`](crate::Fusion)'s prologue and epilogue) | candle's add, [`relu`], batch norm, [`relu`] | the same |
//! | [`bias_add`] | fused per-channel add and gradient sum (`cpu/bias.rs`) | [`reference::bias_add`] | [`reference::bias_add`] |
//! | [`conv_transpose2d`] | candle's kernel | candle's kernel | candle's kernel |
//! | [`relu`] | one pass forward, one backward (`cpu/relu.rs`) | candle's `relu` | candle's `relu` |
//! | [`adam_update`], [`sgd_update`] | one fused pass per weight (`cpu/optimizer.rs`) | [`reference::adam_update`], [`reference::sgd_update`] | the same |
//! | [`adam_update_many`], [`sgd_update_many`] | the fused pass, weight by weight | one multi-tensor kernel for all weights (`cuda/optimizer.cu`, feature `cuda`, f32) | the reference, weight by weight |
//! | [`adam_update_in_place`], [`sgd_update_in_place`] | the fused pass, written into the weight and its slots | the multi-tensor kernel, writing in place (feature `cuda`, f32) | the reference, then copied |
//! | [`all_finite`] | one parallel pass per tensor | one multi-tensor kernel (`cuda/multi_tensor.cu`, feature `cuda`, f32) | `x·0 == 0`, reduced |
//! | [`assign_if`] | copies, when `keep` is 1 | one multi-tensor kernel (feature `cuda`, f32) | `where_cond`, then copies |
//!
//! [`reference`](mod@reference) composes the same functions from candle's own differentiable ops: it runs on
//! every device and dtype, and it is the oracle the kernels are tested against. Layers call
//! these functions and never look at the device themselves.
//!
//! Tensors are NCHW, with channels on axis 1 (batch norm and bias take any rank ≥ 2, channels
//! on axis 1). Batch-norm statistics of bf16/f16 activations are computed in f32.
//!
//! One file per family, each checked by the shared `arguments.rs` and dispatched by
//! `backend.rs`: `conv.rs`, `batch_norm.rs`, `pointwise.rs`, `optimizer.rs` (one weight, or
//! many computed without writing), `multi_tensor.rs` (the in-place end of a training step);
//! the kernels in `cpu/`, `onednn/`, `cudnn/`, `cuda/`, and the composed oracle in
//! `reference.rs`.

mod arguments;
mod backend;
mod batch_norm;
mod conv;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "cudnn")]
pub(crate) mod cudnn;
mod multi_tensor;
#[cfg(feature = "onednn")]
pub mod onednn;
mod optimizer;
mod pointwise;
pub mod reference;

pub use arguments::{AdamStep, Conv2dGeometry, SgdStep};
pub(crate) use arguments::{ChannelAffine, check_padded};
pub(crate) use backend::{composes_gradients, has_native_gradients, on_cpu, takes_cpu_kernels};
pub use batch_norm::{
    batch_norm_eval, batch_norm_train, fused_batch_norm_eval, fused_batch_norm_train,
};
pub(crate) use batch_norm::{
    batch_norm_eval_affine, batch_norm_operand, batch_norm_train_gradients,
};
#[cfg(feature = "onednn")]
pub(crate) use conv::conv2d_handoff;
pub use conv::{conv_transpose2d, conv2d, conv2d_bias, fused_conv2d};
pub(crate) use conv::{conv2d_affine, conv2d_gradients};
pub use multi_tensor::{
    adam_update_in_place, adam_update_is_finite, all_finite, assign_if, sgd_update_in_place,
    sgd_update_is_finite,
};
pub(crate) use multi_tensor::{assign_checked, check_assignments};
pub use optimizer::{adam_update, adam_update_many, sgd_update, sgd_update_many};
pub(crate) use pointwise::relu_grad;
pub use pointwise::{bias_add, relu};

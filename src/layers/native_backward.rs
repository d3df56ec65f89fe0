//! The layers whose gradients the trainer's own backward pass (`train/tape.rs`) computes with
//! their own kernels instead of candle's autograd: convolutions and batch norms, which hold
//! nearly all of a convolutional network's activations, and the layers that connect them in
//! encoder/decoder networks (max pooling, nearest upsampling, concatenation), which through
//! candle's autograd would each copy their inputs into fresh variables, and a classifier's
//! head (tiling and global average pooling, `Flatten`, `Dense`), whose autograd graphs are a
//! few ops each but cost dozens of tensors through candle's bookkeeping. Their forward pass
//! runs on detached weights and records a [`Native`]: what the backward kernels need
//! (`forward_native` in `conv.rs`, `batch_norm.rs`, `pooling.rs`, `upsampling.rs`,
//! `concatenate.rs`, `reshape.rs`, `dense.rs`).
//!
//! A convolution, batch norm, max pooling or upsampling records whether its gradients are
//! *composed*: off the CPU's kernels (on CUDA: cuDNN's gradient kernels, with the ReLUs'
//! masks and the bias sum as passes of their own; candle's ops over the pooling windows), or
//! on the CPU when asked, so that what a GPU step runs is counted and tested there. The
//! head's gradients are candle's ops on every device.

use candle_core::{Tensor, Var};

use crate::Result;
use crate::fusion::Fusion;
use crate::ops::Conv2dGeometry;

/// What a layer's gradients need from its forward pass, and the variables its weight
/// gradients go to (`None` for a frozen layer).
#[derive(Debug)]
pub(crate) enum Native {
    Conv2d {
        x: Tensor,
        kernel: Tensor,
        /// The output, kept only when a fused ReLU needs it.
        y: Option<Tensor>,
        relu: bool,
        geometry: Conv2dGeometry,
        kernel_var: Option<Var>,
        bias_var: Option<Var>,
        /// Whether the convolution has a bias (its gradient is computed only then).
        bias: bool,
        /// Whether the gradients are composed of the device's separate kernels.
        composed: bool,
    },
    BatchNorm {
        /// The inputs, or when `composed` the one operand the prologue made of them.
        saved: Vec<Tensor>,
        /// How many inputs get the input gradient (two for a fused sum).
        arity: usize,
        gamma: Tensor,
        beta: Tensor,
        mean: Tensor,
        var: Tensor,
        epsilon: f64,
        fusion: Fusion,
        /// The output, kept only when a fused ReLU after needs it.
        y: Option<Tensor>,
        gamma_var: Option<Var>,
        beta_var: Option<Var>,
        /// Whether the gradients are composed of the device's separate kernels.
        composed: bool,
    },
    /// Max pooling with strides equal to the `window`, no padding; `composed`: the gradient
    /// made of candle's ops (any device; the windows tile the map exactly) rather than by the
    /// CPU's kernel.
    MaxPool {
        x: Tensor,
        y: Tensor,
        window: (usize, usize),
        composed: bool,
    },
    /// Nearest upsampling by `factors` (rows, columns); `composed`: the gradient summed
    /// with candle's ops (any device) rather than by the CPU's kernel.
    UpsampleNearest {
        factors: (usize, usize),
        composed: bool,
    },
    /// Average pooling with strides equal to the `window`, no padding, over a map of `size`
    /// (rows, columns) that the windows tile exactly.
    AvgPool {
        window: (usize, usize),
        size: (usize, usize),
    },
    /// Global average pooling of an input of `dims` (NCHW).
    GlobalAvgPool { dims: (usize, usize, usize, usize) },
    /// A reshape (`Flatten`) of an input of `dims`.
    Reshape { dims: Vec<usize> },
    /// A `Dense` layer on a batch of vectors: `y = activation(x · kernel + bias)`.
    Dense {
        x: Tensor,
        kernel: Tensor,
        /// The output, kept where the activation's gradient needs it.
        y: Option<Tensor>,
        activation: DenseActivation,
        kernel_var: Option<Var>,
        bias_var: Option<Var>,
    },
    /// Concatenation along `axis` of inputs of `sizes` along it.
    Concatenate { axis: usize, sizes: Vec<usize> },
}

/// The activations of a `Dense` layer whose gradients the plan's own backward pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DenseActivation {
    Linear,
    Relu,
    /// Softmax over the last axis.
    Softmax,
}

/// A step's gradients: one per input, then the weights' (each with the variable it is for).
pub(crate) type Gradients = (Vec<Tensor>, Vec<(Var, Tensor)>);

impl Native {
    /// Whether a convolution's, batch norm's, max pooling's or upsampling's gradients are
    /// composed of the device's separate kernels; `None` for the other layers.
    #[cfg(test)]
    pub(crate) fn composed(&self) -> Option<bool> {
        match self {
            Native::Conv2d { composed, .. }
            | Native::BatchNorm { composed, .. }
            | Native::UpsampleNearest { composed, .. }
            | Native::MaxPool { composed, .. } => Some(*composed),
            _ => None,
        }
    }

    /// The inputs' gradients, one per input (a batch norm's two summands share theirs), and
    /// the weights' gradients, from the output's gradient `dy`.
    pub(crate) fn gradients(self, dy: &Tensor) -> Result<Gradients> {
        let mut weights = Vec::new();
        let dxs = match self {
            Native::Conv2d {
                x,
                kernel,
                y,
                relu,
                geometry,
                kernel_var,
                bias_var,
                bias,
                composed,
            } => {
                let (dx, dk, db) = crate::ops::conv2d_gradients(
                    (&x, &kernel, y.as_ref()),
                    (bias, relu),
                    geometry,
                    dy,
                    composed,
                )?;
                weights.extend(kernel_var.map(|v| (v, dk)));
                if let (Some(v), Some(db)) = (bias_var, db) {
                    weights.push((v, db));
                }
                vec![dx]
            }
            Native::BatchNorm {
                saved,
                arity,
                gamma,
                beta,
                mean,
                var,
                epsilon,
                fusion,
                y,
                gamma_var,
                beta_var,
                composed,
            } => {
                let (dx, dgamma, dbeta) = crate::ops::batch_norm_train_gradients(
                    &saved,
                    (&gamma, &beta),
                    (&mean, &var),
                    (epsilon, fusion),
                    y.as_ref(),
                    dy,
                    composed,
                )?;
                weights.extend(gamma_var.map(|v| (v, dgamma)));
                weights.extend(beta_var.map(|v| (v, dbeta)));
                vec![dx; arity]
            }
            Native::MaxPool {
                x,
                y,
                window,
                composed: false,
            } => vec![crate::ops::cpu::pooling::max_pool_grad(&x, &y, dy, window)?],
            Native::MaxPool {
                x,
                y,
                window: (ph, pw),
                composed: true,
            } => {
                // Every element equal to its window's maximum gets the window's gradient, as
                // the CPU's kernel and candle's `max` give it: the windows as axes 3 and 5.
                let (n, c, oh, ow) = y.dims4()?;
                let per_window = (n, c, oh, 1, ow, 1);
                let windows = x.reshape((n, c, oh, ph, ow, pw))?;
                let at_max = windows
                    .broadcast_eq(&y.reshape(per_window)?)?
                    .to_dtype(dy.dtype())?;
                let dx = at_max.broadcast_mul(&dy.reshape(per_window)?)?;
                vec![dx.reshape((n, c, oh * ph, ow * pw))?]
            }
            Native::UpsampleNearest {
                factors,
                composed: false,
            } => vec![crate::ops::cpu::pooling::upsample_nearest_grad(
                dy, factors,
            )?],
            Native::UpsampleNearest {
                factors: (sh, sw),
                composed: true,
            } => {
                // Each input value was copied to a sh × sw window: its gradient is their sum.
                let (n, c, big_h, big_w) = dy.dims4()?;
                let windows = dy.reshape((n, c, big_h / sh, sh, big_w / sw, sw))?;
                vec![windows.sum((3, 5))?]
            }
            Native::AvgPool {
                window: (kh, kw),
                size: (h, w),
            } => {
                // Each input value is 1/(kh·kw) of its window's output.
                let share = (dy * (1.0 / (kh * kw) as f64))?;
                vec![share.upsample_nearest2d(h, w)?]
            }
            Native::GlobalAvgPool { dims: (n, c, h, w) } => {
                // Every value of a map is 1/(h·w) of its mean: a broadcast view, no copy.
                let share = (dy * (1.0 / (h * w) as f64))?;
                vec![share.reshape((n, c, 1, 1))?.broadcast_as((n, c, h, w))?]
            }
            Native::Reshape { dims } => vec![dy.reshape(dims)?],
            Native::Dense {
                x,
                kernel,
                y,
                activation,
                kernel_var,
                bias_var,
            } => {
                let dz = match (activation, &y) {
                    (DenseActivation::Linear, _) => dy.clone(),
                    (DenseActivation::Relu, Some(y)) => crate::ops::relu_grad(dy, y)?,
                    // y ⊙ (dy − Σ dy ⊙ y) along the softmax's axis.
                    (DenseActivation::Softmax, Some(y)) => {
                        let along = (dy * y)?.sum_keepdim(1)?;
                        (dy.broadcast_sub(&along)? * y)?
                    }
                    (_, None) => {
                        return Err(crate::Error::InvalidArgument(
                            "own backward pass: a Dense activation's gradient needs the output"
                                .into(),
                        ));
                    }
                };
                if let Some(v) = kernel_var {
                    weights.push((v, x.t()?.matmul(&dz)?));
                }
                if let Some(v) = bias_var {
                    weights.push((v, dz.sum(0)?));
                }
                vec![dz.matmul(&kernel.t()?)?]
            }
            Native::Concatenate { axis, sizes } => {
                let mut start = 0;
                let mut parts = Vec::with_capacity(sizes.len());
                for size in sizes {
                    parts.push(dy.narrow(axis, start, size)?);
                    start += size;
                }
                parts
            }
        };
        Ok((dxs, weights))
    }
}

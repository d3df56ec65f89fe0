//! The layers whose gradients the trainer's own backward pass (`train/tape.rs`) computes with
//! their own kernels instead of candle's autograd: convolutions and batch norms, which hold
//! nearly all of a convolutional network's activations, and the layers that connect them in
//! encoder/decoder networks (max pooling, nearest upsampling, concatenation), which through
//! candle's autograd would each copy their inputs into fresh variables. Their forward pass
//! runs on detached weights and records a [`Native`]: what the backward kernels need
//! (`forward_native` in `conv.rs`, `batch_norm.rs`, `pooling.rs`, `upsampling.rs`,
//! `concatenate.rs`).

use candle_core::{Tensor, Var};

use crate::Result;
use crate::fusion::Fusion;
use crate::ops::Conv2dGeometry;

/// What a convolution's or batch norm's gradients need from its forward pass, and the
/// variables its weight gradients go to (`None` for a frozen layer).
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
    },
    BatchNorm {
        inputs: Vec<Tensor>,
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
    },
    /// Max pooling with strides equal to the `window`, no padding.
    MaxPool {
        x: Tensor,
        y: Tensor,
        window: (usize, usize),
    },
    /// Nearest upsampling by `factors` (rows, columns).
    UpsampleNearest { factors: (usize, usize) },
    /// Concatenation along `axis` of inputs of `sizes` along it.
    Concatenate { axis: usize, sizes: Vec<usize> },
}

/// A step's gradients: one per input, then the weights' (each with the variable it is for).
pub(crate) type Gradients = (Vec<Tensor>, Vec<(Var, Tensor)>);

impl Native {
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
            } => {
                let (dx, dk, db) = crate::ops::cpu::conv2d::conv2d_backward(
                    (&x, &kernel, y.as_ref()),
                    bias,
                    relu,
                    geometry,
                    dy,
                )?;
                weights.extend(kernel_var.map(|v| (v, dk)));
                if let (Some(v), Some(db)) = (bias_var, db) {
                    weights.push((v, db));
                }
                vec![dx]
            }
            Native::BatchNorm {
                inputs,
                gamma,
                beta,
                mean,
                var,
                epsilon,
                fusion,
                y,
                gamma_var,
                beta_var,
            } => {
                let (dx, dgamma, dbeta) = crate::ops::cpu::batch_norm::train_backward(
                    &inputs,
                    (&gamma, &beta),
                    (&mean, &var),
                    epsilon,
                    fusion,
                    y.as_ref(),
                    dy,
                )?;
                weights.extend(gamma_var.map(|v| (v, dgamma)));
                weights.extend(beta_var.map(|v| (v, dbeta)));
                vec![dx; inputs.len()]
            }
            Native::MaxPool { x, y, window } => {
                vec![crate::ops::cpu::pooling::max_pool_grad(&x, &y, dy, window)?]
            }
            Native::UpsampleNearest { factors } => {
                vec![crate::ops::cpu::pooling::upsample_nearest_grad(
                    dy, factors,
                )?]
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

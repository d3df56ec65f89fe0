//! Element-wise ops: [`bias_add`] (a per-channel add) and [`relu`], and the ReLU's gradient
//! for the plan's own backward pass (`relu_grad`).

use candle_core::Tensor;

use crate::Result;

use crate::ops::arguments::*;
use crate::ops::backend::{Backend, CPU_FLOATS, backend};
use crate::ops::{cpu, reference};

/// `x + bias`, the `(C,)` bias broadcast over axis 1 of `x` (`(N, C, …)`), with the bias
/// gradient summed per channel.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::bias_add;
/// let x = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let b = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
/// assert_eq!(bias_add(&x, &b)?.to_vec2::<f32>()?[1], [1.0, 2.0, 3.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    check_bias_add(x, bias)?;
    match backend(x, CPU_FLOATS, &[]) {
        Backend::Cpu => cpu::bias::bias_add(x, bias),
        _ => reference::bias_add(x, bias),
    }
}

/// `max(x, 0)`, differentiable: the gradient passes where the output is positive
/// (TensorFlow's and PyTorch's rule; candle's own passes it at 0 too). On the CPU one pass
/// forward and one backward (`cpu/relu.rs`); elsewhere candle's `relu`.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_functional::ops::relu;
/// let x = Var::new(&[-1f32, 0.0, 2.0], &Device::Cpu)?;
/// let y = relu(x.as_tensor())?;
/// assert_eq!(y.to_vec1::<f32>()?, [0.0, 0.0, 2.0]);
/// let g = y.sum_all()?.backward()?;
/// assert_eq!(g.get(x.as_tensor()).unwrap().to_vec1::<f32>()?, [0.0, 0.0, 1.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if !x.dtype().is_float() {
        return Err(invalid(
            "relu",
            "x",
            format!("dtype {:?} is not a float", x.dtype()),
        ));
    }
    match backend(x, CPU_FLOATS, &[]) {
        Backend::Cpu => cpu::relu::relu(x),
        _ => Ok(x.relu()?),
    }
}

/// The gradient through a ReLU, `dy` where the ReLU's output `y` (`≥ 0`) is positive and 0
/// elsewhere ([`relu`]'s rule), for the plan's own backward pass where it is composed from
/// separate kernels (`train/tape.rs` off the CPU's fused kernels): two element-wise passes,
/// `sign(y)` and a product, where candle's autograd runs a comparison, a cast, a product and a
/// sum into a zero-filled gradient.
pub(crate) fn relu_grad(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok((dy * y.sign()?)?)
}

//! The kernels composed from candle's own differentiable ops: they run on every device and
//! dtype candle supports, [`crate::ops`] falls back to them where it has no faster kernel,
//! and they are the oracle every faster kernel is tested against.
//!
//! They take the same arguments as their counterparts in [`crate::ops`] and check them the same
//! way. Call them directly to compare: a kernel against the reference in the tests, or
//! "candle's own convolution backward vs cuDNN" in `examples/gpu_check.rs`. Unlike
//! [`crate::ops`], they compute half-precision batch norms in the input's dtype.

use candle_core::{D, Tensor};

use crate::Result;
use crate::ops::arguments::{
    AdamStep, BatchNormMode, Conv2dGeometry, SgdStep, check_batch_norm, check_bias_add,
    check_conv2d, check_padded, empty_conv2d,
};
use crate::support::dtype::Cast;

/// candle's own convolution (cuDNN forward with the `cudnn` feature, candle's backward),
/// after an explicit pad where the padding is not the same on all four sides.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::ops::{conv2d, reference, Conv2dGeometry};
/// let x = Tensor::ones((1, 1, 4, 4), DType::F32, &Device::Cpu)?;
/// let k = Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu)?;
/// let g = Conv2dGeometry { pad: (0, 1, 0, 1), stride: 2, dilation: 1, groups: 1 };
/// let (a, b) = (conv2d(&x, &k, g)?, reference::conv2d(&x, &k, g)?);
/// assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn conv2d(x: &Tensor, kernel: &Tensor, geometry: Conv2dGeometry) -> Result<Tensor> {
    check_conv2d(x, kernel, &geometry)?;
    // candle's CPU convolution and padding index past an empty operand.
    if let Some(y) = empty_conv2d(x, kernel, geometry)? {
        return Ok(y);
    }
    let (mut x, (mut pad, _)) = geometry.symmetric_padding(x, true)?;
    // candle's backward recovers the input's size as `(out - 1)·stride + span - 2·pad`,
    // unchecked: where the windows step over the whole input (a stride past it, with padding)
    // that is negative. The padding is then made explicit, which leaves nothing to recover.
    if pad > 0 {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, kh, kw) = kernel.dims4()?;
        let (oh, ow) = geometry.output_size(h, w, kh, kw)?;
        let covered = |out: usize, k: usize| {
            (out - 1)
                .checked_mul(geometry.stride)
                .and_then(|a| a.checked_add((k - 1).checked_mul(geometry.dilation)?))
                .and_then(|a| a.checked_add(1))
                .is_some_and(|a| a >= 2 * pad)
        };
        if !covered(oh, kh) || !covered(ow, kw) {
            check_padded("conv2d", &x, (pad, pad, pad, pad))?;
            x = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
            pad = 0;
        }
    }
    Ok(x.conv2d(
        kernel,
        pad,
        geometry.stride,
        geometry.dilation,
        geometry.groups,
    )?)
}

/// Training-mode batch normalization over axis 1 (see [`crate::ops::batch_norm_train`]),
/// composed: mean, centred values, biased variance, scale, shift.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::reference;
/// let x = Tensor::new(&[[1f32, 3.0], [3.0, 7.0]], &Device::Cpu)?;
/// let (_, mean, var) = reference::batch_norm_train(&x, None, None, 1e-3)?;
/// assert_eq!((mean.to_vec1::<f32>()?, var.to_vec1::<f32>()?), (vec![2.0, 5.0], vec![1.0, 4.0]));
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn batch_norm_train(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    epsilon: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    check_batch_norm(BatchNormMode::Train, x, gamma, beta, epsilon)?;
    let reduce = channel_reduce_axes(x);
    let mean = x.mean_keepdim(reduce.as_slice())?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(reduce.as_slice())?;
    let y = scale_and_shift(&centered, &var, gamma, beta, epsilon)?;
    let channels = x.dim(1)?;
    Ok((
        y,
        mean.detach().reshape(channels)?,
        var.detach().reshape(channels)?,
    ))
}

/// Inference-mode batch normalization over axis 1 with given statistics (see
/// [`crate::ops::batch_norm_eval`]).
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::reference;
/// let x = Tensor::new(&[[3f32], [5.0]], &Device::Cpu)?;
/// let (mean, var) = (Tensor::new(&[1f32], &Device::Cpu)?, Tensor::new(&[4f32], &Device::Cpu)?);
/// let y = reference::batch_norm_eval(&x, None, None, &mean, &var, 1e-12)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [1.0, 2.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    mean: &Tensor,
    var: &Tensor,
    epsilon: f64,
) -> Result<Tensor> {
    check_batch_norm(BatchNormMode::Eval { mean, var }, x, gamma, beta, epsilon)?;
    let as_x = |t: &Tensor| t.cast(x.dtype());
    let centered = x.broadcast_sub(&channel_view(&as_x(mean)?, x.rank())?)?;
    scale_and_shift(
        &centered,
        &channel_view(&as_x(var)?, x.rank())?,
        gamma,
        beta,
        epsilon,
    )
}

/// `x + bias` broadcast over axis 1.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::reference;
/// let x = Tensor::zeros((1, 2, 1, 1), candle_core::DType::F32, &Device::Cpu)?;
/// let y = reference::bias_add(&x, &Tensor::new(&[1f32, 2.0], &Device::Cpu)?)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [1.0, 2.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    check_bias_add(x, bias)?;
    Ok(x.broadcast_add(&channel_view(bias, x.rank())?)?)
}

/// Every axis but the channel axis 1.
fn channel_reduce_axes(x: &Tensor) -> Vec<usize> {
    (0..x.rank()).filter(|&d| d != 1).collect()
}

/// A `(C,)` tensor as `(1, C, 1, …)`, to broadcast against a rank-`rank` activation.
fn channel_view(t: &Tensor, rank: usize) -> Result<Tensor> {
    let mut shape = vec![1; rank];
    shape[1] = t.dim(D::Minus1)?;
    Ok(t.reshape(shape)?)
}

/// `centered / sqrt(var + epsilon) · gamma + beta`: one per-channel factor, then one broadcast
/// multiply over the activation.
fn scale_and_shift(
    centered: &Tensor,
    var: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    epsilon: f64,
) -> Result<Tensor> {
    let rank = centered.rank();
    let as_channels = |t: &Tensor| channel_view(&t.cast(centered.dtype())?, rank);
    let mut factor = (var + epsilon)?.sqrt()?.recip()?;
    if let Some(gamma) = gamma {
        factor = factor.broadcast_mul(&as_channels(gamma)?)?;
    }
    let y = centered.broadcast_mul(&factor)?;
    Ok(match beta {
        Some(beta) => y.broadcast_add(&as_channels(beta)?)?,
        None => y,
    })
}

/// [`ops::adam_update`](crate::ops::adam_update) from candle's element-wise ops: the
/// optimizer's original arithmetic, and the fused kernels' oracle.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::{reference, AdamStep};
/// let w = Tensor::new(&[1f32], &Device::Cpu)?;
/// let z = w.zeros_like()?;
/// let step = AdamStep { alpha: 0.1, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, decay: 1.0 };
/// let (w1, _, _) = reference::adam_update(&w, &w, &z, &z, step)?;
/// assert!(w1.to_vec1::<f32>()?[0] < 1.0);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn adam_update(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: AdamStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    crate::ops::arguments::check_update("adam_update", w, &[("g", g), ("m", m), ("v", v)])?;
    let m_new = ((m * step.beta_1)? + (g * (1.0 - step.beta_1))?)?;
    let v_new = ((v * step.beta_2)? + (g.sqr()? * (1.0 - step.beta_2))?)?;
    let w = if step.decay != 1.0 {
        (w * step.decay)?
    } else {
        w.clone()
    };
    let update = (&m_new / (v_new.sqrt()? + step.epsilon)?)?;
    let w_new = (w - (update * step.alpha)?)?;
    Ok((w_new, m_new, v_new))
}

/// [`ops::sgd_update`](crate::ops::sgd_update) from candle's element-wise ops.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::{reference, SgdStep};
/// let w = Tensor::new(&[1f32], &Device::Cpu)?;
/// let step = SgdStep { learning_rate: 0.5, momentum: 0.0, nesterov: false, decay: 1.0 };
/// let (w1, _) = reference::sgd_update(&w, &w, None, step)?;
/// assert_eq!(w1.to_vec1::<f32>()?, [0.5]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn sgd_update(
    w: &Tensor,
    g: &Tensor,
    velocity: Option<&Tensor>,
    step: SgdStep,
) -> Result<(Tensor, Option<Tensor>)> {
    crate::ops::arguments::check_update(
        "sgd_update",
        w,
        &crate::ops::arguments::sgd_operands(g, velocity),
    )?;
    let w = if step.decay != 1.0 {
        (w * step.decay)?
    } else {
        w.clone()
    };
    let lr_g = (g * step.learning_rate)?;
    Ok(match velocity {
        Some(u) => {
            let u_new = ((u * step.momentum)? - &lr_g)?;
            let w_new = if step.nesterov {
                ((w + (&u_new * step.momentum)?)? - lr_g)?
            } else {
                (w + &u_new)?
            };
            (w_new, Some(u_new))
        }
        None => ((w - lr_g)?, None),
    })
}

//! Batch normalization: [`batch_norm_train`], [`batch_norm_eval`] and their fused forms, which
//! apply a [`Fusion`]'s ReLUs and Add inside the kernels.

use candle_core::{DType, Tensor};

use crate::Result;
use crate::fusion::Fusion;
use crate::support::dtype::Cast;

use crate::ops::arguments::*;
use crate::ops::backend::{Backend, CPU_FLOATS, CUDNN_GRADIENTS, backend};
#[cfg(feature = "cudnn")]
use crate::ops::cudnn;
use crate::ops::pointwise::{relu, relu_grad};
use crate::ops::{cpu, reference};

/// Training-mode batch normalization over axis 1 of `x` (`(N, C, …)`): normalizes with the
/// batch's mean and *biased* variance, then scales by `gamma` and shifts by `beta` (`(C,)`
/// each; `None` means ones and zeros). Returns `(y, batch_mean, batch_var)`; the statistics
/// are `(C,)`, detached, in f32 for half-precision `x` and in `x`'s dtype otherwise, for the
/// caller's moving averages. Gradients flow to `x`, `gamma` and `beta` through the batch
/// statistics.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::batch_norm_train;
/// let x = Tensor::new(&[[1f32, 3.0], [3.0, 7.0]], &Device::Cpu)?; // (N = 2, C = 2)
/// let (y, mean, var) = batch_norm_train(&x, None, None, 1e-3)?;
/// assert_eq!(mean.to_vec1::<f32>()?, [2.0, 5.0]);
/// assert_eq!(var.to_vec1::<f32>()?, [1.0, 4.0]);
/// assert!((y.get(0)?.get(0)?.to_scalar::<f32>()? + 1.0).abs() < 1e-3);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn batch_norm_train(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    epsilon: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    batch_norm_train_of(x, &[], gamma, beta, epsilon, Fusion::new())
}

/// [`batch_norm_train`] with the element-wise functions of `fusion` applied as the kernels read
/// and write: its prologue (none or [`ElementWise::Relu`](crate::ElementWise::Relu): one input; [`ElementWise::Add`](crate::ElementWise::Add) or
/// [`ElementWise::AddRelu`](crate::ElementWise::AddRelu): two `inputs` of one shape, dtype and device, summed) and its
/// epilogue (none or [`ElementWise::Relu`](crate::ElementWise::Relu)). The article's `relu_bn`,
/// the residual block's `Add → relu_bn` and the usual `BatchNorm → ReLU` as one op. On the
/// CPU the sum and the ReLUs run inside the batch-norm kernels: no pass of their own either
/// way, and the intermediate tensors are never stored. Elsewhere it is candle's add, [`relu`],
/// [`batch_norm_train`] and [`relu`]. Gradients are zero where a ReLU's argument is `≤ 0`, as
/// [`relu`]'s; with two inputs both get the same gradient.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::fused_batch_norm_train;
/// use candle_functional::{ElementWise, Fusion};
/// let a = Tensor::new(&[[-1f32, 3.0], [3.0, 7.0]], &Device::Cpu)?; // (N = 2, C = 2)
/// let before = Fusion::new().with_prologue(ElementWise::Relu);
/// let (_, mean, var) = fused_batch_norm_train(&[&a], before, None, None, 1e-3)?;
/// assert_eq!(mean.to_vec1::<f32>()?, [1.5, 5.0]); // the first channel is [0, 3]
/// assert_eq!(var.to_vec1::<f32>()?, [2.25, 4.0]);
/// let b = Tensor::new(&[[-1f32, 1.0], [-5.0, 1.0]], &Device::Cpu)?;
/// let add_relu = Fusion::new().with_prologue(ElementWise::AddRelu);
/// let (_, mean, _) = fused_batch_norm_train(&[&a, &b], add_relu, None, None, 1e-3)?;
/// assert_eq!(mean.to_vec1::<f32>()?, [0.0, 6.0]); // relu(a + b) is [[0, 4], [0, 8]]
/// let after = Fusion::new().with_epilogue(ElementWise::Relu);
/// let (y, _, _) = fused_batch_norm_train(&[&a], after, None, None, 1e-3)?;
/// assert_eq!(y.min(0)?.to_vec1::<f32>()?, [0.0, 0.0]); // the normalized values' negative half
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn fused_batch_norm_train(
    inputs: &[&Tensor],
    fusion: Fusion,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    epsilon: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x = check_summands("fused_batch_norm_train", inputs, fusion)?;
    batch_norm_train_of(x, &inputs[1..], gamma, beta, epsilon, fusion)
}

/// [`batch_norm_train`] of `x + Σ more` (`more` checked: at most one more tensor like `x`),
/// with the ReLUs of `fusion`.
fn batch_norm_train_of(
    x: &Tensor,
    more: &[&Tensor],
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    epsilon: f64,
    fusion: Fusion,
) -> Result<(Tensor, Tensor, Tensor)> {
    let channels = check_batch_norm(BatchNormMode::Train, x, gamma, beta, epsilon)?;
    let (xs, out_dtype) = statistics_dtype(x)?;
    let (gamma, beta) = affine(gamma, beta, channels, &xs)?;
    #[cfg(feature = "cudnn")]
    const CUDNN_BN: &[DType] = &[DType::F32];
    #[cfg(not(feature = "cudnn"))]
    const CUDNN_BN: &[DType] = &[];
    let backend = backend(&xs, CPU_FLOATS, CUDNN_BN);
    if let Backend::Cpu = backend {
        let inputs = summands(xs, more)?;
        let (y, mean, var) = cpu::batch_norm::train(&inputs, &gamma, &beta, epsilon, fusion)?;
        return Ok((y.cast(out_dtype)?, mean, var));
    }
    let xs = composed_operand(xs, more, fusion.relu_before())?;
    let (y, mean, var) = match backend {
        #[cfg(feature = "cudnn")]
        Backend::Cudnn if cudnn::batch_norm::applies(&xs) => {
            cudnn::batch_norm::train(&xs, &gamma, &beta, epsilon)?
        }
        _ => reference::batch_norm_train(&xs, Some(&gamma), Some(&beta), epsilon)?,
    };
    let y = if fusion.relu_after() { relu(&y)? } else { y };
    Ok((y.cast(out_dtype)?, mean, var))
}

/// The operand a batch norm with `fusion`'s prologue normalizes, composed from separate
/// passes: `inputs[0] + inputs[1]` for a sum, through [`relu`] with a ReLU. What the plan's own
/// backward pass keeps where it composes a fused batch norm ([`batch_norm_train_gradients`]),
/// so that its gradient needs no second pass over the inputs.
pub(crate) fn batch_norm_operand(inputs: &[&Tensor], fusion: Fusion) -> Result<Tensor> {
    let x = check_summands("batch_norm_operand", inputs, fusion)?;
    composed_operand(x.clone(), &inputs[1..], fusion.relu_before())
}

/// The gradients of [`fused_batch_norm_train`] without candle's autograd, for the plan's own
/// backward pass (`train/tape.rs`): `(dX, dgamma, dbeta)` from what the forward pass saw (its
/// inputs, or with `composed` the one operand [`batch_norm_operand`] made of them), the affine
/// weights, the batch statistics, the output `y` (needed with a ReLU after only) and the
/// output's gradient `dy`; `dX` is the gradient of every input (a sum's two get the same).
/// On the CPU one op of the crate's kernels with the ReLUs inside, unless `composed`; off it,
/// or `composed`, the device's batch-norm gradient kernel (cuDNN's on CUDA, the crate's
/// unfused one on the CPU) with the ReLUs' masks as passes of their own: what a CUDA step
/// runs, counted and tested on the CPU. Called where
/// [`has_native_gradients`](crate::ops::has_native_gradients) holds.
pub(crate) fn batch_norm_train_gradients(
    saved: &[Tensor],
    (gamma, beta): (&Tensor, &Tensor),
    (mean, var): (&Tensor, &Tensor),
    (epsilon, fusion): (f64, Fusion),
    y: Option<&Tensor>,
    dy: &Tensor,
    composed: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "batch_norm_train_gradients";
    let Some(x) = saved.first() else {
        return Err(invalid(OP, "saved", "no input".into()));
    };
    let backend = backend(x, CPU_FLOATS, CUDNN_GRADIENTS);
    if let (Backend::Cpu, false) = (&backend, composed) {
        return cpu::batch_norm::train_backward(
            saved,
            (gamma, beta),
            (mean, var),
            epsilon,
            fusion,
            y,
            dy,
        );
    }
    if saved.len() != 1 {
        return Err(invalid(
            OP,
            "saved",
            format!("{} operands, composed takes 1", saved.len()),
        ));
    }
    let dy = match (fusion.relu_after(), y) {
        (true, Some(y)) => relu_grad(dy, y)?,
        (true, None) => {
            return Err(invalid(
                OP,
                "y",
                "a fused ReLU's gradient needs the output".into(),
            ));
        }
        (false, _) => dy.contiguous()?,
    };
    let (dx, dgamma, dbeta) = match backend {
        Backend::Cpu => cpu::batch_norm::train_backward(
            saved,
            (gamma, beta),
            (mean, var),
            epsilon,
            Fusion::new(),
            None,
            &dy,
        )?,
        #[cfg(feature = "cudnn")]
        Backend::Cudnn if cudnn::batch_norm::applies(x) => {
            cudnn::batch_norm::gradients(x, gamma, (mean, var), epsilon, &dy)?
        }
        _ => {
            return Err(invalid(
                OP,
                "saved",
                format!(
                    "no gradient kernels of its own for {:?} on {:?}",
                    x.dtype(),
                    x.device()
                ),
            ));
        }
    };
    // The operand is the ReLU's output: positive exactly where the sum before it was.
    let dx = match fusion.relu_before() {
        true => relu_grad(&dx, x)?,
        false => dx,
    };
    Ok((dx, dgamma, dbeta))
}

/// Inference-mode batch normalization over axis 1 of `x` with given statistics: `y = (x -
/// mean) / sqrt(var + epsilon) · gamma + beta`, all four `(C,)` (`None`: ones and zeros).
/// Differentiable with respect to `x`, `gamma` and `beta`.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::batch_norm_eval;
/// let x = Tensor::new(&[[3f32], [5.0]], &Device::Cpu)?;
/// let (mean, var) = (Tensor::new(&[1f32], &Device::Cpu)?, Tensor::new(&[4f32], &Device::Cpu)?);
/// let y = batch_norm_eval(&x, None, None, &mean, &var, 1e-12)?;
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
    batch_norm_eval_of(x, &[], gamma, beta, mean, var, epsilon, Fusion::new())
}

/// [`batch_norm_eval`] with the element-wise functions of `fusion` (a ReLU and/or an Add
/// before, a ReLU after), as one op on the CPU (see [`fused_batch_norm_train`]).
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::fused_batch_norm_eval;
/// use candle_functional::{ElementWise, Fusion};
/// let x = Tensor::new(&[[-3f32], [5.0]], &Device::Cpu)?;
/// let (mean, var) = (Tensor::new(&[1f32], &Device::Cpu)?, Tensor::new(&[4f32], &Device::Cpu)?);
/// let relu_before = Fusion::new().with_prologue(ElementWise::Relu);
/// let y = fused_batch_norm_eval(&[&x], relu_before, None, None, &mean, &var, 1e-12)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [-0.5, 2.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn fused_batch_norm_eval(
    inputs: &[&Tensor],
    fusion: Fusion,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    mean: &Tensor,
    var: &Tensor,
    epsilon: f64,
) -> Result<Tensor> {
    let x = check_summands("fused_batch_norm_eval", inputs, fusion)?;
    batch_norm_eval_of(x, &inputs[1..], gamma, beta, mean, var, epsilon, fusion)
}

/// [`batch_norm_eval`] of `x + Σ more`, with the ReLUs of `fusion`.
#[allow(clippy::too_many_arguments)]
fn batch_norm_eval_of(
    x: &Tensor,
    more: &[&Tensor],
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    mean: &Tensor,
    var: &Tensor,
    epsilon: f64,
    fusion: Fusion,
) -> Result<Tensor> {
    let channels = check_batch_norm(BatchNormMode::Eval { mean, var }, x, gamma, beta, epsilon)?;
    let (xs, out_dtype) = statistics_dtype(x)?;
    let (gamma, beta) = affine(gamma, beta, channels, &xs)?;
    let (mean, var) = (mean.cast(xs.dtype())?, var.cast(xs.dtype())?);
    let y = match backend(&xs, CPU_FLOATS, &[]) {
        Backend::Cpu => {
            let inputs = summands(xs, more)?;
            cpu::batch_norm::eval(&inputs, &gamma, &beta, &mean, &var, epsilon, fusion)?
        }
        _ => {
            let xs = composed_operand(xs, more, fusion.relu_before())?;
            let y =
                reference::batch_norm_eval(&xs, Some(&gamma), Some(&beta), &mean, &var, epsilon)?;
            if fusion.relu_after() { relu(&y)? } else { y }
        }
    };
    Ok(y.cast(out_dtype)?)
}

/// `xs` and the further summands in `xs`'s dtype, for the CPU kernels.
fn summands(xs: Tensor, more: &[&Tensor]) -> Result<Vec<Tensor>> {
    let dtype = xs.dtype();
    let mut all = vec![xs];
    for t in more {
        all.push(t.cast(dtype)?);
    }
    Ok(all)
}

/// `xs + Σ more`, through [`relu`] with `relu`, from candle's ops (the backends without the
/// fused kernels).
fn composed_operand(xs: Tensor, more: &[&Tensor], relu: bool) -> Result<Tensor> {
    let mut sum = xs;
    for t in more {
        sum = (&sum + t.cast(sum.dtype())?)?;
    }
    if relu { self::relu(&sum) } else { Ok(sum) }
}

/// What [`fused_batch_norm_eval`] does to each channel of an f32/f64 input of `dtype` (no
/// prologue), as the per-channel `scale` and `shift` of `y = max?(scale · x + shift)` (the
/// ReLU with `relu_after`), computed as its CPU kernel computes them, so that a convolution
/// applying them writes the same values. The statistics and weights are `(C,)`.
pub(crate) fn batch_norm_eval_affine(
    (dtype, channels): (DType, usize),
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    (mean, var): (&Tensor, &Tensor),
    epsilon: f64,
    relu_after: bool,
) -> Result<ChannelAffine> {
    const OP: &str = "batch_norm_eval_affine";
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(invalid(
            OP,
            "dtype",
            format!("the folded map is for f32 or f64 inputs, not {dtype:?}"),
        ));
    }
    check_epsilon(OP, epsilon)?;
    let per_channel = [
        ("gamma", gamma),
        ("beta", beta),
        ("mean", Some(mean)),
        ("var", Some(var)),
    ];
    for (argument, t) in per_channel {
        if let Some(t) = t {
            check_per_channel(OP, argument, t, (channels, "the channels"))?;
        }
    }
    // The values the eval kernel reads: each in `dtype` (where stored otherwise, cast as
    // that path casts it), as f64; read without making tensors.
    let values = |t: &Tensor| -> Result<Vec<f64>> {
        let t = match t.dtype() == dtype {
            true => t.clone(),
            false => t.cast(dtype)?,
        };
        Ok(match dtype {
            DType::F64 => t.to_vec1::<f64>()?,
            _ => t.to_vec1::<f32>()?.into_iter().map(f64::from).collect(),
        })
    };
    let or_constant = |t: Option<&Tensor>, value: f64| -> Result<Vec<f64>> {
        t.map_or(Ok(vec![value; channels]), values)
    };
    let (scale, shift) = cpu::batch_norm::scale_shift(
        (&values(mean)?, &values(var)?),
        (&or_constant(gamma, 1.0)?, &or_constant(beta, 0.0)?),
        epsilon,
    );
    Ok(ChannelAffine {
        scale,
        shift,
        relu_after,
    })
}

/// Half-precision activations are normalized in f32 (their statistics would lose too much in
/// bf16): `x` as the statistics' dtype, and the dtype to return `y` in.
fn statistics_dtype(x: &Tensor) -> Result<(Tensor, DType)> {
    Ok(match x.dtype() {
        DType::BF16 | DType::F16 => (x.cast(DType::F32)?, x.dtype()),
        dtype => (x.clone(), dtype),
    })
}

/// `gamma` and `beta` (checked) as `(C,)` tensors in `x`'s dtype, ones and zeros where not
/// given.
fn affine(
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    channels: usize,
    x: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let or_constant = |t: Option<&Tensor>, value: f64| -> Result<Tensor> {
        Ok(match t {
            Some(t) => t.cast(x.dtype())?,
            None => Tensor::full(value, channels, x.device())?.cast(x.dtype())?,
        })
    };
    Ok((or_constant(gamma, 1.0)?, or_constant(beta, 0.0)?))
}

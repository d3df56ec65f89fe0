//! Convolutions: [`conv2d`], [`conv2d_bias`], [`fused_conv2d`] (a bias and a ReLU inside the
//! convolution's op) and [`conv_transpose2d`], each checked, then dispatched.

use candle_core::{DType, Tensor};

use crate::Result;
use crate::fusion::{ElementWise, Fusion};
use crate::support::dtype::Cast;

use crate::ops::arguments::*;
use crate::ops::backend::{Backend, CPU_FLOATS, CUDNN_GRADIENTS, backend};
#[cfg(feature = "cudnn")]
use crate::ops::cudnn;
use crate::ops::pointwise::{bias_add, relu, relu_grad};
use crate::ops::{cpu, reference};

/// Convolves NCHW `x` with an OIHW `kernel` (`(filters, in_channels / groups, kh, kw)`), no
/// bias, differentiable with respect to both.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::{conv2d, Conv2dGeometry};
/// let x = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let k = Tensor::ones((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let g = Conv2dGeometry { pad: (0, 1, 0, 1), stride: 2, dilation: 1, groups: 1 };
/// let y = conv2d(&x, &k, g)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [4.0, 2.0, 2.0, 1.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn conv2d(x: &Tensor, kernel: &Tensor, geometry: Conv2dGeometry) -> Result<Tensor> {
    check_conv2d(x, kernel, &geometry)?;
    if let Some(y) = empty_conv2d(x, kernel, geometry)? {
        return Ok(y);
    }
    #[cfg(feature = "cudnn")]
    const CUDNN_CONV: &[DType] = &[DType::F32, DType::BF16, DType::F16];
    #[cfg(not(feature = "cudnn"))]
    const CUDNN_CONV: &[DType] = &[];
    match backend(x, CPU_FLOATS, CUDNN_CONV) {
        Backend::Cpu => cpu::conv2d::conv2d(x, kernel, None, false, geometry),
        #[cfg(feature = "cudnn")]
        Backend::Cudnn => cudnn::conv2d::conv2d(x, kernel, geometry),
        Backend::Reference => reference::conv2d(x, kernel, geometry),
    }
}

/// [`conv2d`] plus a per-filter `bias` (`(filters,)`, `x`'s dtype and device), differentiable
/// with respect to all three. On the CPU one op: the bias is added as the product is written
/// out and its gradient is summed from the same `dY`, so no second activation-sized tensor is
/// made (or kept for the backward pass); elsewhere [`conv2d`] then [`bias_add`].
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::{conv2d_bias, Conv2dGeometry};
/// let x = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let k = Tensor::ones((2, 1, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let b = Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?;
/// let g = Conv2dGeometry { pad: (0, 1, 0, 1), stride: 2, dilation: 1, groups: 1 };
/// let y = conv2d_bias(&x, &k, &b, g)?;
/// assert_eq!(y.get(0)?.get(1)?.flatten_all()?.to_vec1::<f32>()?, [3.0, 1.0, 1.0, 0.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn conv2d_bias(
    x: &Tensor,
    kernel: &Tensor,
    bias: &Tensor,
    geometry: Conv2dGeometry,
) -> Result<Tensor> {
    conv2d_then("conv2d_bias", x, kernel, Some(bias), false, geometry)
}

/// [`conv2d`], plus a per-filter `bias` where given, then the epilogue of `fusion` (none, or
/// [`ElementWise::Relu`]: `max(·, 0)`): a convolution with Keras's `activation="relu"`, or one
/// whose output only a ReLU reads. A prologue is refused. On the
/// CPU one op (the bias and the ReLU applied as the product is written out, `dY` masked by the
/// output before the convolution's backward), so neither the unbiased nor the pre-ReLU output
/// exists; elsewhere [`conv2d`], [`bias_add`] and [`relu`]. The gradient is zero where the
/// output is 0, as [`relu`]'s.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::{fused_conv2d, Conv2dGeometry};
/// use candle_functional::{ElementWise, Fusion};
/// let x = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let k = Tensor::ones((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let b = Tensor::new(&[-2.5f32], &Device::Cpu)?;
/// let g = Conv2dGeometry { pad: (0, 1, 0, 1), stride: 2, dilation: 1, groups: 1 };
/// let relu_after = Fusion::new().with_epilogue(ElementWise::Relu);
/// let y = fused_conv2d(&x, &k, Some(&b), relu_after, g)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [1.5, 0.0, 0.0, 0.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn fused_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    fusion: Fusion,
    geometry: Conv2dGeometry,
) -> Result<Tensor> {
    if fusion.prologue().is_some() || fusion.epilogue().is_some_and(|e| e != ElementWise::Relu) {
        return Err(invalid(
            "fused_conv2d",
            "fusion",
            format!("only a ReLU after the convolution is fused, got {fusion:?}"),
        ));
    }
    conv2d_then(
        "fused_conv2d",
        x,
        kernel,
        bias,
        fusion.relu_after(),
        geometry,
    )
}

/// The checks and dispatch of [`conv2d_bias`] and [`fused_conv2d`]; `op` names the function in
/// errors.
fn conv2d_then(
    op: &'static str,
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    relu: bool,
    geometry: Conv2dGeometry,
) -> Result<Tensor> {
    check_conv2d_bias(op, x, kernel, bias, &geometry)?;
    if let Backend::Cpu = backend(x, CPU_FLOATS, &[]) {
        return cpu::conv2d::conv2d(x, kernel, bias, relu, geometry);
    }
    let mut y = conv2d(x, kernel, geometry)?;
    if let Some(bias) = bias {
        y = bias_add(&y, bias)?;
    }
    if relu { self::relu(&y) } else { Ok(y) }
}

/// The gradients of [`fused_conv2d`] without candle's autograd, for the plan's own backward
/// pass (`train/tape.rs`): `(dX, dW, dB)` from the saved input, kernel and (with `relu`)
/// output, and the output's gradient `dy`; `dB` where there is a `bias`. On the CPU one op of
/// the crate's kernels (the ReLU's mask and the bias sum inside it), unless `composed`; off it,
/// or `composed`, the gradient kernels of the device (cuDNN's backward-data and
/// backward-filter convolutions on CUDA, the crate's unfused ones on the CPU) with the ReLU's
/// mask and the bias sum as passes of their own: what a CUDA step runs, counted and tested
/// on the CPU. Called where [`has_native_gradients`](crate::ops::has_native_gradients) holds.
pub(crate) fn conv2d_gradients(
    (x, kernel, y): (&Tensor, &Tensor, Option<&Tensor>),
    (bias, relu): (bool, bool),
    geometry: Conv2dGeometry,
    dy: &Tensor,
    composed: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let backend = backend(x, CPU_FLOATS, CUDNN_GRADIENTS);
    if let (Backend::Cpu, false) = (&backend, composed) {
        return cpu::conv2d::conv2d_backward((x, kernel, y), bias, relu, geometry, dy);
    }
    let dy = match (relu, y) {
        (true, Some(y)) => relu_grad(dy, y)?,
        (true, None) => {
            return Err(invalid(
                "conv2d_gradients",
                "y",
                "a fused ReLU's gradient needs the output".into(),
            ));
        }
        (false, _) => dy.contiguous()?,
    };
    let db = match bias {
        true => Some(dy.sum((0, 2, 3))?),
        false => None,
    };
    let (dx, dk) = match backend {
        Backend::Cpu => {
            let (dx, dk, _) =
                cpu::conv2d::conv2d_backward((x, kernel, None), false, false, geometry, &dy)?;
            (dx, dk)
        }
        #[cfg(feature = "cudnn")]
        Backend::Cudnn => cudnn::conv2d::gradients(x, kernel, geometry, &dy)?,
        _ => {
            return Err(invalid(
                "conv2d_gradients",
                "x",
                format!(
                    "no gradient kernels of its own for {:?} on {:?}",
                    x.dtype(),
                    x.device()
                ),
            ));
        }
    };
    Ok((dx, dk, db))
}

/// [`fused_conv2d`]'s output (the bias where given, then `max(·, 0)` with `relu`) passed
/// through `affine` per filter: a BatchNorm in inference, folded into the convolution before
/// it. On the CPU, when nothing asks for a gradient, one op with no backward pass (the map
/// applied in the GEMM path's copy-out; on oneDNN in the weights and bias, or in one pass over
/// the fresh output); else composed from differentiable ops.
pub(crate) fn conv2d_affine(
    x: &Tensor,
    kernel: &Tensor,
    (bias, relu): (Option<&Tensor>, bool),
    affine: &ChannelAffine,
    geometry: Conv2dGeometry,
) -> Result<Tensor> {
    const OP: &str = "conv2d_affine";
    check_conv2d_bias(OP, x, kernel, bias, &geometry)?;
    let filters = kernel.dim(0)?;
    check_affine(OP, filters, affine)?;
    let tracked = x.track_op() || kernel.track_op() || bias.is_some_and(Tensor::track_op);
    if let (Backend::Cpu, false) = (backend(x, CPU_FLOATS, &[]), tracked) {
        return cpu::conv2d::conv2d_affine(x, kernel, (bias, relu), affine, geometry);
    }
    let y = conv2d_then(OP, x, kernel, bias, relu, geometry)?;
    let per_filter = |values: &[f64]| -> Result<Tensor> {
        Ok(Tensor::new(values, x.device())?
            .cast(y.dtype())?
            .reshape((1, filters, 1, 1))?)
    };
    let y = y
        .broadcast_mul(&per_filter(&affine.scale)?)?
        .broadcast_add(&per_filter(&affine.shift)?)?;
    if affine.relu_after {
        self::relu(&y)
    } else {
        Ok(y)
    }
}

/// [`conv2d_affine`] (without `affine`: [`fused_conv2d`] with its bias and ReLU) in
/// inference on oneDNN's layouts (feature `onednn`): `x` in NCHW or in oneDNN's blocked
/// layout nChw{b}c, as a rank-5 `[n, c/b, h, w, b]` tensor, and the output left in the
/// primitive's blocked layout (rank 5) where `blocked_output` and the primitive writes one,
/// else NCHW. A convolution whose output only convolutions and batch norms read hands it
/// over so, and the two reorders between the layouts are saved (`models/inference.rs`). `None` where the
/// crate's f32 CPU kernels do not take `x` (another dtype or device, or a tensor that asks
/// for a gradient): the caller runs the layer as usual, on NCHW.
#[cfg(feature = "onednn")]
pub(crate) fn conv2d_handoff(
    x: &Tensor,
    kernel: &Tensor,
    (bias, relu): (Option<&Tensor>, bool),
    affine: Option<&ChannelAffine>,
    geometry: Conv2dGeometry,
    blocked_output: bool,
) -> Result<Option<Tensor>> {
    const OP: &str = "conv2d_handoff";
    let dims = match *x.dims() {
        [n, blocks, h, w, b] => [n, blocks * b, h, w],
        [n, c, h, w] => [n, c, h, w],
        _ => return Ok(None),
    };
    let tracked = x.track_op() || kernel.track_op() || bias.is_some_and(Tensor::track_op);
    if x.dtype() != DType::F32 || !x.device().is_cpu() || tracked {
        return Ok(None);
    }
    check_conv2d_as(x, dims, kernel, &geometry)?;
    check_bias(OP, x, kernel, bias)?;
    if let Some(affine) = affine {
        check_affine(OP, kernel.dim(0)?, affine)?;
    }
    let y = cpu::conv2d::conv2d_handoff(x, kernel, (bias, relu), affine, geometry, blocked_output)?;
    Ok(Some(y))
}

/// The checks of a convolution with an optional per-filter `bias`; `op` names the function.
fn check_conv2d_bias(
    op: &'static str,
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    geometry: &Conv2dGeometry,
) -> Result<()> {
    check_conv2d(x, kernel, geometry)?;
    check_bias(op, x, kernel, bias)
}

/// A per-filter map for `filters` filters.
fn check_affine(op: &'static str, filters: usize, affine: &ChannelAffine) -> Result<()> {
    if affine.scale.len() != filters || affine.shift.len() != filters {
        return Err(invalid(
            op,
            "affine",
            format!(
                "expected {filters} scales and shifts (the kernel's filters), got {} and {}",
                affine.scale.len(),
                affine.shift.len()
            ),
        ));
    }
    Ok(())
}

/// The checks of a per-filter `bias` of a convolution of `x` with `kernel`.
fn check_bias(op: &'static str, x: &Tensor, kernel: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    if let Some(bias) = bias {
        let filters = kernel.dim(0)?;
        if bias.dims() != [filters] {
            return Err(invalid(
                op,
                "bias",
                format!(
                    "expected shape [{filters}] (the kernel's filters), got {:?}",
                    bias.dims()
                ),
            ));
        }
        same_device_and_dtype(op, "bias", bias, x)?;
    }
    Ok(())
}

/// Transposed convolution (the gradient of a convolution with respect to its input) of NCHW
/// `x` with a `(in_channels, filters, kh, kw)` kernel, no padding and no bias: the output has
/// `(h - 1) * stride + dilation * (kh - 1) + 1` rows (columns likewise). Callers crop or pad
/// that full result to their padding rule. Differentiable with respect to both arguments.
///
/// Candle's own kernel on every backend (its backward is candle's convolution); a cuDNN
/// backward-data path is not written yet.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::conv_transpose2d;
/// let x = Tensor::new(&[[[[1f32, 2.0]]]], &Device::Cpu)?; // (1, 1, 1, 2)
/// let k = Tensor::ones((1, 1, 1, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let y = conv_transpose2d(&x, &k, 2, 1)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [1.0, 1.0, 2.0, 2.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn conv_transpose2d(
    x: &Tensor,
    kernel: &Tensor,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    const OP: &str = "conv_transpose2d";
    let [n, c, h, w] = rank4(OP, "x", x, "NCHW")?;
    let [kc, o, kh, kw] = rank4(OP, "kernel", kernel, "(in, out, kh, kw)")?;
    float_only(OP, x)?;
    same_device_and_dtype(OP, "kernel", kernel, x)?;
    if kc != c || o == 0 || kh == 0 || kw == 0 {
        return Err(invalid(
            OP,
            "kernel",
            format!("shape {:?} does not fit {c} input channels", kernel.dims()),
        ));
    }
    if stride == 0 || dilation == 0 {
        return Err(invalid(
            OP,
            "geometry",
            format!("stride ({stride}) and dilation ({dilation}) must be positive"),
        ));
    }
    // `(len - 1) · stride + dilation · (k - 1) + 1`, every step checked: a stride or dilation
    // near `usize::MAX` is an error here, not a wrapped shape for candle's kernel.
    let full = |len: usize, k: usize, name: &str| {
        if len == 0 {
            return Err(invalid(
                OP,
                "x",
                format!(
                    "input {name} is 0: a transposed convolution needs at least one row and column"
                ),
            ));
        }
        (len - 1)
            .checked_mul(stride)
            .zip((k - 1).checked_mul(dilation))
            .and_then(|(a, b)| a.checked_add(b))
            .and_then(|s| s.checked_add(1))
            .ok_or_else(|| {
                invalid(
                    OP,
                    "geometry",
                    format!(
                        "the output {name} ({len} rows, stride {stride}, {k} taps, dilation {dilation}) overflows"
                    ),
                )
            })
    };
    let out = [n, o, full(h, kh, "height")?, full(w, kw, "width")?];
    check_size(OP, "geometry", &out, x)?;
    if x.elem_count() == 0 {
        // No batch or no input channels: the sum over nothing is 0.
        return Ok(Tensor::zeros(&out, x.dtype(), x.device())?);
    }
    Ok(x.contiguous()?
        .conv_transpose2d(&kernel.contiguous()?, 0, 0, stride, dilation)?)
}

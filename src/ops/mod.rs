//! The kernels layers run on, and the one place in the crate that chooses a backend.
//!
//! Each public function here (and in [`reference`](mod@reference)) checks its arguments, returning
//! [`Error::InvalidOpArgument`] naming the argument, never panicking; then it runs the fastest
//! kernel that this build has for the tensors' device and dtype:
//!
//! | function | CPU, f32/f64 | CUDA, feature `cudnn` | anything else |
//! |---|---|---|---|
//! | [`conv2d`] | im2col + GEMM, own backward (`cpu/conv2d.rs`) | cuDNN forward, backward data and filter (`cudnn/conv2d.rs`) | [`reference::conv2d`] |
//! | [`conv2d_bias`], [`fused_conv2d`] | the same op, the bias and a ReLU applied as the output is written | [`conv2d`], then [`bias_add`], [`relu`] | the same |
//! | [`batch_norm_train`] | fused moments, normalize, analytic backward (`cpu/batch_norm.rs`) | cuDNN training kernels (`cudnn/batch_norm.rs`), f32 | [`reference::batch_norm_train`] |
//! | [`batch_norm_eval`] | fused normalize (`cpu/batch_norm.rs`) | [`reference::batch_norm_eval`] | [`reference::batch_norm_eval`] |
//! | [`fused_batch_norm_train`], [`fused_batch_norm_eval`] | the batch-norm kernels reading `max(x, 0)`, `a + b` or `max(a + b, 0)` and writing `max(y, 0)` ([`BatchNormRelus`]) | candle's add, [`relu`], batch norm, [`relu`] | the same |
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

use candle_core::{DType, Device, Tensor};

use crate::support::dtype::Cast;
use crate::support::sizes;
use crate::{Error, Result};

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "cudnn")]
pub(crate) mod cudnn;
mod multi_tensor;
pub mod reference;

pub use multi_tensor::{
    adam_update_in_place, adam_update_is_finite, all_finite, assign_if, sgd_update_in_place,
    sgd_update_is_finite,
};
pub(crate) use multi_tensor::{assign_checked, check_assignments};

/// Where and how a convolution's window moves: padding on each side, stride, dilation and
/// channel groups.
///
/// # Examples
/// ```
/// use candle_functional::ops::Conv2dGeometry;
/// let g = Conv2dGeometry { pad: (0, 1, 0, 1), stride: 2, dilation: 1, groups: 1 };
/// assert_eq!(g.output_size(32, 32, 3, 3)?, (16, 16));
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dGeometry {
    /// `(top, bottom, left, right)` zero padding.
    pub pad: (usize, usize, usize, usize),
    /// Step of the window along both axes.
    pub stride: usize,
    /// Spacing of the window's taps.
    pub dilation: usize,
    /// Channel groups.
    pub groups: usize,
}

impl Conv2dGeometry {
    /// Output height and width for an `h × w` input and a `kh × kw` kernel; an error when the
    /// stride, dilation or a kernel size is 0, or the (dilated) kernel is larger than the
    /// padded input.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::ops::Conv2dGeometry;
    /// let g = Conv2dGeometry { pad: (1, 1, 1, 1), stride: 1, dilation: 1, groups: 1 };
    /// assert_eq!(g.output_size(8, 8, 3, 3)?, (8, 8));
    /// assert!(g.output_size(1, 1, 5, 5).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> Result<(usize, usize)> {
        const OP: &str = "conv2d";
        for (argument, value) in [
            ("stride", self.stride),
            ("dilation", self.dilation),
            ("kernel height", kh),
            ("kernel width", kw),
        ] {
            if value == 0 {
                return Err(invalid(
                    OP,
                    "geometry",
                    format!("{argument} must be positive"),
                ));
            }
        }
        let (t, b, l, r) = self.pad;
        // Every sum and product here is checked: a padding, stride or dilation near
        // `usize::MAX` is an error, never a wrapped size handed to a kernel.
        let axis = |len: usize, before: usize, after: usize, k: usize, name: &str| {
            let overflow = || {
                invalid(
                    OP,
                    "geometry",
                    format!(
                        "the padded input {name} ({len} + {before} + {after}) or the kernel's \
                         span ({k} taps, dilation {}) overflows",
                        self.dilation
                    ),
                )
            };
            let span = (k - 1)
                .checked_mul(self.dilation)
                .and_then(|s| s.checked_add(1))
                .ok_or_else(overflow)?;
            let padded = len
                .checked_add(before)
                .and_then(|p| p.checked_add(after))
                .ok_or_else(overflow)?;
            padded
                .checked_sub(span)
                .map(|room| room / self.stride + 1)
                .ok_or_else(|| {
                    invalid(
                        OP,
                        "x",
                        format!(
                            "input {name} {len} (padded {padded}) is smaller than the kernel's span {span}"
                        ),
                    )
                })
        };
        Ok((axis(h, t, b, kh, "height")?, axis(w, l, r, kw, "width")?))
    }

    /// The input padded explicitly where a backend's symmetric padding cannot express this
    /// geometry, and the `(h, w)` padding left to the backend. TensorFlow's 'same' padding
    /// puts the odd pixel at the bottom/right (`(0, 1)` for a 3×3 stride-2 window on an even
    /// input); symmetric backends (cuDNN, candle) get that pixel added here. With
    /// `one_padding` the backend takes a single value for both axes (candle's `conv2d`).
    pub(crate) fn symmetric_padding(
        &self,
        x: &Tensor,
        one_padding: bool,
    ) -> Result<(Tensor, (usize, usize))> {
        let (t, b, l, r) = self.pad;
        if t == b && l == r && (t == l || !one_padding) {
            return Ok((x.clone(), (t, l)));
        }
        check_padded("conv2d", x, self.pad)?;
        Ok((x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?, (0, 0)))
    }
}

/// The backend a tensor's kernels run on.
enum Backend {
    /// The crate's own CPU kernels (f32 and f64).
    Cpu,
    /// cuDNN (feature `cudnn`).
    #[cfg(feature = "cudnn")]
    Cudnn,
    /// [`reference`](mod@reference): candle's own ops.
    Reference,
}

/// Picks the backend for `x`: `cpu` and `cudnn` list the dtypes the crate's CPU kernel and
/// its cuDNN kernel take for this op (the latter only counts in a `cudnn` build); an empty `x`
/// always takes the reference.
#[cfg_attr(not(feature = "cudnn"), allow(unused_variables))]
fn backend(x: &Tensor, cpu: &[DType], cudnn: &[DType]) -> Backend {
    // The crate's kernels split their work by channel and image; an empty tensor has no
    // pieces to split, and candle's element-wise ops handle it as it is.
    if x.elem_count() == 0 {
        return Backend::Reference;
    }
    match x.device() {
        Device::Cpu if cpu.contains(&x.dtype()) => Backend::Cpu,
        #[cfg(feature = "cudnn")]
        Device::Cuda(_) if cudnn.contains(&x.dtype()) => Backend::Cudnn,
        _ => Backend::Reference,
    }
}

const CPU_FLOATS: &[DType] = &[DType::F32, DType::F64];

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

/// [`conv2d`], plus a per-filter `bias` where given, then `max(·, 0)` with `relu`: a
/// convolution with Keras's `activation="relu"`, or one whose output only a ReLU reads. On the
/// CPU one op (the bias and the ReLU applied as the product is written out, `dY` masked by the
/// output before the convolution's backward), so neither the unbiased nor the pre-ReLU output
/// exists; elsewhere [`conv2d`], [`bias_add`] and [`relu`]. The gradient is zero where the
/// output is 0, as [`relu`]'s.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::{fused_conv2d, Conv2dGeometry};
/// let x = Tensor::ones((1, 1, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let k = Tensor::ones((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let b = Tensor::new(&[-2.5f32], &Device::Cpu)?;
/// let g = Conv2dGeometry { pad: (0, 1, 0, 1), stride: 2, dilation: 1, groups: 1 };
/// let y = fused_conv2d(&x, &k, Some(&b), true, g)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [1.5, 0.0, 0.0, 0.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn fused_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    relu: bool,
    geometry: Conv2dGeometry,
) -> Result<Tensor> {
    conv2d_then("fused_conv2d", x, kernel, bias, relu, geometry)
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
    check_conv2d(x, kernel, &geometry)?;
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
    if let Backend::Cpu = backend(x, CPU_FLOATS, &[]) {
        return cpu::conv2d::conv2d(x, kernel, bias, relu, geometry);
    }
    let mut y = conv2d(x, kernel, geometry)?;
    if let Some(bias) = bias {
        y = bias_add(&y, bias)?;
    }
    if relu { self::relu(&y) } else { Ok(y) }
}

/// The output of a convolution of an empty batch or of no input channels, where there is
/// nothing to multiply: zeros of the output's shape (a sum over nothing), made here so that no
/// backend kernel sees an empty operand.
pub(crate) fn empty_conv2d(
    x: &Tensor,
    kernel: &Tensor,
    geometry: Conv2dGeometry,
) -> Result<Option<Tensor>> {
    if x.elem_count() != 0 && kernel.elem_count() != 0 {
        return Ok(None);
    }
    let [n, _, h, w] = rank4("conv2d", "x", x, "NCHW")?;
    let [o, _, kh, kw] = rank4("conv2d", "kernel", kernel, "OIHW")?;
    let (oh, ow) = geometry.output_size(h, w, kh, kw)?;
    // A term joined to both operands, broadcast to the output's shape, so their gradients
    // are zeros of their shapes. It is exactly 0 wherever the output has elements (both
    // operands are then empty: no input channels), and an empty output holds none. `s - s`,
    // not `s * 0`: candle's backward drops the operand of a multiplication by 0. Broadcast,
    // not added: candle's binary ops return an empty left operand as it is, unlinked.
    let sum = (x.sum_all()? + kernel.sum_all()?)?;
    #[allow(clippy::eq_op)] // `s - s` on purpose: see above.
    let join = (&sum - &sum)?;
    Ok(Some(join.broadcast_as((n, o, oh, ow))?.contiguous()?))
}

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
    batch_norm_train_of(x, &[], gamma, beta, epsilon, BatchNormRelus::default())
}

/// The ReLUs a fused batch normalization applies inside its kernels: to its operand before
/// normalizing (`before`: the article's ReLU → BatchNorm) and to its result (`after`: the
/// common Conv → BatchNorm → ReLU). Default: none.
///
/// # Examples
/// ```
/// use candle_functional::ops::BatchNormRelus;
/// let relus = BatchNormRelus { after: true, ..Default::default() };
/// assert!(!relus.before);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchNormRelus {
    /// `max(·, 0)` of the operand (`x` or `a + b`) before normalizing.
    pub before: bool,
    /// `max(·, 0)` of the result.
    pub after: bool,
}

/// [`batch_norm_train`] of `x` or of `a + b` (two `inputs` of one shape, dtype and device),
/// with a ReLU before (`relus.before`) and/or after (`relus.after`): the article's `relu_bn`,
/// the residual block's `Add → relu_bn` and the usual `BatchNorm → ReLU` as one op. On the
/// CPU the sum and the ReLUs run inside the batch-norm kernels: no pass of their own either
/// way, and the intermediate tensors are never stored. Elsewhere it is candle's add, [`relu`],
/// [`batch_norm_train`] and [`relu`]. Gradients are zero where a ReLU's argument is `≤ 0`, as
/// [`relu`]'s; with two inputs both get the same gradient.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::{BatchNormRelus, fused_batch_norm_train};
/// let a = Tensor::new(&[[-1f32, 3.0], [3.0, 7.0]], &Device::Cpu)?; // (N = 2, C = 2)
/// let before = BatchNormRelus { before: true, after: false };
/// let (_, mean, var) = fused_batch_norm_train(&[&a], before, None, None, 1e-3)?;
/// assert_eq!(mean.to_vec1::<f32>()?, [1.5, 5.0]); // the first channel is [0, 3]
/// assert_eq!(var.to_vec1::<f32>()?, [2.25, 4.0]);
/// let b = Tensor::new(&[[-1f32, 1.0], [-5.0, 1.0]], &Device::Cpu)?;
/// let (_, mean, _) = fused_batch_norm_train(&[&a, &b], before, None, None, 1e-3)?;
/// assert_eq!(mean.to_vec1::<f32>()?, [0.0, 6.0]); // relu(a + b) is [[0, 4], [0, 8]]
/// let after = BatchNormRelus { before: false, after: true };
/// let (y, _, _) = fused_batch_norm_train(&[&a], after, None, None, 1e-3)?;
/// assert_eq!(y.min(0)?.to_vec1::<f32>()?, [0.0, 0.0]); // the normalized values' negative half
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn fused_batch_norm_train(
    inputs: &[&Tensor],
    relus: BatchNormRelus,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    epsilon: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x = check_summands("fused_batch_norm_train", inputs)?;
    batch_norm_train_of(x, &inputs[1..], gamma, beta, epsilon, relus)
}

/// [`batch_norm_train`] of `x + Σ more` (`more` checked: at most one more tensor like `x`),
/// with the ReLUs of `relus`.
fn batch_norm_train_of(
    x: &Tensor,
    more: &[&Tensor],
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    epsilon: f64,
    relus: BatchNormRelus,
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
        let (y, mean, var) = cpu::batch_norm::train(&inputs, &gamma, &beta, epsilon, relus)?;
        return Ok((y.cast(out_dtype)?, mean, var));
    }
    let xs = composed_operand(xs, more, relus.before)?;
    let (y, mean, var) = match backend {
        #[cfg(feature = "cudnn")]
        Backend::Cudnn if cudnn::batch_norm::applies(&xs) => {
            cudnn::batch_norm::train(&xs, &gamma, &beta, epsilon)?
        }
        _ => reference::batch_norm_train(&xs, Some(&gamma), Some(&beta), epsilon)?,
    };
    let y = if relus.after { relu(&y)? } else { y };
    Ok((y.cast(out_dtype)?, mean, var))
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
    let relus = BatchNormRelus::default();
    batch_norm_eval_of(x, &[], gamma, beta, mean, var, epsilon, relus)
}

/// [`batch_norm_eval`] of `x` or `a + b`, with a ReLU before and/or after, as one op on the
/// CPU (see [`fused_batch_norm_train`]).
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::{BatchNormRelus, fused_batch_norm_eval};
/// let x = Tensor::new(&[[-3f32], [5.0]], &Device::Cpu)?;
/// let (mean, var) = (Tensor::new(&[1f32], &Device::Cpu)?, Tensor::new(&[4f32], &Device::Cpu)?);
/// let relus = BatchNormRelus { before: true, after: false };
/// let y = fused_batch_norm_eval(&[&x], relus, None, None, &mean, &var, 1e-12)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [-0.5, 2.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn fused_batch_norm_eval(
    inputs: &[&Tensor],
    relus: BatchNormRelus,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    mean: &Tensor,
    var: &Tensor,
    epsilon: f64,
) -> Result<Tensor> {
    let x = check_summands("fused_batch_norm_eval", inputs)?;
    batch_norm_eval_of(x, &inputs[1..], gamma, beta, mean, var, epsilon, relus)
}

/// [`batch_norm_eval`] of `x + Σ more`, with the ReLUs of `relus`.
#[allow(clippy::too_many_arguments)]
fn batch_norm_eval_of(
    x: &Tensor,
    more: &[&Tensor],
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    mean: &Tensor,
    var: &Tensor,
    epsilon: f64,
    relus: BatchNormRelus,
) -> Result<Tensor> {
    let channels = check_batch_norm(BatchNormMode::Eval { mean, var }, x, gamma, beta, epsilon)?;
    let (xs, out_dtype) = statistics_dtype(x)?;
    let (gamma, beta) = affine(gamma, beta, channels, &xs)?;
    let (mean, var) = (mean.cast(xs.dtype())?, var.cast(xs.dtype())?);
    let y = match backend(&xs, CPU_FLOATS, &[]) {
        Backend::Cpu => {
            let inputs = summands(xs, more)?;
            cpu::batch_norm::eval(&inputs, &gamma, &beta, &mean, &var, epsilon, relus)?
        }
        _ => {
            let xs = composed_operand(xs, more, relus.before)?;
            let y =
                reference::batch_norm_eval(&xs, Some(&gamma), Some(&beta), &mean, &var, epsilon)?;
            if relus.after { relu(&y)? } else { y }
        }
    };
    Ok(y.cast(out_dtype)?)
}

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

/// One Adam (or AdamW) step's constants: the step size with Keras's bias correction folded
/// in, `alpha = lr · √(1 - β2ᵗ) / (1 - β1ᵗ)`, the decay rates, epsilon (added to `√v`), and
/// the decoupled weight decay as a factor on the weight, `decay = 1 - lr · weight_decay`
/// (1 for plain Adam).
///
/// # Examples
/// ```
/// use candle_functional::ops::AdamStep;
/// let s = AdamStep { alpha: 1e-3, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, decay: 1.0 };
/// assert_eq!(s.decay, 1.0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Step size, bias correction included.
    pub alpha: f64,
    /// Decay of the first moment.
    pub beta_1: f64,
    /// Decay of the second moment.
    pub beta_2: f64,
    /// Added to `√v`.
    pub epsilon: f64,
    /// Factor on the weight before the update (decoupled weight decay), 1 for none.
    pub decay: f64,
}

/// One SGD step's constants, Keras's rule: `u' = μ·u - lr·g`, `w' = decay·w + u'` (Nesterov:
/// `decay·w + μ·u' - lr·g`); without momentum `w' = decay·w - lr·g`.
///
/// # Examples
/// ```
/// use candle_functional::ops::SgdStep;
/// let s = SgdStep { learning_rate: 0.01, momentum: 0.9, nesterov: false, decay: 1.0 };
/// assert_eq!(s.momentum, 0.9);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    /// Step size.
    pub learning_rate: f64,
    /// Momentum `μ` (0 for none: no velocity).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Factor on the weight before the update (decoupled weight decay), 1 for none.
    pub decay: f64,
}

/// The new `(weight, m, v)` of one Adam step of weight `w` with gradient `g` and moments `m`,
/// `v` (all of one shape, dtype and device). Nothing is written: the caller sets them, so a
/// step of many weights can be computed whole before any is applied. On the CPU one fused
/// pass (bit-identical to [`reference::adam_update`]); elsewhere the reference.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::{adam_update, AdamStep};
/// let w = Tensor::new(&[1f32, -1.0], &Device::Cpu)?;
/// let g = Tensor::new(&[0.5f32, -0.5], &Device::Cpu)?;
/// let zeros = w.zeros_like()?;
/// let step = AdamStep { alpha: 0.1, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, decay: 1.0 };
/// let (w1, m1, _v1) = adam_update(&w, &g, &zeros, &zeros, step)?;
/// assert_eq!(m1.to_vec1::<f32>()?, [0.05, -0.05]);
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
    check_update("adam_update", w, &[("g", g), ("m", m), ("v", v)])?;
    match backend(w, CPU_FLOATS, &[]) {
        Backend::Cpu => cpu::optimizer::adam_update(w, g, m, v, &step),
        _ => reference::adam_update(w, g, m, v, step),
    }
}

/// The new `(weight, velocity)` of one SGD step (velocity only with momentum, then required).
/// Nothing is written. On the CPU one fused pass (bit-identical to
/// [`reference::sgd_update`]); elsewhere the reference.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::{sgd_update, SgdStep};
/// let w = Tensor::new(&[1f32], &Device::Cpu)?;
/// let g = Tensor::new(&[2f32], &Device::Cpu)?;
/// let step = SgdStep { learning_rate: 0.5, momentum: 0.0, nesterov: false, decay: 1.0 };
/// let (w1, u1) = sgd_update(&w, &g, None, step)?;
/// assert_eq!((w1.to_vec1::<f32>()?, u1.is_none()), (vec![0.0], true));
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn sgd_update(
    w: &Tensor,
    g: &Tensor,
    velocity: Option<&Tensor>,
    step: SgdStep,
) -> Result<(Tensor, Option<Tensor>)> {
    const OP: &str = "sgd_update";
    check_update(OP, w, &sgd_operands(g, velocity))?;
    if (step.momentum != 0.0) != velocity.is_some() {
        return Err(invalid(
            OP,
            "velocity",
            format!(
                "given: {}, but momentum is {}: a velocity goes with momentum",
                velocity.is_some(),
                step.momentum
            ),
        ));
    }
    match backend(w, CPU_FLOATS, &[]) {
        Backend::Cpu => cpu::optimizer::sgd_update(w, g, velocity, &step),
        _ => reference::sgd_update(w, g, velocity, step),
    }
}

/// [`adam_update`] of many weights at once, each `[w, g, m, v]`: on CUDA (feature `cuda`, f32)
/// one kernel launch for all of them, elsewhere weight by weight. With `keep` (a u8 scalar on
/// the weights' device: the divergence check's verdict), each new value is replaced by the old
/// one where `keep` is 0, decided on the device without reading it back.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::ops::{adam_update_many, AdamStep};
/// let w = Tensor::new(&[1f32, -1.0], &Device::Cpu)?;
/// let z = w.zeros_like()?;
/// let step = AdamStep { alpha: 0.1, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, decay: 1.0 };
/// let skip = Tensor::new(0u8, &Device::Cpu)?;
/// let out = adam_update_many(&[[&w, &w, &z, &z]], step, Some(&skip))?;
/// assert_eq!(out[0].0.to_vec1::<f32>()?, [1.0, -1.0]); // kept: `skip` is 0
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn adam_update_many(
    items: &[[&Tensor; 4]],
    step: AdamStep,
    keep: Option<&Tensor>,
) -> Result<Vec<(Tensor, Tensor, Tensor)>> {
    for [w, g, m, v] in items {
        check_update("adam_update", w, &[("g", g), ("m", m), ("v", v)])?;
    }
    check_keep("adam_update_many", items.first().map(|i| i[0]), keep)?;
    #[cfg(feature = "cuda")]
    if items
        .iter()
        .all(|i| i[0].device().is_cuda() && i[0].dtype() == DType::F32)
        && !items.is_empty()
        && items
            .iter()
            .all(|i| i[0].device().same_device(items[0][0].device()))
    {
        return cuda::adam_update_many(items, &step, keep);
    }
    items
        .iter()
        .map(|[w, g, m, v]| {
            let (w1, m1, v1) = adam_update(w, g, m, v, step)?;
            Ok((
                keep_or(keep, w1, w)?,
                keep_or(keep, m1, m)?,
                keep_or(keep, v1, v)?,
            ))
        })
        .collect()
}

/// [`sgd_update`] of many weights at once, each `(w, g, velocity)`: on CUDA (feature `cuda`,
/// f32) one kernel launch for all, elsewhere weight by weight; `keep` as in
/// [`adam_update_many`].
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::{sgd_update_many, SgdStep};
/// let w = Tensor::new(&[1f32], &Device::Cpu)?;
/// let step = SgdStep { learning_rate: 0.5, momentum: 0.0, nesterov: false, decay: 1.0 };
/// let out = sgd_update_many(&[(&w, &w, None)], step, None)?;
/// assert_eq!(out[0].0.to_vec1::<f32>()?, [0.5]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn sgd_update_many(
    items: &[(&Tensor, &Tensor, Option<&Tensor>)],
    step: SgdStep,
    keep: Option<&Tensor>,
) -> Result<Vec<(Tensor, Option<Tensor>)>> {
    for (w, g, u) in items {
        check_update("sgd_update", w, &sgd_operands(g, *u))?;
        if (step.momentum != 0.0) != u.is_some() {
            return Err(invalid(
                "sgd_update_many",
                "velocity",
                "a velocity goes with momentum, and only with it".into(),
            ));
        }
    }
    check_keep("sgd_update_many", items.first().map(|i| i.0), keep)?;
    #[cfg(feature = "cuda")]
    if items
        .iter()
        .all(|i| i.0.device().is_cuda() && i.0.dtype() == DType::F32)
        && !items.is_empty()
        && items
            .iter()
            .all(|i| i.0.device().same_device(items[0].0.device()))
    {
        return cuda::sgd_update_many(items, &step, keep);
    }
    items
        .iter()
        .map(|(w, g, u)| {
            let (w1, u1) = sgd_update(w, g, *u, step)?;
            let u1 = match (u1, u) {
                (Some(u1), Some(u)) => Some(keep_or(keep, u1, u)?),
                (u1, _) => u1,
            };
            Ok((keep_or(keep, w1, w)?, u1))
        })
        .collect()
}

/// `keep` must be a u8 scalar on the weights' device.
fn check_keep(op: &'static str, w: Option<&Tensor>, keep: Option<&Tensor>) -> Result<()> {
    let (Some(w), Some(keep)) = (w, keep) else {
        return Ok(());
    };
    same_device(op, "keep", keep, w)?;
    if keep.dtype() != DType::U8 || keep.elem_count() != 1 {
        return Err(invalid(
            op,
            "keep",
            format!(
                "a u8 scalar expected, got {:?} {:?}",
                keep.dtype(),
                keep.dims()
            ),
        ));
    }
    Ok(())
}

/// `new`, or `old` where the u8 scalar `keep` is 0: read directly on the CPU (free there),
/// chosen on the device elsewhere (no synchronisation).
fn keep_or(keep: Option<&Tensor>, new: Tensor, old: &Tensor) -> Result<Tensor> {
    let Some(keep) = keep else {
        return Ok(new);
    };
    if keep.device().is_cpu() {
        let flag = keep.flatten_all()?.to_vec1::<u8>()?;
        // A copy: `old` may share storage with the variable the caller sets from the result.
        return if flag.first() == Some(&0) {
            Ok(old.copy()?)
        } else {
            Ok(new)
        };
    }
    Ok(keep
        .flatten_all()?
        .reshape(())?
        .broadcast_as(new.shape())?
        .where_cond(&new, old)?)
}

/// The tensors of an SGD update besides the weight, named for errors.
pub(crate) fn sgd_operands<'a>(
    g: &'a Tensor,
    velocity: Option<&'a Tensor>,
) -> Vec<(&'static str, &'a Tensor)> {
    let mut operands = vec![("g", g)];
    operands.extend(velocity.map(|u| ("velocity", u)));
    operands
}

/// The checks of the optimizer updates: every tensor like `w` (shape, dtype, device).
pub(crate) fn check_update(
    op: &'static str,
    w: &Tensor,
    others: &[(&'static str, &Tensor)],
) -> Result<()> {
    if !w.dtype().is_float() {
        return Err(invalid(
            op,
            "w",
            format!("dtype {:?} is not a float", w.dtype()),
        ));
    }
    for (name, t) in others {
        same_device(op, name, t, w)?;
        if t.dims() != w.dims() || t.dtype() != w.dtype() {
            return Err(invalid(
                op,
                name,
                format!(
                    "{:?} {:?}, but w is {:?} {:?}",
                    t.dtype(),
                    t.dims(),
                    w.dtype(),
                    w.dims()
                ),
            ));
        }
    }
    Ok(())
}

/// An [`Error::InvalidOpArgument`].
fn invalid(op: &'static str, argument: &'static str, message: String) -> Error {
    Error::InvalidOpArgument {
        op,
        argument,
        message,
    }
}

/// An NCHW `x` padded by `(top, bottom, left, right)` must fit in memory: a padding can be
/// huge where the output is small (a huge dilation needs it).
pub(crate) fn check_padded(
    op: &'static str,
    x: &Tensor,
    (top, bottom, left, right): (usize, usize, usize, usize),
) -> Result<()> {
    let [n, c, h, w] = rank4(op, "x", x, "NCHW")?;
    let grown = |len: usize, a: usize, b: usize| len.checked_add(a)?.checked_add(b);
    match (grown(h, top, bottom), grown(w, left, right)) {
        (Some(h), Some(w)) => check_size(op, "geometry", &[n, c, h, w], x),
        _ => Err(invalid(
            op,
            "geometry",
            format!(
                "padding {:?} overflows the input's size",
                (top, bottom, left, right)
            ),
        )),
    }
}

/// A tensor of `dims` in `x`'s dtype must be makeable on `x`'s device: its element and byte
/// counts must not overflow, and on the CPU a buffer past 1 GiB must be available (a failed
/// host allocation aborts the process; a failed device allocation is already an error).
fn check_size(op: &'static str, argument: &'static str, dims: &[usize], x: &Tensor) -> Result<()> {
    let why = sizes::unallocatable(dims, x.dtype().size_in_bytes(), x.device().is_cpu());
    match why {
        Some(why) => Err(invalid(op, argument, why)),
        None => Ok(()),
    }
}

/// `tensor` must be on `x`'s device.
fn same_device(
    op: &'static str,
    argument: &'static str,
    tensor: &Tensor,
    x: &Tensor,
) -> Result<()> {
    if tensor.device().same_device(x.device()) {
        return Ok(());
    }
    Err(invalid(
        op,
        argument,
        format!(
            "on {:?}, but x is on {:?}",
            tensor.device().location(),
            x.device().location()
        ),
    ))
}

/// The four dimensions of a rank-4 argument laid out as `layout`, or an error naming it.
fn rank4(op: &'static str, argument: &'static str, t: &Tensor, layout: &str) -> Result<[usize; 4]> {
    match *t.dims() {
        [a, b, c, d] => Ok([a, b, c, d]),
        _ => Err(invalid(
            op,
            argument,
            format!("expected {layout} (rank 4), got shape {:?}", t.dims()),
        )),
    }
}

/// `tensor` must be on `x`'s device and of its dtype.
fn same_device_and_dtype(
    op: &'static str,
    argument: &'static str,
    tensor: &Tensor,
    x: &Tensor,
) -> Result<()> {
    same_device(op, argument, tensor, x)?;
    if tensor.dtype() != x.dtype() {
        return Err(invalid(
            op,
            argument,
            format!("dtype {:?}, but x is {:?}", tensor.dtype(), x.dtype()),
        ));
    }
    Ok(())
}

/// `x` must hold floats: candle's integer kernels wrap on overflow (and panic on it in a
/// debug build), and nothing here means integer arithmetic.
fn float_only(op: &'static str, x: &Tensor) -> Result<()> {
    if x.dtype().is_float() {
        return Ok(());
    }
    Err(invalid(
        op,
        "x",
        format!("dtype {:?}: this op takes floats", x.dtype()),
    ))
}

/// The checks of [`conv2d`] and [`reference::conv2d`].
pub(crate) fn check_conv2d(x: &Tensor, kernel: &Tensor, g: &Conv2dGeometry) -> Result<()> {
    const OP: &str = "conv2d";
    let [_, c, h, w] = rank4(OP, "x", x, "NCHW")?;
    let [o, kc, kh, kw] = rank4(OP, "kernel", kernel, "OIHW")?;
    float_only(OP, x)?;
    same_device_and_dtype(OP, "kernel", kernel, x)?;
    if g.groups == 0 {
        return Err(invalid(OP, "geometry", "groups must be positive".into()));
    }
    if o == 0 || !o.is_multiple_of(g.groups) {
        return Err(invalid(
            OP,
            "kernel",
            format!(
                "{o} filters is not a positive multiple of groups = {}",
                g.groups
            ),
        ));
    }
    if kc * g.groups != c {
        return Err(invalid(
            OP,
            "kernel",
            format!(
                "takes {kc} input channels per group × {} groups = {}, but x has {c}",
                g.groups,
                kc * g.groups
            ),
        ));
    }
    let (oh, ow) = g.output_size(h, w, kh, kw)?;
    let n = x.dim(0)?;
    check_size(OP, "geometry", &[n, o, oh, ow], x)?;
    // The CPU kernel's im2col buffer holds one image's patches at least.
    check_size(OP, "geometry", &[kc, kh, kw, oh, ow], x)
}

/// Which batch normalization is being checked: training needs a non-empty batch, inference
/// needs the statistics.
#[derive(Clone, Copy)]
pub(crate) enum BatchNormMode<'a> {
    Train,
    Eval { mean: &'a Tensor, var: &'a Tensor },
}

/// The checks of the batch-norm functions here and in [`reference`](mod@reference): `x` float of rank ≥ 2,
/// `epsilon` positive, every per-channel tensor `(C,)`, float, on `x`'s device. Returns C.
pub(crate) fn check_batch_norm(
    mode: BatchNormMode,
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    epsilon: f64,
) -> Result<usize> {
    let op = match mode {
        BatchNormMode::Train => "batch_norm_train",
        BatchNormMode::Eval { .. } => "batch_norm_eval",
    };
    if x.rank() < 2 || !x.dtype().is_float() {
        return Err(invalid(
            op,
            "x",
            format!(
                "expected a float tensor (N, C, ...), got {:?} of shape {:?}",
                x.dtype(),
                x.dims()
            ),
        ));
    }
    let channels = x.dim(1)?;
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(invalid(
            op,
            "epsilon",
            format!("must be positive and finite, got {epsilon}"),
        ));
    }
    let statistics = match mode {
        BatchNormMode::Train if x.elem_count() == 0 => {
            return Err(invalid(
                op,
                "x",
                format!(
                    "batch statistics need at least one value per channel, got shape {:?}",
                    x.dims()
                ),
            ));
        }
        BatchNormMode::Train => [None, None],
        BatchNormMode::Eval { mean, var } => [Some(mean), Some(var)],
    };
    let per_channel = [("gamma", gamma), ("beta", beta)]
        .into_iter()
        .chain(["mean", "var"].into_iter().zip(statistics));
    for (argument, t) in per_channel {
        let Some(t) = t else { continue };
        if t.dims() != [channels] || !t.dtype().is_float() {
            return Err(invalid(
                op,
                argument,
                format!(
                    "expected a float tensor of shape [{channels}] (x's channels), got {:?} of shape {:?}",
                    t.dtype(),
                    t.dims()
                ),
            ));
        }
        same_device(op, argument, t, x)?;
    }
    Ok(channels)
}

/// The checks of [`bias_add`] and [`reference::bias_add`].
pub(crate) fn check_bias_add(x: &Tensor, bias: &Tensor) -> Result<()> {
    const OP: &str = "bias_add";
    if x.rank() < 2 {
        return Err(invalid(
            OP,
            "x",
            format!("expected (N, C, ...), got shape {:?}", x.dims()),
        ));
    }
    float_only(OP, x)?;
    if bias.dims() != [x.dim(1)?] {
        return Err(invalid(
            OP,
            "bias",
            format!(
                "expected shape [{}] (x's channels), got {:?}",
                x.dim(1)?,
                bias.dims()
            ),
        ));
    }
    same_device_and_dtype(OP, "bias", bias, x)
}

/// The checks of the fused batch-norm functions' `inputs`: one or two tensors of one shape,
/// dtype and device. Returns the first.
fn check_summands<'a>(op: &'static str, inputs: &[&'a Tensor]) -> Result<&'a Tensor> {
    let (first, more) = match inputs {
        [first, more @ ..] if more.len() <= 1 => (*first, more),
        _ => {
            return Err(invalid(
                op,
                "inputs",
                format!("one or two tensors expected, got {}", inputs.len()),
            ));
        }
    };
    for t in more {
        if t.dims() != first.dims() {
            return Err(invalid(
                op,
                "inputs",
                format!("shapes {:?} and {:?} differ", first.dims(), t.dims()),
            ));
        }
        same_device_and_dtype(op, "inputs", t, first)?;
    }
    Ok(first)
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

//! What the ops take and how they check it: the convolution's geometry, the optimizer steps'
//! constants, and the argument checks every backend shares (each an
//! [`Error::InvalidOpArgument`] naming the op and the argument, never a panic), with the
//! outputs of empty operands, which no backend's kernel computes.

use candle_core::{DType, Tensor};

use crate::fusion::{ElementWise, Fusion};
use crate::support::sizes;
use crate::{Error, Result};

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

/// A per-filter affine map applied to a convolution's output as it is written,
/// `y = max?(scale_c · v + shift_c)` (the ReLU with `relu_after`): a BatchNorm in inference
/// (its moving statistics, gamma and beta folded into `scale` and `shift`) run inside the
/// convolution before it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ChannelAffine {
    pub(crate) scale: Vec<f64>,
    pub(crate) shift: Vec<f64>,
    pub(crate) relu_after: bool,
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

/// `keep` must be a u8 scalar on the weights' device.
pub(crate) fn check_keep(
    op: &'static str,
    w: Option<&Tensor>,
    keep: Option<&Tensor>,
) -> Result<()> {
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
pub(crate) fn invalid(op: &'static str, argument: &'static str, message: String) -> Error {
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
pub(crate) fn check_size(
    op: &'static str,
    argument: &'static str,
    dims: &[usize],
    x: &Tensor,
) -> Result<()> {
    let why = sizes::unallocatable(dims, x.dtype().size_in_bytes(), x.device().is_cpu());
    match why {
        Some(why) => Err(invalid(op, argument, why)),
        None => Ok(()),
    }
}

/// `tensor` must be on `x`'s device.
pub(crate) fn same_device(
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
pub(crate) fn rank4(
    op: &'static str,
    argument: &'static str,
    t: &Tensor,
    layout: &str,
) -> Result<[usize; 4]> {
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
pub(crate) fn same_device_and_dtype(
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
pub(crate) fn float_only(op: &'static str, x: &Tensor) -> Result<()> {
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
    check_conv2d_as(x, rank4("conv2d", "x", x, "NCHW")?, kernel, g)
}

/// [`check_conv2d`] for an `x` whose NCHW dims are `dims`: a tensor in oneDNN's blocked
/// layout, of rank 5, is checked as the NCHW tensor it holds.
pub(crate) fn check_conv2d_as(
    x: &Tensor,
    [n, c, h, w]: [usize; 4],
    kernel: &Tensor,
    g: &Conv2dGeometry,
) -> Result<()> {
    const OP: &str = "conv2d";
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
    check_epsilon(op, epsilon)?;
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
        check_per_channel(op, argument, t, (channels, "x's channels"))?;
        same_device(op, argument, t, x)?;
    }
    Ok(channels)
}

/// A per-channel argument of a batch norm: a float tensor of shape `[channels]` (`whose`
/// says whose channels, for the error).
pub(crate) fn check_per_channel(
    op: &'static str,
    argument: &'static str,
    t: &Tensor,
    (channels, whose): (usize, &str),
) -> Result<()> {
    if t.dims() != [channels] || !t.dtype().is_float() {
        return Err(invalid(
            op,
            argument,
            format!(
                "expected a float tensor of shape [{channels}] ({whose}), got {:?} of shape {:?}",
                t.dtype(),
                t.dims()
            ),
        ));
    }
    Ok(())
}

/// A batch norm's `epsilon`: positive and finite.
pub(crate) fn check_epsilon(op: &'static str, epsilon: f64) -> Result<()> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(invalid(
            op,
            "epsilon",
            format!("must be positive and finite, got {epsilon}"),
        ));
    }
    Ok(())
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

/// The checks of the fused batch-norm functions' `inputs` and `fusion`: as many tensors of one
/// shape, dtype and device as the prologue takes, and at most a ReLU after. Returns the first.
pub(crate) fn check_summands<'a>(
    op: &'static str,
    inputs: &[&'a Tensor],
    fusion: Fusion,
) -> Result<&'a Tensor> {
    if fusion.epilogue().is_some_and(|e| e != ElementWise::Relu) {
        return Err(invalid(
            op,
            "fusion",
            format!("only a ReLU can follow a batch norm, got {fusion:?}"),
        ));
    }
    let (first, more) = match inputs {
        [first, more @ ..] if inputs.len() == fusion.arity() => (*first, more),
        _ => {
            return Err(invalid(
                op,
                "inputs",
                format!(
                    "{} tensor(s) expected for {:?}, got {}",
                    fusion.arity(),
                    fusion.prologue(),
                    inputs.len()
                ),
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

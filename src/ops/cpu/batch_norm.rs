//! Fused batch normalization over the channel axis of contiguous `(N, C, …)` tensors on the
//! CPU, with its analytic backward pass.
//!
//! Composed from candle's ops, a training-mode BatchNorm reduces over axes (0, 2, 3) of an
//! NCHW tensor several times (mean, variance, and the backward of every broadcast). Here: one
//! pass for the batch moments, one to normalize, and two for the backward pass (the
//! per-channel sums, then the input gradient).
//!
//! The kernels can also normalize `max(x, 0)`, `a + b` or `max(a + b, 0)` (an [`Operand`],
//! read from the ReLU's or the Add's inputs: the article's `relu_bn` and its residual
//! `Add → relu_bn`), and return `max(y, 0)` (the usual Conv → BatchNorm → ReLU), all in the
//! same passes: the ReLU's and the Add's own passes are gone either way, and their outputs
//! are never kept alive until the backward pass.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{Float, LaneSums, contiguous_slice, par_fill, split};
use crate::Result;
use crate::fusion::Fusion;
use crate::support::dtype::Cast;

/// Training mode (arguments checked by [`crate::ops::batch_norm_train`]): `(y, batch mean,
/// biased batch variance)` of the sum of `inputs` (one or two tensors of one shape), passed
/// through `max(·, 0)` with `fusion.relu_before()`; `y` through `max(·, 0)` with `fusion.relu_after()`.
pub(crate) fn train(
    inputs: &[Tensor],
    gamma: &Tensor,
    beta: &Tensor,
    epsilon: f64,
    fusion: Fusion,
) -> Result<(Tensor, Tensor, Tensor)> {
    let inputs = contiguous(inputs)?;
    let moments = Moments {
        relu: fusion.relu_before(),
    };
    let stats = match &inputs[..] {
        [x] => x.apply_op1_no_bwd(&moments)?,
        [a, b] => a.apply_op2_no_bwd(b, &moments)?,
        _ => return Err(candle_core::Error::Msg("batch norm: one or two inputs".into()).into()),
    };
    let y = normalize(&inputs, &stats, gamma, beta, epsilon, true, fusion)?;
    Ok((y, stats.get(0)?, stats.get(1)?))
}

/// The gradients of [`train`] without candle's autograd, for the plan's own backward pass
/// (`train/tape.rs`): `(dX, dgamma, dbeta)` from the inputs (one, or the two the prologue
/// adds; both get `dX`), the affine weights and batch statistics of the forward pass, its
/// output `y` (needed with a ReLU after only) and the output's gradient `dy`.
pub(crate) fn train_backward(
    inputs: &[Tensor],
    (gamma, beta): (&Tensor, &Tensor),
    (mean, var): (&Tensor, &Tensor),
    epsilon: f64,
    fusion: Fusion,
    y: Option<&Tensor>,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let inputs = contiguous(inputs)?;
    let inputs: Vec<&Tensor> = inputs.iter().collect();
    let stats = Tensor::stack(&[mean, var], 0)?;
    let packed = Tensor::cat(&[&stats, &Tensor::stack(&[gamma, beta], 0)?], 0)?;
    let op = Normalize {
        epsilon,
        batch_stats: true,
        relu: fusion.relu_before(),
        relu_out: fusion.relu_after(),
    };
    let (dx, sums) = op.gradients(&inputs, &packed, y, dy)?;
    let sums = sums.cast(packed.dtype())?;
    Ok((dx, sums.get(0)?, sums.get(1)?))
}

/// Inference mode with given statistics (arguments checked by [`crate::ops::batch_norm_eval`]),
/// of the sum of `inputs`, with the ReLUs of `fusion`.
pub(crate) fn eval(
    inputs: &[Tensor],
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    epsilon: f64,
    fusion: Fusion,
) -> Result<Tensor> {
    let stats = Tensor::stack(&[mean, var], 0)?;
    normalize(
        &contiguous(inputs)?,
        &stats,
        gamma,
        beta,
        epsilon,
        false,
        fusion,
    )
}

fn contiguous(inputs: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
    inputs.iter().map(|t| t.contiguous()).collect()
}

/// Normalizes the operand of `inputs` with `stats = [mean; var]` `(2, C)`, then scales and
/// shifts.
fn normalize(
    inputs: &[Tensor],
    stats: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    epsilon: f64,
    batch_stats: bool,
    fusion: Fusion,
) -> Result<Tensor> {
    // One `(4, C)` tensor of per-channel values, so that two inputs fit a three-operand op;
    // the statistics carry no gradient, gamma's and beta's rows do.
    let packed = Tensor::cat(&[stats, &Tensor::stack(&[gamma, beta], 0)?], 0)?;
    let op = Normalize {
        epsilon,
        batch_stats,
        relu: fusion.relu_before(),
        relu_out: fusion.relu_after(),
    };
    Ok(match inputs {
        [x] => x.apply_op2(&packed, op)?,
        [a, b] => a.apply_op3(b, &packed, op)?,
        _ => return Err(candle_core::Error::Msg("batch norm: one or two inputs".into()).into()),
    })
}

/// What the kernels normalize, element by element: `a`, or `a + b` (added in the tensors' own
/// float type, as the Add layer would), then `max(·, 0)` with `relu` (NaN stays NaN, as in
/// [`crate::ops::relu`]).
#[derive(Clone, Copy)]
struct Operand<'a, T> {
    a: &'a [T],
    b: Option<&'a [T]>,
    relu: bool,
}

impl<'a, T: Float> Operand<'a, T> {
    /// `a` alone or `a + b` from one or two slices.
    fn new(parts: &[&'a [T]], relu: bool) -> Self {
        Self {
            a: parts[0],
            b: parts.get(1).copied(),
            relu,
        }
    }

    /// Elements `start..start + len`: a slice of `a`, or `a + b` written into `scratch`. The
    /// ReLU is left to the caller's loop ([`Float::relu_if`]).
    fn row<'s>(&'s self, start: usize, len: usize, scratch: &'s mut Vec<T>) -> &'s [T] {
        let a = &self.a[start..start + len];
        match self.b {
            None => a,
            Some(b) => {
                scratch.clear();
                scratch.extend(a.iter().zip(&b[start..start + len]).map(|(&u, &v)| u + v));
                scratch
            }
        }
    }
}

/// The f32 or f64 elements of contiguous CPU storages of one float type.
enum Slices<'a> {
    F32(Vec<&'a [f32]>),
    F64(Vec<&'a [f64]>),
}

fn slices<'a>(parts: &[(&'a CpuStorage, &'a Layout)]) -> candle_core::Result<Slices<'a>> {
    let kernel = "batch norm";
    let mut out = match parts[0].0 {
        CpuStorage::F32(_) => Slices::F32(Vec::new()),
        CpuStorage::F64(_) => Slices::F64(Vec::new()),
        _ => candle_core::bail!("{kernel}: f32 or f64 expected"),
    };
    for &(s, l) in parts {
        match (&mut out, s) {
            (Slices::F32(v), CpuStorage::F32(d)) => v.push(contiguous_slice(d, l, kernel)?),
            (Slices::F64(v), CpuStorage::F64(d)) => v.push(contiguous_slice(d, l, kernel)?),
            _ => candle_core::bail!("{kernel}: tensors of one float type expected"),
        }
    }
    Ok(out)
}

/// Runs the generic `$kernel(slices, args…)` on the storages `$parts` as f32 or f64, wrapping
/// the `Vec` it returns into the storage of that type.
macro_rules! on_slices {
    ($parts:expr, |$s:ident| $body:expr) => {
        match slices($parts)? {
            Slices::F32($s) => CpuStorage::F32($body),
            Slices::F64($s) => CpuStorage::F64($body),
        }
    };
}

/// The per-channel values of a `(k, C)` tensor as f64, row after row.
fn per_channel(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.flatten_all()?.cast(DType::F64)?.to_vec1::<f64>()
}

/// `1 / sqrt(var + epsilon)` per channel.
/// Per channel, the `(a, b)` of batch normalization as `y = a · x + b`: `a = gamma / √(var +
/// ε)`, `b = beta - mean · a`. The one formula of the normalize kernel and of a batch norm
/// folded into the convolution before it ([`crate::ops::ChannelAffine`]), so that both write
/// the same values.
pub(crate) fn scale_shift(
    (mean, var): (&[f64], &[f64]),
    (gamma, beta): (&[f64], &[f64]),
    epsilon: f64,
) -> (Vec<f64>, Vec<f64>) {
    let rstd = inverse_std(var, epsilon);
    let scale: Vec<f64> = rstd.iter().zip(gamma).map(|(r, g)| r * g).collect();
    let shift = (beta.iter().zip(mean).zip(&scale))
        .map(|((b, m), a)| b - m * a)
        .collect();
    (scale, shift)
}

fn inverse_std(var: &[f64], epsilon: f64) -> Vec<f64> {
    var.iter().map(|v| 1.0 / (v + epsilon).sqrt()).collect()
}

fn to_float<T: Float>(values: Vec<f64>) -> Vec<T> {
    values.into_iter().map(T::from_f64).collect()
}

/// Per-channel batch mean and biased variance of the operand, as a `(2, C)` tensor (no
/// gradient): of `x` (one input) or of `a + b` (two), through `max(·, 0)` with `relu`.
struct Moments {
    relu: bool,
}

impl Moments {
    fn compute(
        &self,
        parts: &[(&CpuStorage, &Layout)],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = split(parts[0].1.dims());
        let out = on_slices!(parts, |s| moments(Operand::new(&s, self.relu), dims));
        Ok((out, Shape::from((2, dims.1))))
    }
}

impl CustomOp1 for Moments {
    fn name(&self) -> &'static str {
        "batch-norm-moments"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.compute(&[(s, l)])
    }
}

impl CustomOp2 for Moments {
    fn name(&self) -> &'static str {
        "batch-norm-moments"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.compute(&[(sa, la), (sb, lb)])
    }
}

/// Images per task of the per-channel sums. Fixed, so that the order of the adds, and with it
/// every bit of the result, does not depend on the number of threads.
const IMAGES_PER_TASK: usize = 8;

/// Channels per task of the per-channel sums: more tasks than images alone would give at
/// small batches, without changing any channel's order of adds.
const CHANNELS_PER_TASK: usize = 16;

/// Per channel, the two sums that `row(image, channel, sums, scratch)` adds to over all images
/// of an `(n, c, …)` layout: in parallel over blocks of images and of channels, in memory
/// order within a task, the blocks' sums added in image order.
fn per_channel_sums<T: Float>(
    (n, c, _): (usize, usize, usize),
    row: impl Fn(usize, usize, &mut LaneSums<T>, &mut Vec<T>) + Sync,
) -> Vec<(f64, f64)> {
    let image_blocks = n.div_ceil(IMAGES_PER_TASK);
    let channel_blocks = c.div_ceil(CHANNELS_PER_TASK);
    let blocks: Vec<Vec<(f64, f64)>> = (0..image_blocks * channel_blocks)
        .into_par_iter()
        .map(|task| {
            let (images, channels) = (task / channel_blocks, task % channel_blocks);
            let channels =
                channels * CHANNELS_PER_TASK..((channels + 1) * CHANNELS_PER_TASK).min(c);
            let mut scratch = Vec::new();
            let mut sums: Vec<LaneSums<T>> = channels.clone().map(|_| LaneSums::new()).collect();
            for i in images * IMAGES_PER_TASK..((images + 1) * IMAGES_PER_TASK).min(n) {
                for (s, ch) in sums.iter_mut().zip(channels.clone()) {
                    row(i, ch, s, &mut scratch);
                }
            }
            sums.into_iter().map(LaneSums::totals).collect()
        })
        .collect();
    let mut total = vec![(0.0, 0.0); c];
    for (task, sums) in blocks.into_iter().enumerate() {
        let first = (task % channel_blocks) * CHANNELS_PER_TASK;
        for (t, s) in total[first..].iter_mut().zip(sums) {
            t.0 += s.0;
            t.1 += s.1;
        }
    }
    total
}

/// `[mean; var]` per channel (biased variance, in the operand's type). The squares are of
/// the distance to a per-channel shift (the channel's first value), so that `E[u²] - E[u]²`
/// does not cancel away a variance that is small beside the mean.
fn moments<T: Float>(x: Operand<T>, dims: (usize, usize, usize)) -> Vec<T> {
    let (n, c, inner) = dims;
    let count = (n * inner) as f64;
    let relu = x.relu;
    let mut scratch: Vec<T> = Vec::new();
    let shift: Vec<T> = (0..c)
        .map(|ch| match n * inner {
            0 => T::ZERO,
            _ => x.row(ch * inner, 1, &mut scratch)[0].relu_if(relu),
        })
        .collect();
    let sums = per_channel_sums(dims, |i, ch, sums, scratch| {
        let row = x.row((i * c + ch) * inner, inner, scratch);
        let s = shift[ch];
        sums.add(row, row, |v, _| {
            let u = v.relu_if(relu) - s;
            (u, u * u)
        })
    });
    let mean = sums
        .iter()
        .zip(&shift)
        .map(|(s, shift)| shift.to_f64() + s.0 / count);
    let var = sums.iter().map(|s| {
        let m = s.0 / count;
        (s.1 / count - m * m).max(0.0)
    });
    to_float(mean.chain(var).collect())
}

/// `y = (x - mean) · rstd · gamma + beta` of the operand `x`, with `packed = [mean; var;
/// gamma; beta]` `(4, C)`. With `batch_stats` the statistics are the batch's own, and the
/// backward pass accounts for them; otherwise they are constants (inference). Where the
/// operand has a ReLU, the input gradient is zero where its argument is `≤ 0`; with two inputs
/// both get the same gradient. With `relu_out` the result is `max(y, 0)`, and the gradient
/// reaching `y` is zero where the result is not positive.
struct Normalize {
    epsilon: f64,
    batch_stats: bool,
    relu: bool,
    relu_out: bool,
}

impl Normalize {
    fn compute(
        &self,
        parts: &[(&CpuStorage, &Layout)],
        packed: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = split(parts[0].1.dims());
        let c = dims.1;
        let p = super::to_vec_f64(packed.0, packed.1)?;
        let (scale, shift) = scale_shift(
            (&p[..c], &p[c..2 * c]),
            (&p[2 * c..3 * c], &p[3 * c..4 * c]),
            self.epsilon,
        );
        let (relu, relu_out) = (self.relu, self.relu_out);
        let out = on_slices!(parts, |s| {
            let x = Operand::new(&s, relu);
            // SAFETY: the rows tile each image; `normalize_row` writes each in full.
            unsafe {
                par_fill(x.a.len(), c * dims.2, "batch norm", |i, img| {
                    let mut scratch = Vec::new();
                    for (ch, dst) in img.chunks_mut(dims.2.max(1)).enumerate() {
                        let src = x.row((i * c + ch) * dims.2, dims.2, &mut scratch);
                        let (a, b) = (scale[ch], shift[ch]);
                        normalize_row(dst, src, a, b, relu, relu_out);
                    }
                })?
            }
        });
        Ok((out, Shape::from(parts[0].1.dims())))
    }

    /// The gradients of the inputs (one tensor, for each input) and of `packed`; `y`, the
    /// output, is needed with `relu_out` only.
    fn backward(
        &self,
        inputs: &[&Tensor],
        packed: &Tensor,
        y: Option<&Tensor>,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (dx, sums) = self.gradients(inputs, packed, y, dy)?;
        let no_stats = Tensor::zeros((2, packed.dim(1)?), sums.dtype(), sums.device())?;
        let dpacked = Tensor::cat(&[&no_stats, &sums], 0)?.cast(packed.dtype())?;
        Ok((dx, dpacked))
    }

    /// The input gradient and `[dgamma ; dbeta]` (`(2, C)`, in the sums' dtype).
    fn gradients(
        &self,
        inputs: &[&Tensor],
        packed: &Tensor,
        y: Option<&Tensor>,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let dy = match (self.relu_out, y) {
            (true, Some(y)) => super::relu::grad(dy, y)?,
            (true, None) => {
                candle_core::bail!("batch norm backward: a ReLU after needs the output")
            }
            (false, _) => dy.contiguous()?,
        };
        let ops = GradOps {
            epsilon: self.epsilon,
            batch_stats: self.batch_stats,
            relu: self.relu,
            packed: packed.clone(),
            sums: None,
        };
        // [Σ dy·x̂ ; Σ dy] is exactly [dgamma ; dbeta].
        let sums = ops.apply(&dy, inputs)?;
        let dx = GradOps {
            sums: Some(sums.clone()),
            ..ops
        }
        .apply(&dy, inputs)?;
        Ok((dx, sums))
    }
}

/// `dst = max?(max?(src) · a + b)`, the ReLUs where `relu` (before) and `relu_out` (after),
/// in the elements' own type.
/// Writes all of `dst`, which is as long as `src`.
fn normalize_row<T: Float>(
    dst: &mut [MaybeUninit<T>],
    src: &[T],
    a: f64,
    b: f64,
    relu: bool,
    relu_out: bool,
) {
    debug_assert_eq!(dst.len(), src.len());
    let (a, b) = (T::from_f64(a), T::from_f64(b));
    for (d, &v) in dst.iter_mut().zip(src) {
        d.write((v.relu_if(relu) * a + b).relu_if(relu_out));
    }
}

impl CustomOp2 for Normalize {
    fn name(&self) -> &'static str {
        "batch-norm-normalize"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.compute(&[(sx, lx)], (sp, lp))
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dpacked) = self.backward(&[x], packed, Some(y), dy)?;
        Ok((Some(dx), Some(dpacked)))
    }
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "batch-norm-normalize-sum"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.compute(&[(sa, la), (sb, lb)], (sp, lp))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        packed: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dpacked) = self.backward(&[a, b], packed, Some(y), dy)?;
        Ok((Some(dx.clone()), Some(dx), Some(dpacked)))
    }
}

/// The backward kernels on `(dy, operand…)`: without `sums`, `[Σ dy·x̂ ; Σ dy]` per channel
/// `(2, C)`; with them (that result), the input gradient.
#[derive(Clone)]
struct GradOps {
    epsilon: f64,
    batch_stats: bool,
    relu: bool,
    packed: Tensor,
    sums: Option<Tensor>,
}

impl GradOps {
    fn apply(&self, dy: &Tensor, inputs: &[&Tensor]) -> candle_core::Result<Tensor> {
        match inputs {
            [x] => dy.apply_op2_no_bwd(x, self),
            [a, b] => dy.apply_op3_no_bwd(a, b, self),
            _ => candle_core::bail!("batch norm: one or two inputs expected"),
        }
    }

    fn compute(
        &self,
        parts: &[(&CpuStorage, &Layout)],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = split(parts[0].1.dims());
        let c = dims.1;
        let p = per_channel(&self.packed)?;
        let (mean, rstd, gamma) = (
            &p[..c],
            inverse_std(&p[c..2 * c], self.epsilon),
            &p[2 * c..3 * c],
        );
        let relu = self.relu;
        let Some(sums) = &self.sums else {
            let out = on_slices!(parts, |s| {
                to_float(grad_sums(
                    s[0],
                    Operand::new(&s[1..], relu),
                    mean,
                    &rstd,
                    dims,
                ))
            });
            return Ok((out, Shape::from((2, c))));
        };
        let sums = per_channel(sums)?;
        let grads = InputGradArgs {
            mean,
            rstd: &rstd,
            gamma,
            sum_dy_xhat: &sums[..c],
            sum_dy: &sums[c..],
            batch_stats: self.batch_stats,
        };
        let out = on_slices!(parts, |s| input_grad(
            s[0],
            Operand::new(&s[1..], relu),
            dims,
            &grads
        )?);
        Ok((out, Shape::from(parts[0].1.dims())))
    }
}

impl CustomOp2 for GradOps {
    fn name(&self) -> &'static str {
        "batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sx: &CpuStorage,
        lx: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.compute(&[(sg, lg), (sx, lx)])
    }
}

impl CustomOp3 for GradOps {
    fn name(&self) -> &'static str {
        "batch-norm-backward-sum"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.compute(&[(sg, lg), (sa, la), (sb, lb)])
    }
}

/// `[Σ dy·x̂ ; Σ dy]` per channel, `x̂ = (x - mean) · rstd` of the operand `x`.
fn grad_sums<T: Float>(
    dy: &[T],
    x: Operand<T>,
    mean: &[f64],
    rstd: &[f64],
    dims: (usize, usize, usize),
) -> Vec<f64> {
    let (_, c, inner) = dims;
    let relu = x.relu;
    let mean_t: Vec<T> = mean.iter().map(|&m| T::from_f64(m)).collect();
    let sums = per_channel_sums(dims, |i, ch, sums, scratch| {
        let off = (i * c + ch) * inner;
        let m = mean_t[ch];
        sums.add(&dy[off..off + inner], x.row(off, inner, scratch), |g, v| {
            (g, g * (v.relu_if(relu) - m))
        })
    });
    let dy_xhat = sums.iter().zip(rstd).map(|(s, r)| s.1 * r);
    dy_xhat.chain(sums.iter().map(|s| s.0)).collect()
}

/// What the input gradient needs per channel.
struct InputGradArgs<'a> {
    mean: &'a [f64],
    rstd: &'a [f64],
    gamma: &'a [f64],
    sum_dy_xhat: &'a [f64],
    sum_dy: &'a [f64],
    batch_stats: bool,
}

/// `dx = gamma · rstd · (dy - Σdy/M - x̂ · Σ(dy·x̂)/M)` with batch statistics (M values per
/// channel), or `gamma · rstd · dy` with constant statistics; where the operand has a ReLU,
/// zero where its argument is not positive (no gradient at 0, as [`crate::ops::relu`]).
fn input_grad<T: Float>(
    dy: &[T],
    x: Operand<T>,
    (n, c, inner): (usize, usize, usize),
    g: &InputGradArgs,
) -> candle_core::Result<Vec<T>> {
    let count = (n * inner) as f64;
    let relu = x.relu;
    // Per channel, `dx = k·dy + slope·(x - mean) + offset`: the batch-statistics terms folded
    // into two constants, so that each element costs two multiply-adds in its own type.
    let constants: Vec<[T; 4]> = (0..c)
        .map(|ch| {
            let k = g.gamma[ch] * g.rstd[ch];
            let slope = -k * g.rstd[ch] * g.sum_dy_xhat[ch] / count;
            let offset = -k * g.sum_dy[ch] / count;
            [k, slope, offset, g.mean[ch]].map(T::from_f64)
        })
        .collect();
    // SAFETY: the rows tile each image, and the loop below writes every element of each.
    unsafe {
        par_fill(dy.len(), c * inner, "batch norm backward", |i, img| {
            let mut scratch = Vec::new();
            for (ch, dst) in img.chunks_mut(inner.max(1)).enumerate() {
                let off = (i * c + ch) * inner;
                let [k, slope, offset, mean] = constants[ch];
                let dys = &dy[off..off + inner];
                let xs = x.row(off, inner, &mut scratch);
                // Where the ReLU blocks (`x > 0` fails, NaN included), no gradient; where it
                // passes, its output is `x` itself. With constant statistics `x` takes no
                // part: an infinite input still passes a finite gradient, as the composed
                // layers would.
                for ((d, &gv), &xv) in dst.iter_mut().zip(dys).zip(xs) {
                    let dz = match g.batch_stats {
                        true => k * gv + slope * (xv - mean) + offset,
                        false => k * gv,
                    };
                    let passes = xv > T::ZERO;
                    d.write(if relu && !passes { T::ZERO } else { dz });
                }
            }
        })
    }
}

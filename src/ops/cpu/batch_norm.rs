//! Fused batch normalization over the channel axis of contiguous `(N, C, …)` tensors on the
//! CPU, with its analytic backward pass.
//!
//! Composed from candle's ops, a training-mode BatchNorm reduces over axes (0, 2, 3) of an
//! NCHW tensor several times (mean, variance, and the backward of every broadcast). Here: one
//! pass for the batch moments, one to normalize, and two for the backward pass (the
//! per-channel sums, then the input gradient).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{
    Float, channel_sums, dispatch_pair, float_dispatch, map_rows, slice, split, to_vec_f64,
};
use crate::Result;

/// Training mode (arguments checked by [`crate::ops::batch_norm_train`]): `(y, batch mean,
/// biased batch variance)`.
pub(crate) fn train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    epsilon: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&ChannelMoments)?;
    let y = normalize(&x, &stats, gamma, beta, epsilon, true)?;
    Ok((y, stats.get(0)?, stats.get(1)?))
}

/// Inference mode with given statistics (arguments checked by [`crate::ops::batch_norm_eval`]).
pub(crate) fn eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    epsilon: f64,
) -> Result<Tensor> {
    let stats = Tensor::stack(&[mean, var], 0)?;
    normalize(x, &stats, gamma, beta, epsilon, false)
}

/// Normalizes `x` with `stats = [mean; var]` `(2, C)`, then scales and shifts.
fn normalize(
    x: &Tensor,
    stats: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    epsilon: f64,
    batch_stats: bool,
) -> Result<Tensor> {
    let affine = Tensor::stack(&[gamma, beta], 0)?;
    Ok(x.contiguous()?.apply_op3(
        stats,
        &affine,
        Normalize {
            epsilon,
            batch_stats,
        },
    )?)
}

/// `1 / sqrt(var + epsilon)` per channel.
fn inverse_std(var: &[f64], epsilon: f64) -> Vec<f64> {
    var.iter().map(|v| 1.0 / (v + epsilon).sqrt()).collect()
}

fn to_float<T: Float>(values: Vec<f64>) -> Vec<T> {
    values.into_iter().map(T::from_f64).collect()
}

/// Per-channel batch mean and biased variance, as a `(2, C)` tensor (no gradient).
struct ChannelMoments;

impl CustomOp1 for ChannelMoments {
    fn name(&self) -> &'static str {
        "channel-moments"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = split(l.dims());
        let count = (dims.0 * dims.2) as f64;
        let moments = |sums: Vec<(f64, f64)>| -> Vec<f64> {
            let mean: Vec<f64> = sums.iter().map(|s| s.0 / count).collect();
            let var: Vec<f64> = sums
                .iter()
                .zip(&mean)
                .map(|(s, m)| (s.1 / count - m * m).max(0.0))
                .collect();
            mean.into_iter().chain(var).collect()
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(
                moments(channel_sums(slice(v, l)?, None, dims))
                    .into_iter()
                    .map(|x| x as f32)
                    .collect(),
            ),
            CpuStorage::F64(v) => CpuStorage::F64(moments(channel_sums(slice(v, l)?, None, dims))),
            _ => candle_core::bail!("batch norm: f32 or f64 expected"),
        };
        Ok((out, Shape::from((2, dims.1))))
    }
}

/// `y = (x - mean) · rstd · gamma + beta` with `stats = [mean; var]` and `affine = [gamma;
/// beta]`, both `(2, C)`. With `batch_stats` the statistics are the batch's own, and the
/// backward pass accounts for them; otherwise they are constants (inference).
struct Normalize {
    epsilon: f64,
    batch_stats: bool,
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "batch-norm-normalize"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
        sa: &CpuStorage,
        la: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = split(lx.dims());
        let c = dims.1;
        let (stats, affine) = (to_vec_f64(ss, ls)?, to_vec_f64(sa, la)?);
        let rstd = inverse_std(&stats[c..], self.epsilon);
        let scale: Vec<f64> = (0..c).map(|ch| rstd[ch] * affine[ch]).collect();
        let shift: Vec<f64> = (0..c)
            .map(|ch| affine[c + ch] - stats[ch] * scale[ch])
            .collect();
        let out = float_dispatch!(sx, "batch norm", |v| {
            let x = slice(v, lx)?;
            map_rows(x, dims, |ch, src, dst| {
                let (a, b) = (scale[ch], shift[ch]);
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = Float::from_f64(s.to_f64() * a + b);
                }
            })
        });
        Ok((out, Shape::from(lx.dims())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        stats: &Tensor,
        affine: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // [Σ dy·x̂ ; Σ dy] is exactly [dgamma ; dbeta].
        let sums = dy.apply_op2_no_bwd(
            x,
            &GradSums {
                epsilon: self.epsilon,
                stats: stats.clone(),
            },
        )?;
        let packed = Tensor::cat(&[stats, &affine.to_dtype(stats.dtype())?, &sums], 0)?;
        let dx = dy.apply_op2_no_bwd(
            x,
            &InputGrad {
                epsilon: self.epsilon,
                batch_stats: self.batch_stats,
                packed,
            },
        )?;
        Ok((Some(dx), None, Some(sums.to_dtype(affine.dtype())?)))
    }
}

/// `(dy, x)` → `[Σ dy·x̂ ; Σ dy]` per channel.
struct GradSums {
    epsilon: f64,
    stats: Tensor,
}

impl CustomOp2 for GradSums {
    fn name(&self) -> &'static str {
        "batch-norm-grad-sums"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sx: &CpuStorage,
        lx: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = split(lx.dims());
        let c = dims.1;
        let stats = self
            .stats
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let rstd = inverse_std(&stats[c..], self.epsilon);
        let mean = &stats[..c];
        let collect = |sums: Vec<(f64, f64)>| -> Vec<f64> {
            sums.iter()
                .map(|s| s.1)
                .chain(sums.iter().map(|s| s.0))
                .collect()
        };
        let out = dispatch_pair!(sg, lg, sx, lx, "batch norm", |g, x| {
            to_float(collect(channel_sums(g, Some((x, mean, &rstd)), dims)))
        });
        Ok((out, Shape::from((2, c))))
    }
}

/// `(dy, x)` → dx, given `[mean; var; gamma; beta; Σ dy·x̂; Σ dy]` packed as `(6, C)`.
struct InputGrad {
    epsilon: f64,
    batch_stats: bool,
    packed: Tensor,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "batch-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sx: &CpuStorage,
        lx: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = split(lx.dims());
        let c = dims.1;
        let p = self
            .packed
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let (mean, var, gamma) = (&p[..c], &p[c..2 * c], &p[2 * c..3 * c]);
        let (sum_dy_xhat, sum_dy) = (&p[4 * c..5 * c], &p[5 * c..6 * c]);
        let count = (dims.0 * dims.2) as f64;
        let rstd = inverse_std(var, self.epsilon);
        let batch = self.batch_stats;
        let out = dispatch_pair!(sg, lg, sx, lx, "batch norm", |g, x| {
            input_grad(
                g,
                x,
                dims,
                mean,
                &rstd,
                gamma,
                sum_dy,
                sum_dy_xhat,
                count,
                batch,
            )
        });
        Ok((out, Shape::from(lx.dims())))
    }
}

/// `dx = gamma · rstd · (dy - Σdy/M - x̂ · Σ(dy·x̂)/M)` with batch statistics (M values per
/// channel), or `gamma · rstd · dy` with constant statistics.
#[allow(clippy::too_many_arguments)]
fn input_grad<T: Float>(
    dy: &[T],
    x: &[T],
    (_, c, inner): (usize, usize, usize),
    mean: &[f64],
    rstd: &[f64],
    gamma: &[f64],
    sum_dy: &[f64],
    sum_dy_xhat: &[f64],
    count: f64,
    batch: bool,
) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); dy.len()];
    out.par_chunks_mut(c * inner)
        .enumerate()
        .for_each(|(i, img)| {
            for ch in 0..c {
                let off = (i * c + ch) * inner;
                let k = gamma[ch] * rstd[ch];
                let dst = &mut img[ch * inner..(ch + 1) * inner];
                let (g, xs) = (&dy[off..off + inner], &x[off..off + inner]);
                if batch {
                    let (a, b) = (sum_dy[ch] / count, sum_dy_xhat[ch] / count);
                    for ((d, &gv), &xv) in dst.iter_mut().zip(g).zip(xs) {
                        let xhat = (xv.to_f64() - mean[ch]) * rstd[ch];
                        *d = T::from_f64(k * (gv.to_f64() - a - xhat * b));
                    }
                } else {
                    for (d, &gv) in dst.iter_mut().zip(g) {
                        *d = T::from_f64(k * gv.to_f64());
                    }
                }
            }
        });
    out
}

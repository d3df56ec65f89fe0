//! Fused batch normalization over the channel axis of contiguous `(N, C, …)` tensors on the
//! CPU, with its analytic backward pass, and a fused per-channel bias add.
//!
//! Composed from candle's ops, a training-mode BatchNorm reduces over axes (0, 2, 3) of an
//! NCHW tensor several times (mean, variance, and the backward of every broadcast), and
//! candle's strided reductions are slow: they were the largest cost of a training step here.
//! These ops walk each channel's contiguous rows once per pass instead.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

/// `true` when the fused CPU kernels apply to `x` with channel axis `axis`.
pub(crate) fn fused_applies(x: &Tensor, axis: usize) -> bool {
    x.device().is_cpu()
        && axis == 1
        && x.rank() >= 2
        && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `(n, c, inner)` of a contiguous `(N, C, …)` layout.
fn split(dims: &[usize]) -> (usize, usize, usize) {
    (dims[0], dims[1], dims[2..].iter().product())
}

fn slice<'a, T>(data: &'a [T], layout: &Layout) -> candle_core::Result<&'a [T]> {
    crate::ops::contiguous_slice(data, layout, "batch norm")
}

/// Float types of the fused path, accumulated in f64.
trait Float: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}
impl Float for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}
impl Float for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// `1 / sqrt(var + epsilon)` per channel.
fn inverse_std(var: &[f64], epsilon: f64) -> Vec<f64> {
    var.iter().map(|v| 1.0 / (v + epsilon).sqrt()).collect()
}

fn to_float<T: Float>(values: Vec<f64>) -> Vec<T> {
    values.into_iter().map(T::from_f64).collect()
}

/// Per channel `(Σ a, Σ a·b)` where `b` is optional (then `Σ a²`), over all rows of `c`.
fn channel_sums<T: Float>(
    a: &[T],
    b: Option<(&[T], &[f64], &[f64])>,
    (n, c, inner): (usize, usize, usize),
) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            for i in 0..n {
                let off = (i * c + ch) * inner;
                let row = &a[off..off + inner];
                match b {
                    None => {
                        for &v in row {
                            let v = v.to_f64();
                            s1 += v;
                            s2 += v * v;
                        }
                    }
                    // Σ dy and Σ dy · x̂ with x̂ = (x - mean) · rstd.
                    Some((x, mean, rstd)) => {
                        let xrow = &x[off..off + inner];
                        for (&g, &xv) in row.iter().zip(xrow) {
                            let g = g.to_f64();
                            s1 += g;
                            s2 += g * (xv.to_f64() - mean[ch]) * rstd[ch];
                        }
                    }
                }
            }
            (s1, s2)
        })
        .collect()
}

/// Applies `out = f(channel, in)` row by row, in parallel over images.
fn map_rows<T: Float>(
    src: &[T],
    (_, c, inner): (usize, usize, usize),
    f: impl Fn(usize, &[T], &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); src.len()];
    out.par_chunks_mut(c * inner)
        .enumerate()
        .for_each(|(i, img)| {
            for ch in 0..c {
                let off = ch * inner;
                f(
                    ch,
                    &src[(i * c) * inner + off..][..inner],
                    &mut img[off..off + inner],
                );
            }
        });
    out
}

macro_rules! float_dispatch {
    ($s:expr, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => CpuStorage::F32($body),
            CpuStorage::F64($v) => CpuStorage::F64($body),
            _ => candle_core::bail!("batch norm: f32 or f64 expected"),
        }
    };
}

fn to_vec_f64(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f64>> {
    Ok(match s {
        CpuStorage::F32(v) => slice(v, l)?.iter().map(|&x| x as f64).collect(),
        CpuStorage::F64(v) => slice(v, l)?.to_vec(),
        _ => candle_core::bail!("batch norm: f32 or f64 expected"),
    })
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
        let out = float_dispatch!(sx, |v| {
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

/// Batch statistics `[mean; biased var]` `(2, C)` of a contiguous `(N, C, …)` tensor.
pub(crate) fn channel_moments(x: &Tensor) -> Result<Tensor> {
    Ok(x.apply_op1_no_bwd(&ChannelMoments)?)
}

/// Normalizes `x` with `stats = [mean; var]` and `affine = [gamma; beta]` (both `(2, C)`).
pub(crate) fn normalize(
    x: &Tensor,
    stats: &Tensor,
    affine: &Tensor,
    epsilon: f64,
    batch_stats: bool,
) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(
        stats,
        affine,
        Normalize {
            epsilon,
            batch_stats,
        },
    )?)
}

/// `x + bias` broadcast over the channel axis (1), with the bias gradient summed per channel.
pub(crate) fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !fused_applies(x, 1) || x.dtype() != bias.dtype() {
        let mut shape = vec![1; x.rank()];
        shape[1] = bias.elem_count();
        return Ok(x.broadcast_add(&bias.reshape(shape)?)?);
    }
    Ok(x.contiguous()?.apply_op2(bias, ChannelBias)?)
}

struct ChannelBias;

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "add-channel-bias"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = split(lx.dims());
        let bias = to_vec_f64(sb, lb)?;
        let out = float_dispatch!(sx, |v| {
            map_rows(slice(v, lx)?, dims, |ch, src, dst| {
                let b = bias[ch];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = Float::from_f64(s.to_f64() + b);
                }
            })
        });
        Ok((out, Shape::from(lx.dims())))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let sums = dy.apply_op1_no_bwd(&ChannelSum)?;
        Ok((Some(dy), Some(sums)))
    }
}

/// Per-channel sum `(C,)`.
struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = split(l.dims());
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(
                channel_sums(slice(v, l)?, None, dims)
                    .iter()
                    .map(|s| s.0 as f32)
                    .collect(),
            ),
            CpuStorage::F64(v) => CpuStorage::F64(
                channel_sums(slice(v, l)?, None, dims)
                    .iter()
                    .map(|s| s.0)
                    .collect(),
            ),
            _ => candle_core::bail!("channel sum: f32 or f64 expected"),
        };
        Ok((out, Shape::from(dims.1)))
    }
}

//! Fused optimizer updates on the CPU: one pass over a weight, its gradient and its slots,
//! writing the new weight and slots, instead of about a dozen candle element-wise passes (each
//! a fresh allocation). The arithmetic is the reference's, operation for operation, so the
//! results are bit-identical (tests/fused_ops.rs).

use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

use crate::Result;
use crate::ops::{AdamStep, SgdStep};

/// Elements per parallel task: large enough to amortize the task, small enough to spread.
const CHUNK: usize = 1 << 14;

/// The contiguous f32 or f64 elements of a CPU tensor.
enum Values<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// Runs `f` on the values of `tensors` (all CPU, contiguous, one float dtype: checked by the
/// caller); `None` when they are not all f32 or all f64.
fn with_values<R>(tensors: &[&Tensor], f: impl FnOnce(&[Values<'_>]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut values = Vec::with_capacity(tensors.len());
    for (storage, layout) in &guards {
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg(
                "fused update: contiguous tensors expected".into(),
            )
            .into());
        };
        values.push(match &**storage {
            Storage::Cpu(CpuStorage::F32(v)) => Values::F32(&v[start..end]),
            Storage::Cpu(CpuStorage::F64(v)) => Values::F64(&v[start..end]),
            _ => {
                return Err(candle_core::Error::Msg(
                    "fused update: f32 or f64 CPU tensors expected".into(),
                )
                .into());
            }
        });
    }
    f(&values)
}

/// Defines the Adam kernel for one float type, in the reference's operation order:
/// `m' = m·β1 + g·(1-β1)`, `v' = v·β2 + g²·(1-β2)`, `w' = w·decay - α·m' / (√v' + ε)`.
macro_rules! adam_kernel {
    ($name:ident, $t:ty) => {
        fn $name(w: &[$t], g: &[$t], m: &[$t], v: &[$t], s: &AdamStep) -> [Vec<$t>; 3] {
            let (b1, omb1) = (s.beta_1 as $t, (1.0 - s.beta_1) as $t);
            let (b2, omb2) = (s.beta_2 as $t, (1.0 - s.beta_2) as $t);
            let (eps, alpha, decay) = (s.epsilon as $t, s.alpha as $t, s.decay as $t);
            let decays = s.decay != 1.0;
            let n = w.len();
            let (mut w1, mut m1, mut v1) = (vec![0 as $t; n], vec![0 as $t; n], vec![0 as $t; n]);
            w1.par_chunks_mut(CHUNK)
                .zip(m1.par_chunks_mut(CHUNK))
                .zip(v1.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(c, ((wo, mo), vo))| {
                    let at = c * CHUNK;
                    for i in 0..wo.len() {
                        let j = at + i;
                        let gj = g[j];
                        let mn = m[j] * b1 + gj * omb1;
                        let vn = v[j] * b2 + (gj * gj) * omb2;
                        let wd = if decays { w[j] * decay } else { w[j] };
                        let update = mn / (vn.sqrt() + eps);
                        wo[i] = wd - update * alpha;
                        mo[i] = mn;
                        vo[i] = vn;
                    }
                });
            [w1, m1, v1]
        }
    };
}

adam_kernel!(adam_f32, f32);
adam_kernel!(adam_f64, f64);

/// Defines the SGD kernel for one float type, in the reference's operation order:
/// `u' = u·μ - g·lr`, `w' = w·decay + u'` (Nesterov: `w·decay + u'·μ - g·lr`); without
/// momentum `w' = w·decay - g·lr`.
macro_rules! sgd_kernel {
    ($name:ident, $t:ty) => {
        fn $name(w: &[$t], g: &[$t], u: Option<&[$t]>, s: &SgdStep) -> (Vec<$t>, Option<Vec<$t>>) {
            let (lr, mu, decay) = (s.learning_rate as $t, s.momentum as $t, s.decay as $t);
            let decays = s.decay != 1.0;
            let n = w.len();
            let mut w1 = vec![0 as $t; n];
            match u {
                None => {
                    w1.par_chunks_mut(CHUNK).enumerate().for_each(|(c, wo)| {
                        let at = c * CHUNK;
                        for i in 0..wo.len() {
                            let j = at + i;
                            let wd = if decays { w[j] * decay } else { w[j] };
                            wo[i] = wd - g[j] * lr;
                        }
                    });
                    (w1, None)
                }
                Some(u) => {
                    let mut u1 = vec![0 as $t; n];
                    w1.par_chunks_mut(CHUNK)
                        .zip(u1.par_chunks_mut(CHUNK))
                        .enumerate()
                        .for_each(|(c, (wo, uo))| {
                            let at = c * CHUNK;
                            for i in 0..wo.len() {
                                let j = at + i;
                                let step = g[j] * lr;
                                let un = u[j] * mu - step;
                                let wd = if decays { w[j] * decay } else { w[j] };
                                wo[i] = if s.nesterov {
                                    (wd + un * mu) - step
                                } else {
                                    wd + un
                                };
                                uo[i] = un;
                            }
                        });
                    (w1, Some(u1))
                }
            }
        }
    };
}

sgd_kernel!(sgd_f32, f32);
sgd_kernel!(sgd_f64, f64);

/// The fused Adam step of one weight (arguments checked by [`crate::ops::adam_update`]).
pub(crate) fn adam_update(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: &AdamStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (w, g, m, v) = (
        w.contiguous()?,
        g.contiguous()?,
        m.contiguous()?,
        v.contiguous()?,
    );
    let shape = w.shape().clone();
    let device = w.device().clone();
    let [w1, m1, v1] = with_values(&[&w, &g, &m, &v], |vals| {
        Ok(match vals {
            [
                Values::F32(w),
                Values::F32(g),
                Values::F32(m),
                Values::F32(v),
            ] => adam_f32(w, g, m, v, step).map(|x| Tensor::from_vec(x, shape.clone(), &device)),
            [
                Values::F64(w),
                Values::F64(g),
                Values::F64(m),
                Values::F64(v),
            ] => adam_f64(w, g, m, v, step).map(|x| Tensor::from_vec(x, shape.clone(), &device)),
            _ => {
                return Err(candle_core::Error::Msg(
                    "fused update: one float dtype expected".into(),
                )
                .into());
            }
        })
    })?;
    Ok((w1?, m1?, v1?))
}

/// The fused SGD step of one weight (arguments checked by [`crate::ops::sgd_update`]).
pub(crate) fn sgd_update(
    w: &Tensor,
    g: &Tensor,
    velocity: Option<&Tensor>,
    step: &SgdStep,
) -> Result<(Tensor, Option<Tensor>)> {
    let (w, g) = (w.contiguous()?, g.contiguous()?);
    let u = velocity.map(Tensor::contiguous).transpose()?;
    let shape = w.shape().clone();
    let device = w.device().clone();
    let mut tensors = vec![&w, &g];
    tensors.extend(u.as_ref());
    let to_tensor = |x: Vec<_>| Tensor::from_vec(x, shape.clone(), &device);
    with_values(&tensors, |vals| {
        let (w1, u1) = match vals {
            [Values::F32(w), Values::F32(g)] => {
                let (w1, _) = sgd_f32(w, g, None, step);
                (Tensor::from_vec(w1, shape.clone(), &device)?, None)
            }
            [Values::F32(w), Values::F32(g), Values::F32(u)] => {
                let (w1, u1) = sgd_f32(w, g, Some(u), step);
                (to_tensor(w1)?, u1.map(to_tensor).transpose()?)
            }
            [Values::F64(w), Values::F64(g)] => {
                let (w1, _) = sgd_f64(w, g, None, step);
                (Tensor::from_vec(w1, shape.clone(), &device)?, None)
            }
            [Values::F64(w), Values::F64(g), Values::F64(u)] => {
                let (w1, u1) = sgd_f64(w, g, Some(u), step);
                (
                    Tensor::from_vec(w1, shape.clone(), &device)?,
                    u1.map(|x| Tensor::from_vec(x, shape.clone(), &device))
                        .transpose()?,
                )
            }
            _ => {
                return Err(candle_core::Error::Msg(
                    "fused update: one float dtype expected".into(),
                )
                .into());
            }
        };
        Ok((w1, u1))
    })
}

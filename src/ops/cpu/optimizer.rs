//! Fused optimizer updates on the CPU: one pass over a weight, its gradient and its slots,
//! instead of about a dozen candle element-wise passes (each a fresh allocation). The kernels
//! write in place: into the variables themselves (`*_in_place`, what the optimizers use), or
//! into copies (`adam_update`, `sgd_update`, which return new tensors). The arithmetic is the
//! reference's, operation for operation, so the results are bit-identical
//! (tests/fused_ops.rs, tests/multi_tensor.rs).

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor};
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

/// Defines the Adam kernel for one float type, in place, in the reference's operation order:
/// `m' = m·β1 + g·(1-β1)`, `v' = v·β2 + g²·(1-β2)`, `w' = w·decay - α·m' / (√v' + ε)`.
macro_rules! adam_kernel {
    ($name:ident, $t:ty) => {
        fn $name(w: &mut [$t], g: &[$t], m: &mut [$t], v: &mut [$t], s: &AdamStep) {
            let (b1, omb1) = (s.beta_1 as $t, (1.0 - s.beta_1) as $t);
            let (b2, omb2) = (s.beta_2 as $t, (1.0 - s.beta_2) as $t);
            let (eps, alpha, decay) = (s.epsilon as $t, s.alpha as $t, s.decay as $t);
            let decays = s.decay != 1.0;
            w.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((w, m), v), g)| {
                    for j in 0..w.len() {
                        let gj = g[j];
                        let mn = m[j] * b1 + gj * omb1;
                        let vn = v[j] * b2 + (gj * gj) * omb2;
                        let wd = if decays { w[j] * decay } else { w[j] };
                        let update = mn / (vn.sqrt() + eps);
                        w[j] = wd - update * alpha;
                        m[j] = mn;
                        v[j] = vn;
                    }
                });
        }
    };
}

adam_kernel!(adam_f32, f32);
adam_kernel!(adam_f64, f64);

/// Defines the SGD kernel for one float type, in place, in the reference's operation order:
/// `u' = u·μ - g·lr`, `w' = w·decay + u'` (Nesterov: `w·decay + u'·μ - g·lr`); without
/// momentum `w' = w·decay - g·lr`.
macro_rules! sgd_kernel {
    ($name:ident, $t:ty) => {
        fn $name(w: &mut [$t], g: &[$t], u: Option<&mut [$t]>, s: &SgdStep) {
            let (lr, mu, decay) = (s.learning_rate as $t, s.momentum as $t, s.decay as $t);
            let decays = s.decay != 1.0;
            match u {
                None => w
                    .par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(w, g)| {
                        for j in 0..w.len() {
                            let wd = if decays { w[j] * decay } else { w[j] };
                            w[j] = wd - g[j] * lr;
                        }
                    }),
                Some(u) => w
                    .par_chunks_mut(CHUNK)
                    .zip(u.par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|((w, u), g)| {
                        for j in 0..w.len() {
                            let step = g[j] * lr;
                            let un = u[j] * mu - step;
                            let wd = if decays { w[j] * decay } else { w[j] };
                            w[j] = if s.nesterov {
                                (wd + un * mu) - step
                            } else {
                                wd + un
                            };
                            u[j] = un;
                        }
                    }),
            }
        }
    };
}

sgd_kernel!(sgd_f32, f32);
sgd_kernel!(sgd_f64, f64);

/// Elements of one float type, owned: the out-of-place updates run the in-place kernels on
/// copies.
enum Owned {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Owned {
    fn of(values: &Values<'_>) -> Self {
        match values {
            Values::F32(v) => Owned::F32(v.to_vec()),
            Values::F64(v) => Owned::F64(v.to_vec()),
        }
    }

    fn into_tensor(self, like: &Tensor) -> Result<Tensor> {
        let (shape, device) = (like.shape().clone(), like.device());
        Ok(match self {
            Owned::F32(v) => Tensor::from_vec(v, shape, device)?,
            Owned::F64(v) => Tensor::from_vec(v, shape, device)?,
        })
    }
}

fn one_dtype_expected() -> crate::Error {
    candle_core::Error::Msg("fused update: one float dtype expected".into()).into()
}

/// Runs the Adam kernel on owned copies or in-place slices of one float type.
macro_rules! run_adam {
    ($w:expr, $g:expr, $m:expr, $v:expr, $step:expr) => {
        match ($w, $g, $m, $v) {
            (Owned::F32(w), Values::F32(g), Owned::F32(m), Owned::F32(v)) => {
                adam_f32(w, g, m, v, $step)
            }
            (Owned::F64(w), Values::F64(g), Owned::F64(m), Owned::F64(v)) => {
                adam_f64(w, g, m, v, $step)
            }
            _ => return Err(one_dtype_expected()),
        }
    };
}

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
    let [mut w1, mut m1, mut v1] = with_values(&[&w, &m, &v], |vals| {
        Ok([
            Owned::of(&vals[0]),
            Owned::of(&vals[1]),
            Owned::of(&vals[2]),
        ])
    })?;
    with_values(&[&g], |gv| {
        run_adam!(&mut w1, &gv[0], &mut m1, &mut v1, step);
        Ok(())
    })?;
    Ok((
        w1.into_tensor(&w)?,
        m1.into_tensor(&w)?,
        v1.into_tensor(&w)?,
    ))
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
    let mut w1 = with_values(&[&w], |vals| Ok(Owned::of(&vals[0])))?;
    let mut u1 = u
        .as_ref()
        .map(|u| with_values(&[u], |vals| Ok(Owned::of(&vals[0]))))
        .transpose()?;
    with_values(&[&g], |gv| {
        match (&mut w1, &gv[0], u1.as_mut()) {
            (Owned::F32(w), Values::F32(g), None) => sgd_f32(w, g, None, step),
            (Owned::F32(w), Values::F32(g), Some(Owned::F32(u))) => sgd_f32(w, g, Some(u), step),
            (Owned::F64(w), Values::F64(g), None) => sgd_f64(w, g, None, step),
            (Owned::F64(w), Values::F64(g), Some(Owned::F64(u))) => sgd_f64(w, g, Some(u), step),
            _ => return Err(one_dtype_expected()),
        }
        Ok(())
    })?;
    Ok((
        w1.into_tensor(&w)?,
        u1.map(|u| u.into_tensor(&w)).transpose()?,
    ))
}

/// A candle in-place op that runs a closure on the destination's CPU storage: nesting them
/// gives one kernel mutable access to several tensors at once (weight and slots).
struct InPlace<F>(RefCell<F>);

impl<F: FnMut(&mut CpuStorage, &Layout) -> candle_core::Result<()>> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "in-place optimizer update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        (self.0.borrow_mut())(storage, layout)
    }
}

/// Runs `f` on the contiguous elements of `t`'s CPU storage, writable.
fn with_mut(
    t: &Tensor,
    mut f: impl FnMut(&mut Slice<'_>) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    t.inplace_op1(&InPlace(RefCell::new(
        |storage: &mut CpuStorage, layout: &Layout| {
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("in-place update: contiguous tensors expected")
            };
            let mut slice = match storage {
                CpuStorage::F32(v) => Slice::F32(&mut v[start..end]),
                CpuStorage::F64(v) => Slice::F64(&mut v[start..end]),
                _ => candle_core::bail!("in-place update: f32 or f64 CPU tensors expected"),
            };
            f(&mut slice)
        },
    )))
}

/// The writable elements of a CPU tensor.
enum Slice<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

fn kernel_error(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The fused Adam step written into `w`, `m` and `v` (distinct storages, contiguous; checked
/// by [`crate::ops::adam_update_in_place`]).
pub(crate) fn adam_update_in_place(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: &AdamStep,
) -> Result<()> {
    let g = g.contiguous()?;
    with_values(&[&g], |gv| {
        Ok(with_mut(w, |w| {
            with_mut(m, |m| {
                with_mut(v, |v| {
                    match (&mut *w, &gv[0], &mut *m, &mut *v) {
                        (Slice::F32(w), Values::F32(g), Slice::F32(m), Slice::F32(v)) => {
                            adam_f32(w, g, m, v, step)
                        }
                        (Slice::F64(w), Values::F64(g), Slice::F64(m), Slice::F64(v)) => {
                            adam_f64(w, g, m, v, step)
                        }
                        _ => return Err(kernel_error(one_dtype_expected())),
                    }
                    Ok(())
                })
            })
        })?)
    })
}

/// The fused SGD step written into `w` and the velocity `u` (checked by
/// [`crate::ops::sgd_update_in_place`]).
pub(crate) fn sgd_update_in_place(
    w: &Tensor,
    g: &Tensor,
    u: Option<&Tensor>,
    step: &SgdStep,
) -> Result<()> {
    let g = g.contiguous()?;
    with_values(&[&g], |gv| {
        Ok(with_mut(w, |w| {
            let mut run = |u: Option<&mut Slice<'_>>| {
                match (&mut *w, &gv[0], u) {
                    (Slice::F32(w), Values::F32(g), None) => sgd_f32(w, g, None, step),
                    (Slice::F32(w), Values::F32(g), Some(Slice::F32(u))) => {
                        sgd_f32(w, g, Some(u), step)
                    }
                    (Slice::F64(w), Values::F64(g), None) => sgd_f64(w, g, None, step),
                    (Slice::F64(w), Values::F64(g), Some(Slice::F64(u))) => {
                        sgd_f64(w, g, Some(u), step)
                    }
                    _ => return Err(kernel_error(one_dtype_expected())),
                }
                Ok(())
            };
            match u {
                None => run(None),
                Some(u) => with_mut(u, |u| run(Some(u))),
            }
        })?)
    })
}

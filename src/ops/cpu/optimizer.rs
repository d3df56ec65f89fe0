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
/// `m' = m·β1 + g·(1-β1)`, `v' = v·β2 + g²·(1-β2)`, `w' = w·decay - α·m' / (√v' + ε)`; and
/// `$finite`, the same arithmetic read-only, telling whether every new value is finite (the
/// divergence check of the values a step would write).
macro_rules! adam_kernel {
    ($name:ident, $finite:ident, $t:ty) => {
        fn $finite(w: &[$t], g: &[$t], m: &[$t], v: &[$t], s: &AdamStep) -> bool {
            let new = adam_element!($t, s);
            w.par_chunks(CHUNK)
                .zip(m.par_chunks(CHUNK))
                .zip(v.par_chunks(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .all(|(((w, m), v), g)| {
                    (0..w.len()).all(|j| {
                        let (wn, mn, vn) = new(w[j], g[j], m[j], v[j]);
                        wn.is_finite() && mn.is_finite() && vn.is_finite()
                    })
                })
        }

        fn $name(w: &mut [$t], g: &[$t], m: &mut [$t], v: &mut [$t], s: &AdamStep) {
            let new = adam_element!($t, s);
            w.par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((w, m), v), g)| {
                    for j in 0..w.len() {
                        (w[j], m[j], v[j]) = new(w[j], g[j], m[j], v[j]);
                    }
                });
        }
    };
}

/// The Adam update of one element as a closure `(w, g, m, v) -> (w', m', v')` over the
/// step's constants in type `$t`: one definition for the writing and the checking kernels.
macro_rules! adam_element {
    ($t:ty, $s:expr) => {{
        let s: &AdamStep = $s;
        let (b1, omb1) = (s.beta_1 as $t, (1.0 - s.beta_1) as $t);
        let (b2, omb2) = (s.beta_2 as $t, (1.0 - s.beta_2) as $t);
        let (eps, alpha, decay) = (s.epsilon as $t, s.alpha as $t, s.decay as $t);
        let decays = s.decay != 1.0;
        move |w: $t, g: $t, m: $t, v: $t| -> ($t, $t, $t) {
            let mn = m * b1 + g * omb1;
            let vn = v * b2 + (g * g) * omb2;
            let wd = if decays { w * decay } else { w };
            let update = mn / (vn.sqrt() + eps);
            (wd - update * alpha, mn, vn)
        }
    }};
}

adam_kernel!(adam_f32, adam_finite_f32, f32);
adam_kernel!(adam_f64, adam_finite_f64, f64);

/// The SGD update of one element as a closure `(w, g, u) -> (w', u')` over the step's
/// constants in type `$t`, in the reference's operation order: `u' = u·μ - g·lr`,
/// `w' = w·decay + u'` (Nesterov: `w·decay + u'·μ - g·lr`); without momentum (`u` unused)
/// `w' = w·decay - g·lr`.
macro_rules! sgd_element {
    ($t:ty, $s:expr, $momentum:expr) => {{
        let s: &SgdStep = $s;
        let (lr, mu, decay) = (s.learning_rate as $t, s.momentum as $t, s.decay as $t);
        let (decays, nesterov, momentum) = (s.decay != 1.0, s.nesterov, $momentum);
        move |w: $t, g: $t, u: $t| -> ($t, $t) {
            let wd = if decays { w * decay } else { w };
            if !momentum {
                return (wd - g * lr, u);
            }
            let step = g * lr;
            let un = u * mu - step;
            let wn = if nesterov {
                (wd + un * mu) - step
            } else {
                wd + un
            };
            (wn, un)
        }
    }};
}

/// Defines the SGD kernel for one float type, in place (see [`sgd_element`]), and `$finite`,
/// the same arithmetic read-only, telling whether every new value is finite.
macro_rules! sgd_kernel {
    ($name:ident, $finite:ident, $t:ty) => {
        fn $finite(w: &[$t], g: &[$t], u: Option<&[$t]>, s: &SgdStep) -> bool {
            let new = sgd_element!($t, s, u.is_some());
            match u {
                None => w
                    .par_chunks(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .all(|(w, g)| (0..w.len()).all(|j| new(w[j], g[j], 0.0).0.is_finite())),
                Some(u) => w
                    .par_chunks(CHUNK)
                    .zip(u.par_chunks(CHUNK))
                    .zip(g.par_chunks(CHUNK))
                    .all(|((w, u), g)| {
                        (0..w.len()).all(|j| {
                            let (wn, un) = new(w[j], g[j], u[j]);
                            wn.is_finite() && un.is_finite()
                        })
                    }),
            }
        }

        fn $name(w: &mut [$t], g: &[$t], u: Option<&mut [$t]>, s: &SgdStep) {
            let new = sgd_element!($t, s, u.is_some());
            match u {
                None => w
                    .par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(w, g)| {
                        for j in 0..w.len() {
                            w[j] = new(w[j], g[j], 0.0).0;
                        }
                    }),
                Some(u) => w
                    .par_chunks_mut(CHUNK)
                    .zip(u.par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|((w, u), g)| {
                        for j in 0..w.len() {
                            (w[j], u[j]) = new(w[j], g[j], u[j]);
                        }
                    }),
            }
        }
    };
}

sgd_kernel!(sgd_f32, sgd_finite_f32, f32);
sgd_kernel!(sgd_f64, sgd_finite_f64, f64);

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

/// Whether the fused Adam step of `(w, g, m, v)` (checked by
/// [`crate::ops::adam_update_is_finite`]) would write only finite values; nothing is written.
pub(crate) fn adam_update_is_finite(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: &AdamStep,
) -> Result<bool> {
    let operands = [
        w.contiguous()?,
        g.contiguous()?,
        m.contiguous()?,
        v.contiguous()?,
    ];
    with_values(&operands.iter().collect::<Vec<_>>(), |vals| match vals {
        [
            Values::F32(w),
            Values::F32(g),
            Values::F32(m),
            Values::F32(v),
        ] => Ok(adam_finite_f32(w, g, m, v, step)),
        [
            Values::F64(w),
            Values::F64(g),
            Values::F64(m),
            Values::F64(v),
        ] => Ok(adam_finite_f64(w, g, m, v, step)),
        _ => Err(one_dtype_expected()),
    })
}

/// Whether the fused SGD step of `(w, g, u)` (checked by
/// [`crate::ops::sgd_update_is_finite`]) would write only finite values; nothing is written.
pub(crate) fn sgd_update_is_finite(
    w: &Tensor,
    g: &Tensor,
    u: Option<&Tensor>,
    step: &SgdStep,
) -> Result<bool> {
    let mut operands = vec![w.contiguous()?, g.contiguous()?];
    operands.extend(u.map(Tensor::contiguous).transpose()?);
    with_values(&operands.iter().collect::<Vec<_>>(), |vals| match vals {
        [Values::F32(w), Values::F32(g)] => Ok(sgd_finite_f32(w, g, None, step)),
        [Values::F32(w), Values::F32(g), Values::F32(u)] => Ok(sgd_finite_f32(w, g, Some(u), step)),
        [Values::F64(w), Values::F64(g)] => Ok(sgd_finite_f64(w, g, None, step)),
        [Values::F64(w), Values::F64(g), Values::F64(u)] => Ok(sgd_finite_f64(w, g, Some(u), step)),
        _ => Err(one_dtype_expected()),
    })
}

//! The optimizers' updates of one weight ([`adam_update`], [`sgd_update`]) and of many
//! ([`adam_update_many`], [`sgd_update_many`]), computed without writing.

#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::Tensor;

use crate::Result;

use crate::ops::arguments::*;
use crate::ops::backend::{Backend, CPU_FLOATS, backend};
#[cfg(feature = "cuda")]
use crate::ops::cuda;
use crate::ops::{cpu, reference};

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

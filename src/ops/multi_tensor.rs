//! The end of a training step, in as few device operations as the backend allows: the finite
//! check of the loss and every gradient in one pass ([`all_finite`]), and updates written in
//! place, never into fresh tensors that are then copied over the old ones ([`assign_if`] for
//! held-back state such as BatchNorm's moving statistics, [`adam_update_in_place`] and
//! [`sgd_update_in_place`] for the optimizers), and the check that an update would write
//! only finite values ([`adam_update_is_finite`], [`sgd_update_is_finite`]).
//!
//! On CUDA (feature `cuda`, f32) each is one kernel launch for all its tensors
//! (`cuda/multi_tensor.cu`, `cuda/optimizer.cu`), without a host synchronisation; on the CPU
//! one pass per tensor; elsewhere candle's ops. Every argument of every tensor is checked
//! before anything is written, so a call that fails changes nothing; among the checks, across
//! all items, no storage written may be written twice or read as another operand.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use super::arguments::{AdamStep, SgdStep, check_keep, check_update, invalid, same_device};
use super::{cpu, reference};
use crate::Result;

/// A u8 scalar on the tensors' device: 1 when every element of every tensor is finite, 0 when
/// one is NaN or infinite. Nothing is read back to the host: the verdict can gate updates on
/// the device ([`adam_update_in_place`]'s `keep`). Tensors may differ in shape and float
/// dtype, not in device.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::ops::all_finite;
/// let a = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
/// let b = Tensor::new(&[[0f64, f64::NAN]], &Device::Cpu)?;
/// assert_eq!(all_finite(&[&a])?.to_scalar::<u8>()?, 1);
/// assert_eq!(all_finite(&[&a, &b])?.to_scalar::<u8>()?, 0);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn all_finite(tensors: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "all_finite";
    let Some(first) = tensors.first() else {
        return Err(invalid(
            OP,
            "tensors",
            "at least one tensor expected".into(),
        ));
    };
    for t in tensors {
        same_device(OP, "tensors", t, first)?;
        if !t.dtype().is_float() {
            return Err(invalid(
                OP,
                "tensors",
                format!("float tensors expected, got {:?}", t.dtype()),
            ));
        }
    }
    let device = first.device();
    if device.is_cpu()
        && let Some(finite) = cpu::finite::all_finite(tensors)?
    {
        return Ok(Tensor::new(u8::from(finite), device)?);
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() && tensors.iter().all(|t| t.dtype() == DType::F32) {
        return super::cuda::all_finite(tensors);
    }
    // x·0 is 0 exactly for finite x, NaN for NaN and infinities.
    let mut verdicts = Vec::with_capacity(tensors.len());
    for t in tensors.iter().filter(|t| t.elem_count() > 0) {
        let zero_if_finite = t.detach().flatten_all()?.affine(0.0, 0.0)?;
        verdicts.push(zero_if_finite.eq(0.0)?.min(0)?);
    }
    if verdicts.is_empty() {
        return Ok(Tensor::new(1u8, device)?);
    }
    Ok(Tensor::stack(&verdicts, 0)?.min(0)?)
}

/// An address that tells two tensors' storages apart (two tensors share a storage when they
/// are views of one another).
fn storage_address(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    std::ptr::from_ref(&*storage).addr()
}

/// One operand of an in-place call: its name, its item, whether it is written, the tensor.
type Operand<'a> = (&'static str, usize, bool, &'a Tensor);

/// Across all the items of an in-place call, every storage written must be written once and
/// read by nothing else: a write would change another operand mid-pass (on CUDA, another
/// thread's element; on the CPU the locks would wait on themselves), and a weight written
/// twice would be updated twice.
fn check_aliasing(op: &'static str, operands: &[Operand<'_>]) -> Result<()> {
    let mut written: HashMap<usize, (&'static str, usize)> = HashMap::new();
    let clash = |(name, item): (&'static str, usize),
                 (other, other_item): (&'static str, usize)| {
        invalid(
            op,
            name,
            format!(
                "(item {item}) shares its storage with `{other}` (item {other_item}): a tensor \
                 written in place must be distinct from every other operand"
            ),
        )
    };
    for &(name, item, _, t) in operands.iter().filter(|o| o.2) {
        if let Some(&first) = written.get(&storage_address(t)) {
            return Err(clash((name, item), first));
        }
        written.insert(storage_address(t), (name, item));
    }
    for &(name, item, _, t) in operands.iter().filter(|o| !o.2) {
        if let Some(&w) = written.get(&storage_address(t)) {
            return Err(clash((name, item), w));
        }
    }
    Ok(())
}

/// The value of the u8 scalar `keep` on the CPU (reading it there costs nothing): `false`
/// when it is 0.
fn keep_on_cpu(keep: Option<&Tensor>) -> Result<bool> {
    match keep {
        None => Ok(true),
        Some(k) => Ok(k.flatten_all()?.to_vec1::<u8>()?.first() != Some(&0)),
    }
}

/// `new` where the u8 scalar `keep` is 1, `old` (a copy) where it is 0, chosen on the device.
fn select(keep: Option<&Tensor>, new: &Tensor, old: &Var) -> Result<Tensor> {
    let old = old.as_tensor().detach();
    Ok(match keep {
        None => new.clone(),
        Some(k) => k
            .flatten_all()?
            .reshape(())?
            .broadcast_as(new.shape())?
            .where_cond(new, &old)?,
    })
}

/// `true` when every tensor is an f32 or f64 CPU tensor (the fused CPU kernels' case; the
/// weights' operands were checked to be like them).
fn cpu_floats<'a>(mut tensors: impl Iterator<Item = &'a Tensor>) -> bool {
    tensors.all(|t| t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64))
}

/// `true` when every tensor is an f32 CUDA tensor (the multi-tensor kernels' case).
#[cfg(feature = "cuda")]
fn cuda_f32<'a>(mut tensors: impl Iterator<Item = &'a Tensor>) -> bool {
    tensors.all(|t| t.device().is_cuda() && t.dtype() == DType::F32)
}

/// Every check [`assign_if`] makes before writing, without writing: a caller that must not
/// write anything else unless the assignment will be made (the trainer, before its optimizer
/// step) runs it first.
pub(crate) fn check_assignments(targets: &[(&Var, &Tensor)], keep: Option<&Tensor>) -> Result<()> {
    const OP: &str = "assign_if";
    let mut operands = Vec::with_capacity(2 * targets.len());
    for (i, (var, value)) in targets.iter().enumerate() {
        check_update(OP, var.as_tensor(), &[("value", value)])?;
        operands.push(("var", i, true, var.as_tensor()));
        operands.push(("value", i, false, *value));
    }
    check_aliasing(OP, &operands)?;
    check_keep(OP, targets.first().map(|(v, _)| v.as_tensor()), keep)
}

/// Writes each `value` into its variable where the u8 scalar `keep` is 1 (all of them, or
/// none when it is 0; without `keep`, all). The held-back updates of a training step (the
/// moving statistics of BatchNorm layers) are written this way, decided on the device. Each
/// value must have its variable's shape, dtype and device, and not be a view of it.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_functional::ops::assign_if;
/// let stat = Var::new(&[0f32, 0.0], &Device::Cpu)?;
/// let new = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
/// assign_if(&[(&stat, &new)], Some(&Tensor::new(0u8, &Device::Cpu)?))?;
/// assert_eq!(stat.to_vec1::<f32>()?, [0.0, 0.0]); // not kept
/// assign_if(&[(&stat, &new)], None)?;
/// assert_eq!(stat.to_vec1::<f32>()?, [1.0, 2.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn assign_if(targets: &[(&Var, &Tensor)], keep: Option<&Tensor>) -> Result<()> {
    check_assignments(targets, keep)?;
    assign_checked(targets, keep)
}

/// [`assign_if`] after [`check_assignments`] has passed (the trainer checks before its
/// optimizer step and writes after it, without checking twice).
pub(crate) fn assign_checked(targets: &[(&Var, &Tensor)], keep: Option<&Tensor>) -> Result<()> {
    let Some((first, _)) = targets.first() else {
        return Ok(());
    };
    let device = first.device();
    #[cfg(feature = "cuda")]
    if cuda_f32(targets.iter().flat_map(|(v, t)| [v.as_tensor(), *t])) {
        return super::cuda::assign_if(targets, keep);
    }
    if device.is_cpu() {
        if keep_on_cpu(keep)? {
            for (var, value) in targets {
                var.set(value)?;
            }
        }
        return Ok(());
    }
    let chosen = targets
        .iter()
        .map(|(var, value)| select(keep, value, var))
        .collect::<Result<Vec<_>>>()?;
    for ((var, _), value) in targets.iter().zip(chosen) {
        var.set(&value)?;
    }
    Ok(())
}

/// One Adam step of many weights, written in place: each `(w, g, m, v)` is a weight, its
/// gradient and its two moment slots (the slots are variables too, so that they can be
/// written). With `keep` (a u8 scalar on the weights' device, the divergence check's
/// verdict) nothing changes where it is 0, decided on the device. The arithmetic is
/// [`adam_update`](super::adam_update)'s, bit for bit. On CUDA (feature `cuda`, f32) one
/// kernel launch for every weight; on the CPU one fused pass per weight; elsewhere the
/// reference.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_functional::ops::{adam_update_in_place, AdamStep};
/// let w = Var::new(&[1f32, -1.0], &Device::Cpu)?;
/// let (m, v) = (Var::zeros(2, candle_core::DType::F32, &Device::Cpu)?, Var::zeros(2, candle_core::DType::F32, &Device::Cpu)?);
/// let g = Tensor::new(&[0.5f32, -0.5], &Device::Cpu)?;
/// let step = AdamStep { alpha: 0.1, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, decay: 1.0 };
/// adam_update_in_place(&[(&w, &g, &m, &v)], step, None)?;
/// assert_eq!(m.to_vec1::<f32>()?, [0.05, -0.05]);
/// assert!(w.to_vec1::<f32>()?[0] < 1.0);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn adam_update_in_place(
    items: &[(&Var, &Tensor, &Var, &Var)],
    step: AdamStep,
    keep: Option<&Tensor>,
) -> Result<()> {
    const OP: &str = "adam_update_in_place";
    let mut operands = Vec::with_capacity(4 * items.len());
    for (i, (w, g, m, v)) in items.iter().enumerate() {
        let (w, m, v) = (w.as_tensor(), m.as_tensor(), v.as_tensor());
        check_update(OP, w, &[("g", g), ("m", m), ("v", v)])?;
        operands.extend([
            ("w", i, true, w),
            ("g", i, false, *g),
            ("m", i, true, m),
            ("v", i, true, v),
        ]);
    }
    check_aliasing(OP, &operands)?;
    let Some(first) = items.first() else {
        return Ok(());
    };
    check_keep(OP, Some(first.0.as_tensor()), keep)?;
    #[cfg(feature = "cuda")]
    if cuda_f32(items.iter().map(|i| i.0.as_tensor())) {
        let tensors: Vec<[&Tensor; 4]> = items
            .iter()
            .map(|(w, g, m, v)| [w.as_tensor(), *g, m.as_tensor(), v.as_tensor()])
            .collect();
        return super::cuda::adam_update_in_place(&tensors, &step, keep);
    }
    if cpu_floats(items.iter().map(|i| i.0.as_tensor())) {
        if keep_on_cpu(keep)? {
            for (w, g, m, v) in items {
                cpu::optimizer::adam_update_in_place(w, g, m, v, &step)?;
            }
        }
        return Ok(());
    }
    let mut new = Vec::with_capacity(items.len());
    for (w, g, m, v) in items {
        let (w1, m1, v1) = reference::adam_update(w, g, m, v, step)?;
        new.push([
            select(keep, &w1, w)?,
            select(keep, &m1, m)?,
            select(keep, &v1, v)?,
        ]);
    }
    for ((w, _, m, v), [w1, m1, v1]) in items.iter().zip(new) {
        w.set(&w1)?;
        m.set(&m1)?;
        v.set(&v1)?;
    }
    Ok(())
}

/// Whether one Adam step of every `(w, g, m, v)` (as [`adam_update_in_place`] takes them)
/// would write only finite values: a u8 scalar on the weights' device, 1 or 0, computed with
/// the update's own arithmetic and nothing written. A finite loss and finite gradients can
/// still make an infinite weight (a learning rate of 1e38); the trainer folds this verdict
/// into its divergence check so that such a step writes nothing. One pass per weight on the
/// CPU, one kernel on CUDA (f32).
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_functional::ops::{adam_update_is_finite, AdamStep};
/// let w = Var::new(&[3e38f32], &Device::Cpu)?;
/// let (m, v) = (Var::zeros(1, candle_core::DType::F32, &Device::Cpu)?, Var::zeros(1, candle_core::DType::F32, &Device::Cpu)?);
/// let g = Tensor::new(&[-1f32], &Device::Cpu)?;
/// let calm = AdamStep { alpha: 1e-3, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-7, decay: 1.0 };
/// let wild = AdamStep { alpha: 1e38, ..calm };
/// assert_eq!(adam_update_is_finite(&[(&w, &g, &m, &v)], calm)?.to_scalar::<u8>()?, 1);
/// assert_eq!(adam_update_is_finite(&[(&w, &g, &m, &v)], wild)?.to_scalar::<u8>()?, 0);
/// assert_eq!(w.to_vec1::<f32>()?, [3e38]); // nothing written
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn adam_update_is_finite(
    items: &[(&Var, &Tensor, &Var, &Var)],
    step: AdamStep,
) -> Result<Tensor> {
    const OP: &str = "adam_update_is_finite";
    for (w, g, m, v) in items {
        let (m, v) = (m.as_tensor(), v.as_tensor());
        check_update(OP, w.as_tensor(), &[("g", g), ("m", m), ("v", v)])?;
    }
    let Some(first) = items.first() else {
        return Err(invalid(OP, "items", "at least one weight expected".into()));
    };
    let device = first.0.device();
    #[cfg(feature = "cuda")]
    if cuda_f32(items.iter().map(|i| i.0.as_tensor())) {
        let tensors: Vec<[&Tensor; 4]> = items
            .iter()
            .map(|(w, g, m, v)| [w.as_tensor(), *g, m.as_tensor(), v.as_tensor()])
            .collect();
        return super::cuda::adam_update_is_finite(&tensors, &step);
    }
    if cpu_floats(items.iter().map(|i| i.0.as_tensor())) {
        let mut finite = true;
        for (w, g, m, v) in items {
            finite = finite && cpu::optimizer::adam_update_is_finite(w, g, m, v, &step)?;
        }
        return Ok(Tensor::new(u8::from(finite), device)?);
    }
    let mut new = Vec::with_capacity(3 * items.len());
    for (w, g, m, v) in items {
        let (w1, m1, v1) = reference::adam_update(w, g, m, v, step)?;
        new.extend([w1, m1, v1]);
    }
    all_finite(&new.iter().collect::<Vec<_>>())
}

/// [`adam_update_is_finite`] for SGD: whether one step of every `(w, g, velocity)` (as
/// [`sgd_update_in_place`] takes them) would write only finite values; nothing is written.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_functional::ops::{sgd_update_is_finite, SgdStep};
/// let w = Var::new(&[1f32], &Device::Cpu)?;
/// let g = Tensor::new(&[1e30f32], &Device::Cpu)?;
/// let step = SgdStep { learning_rate: 1e10, momentum: 0.0, nesterov: false, decay: 1.0 };
/// assert_eq!(sgd_update_is_finite(&[(&w, &g, None)], step)?.to_scalar::<u8>()?, 0);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn sgd_update_is_finite(
    items: &[(&Var, &Tensor, Option<&Var>)],
    step: SgdStep,
) -> Result<Tensor> {
    const OP: &str = "sgd_update_is_finite";
    for (w, g, u) in items {
        check_sgd_item(OP, w, g, *u, &step)?;
    }
    let Some(first) = items.first() else {
        return Err(invalid(OP, "items", "at least one weight expected".into()));
    };
    let device = first.0.device();
    #[cfg(feature = "cuda")]
    if cuda_f32(items.iter().map(|i| i.0.as_tensor())) {
        let tensors: Vec<(&Tensor, &Tensor, Option<&Tensor>)> = items
            .iter()
            .map(|(w, g, u)| (w.as_tensor(), *g, u.map(|u| u.as_tensor())))
            .collect();
        return super::cuda::sgd_update_is_finite(&tensors, &step);
    }
    if cpu_floats(items.iter().map(|i| i.0.as_tensor())) {
        let mut finite = true;
        for (w, g, u) in items {
            let u = u.map(|u| u.as_tensor());
            finite = finite && cpu::optimizer::sgd_update_is_finite(w, g, u, &step)?;
        }
        return Ok(Tensor::new(u8::from(finite), device)?);
    }
    let mut new = Vec::new();
    for (w, g, u) in items {
        let (w1, u1) = reference::sgd_update(w, g, u.map(|u| u.as_tensor()), step)?;
        new.push(w1);
        new.extend(u1);
    }
    all_finite(&new.iter().collect::<Vec<_>>())
}

/// One SGD step of many weights, written in place: each `(w, g, velocity)`, the velocity a
/// variable, given exactly when the step has momentum. `keep` as in
/// [`adam_update_in_place`]; the arithmetic is [`sgd_update`](super::sgd_update)'s.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_functional::ops::{sgd_update_in_place, SgdStep};
/// let w = Var::new(&[1f32], &Device::Cpu)?;
/// let g = Tensor::new(&[2f32], &Device::Cpu)?;
/// let step = SgdStep { learning_rate: 0.5, momentum: 0.0, nesterov: false, decay: 1.0 };
/// sgd_update_in_place(&[(&w, &g, None)], step, None)?;
/// assert_eq!(w.to_vec1::<f32>()?, [0.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn sgd_update_in_place(
    items: &[(&Var, &Tensor, Option<&Var>)],
    step: SgdStep,
    keep: Option<&Tensor>,
) -> Result<()> {
    const OP: &str = "sgd_update_in_place";
    let mut operands = Vec::with_capacity(3 * items.len());
    for (i, (w, g, u)) in items.iter().enumerate() {
        check_sgd_item(OP, w, g, *u, &step)?;
        let u = u.map(|u| u.as_tensor());
        operands.extend([("w", i, true, w.as_tensor()), ("g", i, false, *g)]);
        operands.extend(u.map(|u| ("velocity", i, true, u)));
    }
    check_aliasing(OP, &operands)?;
    let Some(first) = items.first() else {
        return Ok(());
    };
    check_keep(OP, Some(first.0.as_tensor()), keep)?;
    #[cfg(feature = "cuda")]
    if cuda_f32(items.iter().map(|i| i.0.as_tensor())) {
        let tensors: Vec<(&Tensor, &Tensor, Option<&Tensor>)> = items
            .iter()
            .map(|(w, g, u)| (w.as_tensor(), *g, u.map(|u| u.as_tensor())))
            .collect();
        return super::cuda::sgd_update_in_place(&tensors, &step, keep);
    }
    if cpu_floats(items.iter().map(|i| i.0.as_tensor())) {
        if keep_on_cpu(keep)? {
            for (w, g, u) in items {
                cpu::optimizer::sgd_update_in_place(w, g, u.map(|u| u.as_tensor()), &step)?;
            }
        }
        return Ok(());
    }
    let mut new = Vec::with_capacity(items.len());
    for (w, g, u) in items {
        let (w1, u1) = reference::sgd_update(w, g, u.map(|u| u.as_tensor()), step)?;
        let u1 = match (u1, u) {
            (Some(u1), Some(u)) => Some(select(keep, &u1, u)?),
            _ => None,
        };
        new.push((select(keep, &w1, w)?, u1));
    }
    for ((w, _, u), (w1, u1)) in items.iter().zip(new) {
        w.set(&w1)?;
        if let (Some(u), Some(u1)) = (u, u1) {
            u.set(&u1)?;
        }
    }
    Ok(())
}

/// The checks of one `(w, g, velocity)` of an SGD step: operands like `w`, and a velocity
/// exactly when there is momentum.
fn check_sgd_item(
    op: &'static str,
    w: &Var,
    g: &Tensor,
    u: Option<&Var>,
    step: &SgdStep,
) -> Result<()> {
    let u = u.map(|u| u.as_tensor());
    check_update(op, w.as_tensor(), &super::arguments::sgd_operands(g, u))?;
    if (step.momentum != 0.0) != u.is_some() {
        return Err(invalid(
            op,
            "velocity",
            "a velocity goes with momentum, and only with it".into(),
        ));
    }
    Ok(())
}

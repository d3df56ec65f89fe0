//! The crate's own CUDA kernels (feature `cuda`), each one launch for every tensor of a list:
//! optimizer updates (`optimizer.cu`: into fresh buffers, in place, or as a check that the
//! new values would be finite, writing nothing), the finite check of a step's loss and
//! gradients and the in-place copy of held-back state (`multi_tensor.cu`).
//! `build.rs` compiles the `.cu` files to PTX with nvcc; the driver JIT-compiles them on first
//! use. Arguments are checked by [`crate::ops`] before they get here.

use candle_core::cuda::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Storage, Tensor, Var};

use crate::Result;
use crate::ops::{AdamStep, SgdStep};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optimizer.ptx"));
const MODULE: &str = "candle_functional_optimizer";
const MULTI_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/multi_tensor.ptx"));
const MULTI_MODULE: &str = "candle_functional_multi_tensor";
const THREADS: u32 = 256;
/// Blocks of a grid-stride launch: enough to fill any current GPU several times over.
const MAX_BLOCKS: u64 = 8192;

fn fail(message: String) -> crate::Error {
    candle_core::Error::Msg(format!("multi-tensor kernel: {message}")).into()
}

/// The device address of the first element of a contiguous f32 (or, for `keep`, u8) CUDA
/// tensor.
fn address(t: &Tensor, dev: &CudaDevice) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        return Err(fail("a CUDA tensor expected".into()));
    };
    let Some((start, _)) = layout.contiguous_offsets() else {
        return Err(fail("contiguous tensors expected".into()));
    };
    let stream = dev.cuda_stream();
    // The kernel runs on candle's one stream, after every earlier use of these buffers.
    Ok(match t.dtype() {
        candle_core::DType::F32 => {
            let slice = cuda.as_cuda_slice::<f32>()?;
            slice.device_ptr(&stream).0 + (start * 4) as u64
        }
        candle_core::DType::U8 => {
            let slice = cuda.as_cuda_slice::<u8>()?;
            slice.device_ptr(&stream).0 + start as u64
        }
        other => return Err(fail(format!("f32 expected, got {other:?}"))),
    })
}

/// One output buffer for `3 * total` (or `2 * total`, or `total`) elements and its address.
struct Launch {
    out: CudaSlice<f32>,
    out_address: u64,
}

/// The launch shape of a grid-stride loop over `total` elements.
fn grid(total: u64) -> LaunchConfig {
    let blocks = total.div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Launch {
    /// A buffer for `per_element` outputs of each of `total` elements: the size checked, so
    /// that an overflow cannot shrink the buffer the kernel then writes past.
    fn new(dev: &CudaDevice, per_element: usize, total: u64) -> Result<Self> {
        let outputs = usize::try_from(total)
            .ok()
            .and_then(|t| t.checked_mul(per_element))
            .ok_or_else(|| fail(format!("{per_element} × {total} outputs overflow")))?;
        // SAFETY: the kernel writes every element of every output before anything reads it.
        let mut out = unsafe { dev.alloc::<f32>(outputs.max(1)) }?;
        let out_address = out.device_ptr_mut(&dev.cuda_stream()).0;
        Ok(Self { out, out_address })
    }

    /// The output buffer as a flat tensor.
    fn into_tensor(self, dev: &CudaDevice) -> Tensor {
        let len = self.out.len();
        Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(self.out, dev.clone())),
            len,
            BackpropOp::none(),
            false,
        )
    }
}

/// The pointer table and prefix sums copied to the device, and the address of `keep` (0
/// without one).
fn upload(
    dev: &CudaDevice,
    table: &[u64],
    offsets: &[u64],
    keep: Option<&Tensor>,
) -> Result<(CudaSlice<u64>, CudaSlice<u64>, u64)> {
    let stream = dev.cuda_stream();
    let table = stream.clone_htod(table).map_err(candle_core::Error::wrap)?;
    let offsets = stream
        .clone_htod(offsets)
        .map_err(candle_core::Error::wrap)?;
    let keep = keep.map(|k| address(k, dev)).transpose()?.unwrap_or(0);
    Ok((table, offsets, keep))
}

/// Prefix sums of the weights' element counts (`tensors + 1` entries).
fn offsets(sizes: impl Iterator<Item = usize>) -> Vec<u64> {
    let mut out = vec![0u64];
    for n in sizes {
        out.push(out[out.len() - 1] + n as u64);
    }
    out
}

/// Contiguous copies (or the tensors themselves, when contiguous) of every operand.
fn contiguous<const N: usize>(items: &[[&Tensor; N]]) -> Result<Vec<[Tensor; N]>> {
    items
        .iter()
        .map(|ts| {
            let mut out = Vec::with_capacity(N);
            for t in ts {
                out.push(t.contiguous()?);
            }
            out.try_into().map_err(|_| fail("operand count".into()))
        })
        .collect()
}

/// Launches `adam_multi_f32` over `items` (`[w, g, m, v]`, contiguous), writing weight `t`'s
/// result `k` (0: w', 1: m', 2: v') at `destination(t, k)`.
fn launch_adam(
    dev: &CudaDevice,
    items: &[[Tensor; 4]],
    step: &AdamStep,
    (keep, finite): (Option<&Tensor>, u64),
    destination: impl Fn(usize, usize) -> Result<u64>,
) -> Result<()> {
    let offsets = offsets(items.iter().map(|ts| ts[0].elem_count()));
    let total = offsets[offsets.len() - 1];
    let mut table = Vec::with_capacity(7 * items.len());
    for (t, ts) in items.iter().enumerate() {
        for x in ts {
            table.push(address(x, dev)?);
        }
        for k in 0..3 {
            table.push(destination(t, k)?);
        }
    }
    let (table_dev, offsets_dev, keep_address) = upload(dev, &table, &offsets, keep)?;
    let func = dev.get_or_load_custom_func("adam_multi_f32", MODULE, PTX)?;
    let tensors = items.len() as i32;
    let (alpha, b1, omb1) = (
        step.alpha as f32,
        step.beta_1 as f32,
        (1.0 - step.beta_1) as f32,
    );
    let (b2, omb2, eps) = (
        step.beta_2 as f32,
        (1.0 - step.beta_2) as f32,
        step.epsilon as f32,
    );
    let (decay, decays) = (step.decay as f32, i32::from(step.decay != 1.0));
    let mut builder = func.builder();
    builder
        .arg(&table_dev)
        .arg(&offsets_dev)
        .arg(&tensors)
        .arg(&total)
        .arg(&alpha)
        .arg(&b1)
        .arg(&omb1)
        .arg(&b2)
        .arg(&omb2)
        .arg(&eps)
        .arg(&decay)
        .arg(&decays)
        .arg(&keep_address)
        .arg(&finite);
    // SAFETY: the table holds live device buffers of the sizes the prefix sums state (inputs
    // contiguous f32; each destination either a fresh buffer's slice or, in place, the input
    // it replaces, which only the thread that reads an element writes), the argument list
    // matches the kernel's signature, and `keep` and `finite` are null or device u8s (with
    // `finite` set, the kernel writes nothing but that flag).
    unsafe { builder.launch(grid(total)) }.map_err(candle_core::Error::wrap)?;
    Ok(())
}

/// `(w', m', v')` of every weight in one launch; with `keep` (a device u8), the old values
/// where it is 0.
pub(crate) fn adam_update_many(
    items: &[[&Tensor; 4]],
    step: &AdamStep,
    keep: Option<&Tensor>,
) -> Result<Vec<(Tensor, Tensor, Tensor)>> {
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    let dev = first[0].device().as_cuda_device()?.clone();
    let items = contiguous(items)?;
    let offsets = offsets(items.iter().map(|ts| ts[0].elem_count()));
    let total = offsets[offsets.len() - 1];
    let launch = Launch::new(&dev, 3, total)?;
    launch_adam(&dev, &items, step, (keep, 0), |t, k| {
        Ok(launch.out_address + 4 * (k as u64 * total + offsets[t]))
    })?;
    let out = launch.into_tensor(&dev);
    let mut results = Vec::with_capacity(items.len());
    for (t, ts) in items.iter().enumerate() {
        let (at, n, shape) = (offsets[t] as usize, ts[0].elem_count(), ts[0].shape());
        let part = |k: usize| -> Result<Tensor> {
            Ok(out.narrow(0, k * total as usize + at, n)?.reshape(shape)?)
        };
        results.push((part(0)?, part(1)?, part(2)?));
    }
    Ok(results)
}

/// One Adam step of every weight in one launch, written into `w`, `m` and `v` themselves
/// (contiguous f32 variables: checked by the caller).
pub(crate) fn adam_update_in_place(
    items: &[[&Tensor; 4]],
    step: &AdamStep,
    keep: Option<&Tensor>,
) -> Result<()> {
    let Some(first) = items.first() else {
        return Ok(());
    };
    let dev = first[0].device().as_cuda_device()?.clone();
    let operands = contiguous(items)?;
    // w' over w, m' over m, v' over v: operands 0, 2 and 3 as given, never a contiguous copy
    // (a write into a copy would be lost; `address` refuses a non-contiguous destination).
    launch_adam(&dev, &operands, step, (keep, 0), |t, k| {
        address(items[t][[0, 2, 3][k]], &dev)
    })
}

/// Launches `sgd_multi_f32` over `items` (`(w, g, velocity)`, contiguous), writing weight
/// `t`'s new weight (`k` 0) and velocity (`k` 1) at `destination(t, k)`.
fn launch_sgd(
    dev: &CudaDevice,
    items: &[(Tensor, Tensor, Option<Tensor>)],
    step: &SgdStep,
    (keep, finite): (Option<&Tensor>, u64),
    destination: impl Fn(usize, usize) -> Result<u64>,
) -> Result<()> {
    let offsets = offsets(items.iter().map(|(w, _, _)| w.elem_count()));
    let total = offsets[offsets.len() - 1];
    let with_velocity = step.momentum != 0.0;
    let mut table = Vec::with_capacity(5 * items.len());
    for (t, (w, g, u)) in items.iter().enumerate() {
        table.push(address(w, dev)?);
        table.push(address(g, dev)?);
        table.push(
            u.as_ref()
                .map(|u| address(u, dev))
                .transpose()?
                .unwrap_or(0),
        );
        table.push(destination(t, 0)?);
        table.push(if with_velocity { destination(t, 1)? } else { 0 });
    }
    let (table_dev, offsets_dev, keep_address) = upload(dev, &table, &offsets, keep)?;
    let func = dev.get_or_load_custom_func("sgd_multi_f32", MODULE, PTX)?;
    let tensors = items.len() as i32;
    let (lr, momentum) = (step.learning_rate as f32, step.momentum as f32);
    let nesterov = i32::from(step.nesterov);
    let (decay, decays) = (step.decay as f32, i32::from(step.decay != 1.0));
    let mut builder = func.builder();
    builder
        .arg(&table_dev)
        .arg(&offsets_dev)
        .arg(&tensors)
        .arg(&total)
        .arg(&lr)
        .arg(&momentum)
        .arg(&nesterov)
        .arg(&decay)
        .arg(&decays)
        .arg(&keep_address)
        .arg(&finite);
    // SAFETY: as in `launch_adam` (`finite` likewise); a null velocity pointer means no momentum, which the
    // kernel checks before reading it.
    unsafe { builder.launch(grid(total)) }.map_err(candle_core::Error::wrap)?;
    Ok(())
}

/// Contiguous copies of the SGD operands.
fn contiguous_sgd(
    items: &[(&Tensor, &Tensor, Option<&Tensor>)],
) -> Result<Vec<(Tensor, Tensor, Option<Tensor>)>> {
    items
        .iter()
        .map(|(w, g, u)| {
            Ok((
                w.contiguous()?,
                g.contiguous()?,
                u.map(Tensor::contiguous).transpose()?,
            ))
        })
        .collect()
}

/// `(w', velocity')` of every weight in one launch (velocities with momentum only).
pub(crate) fn sgd_update_many(
    items: &[(&Tensor, &Tensor, Option<&Tensor>)],
    step: &SgdStep,
    keep: Option<&Tensor>,
) -> Result<Vec<(Tensor, Option<Tensor>)>> {
    let Some(first) = items.first() else {
        return Ok(Vec::new());
    };
    let dev = first.0.device().as_cuda_device()?.clone();
    let with_velocity = step.momentum != 0.0;
    let items = contiguous_sgd(items)?;
    let offsets = offsets(items.iter().map(|(w, _, _)| w.elem_count()));
    let total = offsets[offsets.len() - 1];
    let outputs = if with_velocity { 2 } else { 1 };
    let launch = Launch::new(&dev, outputs, total)?;
    launch_sgd(&dev, &items, step, (keep, 0), |t, k| {
        Ok(launch.out_address + 4 * (k as u64 * total + offsets[t]))
    })?;
    let out = launch.into_tensor(&dev);
    let mut results = Vec::with_capacity(items.len());
    for (t, (w, _, _)) in items.iter().enumerate() {
        let (at, n, shape) = (offsets[t] as usize, w.elem_count(), w.shape());
        let w_new = out.narrow(0, at, n)?.reshape(shape)?;
        let u_new = if with_velocity {
            Some(out.narrow(0, total as usize + at, n)?.reshape(shape)?)
        } else {
            None
        };
        results.push((w_new, u_new));
    }
    Ok(results)
}

/// One SGD step of every weight in one launch, written into `w` and its velocity.
pub(crate) fn sgd_update_in_place(
    items: &[(&Tensor, &Tensor, Option<&Tensor>)],
    step: &SgdStep,
    keep: Option<&Tensor>,
) -> Result<()> {
    let Some(first) = items.first() else {
        return Ok(());
    };
    let dev = first.0.device().as_cuda_device()?.clone();
    let operands = contiguous_sgd(items)?;
    // The destinations as given, never a contiguous copy (see `adam_update_in_place`).
    launch_sgd(&dev, &operands, step, (keep, 0), |t, k| {
        match (k, items[t]) {
            (0, (w, _, _)) => address(w, &dev),
            (_, (_, _, Some(u))) => address(u, &dev),
            _ => Err(fail("a velocity expected".into())),
        }
    })
}

/// Launches `name`, one of `multi_tensor.cu`'s kernels, whose arguments are all alike: the
/// pointer table, the prefix sums of the element counts, the number of tensors, their total
/// elements and one flag's device address.
fn launch_multi(
    dev: &CudaDevice,
    name: &str,
    table: &[u64],
    offsets: &[u64],
    flag: u64,
) -> Result<()> {
    let (table_dev, offsets_dev, _) = upload(dev, table, offsets, None)?;
    let func = dev.get_or_load_custom_func(name, MULTI_MODULE, MULTI_PTX)?;
    let (tensors, total) = ((offsets.len() - 1) as i32, offsets[offsets.len() - 1]);
    let mut builder = func.builder();
    builder
        .arg(&table_dev)
        .arg(&offsets_dev)
        .arg(&tensors)
        .arg(&total)
        .arg(&flag);
    // SAFETY: the callers fill the table with live contiguous f32 device buffers of the sizes
    // the prefix sums state (destinations distinct from sources), `flag` is a device u8 (or
    // null where the kernel allows it), and the argument list matches the kernels' signature.
    unsafe { builder.launch(grid(total)) }.map_err(candle_core::Error::wrap)?;
    Ok(())
}

/// A u8 device scalar: 1 when every element of every f32 tensor is finite. One upload of the
/// pointer table and the flag, one launch; nothing is read back.
pub(crate) fn all_finite(tensors: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return Err(fail("no tensors".into()));
    };
    let dev = first.device().as_cuda_device()?.clone();
    let tensors: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let offsets = offsets(tensors.iter().map(Tensor::elem_count));
    let table = tensors
        .iter()
        .map(|t| address(t, &dev))
        .collect::<Result<Vec<_>>>()?;
    let (ok, ok_address) = true_flag(&dev)?;
    launch_multi(&dev, "all_finite_f32", &table, &offsets, ok_address)?;
    Ok(flag_tensor(ok, &dev))
}

/// A device u8 set to 1, and its address, for a kernel to clear.
fn true_flag(dev: &CudaDevice) -> Result<(CudaSlice<u8>, u64)> {
    let stream = dev.cuda_stream();
    let ok = stream
        .clone_htod(&[1u8])
        .map_err(candle_core::Error::wrap)?;
    let address = ok.device_ptr(&stream).0;
    Ok((ok, address))
}

/// The flag of [`true_flag`] as a u8 scalar tensor.
fn flag_tensor(ok: CudaSlice<u8>, dev: &CudaDevice) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(ok, dev.clone())),
        (),
        BackpropOp::none(),
        false,
    )
}

/// A u8 device scalar: 1 when one Adam step of every `[w, g, m, v]` would write only finite
/// values. The update kernel runs as a check: it computes and writes nothing.
pub(crate) fn adam_update_is_finite(items: &[[&Tensor; 4]], step: &AdamStep) -> Result<Tensor> {
    let Some(first) = items.first() else {
        return Err(fail("no tensors".into()));
    };
    let dev = first[0].device().as_cuda_device()?.clone();
    let operands = contiguous(items)?;
    let (ok, ok_address) = true_flag(&dev)?;
    // The destinations are never written in a check; the inputs' addresses stand in.
    launch_adam(&dev, &operands, step, (None, ok_address), |t, k| {
        address(&operands[t][[0, 2, 3][k]], &dev)
    })?;
    Ok(flag_tensor(ok, &dev))
}

/// [`adam_update_is_finite`] for SGD's `(w, g, velocity)`.
pub(crate) fn sgd_update_is_finite(
    items: &[(&Tensor, &Tensor, Option<&Tensor>)],
    step: &SgdStep,
) -> Result<Tensor> {
    let Some(first) = items.first() else {
        return Err(fail("no tensors".into()));
    };
    let dev = first.0.device().as_cuda_device()?.clone();
    let operands = contiguous_sgd(items)?;
    let (ok, ok_address) = true_flag(&dev)?;
    launch_sgd(&dev, &operands, step, (None, ok_address), |t, k| {
        match (k, &operands[t]) {
            (0, (w, _, _)) => address(w, &dev),
            (_, (_, _, Some(u))) => address(u, &dev),
            _ => Err(fail("a velocity expected".into())),
        }
    })?;
    Ok(flag_tensor(ok, &dev))
}

/// Copies each value into its variable, all or none as the device u8 `keep` says (without
/// `keep`, all), in one launch.
pub(crate) fn assign_if(targets: &[(&Var, &Tensor)], keep: Option<&Tensor>) -> Result<()> {
    let Some((first, _)) = targets.first() else {
        return Ok(());
    };
    let dev = first.device().as_cuda_device()?.clone();
    let values: Vec<Tensor> = targets
        .iter()
        .map(|(_, t)| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let offsets = offsets(values.iter().map(Tensor::elem_count));
    let mut table = Vec::with_capacity(2 * targets.len());
    for ((var, _), value) in targets.iter().zip(&values) {
        table.push(address(var.as_tensor(), &dev)?);
        table.push(address(value, &dev)?);
    }
    let keep_address = keep.map(|k| address(k, &dev)).transpose()?.unwrap_or(0);
    launch_multi(&dev, "assign_if_f32", &table, &offsets, keep_address)
}

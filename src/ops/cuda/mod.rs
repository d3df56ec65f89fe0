//! The crate's own CUDA kernels (feature `cuda`): multi-tensor optimizer updates, one launch
//! for every weight of a model. `build.rs` compiles `optimizer.cu` to PTX with nvcc; the driver
//! JIT-compiles it on first use. Arguments are checked by [`crate::ops`] before they get here.

use candle_core::cuda::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Storage, Tensor};

use crate::Result;
use crate::ops::{AdamStep, SgdStep};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optimizer.ptx"));
const MODULE: &str = "candle_functional_optimizer";
const THREADS: u32 = 256;
/// Blocks of a grid-stride launch: enough to fill any current GPU several times over.
const MAX_BLOCKS: u64 = 8192;

fn fail(message: String) -> crate::Error {
    candle_core::Error::Msg(format!("multi-tensor update: {message}")).into()
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

/// One output buffer for `3 * total` (or `2 * total`) elements, its address, and the launch
/// shape of a grid-stride loop over `total` elements.
struct Launch {
    out: CudaSlice<f32>,
    out_address: u64,
    config: LaunchConfig,
}

impl Launch {
    fn new(dev: &CudaDevice, outputs: usize) -> Result<Self> {
        // SAFETY: the kernel writes every element of every output before anything reads it.
        let mut out = unsafe { dev.alloc::<f32>(outputs.max(1)) }?;
        let out_address = out.device_ptr_mut(&dev.cuda_stream()).0;
        let total = outputs as u64;
        let blocks = total.div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS) as u32;
        Ok(Self {
            out,
            out_address,
            config: LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        })
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
    let items: Vec<[Tensor; 4]> = items
        .iter()
        .map(|ts| {
            Ok([
                ts[0].contiguous()?,
                ts[1].contiguous()?,
                ts[2].contiguous()?,
                ts[3].contiguous()?,
            ])
        })
        .collect::<Result<_>>()?;
    let offsets = offsets(items.iter().map(|ts| ts[0].elem_count()));
    let total = offsets[offsets.len() - 1];
    let launch = Launch::new(&dev, 3 * total as usize)?;
    let mut table = Vec::with_capacity(7 * items.len());
    for (t, ts) in items.iter().enumerate() {
        for x in ts {
            table.push(address(x, &dev)?);
        }
        for k in 0..3 {
            table.push(launch.out_address + 4 * (k * total + offsets[t]));
        }
    }
    let (table_dev, offsets_dev, keep_address) = upload(&dev, &table, &offsets, keep)?;
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
        .arg(&keep_address);
    let config = launch.config;
    // SAFETY: the table holds live device buffers of the sizes the prefix sums state (inputs
    // contiguous f32, outputs inside the fresh buffer), the argument list matches the kernel's
    // signature, and `keep` is null or a device u8.
    unsafe { builder.launch(config) }.map_err(candle_core::Error::wrap)?;
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
    let items: Vec<(Tensor, Tensor, Option<Tensor>)> = items
        .iter()
        .map(|(w, g, u)| {
            Ok((
                w.contiguous()?,
                g.contiguous()?,
                u.map(Tensor::contiguous).transpose()?,
            ))
        })
        .collect::<Result<_>>()?;
    let offsets = offsets(items.iter().map(|(w, _, _)| w.elem_count()));
    let total = offsets[offsets.len() - 1];
    let outputs = if with_velocity { 2 } else { 1 };
    let launch = Launch::new(&dev, outputs * total as usize)?;
    let mut table = Vec::with_capacity(5 * items.len());
    for (t, (w, g, u)) in items.iter().enumerate() {
        table.push(address(w, &dev)?);
        table.push(address(g, &dev)?);
        table.push(
            u.as_ref()
                .map(|u| address(u, &dev))
                .transpose()?
                .unwrap_or(0),
        );
        table.push(launch.out_address + 4 * offsets[t]);
        table.push(if with_velocity {
            launch.out_address + 4 * (total + offsets[t])
        } else {
            0
        });
    }
    let (table_dev, offsets_dev, keep_address) = upload(&dev, &table, &offsets, keep)?;
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
        .arg(&keep_address);
    let config = launch.config;
    // SAFETY: as in `adam_update_many`; a null velocity pointer means no momentum, which the
    // kernel checks before reading it.
    unsafe { builder.launch(config) }.map_err(candle_core::Error::wrap)?;
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

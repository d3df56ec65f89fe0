//! [`Nccl`]: a [`Communicator`] whose gradient sums stay on the GPU (NVIDIA's NCCL, through
//! candle's `nccl` feature), bootstrapped over a host communicator: MPI under `mpirun`, or
//! [`SingleProcess`](crate::distributed::SingleProcess) for one GPU.
//!
//! NCCL moves device buffers only; loss and metric sums, broadcasts of weights and bytes and
//! barriers are small or rare and go through the host communicator, as PyTorch's NCCL process
//! group does with its store. The one NCCL call of a training step is the gradient
//! all-reduce, one per 25 MB bucket ([`Communicator::all_reduce_sum_tensor`]).
//! Synchronized BatchNorm's per-channel sums still travel through the host (a few hundred
//! values per layer).

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::Result;
use crate::distributed::Communicator;
use crate::distributed::communicator::{error, sum_through_host};

/// NCCL's unique id is 128 bytes (`ncclUniqueId`), sent from rank 0 to the others.
const ID_BYTES: usize = 128;

/// The NCCL communicator of one rank on one CUDA device: gradient buckets are summed on the
/// device, every other collective goes through `host`.
///
/// # Examples
/// ```no_run
/// use std::sync::Arc;
/// use candle_core::Device;
/// use candle_functional::distributed::{Communicator, Nccl, SingleProcess};
/// // One GPU (world size 1); under `mpirun`, pass `Arc::new(Mpi::init()?)` as the host and
/// // the device of the rank's GPU (`Device::new_cuda(local_rank)`).
/// let device = Device::new_cuda(0)?;
/// let comm = Nccl::init(Arc::new(SingleProcess), &device)?;
/// assert_eq!((comm.rank(), comm.world_size(), comm.backend()), (0, 1, "nccl"));
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub struct Nccl {
    host: Arc<dyn Communicator>,
    device: Device,
    /// NCCL communicators are not thread-safe: one call at a time, under this lock.
    comm: Mutex<Comm>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as no two calls run at
// once (NCCL's documentation: communicators are not thread-safe); every use holds the mutex.
unsafe impl Send for Nccl {}
// SAFETY: as above: shared access goes through the mutex.
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Creates the NCCL communicator of `host`'s rank on `device` (a CUDA device): rank 0
    /// makes NCCL's unique id and `host` broadcasts it; every rank of `host` must call this
    /// at the same time, each with its own GPU.
    ///
    /// # Examples
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use candle_functional::distributed::{Nccl, SingleProcess};
    /// let comm = Nccl::init(Arc::new(SingleProcess), &candle_core::Device::new_cuda(0)?)?;
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn init(host: Arc<dyn Communicator>, device: &Device) -> Result<Self> {
        let cuda = device.as_cuda_device().map_err(|_| {
            error(
                host.as_ref(),
                format!("NCCL needs a CUDA device, not {device:?}"),
            )
        })?;
        // ncclCommInitRank works on the calling thread's current CUDA context.
        cuda.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| error(host.as_ref(), format!("binding the CUDA context: {e:?}")))?;
        let nccl_error =
            |what: &str, e: &dyn std::fmt::Debug| error(host.as_ref(), format!("{what}: {e:?}"));
        let mut id_bytes = [0u8; ID_BYTES];
        if host.rank() == 0 {
            let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", &e))?;
            for (byte, c) in id_bytes.iter_mut().zip(id.internal()) {
                *byte = *c as u8;
            }
        }
        host.broadcast_bytes(&mut id_bytes, 0)?;
        let id = Id::uninit(id_bytes.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(cuda.cuda_stream(), host.rank(), host.world_size(), id)
            .map_err(|e| nccl_error("ncclCommInitRank", &e))?;
        Ok(Self {
            host,
            device: device.clone(),
            comm: Mutex::new(comm),
        })
    }

    /// The CUDA device whose tensors this communicator sums.
    ///
    /// # Examples
    /// ```no_run
    /// # use std::sync::Arc;
    /// # use candle_functional::distributed::{Nccl, SingleProcess};
    /// # let comm = Nccl::init(Arc::new(SingleProcess), &candle_core::Device::new_cuda(0)?)?;
    /// assert!(comm.device().is_cuda());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn lock(&self) -> MutexGuard<'_, Comm> {
        // A poisoned lock means another thread panicked between calls; the communicator
        // itself is left as NCCL left it.
        self.comm
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.host.rank()
    }

    fn world_size(&self) -> usize {
        self.host.world_size()
    }

    fn backend(&self) -> &str {
        "nccl"
    }

    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.host.all_reduce_sum_f32(values)
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.host.all_reduce_sum_f64(values)
    }

    fn broadcast_f32(&self, values: &mut [f32], root: usize) -> Result<()> {
        self.host.broadcast_f32(values, root)
    }

    fn broadcast_bytes(&self, bytes: &mut [u8], root: usize) -> Result<()> {
        self.host.broadcast_bytes(bytes, root)
    }

    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }

    fn all_reduce_sum_tensor(&self, flat: &Tensor) -> Result<Tensor> {
        if !flat.device().same_device(&self.device) {
            // Not this GPU's tensor: the host path, as any communicator.
            return sum_through_host(flat, |values| self.host.all_reduce_sum_f32(values));
        }
        let op = DeviceSum { nccl: self };
        Ok(flat
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&op)?)
    }
}

/// The sum over ranks of a contiguous f32 CUDA tensor, into a fresh device buffer, on the
/// device's stream (so it is ordered after the kernels that wrote the gradients).
struct DeviceSum<'a> {
    nccl: &'a Nccl,
}

impl CustomOp1 for DeviceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        _storage: &candle_core::CpuStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("NCCL sums CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL all-reduce: a contiguous tensor expected")
        };
        let device = storage.device().clone();
        let send = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let mut sum = device.alloc_zeros::<f32>(end - start)?;
        self.nccl
            .lock()
            .all_reduce(&send, &mut sum, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok((
            CudaStorage::wrap_cuda_slice(sum, device),
            layout.shape().clone(),
        ))
    }
}

//! Choosing a device from a string: `auto`, `cpu`, `cuda` or `cuda:N`; [`local_rank`], the
//! GPU of a rank under `mpirun` or `torchrun`.

use candle_core::Device;

use crate::{Error, Result};

/// Parses a device request. `auto` takes a CUDA device when this build has CUDA and one is
/// present, else the CPU; `cuda` and `auto` take the GPU of this rank under `mpirun`
/// ([`local_rank`]; device 0 in one process), `cuda:N` device
/// `N`. `cuda[:N]` fails with a clear error when CUDA was not
/// compiled in (`--features cuda`) or the device cannot be opened.
///
/// # Examples
/// ```
/// use candle_functional::select_device;
/// assert!(select_device("cpu")?.is_cpu());
/// assert!(select_device("tpu").is_err());
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn select_device(spec: &str) -> Result<Device> {
    match spec.trim() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available()
                && let Ok(device) = Device::new_cuda(local_rank())
            {
                keep_freed_gpu_memory(&device)?;
                return Ok(device);
            }
            Ok(Device::Cpu)
        }
        "cuda" | "gpu" => cuda(local_rank()),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda(ordinal),
            _ => Err(Error::InvalidArgument(format!(
                "unknown device `{other}`: use auto, cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// This process's index among the ranks on its machine, which GPU it should take (also
/// `distributed::local_rank`): Open MPI's `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's
/// `MPI_LOCALRANKID`, torchrun's `LOCAL_RANK`; 0 when none is set.
///
/// # Examples
/// ```
/// # if std::env::var_os("OMPI_COMM_WORLD_LOCAL_RANK").is_none()
/// #     && std::env::var_os("MPI_LOCALRANKID").is_none() && std::env::var_os("LOCAL_RANK").is_none() {
/// assert_eq!(candle_functional::distributed::local_rank(), 0);
/// # }
/// ```
pub fn local_rank() -> usize {
    local_rank_from(|name| std::env::var(name).ok())
}

fn local_rank_from(var: impl Fn(&str) -> Option<String>) -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "LOCAL_RANK",
    ]
    .iter()
    .find_map(|name| var(name)?.trim().parse::<usize>().ok())
    .unwrap_or(0)
}

/// Keeps memory freed on a CUDA device in the driver's pool instead of returning it to the
/// system at every synchronization.
///
/// candle allocates every tensor with `cuMemAllocAsync` from the device's default pool, whose
/// release threshold is 0: each time the host waits for the GPU (reading the loss, say), the
/// pool hands its free memory back, and the next training step pays for fresh allocations.
/// PyTorch keeps its own cache for the same reason. [`select_device`] calls this for every
/// CUDA device it opens; call it yourself for devices made with `Device::new_cuda`. A no-op on
/// other devices.
///
/// # Examples
/// ```
/// candle_functional::keep_freed_gpu_memory(&candle_core::Device::Cpu)?;
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn keep_freed_gpu_memory(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda::cudarc::driver::sys;
        let stream = dev.cuda_stream();
        let cu_device = stream.context().cu_device();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold: u64 = u64::MAX;
        // SAFETY: plain driver calls on a valid device handle; `threshold` outlives the call.
        let status = unsafe {
            match sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device) {
                sys::CUresult::CUDA_SUCCESS => sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                ),
                other => other,
            }
        };
        if status != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::InvalidArgument(format!(
                "cannot configure the CUDA memory pool: {status:?}"
            )));
        }
    }
    let _ = device;
    Ok(())
}

/// `true` where reading a tensor's value on the host waits for the device's queue to drain
/// (CUDA, Metal), so that a training loop should read its running loss only now and then.
pub(crate) fn reads_wait_for_a_queue(device: &Device) -> bool {
    !matches!(device, Device::Cpu)
}

fn cuda(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::InvalidArgument(format!(
            "CUDA device {ordinal} was asked for, but this build has no CUDA support: \
             rebuild with `--features cuda` (or `cudnn`), or use --device cpu"
        )));
    }
    let device = Device::new_cuda(ordinal)
        .map_err(|e| Error::InvalidArgument(format!("cannot open CUDA device {ordinal}: {e}")))?;
    keep_freed_gpu_memory(&device)?;
    Ok(device)
}

/// A fake process environment for tests: looks `name` up in `pairs`.
#[cfg(test)]
pub(crate) fn env(
    pairs: &'static [(&'static str, &'static str)],
) -> impl Fn(&str) -> Option<String> {
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_rank_is_read_from_the_launchers_variables() {
        assert_eq!(local_rank_from(env(&[])), 0);
        assert_eq!(
            local_rank_from(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")])),
            3
        );
        assert_eq!(local_rank_from(env(&[("MPI_LOCALRANKID", "1")])), 1);
        assert_eq!(local_rank_from(env(&[("LOCAL_RANK", "x")])), 0);
    }

    #[test]
    fn cpu_builds_refuse_cuda_clearly() {
        if candle_core::utils::cuda_is_available() {
            eprintln!("skipped: this build has CUDA, the refusal path cannot be exercised");
            return;
        }
        let err = select_device("cuda:1").unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
        assert!(select_device("auto").unwrap().is_cpu());
        assert!(select_device("cuda:x").is_err());
    }
}

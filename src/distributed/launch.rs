//! [`from_environment`]: the communicator of a process, found from how it was launched;
//! [`for_device`]: NCCL for a rank's GPU.

use std::sync::Arc;

use candle_core::Device;

#[cfg(not(feature = "distributed"))]
use crate::Error;
use crate::Result;
#[cfg(feature = "distributed")]
use crate::distributed::Mpi;
use crate::distributed::{Communicator, SingleProcess};

/// The communicator of this process: `Mpi` when it was started by `mpirun` (or another
/// MPI launcher) with more than one rank and the `distributed` feature is on, otherwise
/// [`SingleProcess`]. Launched with several ranks but built without the feature, it fails
/// rather than train the same model several times over.
///
/// # Examples
/// ```
/// use candle_functional::distributed::from_environment;
/// // Not under mpirun: one process.
/// # if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_none() && std::env::var_os("PMI_SIZE").is_none() {
/// assert_eq!(from_environment()?.world_size(), 1);
/// # }
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn from_environment() -> Result<Arc<dyn Communicator>> {
    match launched_ranks(|name| std::env::var(name).ok()) {
        Some(n) if n > 1 => launched_with(n),
        _ => Ok(Arc::new(SingleProcess)),
    }
}

/// The communicator to train on `device` with: `host` itself on the CPU, or for one rank;
/// for a CUDA device in a world of several ranks, built with the `nccl` feature, an
/// `Nccl` communicator (`distributed::Nccl`) bootstrapped over `host`, so that
/// gradients are summed GPU to GPU. Without `nccl`, CUDA gradients travel through `host`
/// (copied to the host and back). Every rank must call it at the same point.
///
/// # Examples
/// ```
/// use candle_functional::distributed::{for_device, from_environment};
/// let device = candle_core::Device::Cpu;
/// let comm = for_device(from_environment()?, &device)?;
/// assert_ne!(comm.backend(), "nccl"); // CPU tensors never use NCCL
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn for_device(host: Arc<dyn Communicator>, device: &Device) -> Result<Arc<dyn Communicator>> {
    #[cfg(feature = "nccl")]
    if device.is_cuda() && host.world_size() > 1 {
        return Ok(Arc::new(crate::distributed::Nccl::init(host, device)?));
    }
    let _ = device;
    Ok(host)
}

/// The world size an MPI launcher gave this process, from its environment (`var` looks a
/// variable up): Open MPI's `OMPI_COMM_WORLD_SIZE`, or MPICH's and Intel MPI's `PMI_SIZE`.
fn launched_ranks(var: impl Fn(&str) -> Option<String>) -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|name| var(name)?.trim().parse::<usize>().ok())
}

#[cfg(feature = "distributed")]
fn launched_with(_ranks: usize) -> Result<Arc<dyn Communicator>> {
    Ok(Arc::new(Mpi::init()?))
}

#[cfg(not(feature = "distributed"))]
fn launched_with(ranks: usize) -> Result<Arc<dyn Communicator>> {
    Err(Error::InvalidArgument(format!(
        "launched as one of {ranks} MPI ranks, but built without the `distributed` feature: \
         rebuild with `--features distributed`"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::env;

    #[test]
    fn the_launchers_world_size_is_read_from_its_variables() {
        assert_eq!(launched_ranks(env(&[])), None);
        assert_eq!(
            launched_ranks(env(&[("OMPI_COMM_WORLD_SIZE", "4")])),
            Some(4)
        );
        assert_eq!(launched_ranks(env(&[("PMI_SIZE", "2")])), Some(2));
        assert_eq!(launched_ranks(env(&[("PMI_SIZE", "two")])), None);
    }

    #[cfg(not(feature = "distributed"))]
    #[test]
    fn several_ranks_without_the_feature_are_refused() {
        let err = launched_with(2)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--features distributed"), "{err}");
    }
}

//! [`from_environment`]: the communicator of a process, found from how it was launched.

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
pub fn from_environment() -> Result<std::sync::Arc<dyn Communicator>> {
    let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.parse::<usize>().ok());
    match launched {
        Some(n) if n > 1 => launched_with(n),
        _ => Ok(std::sync::Arc::new(SingleProcess)),
    }
}

#[cfg(feature = "distributed")]
fn launched_with(_ranks: usize) -> Result<std::sync::Arc<dyn Communicator>> {
    Ok(std::sync::Arc::new(Mpi::init()?))
}

#[cfg(not(feature = "distributed"))]
fn launched_with(ranks: usize) -> Result<std::sync::Arc<dyn Communicator>> {
    Err(Error::InvalidArgument(format!(
        "launched as one of {ranks} MPI ranks, but built without the `distributed` feature: \
         rebuild with `--features distributed`"
    )))
}

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
    match launched_ranks(|name| std::env::var(name).ok()) {
        Some(n) if n > 1 => launched_with(n),
        _ => Ok(std::sync::Arc::new(SingleProcess)),
    }
}

/// The world size an MPI launcher gave this process, from its environment (`var` looks a
/// variable up): Open MPI's `OMPI_COMM_WORLD_SIZE`, or MPICH's and Intel MPI's `PMI_SIZE`.
fn launched_ranks(var: impl Fn(&str) -> Option<String>) -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|name| var(name)?.trim().parse::<usize>().ok())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launchers_world_size_is_read_from_its_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
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

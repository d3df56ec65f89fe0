//! [`Communicator`]: the collective operations of a data-parallel run, and [`SingleProcess`],
//! the world of one rank.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// The collective operations data-parallel training needs: rank, world size, sums across
/// ranks, broadcasts and a barrier. Every rank must make the same calls in the same order
/// (they are collective); a call that fails on one rank is an error on every rank or ends the
/// job (MPI's default: a lost rank aborts it).
///
/// # Examples
/// ```
/// use candle_functional::distributed::{Communicator, SingleProcess};
/// let comm = SingleProcess;
/// let mut sums = [1.0f32, 2.0];
/// comm.all_reduce_sum_f32(&mut sums)?; // one rank: unchanged
/// assert_eq!((comm.rank(), comm.world_size(), sums), (0, 1, [1.0, 2.0]));
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub trait Communicator: Send + Sync {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// What carries the messages (`mpi`, `single process`), for logs.
    fn backend(&self) -> &str;

    /// Replaces `values` by their element-wise sum over every rank.
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()>;

    /// Replaces `values` by their element-wise sum over every rank, in f64 (loss and metric
    /// sums, sample counts).
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;

    /// Replaces `values` on every rank by `root`'s.
    fn broadcast_f32(&self, values: &mut [f32], root: usize) -> Result<()>;

    /// Replaces `bytes` on every rank by `root`'s (every rank passes the same length).
    fn broadcast_bytes(&self, bytes: &mut [u8], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// `flat`, a 1-D f32 tensor, summed over every rank, on `flat`'s device. By default
    /// through a host copy and [`Communicator::all_reduce_sum_f32`]; a GPU communicator
    /// (NCCL) sums its device's tensors where they are.
    fn all_reduce_sum_tensor(&self, flat: &Tensor) -> Result<Tensor> {
        sum_through_host(flat, |values| self.all_reduce_sum_f32(values))
    }

    /// `true` on rank 0, the one that prints and writes files.
    fn is_chief(&self) -> bool {
        self.rank() == 0
    }
}

/// `flat` copied to the host as f32, summed there by `all_reduce`, and copied back to its
/// device.
pub(crate) fn sum_through_host(
    flat: &Tensor,
    all_reduce: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<Tensor> {
    let mut values = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    all_reduce(&mut values)?;
    Ok(Tensor::from_vec(values, flat.dims(), flat.device())?)
}

/// The communicator of a run in one process: rank 0 of 1, every collective a no-op.
///
/// # Examples
/// ```
/// use candle_functional::distributed::{Communicator, SingleProcess};
/// assert!(SingleProcess.is_chief());
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn backend(&self) -> &str {
        "single process"
    }

    fn all_reduce_sum_f32(&self, _values: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn all_reduce_sum_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn broadcast_f32(&self, _values: &mut [f32], root: usize) -> Result<()> {
        check_root(self, root)
    }

    fn broadcast_bytes(&self, _bytes: &mut [u8], root: usize) -> Result<()> {
        check_root(self, root)
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// A [`Error::Distributed`] from `comm`'s rank.
pub(crate) fn error(comm: &dyn Communicator, message: impl Into<String>) -> Error {
    Error::Distributed {
        rank: comm.rank(),
        world_size: comm.world_size(),
        message: message.into(),
    }
}

pub(crate) fn check_root(comm: &dyn Communicator, root: usize) -> Result<()> {
    match root < comm.world_size() {
        true => Ok(()),
        false => Err(error(
            comm,
            format!("broadcast from rank {root}, which does not exist"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_refuses_a_missing_root() {
        let err = SingleProcess.broadcast_f32(&mut [1.0], 1).unwrap_err();
        assert!(
            err.to_string().contains("rank 1, which does not exist"),
            "{err}"
        );
    }
}

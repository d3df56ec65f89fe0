//! Data-parallel training past one process: the [`Communicator`] a
//! [`Trainer`](crate::train::Trainer) uses to average gradients across ranks
//! ([`Trainer::distributed`](crate::train::Trainer::distributed)), its MPI implementation
//! (`Mpi`, cargo feature `distributed`), its NCCL implementation for CUDA tensors (`Nccl`,
//! cargo feature `nccl`, bootstrapped over MPI; [`for_device`] picks it) and
//! [`SingleProcess`] (world size 1, always there).
//!
//! The split of the work follows Keras's `MultiWorkerMirroredStrategy` with data sharding: every
//! rank reads the same data set with the same seed, so the same *global* batches in the same
//! order; rank `r` trains on its contiguous slice of each ([`shard`]). Gradients are summed
//! across ranks, each rank's weighted by its share of the batch, so that a step over `W`
//! ranks equals one process's step over the whole batch.

mod communicator;
mod launch;
#[cfg(feature = "distributed")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
mod shard;
mod tensors;

pub use crate::device::local_rank;
pub(crate) use communicator::error;
pub use communicator::{Communicator, SingleProcess};
pub use launch::{for_device, from_environment};
#[cfg(feature = "distributed")]
pub use mpi::Mpi;
#[cfg(feature = "nccl")]
pub use nccl::Nccl;
pub use shard::shard;
pub(crate) use tensors::{
    all_reduce_gradients, broadcast_tensors, digest, reduce_sum_tensors, replica_sum,
};

//! Counts that predict a training step's speed on a GPU, measured on any device: how many
//! tensor buffers a step allocates (on CUDA each is a device allocation written by a kernel
//! launch), how many bytes it allocates and holds, and how many times the crate reads a
//! device value back to the host (on a GPU each read waits for the device's queue to drain).
//!
//! The allocation counts come from [`CountingAllocator`], a global allocator that a binary
//! installs itself (a library cannot); the host reads are counted by the crate wherever it
//! reads a value, whatever the allocator.
//!
//! ```no_run
//! use candle_functional::profile::{AllocationCounts, CountingAllocator};
//!
//! #[global_allocator]
//! static ALLOCATOR: CountingAllocator<std::alloc::System> = CountingAllocator::new(std::alloc::System);
//!
//! let before = AllocationCounts::now();
//! // ... one training step ...
//! let step = AllocationCounts::now().since(&before);
//! println!("{} tensor buffers, {} bytes", step.tensor_buffers(), step.bytes());
//! ```

mod allocator;

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Tensor, WithDType};

pub use allocator::{AllocationCounts, CountingAllocator};

use crate::Result;

static HOST_READS: AtomicU64 = AtomicU64::new(0);

/// How many times the crate has read a tensor's value back to the host since the process
/// started (a loss for a progress bar, a divergence verdict, a metric's result, a label
/// check). On a GPU each read waits until the device has run everything queued before it, so
/// a training step that reads nothing lets the host queue the next step while the device is
/// still busy. Reads by your own code are not counted.
///
/// # Examples
/// ```
/// use candle_functional::profile::host_reads;
/// let before = host_reads();
/// assert!(host_reads() >= before);
/// ```
pub fn host_reads() -> u64 {
    HOST_READS.load(Ordering::Relaxed)
}

/// The value of a one-element tensor on the host, counted in [`host_reads`].
pub(crate) fn read_scalar<T: WithDType>(t: &Tensor) -> Result<T> {
    HOST_READS.fetch_add(1, Ordering::Relaxed);
    Ok(t.flatten_all()?.reshape(())?.to_scalar::<T>()?)
}

/// The values of a tensor on the host, flattened, counted in [`host_reads`].
pub(crate) fn read_vec<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    HOST_READS.fetch_add(1, Ordering::Relaxed);
    Ok(t.flatten_all()?.to_vec1::<T>()?)
}

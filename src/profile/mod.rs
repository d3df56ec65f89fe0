//! Counts that predict a training step's speed on a GPU, measured on any device: how many
//! tensor buffers a step allocates (on CUDA each is a device allocation written by a kernel
//! launch), how many bytes it allocates and holds, and how many times the crate reads a
//! device value back to the host (on a GPU each read waits for the device's queue to drain);
//! and, on any device, how many batch norms ran folded into a convolution
//! ([`folded_batch_norms`]) and how many layer outputs stayed in oneDNN's blocked layout for
//! the next layers ([`blocked_handoffs`]).
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

static FOLDED_BATCH_NORMS: AtomicU64 = AtomicU64::new(0);

/// How many batch norms the crate has run folded into the convolution before them since the
/// process started: in inference, a BatchNorm that alone reads a convolution's output on the
/// CPU is applied by the convolution as it writes that output, and the pass over memory its
/// own step would take is saved (counted once per folded layer call). A count that stays
/// put where you expect folds says why a network runs slower than it could.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::profile::folded_batch_norms;
/// let x = Input::new([3, 8, 8]);
/// let y = Conv2D::new(4, 3).padding(Padding::Same).call(&x)?;
/// let y = BatchNorm::new().call(&y)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let before = folded_batch_norms();
/// model.forward(&[Tensor::ones((2, 3, 8, 8), DType::F32, &Device::Cpu)?], Mode::Eval)?;
/// assert!(folded_batch_norms() > before);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn folded_batch_norms() -> u64 {
    FOLDED_BATCH_NORMS.load(Ordering::Relaxed)
}

/// Counts one batch norm run folded into a convolution, in [`folded_batch_norms`].
pub(crate) fn count_folded_batch_norm() {
    FOLDED_BATCH_NORMS.fetch_add(1, Ordering::Relaxed);
}

static BLOCKED_HANDOFFS: AtomicU64 = AtomicU64::new(0);

/// How many layer outputs the crate has handed to the next layers in oneDNN's blocked layout
/// since the process started (feature `onednn`, in inference): a convolution whose output
/// only convolutions and batch norms read leaves it in the layout its primitive wrote, a
/// batch norm whose inputs all came so (a residual block's Add → ReLU → BatchNorm) computes
/// and writes in it, and the reorders between that layout and NCHW are saved (counted once
/// per layer call). Always 0 without the feature.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::profile::blocked_handoffs;
/// let x = Input::new([8, 16, 16]);
/// let y = Conv2D::new(16, 3).padding(Padding::Same).call(&x)?;
/// let y = Conv2D::new(16, 3).padding(Padding::Same).call(&y)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let before = blocked_handoffs();
/// model.forward(&[Tensor::ones((2, 8, 16, 16), DType::F32, &Device::Cpu)?], Mode::Eval)?;
/// // With `onednn` the first convolution hands its output over (oneDNN picks a blocked
/// // layout for 16 channels on x86 CPUs); the second one's is the model's output.
/// let handed_over = blocked_handoffs() - before;
/// if cfg!(feature = "onednn") {
///     assert!(handed_over >= 1);
/// } else {
///     assert_eq!(handed_over, 0);
/// }
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn blocked_handoffs() -> u64 {
    BLOCKED_HANDOFFS.load(Ordering::Relaxed)
}

/// Counts one layer output handed over in oneDNN's blocked layout, in [`blocked_handoffs`].
#[cfg(feature = "onednn")]
pub(crate) fn count_blocked_handoff() {
    BLOCKED_HANDOFFS.fetch_add(1, Ordering::Relaxed);
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

//! The examples' global allocator: mimalloc, told to keep the memory it frees.
//!
//! A training step allocates and frees the same large activation and gradient buffers every
//! time. glibc's malloc hands blocks of that size back to the OS when they are freed, and
//! mimalloc does after a delay (a second) that a step of several seconds outlasts, so either
//! way every step page-faults its buffers in again; with two threads writing the fresh pages
//! the faults contend for the page-table lock. That was most of an element-wise layer's
//! backward pass and about a tenth of a training step here (docs/PERFORMANCE.md). A binary
//! of your own that trains with the crate gains from the same lines.
//!
//! It is wrapped in the crate's [`CountingAllocator`], which counts allocations, bytes and
//! candle's tensor buffers for the step counts that `bench --counts` and `gpu_check` print
//! (a few relaxed atomic additions per allocation).
//!
//! `RUSTFLAGS="--cfg system_allocator"` builds the examples on the system allocator instead,
//! to measure the difference.

use candle_functional::profile::CountingAllocator;

#[cfg(not(system_allocator))]
#[global_allocator]
static ALLOCATOR: CountingAllocator<mimalloc::MiMalloc> =
    CountingAllocator::new(mimalloc::MiMalloc);

#[cfg(system_allocator)]
#[global_allocator]
static ALLOCATOR: CountingAllocator<std::alloc::System> =
    CountingAllocator::new(std::alloc::System);

/// mimalloc's `mi_option_purge_delay` (its position in mimalloc.h's `mi_option_e`;
/// `libmimalloc-sys` names the option only for mimalloc v2).
#[cfg(not(system_allocator))]
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells the allocator to keep the memory it frees for the next step (never purged back to
/// the OS; the process's resident memory stays at its peak). Call it first in `main`.
pub fn keep_freed_memory() {
    // SAFETY: sets one of mimalloc's process-wide options, which it reads at each purge
    // decision; any value is valid for this option (-1: never purge).
    #[cfg(not(system_allocator))]
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1)
    };
}

//! [`CountingAllocator`]: a global allocator that counts what passes through it, and
//! [`AllocationCounts`], a snapshot of its counters.
//!
//! Besides allocations and bytes it counts *tensor buffers*: every candle operation that
//! writes a new result (anything but a view such as a reshape or a narrow) creates one
//! storage cell, an `Arc<RwLock<Storage>>` of a fixed size, and on CUDA that storage is one
//! device allocation filled by a kernel. Counting the cells on the CPU therefore counts the
//! device allocations, and nearly all the kernel launches, that the same step makes on a GPU.
//! In-place writes (`Var::set`, the crate's in-place optimizer and state kernels) create no
//! cell and are not counted. A cell is told by its layout alone (size and alignment), so any
//! other allocation of exactly that layout counts too: the count is an upper bound, exact for
//! candle's own operations (the crate's tests check single operations, views and tracked
//! operations).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering};

/// Size and alignment of the heap cell that candle allocates for each new tensor storage:
/// `Arc<parking_lot::RwLock<Storage>>`'s inner block (two counters, then the lock).
const STORAGE_CELL: (usize, usize) = {
    let lock = std::mem::size_of::<parking_lot::RwLock<candle_core::Storage>>();
    let lock_align = std::mem::align_of::<parking_lot::RwLock<candle_core::Storage>>();
    let align = if lock_align > std::mem::align_of::<usize>() {
        lock_align
    } else {
        std::mem::align_of::<usize>()
    };
    let header = 2 * std::mem::size_of::<usize>();
    let start = header.div_ceil(lock_align) * lock_align;
    ((start + lock).div_ceil(align) * align, align)
};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static FREED_BYTES: AtomicU64 = AtomicU64::new(0);
static CELLS: AtomicU64 = AtomicU64::new(0);
static FREED_CELLS: AtomicU64 = AtomicU64::new(0);
static PEAK_LIVE: AtomicU64 = AtomicU64::new(0);

fn is_storage_cell(layout: &Layout) -> bool {
    (layout.size(), layout.align()) == STORAGE_CELL
}

fn on_alloc(layout: &Layout) {
    let size = layout.size() as u64;
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    let total = BYTES.fetch_add(size, Ordering::Relaxed) + size;
    if is_storage_cell(layout) {
        CELLS.fetch_add(1, Ordering::Relaxed);
    }
    // Live bytes can be momentarily overstated by a concurrent free; the peak is an upper
    // bound by at most the allocations in flight on other threads.
    let live = total.saturating_sub(FREED_BYTES.load(Ordering::Relaxed));
    PEAK_LIVE.fetch_max(live, Ordering::Relaxed);
}

fn on_dealloc(layout: &Layout) {
    FREED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
    if is_storage_cell(layout) {
        FREED_CELLS.fetch_add(1, Ordering::Relaxed);
    }
}

/// A global allocator that forwards to `A` and counts every allocation, its bytes, the bytes
/// still held and their peak, and candle's tensor buffers (see the module docs). Install it
/// in a binary or a test with `#[global_allocator]`; [`AllocationCounts::now`] reads it. The
/// counters are process-wide relaxed atomics: a few nanoseconds per allocation.
///
/// # Examples
/// ```no_run
/// use candle_functional::profile::CountingAllocator;
/// #[global_allocator]
/// static ALLOCATOR: CountingAllocator<std::alloc::System> = CountingAllocator::new(std::alloc::System);
/// ```
#[derive(Debug, Default)]
pub struct CountingAllocator<A> {
    inner: A,
}

impl<A> CountingAllocator<A> {
    /// Counts the allocations that `inner` serves.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::profile::CountingAllocator;
    /// static ALLOCATOR: CountingAllocator<std::alloc::System> = CountingAllocator::new(std::alloc::System);
    /// ```
    pub const fn new(inner: A) -> Self {
        Self { inner }
    }
}

// SAFETY: every call is forwarded unchanged to `A`, which upholds `GlobalAlloc`'s contract;
// the counting only touches atomics and never allocates.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAllocator<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        let p = unsafe { self.inner.alloc(layout) };
        if !p.is_null() {
            on_alloc(&layout);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { self.inner.alloc_zeroed(layout) };
        if !p.is_null() {
            on_alloc(&layout);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_dealloc(&layout);
        // SAFETY: `ptr` was allocated by this allocator (hence by `A`) with `layout`.
        unsafe { self.inner.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on as it is.
        let p = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            on_dealloc(&layout);
            // SAFETY: `new_size` is non-zero and, rounded to `layout.align()`, does not
            // overflow: the caller's contract for `realloc`.
            on_alloc(&unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) });
        }
        p
    }
}

/// A snapshot of [`CountingAllocator`]'s counters since the process started, or, after
/// [`AllocationCounts::since`], the difference between two snapshots. All zero when no
/// `CountingAllocator` is installed.
///
/// # Examples
/// ```
/// use candle_functional::profile::AllocationCounts;
/// let before = AllocationCounts::now();
/// let step = AllocationCounts::now().since(&before);
/// assert!(step.allocations() < 1_000_000);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocationCounts {
    allocations: u64,
    bytes: u64,
    tensor_buffers: u64,
    freed_tensor_buffers: u64,
    freed_bytes: u64,
    peak_live_bytes: u64,
}

impl AllocationCounts {
    /// The counters now.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::profile::AllocationCounts;
    /// let now = AllocationCounts::now();
    /// assert!(now.live_bytes() <= now.peak_live_bytes() || now.peak_live_bytes() == 0);
    /// ```
    pub fn now() -> Self {
        // Frees first: a free counted before its allocation would understate what is held.
        let freed_bytes = FREED_BYTES.load(Ordering::Relaxed);
        let freed_tensor_buffers = FREED_CELLS.load(Ordering::Relaxed);
        Self {
            allocations: ALLOCATIONS.load(Ordering::Relaxed),
            bytes: BYTES.load(Ordering::Relaxed),
            tensor_buffers: CELLS.load(Ordering::Relaxed),
            freed_tensor_buffers,
            freed_bytes,
            peak_live_bytes: PEAK_LIVE.load(Ordering::Relaxed),
        }
    }

    /// What happened between `earlier` and `self`: allocations, bytes and tensor buffers
    /// made, and the change in what is held. The peak stays the peak since the last
    /// [`AllocationCounts::reset_peak`].
    ///
    /// # Examples
    /// ```
    /// use candle_functional::profile::AllocationCounts;
    /// let a = AllocationCounts::now();
    /// assert_eq!(a.since(&a).allocations(), 0);
    /// ```
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            allocations: self.allocations.saturating_sub(earlier.allocations),
            bytes: self.bytes.saturating_sub(earlier.bytes),
            tensor_buffers: self.tensor_buffers.saturating_sub(earlier.tensor_buffers),
            freed_tensor_buffers: self
                .freed_tensor_buffers
                .saturating_sub(earlier.freed_tensor_buffers),
            freed_bytes: self.freed_bytes.saturating_sub(earlier.freed_bytes),
            peak_live_bytes: self.peak_live_bytes,
        }
    }

    /// Starts a new peak at what is held now (so that the next snapshots' peak is the peak of
    /// what follows).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::profile::AllocationCounts;
    /// AllocationCounts::reset_peak();
    /// ```
    pub fn reset_peak() {
        let now = Self::now();
        PEAK_LIVE.store(now.live_bytes(), Ordering::Relaxed);
    }

    /// Heap allocations (and reallocations) made.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::profile::AllocationCounts;
    /// let _ = AllocationCounts::now().allocations();
    /// ```
    pub fn allocations(&self) -> u64 {
        self.allocations
    }

    /// Bytes allocated (the sum of every allocation's size; on the CPU nearly all of it is
    /// tensor data).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::profile::AllocationCounts;
    /// let _ = AllocationCounts::now().bytes();
    /// ```
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Tensor buffers created: results of candle operations that are not views (on CUDA: one
    /// device allocation each, written by a kernel launch).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::profile::AllocationCounts;
    /// let _ = AllocationCounts::now().tensor_buffers();
    /// ```
    pub fn tensor_buffers(&self) -> u64 {
        self.tensor_buffers
    }

    /// Tensor buffers alive: created minus freed (for a difference, the change).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::profile::AllocationCounts;
    /// let _ = AllocationCounts::now().live_tensor_buffers();
    /// ```
    pub fn live_tensor_buffers(&self) -> i64 {
        self.tensor_buffers as i64 - self.freed_tensor_buffers as i64
    }

    /// Bytes held: allocated minus freed (for a difference, the change).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::profile::AllocationCounts;
    /// let _ = AllocationCounts::now().live_bytes();
    /// ```
    pub fn live_bytes(&self) -> u64 {
        self.bytes.saturating_sub(self.freed_bytes)
    }

    /// The most bytes held at once since the process started or the last
    /// [`AllocationCounts::reset_peak`].
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::profile::AllocationCounts;
    /// let _ = AllocationCounts::now().peak_live_bytes();
    /// ```
    pub fn peak_live_bytes(&self) -> u64 {
        self.peak_live_bytes
    }

    /// Held bytes as a signed change (for a difference of two snapshots).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::profile::AllocationCounts;
    /// let a = AllocationCounts::now();
    /// assert_eq!(a.since(&a).live_bytes_change(), 0);
    /// ```
    pub fn live_bytes_change(&self) -> i64 {
        self.bytes as i64 - self.freed_bytes as i64
    }
}

//! Sizes computed from user input, checked: the element count of a shape, its bytes, and
//! whether a CPU buffer that large can be had at all. An overflowing product would wrap to a
//! small number and send a kernel past the end of its buffer; an impossible allocation would
//! abort the process (Rust's allocation failure is not an error). Both become `Err` here,
//! before any kernel or allocation runs.

/// Buffers from this size up are tried before they are made (see [`allocatable`]); smaller
/// ones are left to the allocator, so the usual path costs nothing.
const PROBE_BYTES: usize = 1 << 30;

/// The number of elements of `dims`, or `None` when the product overflows `usize`.
pub(crate) fn elements(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// The bytes of `elements` values of `value_bytes` each, or `None` past `isize::MAX` (the
/// largest allocation Rust allows).
pub(crate) fn bytes(elements: usize, value_bytes: usize) -> Option<usize> {
    elements
        .checked_mul(value_bytes)
        .filter(|&b| b <= isize::MAX as usize)
}

/// Why a buffer of `dims` with `value_bytes` per value cannot be made, or `None` when it can:
/// the element count, the strides or the byte count overflow, or, for a buffer in host memory (`host`) from
/// 1 GiB up, the allocator refuses that many bytes now. The probe asks for the bytes and gives
/// them back untouched, which costs a map and an unmap of address space, not memory. Device
/// buffers are not probed: a failed device allocation is an error already.
pub(crate) fn unallocatable(dims: &[usize], value_bytes: usize, host: bool) -> Option<String> {
    let Some(count) = elements(dims) else {
        return Some(format!(
            "shape {dims:?} has more elements than usize can count"
        ));
    };
    // An empty shape still gets strides, the products of the axes after each one: candle
    // computes them unchecked, so they must not overflow either.
    if elements(&dims.iter().copied().filter(|&d| d != 0).collect::<Vec<_>>()).is_none() {
        return Some(format!(
            "shape {dims:?} is empty, but its strides overflow usize"
        ));
    }
    let Some(size) = bytes(count, value_bytes) else {
        return Some(format!(
            "shape {dims:?} needs {count} × {value_bytes} bytes, more than one buffer can hold"
        ));
    };
    if host && size >= PROBE_BYTES && Vec::<u8>::new().try_reserve_exact(size).is_err() {
        return Some(format!(
            "shape {dims:?} needs {size} bytes, more than this machine can allocate"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_that_overflow_are_caught() {
        assert_eq!(elements(&[2, 3, 4]), Some(24));
        assert_eq!(elements(&[]), Some(1));
        assert_eq!(elements(&[usize::MAX, 2]), None);
        assert_eq!(elements(&[usize::MAX, 0]), Some(0));
        assert_eq!(bytes(1 << 62, 4), None);
        assert_eq!(bytes(10, 4), Some(40));
        assert!(unallocatable(&[1 << 40, 1 << 30], 4, false).is_some());
        assert!(unallocatable(&[1 << 61], 4, false).is_some());
        assert!(unallocatable(&[1 << 20], 4, true).is_none());
        assert!(unallocatable(&[0, 3, 1 << 40, 1 << 40], 4, false).is_some());
        assert!(unallocatable(&[0, 3, 1 << 20, 1 << 20], 4, false).is_none());
        // An exabyte is refused by the probe, not by the arithmetic.
        assert!(unallocatable(&[1 << 58], 4, false).is_none());
        assert!(unallocatable(&[1 << 58], 4, true).is_some());
    }
}

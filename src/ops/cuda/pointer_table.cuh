// The layout every multi-tensor kernel of the crate reads: a table of device pointers and the
// prefix sums of the tensors' element counts (`tensors + 1` entries). A grid-stride loop walks
// all elements; `owner` finds an element's tensor by binary search in the prefix sums.
#pragma once

typedef unsigned long long u64;

__device__ __forceinline__ int owner(const u64* offsets, int tensors, u64 i) {
    int lo = 0, hi = tensors;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (offsets[mid] <= i) lo = mid; else hi = mid;
    }
    return lo;
}

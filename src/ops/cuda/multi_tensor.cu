// Multi-tensor kernels for the end of a training step: one launch reads or writes every
// tensor of a list, which candle would otherwise touch with a few launches per tensor.
//
// As in optimizer.cu, the tensors are a table of device pointers and the prefix sums of their
// element counts (pointer_table.cuh).

#include "pointer_table.cuh"

// ptrs: one f32 tensor each. `ok` starts at 1 (set by the host's upload); any thread that
// meets a NaN or an infinity writes 0 (every writer writes the same value, so the race is
// benign).
extern "C" __global__ void all_finite_f32(
    const u64* ptrs, const u64* offsets, int tensors, u64 total, unsigned char* ok) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total;
         i += (u64)blockDim.x * gridDim.x) {
        const int t = owner(offsets, tensors, i);
        const float x = ((const float*)ptrs[t])[i - offsets[t]];
        if (!isfinite(x)) *ok = 0;
    }
}

// ptrs: 2 per tensor: destination, source. Nothing is written where `keep` (a device u8, or
// null for always) is 0.
extern "C" __global__ void assign_if_f32(
    const u64* ptrs, const u64* offsets, int tensors, u64 total, const unsigned char* keep) {
    if (keep != 0 && *keep == 0) return;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total;
         i += (u64)blockDim.x * gridDim.x) {
        const int t = owner(offsets, tensors, i);
        const u64 j = i - offsets[t];
        ((float*)ptrs[2 * t])[j] = ((const float*)ptrs[2 * t + 1])[j];
    }
}

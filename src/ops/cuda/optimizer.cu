// Multi-tensor optimizer updates: one launch updates every weight of a model (Adam/AdamW,
// SGD with or without momentum), instead of a dozen element-wise kernels per weight.
//
// The weights are described by a table of device pointers (per weight: inputs, then outputs,
// which for an update in place are the inputs themselves: each element is read, then written,
// by the one thread that owns it) and the prefix sums of their element counts
// (pointer_table.cuh). The arithmetic uses the explicitly
// rounded intrinsics (__fmul_rn, __fadd_rn, ...) so that nvcc cannot contract it into fused
// multiply-adds: the results are the CPU kernel's and the reference's, bit for bit.
//
// `keep` (a device u8, or null) is the divergence check's verdict: where it is 0 the old
// values are written back, so a non-finite step changes nothing, with no host synchronisation.
//
// `finite` (a device u8 set to 1 by the host, or null) turns a launch into a check: nothing is
// written, and any thread whose new values are not all finite writes 0 there (every writer
// writes the same value, so the race is benign). The trainer folds it into `keep`, so a step
// that would write an infinity (a learning rate that overflows a weight) writes nothing.

#include "pointer_table.cuh"

// ptrs: 7 per weight: w, g, m, v (inputs), w', m', v' (outputs).
extern "C" __global__ void adam_multi_f32(
    const u64* ptrs, const u64* offsets, int tensors, u64 total,
    float alpha, float b1, float omb1, float b2, float omb2, float eps, float decay, int decays,
    const unsigned char* keep, unsigned char* finite) {
    const bool write_new = keep == 0 || *keep != 0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total;
         i += (u64)blockDim.x * gridDim.x) {
        const int t = owner(offsets, tensors, i);
        const u64 j = i - offsets[t];
        const u64* p = ptrs + 7 * (u64)t;
        const float w = ((const float*)p[0])[j];
        const float g = ((const float*)p[1])[j];
        const float m = ((const float*)p[2])[j];
        const float v = ((const float*)p[3])[j];
        const float mn = __fadd_rn(__fmul_rn(m, b1), __fmul_rn(g, omb1));
        const float vn = __fadd_rn(__fmul_rn(v, b2), __fmul_rn(__fmul_rn(g, g), omb2));
        const float wd = decays ? __fmul_rn(w, decay) : w;
        const float update = __fdiv_rn(mn, __fadd_rn(__fsqrt_rn(vn), eps));
        const float wn = __fsub_rn(wd, __fmul_rn(update, alpha));
        if (finite != 0) {
            if (!isfinite(wn) || !isfinite(mn) || !isfinite(vn)) *finite = 0;
            continue;
        }
        ((float*)p[4])[j] = write_new ? wn : w;
        ((float*)p[5])[j] = write_new ? mn : m;
        ((float*)p[6])[j] = write_new ? vn : v;
    }
}

// ptrs: 5 per weight: w, g, u (velocity, 0 without momentum), w', u' (0 without momentum).
extern "C" __global__ void sgd_multi_f32(
    const u64* ptrs, const u64* offsets, int tensors, u64 total,
    float lr, float momentum, int nesterov, float decay, int decays,
    const unsigned char* keep, unsigned char* finite) {
    const bool write_new = keep == 0 || *keep != 0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total;
         i += (u64)blockDim.x * gridDim.x) {
        const int t = owner(offsets, tensors, i);
        const u64 j = i - offsets[t];
        const u64* p = ptrs + 5 * (u64)t;
        const float w = ((const float*)p[0])[j];
        const float g = ((const float*)p[1])[j];
        const float step = __fmul_rn(g, lr);
        const float wd = decays ? __fmul_rn(w, decay) : w;
        if (p[2] == 0) {
            const float wn = __fsub_rn(wd, step);
            if (finite != 0) {
                if (!isfinite(wn)) *finite = 0;
                continue;
            }
            ((float*)p[3])[j] = write_new ? wn : w;
        } else {
            const float u = ((const float*)p[2])[j];
            const float un = __fsub_rn(__fmul_rn(u, momentum), step);
            const float wn = nesterov ? __fsub_rn(__fadd_rn(wd, __fmul_rn(un, momentum)), step)
                                      : __fadd_rn(wd, un);
            if (finite != 0) {
                if (!isfinite(wn) || !isfinite(un)) *finite = 0;
                continue;
            }
            ((float*)p[3])[j] = write_new ? wn : w;
            ((float*)p[4])[j] = write_new ? un : u;
        }
    }
}

//! The micro-kernels of the pure-Rust build's f32 convolutions ([`super::conv_panels`],
//! [`super::conv_channels`]), one per instruction set, and the instruction set they run on,
//! chosen at run time ([`Isa::detect`]).
//!
//! Both sets compute the same tiles in the same memory layouts, so the packing and the
//! bookkeeping around them are shared. AVX-512 holds a whole tile in its 32 registers; AVX2
//! has 16 registers of 8 lanes, so its kernels run the tile as a few register-sized blocks,
//! one after the other, in the order that keeps the blocks' operands in L1.

/// Filters per micro-tile (rows of the product).
pub(super) const MR: usize = 8;
/// Output positions per micro-tile: three 16-lane vectors. With [`MR`] filters that is 24
/// accumulators of AVX-512's 32 registers, and each step of the reduction loads 3 vectors
/// and broadcasts 8 filter taps for 24 FMAs.
pub(super) const NR: usize = 48;
/// Columns of a [`broadcast_tile`]: four 16-lane vectors (filters, in every use).
pub(super) const GRAD_NR: usize = 64;
/// Rows of a [`broadcast_tile`] (kernel taps for a kernel gradient, output positions for
/// the filter-vectorized forward pass): with [`GRAD_NR`] columns, 24 accumulators.
pub(super) const GRAD_MR: usize = 6;

/// The instruction set the convolution kernels run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// AVX-512F: 32 registers of 16 f32 lanes.
    Avx512,
    /// AVX2 with FMA: 16 registers of 8 lanes.
    Avx2,
}

impl Isa {
    /// The best set this CPU runs, detected at run time; `None` without AVX2 + FMA (and off
    /// x86-64), where the GEMM path runs.
    pub(super) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Some(Self::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Some(Self::Avx2);
            }
        }
        None
    }

    /// Every set this CPU runs (an AVX-512 CPU runs the AVX2 kernels too): the tests check
    /// each of them.
    #[cfg(test)]
    pub(super) fn all_here() -> Vec<Self> {
        match Self::detect() {
            Some(Self::Avx512) => vec![Self::Avx512, Self::Avx2],
            Some(Self::Avx2) => vec![Self::Avx2],
            None => Vec::new(),
        }
    }
}

/// `c (MR × NR) = (accumulate ? c : 0) + Σ_i a[i]ᵀ · b[rows[i]..][..NR]` for `a` as rows of
/// [`MR`] filter taps.
///
/// # Safety
/// The CPU runs `isa`; `a` holds `rows.len() · MR` elements, `b` holds `NR` elements from
/// each of `rows`, `c` holds `MR · NR`.
#[inline]
pub(super) unsafe fn micro_kernel(
    isa: Isa,
    a: &[f32],
    b: &[f32],
    rows: &[usize],
    c: &mut [f32],
    accumulate: bool,
) {
    debug_assert!(a.len() >= rows.len() * MR && c.len() >= MR * NR);
    debug_assert!(rows.iter().all(|&r| r + NR <= b.len()));
    // SAFETY: the caller's contract.
    unsafe {
        match isa {
            Isa::Avx512 => x86::micro_kernel_avx512(a, b, rows, c, accumulate),
            Isa::Avx2 => x86::micro_kernel_avx2(a, b, rows, c, accumulate),
        }
    }
}

/// `c[r][·] (+)= Σ_q a[rows[r] + step(q)] · b[q · b_stride..][..GRAD_NR]` for `q` in
/// `0..steps` and the [`GRAD_MR`] rows `r` (`c` at row stride `b_stride`; added to with
/// `accumulate`, overwritten without): one value of `a` broadcast per row and step against
/// a row of `b`. It is the filter-vectorized path's forward product
/// ([`super::conv_channels`]: `a` the padded images, a row per output position, a step per
/// kernel tap, `b` the kernel transposed) and the kernel gradient of both that path and the
/// shifted one (a row per kernel tap, a step per output position, `b` = dYᵀ).
///
/// # Safety
/// The CPU runs `isa`; `rows[r] + step(q)` is inside `a` for every `r` and `q`; `b` holds
/// `(steps − 1) · b_stride + GRAD_NR` elements and `c` `(GRAD_MR − 1) · b_stride + GRAD_NR`.
#[inline]
pub(super) unsafe fn broadcast_tile(
    isa: Isa,
    (a, rows): (&[f32], &[usize]),
    (step, steps): (impl Fn(usize) -> usize, usize),
    (b, b_stride): (&[f32], usize),
    (c, accumulate): (&mut [f32], bool),
) {
    debug_assert!(rows.len() == GRAD_MR);
    debug_assert!((0..steps).all(|q| rows.iter().all(|&r| r + step(q) < a.len())));
    debug_assert!(steps == 0 || (steps - 1) * b_stride + GRAD_NR <= b.len());
    debug_assert!((GRAD_MR - 1) * b_stride + GRAD_NR <= c.len());
    let starts: [*const f32; GRAD_MR] = std::array::from_fn(|r| a.as_ptr().wrapping_add(rows[r]));
    // SAFETY: the caller's contract.
    unsafe {
        match isa {
            Isa::Avx512 => {
                x86::broadcast_tile_avx512(starts, (step, steps), (b, b_stride), c, accumulate)
            }
            Isa::Avx2 => {
                x86::broadcast_tile_avx2(starts, (step, steps), (b, b_stride), c, accumulate)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{copy_run_avx2, copy_run_avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GRAD_MR, GRAD_NR, MR, NR};
    use std::arch::x86_64::*;

    /// [`super::micro_kernel`] on AVX-512: the whole 8 × 48 tile in 24 accumulators through
    /// the reduction; each step loads 3 vectors and broadcasts 8 taps for 24 FMAs.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn micro_kernel_avx512(
        a: &[f32],
        b: &[f32],
        rows: &[usize],
        c: &mut [f32],
        accumulate: bool,
    ) {
        let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        // SAFETY: every pointer offset stays inside the slices, by the caller's sizes.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 3]; MR];
            if accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, lane) in row.iter_mut().enumerate() {
                        *lane = _mm512_loadu_ps(cp.add(r * NR + v * 16));
                    }
                }
            }
            for (i, &offset) in rows.iter().enumerate() {
                let brow = bp.add(offset);
                let b0 = _mm512_loadu_ps(brow);
                let b1 = _mm512_loadu_ps(brow.add(16));
                let b2 = _mm512_loadu_ps(brow.add(32));
                let arow = ap.add(i * MR);
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*arow.add(r));
                    row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(av, b1, row[1]);
                    row[2] = _mm512_fmadd_ps(av, b2, row[2]);
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, lane) in row.iter().enumerate() {
                    _mm512_storeu_ps(cp.add(r * NR + v * 16), *lane);
                }
            }
        }
    }

    /// Rows of one AVX2 block of [`super::micro_kernel`]'s tile.
    const BLOCK_ROWS: usize = 4;
    /// Columns of one AVX2 block: three 8-lane vectors, so 12 accumulators, 3 loads of `b`
    /// and a broadcast: all 16 registers. Each step of the reduction issues 7 loads for 12
    /// FMAs, and 12 independent sums cover the FMA's latency on both pipes.
    const BLOCK_COLS: usize = 24;

    /// [`super::micro_kernel`] on AVX2: the 8 × 48 tile as four blocks of 4 × 24, each
    /// through the whole reduction. The two blocks of one column half run one after the
    /// other, so that half of the panel slice is read from L1 the second time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro_kernel_avx2(
        a: &[f32],
        b: &[f32],
        rows: &[usize],
        c: &mut [f32],
        accumulate: bool,
    ) {
        let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        // SAFETY: every pointer offset stays inside the slices, by the caller's sizes.
        unsafe {
            for col in (0..NR).step_by(BLOCK_COLS) {
                for row0 in (0..MR).step_by(BLOCK_ROWS) {
                    let at = |r: usize, v: usize| cp.add((row0 + r) * NR + col + v * 8);
                    let mut acc = [[_mm256_setzero_ps(); 3]; BLOCK_ROWS];
                    if accumulate {
                        for (r, row) in acc.iter_mut().enumerate() {
                            for (v, lane) in row.iter_mut().enumerate() {
                                *lane = _mm256_loadu_ps(at(r, v));
                            }
                        }
                    }
                    block_4x24(ap.add(row0), bp.add(col), rows, &mut acc);
                    for (r, row) in acc.iter().enumerate() {
                        for (v, lane) in row.iter().enumerate() {
                            _mm256_storeu_ps(at(r, v), *lane);
                        }
                    }
                }
            }
        }
    }

    /// `acc[r][v] += Σ_i a[i · MR + r] · b[rows[i] + 8v..][..8]`: one 4 × 24 block through
    /// the reduction, in assembly. Written with intrinsics, this block needs every register,
    /// and the compiler unrolled the loop and then spilled and shuffled accumulators. Blocks
    /// of 4 × 16 fit, but their 8 sums are too few to hide the FMA's latency. Forward, 64
    /// filters at 32×32, batch 32 (`layer_profile`, AMD EPYC with AVX2): 33-37 ms with 4 × 24
    /// intrinsics (two runs), 30 ms with 4 × 16 (median of 3), 17 ms with this (median of 3).
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `a` holds `rows.len()` rows of [`MR`] from its start,
    /// `b` holds 24 elements from each of `rows`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_4x24(a: *const f32, b: *const f32, rows: &[usize], acc: &mut [[__m256; 3]; 4]) {
        if rows.is_empty() {
            return;
        }
        let [
            [mut c00, mut c01, mut c02],
            [mut c10, mut c11, mut c12],
            [mut c20, mut c21, mut c22],
            [mut c30, mut c31, mut c32],
        ] = *acc;
        // SAFETY: the loads stay inside `a` and `b` by the caller's contract; nothing is
        // written to memory.
        unsafe {
            std::arch::asm!(
                "2:",
                "mov {offset}, qword ptr [{rows}]",
                "vmovups ymm12, ymmword ptr [{b} + 4*{offset}]",
                "vmovups ymm13, ymmword ptr [{b} + 4*{offset} + 32]",
                "vmovups ymm14, ymmword ptr [{b} + 4*{offset} + 64]",
                "vbroadcastss ymm15, dword ptr [{a}]",
                "vfmadd231ps ymm0, ymm15, ymm12",
                "vfmadd231ps ymm1, ymm15, ymm13",
                "vfmadd231ps ymm2, ymm15, ymm14",
                "vbroadcastss ymm15, dword ptr [{a} + 4]",
                "vfmadd231ps ymm3, ymm15, ymm12",
                "vfmadd231ps ymm4, ymm15, ymm13",
                "vfmadd231ps ymm5, ymm15, ymm14",
                "vbroadcastss ymm15, dword ptr [{a} + 8]",
                "vfmadd231ps ymm6, ymm15, ymm12",
                "vfmadd231ps ymm7, ymm15, ymm13",
                "vfmadd231ps ymm8, ymm15, ymm14",
                "vbroadcastss ymm15, dword ptr [{a} + 12]",
                "vfmadd231ps ymm9, ymm15, ymm12",
                "vfmadd231ps ymm10, ymm15, ymm13",
                "vfmadd231ps ymm11, ymm15, ymm14",
                "add {a}, {a_step}",
                "add {rows}, 8",
                "dec {n}",
                "jnz 2b",
                offset = out(reg) _,
                rows = inout(reg) rows.as_ptr() => _,
                n = inout(reg) rows.len() => _,
                a = inout(reg) a => _,
                b = in(reg) b,
                a_step = const MR * 4,
                inout("ymm0") c00,
                inout("ymm1") c01,
                inout("ymm2") c02,
                inout("ymm3") c10,
                inout("ymm4") c11,
                inout("ymm5") c12,
                inout("ymm6") c20,
                inout("ymm7") c21,
                inout("ymm8") c22,
                inout("ymm9") c30,
                inout("ymm10") c31,
                inout("ymm11") c32,
                out("ymm12") _,
                out("ymm13") _,
                out("ymm14") _,
                out("ymm15") _,
                options(nostack, readonly),
            );
        }
        *acc = [
            [c00, c01, c02],
            [c10, c11, c12],
            [c20, c21, c22],
            [c30, c31, c32],
        ];
    }

    /// [`super::broadcast_tile`] on AVX-512: 6 rows × four 16-lane vectors, 24 accumulators.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn broadcast_tile_avx512(
        starts: [*const f32; GRAD_MR],
        (step, steps): (impl Fn(usize) -> usize, usize),
        (b, b_stride): (&[f32], usize),
        c: &mut [f32],
        accumulate: bool,
    ) {
        let (bp, cp) = (b.as_ptr(), c.as_mut_ptr());
        // SAFETY: every offset stays inside the slices, by the caller's contract.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; GRAD_MR];
            for q in 0..steps {
                let (brow, at) = (bp.add(q * b_stride), step(q));
                let bv = [
                    _mm512_loadu_ps(brow),
                    _mm512_loadu_ps(brow.add(16)),
                    _mm512_loadu_ps(brow.add(32)),
                    _mm512_loadu_ps(brow.add(48)),
                ];
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*starts[r].add(at));
                    for (lane, &b) in row.iter_mut().zip(&bv) {
                        *lane = _mm512_fmadd_ps(av, b, *lane);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, lane) in row.iter().enumerate() {
                    let at = cp.add(r * b_stride + v * 16);
                    let value = match accumulate {
                        true => _mm512_add_ps(_mm512_loadu_ps(at), *lane),
                        false => *lane,
                    };
                    _mm512_storeu_ps(at, value);
                }
            }
        }
    }

    /// Columns of one AVX2 block of [`super::broadcast_tile`]: two 8-lane vectors, so with
    /// its 6 rows 12 accumulators, 2 loads of `b` and a broadcast.
    const GRAD_BLOCK_COLS: usize = 16;
    /// Steps per pass of the AVX2 blocks: the rows of `b` they read (16 KB at 64 columns)
    /// stay in L1 from the first block to the fourth.
    const GRAD_BLOCK_STEPS: usize = 64;

    /// [`super::broadcast_tile`] on AVX2: the 6 × 64 tile as four blocks of 6 × 16, each
    /// through [`GRAD_BLOCK_STEPS`] steps at a time, its sums kept in `c` between passes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn broadcast_tile_avx2(
        starts: [*const f32; GRAD_MR],
        (step, steps): (impl Fn(usize) -> usize, usize),
        (b, b_stride): (&[f32], usize),
        c: &mut [f32],
        accumulate: bool,
    ) {
        let (bp, cp) = (b.as_ptr(), c.as_mut_ptr());
        // SAFETY: every offset stays inside the slices, by the caller's contract.
        unsafe {
            let mut q0 = 0;
            loop {
                let q1 = (q0 + GRAD_BLOCK_STEPS).min(steps);
                let add = accumulate || q0 > 0;
                for col in (0..GRAD_NR).step_by(GRAD_BLOCK_COLS) {
                    let at = |r: usize, v: usize| cp.add(r * b_stride + col + v * 8);
                    let mut acc = [[_mm256_setzero_ps(); 2]; GRAD_MR];
                    if add {
                        for (r, row) in acc.iter_mut().enumerate() {
                            for (v, lane) in row.iter_mut().enumerate() {
                                *lane = _mm256_loadu_ps(at(r, v));
                            }
                        }
                    }
                    for q in q0..q1 {
                        let (brow, from) = (bp.add(q * b_stride + col), step(q));
                        let b0 = _mm256_loadu_ps(brow);
                        let b1 = _mm256_loadu_ps(brow.add(8));
                        for (r, row) in acc.iter_mut().enumerate() {
                            let av = _mm256_broadcast_ss(&*starts[r].add(from));
                            row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                            row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                        }
                    }
                    for (r, row) in acc.iter().enumerate() {
                        for (v, lane) in row.iter().enumerate() {
                            _mm256_storeu_ps(at(r, v), *lane);
                        }
                    }
                }
                if q1 >= steps {
                    break;
                }
                q0 = q1;
            }
        }
    }

    /// `dst[t] = src[shift + t]` for `t` in `lo..hi`, 0 elsewhere, in masked 16-lane moves: the
    /// panel's runs are 4-48 elements, for which `copy_from_slice` and `fill` were calls into
    /// `memmove`/`memset` that cost as much as the products on a 64-filter layer.
    ///
    /// # Safety
    /// The CPU supports AVX-512F, and `shift + t` lies inside `src` for every `t` in `lo..hi`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(in crate::ops::cpu) unsafe fn copy_run_avx512(
        dst: &mut [f32],
        src: &[f32],
        shift: isize,
        (lo, hi): (usize, usize),
    ) {
        let base = src.as_ptr().wrapping_offset(shift);
        for v in (0..dst.len()).step_by(16) {
            let n = (dst.len() - v).min(16);
            let (from, to) = (lo.clamp(v, v + n) - v, hi.clamp(v, v + n) - v);
            let store = ((1u32 << n) - 1) as u16;
            let load = (((1u32 << to) - 1) & !((1u32 << from) - 1)) as u16;
            // SAFETY: the load touches only lanes `from..to`, inside `src` by the contract
            // (masked-off lanes are not read and cannot fault); the store stays in `dst`.
            unsafe {
                let values = _mm512_maskz_loadu_ps(load, base.wrapping_add(v));
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(v), store, values);
            }
        }
    }

    /// [`copy_run_avx512`] in 8-lane moves: a lane mask for the load (`vmaskmovps` does not
    /// fault on masked-off lanes), whole stores, and the run's last partial vector through a
    /// small buffer (a masked store is microcoded on AMD's cores).
    ///
    /// # Safety
    /// The CPU supports AVX2, and `shift + t` lies inside `src` for every `t` in `lo..hi`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(in crate::ops::cpu) unsafe fn copy_run_avx2(
        dst: &mut [f32],
        src: &[f32],
        shift: isize,
        (lo, hi): (usize, usize),
    ) {
        let base = src.as_ptr().wrapping_offset(shift);
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for v in (0..dst.len()).step_by(8) {
            let n = (dst.len() - v).min(8);
            let (from, to) = (lo.clamp(v, v + n) - v, hi.clamp(v, v + n) - v);
            // SAFETY: the load touches only lanes `from..to`, inside `src` by the contract
            // (masked-off lanes are not read and cannot fault); the stores stay in `dst`.
            unsafe {
                let values = if from == 0 && to == 8 {
                    _mm256_loadu_ps(base.wrapping_add(v))
                } else if from >= to {
                    _mm256_setzero_ps()
                } else {
                    let after_first = _mm256_cmpgt_epi32(lanes, _mm256_set1_epi32(from as i32 - 1));
                    let before_end = _mm256_cmpgt_epi32(_mm256_set1_epi32(to as i32), lanes);
                    let mask = _mm256_and_si256(after_first, before_end);
                    _mm256_maskload_ps(base.wrapping_add(v), mask)
                };
                if n == 8 {
                    _mm256_storeu_ps(dst.as_mut_ptr().add(v), values);
                } else {
                    let mut tail = [0.0f32; 8];
                    _mm256_storeu_ps(tail.as_mut_ptr(), values);
                    dst[v..].copy_from_slice(&tail[..n]);
                }
            }
        }
    }
}

/// Off x86-64 [`Isa::detect`] is `None`, so no kernel is ever called.
#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::GRAD_MR;

    pub(super) unsafe fn micro_kernel_avx512(
        _: &[f32],
        _: &[f32],
        _: &[usize],
        _: &mut [f32],
        _: bool,
    ) {
        unreachable!("no instruction set is detected off x86-64")
    }
    pub(super) use micro_kernel_avx512 as micro_kernel_avx2;
    pub(super) unsafe fn broadcast_tile_avx512(
        _: [*const f32; GRAD_MR],
        _: (impl Fn(usize) -> usize, usize),
        _: (&[f32], usize),
        _: &mut [f32],
        _: bool,
    ) {
        unreachable!("no instruction set is detected off x86-64")
    }
    pub(super) use broadcast_tile_avx512 as broadcast_tile_avx2;
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `len` values in [-1, 1) from a small deterministic generator.
    pub(in crate::ops::cpu) fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// `got` against `want` within 1e-5 of the larger of 1 and `want`'s largest magnitude.
    pub(in crate::ops::cpu) fn assert_close(name: &str, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{name}: length");
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-5 * scale,
                "{name}[{i}]: {g} against {w} (scale {scale})"
            );
        }
    }

    #[test]
    fn both_kernels_match_a_scalar_product_on_every_instruction_set_here() {
        let sets = Isa::all_here();
        if sets.is_empty() {
            eprintln!("skipped: this CPU has neither AVX-512F nor AVX2 + FMA");
        }
        for isa in sets {
            for (depth, accumulate) in [(1, false), (7, true), (37, false), (64, true)] {
                // The product: rows of the panel at scattered offsets, as the shifted path reads.
                let b = values(4 * NR * depth + NR, 1);
                let rows: Vec<usize> = (0..depth)
                    .map(|i| (i * 3 * NR + i) % (3 * NR * depth))
                    .collect();
                let a = values(depth * MR, 2);
                let mut c = values(MR * NR, 3);
                let mut want: Vec<f64> = c
                    .iter()
                    .map(|&v| if accumulate { v as f64 } else { 0.0 })
                    .collect();
                for (i, &row) in rows.iter().enumerate() {
                    for r in 0..MR {
                        for j in 0..NR {
                            want[r * NR + j] += a[i * MR + r] as f64 * b[row + j] as f64;
                        }
                    }
                }
                // SAFETY: `isa` runs here; the sizes are as `micro_kernel` asks.
                unsafe { micro_kernel(isa, &a, &b, &rows, &mut c, accumulate) };
                assert_close(&format!("{isa:?} micro_kernel depth {depth}"), &c, &want);

                // The broadcast tile, over `depth` steps, `c` at a row stride past its width.
                let stride = GRAD_NR + 5;
                let a = values(GRAD_MR * 11 + depth * 2 + 1, 4);
                let starts: Vec<usize> = (0..GRAD_MR).map(|r| r * 11).collect();
                let b = values(depth * stride + GRAD_NR, 5);
                let mut c = values(GRAD_MR * stride, 6);
                let mut want: Vec<f64> = c
                    .iter()
                    .map(|&v| if accumulate { v as f64 } else { 0.0 })
                    .collect();
                for q in 0..depth {
                    for (r, &start) in starts.iter().enumerate() {
                        for j in 0..GRAD_NR {
                            want[r * stride + j] +=
                                a[start + 2 * q] as f64 * b[q * stride + j] as f64;
                        }
                    }
                }
                // SAFETY: `isa` runs here; every row start plus `2 q` is inside `a`, `b` and
                // `c` hold what `broadcast_tile` asks.
                unsafe {
                    broadcast_tile(
                        isa,
                        (&a, &starts),
                        (|q| 2 * q, depth),
                        (&b, stride),
                        (&mut c, accumulate),
                    )
                };
                for r in 0..GRAD_MR {
                    let at = r * stride;
                    assert_close(
                        &format!("{isa:?} broadcast_tile depth {depth} row {r}"),
                        &c[at..at + GRAD_NR],
                        &want[at..at + GRAD_NR],
                    );
                }
                // Past each row's GRAD_NR columns, `c` is not touched.
                let untouched = values(GRAD_MR * stride, 6);
                for r in 0..GRAD_MR - 1 {
                    let gap = r * stride + GRAD_NR..(r + 1) * stride;
                    assert_eq!(c[gap.clone()], untouched[gap], "{isa:?}: wrote past a row");
                }
            }
        }
    }
}

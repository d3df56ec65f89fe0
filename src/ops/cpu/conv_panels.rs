//! f32 convolutions as products of cache-sized im2col *panels*, for the pure-Rust build on
//! AVX-512 or AVX2 ([`super::conv_tiles`] has the micro-kernels).
//!
//! The GEMM path ([`super::conv2d`]) writes the im2col matrix of up to 8M elements (32 MB:
//! far past the caches), then the `gemm` crate reads it back and packs it again into its own
//! layout, and the product is copied into NCHW once more. On the article's ResNet the
//! micro-kernel itself ran near the FMA peak while packing, im2col and copies took about as
//! long again (`perf record`, full ResNet training at batch 32: micro-kernel 50%, `gemm`'s
//! packing 12%, copies 7.5%). Here the im2col rows of [`NR`] output positions are written
//! straight into the micro-kernel's layout (a panel of `c · kh · kw` rows of `NR`, at most
//! 884 KB, which stays in L2), each panel is multiplied by every filter block while it is
//! hot, and the results are written into the NCHW output through the caller's epilogue.
//!
//! The same kernels compute a stride-1 convolution's input gradient: that is a convolution
//! of `dY` with the kernel turned 180° and its channels swapped ([`input_gradient_problem`]).
//! On wide maps at stride 1 the *shifted* path ([`Shifted`]) reads the padded images in place
//! instead of packing panels, for the forward pass and both gradients.
//!
//! Chosen at run time: a [`Problem`] carries the instruction set its kernels run on
//! ([`Isa::detect`]); without AVX2 + FMA, and for f64 and grouped convolutions, the GEMM path
//! runs.

use rayon::prelude::*;
use std::cell::RefCell;

pub(super) use super::conv_tiles::{GRAD_MR, GRAD_NR, Isa, broadcast_tile};
use super::conv_tiles::{MR, NR, micro_kernel};

/// Rows of the reduction multiplied at once: one panel slice of `KC × NR` floats (36 KB)
/// stays in L1 while every filter block runs over it.
const KC: usize = 192;

/// The largest kernel (filters × depth) the panel path takes (4 MB of f32).
const PANEL_MAX_KERNEL: usize = 1 << 20;

/// One convolution's sizes, groups = 1: `n` images of `c × h × w` into `o × oh × ow`, a
/// `kh × kw` kernel at `stride` and `dilation`, `pad_top`/`pad_left` zeros before the
/// first row/column (the bottom and right padding follow from the output size).
#[derive(Clone, Copy, Debug)]
pub(super) struct Problem {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) stride: usize,
    pub(super) dilation: usize,
    pub(super) pad_top: usize,
    pub(super) pad_left: usize,
    /// The instruction set the kernels run on: one this CPU runs ([`Isa::detect`]), which
    /// the kernels' safety rests on.
    pub(super) isa: Isa,
}

impl Problem {
    /// Rows of the reduction: `c · kh · kw`.
    pub(super) fn depth(&self) -> usize {
        self.c * self.kh * self.kw
    }
    pub(super) fn positions(&self) -> usize {
        self.oh * self.ow
    }
    /// Whether the panel kernel is worth running: at least two full tiles per thread (a
    /// one-image 4×4 map would fill a third of one tile), and either the shifted path or a
    /// kernel small enough for the panel path: that path reads the whole kernel once per
    /// tile, and past [`PANEL_MAX_KERNEL`] elements (the last stage of the article's
    /// ResNet, 512 × 4,608) it ran 5-12% slower than the GEMM path.
    pub(super) fn worth_it(&self) -> bool {
        let tiles = (self.n * self.positions()) / NR;
        let enough = tiles >= 2 * rayon::current_num_threads().max(1) && self.o >= MR;
        enough && (Shifted::new(self).is_some() || self.o * self.depth() <= PANEL_MAX_KERNEL)
    }
}

/// Whether `p` runs on the shifted path (forward pass, input and kernel gradients).
pub(super) fn shifted(p: &Problem) -> bool {
    Shifted::new(p).is_some() && p.worth_it()
}

/// Copies one `h × w` input plane into `dst`, rows of `wp`, after `pad_top` rows and
/// `pad_left` columns of zeros and with zeros after it to the end of `dst`.
pub(super) fn pad_plane(p: &Problem, src: &[f32], wp: usize, dst: &mut [f32]) {
    for (y, row) in dst.chunks_exact_mut(wp).enumerate() {
        let iy = y.wrapping_sub(p.pad_top);
        if iy >= p.h {
            row.fill(0.0);
            continue;
        }
        let left = p.pad_left.min(wp);
        let copied = p.w.min(wp - left);
        row[..left].fill(0.0);
        row[left..left + copied].copy_from_slice(&src[iy * p.w..][..copied]);
        row[left + copied..].fill(0.0);
    }
}

/// The problem of a stride-1 convolution's input gradient, as a convolution of `dY` with
/// the kernel given by [`input_gradient_kernel`]: `None` for another stride, or a padding
/// larger than the dilated kernel (nothing in Keras makes one).
pub(super) fn input_gradient_problem(p: &Problem) -> Option<Problem> {
    let (span_h, span_w) = ((p.kh - 1) * p.dilation, (p.kw - 1) * p.dilation);
    if p.stride != 1 || p.pad_top > span_h || p.pad_left > span_w {
        return None;
    }
    Some(Problem {
        n: p.n,
        c: p.o,
        h: p.oh,
        w: p.ow,
        o: p.c,
        kh: p.kh,
        kw: p.kw,
        oh: p.h,
        ow: p.w,
        stride: 1,
        dilation: p.dilation,
        pad_top: span_h - p.pad_top,
        pad_left: span_w - p.pad_left,
        isa: p.isa,
    })
}

/// The kernel of [`input_gradient_problem`]: `W'[c][o][i][j] = W[o][c][kh-1-i][kw-1-j]`.
pub(super) fn input_gradient_kernel(k: &[f32], p: &Problem) -> Vec<f32> {
    let (kh, kw) = (p.kh, p.kw);
    let mut out = vec![0.0; k.len()];
    for o in 0..p.o {
        for c in 0..p.c {
            for i in 0..kh {
                for j in 0..kw {
                    out[((c * p.o + o) * kh + i) * kw + j] =
                        k[((o * p.c + c) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)];
                }
            }
        }
    }
    out
}

/// A run of consecutive output positions of one filter of one image, as computed.
pub(super) struct Run<'a> {
    pub(super) filter: usize,
    pub(super) image: usize,
    /// The first position in the image's `oh · ow` plane.
    pub(super) start: usize,
    pub(super) values: &'a [f32],
}

thread_local! {
    /// This thread's panel and product tile, reused across calls.
    static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The convolution of `x` (NCHW) with `k` (OIHW), each output run handed to `write` exactly
/// once (every filter of every position).
pub(super) fn convolve(x: &[f32], k: &[f32], p: &Problem, write: &(dyn Fn(Run<'_>) + Sync)) {
    debug_assert_eq!(x.len(), p.n * p.c * p.h * p.w);
    debug_assert_eq!(k.len(), p.o * p.depth());
    let filters = pack_filters(k, p.o, p.depth());
    match Shifted::new(p) {
        Some(shifted) => shifted.convolve(x, &filters, write),
        None => convolve_panels(x, &filters, p, write),
    }
}

/// The panel path: every tile of [`NR`] output positions (over all images) packed, then
/// multiplied by every filter block.
fn convolve_panels(x: &[f32], filters: &[f32], p: &Problem, write: &(dyn Fn(Run<'_>) + Sync)) {
    let depth = p.depth();
    let total = p.n * p.positions();
    let tiles = total.div_ceil(NR);
    let rows: Vec<usize> = (0..depth).map(|i| i * NR).collect();
    // Contiguous ranges of tiles per task: neighbouring tiles share input rows.
    let per_task = tiles
        .div_ceil(4 * rayon::current_num_threads().max(1))
        .max(1);
    (0..tiles.div_ceil(per_task))
        .into_par_iter()
        .for_each(|task| {
            BUFFERS.with(|cell| {
                let mut guard = cell.borrow_mut();
                let (panel, product) = &mut *guard;
                panel.resize(depth * NR, 0.0);
                product.resize(p.o.next_multiple_of(MR) * NR, 0.0);
                let first = task * per_task;
                for tile in first..(first + per_task).min(tiles) {
                    let start = tile * NR;
                    let len = NR.min(total - start);
                    pack_panel(x, p, start, len, panel);
                    multiply(p.isa, filters, panel, &rows, product);
                    write_tile(product, p, start, len, write);
                }
            })
        });
}

/// The shifted path of a stride-1 convolution on wide maps: no im2col at all. Each image is
/// copied once with its padding into `c` planes of `hp × wp`; an output position `(y, x)`
/// becomes `q = y · wp + x`, and the kernel tap `(ci, i, j)` reads that copy at
/// `q + ci · hp · wp + i · d · wp + j · d` — a contiguous run of [`NR`] positions for every
/// tap, read in place. The price: the `wp − ow` positions between rows are computed and
/// dropped (6% at 32×32 with a 3×3 kernel, 11% at 16×16).
struct Shifted<'a> {
    p: &'a Problem,
    /// Padded height and width.
    hp: usize,
    wp: usize,
    /// `q` positions per image: `(oh − 1) · wp + ow`.
    span: usize,
    /// Per reduction row, its offset into the padded image.
    offsets: Vec<usize>,
}

impl<'a> Shifted<'a> {
    /// The shifted path for `p`, where it pays: stride 1, at least two images per thread
    /// (each task pads whole images), and fewer positions dropped than the panel path's
    /// packing would cost (about one product's time per 8 filter blocks, measured on the
    /// first stage of the article's ResNet).
    fn new(p: &'a Problem) -> Option<Self> {
        let (span_h, span_w) = ((p.kh - 1) * p.dilation, (p.kw - 1) * p.dilation);
        let (hp, wp) = (p.oh + span_h, p.ow + span_w);
        let dropped = span_w as f64 / p.ow as f64;
        let packing = (8 * MR) as f64 / p.o as f64;
        let images = p.n >= 2 * rayon::current_num_threads().max(1);
        if p.stride != 1 || !images || dropped >= packing {
            return None;
        }
        let mut offsets = Vec::with_capacity(p.depth());
        for c in 0..p.c {
            for i in 0..p.kh {
                for j in 0..p.kw {
                    offsets.push(c * hp * wp + i * p.dilation * wp + j * p.dilation);
                }
            }
        }
        Some(Self {
            p,
            hp,
            wp,
            span: (p.oh - 1) * wp + p.ow,
            offsets,
        })
    }

    fn convolve(&self, x: &[f32], filters: &[f32], write: &(dyn Fn(Run<'_>) + Sync)) {
        let p = self.p;
        let tiles = self.span.div_ceil(NR);
        // The last tile reads up to NR − 1 positions past the last plane.
        let padded_len = p.c * self.hp * self.wp + NR;
        (0..p.n).into_par_iter().for_each(|image| {
            BUFFERS.with(|cell| {
                let mut guard = cell.borrow_mut();
                let (padded, product) = &mut *guard;
                padded.resize(padded_len, 0.0);
                product.resize(p.o.next_multiple_of(MR) * NR, 0.0);
                self.pad(&x[image * p.c * p.h * p.w..][..p.c * p.h * p.w], padded);
                for tile in 0..tiles {
                    let q0 = tile * NR;
                    multiply(p.isa, filters, &padded[q0..], &self.offsets, product);
                    self.write_tile(product, image, q0, write);
                }
            })
        });
    }

    /// Copies one image into `padded` with its zero borders.
    fn pad(&self, x: &[f32], padded: &mut [f32]) {
        let p = self.p;
        let plane = self.hp * self.wp;
        padded[p.c * plane..].fill(0.0);
        for (c, dst) in padded.chunks_exact_mut(plane).take(p.c).enumerate() {
            pad_plane(p, &x[c * p.h * p.w..][..p.h * p.w], self.wp, dst);
        }
    }

    /// Hands the product of positions `q0..q0 + NR` to `write`, one run per output row and
    /// real filter, dropping the positions between rows.
    fn write_tile(
        &self,
        product: &[f32],
        image: usize,
        q0: usize,
        write: &(dyn Fn(Run<'_>) + Sync),
    ) {
        let (p, wp) = (self.p, self.wp);
        let end = (q0 + NR).min(self.span);
        let mut q = q0;
        while q < end {
            let (y, x) = (q / wp, q % wp);
            if x >= p.ow {
                q += wp - x;
                continue;
            }
            let run = (p.ow - x).min(end - q);
            for filter in 0..p.o {
                write(Run {
                    filter,
                    image,
                    start: y * p.ow + x,
                    values: &product[filter * NR + (q - q0)..][..run],
                });
            }
            q += run;
        }
    }
}

/// The kernel as [`MR`]-filter blocks, each `depth` rows of `MR` taps (filter fastest);
/// filters past `o` in the last block are zero.
fn pack_filters(k: &[f32], o: usize, depth: usize) -> Vec<f32> {
    let blocks = o.div_ceil(MR);
    let mut packed = vec![0.0; blocks * depth * MR];
    packed
        .par_chunks_mut(depth * MR)
        .enumerate()
        .for_each(|(b, block)| {
            for r in 0..MR.min(o - b * MR) {
                let filter = &k[(b * MR + r) * depth..][..depth];
                for (i, &v) in filter.iter().enumerate() {
                    block[i * MR + r] = v;
                }
            }
        });
    packed
}

/// Writes the im2col rows of output positions `start..start + len` (over all images) into
/// `panel` (`depth` rows of [`NR`]); positions past `len` are zero.
///
/// What depends only on the tile (its runs along output rows, which input columns each
/// kernel column reads, which input row each kernel row reads) is worked out once, so that
/// the loop over the `depth` rows only copies: the divisions of that bookkeeping, done per
/// row and run, had cost a third of a 256-filter layer's time.
fn pack_panel(x: &[f32], p: &Problem, start: usize, len: usize, panel: &mut [f32]) {
    // SAFETY: `p.isa` was detected on this CPU (`Isa::detect`).
    unsafe {
        match p.isa {
            Isa::Avx512 => pack_panel_avx512(x, p, start, len, panel),
            Isa::Avx2 => pack_panel_avx2(x, p, start, len, panel),
        }
    }
}

/// [`pack_panel`] compiled for AVX-512, so that its masked moves are inlined.
///
/// # Safety
/// On x86-64 the CPU supports AVX-512F.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn pack_panel_avx512(x: &[f32], p: &Problem, start: usize, len: usize, panel: &mut [f32]) {
    // SAFETY: the caller's contract.
    unsafe { pack_panel_with::<true>(x, p, start, len, panel) }
}

/// [`pack_panel`] compiled for AVX2.
///
/// # Safety
/// On x86-64 the CPU supports AVX2 and FMA.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn pack_panel_avx2(x: &[f32], p: &Problem, start: usize, len: usize, panel: &mut [f32]) {
    // SAFETY: the caller's contract.
    unsafe { pack_panel_with::<false>(x, p, start, len, panel) }
}

/// [`pack_panel`]'s body, with AVX-512's moves or AVX2's.
///
/// # Safety
/// On x86-64 the CPU supports AVX-512F (`AVX512`) or AVX2 and FMA (not `AVX512`).
#[inline(always)]
unsafe fn pack_panel_with<const AVX512: bool>(
    x: &[f32],
    p: &Problem,
    start: usize,
    len: usize,
    panel: &mut [f32],
) {
    let plane = p.positions();
    // Per run: (image, first slot, length), and per kernel row the input row it reads.
    let mut runs = Vec::with_capacity(NR);
    let mut input_rows = Vec::with_capacity(NR * p.kh);
    // Per run and kernel column: the slots `lo..hi` inside the input, and the input column
    // slot 0 stands for (slot t reads `first + t · stride`).
    let mut columns = Vec::with_capacity(NR * p.kw);
    let mut slot = 0;
    while slot < len {
        let q = start + slot;
        let (image, pos) = (q / plane, q % plane);
        let (oy, ox) = (pos / p.ow, pos % p.ow);
        let run = (p.ow - ox).min(len - slot);
        runs.push((image, slot, run));
        for i in 0..p.kh {
            let iy = (oy * p.stride + i * p.dilation).wrapping_sub(p.pad_top);
            input_rows.push((iy < p.h).then_some(iy));
        }
        for j in 0..p.kw {
            let offset = j * p.dilation;
            let (lo, hi) = inside(ox, run, p.stride, offset, p.pad_left, p.w);
            let first = (ox * p.stride + offset) as isize - p.pad_left as isize;
            columns.push((lo, hi, first));
        }
        slot += run;
    }
    let (hw, taps) = (p.h * p.w, p.kh * p.kw);
    for c in 0..p.c {
        let channel = |image: usize| (image * p.c + c) * hw;
        for i in 0..p.kh {
            for j in 0..p.kw {
                let row = &mut panel[((c * taps) + i * p.kw + j) * NR..][..NR];
                row[len..].fill(0.0);
                for (r, &(image, slot, run)) in runs.iter().enumerate() {
                    let dst = &mut row[slot..slot + run];
                    let (lo, hi, first) = columns[r * p.kw + j];
                    match input_rows[r * p.kh + i] {
                        Some(iy) => {
                            let src = &x[channel(image) + iy * p.w..][..p.w];
                            // SAFETY: the caller's contract on the instruction set.
                            unsafe {
                                copy_columns::<AVX512>(dst, src, (first, p.stride), (lo, hi))
                            };
                        }
                        // SAFETY: as above.
                        None => unsafe { copy_columns::<AVX512>(dst, &[], (0, 1), (0, 0)) },
                    }
                }
            }
        }
    }
}

/// `dst[t] = src[first + t · stride]` for `t` in `lo..hi`, 0 elsewhere; `lo..hi` is inside
/// `src` (from [`inside`]).
///
/// # Safety
/// As [`pack_panel_with`]'s.
#[inline(always)]
unsafe fn copy_columns<const AVX512: bool>(
    dst: &mut [f32],
    src: &[f32],
    (first, stride): (isize, usize),
    (lo, hi): (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if stride == 1 {
        // SAFETY: the instruction set by the caller's contract; slots `lo..hi` read
        // `src[first + t]`, inside `src` by the contract.
        unsafe {
            match AVX512 {
                true => super::conv_tiles::copy_run_avx512(dst, src, first, (lo, hi)),
                false => super::conv_tiles::copy_run_avx2(dst, src, first, (lo, hi)),
            }
        }
        return;
    }
    dst[..lo].fill(0.0);
    dst[hi..].fill(0.0);
    for (t, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
        *d = src[(first + (t * stride) as isize) as usize];
    }
}

/// The range of output positions `o` whose input index `o * stride + offset - pad` falls
/// inside `0..len`.
pub(super) fn valid_range(
    out_len: usize,
    stride: usize,
    offset: usize,
    pad: usize,
    len: usize,
) -> (usize, usize) {
    // First o with o * stride + offset >= pad.
    let lo = pad.saturating_sub(offset).div_ceil(stride);
    // Last o with o * stride + offset - pad <= len - 1, i.e. o * stride <= len - 1 + pad - offset.
    let hi = if len + pad > offset {
        ((len - 1 + pad - offset) / stride + 1).min(out_len)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// The slots `lo..hi` of a run of `run` output columns from `ox` whose input column
/// `(ox + slot) · stride + offset − pad` falls inside `0..w`.
fn inside(
    ox: usize,
    run: usize,
    stride: usize,
    offset: usize,
    pad: usize,
    w: usize,
) -> (usize, usize) {
    let (first, end) = valid_range(ox + run, stride, offset, pad, w);
    let lo = first.saturating_sub(ox);
    (lo, end.saturating_sub(ox).max(lo))
}

/// `product[f][·] = Σ_k filters[f][k] · b[rows[k]..][..NR]` for every filter block, [`KC`]
/// rows of the reduction at a time (`rows[k] = k · NR` for a packed panel).
fn multiply(isa: Isa, filters: &[f32], b: &[f32], rows: &[usize], product: &mut [f32]) {
    let depth = rows.len();
    let blocks = product.len() / (MR * NR);
    debug_assert!(rows.iter().all(|&r| r + NR <= b.len()));
    for k0 in (0..depth).step_by(KC) {
        let kc = KC.min(depth - k0);
        for block in 0..blocks {
            let a = &filters[(block * depth + k0) * MR..][..kc * MR];
            let c = &mut product[block * MR * NR..][..MR * NR];
            // SAFETY: `isa` was detected on this CPU; `a` holds `kc` rows of MR, every row of
            // `b` named by `rows` holds NR elements, `c` is an MR × NR tile.
            unsafe { micro_kernel(isa, a, b, &rows[k0..k0 + kc], c, k0 > 0) };
        }
    }
}

/// Hands the tile's product to `write`: one run per real filter and image.
fn write_tile(
    product: &[f32],
    p: &Problem,
    start: usize,
    len: usize,
    write: &(dyn Fn(Run<'_>) + Sync),
) {
    let plane = p.positions();
    let mut slot = 0;
    while slot < len {
        let q = start + slot;
        let (image, pos) = (q / plane, q % plane);
        let run = (plane - pos).min(len - slot);
        for filter in 0..p.o {
            write(Run {
                filter,
                image,
                start: pos,
                values: &product[filter * NR + slot..][..run],
            });
        }
        slot += run;
    }
}

/// The kernel gradient `dW` (OIHW) of a convolution from its input `x` and the gradient `dy`
/// of its output, on the shifted path; `None` where that path does not run (see
/// [`Shifted::new`]).
pub(super) fn kernel_gradient(x: &[f32], dy: &[f32], p: &Problem) -> Option<Vec<f32>> {
    Shifted::new(p).map(|shifted| shifted.kernel_gradient(x, dy))
}

impl Shifted<'_> {
    /// `dWᵀ[k][f] = Σ_images Σ_q padded[q + offsets[k]] · dYᵀ[q][f]`, with `dYᵀ` the
    /// output gradient transposed into the padded positions (zero between rows, so the
    /// positions the forward pass dropped add nothing). Each thread sums its images into its
    /// own `dWᵀ`; those are added at the end.
    fn kernel_gradient(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let p = self.p;
        let depth = p.depth();
        let (rows, filters) = (
            depth.next_multiple_of(GRAD_MR),
            p.o.next_multiple_of(GRAD_NR),
        );
        // Rows past `depth` read the padded image's start, and are dropped.
        let mut offsets = self.offsets.clone();
        offsets.resize(rows, 0);
        let padded_len = p.c * self.hp * self.wp;
        let threads = rayon::current_num_threads().max(1);
        let per_task = p.n.div_ceil(threads);
        let partial: Vec<Vec<f32>> = (0..p.n.div_ceil(per_task))
            .into_par_iter()
            .map(|task| {
                let mut sum = vec![0.0f32; rows * filters];
                let mut padded = vec![0.0f32; padded_len];
                let mut dyt = vec![0.0f32; self.span * filters];
                for image in task * per_task..((task + 1) * per_task).min(p.n) {
                    self.pad(
                        &x[image * p.c * p.h * p.w..][..p.c * p.h * p.w],
                        &mut padded,
                    );
                    self.transpose_grad(
                        &dy[image * p.o * p.positions()..][..p.o * p.positions()],
                        filters,
                        &mut dyt,
                    );
                    for r0 in (0..rows).step_by(GRAD_MR) {
                        for f0 in (0..filters).step_by(GRAD_NR) {
                            let c = &mut sum[r0 * filters + f0..];
                            // SAFETY: `p.isa` was detected on this CPU; every row base plus
                            // `span` stays inside `padded` (the last tap's offset plus the
                            // span is `c · hp · wp`), `dyt` holds `span` rows of `filters`,
                            // and `c` holds GRAD_MR rows of `filters` from `f0`.
                            unsafe {
                                broadcast_tile(
                                    p.isa,
                                    (&padded, &offsets[r0..r0 + GRAD_MR]),
                                    (|q| q, self.span),
                                    (&dyt[f0..], filters),
                                    (c, true),
                                )
                            };
                        }
                    }
                }
                sum
            })
            .collect();
        let mut dk = vec![0.0f32; p.o * depth];
        for (f, filter) in dk.chunks_mut(depth).enumerate() {
            for (k, v) in filter.iter_mut().enumerate() {
                *v = partial.iter().map(|s| s[k * filters + f]).sum();
            }
        }
        dk
    }

    /// `dyt[q][f] = dy[f][y][x]` for `q = y · wp + x`, zero for `x >= ow` and `f >= o`.
    fn transpose_grad(&self, dy: &[f32], filters: usize, dyt: &mut [f32]) {
        let p = self.p;
        dyt.fill(0.0);
        for f in 0..p.o {
            let plane = &dy[f * p.positions()..][..p.positions()];
            for y in 0..p.oh {
                for x in 0..p.ow {
                    dyt[(y * self.wp + x) * filters + f] = plane[y * p.ow + x];
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    pub(in crate::ops::cpu) use crate::ops::cpu::conv_tiles::tests::{assert_close, values};

    /// A direct convolution in f64: `(y, dx, dk)` for the output gradient `dy`.
    pub(in crate::ops::cpu) fn reference(
        x: &[f32],
        k: &[f32],
        dy: &[f32],
        p: &Problem,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0; p.n * p.o * p.positions()];
        let mut dx = vec![0.0; x.len()];
        let mut dk = vec![0.0; k.len()];
        for n in 0..p.n {
            for o in 0..p.o {
                for oy in 0..p.oh {
                    for ox in 0..p.ow {
                        let at = ((n * p.o + o) * p.oh + oy) * p.ow + ox;
                        for c in 0..p.c {
                            for i in 0..p.kh {
                                for j in 0..p.kw {
                                    let iy =
                                        (oy * p.stride + i * p.dilation).wrapping_sub(p.pad_top);
                                    let ix =
                                        (ox * p.stride + j * p.dilation).wrapping_sub(p.pad_left);
                                    if iy >= p.h || ix >= p.w {
                                        continue;
                                    }
                                    let xi = ((n * p.c + c) * p.h + iy) * p.w + ix;
                                    let ki = ((o * p.c + c) * p.kh + i) * p.kw + j;
                                    y[at] += x[xi] as f64 * k[ki] as f64;
                                    dx[xi] += dy[at] as f64 * k[ki] as f64;
                                    dk[ki] += dy[at] as f64 * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dk)
    }

    /// The NCHW output of `p` from the runs that `run` hands its writer, asserting that each
    /// output is written exactly once.
    pub(in crate::ops::cpu) fn written(
        p: &Problem,
        run: impl FnOnce(&(dyn Fn(Run<'_>) + Sync)),
    ) -> Vec<f32> {
        let out = std::sync::Mutex::new(vec![f32::NAN; p.n * p.o * p.positions()]);
        run(&|run| {
            let mut out = out.lock().unwrap();
            let at = (run.image * p.o + run.filter) * p.positions() + run.start;
            for (t, &v) in run.values.iter().enumerate() {
                assert!(
                    out[at + t].is_nan(),
                    "{p:?}: output {} written twice",
                    at + t
                );
                out[at + t] = v;
            }
        });
        let out = out.into_inner().unwrap();
        assert!(
            out.iter().all(|v| !v.is_nan()),
            "{p:?}: an output never written"
        );
        out
    }

    /// `(n, c, h, w, o, k, stride, dilation, (top, bottom, left, right))`.
    pub(in crate::ops::cpu) type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        (usize, usize, usize, usize),
    );

    pub(in crate::ops::cpu) fn problem(case: Case, isa: Isa) -> Problem {
        let (n, c, h, w, o, k, stride, dilation, (t, b, l, r)) = case;
        let span = (k - 1) * dilation;
        Problem {
            n,
            c,
            h,
            w,
            o,
            kh: k,
            kw: k,
            oh: (h + t + b - span - 1) / stride + 1,
            ow: (w + l + r - span - 1) / stride + 1,
            stride,
            dilation,
            pad_top: t,
            pad_left: l,
            isa,
        }
    }

    /// Runs `check` on two threads once for each instruction set this CPU runs, or says
    /// that the kernels were skipped.
    pub(in crate::ops::cpu) fn on_each_isa(check: impl Fn(Isa) + Sync) {
        let sets = Isa::all_here();
        if sets.is_empty() {
            eprintln!(
                "skipped: this CPU has neither AVX-512F nor AVX2 + FMA, the kernels do not run here"
            );
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for isa in sets {
            pool.install(|| check(isa));
        }
    }

    /// Runs the forward pass, and (stride 1) both gradients, of `case` through this module and
    /// compares them with [`reference`]; `shifted` says which path the forward pass must take.
    fn check(case: Case, shifted: bool) {
        on_each_isa(|isa| {
            let p = problem(case, isa);
            assert_eq!(Shifted::new(&p).is_some(), shifted, "{case:?}: path");
            assert!(p.worth_it(), "{case:?}: too small to test the kernel");
            let x = values(p.n * p.c * p.h * p.w, 1);
            let k = values(p.o * p.depth(), 2);
            let dy = values(p.n * p.o * p.positions(), 3);
            let (y_ref, dx_ref, dk_ref) = reference(&x, &k, &dy, &p);
            let y = written(&p, |write| convolve(&x, &k, &p, write));
            assert_close("y", &y, &y_ref);
            if let Some(dk) = kernel_gradient(&x, &dy, &p) {
                assert_close("dk", &dk, &dk_ref);
            } else {
                assert!(!shifted, "{case:?}: the shifted path has a kernel gradient");
            }
            if let Some(q) = input_gradient_problem(&p) {
                let kernel = input_gradient_kernel(&k, &p);
                let dx = written(&q, |write| convolve(&dy, &kernel, &q, write));
                assert_close("dx", &dx, &dx_ref);
            }
        });
    }

    #[test]
    fn shifted_path_matches_a_direct_convolution() {
        // Keras 'same' 3×3; 'valid' 3×3; a 5×5 kernel with a dilation of 2; filters and
        // channels not multiples of the tiles; odd sizes so no tile ends at a row.
        check((4, 5, 17, 19, 11, 3, 1, 1, (1, 1, 1, 1)), true);
        check((4, 3, 18, 20, 10, 3, 1, 1, (0, 0, 0, 0)), true);
        check((5, 4, 21, 23, 9, 5, 1, 2, (4, 4, 4, 4)), true);
        check((4, 6, 16, 18, 64, 3, 1, 1, (2, 0, 0, 2)), true);
    }

    #[test]
    fn panel_path_matches_a_direct_convolution() {
        // Keras 'same' with stride 2 (bottom/right padding only); a one-image map too narrow
        // for the shifted path; a 1×1 stride-2 projection; 4×4 maps across image boundaries.
        check((4, 5, 15, 17, 40, 3, 2, 1, (0, 1, 0, 1)), false);
        check((1, 7, 20, 10, 300, 3, 1, 1, (1, 1, 1, 1)), false);
        check((6, 9, 16, 16, 24, 1, 2, 1, (0, 0, 0, 0)), false);
        check((12, 16, 4, 4, 260, 3, 1, 1, (1, 1, 1, 1)), false);
    }
}

//! f32 convolutions vectorized over the *filters*, for small maps with many
//! filters (the third and fourth stages of the article's ResNet, its stride-2 layers).
//!
//! The panel kernels ([`super::conv_panels`]) put output positions in the vector lanes; on an
//! 8×8 map a tile of 48 positions is six rows of eight, and packing it cost as much as a
//! third of the layer (`perf record`, 256 filters at 8×8). Here the lanes hold 64 filters
//! (four vectors) and each step of the reduction broadcasts one input value for each of 6
//! output positions straight from a zero-padded copy of the images: no im2col, no packing,
//! any stride. The kernel is read transposed (`depth` rows of 64 filters, made once per
//! call). The kernel gradient is the same product turned around: 6 reduction rows ×
//! 64 filters, summed over every output position, with `dY` transposed into rows of filters.
//!
//! Runs on the instruction set of its [`Problem`], like the panel kernels, for filter counts
//! that are a multiple of 64; `conv2d`'s `SimdPath::choose` takes it on AVX-512 only (on
//! AVX2 it measured slower than the GEMM path).

use rayon::prelude::*;

use super::conv_panels::{GRAD_MR, GRAD_NR, Problem, Run, broadcast_tile, pad_plane};

/// Output positions per tile, and reduction rows per tile of the kernel gradient (whose
/// micro-kernel, [`broadcast_tile`], is this path's too, and the shifted path's kernel
/// gradient's).
const PR: usize = GRAD_MR;
/// Filters per tile: four 16-lane vectors; with [`PR`] positions, 24 accumulators. Each
/// step loads 4 vectors of the kernel and broadcasts 6 input values for 24 FMAs.
const OR: usize = GRAD_NR;
/// Reduction rows per pass of the forward product over an image's tiles (32 KB of the
/// kernel, which stays in L1 meanwhile).
const KC: usize = 128;
/// Output positions per pass of the kernel gradient over its reduction rows (16 KB of
/// `dYᵀ`).
const QC: usize = 256;
/// Output positions summed per pass of the kernel gradient over its partial sums.
const GRADIENT_POSITIONS: usize = 256;

/// The zero-padded images and where each output position and kernel tap reads them.
struct Geometry<'a> {
    p: &'a Problem,
    hp: usize,
    wp: usize,
    /// Per reduction row `(c, i, j)`: `c · hp · wp + i · d · wp + j · d`.
    offsets: Vec<usize>,
}

impl<'a> Geometry<'a> {
    fn new(p: &'a Problem) -> Self {
        let hp = (p.h + p.pad_top).max((p.oh - 1) * p.stride + (p.kh - 1) * p.dilation + 1);
        let wp = (p.w + p.pad_left).max((p.ow - 1) * p.stride + (p.kw - 1) * p.dilation + 1);
        let mut offsets = Vec::with_capacity(p.depth());
        for c in 0..p.c {
            for i in 0..p.kh {
                for j in 0..p.kw {
                    offsets.push(c * hp * wp + i * p.dilation * wp + j * p.dilation);
                }
            }
        }
        Self { p, hp, wp, offsets }
    }

    fn image_len(&self) -> usize {
        self.p.c * self.hp * self.wp
    }

    /// Copies images `first..first + count` of `x` into `padded`, one after the other.
    fn pad(&self, x: &[f32], first: usize, count: usize, padded: &mut [f32]) {
        let p = self.p;
        let planes = padded[..count * self.image_len()].chunks_exact_mut(self.hp * self.wp);
        let sources = x[first * p.c * p.h * p.w..].chunks_exact(p.h * p.w);
        for (dst, src) in planes.zip(sources) {
            pad_plane(p, src, self.wp, dst);
        }
    }

    /// Where output position `pos` of the `image`-th padded image reads its first tap.
    fn base(&self, image: usize, pos: usize) -> usize {
        let p = self.p;
        let (oy, ox) = (pos / p.ow, pos % p.ow);
        image * self.image_len() + oy * p.stride * self.wp + ox * p.stride
    }
}

/// Whether this path runs for `p`: filters in whole tiles, at least two images per thread
/// (the work is split by images), a kernel wider than 1×1 and at most [`MAX_KERNEL`]
/// elements. Measured against the GEMM path (`layer_profile`, batch 32 and 128): 3×3
/// layers of 256 filters on 8×8 maps and the stride-2 layers up to 256 filters gain
/// 15-35%; the last stage's 512 × 4,608 kernels lost 20-30%, the 1×1 projections 10-30%
/// (their products are too short for the transposes and padding around them).
pub(super) fn applies(p: &Problem) -> bool {
    let threads = rayon::current_num_threads().max(1);
    p.o.is_multiple_of(OR) && p.n >= 2 * threads && p.kh * p.kw > 1 && p.o * p.depth() <= MAX_KERNEL
}

/// The largest kernel (filters × depth) this path takes (4 MB of f32).
const MAX_KERNEL: usize = 1 << 20;

/// Images per task: enough output positions for the kernel gradient's passes.
fn images_per_task(p: &Problem) -> usize {
    let threads = rayon::current_num_threads().max(1);
    GRADIENT_POSITIONS
        .div_ceil(p.positions().max(1))
        .clamp(1, p.n.div_ceil(threads).max(1))
}

/// The convolution of `x` (NCHW) with `k` (OIHW), each output run handed to `write` exactly
/// once. The caller checks [`applies`] first.
pub(super) fn convolve(x: &[f32], k: &[f32], p: &Problem, write: &(dyn Fn(Run<'_>) + Sync)) {
    debug_assert!(applies(p));
    let geometry = Geometry::new(p);
    let depth = p.depth();
    // The kernel transposed, per block of OR filters: `depth` rows of OR.
    let mut kernel = vec![0.0f32; p.o * depth];
    kernel
        .par_chunks_mut(depth * OR)
        .enumerate()
        .for_each(|(block, rows)| {
            for f in 0..OR {
                for (i, &v) in k[(block * OR + f) * depth..][..depth].iter().enumerate() {
                    rows[i * OR + f] = v;
                }
            }
        });
    let positions = p.positions();
    let tiles = positions.div_ceil(PR);
    let per_task = images_per_task(p);
    (0..p.n.div_ceil(per_task))
        .into_par_iter()
        .for_each(|task| {
            let first = task * per_task;
            let count = per_task.min(p.n - first);
            let mut padded = vec![0.0f32; count * geometry.image_len()];
            geometry.pad(x, first, count, &mut padded);
            // Per image, its tiles; the last one repeats the image's last position where the
            // plane runs out.
            let bases: Vec<usize> = (0..count * tiles * PR)
                .map(|q| {
                    let (image, slot) = (q / (tiles * PR), q % (tiles * PR));
                    geometry.base(image, slot.min(positions - 1))
                })
                .collect();
            let mut tiles_out = vec![0.0f32; count * tiles * PR * OR];
            let mut plane = vec![0.0f32; OR * positions];
            for block in 0..p.o / OR {
                // KC rows of the kernel at a time (32 KB: L1) over every tile of the task's
                // images; a tile's sums wait in `tiles_out` between the chunks. Per image
                // instead, the last stage's 9.4 MB kernel was read again for every 16 positions.
                for k0 in (0..depth).step_by(KC) {
                    let kc = KC.min(depth - k0);
                    let rows = &kernel[(block * depth + k0) * OR..][..kc * OR];
                    for (t, out) in tiles_out.chunks_exact_mut(PR * OR).enumerate() {
                        // SAFETY: `p.isa` was detected on this CPU; every base plus every offset is
                        // inside the padded images (the padded size covers the last tap of the
                        // last position), `rows` holds `kc` rows of OR.
                        unsafe {
                            broadcast_tile(
                                p.isa,
                                (&padded, &bases[t * PR..][..PR]),
                                (|k| geometry.offsets[k0 + k], kc),
                                (rows, OR),
                                (out, k0 > 0),
                            )
                        };
                    }
                }
                for image in 0..count {
                    let outs = &tiles_out[image * tiles * PR * OR..][..tiles * PR * OR];
                    for (t, out) in outs.chunks_exact(PR * OR).enumerate() {
                        for r in 0..PR.min(positions - t * PR) {
                            for f in 0..OR {
                                plane[f * positions + t * PR + r] = out[r * OR + f];
                            }
                        }
                    }
                    for f in 0..OR {
                        write(Run {
                            filter: block * OR + f,
                            image: first + image,
                            start: 0,
                            values: &plane[f * positions..][..positions],
                        });
                    }
                }
            }
        });
}

/// The kernel gradient `dW` (OIHW) from the input `x` and the output's gradient `dy`. The
/// caller checks [`applies`] first.
pub(super) fn kernel_gradient(x: &[f32], dy: &[f32], p: &Problem) -> Vec<f32> {
    debug_assert!(applies(p));
    let geometry = Geometry::new(p);
    let depth = p.depth();
    let rows = depth.next_multiple_of(PR);
    // Rows past `depth` read the first tap again, and are dropped.
    let mut offsets = geometry.offsets.clone();
    offsets.resize(rows, 0);
    let positions = p.positions();
    let per_group = images_per_task(p);
    // One partial sum per thread (2.4 MB at 256 filters × 2,304 rows: one per group of
    // images had cost a quarter of the layer in zeroing and adding), its images taken a
    // group at a time.
    let threads = rayon::current_num_threads().max(1);
    let per_thread = p.n.div_ceil(threads);
    let partial: Vec<Vec<f32>> = (0..p.n.div_ceil(per_thread))
        .into_par_iter()
        .map(|thread| {
            let mine = thread * per_thread..((thread + 1) * per_thread).min(p.n);
            let mut sum = vec![0.0f32; rows * p.o];
            let mut padded = vec![0.0f32; per_group * geometry.image_len()];
            let mut dyt = vec![0.0f32; per_group * positions * p.o];
            for first in mine.clone().step_by(per_group) {
                let count = per_group.min(mine.end - first);
                geometry.pad(x, first, count, &mut padded);
                // dYᵀ: a row of `o` filters per output position of the group's images.
                for image in 0..count {
                    let grad = &dy[(first + image) * p.o * positions..][..p.o * positions];
                    for f in 0..p.o {
                        for (q, &v) in grad[f * positions..][..positions].iter().enumerate() {
                            dyt[(image * positions + q) * p.o + f] = v;
                        }
                    }
                }
                let bases: Vec<usize> = (0..count * positions)
                    .map(|q| geometry.base(q / positions, q % positions))
                    .collect();
                // QC positions of dYᵀ at a time (16 KB of a filter block: L1) through every
                // block of reduction rows.
                for f0 in (0..p.o).step_by(OR) {
                    for q0 in (0..bases.len()).step_by(QC) {
                        let qc = QC.min(bases.len() - q0);
                        for r0 in (0..rows).step_by(PR) {
                            // SAFETY: `p.isa` was detected on this CPU; every base plus every
                            // offset is inside the padded images, `dyt` holds a row of `o`
                            // per base from q0, and `sum` PR rows of `o` from row r0.
                            unsafe {
                                broadcast_tile(
                                    p.isa,
                                    (&padded, &offsets[r0..r0 + PR]),
                                    (|q| bases[q0 + q], qc),
                                    (&dyt[q0 * p.o + f0..], p.o),
                                    (&mut sum[r0 * p.o + f0..], true),
                                )
                            };
                        }
                    }
                }
            }
            sum
        })
        .collect();
    let mut dk = vec![0.0f32; p.o * depth];
    dk.par_chunks_mut(depth)
        .enumerate()
        .for_each(|(f, filter)| {
            for (k, v) in filter.iter_mut().enumerate() {
                *v = partial.iter().map(|s| s[k * p.o + f]).sum();
            }
        });
    dk
}

#[cfg(test)]
mod tests {
    use super::super::conv_panels::tests::{
        Case, assert_close, on_each_isa, problem, reference, values, written,
    };
    use super::super::conv_panels::{input_gradient_kernel, input_gradient_problem};
    use super::*;

    /// The forward pass, the kernel gradient and (stride 1) the input gradient of `case`
    /// through this module against the direct convolution.
    fn check(case: Case) {
        on_each_isa(|isa| {
            let p = problem(case, isa);
            assert!(applies(&p), "{case:?}: the path must take it");
            let x = values(p.n * p.c * p.h * p.w, 4);
            let k = values(p.o * p.depth(), 5);
            let dy = values(p.n * p.o * p.positions(), 6);
            let (y_ref, dx_ref, dk_ref) = reference(&x, &k, &dy, &p);
            let y = written(&p, |write| convolve(&x, &k, &p, write));
            assert_close("y", &y, &y_ref);
            assert_close("dk", &kernel_gradient(&x, &dy, &p), &dk_ref);
            if let Some(q) = input_gradient_problem(&p).filter(applies) {
                let kernel = input_gradient_kernel(&k, &p);
                let dx = written(&q, |write| convolve(&dy, &kernel, &q, write));
                assert_close("dx", &dx, &dx_ref);
            }
        });
    }

    #[test]
    fn filter_vectorized_path_matches_a_direct_convolution() {
        // Keras 'same' 3×3 on 8×8 maps with 64 channels (the input gradient takes this path
        // too); Keras 'same' with stride 2 (bottom/right padding); 'valid' on a rectangular
        // map whose positions are no multiple of the 6-position tile; a dilation of 2.
        check((4, 64, 8, 8, 64, 3, 1, 1, (1, 1, 1, 1)));
        check((5, 7, 9, 9, 128, 3, 2, 1, (0, 1, 0, 1)));
        check((4, 5, 7, 6, 64, 3, 1, 1, (0, 0, 0, 0)));
        check((4, 3, 9, 11, 64, 3, 1, 2, (2, 2, 2, 2)));
    }
}

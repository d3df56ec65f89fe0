//! 2-D convolution with its own backward pass, GEMM-based on the CPU.
//!
//! candle 0.11 computes a convolution's input gradient with `conv_transpose2d` (a direct
//! loop on the CPU, a naive kernel on CUDA) and its kernel gradient with a convolution over
//! transposed tensors; both cost several times the forward pass. Here all three products
//! are one matrix multiplication each over an *im2col* buffer, the standard way:
//!
//! ```text
//! forward:  Y[g]  = W[g] · col(X)           (filters × positions)
//! input:    dX    = col2im(W[g]ᵀ · dY[g])
//! kernel:   dW[g] = dY[g] · col(X)ᵀ
//! ```
//!
//! The buffers are built for a chunk of images at a time (so each product is large and the
//! buffer stays bounded), with TensorFlow's asymmetric 'same' padding folded in (no padded
//! copy of the input). A per-filter bias is added while the product's rows are copied into
//! the output, in the same op: a separate bias op would cost a pass each way, and candle
//! would keep the unbiased output alive for the backward pass as well as the biased one.
//!
//! With the `onednn` feature, f32 products run on oneDNN's kernels instead (`ops/onednn/`),
//! through the same ops and backward pass; f64, any shape oneDNN has no kernel for, and the
//! forward passes that measured faster here (`OneDnnRoute`) stay here.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::AddAssign;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "onednn")]
use super::contiguous_slice;
use super::conv_panels::valid_range;
use super::{Float, OutputBuffer, conv_channels, conv_panels, dispatch_pair, relu_if};
use crate::Result;
use crate::ops::{ChannelAffine, Conv2dGeometry};

/// The GEMM convolution of contiguous f32 or f64 CPU tensors, plus a `(filters,)` bias where
/// given, then `max(·, 0)` with `relu`, as one op (arguments checked by
/// [`crate::ops::fused_conv2d`]).
pub(crate) fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    relu: bool,
    geometry: Conv2dGeometry,
) -> Result<Tensor> {
    let op = Conv2dGemm::new(geometry, relu, None);
    apply(x, kernel, bias, op)
}

/// [`conv2d`] followed by `affine` per filter (a BatchNorm in inference folded in), as one
/// op with no backward pass: the caller ([`crate::ops::conv2d_affine`]) uses it only where
/// nothing asks for a gradient.
pub(crate) fn conv2d_affine(
    x: &Tensor,
    kernel: &Tensor,
    (bias, relu): (Option<&Tensor>, bool),
    affine: &ChannelAffine,
    geometry: Conv2dGeometry,
) -> Result<Tensor> {
    let op = Conv2dGemm::new(geometry, relu, Some(affine.clone()));
    apply(x, kernel, bias, op)
}

/// [`conv2d`], or [`conv2d_affine`] with `affine`, in inference on oneDNN's layouts: `x` in
/// NCHW or in oneDNN's blocked layout nChw{b}c (rank 5, `[n, c/b, h, w, b]`), the output left
/// in the primitive's blocked layout (rank 5) where `blocked_output` and its primitive writes
/// one, else NCHW. One op with no backward pass: the caller (`models/inference.rs`) uses it
/// only where nothing asks for a gradient.
#[cfg(feature = "onednn")]
pub(crate) fn conv2d_handoff(
    x: &Tensor,
    kernel: &Tensor,
    (bias, relu): (Option<&Tensor>, bool),
    affine: Option<&ChannelAffine>,
    geometry: Conv2dGeometry,
    blocked_output: bool,
) -> Result<Tensor> {
    let op = Conv2dGemm {
        blocked_output,
        ..Conv2dGemm::new(geometry, relu, affine.cloned())
    };
    let (x, kernel) = (x.contiguous()?, kernel.contiguous()?);
    Ok(match bias {
        None => x.apply_op2_no_bwd(&kernel, &op)?,
        Some(bias) => x.apply_op3_no_bwd(&kernel, &bias.contiguous()?, &op)?,
    })
}

/// Runs `op` on contiguous `(x, kernel)` or `(x, kernel, bias)`: with its backward pass, or
/// without one when it applies a folded batch norm.
fn apply(x: &Tensor, kernel: &Tensor, bias: Option<&Tensor>, op: Conv2dGemm) -> Result<Tensor> {
    let (x, kernel) = (x.contiguous()?, kernel.contiguous()?);
    let bias = bias.map(Tensor::contiguous).transpose()?;
    Ok(match (bias, op.affine.is_some()) {
        (None, false) => x.apply_op2(&kernel, op)?,
        (Some(bias), false) => x.apply_op3(&kernel, &bias, op)?,
        (None, true) => x.apply_op2_no_bwd(&kernel, &op)?,
        (Some(bias), true) => x.apply_op3_no_bwd(&kernel, &bias, &op)?,
    })
}

/// The gradients of [`conv2d`] without candle's autograd, for the plan's own backward pass
/// (`train/tape.rs`): `(dX, dW, dB)` from the input, kernel, the output `y` (needed with
/// `relu` only) and the output's gradient `dy`; `dB` where there is a bias.
pub(crate) fn conv2d_backward(
    (x, kernel, y): (&Tensor, &Tensor, Option<&Tensor>),
    bias: bool,
    relu: bool,
    geometry: Conv2dGeometry,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let op = Conv2dGemm::new(geometry, relu, None);
    let dy = match (relu, y) {
        (true, Some(y)) => op.product_grad(y, dy)?,
        (true, None) => {
            return Err(candle_core::Error::Msg(
                "conv2d backward: a fused ReLU needs the output".into(),
            )
            .into());
        }
        (false, _) => dy.contiguous()?,
    };
    let (dx, dk) = op.gradients(&x.contiguous()?, &kernel.contiguous()?, &dy)?;
    let db = bias.then(|| super::bias::channel_sum(&dy)).transpose()?;
    Ok((dx, dk, db))
}

/// Sizes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    groups: usize,
}

impl Sizes {
    fn new(x: &[usize], k: &[usize], g: &Conv2dGeometry) -> candle_core::Result<Self> {
        let (&[n, c, h, w], &[o, _, kh, kw]) = (x, k) else {
            candle_core::bail!("conv2d expects NCHW input and OIHW kernel, got {x:?} and {k:?}")
        };
        let (oh, ow) = g
            .output_size(h, w, kh, kw)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Self {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            oh,
            ow,
            groups: g.groups,
        })
    }
    fn cg(&self) -> usize {
        self.c / self.groups
    }
    fn og(&self) -> usize {
        self.o / self.groups
    }
    fn ckk(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    fn ohw(&self) -> usize {
        self.oh * self.ow
    }
    /// Multiply-adds times two, of one pass (the three passes do the same number); in f64
    /// factor by factor, so that no product of sizes can overflow.
    #[cfg(feature = "onednn")]
    fn flops(&self) -> f64 {
        [
            self.n,
            self.oh,
            self.ow,
            self.o,
            self.cg(),
            self.kh,
            self.kw,
        ]
        .iter()
        .fold(2.0, |f, &v| f * v as f64)
    }
    /// The sizes in the order of oneDNN's shim; `None` when one is past `i32::MAX`, beyond
    /// what oneDNN's kernels index (the GEMM path takes those).
    #[cfg(feature = "onednn")]
    fn onednn(&self, g: &Conv2dGeometry) -> Option<crate::ops::onednn::ConvSizes> {
        let (t, b, l, r) = g.pad;
        let sizes = [
            self.n,
            self.c,
            self.h,
            self.w,
            self.o,
            self.kh,
            self.kw,
            self.oh,
            self.ow,
            self.groups,
            g.stride,
            g.dilation,
            t,
            b,
            l,
            r,
        ];
        let fits = sizes.iter().all(|&v| v <= i32::MAX as usize);
        fits.then(|| sizes.map(|v| v as i64))
    }
    /// The problem and the SIMD kernel family that runs it, where one does.
    fn simd(&self, g: &Conv2dGeometry) -> Option<(conv_panels::Problem, SimdPath)> {
        let problem = self.panel_problem(g)?;
        SimdPath::choose(&problem).map(|path| (problem, path))
    }
    /// The problem for the SIMD kernels: `None` where they do not run (grouped
    /// convolutions, a CPU without AVX2 + FMA); each kernel family says which problems it
    /// takes.
    fn panel_problem(&self, g: &Conv2dGeometry) -> Option<conv_panels::Problem> {
        let problem = conv_panels::Problem {
            n: self.n,
            c: self.c,
            h: self.h,
            w: self.w,
            o: self.o,
            kh: self.kh,
            kw: self.kw,
            oh: self.oh,
            ow: self.ow,
            stride: g.stride,
            dilation: g.dilation,
            pad_top: g.pad.0,
            pad_left: g.pad.2,
            isa: conv_panels::Isa::detect()?,
        };
        (self.groups == 1).then_some(problem)
    }
    /// Images per chunk: keeps the im2col buffer near 8M elements.
    fn chunk(&self) -> usize {
        (8 << 20) / (self.ckk() * self.ohw()).max(1)
    }
}

/// Where an f32 convolution of the `onednn` build runs: on oneDNN, with all of OpenMP's
/// threads or with the calling thread alone, or on the crate's own kernels (a forward pass
/// only: the gradients always go to oneDNN). Chosen per call from the problem's size and the
/// instruction set the CPU has, at run time.
#[cfg(feature = "onednn")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OneDnnRoute {
    OneDnn(crate::ops::onednn::Threads),
    Own,
}

#[cfg(feature = "onednn")]
impl OneDnnRoute {
    /// On AVX2 CPUs, problems of fewer FLOPs run on oneDNN with the calling thread alone,
    /// whatever their pixel count. Waking OpenMP's sleeping threads (`OMP_WAIT_POLICY=passive`,
    /// beside rayon's pool) cost more than the second thread saved: the shrunken
    /// 16-32-64-128 networks' batch-1 inference (convolutions of 0.3-4.7 MFLOP) ran 2.0-2.1x
    /// faster on one thread, and 1.4-1.5x faster again with their 8x8 and 4x4 layers moved
    /// from the GEMM path to oneDNN on one thread; the full networks' 38-76 MFLOP layers ran
    /// 30% slower on one thread (`bench --mode infer --batch-size 1`, AMD EPYC with AVX2,
    /// medians of 5 alternated runs; docs/PERFORMANCE.md).
    const ONE_THREAD_BELOW_FLOPS: f64 = 16e6;

    /// On AVX2 CPUs, forward convolutions from
    /// [`ONE_THREAD_BELOW_FLOPS`](Self::ONE_THREAD_BELOW_FLOPS) up to this run on the crate's
    /// own kernels: one image's layers of the full networks (38-76 MFLOP), whose batch-1
    /// inference was 10-11% slower on oneDNN's two threads and per-call reorders. From 128
    /// MFLOP on (the smallest layer of the full networks at batch 32 has 134) oneDNN's
    /// kernels measured faster.
    const AVX2_OWN_BELOW_FLOPS: f64 = 128e6;

    /// The fewest output pixels (`n · oh · ow`) a forward convolution sends to oneDNN on
    /// other CPUs (AVX-512, where the rules above were not measured). Below it, the
    /// reorders to and from the blocked layout and the primitive lookup, paid per call,
    /// cost more than oneDNN's faster kernel saves: at batch 1 the 8×8 and 4×4 layers of
    /// the article's ResNet took 1.3-5x the GEMM path's time on oneDNN, the 32×32 and 16×16
    /// ones 0.6-0.9x (`layer_profile --batch-size 1 --reps 20 --only conv`, both builds, an
    /// AVX-512 Xeon; docs/PERFORMANCE.md).
    const MIN_OUTPUT_PIXELS: usize = 256;

    /// The route of a forward convolution of sizes `s` on a CPU with `isa`.
    fn forward(s: &Sizes, isa: Option<conv_panels::Isa>) -> Self {
        use crate::ops::onednn::Threads;
        match isa {
            Some(conv_panels::Isa::Avx2) => match s.flops() {
                f if f < Self::ONE_THREAD_BELOW_FLOPS => Self::OneDnn(Threads::One),
                f if f < Self::AVX2_OWN_BELOW_FLOPS => Self::Own,
                _ => Self::OneDnn(Threads::All),
            },
            _ if s.n * s.ohw() >= Self::MIN_OUTPUT_PIXELS => Self::OneDnn(Threads::All),
            _ => Self::Own,
        }
    }

    /// The threads oneDNN computes the gradients of sizes `s` on, on a CPU with `isa`.
    fn backward(s: &Sizes, isa: Option<conv_panels::Isa>) -> crate::ops::onednn::Threads {
        use crate::ops::onednn::Threads;
        match isa {
            Some(conv_panels::Isa::Avx2) if s.flops() < Self::ONE_THREAD_BELOW_FLOPS => {
                Threads::One
            }
            _ => Threads::All,
        }
    }
}

/// Float types the GEMM path handles.
trait Element: Float + Default + AddAssign {
    const ONE: Self;
    /// This thread's reusable work buffer for this type.
    fn scratch() -> &'static std::thread::LocalKey<RefCell<Vec<Self>>>;
    /// The forward convolution on the SIMD kernels ([`conv_panels`], [`conv_channels`],
    /// picked by [`SimdPath::choose`]), writing all of `y`; false (nothing written) where
    /// none runs: f64, groups, no AVX2 + FMA, or a shape where the GEMM path measured
    /// faster.
    fn panel_forward(
        _: (&[Self], &[Self]),
        _: &Sizes,
        _: &Conv2dGeometry,
        _: Epilogue,
        _: &mut [MaybeUninit<Self>],
    ) -> bool {
        false
    }
    /// The input gradient on the SIMD kernels, where one runs (as for
    /// [`panel_forward`](Self::panel_forward), and stride 1 only).
    fn panel_input_grad(
        _: &[Self],
        _: &[Self],
        _: &Sizes,
        _: &Conv2dGeometry,
    ) -> Option<Vec<Self>> {
        None
    }
    /// The kernel gradient on the shifted path's or the filter-vectorized path's own
    /// micro-kernel, where one of them runs.
    fn panel_kernel_grad(
        _: &[Self],
        _: &[Self],
        _: &Sizes,
        _: &Conv2dGeometry,
    ) -> Option<Vec<Self>> {
        None
    }
}

thread_local! {
    static SCRATCH_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

impl Element for f32 {
    const ONE: Self = 1.0;
    fn scratch() -> &'static std::thread::LocalKey<RefCell<Vec<Self>>> {
        &SCRATCH_F32
    }
    fn panel_forward(
        (x, k): (&[f32], &[f32]),
        s: &Sizes,
        geo: &Conv2dGeometry,
        epilogue: Epilogue,
        y: &mut [MaybeUninit<f32>],
    ) -> bool {
        let Some((problem, path)) = s.simd(geo) else {
            return false;
        };
        let (ohw, o) = (s.ohw(), s.o);
        let out = SharedSlots(y.as_mut_ptr());
        path.convolve((x, k), &problem, &|run| {
            let at = (run.image * o + run.filter) * ohw + run.start;
            // SAFETY: the kernels hand every (filter, image, position) to exactly one run,
            // so the runs write disjoint ranges of `y`, all inside its `n · o · oh · ow`.
            let dst = unsafe { out.range(at, run.values.len()) };
            epilogue.write(run.filter, run.values, dst);
        });
        true
    }
    fn panel_input_grad(
        dy: &[f32],
        k: &[f32],
        s: &Sizes,
        geo: &Conv2dGeometry,
    ) -> Option<Vec<f32>> {
        let forward = s.panel_problem(geo)?;
        let problem = conv_panels::input_gradient_problem(&forward)?;
        let path = SimdPath::choose(&problem)?;
        let kernel = conv_panels::input_gradient_kernel(k, &forward);
        let len = s.n * s.c * s.h * s.w;
        let mut dx = OutputBuffer::new(len, "conv2d input grad").ok()?;
        let out = SharedSlots(dx.uninit().as_mut_ptr());
        let hw = s.h * s.w;
        path.convolve((dy, &kernel), &problem, &|run| {
            let at = (run.image * s.c + run.filter) * hw + run.start;
            // SAFETY: as in `panel_forward`, over `dx`'s `n · c · h · w`.
            let dst = unsafe { out.range(at, run.values.len()) };
            for (d, &v) in dst.iter_mut().zip(run.values) {
                d.write(v);
            }
        });
        // SAFETY: the kernel wrote every position of every channel of every image.
        Some(unsafe { dx.written() })
    }
    fn panel_kernel_grad(
        x: &[f32],
        dy: &[f32],
        s: &Sizes,
        geo: &Conv2dGeometry,
    ) -> Option<Vec<f32>> {
        let problem = s.panel_problem(geo)?;
        match SimdPath::choose(&problem)? {
            // The shifted path has a kernel gradient of its own; the panel path has none.
            SimdPath::Panels => conv_panels::kernel_gradient(x, dy, &problem),
            SimdPath::Channels => Some(conv_channels::kernel_gradient(x, dy, &problem)),
        }
    }
}

/// The SIMD kernel family that suits a problem.
#[derive(Clone, Copy)]
enum SimdPath {
    /// [`conv_panels`]: the shifted path for wide maps, panels otherwise.
    Panels,
    /// [`conv_channels`]: filters in the vector lanes, for small maps and strides.
    Channels,
}

impl SimdPath {
    /// The shifted path where it applies (wide maps: it measured faster there than the
    /// filter-vectorized one), else, on AVX-512, the filter-vectorized one where it applies,
    /// else the panel path where it pays; `None` where none does.
    ///
    /// On AVX2 only the shifted path runs: there it took 0.64-0.74x the GEMM path's time on
    /// 32×32 and 16×16 maps, while the others were never faster than GEMM (`layer_profile`,
    /// batch 32, AMD EPYC with AVX2, medians of 3 runs: the filter-vectorized path
    /// 1.05-1.34x on the 3×3 layers it takes; docs/PERFORMANCE.md, "an AVX2-only CPU").
    fn choose(p: &conv_panels::Problem) -> Option<Self> {
        if conv_panels::shifted(p) {
            return Some(Self::Panels);
        }
        match p.isa {
            conv_panels::Isa::Avx2 => None,
            conv_panels::Isa::Avx512 => {
                let channels = conv_channels::applies(p);
                if !channels && p.worth_it() {
                    Some(Self::Panels)
                } else {
                    channels.then_some(Self::Channels)
                }
            }
        }
    }

    /// Runs `p`, handing each output run to `write`.
    fn convolve(
        self,
        (x, k): (&[f32], &[f32]),
        p: &conv_panels::Problem,
        write: &(dyn Fn(conv_panels::Run<'_>) + Sync),
    ) {
        match self {
            Self::Panels => conv_panels::convolve(x, k, p, write),
            Self::Channels => conv_channels::convolve(x, k, p, write),
        }
    }
}

/// Output slots written from several threads, each range by one.
struct SharedSlots<T>(*mut MaybeUninit<T>);
// SAFETY: only used to hand out disjoint ranges (the callers' contracts).
unsafe impl<T: Send> Sync for SharedSlots<T> {}
unsafe impl<T: Send> Send for SharedSlots<T> {}

impl<T> SharedSlots<T> {
    /// The `len` slots from `start`.
    ///
    /// # Safety
    /// The range lies inside the buffer, and no other live reference covers it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, start: usize, len: usize) -> &mut [MaybeUninit<T>] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}
impl Element for f64 {
    const ONE: Self = 1.0;
    fn scratch() -> &'static std::thread::LocalKey<RefCell<Vec<Self>>> {
        &SCRATCH_F64
    }
}

/// Runs `f` with two work buffers of `a` and `b` elements, reused across calls: the im2col
/// and product buffers are large, and allocating (and zeroing, and page-faulting) them on
/// every convolution cost more than filling them.
fn with_buffers<T: Element, R>(a: usize, b: usize, f: impl FnOnce(&mut [T], &mut [T]) -> R) -> R {
    T::scratch().with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < a + b {
                buf.resize(a + b, T::default());
            }
            let (x, y) = buf.split_at_mut(a);
            f(x, &mut y[..b])
        }
        // Re-entered on this thread (cannot happen in these kernels, but stay correct).
        Err(_) => {
            let mut buf = vec![T::default(); a + b];
            let (x, y) = buf.split_at_mut(a);
            f(x, y)
        }
    })
}

/// `dst[m×n] = (accumulate ? dst : 0) + lhs[m×k] · rhs[k×n]`, each given by (pointer, row
/// stride, column stride).
#[allow(clippy::too_many_arguments)]
fn matmul<T: Element>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    debug_assert!(dst.len() >= (m - 1) * dst_rs + n);
    let threads = candle_core::utils::get_num_threads();
    if threads < 2 || m > MAX_BLOCK_ROWS || n < threads * MIN_BLOCK_COLUMNS {
        let parallelism = if threads < 2 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        // SAFETY: as in `matmul_block`, for the whole product.
        unsafe {
            matmul_block(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                dst_rs,
                accumulate,
                lhs.as_ptr(),
                (lhs_rs, lhs_cs),
                rhs.as_ptr(),
                (rhs_rs, rhs_cs),
                parallelism,
            )
        };
        return;
    }
    // One block of columns per thread, each a single-threaded product: the `gemm` crate's own
    // threading splits a product with few rows badly (the first stage's forward, 64 filters ×
    // 14,336 positions × 576, ran at 47-59 GFLOP/s on two threads and 76-103 in two column
    // blocks, its kernel gradient 45-88 against 70-102; up to 512 rows the blocks are never
    // slower, with more rows (the input gradient's channels × kernel) they are not faster;
    // `examples/gemm_blocks.rs`, docs/PERFORMANCE.md).
    let per = n.div_ceil(threads).next_multiple_of(16);
    let dst_at = dst.as_mut_ptr() as usize;
    (0..n.div_ceil(per)).into_par_iter().for_each(|b| {
        let j0 = b * per;
        let nb = per.min(n - j0);
        // SAFETY: the blocks write disjoint columns `j0..j0 + nb` of `dst` (each row's
        // columns are disjoint ranges of the slice), and read `rhs`'s matching columns.
        unsafe {
            matmul_block(
                m,
                nb,
                k,
                (dst_at as *mut T).add(j0),
                dst_rs,
                accumulate,
                lhs.as_ptr(),
                (lhs_rs, lhs_cs),
                rhs.as_ptr().add(j0 * rhs_cs),
                (rhs_rs, rhs_cs),
                gemm::Parallelism::None,
            )
        }
    });
}

/// Products with fewer columns per thread than this are left to the `gemm` crate's threads.
const MIN_BLOCK_COLUMNS: usize = 64;
/// So are products with more rows than this.
const MAX_BLOCK_ROWS: usize = 512;

/// One `gemm` call.
///
/// # Safety
/// `dst` must hold `m` rows of `n` elements at row stride `dst_rs` that nothing else touches
/// during the call, and `lhs`/`rhs` `m × k`/`k × n` matrices at the strides given.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_block<T: Element>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const T,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (usize, usize),
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Fills `col` (`ckk` rows of `nc · oh · ow`) for group `g` and images `n0..n0 + nc`.
fn im2col<T: Element>(
    x: &[T],
    s: &Sizes,
    geo: &Conv2dGeometry,
    g: usize,
    n0: usize,
    nc: usize,
    col: &mut [T],
) {
    let (pt, _, pl, _) = geo.pad;
    let (stride, dil) = (geo.stride, geo.dilation);
    let row_len = nc * s.ohw();
    col.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(r, row)| {
            let c = g * s.cg() + r / (s.kh * s.kw);
            let ki = (r / s.kw) % s.kh;
            let kj = r % s.kw;
            let (y_lo, y_hi) = valid_range(s.oh, stride, ki * dil, pt, s.h);
            let (x_lo, x_hi) = valid_range(s.ow, stride, kj * dil, pl, s.w);
            for nl in 0..nc {
                let plane = &x[((n0 + nl) * s.c + c) * s.h * s.w..][..s.h * s.w];
                let out = &mut row[nl * s.ohw()..][..s.ohw()];
                out[..y_lo * s.ow].fill(T::default());
                out[y_hi * s.ow..].fill(T::default());
                for oy in y_lo..y_hi {
                    let dst = &mut out[oy * s.ow..][..s.ow];
                    let iy = oy * stride + ki * dil - pt;
                    let src = &plane[iy * s.w..][..s.w];
                    dst[..x_lo].fill(T::default());
                    dst[x_hi..].fill(T::default());
                    if x_hi > x_lo {
                        let ix0 = x_lo * stride + kj * dil - pl;
                        if stride == 1 {
                            dst[x_lo..x_hi].copy_from_slice(&src[ix0..ix0 + (x_hi - x_lo)]);
                        } else {
                            for (d, v) in dst[x_lo..x_hi]
                                .iter_mut()
                                .zip(src[ix0..].iter().step_by(stride))
                            {
                                *d = *v;
                            }
                        }
                    }
                }
            }
        });
}

/// Adds `col` back into the images it was taken from (the adjoint of [`im2col`]).
fn col2im<T: Element>(
    col: &[T],
    s: &Sizes,
    geo: &Conv2dGeometry,
    g: usize,
    nc: usize,
    dx: &mut [T],
) {
    let (pt, _, pl, _) = geo.pad;
    let (stride, dil) = (geo.stride, geo.dilation);
    let row_len = nc * s.ohw();
    let image = s.c * s.h * s.w;
    dx[..nc * image]
        .par_chunks_mut(image)
        .enumerate()
        .for_each(|(nl, img)| {
            for r in 0..s.ckk() {
                let c = g * s.cg() + r / (s.kh * s.kw);
                let ki = (r / s.kw) % s.kh;
                let kj = r % s.kw;
                let (y_lo, y_hi) = valid_range(s.oh, stride, ki * dil, pt, s.h);
                let (x_lo, x_hi) = valid_range(s.ow, stride, kj * dil, pl, s.w);
                if x_hi <= x_lo {
                    continue;
                }
                let plane = &mut img[c * s.h * s.w..][..s.h * s.w];
                let src_row = &col[r * row_len + nl * s.ohw()..][..s.ohw()];
                for oy in y_lo..y_hi {
                    let iy = oy * stride + ki * dil - pt;
                    let dst = &mut plane[iy * s.w..][..s.w];
                    let src = &src_row[oy * s.ow + x_lo..oy * s.ow + x_hi];
                    let ix0 = x_lo * stride + kj * dil - pl;
                    if stride == 1 {
                        // Contiguous on both sides: a plain slice loop, which vectorizes
                        // (`step_by` does not; at 32x32 maps this loop was a third of the
                        // backward pass).
                        for (d, &v) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                            *d += v;
                        }
                    } else {
                        for (d, &v) in dst[ix0..].iter_mut().step_by(stride).zip(src) {
                            *d += v;
                        }
                    }
                }
            }
        });
}

/// Copies `dy` for group `g`, images `n0..n0 + nc` into `buf` as `og` rows of `nc · oh · ow`.
fn gather_rows<T: Element>(dy: &[T], s: &Sizes, g: usize, n0: usize, nc: usize, buf: &mut [T]) {
    let ohw = s.ohw();
    for nl in 0..nc {
        for o in 0..s.og() {
            let src = &dy[((n0 + nl) * s.o + g * s.og() + o) * ohw..][..ohw];
            buf[o * nc * ohw + nl * ohw..][..ohw].copy_from_slice(src);
        }
    }
}

/// What the forward pass applies to the product as it is written out: each filter's bias
/// (where `bias` is not empty), then `max(·, 0)` with `relu`, then the per-filter `affine`.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    bias: &'a [f64],
    relu: bool,
    affine: Option<&'a ChannelAffine>,
}

/// The inverse of [`gather_rows`]: copies a chunk's product rows (filters of group `g` ×
/// positions of images `n0..n0 + nc`) back into NCHW `y`, through the `epilogue`.
fn scatter_rows<T: Element>(
    rows: &[T],
    s: &Sizes,
    (g, n0, nc): (usize, usize, usize),
    epilogue: Epilogue,
    y: &mut [MaybeUninit<T>],
) {
    let ohw = s.ohw();
    for nl in 0..nc {
        for o in 0..s.og() {
            let filter = g * s.og() + o;
            let dst = &mut y[((n0 + nl) * s.o + filter) * ohw..][..ohw];
            let src = &rows[o * nc * ohw + nl * ohw..][..ohw];
            epilogue.write(filter, src, dst);
        }
    }
}

impl Epilogue<'_> {
    /// Writes one filter's products `src` into `dst` through the epilogue.
    fn write<T: Element>(&self, filter: usize, src: &[T], dst: &mut [MaybeUninit<T>]) {
        match (self.bias.get(filter), self.relu, self.affine) {
            (None, false, None) => {
                for (d, &v) in dst.iter_mut().zip(src) {
                    d.write(v);
                }
            }
            // Rounded once, as the separate bias kernel does.
            (b, relu, None) => {
                let b = b.copied().unwrap_or(0.0);
                for (d, &v) in dst.iter_mut().zip(src) {
                    d.write(T::from_f64(relu_if(v.to_f64() + b, relu)));
                }
            }
            // The convolution's value rounded as above, then the batch norm's map in the
            // elements' own type, as its normalize kernel computes it: the same values as the
            // two layers one after the other.
            (b, relu, Some(affine)) => {
                let b = b.copied().unwrap_or(0.0);
                let (a, c) = (
                    T::from_f64(affine.scale[filter]),
                    T::from_f64(affine.shift[filter]),
                );
                for (d, &v) in dst.iter_mut().zip(src) {
                    let v = T::from_f64(relu_if(v.to_f64() + b, relu));
                    d.write((v * a + c).relu_if(affine.relu_after));
                }
            }
        }
    }
}

/// `Y = W · col(X)` (+ the per-filter `bias`, when not empty; then `max(·, 0)` with `relu`).
fn forward<T: Element>(
    x: &[T],
    k: &[T],
    epilogue: Epilogue,
    s: &Sizes,
    geo: &Conv2dGeometry,
) -> candle_core::Result<Vec<T>> {
    let (ohw, ckk, og) = (s.ohw(), s.ckk(), s.og());
    let mut y = OutputBuffer::new(s.n * s.o * ohw, "conv2d")?;
    let y_slots = y.uninit();
    if T::panel_forward((x, k), s, geo, epilogue, y_slots) {
        // SAFETY: `panel_forward` wrote every output when it returns true.
        return Ok(unsafe { y.written() });
    }
    let chunk = s.chunk().clamp(1, s.n.max(1));
    with_buffers(
        ckk * chunk * ohw,
        og * chunk * ohw,
        |col: &mut [T], out: &mut [T]| {
            for g in 0..s.groups {
                let kernel = &k[g * og * ckk..][..og * ckk];
                for n0 in (0..s.n).step_by(chunk) {
                    let nc = chunk.min(s.n - n0);
                    let cols = nc * ohw;
                    im2col(x, s, geo, g, n0, nc, &mut col[..ckk * cols]);
                    matmul(
                        og,
                        cols,
                        ckk,
                        out,
                        cols,
                        false,
                        kernel,
                        (ckk, 1),
                        col,
                        (cols, 1),
                    );
                    scatter_rows(&out[..og * cols], s, (g, n0, nc), epilogue, y_slots);
                }
            }
        },
    );
    // SAFETY: every group's filters of every image were scattered (`scatter_rows` writes
    // each row it is given in full), which covers all `n · o · oh · ow` outputs.
    Ok(unsafe { y.written() })
}

fn backward_input<T: Element>(dy: &[T], k: &[T], s: &Sizes, geo: &Conv2dGeometry) -> Vec<T> {
    if let Some(dx) = T::panel_input_grad(dy, k, s, geo) {
        return dx;
    }
    let (ohw, ckk, og) = (s.ohw(), s.ckk(), s.og());
    let image = s.c * s.h * s.w;
    let mut dx = vec![T::default(); s.n * image];
    let chunk = s.chunk().clamp(1, s.n.max(1));
    with_buffers(
        og * chunk * ohw,
        ckk * chunk * ohw,
        |rows: &mut [T], dcol: &mut [T]| {
            for g in 0..s.groups {
                let kernel = &k[g * og * ckk..][..og * ckk];
                for n0 in (0..s.n).step_by(chunk) {
                    let nc = chunk.min(s.n - n0);
                    let cols = nc * ohw;
                    gather_rows(dy, s, g, n0, nc, &mut rows[..og * cols]);
                    // dcol = Wᵀ · dY: the kernel read column-major is its transpose.
                    matmul(
                        ckk,
                        cols,
                        og,
                        dcol,
                        cols,
                        false,
                        kernel,
                        (1, ckk),
                        rows,
                        (cols, 1),
                    );
                    col2im(&dcol[..ckk * cols], s, geo, g, nc, &mut dx[n0 * image..]);
                }
            }
        },
    );
    dx
}

fn backward_kernel<T: Element>(x: &[T], dy: &[T], s: &Sizes, geo: &Conv2dGeometry) -> Vec<T> {
    if let Some(dk) = T::panel_kernel_grad(x, dy, s, geo) {
        return dk;
    }
    let (ohw, ckk, og) = (s.ohw(), s.ckk(), s.og());
    let mut dk = vec![T::default(); s.o * ckk];
    let chunk = s.chunk().clamp(1, s.n.max(1));
    with_buffers(
        og * chunk * ohw,
        ckk * chunk * ohw,
        |rows: &mut [T], col: &mut [T]| {
            for g in 0..s.groups {
                let dk_g = &mut dk[g * og * ckk..][..og * ckk];
                for (i, n0) in (0..s.n).step_by(chunk).enumerate() {
                    let nc = chunk.min(s.n - n0);
                    let cols = nc * ohw;
                    gather_rows(dy, s, g, n0, nc, &mut rows[..og * cols]);
                    im2col(x, s, geo, g, n0, nc, &mut col[..ckk * cols]);
                    // dW += dY · colᵀ: col read column-major is its transpose.
                    matmul(
                        og,
                        ckk,
                        cols,
                        dk_g,
                        ckk,
                        i > 0,
                        rows,
                        (cols, 1),
                        col,
                        (1, cols),
                    );
                }
            }
        },
    );
    dk
}

/// The convolution as a candle op with its own backward: `(X, W)`, or `(X, W, bias)` as a
/// three-operand op; with `relu` the output is `max(Y, 0)` and `dY` is masked by it first.
struct Conv2dGemm {
    geometry: Conv2dGeometry,
    relu: bool,
    /// A batch norm in inference applied after the ReLU (no backward pass then: the op is
    /// applied with `apply_op*_no_bwd`).
    affine: Option<ChannelAffine>,
    /// Leave the output in oneDNN's blocked layout where its primitive writes one (inference
    /// only, no backward pass: `conv2d_handoff`).
    #[cfg(feature = "onednn")]
    blocked_output: bool,
}

impl Conv2dGemm {
    /// The op, its output in NCHW.
    fn new(geometry: Conv2dGeometry, relu: bool, affine: Option<ChannelAffine>) -> Self {
        Self {
            geometry,
            relu,
            affine,
            #[cfg(feature = "onednn")]
            blocked_output: false,
        }
    }

    fn compute(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        bias: &[f64],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        #[cfg(feature = "onednn")]
        if let [n, blocks, h, w, b] = *l1.dims() {
            return self.compute_blocked((s1, l1), [n, blocks, h, w, b], (s2, l2), bias);
        }
        let s = Sizes::new(l1.dims(), l2.dims(), &self.geometry)?;
        let shape = Shape::from((s.n, s.o, s.oh, s.ow));
        #[cfg(feature = "onednn")]
        if let (CpuStorage::F32(x), CpuStorage::F32(k), Some(sizes), OneDnnRoute::OneDnn(threads)) = (
            s1,
            s2,
            s.onednn(&self.geometry),
            OneDnnRoute::forward(&s, conv_panels::Isa::detect()),
        ) {
            use crate::ops::onednn::{self, Handoff};
            let (x, k) = (
                contiguous_slice(x, l1, "conv2d")?,
                contiguous_slice(k, l2, "conv2d")?,
            );
            // The bias reached here as f64 from f32: converting back is exact.
            let bias: Vec<f32> = bias.iter().map(|&b| b as f32).collect();
            let bias = (!bias.is_empty()).then_some(bias.as_slice());
            let affine = self.affine.as_ref();
            let handoff = Handoff {
                input: None,
                blocked_output: self.blocked_output,
            };
            let sizes = (&sizes, threads);
            if let Some((y, block)) =
                onednn::forward(x, k, bias, self.relu, affine, sizes, handoff)?
            {
                let shape = match block {
                    Some(b) => Shape::from((s.n, s.o / b, s.oh, s.ow, b)),
                    None => shape,
                };
                return Ok((CpuStorage::F32(y), shape));
            }
        }
        let epilogue = Epilogue {
            bias,
            relu: self.relu,
            affine: self.affine.as_ref(),
        };
        let out = dispatch_pair!(s1, l1, s2, l2, "conv2d", |x, k| forward(
            x,
            k,
            epilogue,
            &s,
            &self.geometry
        )?);
        Ok((out, shape))
    }

    /// An error where the op has no backward pass (a folded batch norm): never reached, as
    /// such an op is applied without one; kept so that a gradient is never silently wrong.
    fn differentiable(&self) -> candle_core::Result<()> {
        match self.affine {
            None => Ok(()),
            Some(_) => candle_core::bail!("conv2d with a folded batch norm has no backward pass"),
        }
    }

    /// The gradient reaching the product: `dY`, masked where a fused ReLU's output `y` is 0.
    fn product_grad(&self, y: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
        match self.relu {
            true => super::relu::grad(dy, y),
            false => dy.contiguous(),
        }
    }

    /// `(dX, dW)` from the product's gradient.
    fn gradients(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        #[cfg(feature = "onednn")]
        if let Some(grads) = self.onednn_gradients(x, kernel, dy)? {
            return Ok(grads);
        }
        let dx = dy.apply_op2_no_bwd(
            kernel,
            &Conv2dInputGrad {
                geometry: self.geometry,
                input: x.dims().to_vec(),
            },
        )?;
        let dk = x.apply_op2_no_bwd(
            dy,
            &Conv2dKernelGrad {
                geometry: self.geometry,
                kernel: kernel.dims().to_vec(),
            },
        )?;
        Ok((dx, dk))
    }
}

#[cfg(feature = "onednn")]
impl Conv2dGemm {
    /// `(dX, dW)` on oneDNN for f32 tensors, in one call that reorders `dY` once for both;
    /// `None` for f64, or a shape oneDNN has no kernel for.
    fn onednn_gradients(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        use candle_core::{DType, Storage};
        if [x.dtype(), kernel.dtype(), dy.dtype()] != [DType::F32; 3] {
            return Ok(None);
        }
        let (x, kernel, dy) = (x.contiguous()?, kernel.contiguous()?, dy.contiguous()?);
        let s = Sizes::new(x.dims(), kernel.dims(), &self.geometry)?;
        let Some(sizes) = s.onednn(&self.geometry) else {
            return Ok(None);
        };
        let grads = {
            let (xs, xl) = x.storage_and_layout();
            let (ks, kl) = kernel.storage_and_layout();
            let (ds, dl) = dy.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(xv)), Storage::Cpu(CpuStorage::F32(kv))) =
                (&*xs, &*ks)
            else {
                return Ok(None);
            };
            let Storage::Cpu(CpuStorage::F32(dv)) = &*ds else {
                return Ok(None);
            };
            let name = "conv2d backward";
            let inputs = (
                contiguous_slice(xv, xl, name)?,
                contiguous_slice(dv, dl, name)?,
                contiguous_slice(kv, kl, name)?,
            );
            let threads = OneDnnRoute::backward(&s, conv_panels::Isa::detect());
            crate::ops::onednn::backward(inputs, (&sizes, threads))?
        };
        let Some((dx, dk)) = grads else {
            return Ok(None);
        };
        Ok(Some((
            Tensor::from_vec(dx, x.shape(), x.device())?,
            Tensor::from_vec(dk, kernel.shape(), kernel.device())?,
        )))
    }
}

#[cfg(feature = "onednn")]
impl Conv2dGemm {
    /// [`compute`](Self::compute) for an input in oneDNN's blocked layout nChw{b}c, as
    /// `[n, c/b, h, w, b]` (an output handed over by the convolution before, in inference):
    /// read in place where this convolution's primitive reads that layout, else made NCHW
    /// first, for another oneDNN layout or the crate's own kernels.
    fn compute_blocked(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        [n, blocks, h, w, b]: [usize; 5],
        (s2, l2): (&CpuStorage, &Layout),
        bias: &[f64],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use crate::ops::onednn::{self, Handoff};
        let CpuStorage::F32(x) = s1 else {
            candle_core::bail!("conv2d: an input in oneDNN's blocked layout is f32")
        };
        let x = contiguous_slice(x, l1, "conv2d")?;
        let logical = [n, blocks * b, h, w];
        let s = Sizes::new(&logical, l2.dims(), &self.geometry)?;
        if let (CpuStorage::F32(k), Some(sizes), OneDnnRoute::OneDnn(threads)) = (
            s2,
            s.onednn(&self.geometry),
            OneDnnRoute::forward(&s, conv_panels::Isa::detect()),
        ) {
            let k = contiguous_slice(k, l2, "conv2d")?;
            let bias: Vec<f32> = bias.iter().map(|&b| b as f32).collect();
            let bias = (!bias.is_empty()).then_some(bias.as_slice());
            let handoff = Handoff {
                input: Some(b),
                blocked_output: self.blocked_output,
            };
            let (affine, sizes) = (self.affine.as_ref(), (&sizes, threads));
            if let Some((y, block)) =
                onednn::forward(x, k, bias, self.relu, affine, sizes, handoff)?
            {
                let shape = match block {
                    Some(b) => Shape::from((s.n, s.o / b, s.oh, s.ow, b)),
                    None => Shape::from((s.n, s.o, s.oh, s.ow)),
                };
                return Ok((CpuStorage::F32(y), shape));
            }
        }
        let plain = CpuStorage::F32(onednn::unblock(x, [n, blocks, h * w, b])?);
        self.compute((&plain, &Layout::contiguous(&logical[..])), (s2, l2), bias)
    }
}

impl CustomOp2 for Conv2dGemm {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.compute((s1, l1), (s2, l2), &[])
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.differentiable()?;
        let (dx, dk) = self.gradients(x, kernel, &self.product_grad(y, dy)?)?;
        Ok((Some(dx), Some(dk)))
    }
}

impl CustomOp3 for Conv2dGemm {
    fn name(&self) -> &'static str {
        "conv2d-gemm-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.compute((s1, l1), (s2, l2), &super::to_vec_f64(s3, l3)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.differentiable()?;
        let dy = self.product_grad(y, dy)?;
        let (dx, dk) = self.gradients(x, kernel, &dy)?;
        Ok((Some(dx), Some(dk), Some(super::bias::channel_sum(&dy)?)))
    }
}

/// `dX` from `(dY, W)`.
struct Conv2dInputGrad {
    geometry: Conv2dGeometry,
    input: Vec<usize>,
}

impl CustomOp2 for Conv2dInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = Sizes::new(&self.input, l2.dims(), &self.geometry)?;
        let out = dispatch_pair!(s1, l1, s2, l2, "conv2d input grad", |dy, k| backward_input(
            dy,
            k,
            &s,
            &self.geometry
        ));
        Ok((out, Shape::from(self.input.as_slice())))
    }
}

/// `dW` from `(X, dY)`.
struct Conv2dKernelGrad {
    geometry: Conv2dGeometry,
    kernel: Vec<usize>,
}

impl CustomOp2 for Conv2dKernelGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = Sizes::new(l1.dims(), &self.kernel, &self.geometry)?;
        let out = dispatch_pair!(s1, l1, s2, l2, "conv2d kernel grad", |x, dy| {
            backward_kernel(x, dy, &s, &self.geometry)
        });
        Ok((out, Shape::from(self.kernel.as_slice())))
    }
}

#[cfg(all(test, feature = "onednn"))]
mod onednn_tests {
    use candle_core::Device;

    use super::*;
    use crate::ops::onednn::{self, Threads};
    use conv_panels::Isa;
    use conv_panels::tests::{assert_close, reference, values};

    /// Sizes of `n` images of `c` channels, `h` x `w`, into `o` filters of `k` x `k` with
    /// 'same' padding at stride 1, with their geometry.
    fn same(
        n: usize,
        c: usize,
        (h, w): (usize, usize),
        o: usize,
        k: usize,
    ) -> (Sizes, Conv2dGeometry) {
        let p = (k - 1) / 2;
        let g = Conv2dGeometry {
            pad: (p, k - 1 - p, p, k - 1 - p),
            stride: 1,
            dilation: 1,
            groups: 1,
        };
        (Sizes::new(&[n, c, h, w], &[o, c, k, k], &g).unwrap(), g)
    }

    #[test]
    fn onednn_routes_by_size_on_avx2_and_by_pixels_elsewhere() {
        use OneDnnRoute::{OneDnn, Own};
        let avx2 = Some(Isa::Avx2);
        let (shrunken, _) = same(1, 16, (32, 32), 16, 3); // 4.7 MFLOP
        let (full, _) = same(1, 64, (32, 32), 64, 3); // 75.5 MFLOP
        let (batch, _) = same(32, 64, (32, 32), 64, 3); // 2.4 GFLOP
        let (tiny, _) = same(1, 64, (4, 4), 64, 3); // 16 output pixels, 1.2 MFLOP
        assert_eq!(OneDnnRoute::forward(&shrunken, avx2), OneDnn(Threads::One));
        assert_eq!(OneDnnRoute::forward(&full, avx2), Own);
        assert_eq!(OneDnnRoute::forward(&batch, avx2), OneDnn(Threads::All));
        assert_eq!(OneDnnRoute::forward(&tiny, avx2), OneDnn(Threads::One));
        assert_eq!(OneDnnRoute::backward(&shrunken, avx2), Threads::One);
        assert_eq!(OneDnnRoute::backward(&full, avx2), Threads::All);
        for isa in [Some(Isa::Avx512), None] {
            assert_eq!(OneDnnRoute::forward(&shrunken, isa), OneDnn(Threads::All));
            assert_eq!(OneDnnRoute::forward(&full, isa), OneDnn(Threads::All));
            assert_eq!(OneDnnRoute::forward(&tiny, isa), Own);
            assert_eq!(OneDnnRoute::backward(&shrunken, isa), Threads::All);
        }
    }

    /// The route chosen for this CPU is the one a convolution takes: its forward primitive
    /// is created with that thread count, or none at all on the crate's own kernels.
    #[test]
    fn a_convolution_takes_the_route_chosen_for_this_cpu() {
        // Channel counts no other test uses: 61 -> 67, one image of 6x5 (one thread on
        // AVX2) and of 32x32 (the crate's own kernels on AVX2), four of 32x32 (all threads).
        for (n, hw) in [(1, (6, 5)), (1, (32, 32)), (4, (32, 32))] {
            let (s, g) = same(n, 61, hw, 67, 3);
            let x = Tensor::from_vec(
                values(n * 61 * hw.0 * hw.1, 5),
                (n, 61, hw.0, hw.1),
                &Device::Cpu,
            );
            let k = Tensor::from_vec(values(67 * 61 * 9, 6), (67, 61, 3, 3), &Device::Cpu);
            crate::ops::conv2d(&x.unwrap(), &k.unwrap(), g).unwrap();
            let sizes = s.onednn(&g).unwrap();
            let taken = [Threads::One, Threads::All].map(|t| onednn::forward_cached(&sizes, t));
            let expected = match OneDnnRoute::forward(&s, Isa::detect()) {
                OneDnnRoute::OneDnn(Threads::One) => [true, false],
                OneDnnRoute::OneDnn(Threads::All) => [false, true],
                OneDnnRoute::Own => [false, false],
            };
            assert_eq!(
                taken, expected,
                "{n} images of {hw:?}: forward primitives on [one, all] threads"
            );
        }
    }

    /// A primitive limited to the calling thread computes what one on all of OpenMP's
    /// threads does, forward and both gradients, to the direct sums, and leaves the
    /// caller's OpenMP limit as it found it.
    #[test]
    fn one_thread_and_all_threads_agree_and_the_limit_is_restored() {
        // 3 images of 5 -> 6 channels, 9x7: shapes no other test uses.
        let (s, g) = same(3, 5, (9, 7), 6, 3);
        // The reference reads the sizes only, not the instruction set.
        let p = conv_panels::Problem {
            n: 3,
            c: 5,
            h: 9,
            w: 7,
            o: 6,
            kh: 3,
            kw: 3,
            oh: 9,
            ow: 7,
            stride: 1,
            dilation: 1,
            pad_top: 1,
            pad_left: 1,
            isa: Isa::Avx2,
        };
        let (x, k, dy) = (
            values(3 * 5 * 63, 1),
            values(6 * 5 * 9, 2),
            values(3 * 6 * 63, 3),
        );
        let (y0, dx0, dk0) = reference(&x, &k, &dy, &p);
        let sizes = s.onednn(&g).unwrap();
        let plain = onednn::Handoff::default();
        let before = onednn::openmp_limit();
        for threads in [Threads::One, Threads::All] {
            let (y, _) = onednn::forward(&x, &k, None, false, None, (&sizes, threads), plain)
                .unwrap()
                .unwrap();
            assert_eq!(
                onednn::openmp_limit(),
                before,
                "forward on {threads:?} moved the limit"
            );
            let (dx, dk) = onednn::backward((&x, &dy, &k), (&sizes, threads))
                .unwrap()
                .unwrap();
            assert_eq!(
                onednn::openmp_limit(),
                before,
                "backward on {threads:?} moved the limit"
            );
            assert_close(&format!("output on {threads:?}"), &y, &y0);
            assert_close(&format!("input gradient on {threads:?}"), &dx, &dx0);
            assert_close(&format!("kernel gradient on {threads:?}"), &dk, &dk0);
        }
        if before < 0 {
            eprintln!("oneDNN does not run on OpenMP here: the one-thread limit is not applied");
        }
    }

    /// `x` (`[n, c, hw]` in NCHW) in oneDNN's blocked layout nChw{b}c: what a convolution
    /// that hands its output over writes.
    fn block(x: &[f32], [n, c, hw]: [usize; 3], b: usize) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        for (image, cb, pixel, lane) in (0..n).flat_map(|i| {
            (0..c / b)
                .flat_map(move |cb| (0..hw).flat_map(move |p| (0..b).map(move |l| (i, cb, p, l))))
        }) {
            y[((image * (c / b) + cb) * hw + pixel) * b + lane] =
                x[(image * c + cb * b + lane) * hw + pixel];
        }
        y
    }

    /// A convolution's output left in oneDNN's blocked layout, and an input read in it, are
    /// the NCHW values, bit for bit (the same primitive runs; only the reorders are skipped),
    /// with a folded batch norm's map applied in that layout too; an input in a block the
    /// primitive does not read is refused (the caller passes it in NCHW then).
    #[test]
    fn a_blocked_handoff_gives_the_nchw_values() {
        use onednn::Handoff;
        // 4 images of 16x16 (1,024 output pixels, 9.4 MFLOP): oneDNN on every CPU.
        let (s, g) = same(4, 16, (16, 16), 24, 3);
        let OneDnnRoute::OneDnn(threads) = OneDnnRoute::forward(&s, Isa::detect()) else {
            panic!("the route of {s:?} is the crate's kernels");
        };
        let sizes = s.onednn(&g).unwrap();
        let (x, k, bias) = (
            values(4 * 16 * 256, 7),
            values(24 * 16 * 9, 8),
            values(24, 9),
        );
        let affine = ChannelAffine {
            scale: (0..24).map(|f| f as f64 / 8.0 - 1.5).collect(),
            shift: (0..24).map(|f| 0.25 - f as f64 / 16.0).collect(),
            relu_after: true,
        };
        let plain = Handoff::default();
        let out = Handoff {
            input: None,
            blocked_output: true,
        };
        for affine in [None, Some(&affine)] {
            let run = |x: &[f32], handoff| {
                onednn::forward(x, &k, Some(&bias), true, affine, (&sizes, threads), handoff)
                    .unwrap()
            };
            let (y, none) = run(&x, plain).unwrap();
            assert_eq!(none, None, "an NCHW call gives NCHW");
            let (blocked, Some(b)) = run(&x, out).unwrap() else {
                panic!("oneDNN's primitive for {s:?} writes NCHW");
            };
            let dims = [4, 24 / b, 256, b];
            assert_eq!(
                onednn::unblock(&blocked, dims).unwrap(),
                y,
                "output, affine {affine:?}"
            );
            assert_eq!(blocked, block(&y, [4, 24, 256], b), "the layout nChw{b}c");
            let xb = block(&x, [4, 16, 256], b);
            let input = |b| Handoff {
                input: Some(b),
                blocked_output: false,
            };
            assert_eq!(
                run(&xb, input(b)).unwrap(),
                (y.clone(), None),
                "blocked input"
            );
            let both = Handoff {
                input: Some(b),
                blocked_output: true,
            };
            assert_eq!(
                run(&xb, both).unwrap(),
                (blocked, Some(b)),
                "blocked in and out"
            );
            let other = if b == 8 { 16 } else { 8 };
            assert_eq!(run(&xb, input(other)), None, "an input in nChw{other}c");
        }
    }

    /// An input handed over in the blocked layout to a convolution that runs on the crate's
    /// own kernels (or another layout) is made NCHW first: the values of the NCHW call.
    #[test]
    fn a_blocked_input_for_the_crate_kernels_is_made_nchw_first() {
        // One image of 16x16 into 64 filters (18.9 MFLOP: the crate's kernels on AVX2), of
        // 4x4 elsewhere (16 output pixels: the crate's kernels on other CPUs).
        let hw = match Isa::detect() {
            Some(Isa::Avx2) => (16, 16),
            _ => (4, 4),
        };
        let (s, g) = same(1, 64, hw, 64, 3);
        assert_eq!(OneDnnRoute::forward(&s, Isa::detect()), OneDnnRoute::Own);
        let pixels = hw.0 * hw.1;
        let x = values(64 * pixels, 10);
        let k = Tensor::from_vec(values(64 * 64 * 9, 11), (64, 64, 3, 3), &Device::Cpu).unwrap();
        let nchw = Tensor::from_vec(x.clone(), (1, 64, hw.0, hw.1), &Device::Cpu).unwrap();
        let want = crate::ops::conv2d(&nchw, &k, g).unwrap();
        for b in [8, 16] {
            let blocked = block(&x, [1, 64, pixels], b);
            let xb = Tensor::from_vec(blocked, (1, 64 / b, hw.0, hw.1, b), &Device::Cpu);
            let got = conv2d_handoff(&xb.unwrap(), &k, (None, false), None, g, true).unwrap();
            assert_eq!(got.dims(), want.dims(), "nChw{b}c in: NCHW out");
            let (got, want) = (got.flatten_all().unwrap(), want.flatten_all().unwrap());
            assert_eq!(
                got.to_vec1::<f32>().unwrap(),
                want.to_vec1::<f32>().unwrap()
            );
        }
    }

    /// A batch norm on operands in the blocked layout (`onednn::affine_blocked`) gives, in
    /// that layout, what the map gives each channel of the NCHW sum: one operand and two (a
    /// folded Add), each ReLU, blocks of 8 and 16 (vector lanes) and of 4 (the plain loop).
    #[test]
    fn a_batch_norm_in_the_blocked_layout_maps_each_channel() {
        let (n, c, hw) = (3, 32, 10);
        let (x, y) = (values(n * c * hw, 12), values(n * c * hw, 13));
        for (relu_before, relu_after) in [(false, false), (true, false), (false, true)] {
            let affine = ChannelAffine {
                scale: (0..c).map(|f| 0.5 - f as f64 / 16.0).collect(),
                shift: (0..c).map(|f| f as f64 / 32.0 - 0.5).collect(),
                relu_after,
            };
            for two in [false, true] {
                // The NCHW values, channel by channel.
                let want: Vec<f32> = (0..n * c * hw)
                    .map(|i| {
                        let ch = (i / hw) % c;
                        let mut v = if two { x[i] + y[i] } else { x[i] };
                        if relu_before && v < 0.0 {
                            v = 0.0;
                        }
                        let z = v * affine.scale[ch] as f32 + affine.shift[ch] as f32;
                        if relu_after && z < 0.0 { 0.0 } else { z }
                    })
                    .collect();
                for b in [4, 8, 16] {
                    let (xb, yb) = (block(&x, [n, c, hw], b), block(&y, [n, c, hw], b));
                    let operands: Vec<&[f32]> = match two {
                        true => vec![&xb, &yb],
                        false => vec![&xb],
                    };
                    let got = onednn::affine_blocked(
                        &operands,
                        (&affine, relu_before),
                        [n, c / b, hw, b],
                    )
                    .unwrap();
                    let what = format!("b={b}, two={two}, relus={relu_before},{relu_after}");
                    assert_eq!(got, block(&want, [n, c, hw], b), "{what}");
                }
            }
        }
    }
}

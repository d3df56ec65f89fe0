//! The crate's own CPU kernels (f32 and f64, contiguous tensors): the GEMM convolution, fused
//! batch normalization and the per-channel bias add, each a candle custom op with its own
//! backward pass. Arguments are checked by [`crate::ops`] before they get here.
//!
//! Composed from candle's ops, per-channel work on an NCHW tensor reduces over axes (0, 2, 3)
//! with candle's strided reductions, which were the largest cost of a training step here; these
//! kernels walk each channel's contiguous rows instead, in parallel with rayon.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout};
use rayon::prelude::*;

pub(crate) mod batch_norm;
pub(crate) mod bias;
pub(crate) mod conv2d;
mod conv_channels;
mod conv_panels;
mod conv_tiles;
pub(crate) mod finite;
pub(crate) mod optimizer;
pub(crate) mod pooling;
pub(crate) mod relu;

/// The elements of a contiguous CPU tensor, or an error naming the kernel.
pub(crate) fn contiguous_slice<'a, T>(
    data: &'a [T],
    layout: &Layout,
    kernel: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{kernel}: contiguous tensors expected"),
    }
}

/// Runs `$body` with `$a`, `$b` bound to the slices of two CPU storages of the same float
/// type (f32 or f64); the body returns a `Vec` of that type.
macro_rules! dispatch_pair {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $name:literal, |$a:ident, $b:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let $a = crate::ops::cpu::contiguous_slice(a, $l1, $name)?;
                let $b = crate::ops::cpu::contiguous_slice(b, $l2, $name)?;
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let $a = crate::ops::cpu::contiguous_slice(a, $l1, $name)?;
                let $b = crate::ops::cpu::contiguous_slice(b, $l2, $name)?;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!(concat!($name, ": f32 or f64 tensors of one dtype expected")),
        }
    };
}
pub(crate) use dispatch_pair;

/// Runs `$body` with `$v` bound to the data of an f32 or f64 storage; the body returns a `Vec`
/// of that type.
macro_rules! float_dispatch {
    ($s:expr, $name:literal, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => CpuStorage::F32($body),
            CpuStorage::F64($v) => CpuStorage::F64($body),
            _ => candle_core::bail!(concat!($name, ": f32 or f64 expected")),
        }
    };
}
pub(crate) use float_dispatch;

/// A kernel's output, not zero-filled first: with an allocator that reuses freed blocks (the
/// examples' mimalloc), `vec![0.0; n]` is a pass over memory that the kernel's own writes
/// then repeat. Zeroing the batch norm's outputs was 4% of the shrunken PlainNet's inference
/// at batch 128 (`perf record`, onednn build), zeroing the convolutions' outputs 2.3% of the
/// shrunken ResNet's training step.
pub(crate) struct OutputBuffer<T> {
    elements: Vec<T>,
    len: usize,
}

impl<T> OutputBuffer<T> {
    /// Room for `len` elements; an error naming `kernel`, not an abort, when the memory cannot
    /// be had.
    pub(crate) fn new(len: usize, kernel: &str) -> candle_core::Result<Self> {
        let mut elements = Vec::new();
        elements.try_reserve_exact(len).map_err(|e| {
            candle_core::Error::Msg(format!("{kernel}: room for {len} outputs: {e}"))
        })?;
        Ok(Self { elements, len })
    }

    /// The `len` elements, not yet written.
    pub(crate) fn uninit(&mut self) -> &mut [MaybeUninit<T>] {
        &mut self.elements.spare_capacity_mut()[..self.len]
    }

    /// The elements.
    ///
    /// # Safety
    /// Every element of [`uninit`](Self::uninit) has been written.
    pub(crate) unsafe fn written(mut self) -> Vec<T> {
        // SAFETY: the caller's promise, for the `len` elements `new` reserved.
        unsafe { self.elements.set_len(self.len) };
        self.elements
    }
}

/// `len` elements, written in parallel by `fill(i, chunk)` for each `i`-th chunk of `chunk`
/// elements (the last one may be shorter).
///
/// # Safety
/// `fill` writes every element of the chunk it is given.
pub(crate) unsafe fn par_fill<T: Send>(
    len: usize,
    chunk: usize,
    kernel: &str,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send,
) -> candle_core::Result<Vec<T>> {
    let mut out = OutputBuffer::new(len, kernel)?;
    out.uninit()
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    // SAFETY: the caller's promise that `fill` wrote every chunk in full.
    Ok(unsafe { out.written() })
}

/// `(n, c, inner)` of a contiguous `(N, C, …)` layout.
pub(crate) fn split(dims: &[usize]) -> (usize, usize, usize) {
    (dims[0], dims[1], dims[2..].iter().product())
}

/// The elements of a contiguous per-channel kernel argument.
pub(crate) fn slice<'a, T>(data: &'a [T], layout: &Layout) -> candle_core::Result<&'a [T]> {
    contiguous_slice(data, layout, "per-channel kernel")
}

/// An f32 or f64 storage's values as f64 (per-channel vectors: statistics, scale, bias).
pub(crate) fn to_vec_f64(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f64>> {
    Ok(match s {
        CpuStorage::F32(v) => slice(v, l)?.iter().map(|&x| x as f64).collect(),
        CpuStorage::F64(v) => slice(v, l)?.to_vec(),
        _ => candle_core::bail!("per-channel kernel: f32 or f64 expected"),
    })
}

/// `max(v, 0)` where `relu`, else `v`: the ReLU that the batch-norm and convolution kernels
/// apply inside their own passes. NaN stays NaN, as in [`crate::ops::relu`].
#[inline(always)]
pub(crate) fn relu_if(v: f64, relu: bool) -> f64 {
    if relu && v < 0.0 { 0.0 } else { v }
}

/// Float types of the per-channel kernels: element-wise work in the tensor's own type, sums
/// accumulated in f64 ([`LaneSums`]).
pub(crate) trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + 'static
{
    const ZERO: Self;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;

    /// `max(self, 0)` where `relu`, else `self`; NaN stays NaN, as in [`relu_if`]. Written
    /// as a comparison and a select, which vectorizes.
    #[inline(always)]
    fn relu_if(self, relu: bool) -> Self {
        if relu && self < Self::ZERO {
            Self::ZERO
        } else {
            self
        }
    }
}
impl Float for f32 {
    const ZERO: Self = 0.0;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}
impl Float for f64 {
    const ZERO: Self = 0.0;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// Independent accumulators per sum in [`LaneSums`]: one accumulator serializes every add
/// on the adder's latency (the per-channel sums ran one element per 4 cycles that way); 16
/// fill vector registers and let the adds overlap.
const LANES: usize = 16;

/// Elements [`LaneSums`] adds in the tensor's own type before their sums join the f64
/// totals: at most 64 terms per f32 lane, so the f32 partial sums lose no more than a few
/// ulps of what they add, however many elements come.
const BLOCK: usize = 1024;

/// Two running sums over rows of elements: the terms computed and added in the elements' own
/// type `T`, in [`LANES`] accumulators each, folded into f64 every [`BLOCK`] elements. Rows
/// may be short (16 elements at 4×4): the lanes carry on across rows, so a row costs no
/// reduction of its own. The order of the adds depends only on the rows' lengths, so results
/// are reproducible.
pub(crate) struct LaneSums<T> {
    lanes: ([T; LANES], [T; LANES]),
    pending: usize,
    totals: (f64, f64),
}

impl<T: Float> LaneSums<T> {
    pub(crate) fn new() -> Self {
        Self {
            lanes: ([T::ZERO; LANES], [T::ZERO; LANES]),
            pending: 0,
            totals: (0.0, 0.0),
        }
    }

    /// Adds `f(a[i], b[i])` for every `i` of two rows of one length.
    #[inline(always)]
    pub(crate) fn add(&mut self, a: &[T], b: &[T], f: impl Fn(T, T) -> (T, T)) {
        let len = a.len().min(b.len());
        let mut start = 0;
        while start < len {
            // Up to the end of the block, whole lanes only while the block goes on.
            let room = BLOCK - self.pending;
            let end = len.min(start + room);
            let (lanes_a, rest_a) = a[start..end].as_chunks::<LANES>();
            let (lanes_b, rest_b) = b[start..end].as_chunks::<LANES>();
            for (xa, xb) in lanes_a.iter().zip(lanes_b) {
                for l in 0..LANES {
                    let (u, v) = f(xa[l], xb[l]);
                    self.lanes.0[l] = self.lanes.0[l] + u;
                    self.lanes.1[l] = self.lanes.1[l] + v;
                }
            }
            for (l, (&xa, &xb)) in rest_a.iter().zip(rest_b).enumerate() {
                let (u, v) = f(xa, xb);
                self.lanes.0[l] = self.lanes.0[l] + u;
                self.lanes.1[l] = self.lanes.1[l] + v;
            }
            // A remainder counts as a whole row of lanes: a lane gets at most one term more.
            self.pending += (end - start).next_multiple_of(LANES);
            if self.pending >= BLOCK {
                self.flush();
            }
            start = end;
        }
    }

    fn flush(&mut self) {
        self.totals.0 += self.lanes.0.iter().map(|v| v.to_f64()).sum::<f64>();
        self.totals.1 += self.lanes.1.iter().map(|v| v.to_f64()).sum::<f64>();
        self.lanes = ([T::ZERO; LANES], [T::ZERO; LANES]);
        self.pending = 0;
    }

    /// The two sums.
    pub(crate) fn totals(mut self) -> (f64, f64) {
        self.flush();
        self.totals
    }
}

/// Per channel `Σ a`, over all rows of `c`.
pub(crate) fn channel_sums<T: Float>(a: &[T], (n, c, inner): (usize, usize, usize)) -> Vec<f64> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut sums = LaneSums::new();
            for i in 0..n {
                let row = &a[(i * c + ch) * inner..][..inner];
                sums.add(row, row, |v, _| (v, T::ZERO));
            }
            sums.totals().0
        })
        .collect()
}

/// `out = f(channel, x)` for every element `x`, in parallel over images.
pub(crate) fn map_rows<T: Float>(
    src: &[T],
    (_, c, inner): (usize, usize, usize),
    f: impl Fn(usize, T) -> T + Sync + Send,
) -> candle_core::Result<Vec<T>> {
    // SAFETY: the rows tile each image, and every element of each is written.
    unsafe {
        par_fill(src.len(), c * inner, "per-channel kernel", |i, img| {
            for (ch, dst) in img.chunks_mut(inner.max(1)).enumerate() {
                let row = &src[(i * c + ch) * inner..][..inner];
                for (d, &v) in dst.iter_mut().zip(row) {
                    d.write(f(ch, v));
                }
            }
        })
    }
}

//! oneDNN's convolution kernels for f32 CPU tensors (feature `onednn`): forward (with the
//! bias and a ReLU fused), backward-data and backward-weights.
//!
//! These are the kernels PyTorch and TensorFlow run on x86 CPUs: direct JIT convolutions in a
//! blocked channel layout (nChw16c on AVX-512, nChw8c on AVX2), the instruction set chosen by
//! oneDNN at run time. The crate's tensors stay NCHW; each call reorders its inputs into the
//! blocked layouts the primitive picked, runs it and reorders the outputs back, as PyTorch's
//! CPU convolution does. The GEMM path of `cpu/conv2d.rs` calls in here for f32 and keeps f64,
//! any shape oneDNN reports it does not implement, and the forward convolutions its own
//! kernels measured faster on; it also decides which small problems run on the calling thread
//! alone (`Threads`; its `OneDnnRoute` says why).
//!
//! A primitive is created once per shape and thread count (creating one JIT-compiles its
//! kernel, a millisecond or more) and kept in a process-wide cache; the C shim (`shim.c`)
//! hides the difference between oneDNN 2.x's and 3.x's C API. [`version`] and
//! [`cached_primitives`] say which library this process runs and how many shapes it has
//! compiled.
//!
//! Start a binary that uses the feature with `OMP_WAIT_POLICY=passive`: Debian's oneDNN runs
//! on OpenMP (libgomp), whose idle threads otherwise spin for milliseconds after every
//! convolution on the cores the crate's other kernels (rayon) need next: on 2 cores, spinning
//! (`active`), a training step of the full ResNet took 33% longer than with `passive`, the
//! shrunken one's 63% (docs/PERFORMANCE.md).
//! libgomp reads the variable only when the process starts; the examples restart themselves
//! with it (`examples/common/openmp.rs`).
//!
//! # Examples
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_functional::ops::{self, Conv2dGeometry};
//! let (major, _minor, _patch) = ops::onednn::version();
//! assert!(major >= 2);
//! // 4 images of 8x8 (256 output pixels): oneDNN runs it on every CPU, on AVX2 ones with the
//! // calling thread alone, as the problem is small.
//! let x = Tensor::ones((4, 3, 8, 8), candle_core::DType::F32, &Device::Cpu)?;
//! let k = Tensor::ones((4, 3, 3, 3), candle_core::DType::F32, &Device::Cpu)?;
//! let g = Conv2dGeometry { pad: (1, 1, 1, 1), stride: 1, dilation: 1, groups: 1 };
//! let y = ops::conv2d(&x, &k, g)?; // runs on oneDNN
//! assert_eq!(y.dims(), &[4, 4, 8, 8]);
//! assert!(ops::onednn::cached_primitives() >= 1);
//! # Ok::<(), candle_functional::Error>(())
//! ```

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;

use crate::ops::ChannelAffine;
use crate::ops::cpu::OutputBuffer;

/// The shim's `cf_op`: one primitive with its reorders.
#[repr(C)]
struct RawOp {
    _private: [u8; 0],
}

/// oneDNN's `dnnl_engine_t`.
#[repr(C)]
struct RawEngine {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn cf_engine_create(engine: *mut *mut RawEngine) -> c_int;
    fn cf_version(major: *mut c_int, minor: *mut c_int, patch: *mut c_int) -> c_int;
    fn cf_conv_create(
        out: *mut *mut RawOp,
        engine: *mut RawEngine,
        kind: c_int,
        sizes: *const i64,
        bias: c_int,
        relu: c_int,
        threads: c_int,
        failed_step: *mut *const c_char,
    ) -> c_int;
    fn cf_op_workspace_bytes(op: *const RawOp) -> usize;
    fn cf_op_execute(
        op: *mut RawOp,
        buffers: *const *mut c_void,
        count: c_int,
        workspace: *mut c_void,
        failed_step: *mut *const c_char,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn cf_conv_backward(
        data: *mut RawOp,
        weights: *mut RawOp,
        x: *const c_void,
        dy: *const c_void,
        w: *const c_void,
        dx: *mut c_void,
        dw: *mut c_void,
        workspace: *mut c_void,
        failed_step: *mut *const c_char,
    ) -> c_int;
    fn cf_op_destroy(op: *mut RawOp);
}

/// oneDNN's `dnnl_invalid_arguments` and `dnnl_unimplemented` when creating a primitive: a
/// shape outside what oneDNN takes (a stride of 2^62, say) or has a kernel for. The GEMM path
/// runs those, as it runs everything without the feature.
const REFUSED: [c_int; 2] = [2, 3];

/// Which primitive: the shim's `CF_FORWARD`, `CF_BACKWARD_DATA`, `CF_BACKWARD_WEIGHTS`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Pass {
    Forward = 0,
    BackwardData = 1,
    BackwardWeights = 2,
}

/// How many threads a primitive runs on: OpenMP's (the library's default), or only the
/// calling thread, for problems so small that waking OpenMP's threads costs more than they
/// save (the caller decides: `cpu/conv2d.rs`). Where oneDNN does not run on OpenMP the limit
/// is not applied.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Threads {
    /// As many as OpenMP's limit allows (`OMP_NUM_THREADS`, else the cores).
    All = 0,
    /// The calling thread alone.
    One = 1,
}

/// The sizes of one convolution in the shim's order: `n, c, h, w, o, kh, kw, oh, ow, groups,
/// stride, dilation, pad top, bottom, left, right`.
pub(crate) type ConvSizes = [i64; 16];

/// A cached primitive; the shim's op is not safe to run on two threads at once.
struct Op(*mut RawOp);

// SAFETY: the op is only ever used behind a `Mutex`, one thread at a time, and oneDNN
// primitives may be executed from any thread.
unsafe impl Send for Op {}

impl Drop for Op {
    fn drop(&mut self) {
        // SAFETY: created by `cf_conv_create`, destroyed once.
        unsafe { cf_op_destroy(self.0) }
    }
}

struct Engine(*mut RawEngine);
// SAFETY: a oneDNN CPU engine is immutable after creation and shared by all primitives.
unsafe impl Send for Engine {}
unsafe impl Sync for Engine {}

/// A cache entry: the primitive, or `None` where oneDNN has no kernel for the shape.
type Entry = Option<Arc<Mutex<Op>>>;

/// What a primitive is created for: the pass, the sizes, with a bias, with a ReLU, on how
/// many threads.
type Key = (Pass, ConvSizes, bool, bool, Threads);

/// The primitives created so far.
fn cache() -> &'static Mutex<HashMap<Key, Entry>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Entry>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn failure(what: &str, status: c_int, step: *const c_char) -> candle_core::Error {
    let step = match step.is_null() {
        true => "?".into(),
        // SAFETY: the shim only ever points `failed_step` at its static string literals.
        false => unsafe { CStr::from_ptr(step) }.to_string_lossy(),
    };
    candle_core::Error::Msg(format!(
        "oneDNN {what}: {step} failed (dnnl_status_t {status})"
    ))
}

fn engine() -> candle_core::Result<&'static Engine> {
    static ENGINE: OnceLock<Result<Engine, c_int>> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| {
        let mut e = std::ptr::null_mut();
        // SAFETY: writes one engine handle into `e`.
        match unsafe { cf_engine_create(&mut e) } {
            0 => Ok(Engine(e)),
            status => Err(status),
        }
    });
    engine
        .as_ref()
        .map_err(|&status| failure("engine", status, c"creating the CPU engine".as_ptr()))
}

/// The primitive for `(pass, sizes, bias, relu, threads)`, created on first use; `None` when
/// oneDNN has no kernel for it.
fn primitive(
    pass: Pass,
    sizes: &ConvSizes,
    (bias, relu): (bool, bool),
    threads: Threads,
) -> candle_core::Result<Entry> {
    let key = (pass, *sizes, bias, relu, threads);
    // Poisoning only means another thread panicked while holding the map; its entries are
    // still whole (insertions are single calls).
    let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(entry) = cache.get(&key) {
        return Ok(entry.clone());
    }
    let engine = engine()?;
    let (mut op, mut step) = (std::ptr::null_mut(), std::ptr::null());
    // SAFETY: `sizes` holds the 16 values the shim reads; on success `op` is a new op, on
    // failure nothing is allocated.
    let status = unsafe {
        cf_conv_create(
            &mut op,
            engine.0,
            pass as c_int,
            sizes.as_ptr(),
            bias as c_int,
            relu as c_int,
            threads as c_int,
            &mut step,
        )
    };
    let entry = match status {
        0 => Some(Arc::new(Mutex::new(Op(op)))),
        s if REFUSED.contains(&s) => None,
        _ => return Err(failure("convolution", status, step)),
    };
    cache.insert(key, entry.clone());
    Ok(entry)
}

/// One cache line: the unit of the workspace, so that its start is 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

thread_local! {
    /// This thread's workspace for the blocked copies, grown to the largest call so far and
    /// reused: the same reason as the GEMM path's im2col buffer.
    static WORKSPACE: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a 64-byte aligned workspace of at least `bytes` bytes; an error, not an
/// abort, when the memory cannot be had (the blocked layouts pad channels to 16, so a
/// one-channel map needs 16 times its own size).
fn with_workspace<R>(bytes: usize, f: impl FnOnce(*mut c_void) -> R) -> candle_core::Result<R> {
    let lines = bytes.div_ceil(64);
    let grow = |ws: &mut Vec<Line>| -> candle_core::Result<()> {
        if ws.len() < lines {
            ws.try_reserve_exact(lines - ws.len()).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "oneDNN convolution: no memory for a {bytes}-byte workspace of blocked copies ({e})"
                ))
            })?;
            ws.resize(lines, Line([0; 64]));
        }
        Ok(())
    };
    WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut ws) => {
            grow(&mut ws)?;
            Ok(f(ws.as_mut_ptr().cast()))
        }
        // Re-entered on this thread (the kernels never do; stay correct anyway).
        Err(_) => {
            let mut ws = Vec::new();
            grow(&mut ws)?;
            Ok(f(ws.as_mut_ptr().cast()))
        }
    })
}

fn locked(op: &Mutex<Op>) -> std::sync::MutexGuard<'_, Op> {
    op.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `pass` on the caller's buffers (the inputs, then `outputs`, in the shim's order);
/// `Ok(false)` when oneDNN has no kernel for the shape and nothing was written.
fn run(
    pass: Pass,
    (sizes, threads): (&ConvSizes, Threads),
    fused: (bool, bool),
    inputs: &[&[f32]],
    outputs: &mut [&mut [MaybeUninit<f32>]],
) -> candle_core::Result<bool> {
    let Some(op) = primitive(pass, sizes, fused, threads)? else {
        return Ok(false);
    };
    let mut buffers: Vec<*mut c_void> = inputs.iter().map(|b| b.as_ptr() as *mut c_void).collect();
    buffers.extend(outputs.iter_mut().map(|b| b.as_mut_ptr() as *mut c_void));
    let op = locked(&op);
    let mut step = std::ptr::null();
    // SAFETY: the buffers have the sizes the op was created for (checked by the callers
    // against the same `ConvSizes`), inputs are only read, each output is a distinct `&mut`
    // slice (written, never read), and the workspace has the bytes the op asks for.
    let status = unsafe {
        with_workspace(cf_op_workspace_bytes(op.0), |ws| {
            cf_op_execute(
                op.0,
                buffers.as_ptr(),
                buffers.len() as c_int,
                ws,
                &mut step,
            )
        })?
    };
    match status {
        0 => Ok(true),
        _ => Err(failure("convolution", status, step)),
    }
}

/// `max(conv(x, k) + bias, 0)` (the ReLU with `relu`, the bias where given) on `threads`,
/// then with `affine` per filter `scale · y + shift` and its ReLU (a batch norm in
/// inference, folded into this convolution); `None` when oneDNN has no kernel for the shape.
///
/// The map is not one of oneDNN's post-ops: its per-channel multiply and add (binary
/// post-ops) made the 3x3 convolutions 15-30% slower on an AVX-512 Xeon with oneDNN 2.6 (the
/// shrunken PlainNet's inference, `ONEDNN_VERBOSE`), more than the batch norm's own pass had
/// cost. Where no ReLU comes between and the output outweighs the kernel (`n·oh·ow ≥ 8·c·kh·kw`
/// per filter), it goes into the weights, `scale · (W·x + b) + shift = (scale·W)·x + (scale·b +
/// shift)`, rounded once from f64 (the values differ from the two layers' by rounding); else
/// it is one pass over the fresh output, in place, in f32 as the batch norm's kernel computes
/// it (the same values).
pub(crate) fn forward(
    x: &[f32],
    k: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    affine: Option<&ChannelAffine>,
    sizes: (&ConvSizes, Threads),
) -> candle_core::Result<Option<Vec<f32>>> {
    let Some(affine) = affine else {
        return forward_plain(x, k, bias, relu, sizes);
    };
    let [n, _, _, _, o, _, _, oh, ow, ..] = sizes.0.map(|v| v.max(0) as usize);
    if [affine.scale.len(), affine.shift.len()] != [o; 2] || !k.len().is_multiple_of(o.max(1)) {
        candle_core::bail!(
            "oneDNN convolution: {} scales, {} shifts and {} kernel values for {o} filters",
            affine.scale.len(),
            affine.shift.len(),
            k.len()
        );
    }
    let per_filter = k.len() / o.max(1);
    let finite = affine.scale.iter().all(|s| s.is_finite());
    if !relu && finite && n * oh * ow >= 8 * per_filter {
        let k: Vec<f32> = k
            .chunks(per_filter.max(1))
            .zip(&affine.scale)
            .flat_map(|(w, &s)| w.iter().map(move |&w| (f64::from(w) * s) as f32))
            .collect();
        let b: Vec<f32> = (0..o)
            .map(|f| {
                let b = bias.map_or(0.0, |b| f64::from(b[f]));
                (b * affine.scale[f] + affine.shift[f]) as f32
            })
            .collect();
        return forward_plain(x, &k, Some(&b), affine.relu_after, sizes);
    }
    let Some(mut y) = forward_plain(x, k, bias, relu, sizes)? else {
        return Ok(None);
    };
    let hw = oh * ow;
    y.par_chunks_mut((o * hw).max(1)).for_each(|image| {
        for (f, row) in image.chunks_mut(hw.max(1)).enumerate() {
            let (a, c) = (affine.scale[f] as f32, affine.shift[f] as f32);
            for v in row {
                let z = *v * a + c;
                // NaN stays NaN, as in the batch norm's kernel.
                *v = if affine.relu_after && z < 0.0 { 0.0 } else { z };
            }
        }
    });
    Ok(Some(y))
}

/// `max(conv(x, k) + bias, 0)` (the ReLU with `relu`, the bias where given): the primitive
/// alone; `None` when oneDNN has no kernel for the shape.
fn forward_plain(
    x: &[f32],
    k: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    sizes: (&ConvSizes, Threads),
) -> candle_core::Result<Option<Vec<f32>>> {
    let [n, _, _, _, o, _, _, oh, ow, ..] = *sizes.0;
    let mut y = output([n, o, oh, ow])?;
    let done = match bias {
        Some(b) => run(
            Pass::Forward,
            sizes,
            (true, relu),
            &[x, k, b],
            &mut [y.uninit()],
        ),
        None => run(
            Pass::Forward,
            sizes,
            (false, relu),
            &[x, k],
            &mut [y.uninit()],
        ),
    }?;
    // SAFETY: the primitive ran, and a convolution writes every element of its output.
    Ok(done.then(|| unsafe { y.written() }))
}

/// Both gradients from `(X, dY, W)`, `(dX, dW)` on `threads`, with `dY` reordered once for
/// the two; `None` when oneDNN has no kernel for one of them.
pub(crate) fn backward(
    (x, dy, k): (&[f32], &[f32], &[f32]),
    (sizes, threads): (&ConvSizes, Threads),
) -> candle_core::Result<Option<(Vec<f32>, Vec<f32>)>> {
    let data = primitive(Pass::BackwardData, sizes, (false, false), threads)?;
    let weights = primitive(Pass::BackwardWeights, sizes, (false, false), threads)?;
    let (Some(data), Some(weights)) = (data, weights) else {
        return Ok(None);
    };
    let [n, c, h, w, o, kh, kw, _, _, groups, ..] = *sizes;
    let mut dx = output([n, c, h, w])?;
    let mut dk = output([o, c / groups.max(1), kh, kw])?;
    // Two locks, always taken data first: no other call holds a weights op while waiting
    // for a data op.
    let (data, weights) = (locked(&data), locked(&weights));
    let mut step = std::ptr::null();
    // SAFETY: as in `run`; the workspace holds both ops' blocked buffers.
    let status = unsafe {
        let bytes = cf_op_workspace_bytes(data.0) + cf_op_workspace_bytes(weights.0);
        with_workspace(bytes, |ws| {
            cf_conv_backward(
                data.0,
                weights.0,
                x.as_ptr().cast(),
                dy.as_ptr().cast(),
                k.as_ptr().cast(),
                dx.uninit().as_mut_ptr().cast(),
                dk.uninit().as_mut_ptr().cast(),
                ws,
                &mut step,
            )
        })?
    };
    match status {
        // SAFETY: both primitives ran; each writes every element of its gradient.
        0 => Ok(Some(unsafe { (dx.written(), dk.written()) })),
        _ => Err(failure("convolution backward", status, step)),
    }
}

/// Room for a primitive to write the elements of a tensor of these dims (oneDNN's sizes,
/// each at most `i32::MAX`), not zero-filled first; an error, not an abort or a wrapped
/// size, when their product overflows or the memory cannot be had.
fn output(dims: [i64; 4]) -> candle_core::Result<OutputBuffer<f32>> {
    let len = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
        .ok_or_else(|| {
            candle_core::Error::Msg(format!("oneDNN convolution: {dims:?} outputs overflow"))
        })?;
    OutputBuffer::new(len, "oneDNN convolution")
}

/// The version of the oneDNN library this process runs (`(major, minor, patch)`), which may
/// be newer than the headers it was built against.
///
/// # Examples
/// ```
/// let (major, minor, _) = candle_functional::ops::onednn::version();
/// assert!((major, minor) >= (2, 0));
/// ```
pub fn version() -> (u32, u32, u32) {
    let (mut major, mut minor, mut patch) = (0, 0, 0);
    // SAFETY: writes three integers.
    unsafe { cf_version(&mut major, &mut minor, &mut patch) };
    (major as u32, minor as u32, patch as u32)
}

/// OpenMP's thread limit on the calling thread now, or -1 where the shim applies none: an
/// op limited to one thread must leave it as it found it.
#[cfg(test)]
pub(crate) fn openmp_limit() -> i32 {
    unsafe extern "C" {
        fn cf_threads_current() -> c_int;
    }
    engine().expect("oneDNN's CPU engine");
    // SAFETY: reads one integer.
    unsafe { cf_threads_current() }
}

/// Whether a forward primitive for `(sizes, threads)` (with or without bias and ReLU) has
/// been created: which route a convolution took.
#[cfg(test)]
pub(crate) fn forward_cached(sizes: &ConvSizes, threads: Threads) -> bool {
    let cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    cache
        .keys()
        .any(|&(pass, s, _, _, t)| pass == Pass::Forward && s == *sizes && t == threads)
}

/// How many convolution primitives (forward, backward-data and backward-weights, each for
/// one shape) this process has created so far: each is JIT-compiled once and reused.
///
/// # Examples
/// ```
/// // Nothing has run a convolution yet in this doctest's process.
/// assert_eq!(candle_functional::ops::onednn::cached_primitives(), 0);
/// ```
pub fn cached_primitives() -> usize {
    let cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    cache.values().filter(|e| e.is_some()).count()
}

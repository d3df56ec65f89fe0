//! oneDNN's convolution kernels for f32 CPU tensors (feature `onednn`): forward (with the
//! bias and a ReLU fused), backward-data and backward-weights.
//!
//! These are the kernels PyTorch and TensorFlow run on x86 CPUs: direct JIT convolutions in a
//! blocked channel layout (nChw16c on AVX-512, nChw8c on AVX2), the instruction set chosen by
//! oneDNN at run time. The crate's tensors stay NCHW; each call reorders its inputs into the
//! blocked layouts the primitive picked, runs it and reorders the outputs back, as PyTorch's
//! CPU convolution does. In inference a layer's output can stay blocked for the next layers
//! (`Handoff`, a rank-5 tensor; `models/inference.rs`), with a batch norm of its own for
//! that layout (`affine_blocked`). The GEMM path of `cpu/conv2d.rs` calls in here for f32 and keeps f64,
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

use candle_core::{CpuStorage, Layout, Storage, Tensor};

use crate::ops::ChannelAffine;
use crate::ops::cpu::{OutputBuffer, contiguous_slice};

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
    fn cf_op_arg_block(op: *const RawOp, index: c_int) -> c_int;
    fn cf_op_execute_blocked(
        op: *mut RawOp,
        buffers: *const *mut c_void,
        count: c_int,
        given: c_int,
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

/// Runs `op` on the caller's buffers (the inputs, then `outputs`, in the shim's order), each
/// argument in the bit mask `given` in the op's own blocked layout (`cf_op_arg_block`).
fn run(
    op: &Mutex<Op>,
    inputs: &[&[f32]],
    outputs: &mut [&mut [MaybeUninit<f32>]],
    given: c_int,
) -> candle_core::Result<()> {
    let mut buffers: Vec<*mut c_void> = inputs.iter().map(|b| b.as_ptr() as *mut c_void).collect();
    buffers.extend(outputs.iter_mut().map(|b| b.as_mut_ptr() as *mut c_void));
    let op = locked(op);
    let mut step = std::ptr::null();
    // SAFETY: the buffers have the sizes the op was created for (checked by the callers
    // against the same `ConvSizes`; a blocked one is as large as its plain twin, since its
    // channels are a multiple of the block), inputs are only read, each output is a distinct
    // `&mut` slice (written, never read), and the workspace has the bytes the op asks for.
    let status = unsafe {
        with_workspace(cf_op_workspace_bytes(op.0), |ws| {
            cf_op_execute_blocked(
                op.0,
                buffers.as_ptr(),
                buffers.len() as c_int,
                given,
                ws,
                &mut step,
            )
        })?
    };
    match status {
        0 => Ok(()),
        _ => Err(failure("convolution", status, step)),
    }
}

/// Where a forward call's input comes from and its output goes: oneDNN's blocked layout
/// (nChw8c on AVX2, nChw16c on AVX-512) or the crate's NCHW. In inference a convolution
/// whose output only convolutions and batch norms read hands it over in the blocked
/// layout, and the reorders out of it and back into it are skipped
/// (`models/inference.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Handoff {
    /// The channel block of the input's layout (`[n, c/b, h, w, b]`), `None` for NCHW.
    pub(crate) input: Option<usize>,
    /// Leave the output in the primitive's blocked layout, where it uses one.
    pub(crate) blocked_output: bool,
}

/// A forward call's output: its values, and the channel block of their layout (`None` for
/// NCHW).
pub(crate) type Forwarded = (Vec<f32>, Option<usize>);

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
    handoff: Handoff,
) -> candle_core::Result<Option<Forwarded>> {
    let Some(affine) = affine else {
        return forward_plain(x, k, bias, relu, sizes, handoff);
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
        return forward_plain(x, &k, Some(&b), affine.relu_after, sizes, handoff);
    }
    let Some((mut y, block)) = forward_plain(x, k, bias, relu, sizes, handoff)? else {
        return Ok(None);
    };
    let map = |v: &mut f32, (a, c): (f32, f32)| {
        let z = *v * a + c;
        // NaN stays NaN, as in the batch norm's kernel.
        *v = if affine.relu_after && z < 0.0 { 0.0 } else { z };
    };
    let per_filter: Vec<(f32, f32)> = (0..o)
        .map(|f| (affine.scale[f] as f32, affine.shift[f] as f32))
        .collect();
    let hw = (oh * ow).max(1);
    match block {
        None => for_each_run(&mut y, o.max(1) * hw, |_, image| {
            for (row, &ac) in image.chunks_mut(hw).zip(&per_filter) {
                row.iter_mut().for_each(|v| map(v, ac));
            }
        }),
        // `[n, o/b, oh·ow, b]`: a run of `oh·ow·b` values holds filters `cb·b..(cb + 1)·b`.
        Some(b) => for_each_run(&mut y, hw * b, |i, run| {
            let filters = &per_filter[(i % (o / b).max(1)) * b..][..b];
            for pixel in run.chunks_mut(b) {
                pixel
                    .iter_mut()
                    .zip(filters)
                    .for_each(|(v, &ac)| map(v, ac));
            }
        }),
    }
    Ok(Some((y, block)))
}

/// `max(conv(x, k) + bias, 0)` (the ReLU with `relu`, the bias where given): the primitive
/// alone, `x` and the output in the layouts `handoff` asks for where the primitive uses them;
/// `None` when oneDNN has no kernel for the shape, or the input is blocked in a layout the
/// primitive does not read (the caller passes it in NCHW then).
fn forward_plain(
    x: &[f32],
    k: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    (sizes, threads): (&ConvSizes, Threads),
    handoff: Handoff,
) -> candle_core::Result<Option<Forwarded>> {
    let Some(op) = primitive(Pass::Forward, sizes, (bias.is_some(), relu), threads)? else {
        return Ok(None);
    };
    let [n, c, _, _, o, _, _, oh, ow, ..] = *sizes;
    // The output is the last argument: x, w, [b], y.
    let out_index = 2 + c_int::from(bias.is_some());
    let (input_block, output_block) = {
        let op = locked(&op);
        // SAFETY: reads the op's layouts; the indices are within its arguments.
        unsafe { (cf_op_arg_block(op.0, 0), cf_op_arg_block(op.0, out_index)) }
    };
    let divides = |channels: i64, block: c_int| block > 0 && channels % i64::from(block) == 0;
    if let Some(b) = handoff.input
        && (input_block as usize != b || !divides(c, input_block))
    {
        return Ok(None);
    }
    let output = (handoff.blocked_output && divides(o, output_block)).then_some(output_block);
    let given = c_int::from(handoff.input.is_some()) | (c_int::from(output.is_some()) << out_index);
    let mut y = output_buffer([n, o, oh, ow])?;
    match bias {
        Some(b) => run(&op, &[x, k, b], &mut [y.uninit()], given),
        None => run(&op, &[x, k], &mut [y.uninit()], given),
    }?;
    // SAFETY: the primitive ran, and a convolution writes every element of its output.
    let y = unsafe { y.written() };
    Ok(Some((y, output.map(|b| b as usize))))
}

/// Below this many values a pass over a tensor runs on the calling thread: waking rayon's
/// threads costs more than they save on a batch-1 layer of the shrunken networks (a few
/// thousand values), where a pass spread over them made the inference 1.8 times slower.
const PARALLEL_FROM: usize = 1 << 16;

/// `f(i, run)` on each run `i` of `len` values of `out` (the last may be shorter): on rayon's
/// threads when `out` has [`PARALLEL_FROM`] values or more, else on the calling thread.
fn for_each_run<T: Send>(out: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    let len = len.max(1);
    match out.len() >= PARALLEL_FROM {
        true => out
            .par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, run)| f(i, run)),
        false => out
            .chunks_mut(len)
            .enumerate()
            .for_each(|(i, run)| f(i, run)),
    }
}

/// `x` in NCHW from oneDNN's blocked layout nChw{b}c, `[n, c/b, h·w, b]` as `dims`:
/// channels `cb·b..(cb + 1)·b` of an image are one contiguous run in both layouts, a
/// transpose of `h·w` by `b` values.
pub(crate) fn unblock(x: &[f32], [n, blocks, hw, b]: [usize; 4]) -> candle_core::Result<Vec<f32>> {
    let run = hw * b;
    if x.len() != n * blocks * run {
        candle_core::bail!(
            "oneDNN layout: {} values for {n} images of {blocks} blocks of {b} channels of {hw} pixels",
            x.len()
        );
    }
    let mut y = OutputBuffer::new(x.len(), "oneDNN layout")?;
    for_each_run(y.uninit(), run.max(1), |i, out| {
        let blocked = &x[i * run..][..out.len()];
        for (pixel, values) in blocked.chunks(b.max(1)).enumerate() {
            for (lane, &v) in values.iter().enumerate() {
                out[lane * hw + pixel].write(v);
            }
        }
    });
    // SAFETY: every chunk of the output was written whole, pixel by pixel and lane by lane.
    Ok(unsafe { y.written() })
}

/// A batch norm in inference on operands in oneDNN's blocked layout nChw{b}c (`[n, c/b, h·w,
/// b]` as `dims`): `affine` per channel of their sum, through a ReLU first with
/// `relu_before` (an Add and a ReLU folded into the batch norm, as after a residual block's
/// second convolution), in f32 as the batch norm's kernel computes it.
pub(crate) fn affine_blocked(
    operands: &[&[f32]],
    (affine, relu_before): (&ChannelAffine, bool),
    [n, blocks, hw, b]: [usize; 4],
) -> candle_core::Result<Vec<f32>> {
    let len = n * blocks * hw * b;
    let channels = blocks * b;
    if operands.is_empty()
        || operands.iter().any(|o| o.len() != len)
        || [affine.scale.len(), affine.shift.len()] != [channels; 2]
    {
        candle_core::bail!(
            "oneDNN layout: a batch norm of {} operands for {channels} channels of {len} values",
            operands.len()
        );
    }
    let scale: Vec<f32> = affine.scale.iter().map(|&v| v as f32).collect();
    let shift: Vec<f32> = affine.shift.iter().map(|&v| v as f32).collect();
    let relus = (relu_before, affine.relu_after);
    let run = (hw * b).max(1);
    let mut y = OutputBuffer::new(len, "oneDNN layout")?;
    for_each_run(y.uninit(), run, |i, out| {
        let at = i * run..(i + 1) * run;
        let first = (i % blocks.max(1)) * b;
        let maps = (&scale[first..][..b], &shift[first..][..b]);
        let x = &operands[0][at.clone()];
        let y = operands.get(1).map(|y| &y[at.clone()]);
        match (b, operands.len()) {
            (8, 1 | 2) => affine_run::<8>(out, (x, y), maps, relus),
            (16, 1 | 2) => affine_run::<16>(out, (x, y), maps, relus),
            _ => {
                for (k, slot) in out.iter_mut().enumerate() {
                    let lane = k % b;
                    let v: f32 = operands.iter().map(|o| o[at.start + k]).sum();
                    slot.write(affine_value(v, (maps.0[lane], maps.1[lane]), relus));
                }
            }
        }
    });
    // SAFETY: every chunk of the output was written whole.
    Ok(unsafe { y.written() })
}

/// `max?(scale · max?(v, 0) + shift)` (the ReLUs of `relu_before` and `relu_after`); NaN stays
/// NaN, as in the batch norm's kernel.
#[inline(always)]
fn affine_value(
    mut v: f32,
    (scale, shift): (f32, f32),
    (relu_before, relu_after): (bool, bool),
) -> f32 {
    if relu_before && v < 0.0 {
        v = 0.0;
    }
    let z = v * scale + shift;
    if relu_after && z < 0.0 { 0.0 } else { z }
}

/// [`affine_blocked`] on one run of pixels of one channel block of `B` lanes: the sum of one
/// or two operands (`x`, `y`), each lane with its channel's map. The lanes are fixed-size
/// arrays, which the compiler turns into vector instructions.
#[inline(always)]
fn affine_run<const B: usize>(
    out: &mut [MaybeUninit<f32>],
    (x, y): (&[f32], Option<&[f32]>),
    (scale, shift): (&[f32], &[f32]),
    relus: (bool, bool),
) {
    let scale: [f32; B] = std::array::from_fn(|l| scale[l]);
    let shift: [f32; B] = std::array::from_fn(|l| shift[l]);
    let (out, x) = (out.as_chunks_mut::<B>().0, x.as_chunks::<B>().0);
    match y {
        None => {
            for (out, x) in out.iter_mut().zip(x) {
                for l in 0..B {
                    out[l].write(affine_value(x[l], (scale[l], shift[l]), relus));
                }
            }
        }
        Some(y) => {
            for ((out, x), y) in out.iter_mut().zip(x).zip(y.as_chunks::<B>().0) {
                for l in 0..B {
                    out[l].write(affine_value(x[l] + y[l], (scale[l], shift[l]), relus));
                }
            }
        }
    }
}

/// The channels of `inputs` when they are all f32 CPU tensors in oneDNN's blocked layout,
/// of one rank-5 shape `[n, c/b, h, w, b]`, that ask for no gradient: what
/// [`batch_norm_blocked`] takes. `None` otherwise.
pub(crate) fn blocked_channels(inputs: &[Tensor]) -> Option<usize> {
    let &[n, blocks, h, w, b] = inputs.first()?.dims() else {
        return None;
    };
    let takes = |t: &Tensor| {
        t.dims() == [n, blocks, h, w, b]
            && t.dtype() == candle_core::DType::F32
            && t.device().is_cpu()
            && !t.track_op()
    };
    inputs.iter().all(takes).then_some(blocks * b)
}

/// A batch norm in inference (`affine` per channel of the sum of `inputs`, through a ReLU
/// first with `relu_before`) on f32 CPU tensors in oneDNN's blocked layout, all of one rank-5
/// shape `[n, c/b, h, w, b]` (checked by the caller with [`blocked_channels`]): the output in
/// that layout with `blocked_output`, else NCHW.
pub(crate) fn batch_norm_blocked(
    inputs: &[Tensor],
    (affine, relu_before): (&ChannelAffine, bool),
    blocked_output: bool,
) -> candle_core::Result<Tensor> {
    let Some(&[n, blocks, h, w, b]) = inputs.first().map(Tensor::dims) else {
        candle_core::bail!("oneDNN layout: a batch norm's inputs are rank 5")
    };
    let tensors = inputs
        .iter()
        .map(Tensor::contiguous)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let storages: Vec<_> = tensors.iter().map(Tensor::storage_and_layout).collect();
    let operands = storages
        .iter()
        .map(|(storage, layout)| f32_values(storage, layout))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let dims = [n, blocks, h * w, b];
    let y = affine_blocked(&operands, (affine, relu_before), dims)?;
    let device = inputs[0].device();
    match blocked_output {
        true => Tensor::from_vec(y, (n, blocks, h, w, b), device),
        false => Tensor::from_vec(unblock(&y, dims)?, (n, blocks * b, h, w), device),
    }
}

/// `t` in NCHW: a tensor in oneDNN's blocked layout (rank 5, `[n, c/b, h, w, b]`, handed
/// over by a layer in inference) as the `[n, c, h, w]` tensor it holds; any other tensor as
/// it is. What a reader that takes only NCHW gets (`models/inference.rs`).
pub(crate) fn to_nchw(t: &Tensor) -> candle_core::Result<Tensor> {
    let [n, blocks, h, w, b] = *t.dims() else {
        return Ok(t.clone());
    };
    let plain = {
        let (storage, layout) = t.storage_and_layout();
        unblock(f32_values(&storage, layout)?, [n, blocks, h * w, b])?
    };
    Tensor::from_vec(plain, (n, blocks * b, h, w), t.device())
}

/// The values of a contiguous f32 CPU tensor's storage; an error for any other.
fn f32_values<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(values)) = storage else {
        candle_core::bail!("oneDNN layout: a tensor in a blocked layout's place is f32 on the CPU")
    };
    contiguous_slice(values, layout, "oneDNN layout")
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
    let mut dx = output_buffer([n, c, h, w])?;
    let mut dk = output_buffer([o, c / groups.max(1), kh, kw])?;
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
fn output_buffer(dims: [i64; 4]) -> candle_core::Result<OutputBuffer<f32>> {
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

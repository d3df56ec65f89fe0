//! Convolution through cuDNN for the forward *and both backward passes* (feature `cudnn`).
//!
//! candle 0.11 uses cuDNN for the forward pass only; its input gradient is a naive
//! `conv_transpose2d` kernel (one thread per output element) and its kernel gradient a
//! convolution over transposed tensors. Here the three products are
//! `cudnnConvolutionForward`, `cudnnConvolutionBackwardData` and
//! `cudnnConvolutionBackwardFilter`, with cuDNN's heuristics picking each algorithm, f32
//! accumulation, and tensor-core math (TF32 for f32 tensors, as PyTorch's default on cuDNN).
//! cuDNN pads symmetrically per axis: TensorFlow's uneven 'same' split is padded explicitly
//! first ([`Conv2dGeometry::symmetric_padding`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor, sys,
};
use candle_core::cuda::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda::{CudaDType, DeviceId};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::{handles, view};
use crate::ops::Conv2dGeometry;

/// Symmetric padding `[h, w]`, stride, dilation and groups of a cuDNN convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CudnnGeometry {
    pad: [usize; 2],
    stride: usize,
    dilation: usize,
    groups: usize,
}

impl CudnnGeometry {
    fn output(&self, x: &[usize], w: &[usize]) -> [usize; 4] {
        let span = |k: usize| (k - 1) * self.dilation + 1;
        [
            x[0],
            w[0],
            (x[2] + 2 * self.pad[0] - span(w[2])) / self.stride + 1,
            (x[3] + 2 * self.pad[1] - span(w[3])) / self.stride + 1,
        ]
    }
}

/// Scalars 1 and 0 of a tensor type.
trait Unit: Copy {
    const ONE: Self;
    const ZERO: Self;
}
impl Unit for f32 {
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
}
impl Unit for half::bf16 {
    const ONE: Self = half::bf16::ONE;
    const ZERO: Self = half::bf16::ZERO;
}
impl Unit for half::f16 {
    const ONE: Self = half::f16::ONE;
    const ZERO: Self = half::f16::ZERO;
}

struct Descriptors<T: CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
}

fn dims4(d: &[usize]) -> [i32; 4] {
    [d[0] as i32, d[1] as i32, d[2] as i32, d[3] as i32]
}

fn descriptors<T: CudnnDataType>(
    cudnn: &Arc<Cudnn>,
    g: &CudnnGeometry,
    x: &[usize],
    w: &[usize],
) -> candle_core::Result<Descriptors<T>> {
    let mut conv = cudnn.create_conv2d::<f32>(
        [g.pad[0] as i32, g.pad[1] as i32],
        [g.stride as i32; 2],
        [g.dilation as i32; 2],
        sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    conv.set_group_count(g.groups as i32)?;
    // As PyTorch: f32 keeps cuDNN's default math, which allows TF32 tensor cores; half types
    // ask for tensor-core math explicitly.
    let math = match T::DATA_TYPE {
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    };
    conv.set_math_type(math)?;
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    Ok(Descriptors {
        x: cudnn.create_4d_tensor::<T>(nchw, dims4(x))?,
        w: cudnn.create_4d_filter::<T>(nchw, dims4(w))?,
        y: cudnn.create_4d_tensor::<T>(nchw, dims4(&g.output(x, w)))?,
        conv,
    })
}

thread_local! {
    // Grow-only workspace per device: allocating (and zeroing) up to hundreds of megabytes
    // for every convolution cost more than some convolutions.
    static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
    // The heuristics' choice per pass and shape, asked once.
    static ALGORITHMS: RefCell<HashMap<AlgoKey, Algorithm>> = RefCell::new(HashMap::new());
}

type AlgoKey = (Pass, Vec<usize>, Vec<usize>, CudnnGeometry, DType);

/// Runs `f` with a workspace of at least `bytes`, reused across calls.
fn with_workspace<R>(
    dev: &CudaDevice,
    bytes: usize,
    f: impl FnOnce(&mut CudaSlice<u8>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let mut ws = WORKSPACES.with(|w| w.borrow_mut().remove(&dev.id()));
    if ws.as_ref().is_none_or(|w| w.len() < bytes.max(1)) {
        // SAFETY: cuDNN uses a workspace as scratch and never reads what it did not write.
        ws = Some(unsafe { dev.alloc::<u8>(bytes.max(1)) }?);
    }
    let mut ws = ws.expect("set above");
    let result = f(&mut ws);
    WORKSPACES.with(|w| w.borrow_mut().insert(dev.id(), ws));
    result
}

/// cuDNN's choice for one pass.
#[derive(Clone, Copy, Debug)]
enum Algorithm {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// The cached algorithm for `key`, or `pick()`'s answer, cached.
fn algorithm(
    key: AlgoKey,
    pick: impl FnOnce() -> candle_core::Result<Algorithm>,
) -> candle_core::Result<Algorithm> {
    if let Some(algo) = ALGORITHMS.with(|a| a.borrow().get(&key).copied()) {
        return Ok(algo);
    }
    let algo = pick()?;
    ALGORITHMS.with(|a| a.borrow_mut().insert(key, algo));
    Ok(algo)
}

/// What to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pass {
    /// `(x, w) -> y`.
    Forward,
    /// `(dy, w) -> dx`, `dims` = x's dims.
    Data,
    /// `(x, dy) -> dw`, `dims` = w's dims.
    Filter,
}

fn run<T>(
    pass: Pass,
    g: &CudnnGeometry,
    dims: &[usize],
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)>
where
    T: CudnnDataType + CudaDType + DeviceRepr + ValidAsZeroBits + Unit,
{
    let dev = &a.0.device;
    let cudnn = handles(dev)?.safe.clone();
    let (x_dims, w_dims): (Vec<usize>, Vec<usize>) = match pass {
        Pass::Forward => (a.1.dims().to_vec(), b.1.dims().to_vec()),
        Pass::Data => (dims.to_vec(), b.1.dims().to_vec()),
        Pass::Filter => (a.1.dims().to_vec(), dims.to_vec()),
    };
    let d = descriptors::<T>(&cudnn, g, &x_dims, &w_dims)?;
    let (va, vb) = (view::<T>(a.0, a.1)?, view::<T>(b.0, b.1)?);
    let key = (pass, x_dims.clone(), w_dims.clone(), *g, a.0.dtype());
    // SAFETY (allocations): cuDNN overwrites every element of its output (beta = 0).
    let (out_dims, slice) = match pass {
        Pass::Forward => {
            let out = g.output(&x_dims, &w_dims);
            let mut y = unsafe { dev.alloc::<T>(out.iter().product()) }?;
            let op = ConvForward {
                conv: &d.conv,
                x: &d.x,
                w: &d.w,
                y: &d.y,
            };
            let Algorithm::Forward(algo) =
                algorithm(key, || Ok(Algorithm::Forward(op.pick_algorithm()?)))?
            else {
                candle_core::bail!("cudnn conv2d: cached algorithm of another pass");
            };
            with_workspace(dev, op.get_workspace_size(algo)?, |ws| {
                // SAFETY: the descriptors describe exactly these buffers (shapes and dtype).
                Ok(unsafe { op.launch(algo, Some(ws), (T::ONE, T::ZERO), &va, &vb, &mut y) }?)
            })?;
            (out.to_vec(), y)
        }
        Pass::Data => {
            let mut dx = unsafe { dev.alloc::<T>(x_dims.iter().product()) }?;
            let op = ConvBackwardData {
                conv: &d.conv,
                dx: &d.x,
                w: &d.w,
                dy: &d.y,
            };
            let Algorithm::Data(algo) =
                algorithm(key, || Ok(Algorithm::Data(op.pick_algorithm()?)))?
            else {
                candle_core::bail!("cudnn conv2d: cached algorithm of another pass");
            };
            with_workspace(dev, op.get_workspace_size(algo)?, |ws| {
                // SAFETY: as above; `va` is dy, `vb` the kernel.
                Ok(unsafe { op.launch(algo, Some(ws), (T::ONE, T::ZERO), &mut dx, &vb, &va) }?)
            })?;
            (x_dims, dx)
        }
        Pass::Filter => {
            let mut dw = unsafe { dev.alloc::<T>(w_dims.iter().product()) }?;
            let op = ConvBackwardFilter {
                conv: &d.conv,
                x: &d.x,
                dw: &d.w,
                dy: &d.y,
            };
            let Algorithm::Filter(algo) =
                algorithm(key, || Ok(Algorithm::Filter(op.pick_algorithm()?)))?
            else {
                candle_core::bail!("cudnn conv2d: cached algorithm of another pass");
            };
            with_workspace(dev, op.get_workspace_size(algo)?, |ws| {
                // SAFETY: as above; `va` is x, `vb` is dy.
                Ok(unsafe { op.launch(algo, Some(ws), (T::ONE, T::ZERO), &va, &mut dw, &vb) }?)
            })?;
            (w_dims, dw)
        }
    };
    Ok((
        CudaStorage::wrap_cuda_slice(slice, dev.clone()),
        Shape::from(out_dims),
    ))
}

fn dispatch(
    pass: Pass,
    g: &CudnnGeometry,
    dims: &[usize],
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    match a.0.dtype() {
        DType::F32 => run::<f32>(pass, g, dims, a, b),
        DType::BF16 => run::<half::bf16>(pass, g, dims, a, b),
        DType::F16 => run::<half::f16>(pass, g, dims, a, b),
        other => candle_core::bail!("cudnn conv2d: unsupported dtype {other:?}"),
    }
}

/// A cuDNN pass as a candle op (CUDA only; the CPU has its own GEMM path).
struct CudnnPass {
    pass: Pass,
    geometry: CudnnGeometry,
    dims: Vec<usize>,
}

impl CustomOp2 for CudnnPass {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "cudnn-conv2d",
            Pass::Data => "cudnn-conv2d-backward-data",
            Pass::Filter => "cudnn-conv2d-backward-filter",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only", self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        dispatch(self.pass, &self.geometry, &self.dims, (s1, l1), (s2, l2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.pass != Pass::Forward {
            candle_core::bail!("{}: no second derivative", self.name());
        }
        let (dx, dw) = data_and_filter(x, w, self.geometry, dy)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// cuDNN's backward-data and backward-filter convolutions: the gradients of the input `x`
/// (already padded to `geometry`'s symmetric padding) and of the kernel `w`, from `dy`.
fn data_and_filter(
    x: &Tensor,
    w: &Tensor,
    geometry: CudnnGeometry,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let dy = dy.contiguous()?;
    let dx = dy.apply_op2_no_bwd(
        w,
        &CudnnPass {
            pass: Pass::Data,
            geometry,
            dims: x.dims().to_vec(),
        },
    )?;
    let dw = x.apply_op2_no_bwd(
        &dy,
        &CudnnPass {
            pass: Pass::Filter,
            geometry,
            dims: w.dims().to_vec(),
        },
    )?;
    Ok((dx, dw))
}

/// The gradients of [`conv2d`] of `x` and `kernel` from the output's gradient `dy`, through
/// cuDNN's backward kernels without candle's autograd, for the plan's own backward pass
/// (arguments as [`conv2d`] took them). Keras's asymmetric padding is applied to `x` again, as
/// [`conv2d`] did, and cut from its gradient.
pub(crate) fn gradients(
    x: &Tensor,
    kernel: &Tensor,
    geometry: Conv2dGeometry,
    dy: &Tensor,
) -> crate::Result<(Tensor, Tensor)> {
    let (x_padded, cudnn_geometry) = padded(x, geometry)?;
    let (dx, dk) = data_and_filter(
        &x_padded.contiguous()?,
        &kernel.contiguous()?,
        cudnn_geometry,
        dy,
    )?;
    let dx = match x_padded.dims() == x.dims() {
        true => dx,
        false => {
            let (top, _, left, _) = geometry.pad;
            let (_, _, h, w) = x.dims4()?;
            dx.narrow(2, top, h)?.narrow(3, left, w)?
        }
    };
    Ok((dx, dk))
}

/// cuDNN convolution of NCHW `x` with an OIHW kernel, differentiable through cuDNN's
/// backward kernels (arguments checked by [`crate::ops::conv2d`]).
pub(crate) fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    geometry: Conv2dGeometry,
) -> crate::Result<Tensor> {
    let (x, geometry) = padded(x, geometry)?;
    Ok(x.contiguous()?.apply_op2(
        &kernel.contiguous()?,
        CudnnPass {
            pass: Pass::Forward,
            geometry,
            dims: Vec::new(),
        },
    )?)
}

/// `x` with the part of Keras's padding cuDNN cannot apply (an asymmetric one) added, and the
/// cuDNN geometry of the rest.
fn padded(x: &Tensor, geometry: Conv2dGeometry) -> crate::Result<(Tensor, CudnnGeometry)> {
    let (x, (pad_h, pad_w)) = geometry.symmetric_padding(x, false)?;
    let geometry = CudnnGeometry {
        pad: [pad_h, pad_w],
        stride: geometry.stride,
        dilation: geometry.dilation,
        groups: geometry.groups,
    };
    Ok((x, geometry))
}

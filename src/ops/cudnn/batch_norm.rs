//! Training-mode batch normalization through cuDNN (feature `cudnn`): one fused kernel for
//! the forward pass (`cudnnBatchNormalizationForwardTraining`, which also returns the batch
//! mean and inverse standard deviation) and one for the backward pass
//! (`cudnnBatchNormalizationBackward`: input, scale and shift gradients together).
//!
//! Composed from candle's ops, a BatchNorm runs a dozen kernels forward, reductions over
//! axes (0, 2, 3) among them, and as many backward; it cost more than the convolution it
//! follows. cuDNN's running averages use the unbiased variance, Keras's the biased one, so
//! cuDNN is not asked for them: the layer updates its moving statistics itself from the
//! saved batch moments.
//!
//! The kernels' extra results (saved moments, scale and shift gradients) are handed between
//! candle ops through shared slots, since a candle op returns one tensor.

use std::ffi::c_void;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use candle_core::cuda::cudarc::cudnn::sys;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage,
    Tensor,
};

use super::{Handles, check, handles, view};

/// An f32 NCHW tensor descriptor, destroyed on drop.
struct Descriptor(sys::cudnnTensorDescriptor_t);

impl Descriptor {
    fn nchw(n: usize, c: usize, h: usize, w: usize) -> candle_core::Result<Self> {
        let mut d: sys::cudnnTensorDescriptor_t = std::ptr::null_mut();
        // SAFETY: creates and fills a descriptor that this value owns.
        unsafe {
            check(
                sys::cudnnCreateTensorDescriptor(&mut d),
                "cudnnCreateTensorDescriptor",
            )?;
            check(
                sys::cudnnSetTensor4dDescriptor(
                    d,
                    sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                    n as i32,
                    c as i32,
                    h as i32,
                    w as i32,
                ),
                "cudnnSetTensor4dDescriptor",
            )?;
        }
        Ok(Self(d))
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: the descriptor was created by `nchw` and is destroyed once.
        unsafe {
            sys::cudnnDestroyTensorDescriptor(self.0);
        }
    }
}

/// What both kernels need: the device, its stream, the shape cuDNN sees (`(n, c, h·w, 1)`),
/// descriptors for the activations and the per-channel parameters, and the handle.
struct Setup<'a> {
    dev: &'a CudaDevice,
    stream: Arc<CudaStream>,
    dims: (usize, usize, usize, usize),
    x: Descriptor,
    per_channel: Descriptor,
    handles: Rc<Handles>,
}

impl<'a> Setup<'a> {
    fn new(storage: &'a CudaStorage, layout: &Layout) -> candle_core::Result<Self> {
        let d = layout.dims();
        let (n, c, h, w) = (d[0], d[1], d[2..].iter().product(), 1);
        let dev = &storage.device;
        Ok(Self {
            dev,
            stream: dev.cuda_stream(),
            dims: (n, c, h, w),
            x: Descriptor::nchw(n, c, h, w)?,
            per_channel: Descriptor::nchw(1, c, 1, 1)?,
            handles: handles(dev)?,
        })
    }

    fn elements(&self) -> usize {
        let (n, c, h, w) = self.dims;
        n * c * h * w
    }

    fn channels(&self) -> usize {
        self.dims.1
    }
}

fn slice<'a>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<CudaView<'a, f32>> {
    view::<f32>(s, l)
}

fn ptr<T: DevicePtr<f32>>(t: &T, stream: &Arc<CudaStream>) -> *const c_void {
    t.device_ptr(stream).0 as *const c_void
}

fn ptr_mut<T: DevicePtrMut<f32>>(t: &mut T, stream: &Arc<CudaStream>) -> *mut c_void {
    t.device_ptr_mut(stream).0 as *mut c_void
}

/// Batch moments saved by the forward kernel: mean and inverse standard deviation, `(C,)`.
#[derive(Default)]
struct Saved {
    mean: Option<CudaSlice<f32>>,
    inv_std: Option<CudaSlice<f32>>,
    grad_scale: Option<CudaSlice<f32>>,
    grad_shift: Option<CudaSlice<f32>>,
}

type Slot = Arc<Mutex<Saved>>;

fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, Saved> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// `(x, gamma, beta) -> y`, normalizing with the batch's own statistics.
struct Forward {
    epsilon: f64,
    slot: Slot,
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "cudnn-batch-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn batch norm runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let setup = Setup::new(sx, lx)?;
        let (dev, stream, c) = (setup.dev, &setup.stream, setup.channels());
        let (xd, pd) = (&setup.x, &setup.per_channel);
        let (x, gamma, beta) = (slice(sx, lx)?, slice(sg, lg)?, slice(sb, lb)?);
        // SAFETY: cuDNN writes every element of y (beta = 0).
        let mut y = unsafe { dev.alloc::<f32>(setup.elements()) }?;
        let mut mean = dev.alloc_zeros::<f32>(c)?;
        let mut inv_std = dev.alloc_zeros::<f32>(c)?;
        let (one, zero) = (1f32, 0f32);
        let handle = &setup.handles.raw;
        // SAFETY: every pointer is a live buffer of the size its descriptor states; the
        // running-average outputs are null, which cuDNN allows.
        unsafe {
            check(
                sys::cudnnBatchNormalizationForwardTraining(
                    handle.0,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    (&one as *const f32).cast(),
                    (&zero as *const f32).cast(),
                    xd.0,
                    ptr(&x, stream),
                    xd.0,
                    ptr_mut(&mut y, stream),
                    pd.0,
                    ptr(&gamma, stream),
                    ptr(&beta, stream),
                    0.0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    self.epsilon,
                    ptr_mut(&mut mean, stream),
                    ptr_mut(&mut inv_std, stream),
                ),
                "cudnnBatchNormalizationForwardTraining",
            )?;
        }
        let mut saved = lock(&self.slot);
        saved.mean = Some(mean);
        saved.inv_std = Some(inv_std);
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev.clone()),
            Shape::from(lx.dims()),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = dy.apply_op3_no_bwd(
            x,
            gamma,
            &Backward {
                epsilon: self.epsilon,
                slot: self.slot.clone(),
                moments: None,
            },
        )?;
        let dgamma = gamma.apply_op1_no_bwd(&Take {
            slot: self.slot.clone(),
            what: Part::GradScale,
        })?;
        let dbeta = gamma.apply_op1_no_bwd(&Take {
            slot: self.slot.clone(),
            what: Part::GradShift,
        })?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// `(dy, x, gamma) -> dx`, leaving the scale and shift gradients in the slot.
struct Backward {
    epsilon: f64,
    slot: Slot,
    /// The batch mean and inverse standard deviation, `(C,)` f32 CUDA tensors, where given;
    /// else those the forward kernel left in the slot.
    moments: Option<(Tensor, Tensor)>,
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "cudnn-batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn batch norm runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        sdy: &CudaStorage,
        ldy: &Layout,
        sx: &CudaStorage,
        lx: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let setup = Setup::new(sx, lx)?;
        let (dev, stream, c) = (setup.dev, &setup.stream, setup.channels());
        let (xd, pd) = (&setup.x, &setup.per_channel);
        let (dy, x, gamma) = (slice(sdy, ldy)?, slice(sx, lx)?, slice(sg, lg)?);
        // SAFETY: cuDNN writes every element of dx (beta = 0).
        let mut dx = unsafe { dev.alloc::<f32>(setup.elements()) }?;
        let mut dgamma = dev.alloc_zeros::<f32>(c)?;
        let mut dbeta = dev.alloc_zeros::<f32>(c)?;
        let (one, zero) = (1f32, 0f32);
        let handle = &setup.handles.raw;
        let mut saved = lock(&self.slot);
        // The given moments' storages, read-locked for the kernel's launch.
        let given = self
            .moments
            .as_ref()
            .map(|(mean, inv_std)| (mean.storage_and_layout(), inv_std.storage_and_layout()));
        let (mean, inv_std) = match (&given, saved.mean.as_ref(), saved.inv_std.as_ref()) {
            (Some(((mean, lm), (inv_std, li))), _, _) => {
                let (Storage::Cuda(mean), Storage::Cuda(inv_std)) = (&**mean, &**inv_std) else {
                    candle_core::bail!("cudnn batch norm: moments not on the GPU");
                };
                (
                    ptr(&slice(mean, lm)?, stream),
                    ptr(&slice(inv_std, li)?, stream),
                )
            }
            (None, Some(mean), Some(inv_std)) => (ptr(mean, stream), ptr(inv_std, stream)),
            _ => candle_core::bail!("cudnn batch norm: backward without a forward"),
        };
        // SAFETY: as in the forward pass; the saved moments come from it.
        unsafe {
            check(
                sys::cudnnBatchNormalizationBackward(
                    handle.0,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    (&one as *const f32).cast(),
                    (&zero as *const f32).cast(),
                    (&one as *const f32).cast(),
                    (&zero as *const f32).cast(),
                    xd.0,
                    ptr(&x, stream),
                    xd.0,
                    ptr(&dy, stream),
                    xd.0,
                    ptr_mut(&mut dx, stream),
                    pd.0,
                    ptr(&gamma, stream),
                    ptr_mut(&mut dgamma, stream),
                    ptr_mut(&mut dbeta, stream),
                    self.epsilon,
                    mean,
                    inv_std,
                ),
                "cudnnBatchNormalizationBackward",
            )?;
        }
        saved.grad_scale = Some(dgamma);
        saved.grad_shift = Some(dbeta);
        Ok((
            CudaStorage::wrap_cuda_slice(dx, dev.clone()),
            Shape::from(lx.dims()),
        ))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Moments,
    GradScale,
    GradShift,
}

/// Turns a buffer left in the slot into a tensor (its input only gives the device).
struct Take {
    slot: Slot,
    what: Part,
}

impl CustomOp1 for Take {
    fn name(&self) -> &'static str {
        "cudnn-batch-norm-take"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn batch norm runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &s.device;
        let stream = dev.cuda_stream();
        let mut saved = lock(&self.slot);
        let (data, shape) = match self.what {
            Part::Moments => {
                let (Some(mean), Some(inv_std)) = (saved.mean.as_ref(), saved.inv_std.as_ref())
                else {
                    candle_core::bail!("cudnn batch norm: no saved moments");
                };
                let c = mean.len();
                let mut both = dev.alloc_zeros::<f32>(2 * c)?;
                stream
                    .memcpy_dtod(mean, &mut both.slice_mut(..c))
                    .map_err(candle_core::Error::wrap)?;
                stream
                    .memcpy_dtod(inv_std, &mut both.slice_mut(c..))
                    .map_err(candle_core::Error::wrap)?;
                (both, Shape::from((2, c)))
            }
            Part::GradScale | Part::GradShift => {
                let taken = if self.what == Part::GradScale {
                    saved.grad_scale.take()
                } else {
                    saved.grad_shift.take()
                };
                let Some(g) = taken else {
                    candle_core::bail!("cudnn batch norm: no saved gradient");
                };
                let c = g.len();
                (g, Shape::from(c))
            }
        };
        Ok((CudaStorage::wrap_cuda_slice(data, dev.clone()), shape))
    }
}

/// `true` when the cuDNN kernels take `x`: f32 with rank 2 to 4 (cuDNN's 4-d descriptors).
pub(crate) fn applies(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && (2..=4).contains(&x.rank())
}

/// Normalizes `x` with its batch statistics (arguments checked by
/// [`crate::ops::batch_norm_train`]); returns `y`, the batch mean and the biased batch
/// variance, decoded from the inverse standard deviation cuDNN saves.
pub(crate) fn train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    epsilon: f64,
) -> crate::Result<(Tensor, Tensor, Tensor)> {
    let slot: Slot = Arc::default();
    let x = x.contiguous()?;
    let y = x.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        Forward {
            epsilon,
            slot: slot.clone(),
        },
    )?;
    let moments = gamma.apply_op1_no_bwd(&Take {
        slot,
        what: Part::Moments,
    })?;
    // cuDNN saves 1 / sqrt(var + epsilon) of the biased batch variance.
    let var = (moments.get(1)?.powf(-2.0)? - epsilon)?;
    Ok((y, moments.get(0)?, var))
}

/// The gradients `(dx, dgamma, dbeta)` of [`train`] of `x` from the output's gradient `dy`, in
/// one cuDNN backward kernel without candle's autograd, given the batch `mean` and biased
/// variance `var` [`train`] returned (the inverse standard deviation cuDNN reads is made of
/// them again), for the plan's own backward pass.
pub(crate) fn gradients(
    x: &Tensor,
    gamma: &Tensor,
    (mean, var): (&Tensor, &Tensor),
    epsilon: f64,
    dy: &Tensor,
) -> crate::Result<(Tensor, Tensor, Tensor)> {
    let slot: Slot = Arc::default();
    let inv_std = var.affine(1.0, epsilon)?.powf(-0.5)?;
    let dx = dy.contiguous()?.apply_op3_no_bwd(
        &x.contiguous()?,
        &gamma.contiguous()?,
        &Backward {
            epsilon,
            slot: slot.clone(),
            moments: Some((mean.contiguous()?, inv_std)),
        },
    )?;
    let take = |what| {
        gamma.apply_op1_no_bwd(&Take {
            slot: slot.clone(),
            what,
        })
    };
    Ok((dx, take(Part::GradScale)?, take(Part::GradShift)?))
}

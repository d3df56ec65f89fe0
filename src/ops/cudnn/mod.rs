//! cuDNN kernels on CUDA (feature `cudnn`): convolutions forward and backward, and
//! training-mode batch normalization. Arguments are checked by [`crate::ops`] before they get
//! here.
//!
//! One cache holds the cuDNN handles, per thread (cuDNN handles are neither `Send` nor `Sync`)
//! and device, bound to candle's stream; both handles are destroyed when the thread's cache is
//! dropped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::cuda::cudarc::cudnn::{Cudnn, sys};
use candle_core::cuda::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda::{CudaDType, DeviceId};
use candle_core::{CudaDevice, CudaStorage, Layout};

pub(crate) mod batch_norm;
pub(crate) mod conv2d;

/// The cuDNN handles of one device: cudarc's safe wrapper (convolutions, through cudarc's
/// descriptors and launchers) and a raw handle for the calls cudarc does not wrap (batch
/// normalization; cudarc keeps its own handle private).
pub(crate) struct Handles {
    pub(crate) safe: Arc<Cudnn>,
    pub(crate) raw: RawHandle,
}

/// A raw cuDNN handle, destroyed on drop.
pub(crate) struct RawHandle(pub(crate) sys::cudnnHandle_t);

impl Drop for RawHandle {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `cudnnCreate` in `handles` and is destroyed once;
        // its status cannot be reported from a destructor.
        unsafe {
            sys::cudnnDestroy(self.0);
        }
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Rc<Handles>>> = RefCell::new(HashMap::new());
}

/// Fails with cuDNN's status unless it is success.
pub(crate) fn check(status: sys::cudnnStatus_t, what: &str) -> candle_core::Result<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        candle_core::bail!("{what}: {status:?}")
    }
}

/// This thread's handles for `dev`, created on first use.
pub(crate) fn handles(dev: &CudaDevice) -> candle_core::Result<Rc<Handles>> {
    HANDLES.with(|cache| {
        if let Some(h) = cache.borrow().get(&dev.id()) {
            return Ok(h.clone());
        }
        let safe = Cudnn::new(dev.cuda_stream())?;
        let mut raw: sys::cudnnHandle_t = std::ptr::null_mut();
        // SAFETY: cudnnCreate writes a handle that `RawHandle` then owns; the stream is
        // candle's device stream, which outlives the thread's cache.
        unsafe {
            check(sys::cudnnCreate(&mut raw), "cudnnCreate")?;
            let raw = RawHandle(raw);
            check(
                sys::cudnnSetStream(raw.0, dev.cuda_stream().cu_stream() as sys::cudaStream_t),
                "cudnnSetStream",
            )?;
            let h = Rc::new(Handles { safe, raw });
            cache.borrow_mut().insert(dev.id(), h.clone());
            Ok(h)
        }
    })
}

/// The elements of a contiguous CUDA tensor.
pub(crate) fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => candle_core::bail!("cudnn: contiguous tensors expected"),
    }
}

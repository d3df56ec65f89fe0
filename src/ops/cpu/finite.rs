//! The finite check of many tensors on the CPU: one parallel pass over each, no allocation.

use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

use crate::Result;

/// Elements per parallel task.
const CHUNK: usize = 1 << 16;

/// `Some(true)` when every element of every tensor is finite; `None` when a tensor is not an
/// f32 or f64 CPU tensor (the caller then composes the check from candle's ops).
pub(crate) fn all_finite(tensors: &[&Tensor]) -> Result<Option<bool>> {
    for t in tensors {
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        let finite = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => v[start..end]
                .par_chunks(CHUNK)
                .all(|c| c.iter().all(|x| x.is_finite())),
            Storage::Cpu(CpuStorage::F64(v)) => v[start..end]
                .par_chunks(CHUNK)
                .all(|c| c.iter().all(|x| x.is_finite())),
            _ => return Ok(None),
        };
        if !finite {
            return Ok(Some(false));
        }
    }
    Ok(Some(true))
}

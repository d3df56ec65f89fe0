//! Tensors through a [`Communicator`]: gradients summed in flat buckets, tensors broadcast
//! byte for byte, the rows of a split batch gathered back, and digests to compare ranks.
//! Each function is collective: every rank calls it with tensors of the same shapes.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::Result;
use crate::distributed::Communicator;

/// Gradients are summed in buckets of at most this many f32 values (25 MB, PyTorch DDP's
/// default bucket): large enough that each all-reduce is bandwidth-bound, small enough that
/// the flat copies stay a fraction of the model.
pub(crate) const BUCKET_VALUES: usize = 25 * 1024 * 1024 / 4;

/// The gradients of `vars` summed over every rank, in place in `grads`, in buckets of at most
/// [`BUCKET_VALUES`] values. `present[i]` says whether var `i` has a gradient on at least one
/// rank (a rank without one adds zeros; a var with none anywhere keeps none, as in one
/// process). Each gradient keeps its dtype and device.
pub(crate) fn all_reduce_gradients(
    comm: &dyn Communicator,
    grads: &mut GradStore,
    vars: &[Tensor],
    present: &[bool],
) -> Result<()> {
    let reduced: Vec<&Tensor> = vars
        .iter()
        .zip(present)
        .filter_map(|(v, &p)| p.then_some(v))
        .collect();
    let mut start = 0;
    while start < reduced.len() {
        // One bucket: vars start..end, at least one even if it alone is larger.
        let mut end = start;
        let mut values = 0;
        while end < reduced.len()
            && (end == start || values + reduced[end].elem_count() <= BUCKET_VALUES)
        {
            values += reduced[end].elem_count();
            end += 1;
        }
        sum_bucket(comm, grads, &reduced[start..end])?;
        start = end;
    }
    Ok(())
}

/// One bucket of gradients, concatenated into one flat f32 tensor on their device, summed
/// by [`Communicator::all_reduce_sum_tensor`] (through the host for MPI, on the GPU for
/// NCCL), and cut back into views of the sum in each gradient's shape and dtype.
fn sum_bucket(comm: &dyn Communicator, grads: &mut GradStore, bucket: &[&Tensor]) -> Result<()> {
    let parts = bucket
        .iter()
        .map(|var| match grads.get(var) {
            Some(g) => Ok(g.to_dtype(DType::F32)?.flatten_all()?),
            None => Ok(Tensor::zeros(var.elem_count(), DType::F32, var.device())?),
        })
        .collect::<Result<Vec<_>>>()?;
    let flat = comm.all_reduce_sum_tensor(&Tensor::cat(&parts, 0)?)?;
    let mut offset = 0;
    for var in bucket {
        let n = var.elem_count();
        let dtype = grads.get(var).map_or(var.dtype(), |g| g.dtype());
        let sum = flat
            .narrow(0, offset, n)?
            .reshape(var.shape())?
            .to_dtype(dtype)?;
        grads.insert(var, sum);
        offset += n;
    }
    Ok(())
}

/// `tensors` replaced on every rank by `root`'s, bit for bit, whatever their dtype.
pub(crate) fn broadcast_tensors(
    comm: &dyn Communicator,
    tensors: &[Tensor],
    root: usize,
) -> Result<Vec<Tensor>> {
    let contiguous = tensors
        .iter()
        .map(|t| Ok(t.contiguous()?))
        .collect::<Result<Vec<_>>>()?;
    let mut bytes = Vec::new();
    for t in &contiguous {
        bytes.extend_from_slice(&safetensors::View::data(t));
    }
    comm.broadcast_bytes(&mut bytes, root)?;
    let mut offset = 0;
    contiguous
        .iter()
        .map(|t| {
            let n = t.elem_count() * t.dtype().size_in_bytes();
            let out = Tensor::from_raw_buffer(
                &bytes[offset..offset + n],
                t.dtype(),
                t.dims(),
                t.device(),
            )?;
            offset += n;
            Ok(out)
        })
        .collect()
}

/// Every rank's rows of a batch split by [`shard`](crate::distributed::shard), put back
/// together in order on every rank (as f32): `local` holds this rank's rows, `rows` (start,
/// end) where they go among `total` rows. A zero-filled buffer summed across ranks, so one
/// all-reduce of plain f32 values does it.
pub(crate) fn reduce_sum_tensors(
    comm: &dyn Communicator,
    local: &Tensor,
    rows: std::ops::Range<usize>,
    total: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut dims = local.dims().to_vec();
    let row: usize = dims.iter().skip(1).product();
    let mut flat = vec![0f32; total * row];
    if !rows.is_empty() {
        let values = local
            .narrow(0, 0, rows.len())?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        flat[rows.start * row..rows.end * row].copy_from_slice(&values);
    }
    comm.all_reduce_sum_f32(&mut flat)?;
    dims[0] = total;
    Ok(Tensor::from_vec(flat, dims, device)?)
}

/// `local`'s element-wise sum over every rank, differentiably: the backward pass sums the
/// gradients flowing back the same way (every rank's loss depends on every rank's share of
/// the sum). `factor` (0 or 1) scales this rank's share: 0 for a rank with no samples in the
/// step. In f32, through the host (MPI carries host buffers).
pub(crate) fn replica_sum(
    comm: &Arc<dyn Communicator>,
    local: &Tensor,
    factor: f32,
) -> Result<Tensor> {
    let op = ReplicaSumOp {
        comm: comm.clone(),
        before: factor,
        after: 1.0,
    };
    let host = local
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .contiguous()?;
    Ok(host.apply_op1(op)?.to_device(local.device())?)
}

/// The autograd node of [`replica_sum`]: `after · Σ_ranks (before · x)`. Forward, `before`
/// is the rank's factor; backward, the gradients of every rank are summed as they are and
/// the rank's factor applies `after` (`y = Σ_r f_r x_r`, so `∂L/∂x_r = f_r Σ_r' ∂L_r'/∂y`).
struct ReplicaSumOp {
    comm: Arc<dyn Communicator>,
    before: f32,
    after: f32,
}

impl CustomOp1 for ReplicaSumOp {
    fn name(&self) -> &'static str {
        "replica-sum"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(values), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("replica sum: a contiguous f32 tensor expected")
        };
        let mut sum: Vec<f32> = values[start..end].iter().map(|v| v * self.before).collect();
        self.comm
            .all_reduce_sum_f32(&mut sum)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if self.after != 1.0 {
            sum.iter_mut().for_each(|v| *v *= self.after);
        }
        Ok((CpuStorage::F32(sum), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.to_dtype(DType::F32)?.contiguous()?;
        let backward = ReplicaSumOp {
            comm: self.comm.clone(),
            before: 1.0,
            after: self.before,
        };
        Ok(Some(grad.apply_op1_no_bwd(&backward)?))
    }
}

/// A 64-bit FNV-1a digest of the tensors' dtypes, shapes and bytes: the same on every rank
/// for the same values, to compare ranks without sending whole tensors.
pub(crate) fn digest<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<u64> {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for t in tensors {
        eat(format!("{:?}{:?}", t.dtype(), t.dims()).as_bytes());
        eat(&safetensors::View::data(&t.contiguous()?));
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::SingleProcess;

    #[test]
    fn one_rank_keeps_its_gradients_and_rows() -> Result<()> {
        let dev = Device::Cpu;
        let w = candle_core::Var::new(&[1f32, 2.0, 3.0], &dev)?;
        let loss = (w.as_tensor() * 2.0)?.sum_all()?;
        let mut grads = loss.backward()?;
        all_reduce_gradients(
            &SingleProcess,
            &mut grads,
            &[w.as_tensor().clone()],
            &[true],
        )?;
        assert_eq!(grads.get(&w).unwrap().to_vec1::<f32>()?, [2.0, 2.0, 2.0]);

        let rows = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?;
        let all = reduce_sum_tensors(&SingleProcess, &rows, 0..2, 2, &dev)?;
        assert_eq!(all.to_vec2::<f32>()?, [[1.0, 2.0], [3.0, 4.0]]);

        let b = broadcast_tensors(&SingleProcess, &[Tensor::new(&[7u32, 8], &dev)?], 0)?;
        assert_eq!(b[0].to_vec1::<u32>()?, [7, 8]);
        Ok(())
    }

    /// Two identical ranks, simulated: every sum doubles.
    struct Twins;

    impl Communicator for Twins {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn backend(&self) -> &str {
            "twins"
        }
        fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
            values.iter_mut().for_each(|v| *v *= 2.0);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
            values.iter_mut().for_each(|v| *v *= 2.0);
            Ok(())
        }
        fn broadcast_f32(&self, _values: &mut [f32], _root: usize) -> Result<()> {
            Ok(())
        }
        fn broadcast_bytes(&self, _bytes: &mut [u8], _root: usize) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buckets_sum_every_gradient_and_keep_shapes_and_dtypes() -> Result<()> {
        let dev = Device::Cpu;
        let a = candle_core::Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?;
        let b = candle_core::Var::new(&[1f64, 1.0, 1.0], &dev)?;
        let unused = candle_core::Var::new(&[5f32], &dev)?;
        let loss = ((a.as_tensor() * 3.0)?.sum_all()?.to_dtype(DType::F64)?
            + (b.as_tensor() * 2.0)?.sum_all()?)?;
        let mut grads = loss.backward()?;
        let vars = [
            a.as_tensor().clone(),
            b.as_tensor().clone(),
            unused.as_tensor().clone(),
        ];
        all_reduce_gradients(&Twins, &mut grads, &vars, &[true, true, true])?;
        assert_eq!(
            grads.get(&a).unwrap().to_vec2::<f32>()?,
            [[6.0, 6.0], [6.0, 6.0]]
        );
        assert_eq!(grads.get(&b).unwrap().to_vec1::<f64>()?, [4.0, 4.0, 4.0]);
        // A var without a gradient on this rank gets the other ranks' sum (zeros added).
        assert_eq!(grads.get(&unused).unwrap().to_vec1::<f32>()?, [0.0]);
        Ok(())
    }

    #[test]
    fn one_ranks_replica_sum_is_the_identity_both_ways() -> Result<()> {
        let comm: Arc<dyn Communicator> = Arc::new(SingleProcess);
        let x = candle_core::Var::new(&[1f32, -2.0], &Device::Cpu)?;
        let y = replica_sum(&comm, x.as_tensor(), 1.0)?;
        assert_eq!(y.to_vec1::<f32>()?, [1.0, -2.0]);
        let grads = (y * 3.0)?.sum_all()?.backward()?;
        assert_eq!(grads.get(&x).unwrap().to_vec1::<f32>()?, [3.0, 3.0]);
        // A rank without samples adds nothing, and gets no gradient.
        let none = replica_sum(&comm, x.as_tensor(), 0.0)?;
        assert_eq!(none.to_vec1::<f32>()?, [0.0, 0.0]);
        let grads = (none * 3.0)?.sum_all()?.backward()?;
        assert_eq!(grads.get(&x).unwrap().to_vec1::<f32>()?, [0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn digests_tell_values_apart() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[1f32, 2.0], &dev)?;
        let b = Tensor::new(&[1f32, 2.5], &dev)?;
        assert_eq!(digest([&a])?, digest([&a.clone()])?);
        assert_ne!(digest([&a])?, digest([&b])?);
        assert_ne!(digest([&a])?, digest([&a.reshape((2, 1))?])?);
        Ok(())
    }
}

//! The per-channel bias add of `Conv2D` and `Dense` on the CPU: one pass forward, and the
//! bias gradient as one per-channel sum instead of candle's strided reduction.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::{Float, channel_sums, float_dispatch, map_rows, slice, split, to_vec_f64};
use crate::Result;

/// `x + bias` over axis 1 of a contiguous f32/f64 `x` (arguments checked by
/// [`crate::ops::bias_add`]).
pub(crate) fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2(&bias.contiguous()?, ChannelBias)?)
}

struct ChannelBias;

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "add-channel-bias"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = split(lx.dims());
        let bias = to_vec_f64(sb, lb)?;
        let out = float_dispatch!(sx, "bias add", |v| {
            map_rows(slice(v, lx)?, dims, |ch, s| {
                Float::from_f64(s.to_f64() + bias[ch])
            })?
        });
        Ok((out, Shape::from(lx.dims())))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let sums = channel_sum(&dy)?;
        Ok((Some(dy), Some(sums)))
    }
}

/// The per-channel sum `(C,)` of a contiguous `(N, C, …)` gradient: a bias's gradient.
pub(crate) fn channel_sum(dy: &Tensor) -> candle_core::Result<Tensor> {
    dy.apply_op1_no_bwd(&ChannelSum)
}

/// Per-channel sum `(C,)`.
struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = split(l.dims());
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(
                channel_sums(slice(v, l)?, dims)
                    .into_iter()
                    .map(|s| s as f32)
                    .collect(),
            ),
            CpuStorage::F64(v) => CpuStorage::F64(channel_sums(slice(v, l)?, dims)),
            _ => candle_core::bail!("channel sum: f32 or f64 expected"),
        };
        Ok((out, Shape::from(dims.1)))
    }
}

//! ReLU on the CPU with its own backward: one pass each way. Candle's ReLU backward builds a
//! comparison mask, converts it to the float type and multiplies (four passes and three
//! allocations); at the article's shapes it took 24 times PyTorch's time
//! (docs/PERFORMANCE.md, per-layer table).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{dispatch_pair, float_dispatch, slice};
use crate::Result;

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

/// `max(x, 0)` of a contiguous f32/f64 `x`, differentiable (arguments checked by
/// [`crate::ops::relu`]).
pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Relu)?)
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = float_dispatch!(s, "relu", |v| {
            let src = slice(v, l)?;
            let mut out = vec![Default::default(); src.len()];
            out.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(o, x)| {
                    for (o, &x) in o.iter_mut().zip(x) {
                        // NaN stays NaN, as in candle's and PyTorch's ReLU.
                        *o = if x < Default::default() {
                            Default::default()
                        } else {
                            x
                        };
                    }
                });
            out
        });
        Ok((out, Shape::from(l.dims())))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // The gradient passes where the output is positive; `y` is contiguous (made above).
        Ok(Some(grad(dy, y)?))
    }
}

/// `dy` where the ReLU's output `y` is positive, 0 elsewhere.
pub(crate) fn grad(dy: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    dy.contiguous()?
        .apply_op2_no_bwd(&y.contiguous()?, &ReluGrad)
}

/// `dy` where `y > 0`, 0 elsewhere.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-grad"
    }

    fn cpu_fwd(
        &self,
        sd: &CpuStorage,
        ld: &Layout,
        sy: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = dispatch_pair!(sd, ld, sy, ly, "relu grad", |dy, y| {
            let mut out = vec![Default::default(); dy.len()];
            out.par_chunks_mut(CHUNK)
                .zip(dy.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
                .for_each(|(o, (d, y))| {
                    for ((o, &d), &y) in o.iter_mut().zip(d).zip(y) {
                        *o = if y > Default::default() {
                            d
                        } else {
                            Default::default()
                        };
                    }
                });
            out
        });
        Ok((out, Shape::from(ld.dims())))
    }
}

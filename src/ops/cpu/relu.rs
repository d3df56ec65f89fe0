//! ReLU on the CPU with its own backward: one pass each way. Candle's ReLU backward builds a
//! comparison mask, converts it to the float type and multiplies (four passes and three
//! allocations); at the article's shapes it took 24 times PyTorch's time
//! (docs/PERFORMANCE.md, per-layer table).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::{dispatch_pair, float_dispatch, par_fill, slice};
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
            // SAFETY: chunk `i` of the output pairs with chunk `i` of `src`, of its length,
            // and the loop writes each of its elements.
            unsafe {
                par_fill(src.len(), CHUNK, "relu", |i, o| {
                    let x = &src[i * CHUNK..][..o.len()];
                    for (o, &x) in o.iter_mut().zip(x) {
                        // NaN stays NaN, as in candle's and PyTorch's ReLU.
                        o.write(if x < Default::default() {
                            Default::default()
                        } else {
                            x
                        });
                    }
                })?
            }
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
            if dy.len() != y.len() {
                candle_core::bail!("relu grad: {} gradients for {} outputs", dy.len(), y.len());
            }
            // SAFETY: chunk `i` of the output pairs with chunk `i` of `dy` and `y`, of its
            // length (the lengths are equal), and the loop writes each of its elements.
            unsafe {
                par_fill(dy.len(), CHUNK, "relu grad", |i, o| {
                    let d = &dy[i * CHUNK..][..o.len()];
                    let y = &y[i * CHUNK..][..o.len()];
                    for ((o, &d), &y) in o.iter_mut().zip(d).zip(y) {
                        o.write(if y > Default::default() {
                            d
                        } else {
                            Default::default()
                        });
                    }
                })?
            }
        });
        Ok((out, Shape::from(ld.dims())))
    }
}

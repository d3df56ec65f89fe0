//! The input gradients of max pooling and nearest upsampling on the CPU, for the trainer's
//! own backward pass (`train/tape.rs`, `layers/native_backward.rs`): one pass each, where
//! candle's autograd of the layers' composed forward (a reshape and two `max` reductions; a
//! broadcast and a reshape) builds masks, broadcasts and sums tensor by tensor.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

use super::{Float, contiguous_slice, par_fill};
use crate::Result;

/// The input gradient of max pooling `y = max over (ph, pw) windows of x` with strides equal
/// to the window and no padding (rows and columns past the last whole window take no part):
/// `dy` of its window where an element equals the window's maximum, 0 elsewhere; every
/// element equal to the maximum gets it (as candle's gradient of `max`, which the layer's
/// composed forward pass would get). `x` is `(N, C, H, W)`, `y` and `dy` `(N, C, H/ph, W/pw)`.
pub(crate) fn max_pool_grad(
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    window: (usize, usize),
) -> Result<Tensor> {
    let (x, y, dy) = (x.contiguous()?, y.contiguous()?, dy.contiguous()?);
    if y.dims() != dy.dims() || y.rank() != 4 || x.rank() != 4 {
        return Err(candle_core::Error::Msg(format!(
            "max pool grad: x {:?}, y {:?}, dy {:?}",
            x.dims(),
            y.dims(),
            dy.dims()
        ))
        .into());
    }
    Ok(x.apply_op3_no_bwd(&y, &dy, &MaxPoolGrad { window })?)
}

struct MaxPoolGrad {
    window: (usize, usize),
}

impl MaxPoolGrad {
    fn compute<T: Float>(
        &self,
        x: &[T],
        y: &[T],
        dy: &[T],
        x_dims: &[usize],
        y_dims: &[usize],
    ) -> candle_core::Result<Vec<T>> {
        let (ph, pw) = self.window;
        let (h, w, oh, ow) = (x_dims[2], x_dims[3], y_dims[2], y_dims[3]);
        let planes = x_dims[0] * x_dims[1];
        if y_dims[..2] != x_dims[..2] || oh * ph > h || ow * pw > w || y.len() != planes * oh * ow {
            candle_core::bail!("max pool grad: x {x_dims:?} and y {y_dims:?} do not match");
        }
        // SAFETY: each plane's chunk is `h · w` long and the loops write every element of it.
        unsafe {
            par_fill(x.len(), h * w, "max pool grad", |p, out| {
                let (xs, ys, dys) = (
                    &x[p * h * w..][..h * w],
                    &y[p * oh * ow..][..oh * ow],
                    &dy[p * oh * ow..][..oh * ow],
                );
                for (r, row) in out.chunks_mut(w.max(1)).enumerate() {
                    write_pool_row(row, &xs[r * w..][..w], r, (ys, dys), (ph, pw), (oh, ow));
                }
            })
        }
    }
}

/// Row `r` of a plane's input gradient: `dy` where the element equals its window's maximum,
/// 0 elsewhere and past the last whole window. Writes all of `row`.
fn write_pool_row<T: Float>(
    row: &mut [MaybeUninit<T>],
    xs: &[T],
    r: usize,
    (ys, dys): (&[T], &[T]),
    (ph, pw): (usize, usize),
    (oh, ow): (usize, usize),
) {
    let i = r / ph.max(1);
    for (col, (d, &v)) in row.iter_mut().zip(xs).enumerate() {
        let j = col / pw.max(1);
        let g = if i < oh && j < ow && v == ys[i * ow + j] {
            dys[i * ow + j]
        } else {
            T::ZERO
        };
        d.write(g);
    }
}

impl MaxPoolGrad {
    /// [`compute`](Self::compute) on the elements of three contiguous storages.
    fn on_slices<T: Float>(
        &self,
        (x, y, d): (&[T], &[T], &[T]),
        (lx, ly, ld): (&Layout, &Layout, &Layout),
    ) -> candle_core::Result<Vec<T>> {
        const KERNEL: &str = "max pool grad";
        self.compute(
            contiguous_slice(x, lx, KERNEL)?,
            contiguous_slice(y, ly, KERNEL)?,
            contiguous_slice(d, ld, KERNEL)?,
            lx.dims(),
            ly.dims(),
        )
    }
}

impl CustomOp3 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "max-pool-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sy: &CpuStorage,
        ly: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (sx, sy, sd) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(d)) => {
                CpuStorage::F32(self.on_slices((x, y, d), (lx, ly, ld))?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(y), CpuStorage::F64(d)) => {
                CpuStorage::F64(self.on_slices((x, y, d), (lx, ly, ld))?)
            }
            _ => candle_core::bail!("max pool grad: f32 or f64 tensors of one dtype expected"),
        };
        Ok((out, Shape::from(lx.dims())))
    }
}

/// The input gradient of nearest upsampling by `(rows, columns)`: each input element's
/// gradient is the sum of the `rows · columns` output gradients it was copied to. `dy` is
/// `(N, C, H·rows, W·columns)`.
pub(crate) fn upsample_nearest_grad(dy: &Tensor, factors: (usize, usize)) -> Result<Tensor> {
    let dy = dy.contiguous()?;
    if dy.rank() != 4 {
        return Err(
            candle_core::Error::Msg(format!("upsample grad: dy of shape {:?}", dy.dims())).into(),
        );
    }
    Ok(dy.apply_op1_no_bwd(&UpsampleGrad { factors })?)
}

struct UpsampleGrad {
    factors: (usize, usize),
}

impl UpsampleGrad {
    fn compute<T: Float>(&self, dy: &[T], dims: &[usize]) -> candle_core::Result<Vec<T>> {
        let (sh, sw) = self.factors;
        let (big_h, big_w) = (dims[2], dims[3]);
        if sh == 0 || sw == 0 || big_h % sh != 0 || big_w % sw != 0 {
            candle_core::bail!(
                "upsample grad: {dims:?} is not a multiple of {:?}",
                self.factors
            );
        }
        let (h, w) = (big_h / sh, big_w / sw);
        let planes = dims[0] * dims[1];
        // SAFETY: each plane's chunk is `h · w` long and the loop writes every element of it.
        unsafe {
            par_fill(planes * h * w, h * w, "upsample grad", |p, out| {
                let plane = &dy[p * big_h * big_w..][..big_h * big_w];
                for (k, d) in out.iter_mut().enumerate() {
                    let (i, j) = (k / w.max(1), k % w.max(1));
                    let mut sum = T::ZERO;
                    for a in 0..sh {
                        let row = &plane[(i * sh + a) * big_w + j * sw..][..sw];
                        for &v in row {
                            sum = sum + v;
                        }
                    }
                    d.write(sum);
                }
            })
        }
    }
}

impl CustomOp1 for UpsampleGrad {
    fn name(&self) -> &'static str {
        "upsample-nearest-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        const KERNEL: &str = "upsample grad";
        let dims = l.dims();
        let out = match s {
            CpuStorage::F32(d) => {
                CpuStorage::F32(self.compute(contiguous_slice(d, l, KERNEL)?, dims)?)
            }
            CpuStorage::F64(d) => {
                CpuStorage::F64(self.compute(contiguous_slice(d, l, KERNEL)?, dims)?)
            }
            _ => candle_core::bail!("upsample grad: f32 or f64 expected"),
        };
        let (sh, sw) = self.factors;
        Ok((
            out,
            Shape::from((dims[0], dims[1], dims[2] / sh, dims[3] / sw)),
        ))
    }
}

//! [`GradientClipping`]: Keras's `clipnorm`, `global_clipnorm` and `clipvalue`, applied to
//! the gradients of a step before the optimizer reads them.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

/// Keras's gradient clipping (the optimizer arguments `clipnorm`, `global_clipnorm`,
/// `clipvalue`; Keras takes one of them at a time, and so does
/// [`Trainer::gradient_clipping`](crate::train::Trainer::gradient_clipping)). It acts on the
/// gradients before the optimizer (and before weight decay); a non-finite gradient stays
/// non-finite, so the step is still refused by the divergence check.
///
/// # Examples
/// ```
/// use candle_functional::train::GradientClipping;
/// assert!(GradientClipping::GlobalNorm(1.0).validate().is_ok());
/// assert!(GradientClipping::Value(-1.0).validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GradientClipping {
    /// `clipnorm`: each gradient scaled so that its own L2 norm is at most this.
    Norm(f64),
    /// `global_clipnorm`: all gradients scaled by one factor so that their joint L2 norm is
    /// at most this (the direction of the whole update is kept).
    GlobalNorm(f64),
    /// `clipvalue`: every element clipped to `[-value, value]`.
    Value(f64),
}

impl GradientClipping {
    /// The threshold, which must be positive and finite.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::GradientClipping;
    /// assert!(GradientClipping::Norm(f64::NAN).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        let (GradientClipping::Norm(t)
        | GradientClipping::GlobalNorm(t)
        | GradientClipping::Value(t)) = *self;
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "gradient clipping {self:?}: the threshold must be positive and finite"
            )));
        }
        Ok(())
    }

    /// Replaces the gradient of every var in `grads` by its clipped value (on the device, no
    /// read).
    pub(crate) fn clip(&self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<()> {
        let present: Vec<(&Tensor, Tensor)> = vars
            .iter()
            .filter_map(|(_, v)| grads.get(v.as_tensor()).map(|g| (v.as_tensor(), g.clone())))
            .collect();
        match *self {
            GradientClipping::Norm(limit) => {
                for (var, g) in present {
                    let factor = scale(&sum_of_squares(&g)?.sqrt()?, limit)?;
                    grads.insert(var, g.broadcast_mul(&factor.to_dtype(g.dtype())?)?);
                }
            }
            GradientClipping::GlobalNorm(limit) => {
                if present.is_empty() {
                    return Ok(());
                }
                let parts = present
                    .iter()
                    .map(|(_, g)| sum_of_squares(g))
                    .collect::<Result<Vec<_>>>()?;
                let norm = Tensor::stack(&parts, 0)?.sum_all()?.sqrt()?;
                let factor = scale(&norm, limit)?;
                for (var, g) in present {
                    grads.insert(var, g.broadcast_mul(&factor.to_dtype(g.dtype())?)?);
                }
            }
            GradientClipping::Value(limit) => {
                for (var, g) in present {
                    grads.insert(var, g.clamp(-limit, limit)?);
                }
            }
        }
        Ok(())
    }
}

/// The sum of a gradient's squares as an f32 scalar (half-precision squares would overflow;
/// an f64 gradient's sum is rounded once, after summing).
fn sum_of_squares(g: &Tensor) -> Result<Tensor> {
    Ok(if g.dtype() == DType::F64 {
        g.sqr()?.sum_all()?.to_dtype(DType::F32)?
    } else {
        g.to_dtype(DType::F32)?.sqr()?.sum_all()?
    })
}

/// `limit / max(norm, limit)`: 1 at or under the limit, shrinking above it (Keras's
/// `clip_by_norm` and `clip_by_global_norm`).
fn scale(norm: &Tensor, limit: f64) -> Result<Tensor> {
    Ok((norm.maximum(limit)?.recip()? * limit)?)
}

//! `Concatenate`: joins tensors along one axis (DenseNet's skips, U-Net's decoder joins).

use candle_core::Tensor;

use crate::graph::{Configured, LayerOp, Params};
use crate::layers::keras::{KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::native_backward::Native;
use crate::layers::padding::{channel_axis, checked_size};
use crate::{Error, Result};

/// Configuration of a [`Concatenate`] layer.
///
/// # Examples
/// ```
/// use candle_functional::layers::ConcatenateConfig;
/// assert_eq!(ConcatenateConfig::default().axis, 1);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ConcatenateConfig {
    /// Axis of the full tensor (batch is axis 0, so 1 is the channel axis of NCHW); negative
    /// counts from the end, except on `(C, H, W)` maps, where Keras's `-1` (channels) and
    /// NCHW's `-1` (width) differ: there it is refused, naming both.
    pub axis: isize,
}

impl Default for ConcatenateConfig {
    fn default() -> Self {
        Self { axis: 1 }
    }
}

/// Concatenates its inputs along `axis`; all other axes must agree.
///
/// # Shapes
/// Inputs `(batch, c_i, h, w)`; output `(batch, sum(c_i), h, w)` for axis 1.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let x = Input::new([16, 8, 8]);
/// let y = Conv2D::new(12, 3).padding(Padding::Same).call(&x)?;
/// let dense_skip = Concatenate::new(1).call_many(&[x, y])?;
/// assert_eq!(dense_skip.shape(), &[28, 8, 8]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Concatenate = Configured<ConcatenateConfig>;

impl Concatenate {
    /// Concatenation along `axis` of the full tensor (1 = channels for NCHW).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Concatenate::new(-1).config().axis, -1);
    /// ```
    pub fn new(axis: isize) -> Self {
        Self::from_config(ConcatenateConfig { axis })
    }
}

impl ConcatenateConfig {
    /// The axis as an index into per-sample shapes of rank `sample_rank`.
    fn sample_axis(&self, layer: &str, sample_rank: usize) -> Result<usize> {
        Ok(channel_axis(layer, self.axis, sample_rank)? - 1)
    }
}

impl LayerOp for ConcatenateConfig {
    fn type_name(&self) -> &'static str {
        "Concatenate"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        if inputs.len() < 2 {
            return Err(Error::InvalidInput {
                layer: layer.to_string(),
                message: format!("takes at least 2 inputs, got {}", inputs.len()),
            });
        }
        let first = &inputs[0];
        let axis = self.sample_axis(layer, first.len())?;
        let mut out = first.clone();
        for (i, other) in inputs.iter().enumerate().skip(1) {
            let agrees = other.len() == first.len()
                && other
                    .iter()
                    .zip(first)
                    .enumerate()
                    .all(|(d, (a, b))| d == axis || a == b);
            if !agrees {
                return Err(Error::ShapeMismatch {
                    layer: layer.to_string(),
                    what: format!(
                        "input {i} must match input 0 on every axis but the concatenation axis {}",
                        self.axis
                    ),
                    expected: first.clone(),
                    got: other.clone(),
                });
            }
            out[axis] = checked_size(
                layer,
                "the concatenated length",
                out[axis].checked_add(other[axis]),
            )?;
        }
        Ok(vec![out])
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let axis = self.sample_axis("", inputs[0].rank() - 1)? + 1;
        Ok(vec![Tensor::cat(inputs, axis)?])
    }

    /// Lets the plan's own backward pass find the layer (`train/tape.rs`).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl ConcatenateConfig {
    /// The forward pass for the plan's own backward pass (`train/tape.rs`): the output and
    /// what the gradients need (the axis and each input's extent along it: each input's
    /// gradient is its slice of the output's).
    pub(crate) fn forward_native(&self, inputs: &[Tensor]) -> Result<Option<(Tensor, Native)>> {
        let Some(first) = inputs.first() else {
            return Ok(None);
        };
        let axis = self.sample_axis("", first.rank().saturating_sub(1))? + 1;
        let sizes = inputs
            .iter()
            .map(|t| t.dim(axis))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let y = Tensor::cat(inputs, axis)?;
        Ok(Some((y, Native::Concatenate { axis, sizes })))
    }
}

/// `Concatenate`, saved and imported from Keras's class of that name (Keras's channel axis
/// `-1` becomes axis 1).
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<ConcatenateConfig>(|| {
    LayerExample::new(&Concatenate::new(1), &[&[2, 3, 3], &[4, 3, 3]])
})
.keras(&[KerasClass::new("Concatenate", concatenate_from_keras)])];

fn concatenate_from_keras(layer: &KerasLayer) -> Translation {
    let axis = layer.field("axis").as_i64().unwrap_or(-1);
    Translated::new(
        "Concatenate",
        ConcatenateConfig {
            axis: layer.axis(axis, layer.rank())?,
        },
    )
}

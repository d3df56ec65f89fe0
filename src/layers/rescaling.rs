//! `Rescaling`: `x * scale + offset`, Keras's preprocessing layer for pixel ranges
//! (`Rescaling(1/255)` takes `0..=255` to `0..=1`, `Rescaling(1/127.5, -1)` to `-1..=1`).
//!
//! It is also the layer `docs/architecture.md` walks through: everything about it (config,
//! shape rule, forward, its saved name and its Keras translation) is in this file, and
//! `layers/mod.rs` declares the file and lists its `KINDS`.

use candle_core::Tensor;

use crate::graph::{Configured, LayerOp, Params};
use crate::layers::keras::{FeatureOrder, KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::one_input;
use crate::{Error, Result};

/// Config of a [`Rescaling`] layer; defaults are Keras's (`offset` 0).
///
/// # Examples
/// ```
/// let c = candle_functional::layers::RescalingConfig::default();
/// assert_eq!((c.scale, c.offset), (1.0, 0.0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RescalingConfig {
    /// Multiplies the input.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
}

impl Default for RescalingConfig {
    fn default() -> Self {
        Self {
            scale: 1.0,
            offset: 0.0,
        }
    }
}

/// `x * scale + offset`, element by element (model inputs are floats: convert `u8` pixels
/// with `to_dtype(DType::F32)` first).
///
/// # Shapes
/// Any input; output shape = input shape.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// let x = Input::new([3, 2, 2]);
/// let y = Rescaling::new(1.0 / 255.0).call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let pixels = Tensor::full(255u8, (1, 3, 2, 2), &Device::Cpu)?.to_dtype(DType::F32)?;
/// let out = model.forward(&[pixels], Mode::Eval)?;
/// assert_eq!(out[0].flatten_all()?.to_vec1::<f32>()?, vec![1.0; 12]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Rescaling = Configured<RescalingConfig>;

impl Rescaling {
    /// Multiplies by `scale` (no offset).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Rescaling::new(0.5).config().scale, 0.5);
    /// ```
    pub fn new(scale: f64) -> Self {
        Self::from_config(RescalingConfig { scale, offset: 0.0 })
    }

    /// Adds `offset` after scaling.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let to_signed = Rescaling::new(1.0 / 127.5).offset(-1.0);
    /// assert_eq!(to_signed.config().offset, -1.0);
    /// ```
    pub fn offset(self, offset: f64) -> Self {
        self.with_config(|c| c.offset = offset)
    }
}

impl LayerOp for RescalingConfig {
    fn type_name(&self) -> &'static str {
        "Rescaling"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        // A NaN or infinite factor would turn every output into NaN: refuse it when built.
        if !self.scale.is_finite() || !self.offset.is_finite() {
            return Err(Error::InvalidConfig {
                layer: layer.to_string(),
                message: format!(
                    "scale and offset must be finite, got {} and {}",
                    self.scale, self.offset
                ),
            });
        }
        Ok(vec![one_input(layer, inputs)?.to_vec()])
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        Ok(vec![inputs[0].affine(self.scale, self.offset)?])
    }
}

/// `Rescaling`, saved and imported from Keras's `Rescaling` (one scale and one offset for
/// every feature, so a channels-last Flatten's order passes through).
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<RescalingConfig>(|| {
    LayerExample::new(&Rescaling::new(0.5).offset(-1.0), &[&[3, 2, 2]])
})
.keras(
    &[KerasClass::new("Rescaling", rescaling_from_keras).feature_order(FeatureOrder::PassesOn)],
)];

fn rescaling_from_keras(layer: &KerasLayer) -> Translation {
    let number = |key: &str, default: f64| match layer.field(key) {
        serde_json::Value::Null => Ok(default),
        value => value.as_f64().ok_or_else(|| {
            format!("`{key}` {value}: only one number for every channel is supported")
        }),
    };
    Translated::new(
        "Rescaling",
        RescalingConfig {
            scale: number("scale", 1.0)?,
            offset: number("offset", 0.0)?,
        },
    )
}

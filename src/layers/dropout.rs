//! `Dropout`: zeroes a random fraction of activations in training, scaling the rest up.
//!
//! The mask is drawn on the host from the seed the model gives each node and each forward
//! call, so training runs are reproducible and resumable, on every device.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::graph::{Configured, LayerOp, Params};
use crate::layers::keras::{FeatureOrder, KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::one_input;
use crate::support::dtype::Cast;
use crate::{Error, Result};

/// Config of a [`Dropout`] layer.
///
/// # Examples
/// ```
/// assert_eq!(candle_functional::layers::DropoutConfig::default().rate, 0.5);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DropoutConfig {
    /// Fraction of activations zeroed, in `[0, 1)`.
    pub rate: f64,
}

impl Default for DropoutConfig {
    fn default() -> Self {
        Self { rate: 0.5 }
    }
}

/// Inverted dropout: in training, each element is kept with probability `1 - rate` and
/// scaled by `1 / (1 - rate)`; in eval it is the identity.
///
/// # Shapes
/// Output shape = input shape.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let y = Dropout::new(0.25).call(&Input::new([128]))?;
/// assert_eq!(y.shape(), &[128]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Dropout = Configured<DropoutConfig>;

impl Dropout {
    /// Dropout with this rate.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Dropout::new(0.1).config().rate, 0.1);
    /// ```
    pub fn new(rate: f64) -> Self {
        Self::from_config(DropoutConfig { rate })
    }
}

impl LayerOp for DropoutConfig {
    fn type_name(&self) -> &'static str {
        "Dropout"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        if !(0.0..1.0).contains(&self.rate) {
            return Err(Error::InvalidConfig {
                layer: layer.to_string(),
                message: format!("rate must be in [0, 1), got {}", self.rate),
            });
        }
        Ok(vec![one_input(layer, inputs)?.to_vec()])
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        if !params.mode().is_train() || self.rate == 0.0 {
            return Ok(vec![x.clone()]);
        }
        let mut rng = StdRng::seed_from_u64(params.seed());
        let keep = 1.0 - self.rate;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f64>() < keep {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.cast(x.dtype())?;
        Ok(vec![(x * mask)?])
    }
}

/// `Dropout`, saved and imported from Keras's class of that name (without `noise_shape`).
pub(crate) const KINDS: &[LayerKind] =
    &[
        LayerKind::of::<DropoutConfig>(|| LayerExample::new(&Dropout::new(0.25), &[&[8]])).keras(
            &[
                KerasClass::new("Dropout", dropout_from_keras)
                    .feature_order(FeatureOrder::PassesOn),
            ],
        ),
    ];

fn dropout_from_keras(layer: &KerasLayer) -> Translation {
    if !layer.field("noise_shape").is_null() {
        return Err("noise_shape is not supported".into());
    }
    Translated::new(
        "Dropout",
        DropoutConfig {
            rate: layer.float("rate")?,
        },
    )
}

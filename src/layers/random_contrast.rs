//! `RandomContrast`: Keras's augmentation layer that scales each image's deviation from its
//! per-channel mean by a random factor while training, then clips to the value range, and
//! passes images through unchanged otherwise.
//!
//! Keras 3's own rule, kept here so that imported models behave as in Keras: one number `f`
//! draws factors from `[1, 1 + f]` (contrast is only ever raised; its documentation says
//! `[1 - f, 1 + f]`), a pair `(lower, upper)` from `[1 - lower, 1 + upper]`.

use candle_core::{D, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::graph::{Configured, LayerOp, Params};
use crate::layers::image_transform::{check_factor, keras_factor, uniform};
use crate::layers::keras::{KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::{expect_chw, one_input};
use crate::{Error, Result};

/// Config of a [`RandomContrast`] layer; defaults are Keras's (`value_range` `(0, 255)`),
/// with no change.
///
/// # Examples
/// ```
/// use candle_functional::layers::RandomContrastConfig;
/// assert_eq!(RandomContrastConfig::default().value_range, (0.0, 255.0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RandomContrastConfig {
    /// `(lower, upper)`: factors are drawn from `[1 - lower, 1 + upper]`.
    pub factor: (f64, f64),
    /// Outputs are clipped to this range (the images' own range: `(0, 1)` after
    /// `Rescaling(1/255)`).
    pub value_range: (f64, f64),
}

impl Default for RandomContrastConfig {
    fn default() -> Self {
        Self {
            factor: (0.0, 0.0),
            value_range: (0.0, 255.0),
        }
    }
}

/// Changes each image's contrast at random in training (Keras's `RandomContrast`): per image
/// and channel, `(x - mean) * factor + mean`, clipped to `value_range`; the identity in
/// inference.
///
/// # Shapes
/// Input and output `(batch, c, h, w)`.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::layers::RandomContrast;
/// let x = Input::new([1, 1, 2]);
/// let y = RandomContrast::new(0.5).value_range(0.0, 1.0).call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let image = Tensor::new(&[[[[0.4f32, 0.6]]]], &Device::Cpu)?;
/// let out = model.forward(&[image], Mode::Train)?[0].flatten_all()?.to_vec1::<f32>()?;
/// assert!(out[0] <= 0.4 && out[1] >= 0.6); // pushed apart (factor in [1, 1.5])
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type RandomContrast = Configured<RandomContrastConfig>;

impl RandomContrast {
    /// Keras's `RandomContrast(factor)`: factors drawn from `[1, 1 + factor]`, `factor` in
    /// `[0, 1]`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomContrast;
    /// assert_eq!(RandomContrast::new(0.3).config().factor, (0.0, 0.3));
    /// ```
    pub fn new(factor: f64) -> Self {
        Self::from_config(RandomContrastConfig {
            factor: (0.0, factor.abs()),
            ..Default::default()
        })
    }

    /// Factors drawn from `[1 - lower, 1 + upper]` (Keras's `factor=(lower, upper)`).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomContrast;
    /// assert_eq!(RandomContrast::new(0.0).range(0.2, 0.2).config().factor, (0.2, 0.2));
    /// ```
    pub fn range(self, lower: f64, upper: f64) -> Self {
        self.with_config(|c| c.factor = (lower, upper))
    }

    /// The range outputs are clipped to.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomContrast;
    /// assert_eq!(RandomContrast::new(0.2).value_range(0.0, 1.0).config().value_range, (0.0, 1.0));
    /// ```
    pub fn value_range(self, lower: f64, upper: f64) -> Self {
        self.with_config(|c| c.value_range = (lower, upper))
    }
}

impl RandomContrastConfig {
    /// `images` with each image's contrast scaled by its factor, clipped (Keras's
    /// `transform_images`).
    pub(crate) fn adjust(&self, images: &Tensor, factors: &[f32]) -> Result<Tensor> {
        let batch = images.dim(0)?;
        let factor = Tensor::from_vec(factors.to_vec(), (batch, 1, 1, 1), images.device())?
            .to_dtype(images.dtype())?;
        let mean = images.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
        let centred = images.broadcast_sub(&mean)?;
        let out = centred.broadcast_mul(&factor)?.broadcast_add(&mean)?;
        let (low, high) = self.value_range;
        Ok(out.clamp(low, high)?)
    }
}

impl LayerOp for RandomContrastConfig {
    fn type_name(&self) -> &'static str {
        "RandomContrast"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let shape = one_input(layer, inputs)?;
        expect_chw(layer, shape)?;
        check_factor(layer, "factor", self.factor, (-1.0, 1.0))?;
        let (low, high) = self.value_range;
        if !(low.is_finite() && high.is_finite() && low <= high) {
            return Err(Error::InvalidConfig {
                layer: layer.to_string(),
                message: format!("value_range ({low}, {high}) is not an interval"),
            });
        }
        Ok(vec![shape.to_vec()])
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        if !params.mode().is_train() {
            return Ok(vec![x.clone()]);
        }
        let mut rng = StdRng::seed_from_u64(params.seed());
        let range = (1.0 - self.factor.0, 1.0 + self.factor.1);
        let factors: Vec<f32> = (0..x.dim(0)?)
            .map(|_| uniform(&mut rng, range) as f32)
            .collect();
        Ok(vec![self.adjust(x, &factors)?])
    }
}

/// `RandomContrast`, saved and imported from Keras's class of that name.
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<RandomContrastConfig>(|| {
    LayerExample::new(
        &RandomContrast::new(0.3).value_range(-2.0, 2.0),
        &[&[2, 3, 3]],
    )
})
.keras(&[KerasClass::new("RandomContrast", contrast_from_keras)])];

fn contrast_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    let value_range = match layer.field("value_range") {
        serde_json::Value::Null => (0.0, 255.0),
        value => keras_factor(value, f64::NEG_INFINITY)
            .map_err(|_| format!("value_range {value} is not two numbers"))?,
    };
    Translated::new(
        "RandomContrast",
        RandomContrastConfig {
            factor: keras_factor(layer.field("factor"), 0.0)?,
            value_range,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        match v {
            serde_json::Value::Array(items) => items.iter().flat_map(floats).collect(),
            n => vec![n.as_f64().unwrap_or(f64::NAN) as f32],
        }
    }

    /// Keras's `RandomContrast(0.4, value_range=(-1.5, 1.5)).transform_images` for given
    /// factors (`scripts/keras_reference.py image-transforms`).
    #[test]
    fn contrast_matches_keras_for_given_factors() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/keras_image_transforms.json"
        ))
        .unwrap();
        let f: serde_json::Value = serde_json::from_str(&text).unwrap();
        let device = candle_core::Device::Cpu;
        let x = Tensor::from_vec(floats(&f["x"]), (2, 3, 5, 7), &device).unwrap();
        let layer = RandomContrast::new(0.4).value_range(-1.5, 1.5);
        let got = layer
            .config()
            .adjust(&x, &floats(&f["contrast_factors"]))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = floats(&f["contrasted"]);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "off Keras by {worst}");
        // Some values were clipped, so the clip is checked too.
        assert!(want.iter().any(|&v| v == 1.5 || v == -1.5));
    }
}

//! `RandomRotation`: Keras's augmentation layer that turns each image about its centre by a
//! random angle while training (a fraction of a full turn), filling the corners as its
//! `fill_mode` says, and passes images through unchanged otherwise. Draws come from the seed
//! the model gives each node and forward call; the matrix and the resampling are Keras's.

use candle_core::Tensor;

use crate::Result;
use crate::graph::{Configured, LayerOp, Params};
use crate::layers::image_transform::{
    AffineTransform, Resampling, check_factor, impl_resampled, keras_factor, resample_in_training,
    uniform,
};
use crate::layers::keras::{KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::{expect_chw, one_input};

/// Config of a [`RandomRotation`] layer; defaults are Keras's (reflect, bilinear, fill 0),
/// with no rotation.
///
/// # Examples
/// ```
/// use candle_functional::layers::RandomRotationConfig;
/// assert_eq!(RandomRotationConfig::default().factor, (0.0, 0.0));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RandomRotationConfig {
    /// Angle range as fractions of a full turn (`(-0.1, 0.1)`: up to 36° either way;
    /// positive turns counter-clockwise).
    pub factor: (f64, f64),
    /// Fill mode, interpolation and fill value.
    #[serde(flatten)]
    pub resampling: Resampling,
}

impl_resampled!(RandomRotationConfig);

/// Turns each image of a batch by a random angle in training (Keras's `RandomRotation`); the
/// identity in inference.
///
/// # Shapes
/// Input and output `(batch, c, h, w)`.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::layers::RandomRotation;
/// let x = Input::new([1, 5, 5]);
/// let y = RandomRotation::new(0.25).call(&x)?; // up to a quarter turn either way
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let images = Tensor::rand(0f32, 1.0, (4, 1, 5, 5), &Device::Cpu)?;
/// let out = model.forward(&[images.clone()], Mode::Eval)?;
/// let change = (&out[0] - &images)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
/// assert_eq!(change, 0.0); // inference: unchanged
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type RandomRotation = Configured<RandomRotationConfig>;

impl RandomRotation {
    /// Angles of up to `factor` of a full turn either way (Keras's `RandomRotation(factor)`
    /// with one number).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomRotation;
    /// assert_eq!(RandomRotation::new(0.1).config().factor, (-0.1, 0.1));
    /// ```
    pub fn new(factor: f64) -> Self {
        let f = factor.abs();
        Self::from_config(RandomRotationConfig {
            factor: (-f, f),
            ..Default::default()
        })
    }

    /// Angles drawn from `lower..upper` (fractions of a full turn).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomRotation;
    /// assert_eq!(RandomRotation::new(0.0).range(0.0, 0.05).config().factor, (0.0, 0.05));
    /// ```
    pub fn range(self, lower: f64, upper: f64) -> Self {
        self.with_config(|c| c.factor = (lower, upper))
    }
}

impl LayerOp for RandomRotationConfig {
    fn type_name(&self) -> &'static str {
        "RandomRotation"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let shape = one_input(layer, inputs)?;
        expect_chw(layer, shape)?;
        check_factor(layer, "factor", self.factor, (-1.0, 1.0))?;
        self.resampling.check(layer)?;
        Ok(vec![shape.to_vec()])
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        resample_in_training(
            &inputs[0],
            params,
            &self.resampling,
            |rng, height, width| {
                let degrees = uniform(rng, self.factor) * 360.0;
                AffineTransform::rotation(degrees as f32, height, width)
            },
        )
    }
}

/// `RandomRotation`, saved and imported from Keras's class of that name.
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<RandomRotationConfig>(|| {
    LayerExample::new(&RandomRotation::new(0.2), &[&[2, 4, 5]])
})
.keras(&[KerasClass::new("RandomRotation", rotation_from_keras)])];

fn rotation_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    Translated::new(
        "RandomRotation",
        RandomRotationConfig {
            factor: keras_factor(layer.field("factor"), -1.0)?,
            resampling: Resampling::from_keras(layer)?,
        },
    )
}

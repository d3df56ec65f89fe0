//! `RandomTranslation`: Keras's augmentation layer that shifts each image by a random
//! fraction of its height and width while training, filling the uncovered border as its
//! `fill_mode` says, and passes images through unchanged otherwise. With
//! `FillMode::Constant` and `Interpolation::Nearest` it is the classic pad-and-crop
//! augmentation of CIFAR-10 (whole-pixel shifts, zeros brought in), done inside the model.
//!
//! Draws come from the seed the model gives each node and forward call (as `Dropout`'s do);
//! the resampling (`image_transform.rs`) is Keras's, pixel for pixel.

use candle_core::Tensor;

use crate::Result;
use crate::graph::{Configured, LayerOp, Params};
use crate::layers::image_transform::{
    AffineTransform, FillMode, Resampling, check_factor, impl_resampled, keras_factor,
    resample_in_training, uniform,
};
use crate::layers::keras::{KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::{expect_chw, one_input};

/// Config of a [`RandomTranslation`] layer; defaults are Keras's (reflect, bilinear, fill 0),
/// with no shift.
///
/// # Examples
/// ```
/// use candle_functional::layers::{FillMode, RandomTranslationConfig};
/// let c = RandomTranslationConfig::default();
/// assert_eq!((c.height_factor, c.resampling.fill_mode), ((0.0, 0.0), FillMode::Reflect));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RandomTranslationConfig {
    /// Vertical shift range as fractions of the height (`(-0.1, 0.1)`: up to 10% up or down;
    /// positive moves the image down).
    pub height_factor: (f64, f64),
    /// Horizontal shift range as fractions of the width (positive moves it right).
    pub width_factor: (f64, f64),
    /// Fill mode, interpolation and fill value.
    #[serde(flatten)]
    pub resampling: Resampling,
}

impl_resampled!(RandomTranslationConfig);

/// Shifts each image of a batch at random in training (Keras's `RandomTranslation`); the
/// identity in inference.
///
/// # Shapes
/// Input and output `(batch, c, h, w)`.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::layers::{FillMode, Interpolation, RandomTranslation};
/// // CIFAR-10's pad-and-crop inside the model: shifts of up to 4 pixels, zeros brought in.
/// let x = Input::new([3, 32, 32]);
/// let y = RandomTranslation::new(0.125, 0.125)
///     .fill_mode(FillMode::Constant)
///     .interpolation(Interpolation::Nearest)
///     .call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let images = Tensor::ones((2, 3, 32, 32), DType::F32, &Device::Cpu)?;
/// let same = model.forward(&[images.clone()], Mode::Eval)?[0].sum_all()?.to_scalar::<f32>()?;
/// assert_eq!(same, 2.0 * 3.0 * 1024.0);
/// let moved = model.forward(&[images], Mode::Train)?[0].sum_all()?.to_scalar::<f32>()?;
/// assert!(moved <= same); // zeros came in where a shift uncovered the border
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type RandomTranslation = Configured<RandomTranslationConfig>;

impl RandomTranslation {
    /// Shifts of up to `height_factor` of the height and `width_factor` of the width, either
    /// way (Keras's `RandomTranslation(height_factor, width_factor)` with one number each).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomTranslation;
    /// assert_eq!(RandomTranslation::new(0.2, 0.1).config().height_factor, (-0.2, 0.2));
    /// ```
    pub fn new(height_factor: f64, width_factor: f64) -> Self {
        let (h, w) = (height_factor.abs(), width_factor.abs());
        Self::from_config(RandomTranslationConfig {
            height_factor: (-h, h),
            width_factor: (-w, w),
            ..Default::default()
        })
    }

    /// Vertical shifts drawn from `lower..upper` (fractions of the height).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomTranslation;
    /// let down_only = RandomTranslation::new(0.0, 0.0).height_range(0.0, 0.3);
    /// assert_eq!(down_only.config().height_factor, (0.0, 0.3));
    /// ```
    pub fn height_range(self, lower: f64, upper: f64) -> Self {
        self.with_config(|c| c.height_factor = (lower, upper))
    }

    /// Horizontal shifts drawn from `lower..upper` (fractions of the width).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomTranslation;
    /// let t = RandomTranslation::new(0.0, 0.0).width_range(-0.1, 0.2);
    /// assert_eq!(t.config().width_factor, (-0.1, 0.2));
    /// ```
    pub fn width_range(self, lower: f64, upper: f64) -> Self {
        self.with_config(|c| c.width_factor = (lower, upper))
    }
}

impl LayerOp for RandomTranslationConfig {
    fn type_name(&self) -> &'static str {
        "RandomTranslation"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let shape = one_input(layer, inputs)?;
        expect_chw(layer, shape)?;
        check_factor(layer, "height_factor", self.height_factor, (-1.0, 1.0))?;
        check_factor(layer, "width_factor", self.width_factor, (-1.0, 1.0))?;
        self.resampling.check(layer)?;
        Ok(vec![shape.to_vec()])
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        resample_in_training(
            &inputs[0],
            params,
            &self.resampling,
            |rng, height, width| {
                let dy = uniform(rng, self.height_factor) * height as f64;
                let dx = uniform(rng, self.width_factor) * width as f64;
                AffineTransform::translation(dx as f32, dy as f32)
            },
        )
    }
}

/// `RandomTranslation`, saved and imported from Keras's class of that name.
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<RandomTranslationConfig>(|| {
    let layer = RandomTranslation::new(0.25, 0.25).fill_mode(FillMode::Constant);
    LayerExample::new(&layer, &[&[2, 4, 4]])
})
.keras(&[KerasClass::new("RandomTranslation", translation_from_keras)])];

fn translation_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    Translated::new(
        "RandomTranslation",
        RandomTranslationConfig {
            height_factor: keras_factor(layer.field("height_factor"), -1.0)?,
            width_factor: keras_factor(layer.field("width_factor"), -1.0)?,
            resampling: Resampling::from_keras(layer)?,
        },
    )
}

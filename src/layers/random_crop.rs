//! `RandomCrop`: Keras's augmentation layer that crops a random `(height, width)` window
//! while training, with Keras's rules: **one** window position for the whole batch (Keras
//! draws one offset per call), and an input not larger than the window on both sides is
//! cut and resized to the window's size instead (Keras's code, checked against it).
//!
//! At inference the output must still be `(height, width)` (this crate's shapes are fixed
//! when the model is built), so the layer does what Keras documents: the largest centred
//! window of the output's aspect ratio, resized (for a padded 40x40 image and a 32x32 crop,
//! the whole image shrunk to 32x32). Keras 3.15's code instead returns the input unchanged
//! at inference, whatever its size. For CIFAR-style pad-and-crop, `RandomTranslation` with
//! constant fill is the better layer: per image, and the identity at inference.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Result;
use crate::graph::{Configured, LayerOp, Params};
use crate::layers::image_transform::Interpolation;
use crate::layers::keras::{KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::resizing::{aspect_window, resize, sized_output};

/// Config of a [`RandomCrop`] layer.
///
/// # Examples
/// ```
/// use candle_functional::layers::RandomCropConfig;
/// assert_eq!(RandomCropConfig::default().height, 0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RandomCropConfig {
    /// Output height.
    pub height: usize,
    /// Output width.
    pub width: usize,
}

/// A random `(height, width)` window of the batch in training, the same for every image
/// (Keras's `RandomCrop`); the centred window of that aspect ratio, resized, in inference.
///
/// # Shapes
/// Input `(batch, c, h, w)`; output `(batch, c, height, width)`.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::layers::RandomCrop;
/// let x = Input::new([1, 4, 4]);
/// let y = RandomCrop::new(2, 2).call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let image = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 1, 4, 4))?;
/// let window = model.forward(&[image], Mode::Train)?[0].flatten_all()?.to_vec1::<f32>()?;
/// // Some 2x2 window: its rows are neighbours.
/// assert_eq!((window[1] - window[0], window[2] - window[0]), (1.0, 4.0));
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type RandomCrop = Configured<RandomCropConfig>;

impl RandomCrop {
    /// Random `(height, width)` windows.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomCrop;
    /// assert_eq!(RandomCrop::new(24, 32).config().width, 32);
    /// ```
    pub fn new(height: usize, width: usize) -> Self {
        Self::from_config(RandomCropConfig { height, width })
    }
}

impl LayerOp for RandomCropConfig {
    fn type_name(&self) -> &'static str {
        "RandomCrop"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        sized_output(layer, inputs, (self.height, self.width))
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = (self.height, self.width);
        if !params.mode().is_train() {
            return Ok(vec![resize(x, (th, tw), Interpolation::Bilinear, true)?]);
        }
        if h > th && w > tw {
            let mut rng = StdRng::seed_from_u64(params.seed());
            let top = rng.random_range(0..=h - th);
            let left = rng.random_range(0..=w - tw);
            return Ok(vec![x.narrow(2, top, th)?.narrow(3, left, tw)?]);
        }
        // Keras's training path for a small input, to the letter: the aspect-ratio window's
        // corner, a window of the *output's* size from there (clipped to the image), resized.
        let (top, left, _, _) = aspect_window((h, w), (th, tw));
        let window = x
            .narrow(2, top, th.min(h - top))?
            .narrow(3, left, tw.min(w - left))?;
        Ok(vec![resize(
            &window,
            (th, tw),
            Interpolation::Bilinear,
            false,
        )?])
    }
}

/// `RandomCrop`, saved and imported from Keras's class of that name.
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<RandomCropConfig>(|| {
    LayerExample::new(&RandomCrop::new(3, 2), &[&[2, 4, 4]])
})
.keras(&[KerasClass::new("RandomCrop", random_crop_from_keras)])];

fn random_crop_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    Translated::new(
        "RandomCrop",
        RandomCropConfig {
            height: layer.int("height")?,
            width: layer.int("width")?,
        },
    )
}

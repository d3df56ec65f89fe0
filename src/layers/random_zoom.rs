//! `RandomZoom`: Keras's augmentation layer that zooms each image in or out about its centre
//! by a random factor while training, filling what zooming out uncovers as its `fill_mode`
//! says, and passes images through unchanged otherwise. Keras's sign convention: a positive
//! factor zooms *out* (the image shrinks), a negative one zooms in.

use candle_core::Tensor;

use crate::graph::{Configured, LayerOp, Params};
use crate::layers::image_transform::{
    AffineTransform, Resampling, check_factor, impl_resampled, keras_factor, resample_in_training,
    uniform,
};
use crate::layers::keras::{KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::{expect_chw, one_input};
use crate::{Error, Result};

/// Config of a [`RandomZoom`] layer; defaults are Keras's (reflect, bilinear, fill 0), with no
/// zoom.
///
/// # Examples
/// ```
/// use candle_functional::layers::RandomZoomConfig;
/// assert_eq!(RandomZoomConfig::default().width_factor, None);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RandomZoomConfig {
    /// Vertical zoom range: the image is read `1 + f` times as far from its centre, `f` drawn
    /// from this range (`(-0.2, 0.3)`: from 20% zoomed in to 30% zoomed out).
    pub height_factor: (f64, f64),
    /// Horizontal zoom range; `None` (Keras's default) reuses the vertical draw, keeping the
    /// aspect ratio.
    pub width_factor: Option<(f64, f64)>,
    /// Fill mode, interpolation and fill value.
    #[serde(flatten)]
    pub resampling: Resampling,
}

impl_resampled!(RandomZoomConfig);

/// Zooms each image of a batch in or out at random in training (Keras's `RandomZoom`); the
/// identity in inference.
///
/// # Shapes
/// Input and output `(batch, c, h, w)`.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::layers::{FillMode, RandomZoom};
/// let x = Input::new([1, 6, 6]);
/// let y = RandomZoom::new(0.0).height_range(0.5, 0.5).fill_mode(FillMode::Constant).call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let ones = Tensor::ones((1, 1, 6, 6), DType::F32, &Device::Cpu)?;
/// // Zoomed out to 2/3 of its size: zeros come in around it.
/// let out = model.forward(&[ones], Mode::Train)?[0].sum_all()?.to_scalar::<f32>()?;
/// assert!(out < 36.0);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type RandomZoom = Configured<RandomZoomConfig>;

impl RandomZoom {
    /// Zooms of up to `height_factor` either way, the same factor for the width (Keras's
    /// `RandomZoom(height_factor)`).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomZoom;
    /// assert_eq!(RandomZoom::new(0.2).config().height_factor, (-0.2, 0.2));
    /// ```
    pub fn new(height_factor: f64) -> Self {
        let f = height_factor.abs();
        Self::from_config(RandomZoomConfig {
            height_factor: (-f, f),
            ..Default::default()
        })
    }

    /// Vertical zoom factors drawn from `lower..upper`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomZoom;
    /// assert_eq!(RandomZoom::new(0.0).height_range(-0.3, 0.0).config().height_factor, (-0.3, 0.0));
    /// ```
    pub fn height_range(self, lower: f64, upper: f64) -> Self {
        self.with_config(|c| c.height_factor = (lower, upper))
    }

    /// Horizontal zoom factors drawn on their own from `lower..upper` (the aspect ratio then
    /// changes).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::RandomZoom;
    /// let z = RandomZoom::new(0.2).width_range(-0.1, 0.1);
    /// assert_eq!(z.config().width_factor, Some((-0.1, 0.1)));
    /// ```
    pub fn width_range(self, lower: f64, upper: f64) -> Self {
        self.with_config(|c| c.width_factor = Some((lower, upper)))
    }
}

impl LayerOp for RandomZoomConfig {
    fn type_name(&self) -> &'static str {
        "RandomZoom"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let shape = one_input(layer, inputs)?;
        expect_chw(layer, shape)?;
        // Keras refuses -1 too: the image would be read at scale 0.
        check_factor(layer, "height_factor", self.height_factor, (-1.0, 1.0))?;
        let mut lowest = self.height_factor.0.min(self.height_factor.1);
        if let Some(width) = self.width_factor {
            check_factor(layer, "width_factor", width, (-1.0, 1.0))?;
            lowest = lowest.min(width.0.min(width.1));
        }
        if lowest <= -1.0 {
            return Err(Error::InvalidConfig {
                layer: layer.to_string(),
                message: "a zoom factor of -1 reads the image at scale 0".to_string(),
            });
        }
        self.resampling.check(layer)?;
        Ok(vec![shape.to_vec()])
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        resample_in_training(
            &inputs[0],
            params,
            &self.resampling,
            |rng, height, width| {
                let zy = 1.0 + uniform(rng, self.height_factor);
                let zx = match self.width_factor {
                    Some(range) => 1.0 + uniform(rng, range),
                    None => zy,
                };
                AffineTransform::zoom(zx as f32, zy as f32, height, width)
            },
        )
    }
}

/// `RandomZoom`, saved and imported from Keras's class of that name.
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<RandomZoomConfig>(|| {
    LayerExample::new(&RandomZoom::new(0.2).width_range(-0.1, 0.3), &[&[2, 5, 4]])
})
.keras(&[KerasClass::new("RandomZoom", zoom_from_keras)])];

fn zoom_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    let width_factor = match layer.field("width_factor") {
        serde_json::Value::Null => None,
        value => Some(keras_factor(value, -1.0)?),
    };
    Translated::new(
        "RandomZoom",
        RandomZoomConfig {
            height_factor: keras_factor(layer.field("height_factor"), -1.0)?,
            width_factor,
            resampling: Resampling::from_keras(layer)?,
        },
    )
}

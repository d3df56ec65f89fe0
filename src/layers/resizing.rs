//! `Resizing` and `CenterCrop`: Keras's preprocessing layers that bring images to one size
//! inside the model, so that a saved model takes pictures of any size its input allows.
//! Both resample as `tf.image.resize` does (half-pixel centres, no antialiasing; checked
//! against Keras in `tests/image_augmentation.rs`) and act in training and inference alike.
//! The resampling along one axis (`resize_axis`) is also `UpSampling2D`'s bilinear path and
//! `RandomCrop`'s.

use candle_core::Tensor;

use crate::Result;
use crate::graph::{Configured, LayerOp, Params};
use crate::layers::image_transform::Interpolation;
use crate::layers::keras::{KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::{expect_chw, expect_positive, one_input};
use crate::support::dtype::Cast;

/// `x` resized along `axis` to `out_len`, as TensorFlow's `tf.image.resize` does (half-pixel
/// centres: output `i` samples the input at `(i + 0.5) · len / out_len - 0.5`); bilinear reads
/// blend the two nearest input pixels (clamped at the edges), nearest reads take
/// `floor((i + 0.5) · len / out_len)`. No antialiasing. Used by `Resizing`, `CenterCrop` and
/// `UpSampling2D`.
pub(crate) fn resize_axis(
    x: &Tensor,
    axis: usize,
    out_len: usize,
    interpolation: Interpolation,
) -> Result<Tensor> {
    let len = x.dim(axis)?;
    if out_len == len {
        return Ok(x.clone());
    }
    // candle's index_select reads contiguous tensors only (a cropped window is not).
    let x = &x.contiguous()?;
    let device = x.device();
    let scale = len as f32 / out_len as f32;
    let last = len as i64 - 1;
    let pick = |index: Vec<u32>| -> Result<Tensor> {
        Ok(x.index_select(&Tensor::from_vec(index, out_len, device)?, axis)?)
    };
    match interpolation {
        Interpolation::Nearest => {
            let index = (0..out_len)
                .map(|i| (((i as f32 + 0.5) * scale).floor() as i64).min(last) as u32)
                .collect();
            pick(index)
        }
        Interpolation::Bilinear => {
            let (mut lower, mut upper, mut weight) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..out_len {
                let at = (i as f32 + 0.5) * scale - 0.5;
                let floor = at.floor();
                lower.push((floor as i64).clamp(0, last) as u32);
                upper.push((at.ceil() as i64).clamp(0, last) as u32);
                weight.push(at - floor);
            }
            let mut shape = vec![1; x.rank()];
            shape[axis] = out_len;
            let weight = Tensor::from_vec(weight, shape, device)?.cast(x.dtype())?;
            let (low, high) = (pick(lower)?, pick(upper)?);
            // low + w · (high - low)
            Ok((&low + (high - &low)?.broadcast_mul(&weight)?)?)
        }
    }
}

/// The centred window of `(height, width)` with the aspect ratio of `target` (Keras's
/// `crop_to_aspect_ratio` and `smart_resize`, its truncations included):
/// `(top, left, crop_height, crop_width)`.
pub(crate) fn aspect_window(
    (height, width): (usize, usize),
    (target_height, target_width): (usize, usize),
) -> (usize, usize, usize, usize) {
    let crop_height = ((width * target_height) as f64 / target_width as f64) as usize;
    let crop_height = crop_height.min(height).max(1);
    let crop_width = ((height * target_width) as f64 / target_height as f64) as usize;
    let crop_width = crop_width.min(width).max(1);
    let top = ((height - crop_height) as f64 / 2.0) as usize;
    let left = ((width - crop_width) as f64 / 2.0) as usize;
    (top, left, crop_height, crop_width)
}

/// Config of a [`Resizing`] layer; defaults are Keras's (bilinear, no crop), with no size.
///
/// # Examples
/// ```
/// use candle_functional::layers::{Interpolation, ResizingConfig};
/// assert_eq!(ResizingConfig::default().interpolation, Interpolation::Bilinear);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ResizingConfig {
    /// Output height.
    pub height: usize,
    /// Output width.
    pub width: usize,
    /// How output pixels are read.
    pub interpolation: Interpolation,
    /// First crop the largest centred window with the output's aspect ratio, so the image
    /// is not stretched.
    pub crop_to_aspect_ratio: bool,
}

impl Default for ResizingConfig {
    fn default() -> Self {
        Self {
            height: 0,
            width: 0,
            interpolation: Interpolation::Bilinear,
            crop_to_aspect_ratio: false,
        }
    }
}

/// Resizes images to `(height, width)` (Keras's `Resizing`).
///
/// # Shapes
/// Input `(batch, c, h, w)`; output `(batch, c, height, width)`.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// let x = Input::new([3, 64, 48]);
/// let y = Resizing::new(32, 32).crop_to_aspect_ratio(true).call(&x)?;
/// assert_eq!(y.shape(), &[3, 32, 32]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Resizing = Configured<ResizingConfig>;

impl Resizing {
    /// Resizes to `(height, width)`, bilinear.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Resizing::new(24, 32).config().width, 32);
    /// ```
    pub fn new(height: usize, width: usize) -> Self {
        Self::from_config(ResizingConfig {
            height,
            width,
            ..Default::default()
        })
    }

    /// How output pixels are read.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let r = Resizing::new(8, 8).interpolation(Interpolation::Nearest);
    /// assert_eq!(r.config().interpolation, Interpolation::Nearest);
    /// ```
    pub fn interpolation(self, interpolation: Interpolation) -> Self {
        self.with_config(|c| c.interpolation = interpolation)
    }

    /// Crops the centred window of the output's aspect ratio before resizing.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert!(Resizing::new(8, 8).crop_to_aspect_ratio(true).config().crop_to_aspect_ratio);
    /// ```
    pub fn crop_to_aspect_ratio(self, crop: bool) -> Self {
        self.with_config(|c| c.crop_to_aspect_ratio = crop)
    }
}

/// `x` `(batch, c, h, w)` resized to `size`, after a centred crop to its aspect ratio when
/// `crop` (Keras's `ops.image.resize` with the TensorFlow backend).
pub(crate) fn resize(
    x: &Tensor,
    size: (usize, usize),
    interpolation: Interpolation,
    crop: bool,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let x = if crop {
        let (top, left, ch, cw) = aspect_window((h, w), size);
        x.narrow(2, top, ch)?.narrow(3, left, cw)?
    } else {
        x.clone()
    };
    let x = resize_axis(&x, 2, size.0, interpolation)?;
    resize_axis(&x, 3, size.1, interpolation)
}

/// The shape rule of the layers that turn one image into a `(height, width)` one.
pub(crate) fn sized_output(
    layer: &str,
    inputs: &[Vec<usize>],
    (height, width): (usize, usize),
) -> Result<Vec<Vec<usize>>> {
    let (c, _, _) = expect_chw(layer, one_input(layer, inputs)?)?;
    expect_positive(layer, "height and width", &[height, width])?;
    Ok(vec![vec![c, height, width]])
}

impl LayerOp for ResizingConfig {
    fn type_name(&self) -> &'static str {
        "Resizing"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        sized_output(layer, inputs, (self.height, self.width))
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let size = (self.height, self.width);
        Ok(vec![resize(
            &inputs[0],
            size,
            self.interpolation,
            self.crop_to_aspect_ratio,
        )?])
    }
}

/// Config of a [`CenterCrop`] layer.
///
/// # Examples
/// ```
/// use candle_functional::layers::CenterCropConfig;
/// assert_eq!(CenterCropConfig::default().height, 0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CenterCropConfig {
    /// Output height.
    pub height: usize,
    /// Output width.
    pub width: usize,
}

/// The centred `(height, width)` window of each image (Keras's `CenterCrop`). An image
/// smaller than that on either side is, as in Keras, cropped to the output's aspect ratio and
/// resized (bilinear) instead.
///
/// # Shapes
/// Input `(batch, c, h, w)`; output `(batch, c, height, width)`.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// let x = Input::new([1, 4, 4]);
/// let y = CenterCrop::new(2, 2).call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let image = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 1, 4, 4))?;
/// let out = model.forward(&[image], Mode::Eval)?[0].flatten_all()?.to_vec1::<f32>()?;
/// assert_eq!(out, [5.0, 6.0, 9.0, 10.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type CenterCrop = Configured<CenterCropConfig>;

impl CenterCrop {
    /// The centred `(height, width)` window.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(CenterCrop::new(24, 32).config().height, 24);
    /// ```
    pub fn new(height: usize, width: usize) -> Self {
        Self::from_config(CenterCropConfig { height, width })
    }
}

impl LayerOp for CenterCropConfig {
    fn type_name(&self) -> &'static str {
        "CenterCrop"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        sized_output(layer, inputs, (self.height, self.width))
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = (self.height, self.width);
        if h >= th && w >= tw {
            let (top, left) = ((h - th) / 2, (w - tw) / 2);
            return Ok(vec![x.narrow(2, top, th)?.narrow(3, left, tw)?]);
        }
        Ok(vec![resize(x, (th, tw), Interpolation::Bilinear, true)?])
    }
}

/// `Resizing` and `CenterCrop`, saved and imported from Keras's classes of those names.
pub(crate) const KINDS: &[LayerKind] = &[
    LayerKind::of::<ResizingConfig>(|| LayerExample::new(&Resizing::new(3, 5), &[&[2, 4, 4]]))
        .keras(&[KerasClass::new("Resizing", resizing_from_keras)]),
    LayerKind::of::<CenterCropConfig>(|| LayerExample::new(&CenterCrop::new(2, 3), &[&[2, 4, 4]]))
        .keras(&[KerasClass::new("CenterCrop", center_crop_from_keras)]),
];

fn resizing_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    if layer.flag("pad_to_aspect_ratio", false) {
        return Err("pad_to_aspect_ratio=True is not supported".into());
    }
    if layer.flag("antialias", false) {
        return Err("antialias=True is not supported".into());
    }
    let interpolation = match layer.field("interpolation").as_str() {
        Some("bilinear") | None => Interpolation::Bilinear,
        Some("nearest") => Interpolation::Nearest,
        Some(other) => return Err(format!("interpolation `{other}` is not supported")),
    };
    Translated::new(
        "Resizing",
        ResizingConfig {
            height: layer.int("height")?,
            width: layer.int("width")?,
            interpolation,
            crop_to_aspect_ratio: layer.flag("crop_to_aspect_ratio", false),
        },
    )
}

fn center_crop_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    Translated::new(
        "CenterCrop",
        CenterCropConfig {
            height: layer.int("height")?,
            width: layer.int("width")?,
        },
    )
}

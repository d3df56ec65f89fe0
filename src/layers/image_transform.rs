//! Geometric resampling shared by the augmentation layers `RandomTranslation`,
//! `RandomRotation` and `RandomZoom`: Keras's `keras.ops.image.affine_transform` with the
//! TensorFlow backend's semantics (`ImageProjectiveTransformV3`), so that a layer given the
//! same draw produces Keras's pixels (checked against Keras in `tests/augmentation.rs`).
//!
//! Where each output pixel reads from depends only on the transforms and the image size, so
//! it is worked out on the host (a few values per pixel) and the pixels themselves are
//! gathered on the tensor's device: up to four gathers weighted and summed, which candle can
//! differentiate. Also the factor rules the layers share (`check_factor`, `keras_factor`),
//! Keras's.

use std::str::FromStr;

use candle_core::Tensor;
use rand::Rng;
use rand::rngs::StdRng;

use crate::graph::{Configured, LayerOp};
use crate::layers::keras::KerasLayer;
use crate::{Error, Result};

/// How pixels between input pixels are read (`UpSampling2D`, `Resizing` and the geometric
/// augmentation layers; each layer has its own default, Keras's).
///
/// # Examples
/// ```
/// use candle_functional::layers::Interpolation;
/// assert_eq!(Interpolation::default(), Interpolation::Nearest);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// The nearest input pixel (each pixel repeated, when upsampling).
    #[default]
    Nearest,
    /// Linear in each axis between the two nearest input pixels, with half-pixel centres.
    Bilinear,
}

/// What an output pixel that maps outside the input reads (Keras's `fill_mode`).
///
/// # Examples
/// ```
/// use candle_functional::layers::FillMode;
/// assert_eq!(FillMode::default(), FillMode::Reflect);
/// assert_eq!("wrap".parse::<FillMode>(), Ok(FillMode::Wrap));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FillMode {
    /// Mirrored about the edge, edge pixel repeated (`d c b a | a b c d | d c b a`); Keras's
    /// default.
    #[default]
    Reflect,
    /// Tiled (`a b c d | a b c d | a b c d`).
    Wrap,
    /// A constant, the layer's `fill_value` (`k k k k | a b c d | k k k k`).
    Constant,
    /// The nearest edge pixel (`a a a a | a b c d | d d d d`).
    Nearest,
}

impl FromStr for FillMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "reflect" => Ok(FillMode::Reflect),
            "wrap" => Ok(FillMode::Wrap),
            "constant" => Ok(FillMode::Constant),
            "nearest" => Ok(FillMode::Nearest),
            other => Err(format!("fill mode `{other}`")),
        }
    }
}

/// How the resampling layers read pixels: fill mode, interpolation and fill value, Keras's
/// defaults (reflect, bilinear, 0). Saved inline in their configs.
///
/// # Examples
/// ```
/// use candle_functional::layers::{FillMode, Interpolation, Resampling};
/// let r = Resampling::default();
/// assert_eq!((r.fill_mode, r.interpolation, r.fill_value), (FillMode::Reflect, Interpolation::Bilinear, 0.0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Resampling {
    /// What pixels that map outside the input read.
    pub fill_mode: FillMode,
    /// How pixels between input pixels are read.
    pub interpolation: Interpolation,
    /// The value `FillMode::Constant` brings in.
    pub fill_value: f64,
}

impl Default for Resampling {
    fn default() -> Self {
        Self {
            fill_mode: FillMode::Reflect,
            interpolation: Interpolation::Bilinear,
            fill_value: 0.0,
        }
    }
}

impl Resampling {
    /// `images` resampled through one transform per image.
    pub(crate) fn apply(&self, images: &Tensor, transforms: &[AffineTransform]) -> Result<Tensor> {
        affine_transform(
            images,
            transforms,
            self.interpolation,
            self.fill_mode,
            self.fill_value,
        )
    }

    /// Refuses a fill value that is not finite.
    pub(crate) fn check(&self, layer: &str) -> Result<()> {
        if self.fill_value.is_finite() {
            return Ok(());
        }
        Err(Error::InvalidConfig {
            layer: layer.to_string(),
            message: format!("fill_value {} is not finite", self.fill_value),
        })
    }

    /// Keras's `fill_mode`, `interpolation` and `fill_value` fields.
    pub(crate) fn from_keras(layer: &KerasLayer) -> std::result::Result<Self, String> {
        let interpolation = match layer.field("interpolation").as_str() {
            Some("bilinear") | None => Interpolation::Bilinear,
            Some("nearest") => Interpolation::Nearest,
            Some(other) => return Err(format!("interpolation `{other}` is not supported")),
        };
        let fill_value = match layer.field("fill_value") {
            serde_json::Value::Null => 0.0,
            _ => layer.float("fill_value")?,
        };
        Ok(Self {
            fill_mode: layer.named("fill_mode")?,
            interpolation,
            fill_value,
        })
    }
}

/// A config that resamples images (`RandomTranslation`, `RandomRotation`, `RandomZoom`): it
/// gets the builder methods `fill_mode`, `interpolation` and `fill_value`.
///
/// # Examples
/// ```
/// use candle_functional::layers::{FillMode, RandomZoom, Resampled};
/// let zoom = RandomZoom::new(0.2).fill_mode(FillMode::Nearest);
/// assert_eq!(zoom.config().resampling().fill_mode, FillMode::Nearest);
/// ```
pub trait Resampled {
    /// The config's resampling settings.
    fn resampling(&self) -> &Resampling;
    /// The same, to change.
    fn resampling_mut(&mut self) -> &mut Resampling;
}

impl<C: LayerOp + Clone + Resampled> Configured<C> {
    /// What pixels that map outside the image read (Keras's `fill_mode`, default reflect).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::{FillMode, RandomRotation, Resampled};
    /// let r = RandomRotation::new(0.1).fill_mode(FillMode::Wrap);
    /// assert_eq!(r.config().resampling().fill_mode, FillMode::Wrap);
    /// ```
    pub fn fill_mode(self, fill_mode: FillMode) -> Self {
        self.with_config(|c| c.resampling_mut().fill_mode = fill_mode)
    }

    /// How pixels between input pixels are read (default bilinear; `Nearest` keeps whole
    /// pixels).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::{Interpolation, RandomTranslation, Resampled};
    /// let t = RandomTranslation::new(0.1, 0.1).interpolation(Interpolation::Nearest);
    /// assert_eq!(t.config().resampling().interpolation, Interpolation::Nearest);
    /// ```
    pub fn interpolation(self, interpolation: Interpolation) -> Self {
        self.with_config(|c| c.resampling_mut().interpolation = interpolation)
    }

    /// The value `FillMode::Constant` brings in (default 0).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::{RandomTranslation, Resampled};
    /// let t = RandomTranslation::new(0.1, 0.1).fill_value(0.5);
    /// assert_eq!(t.config().resampling().fill_value, 0.5);
    /// ```
    pub fn fill_value(self, fill_value: f64) -> Self {
        self.with_config(|c| c.resampling_mut().fill_value = fill_value)
    }
}

/// Implements [`Resampled`] for configs whose field `resampling` holds the settings.
macro_rules! impl_resampled {
    ($($config:ty),* $(,)?) => {$(
        impl $crate::layers::image_transform::Resampled for $config {
            fn resampling(&self) -> &$crate::layers::image_transform::Resampling {
                &self.resampling
            }

            fn resampling_mut(&mut self) -> &mut $crate::layers::image_transform::Resampling {
                &mut self.resampling
            }
        }
    )*};
}
pub(crate) use impl_resampled;

/// The forward pass the geometric augmentation layers share: `x` unchanged outside
/// training; in training each image resampled through `draw(rng, height, width)`, drawn in
/// order from the node's seed.
pub(crate) fn resample_in_training(
    x: &Tensor,
    params: &crate::graph::Params,
    resampling: &Resampling,
    mut draw: impl FnMut(&mut StdRng, usize, usize) -> AffineTransform,
) -> Result<Vec<Tensor>> {
    if !params.mode().is_train() {
        return Ok(vec![x.clone()]);
    }
    let (batch, _, height, width) = x.dims4()?;
    let mut rng = <StdRng as rand::SeedableRng>::seed_from_u64(params.seed());
    let transforms: Vec<AffineTransform> =
        (0..batch).map(|_| draw(&mut rng, height, width)).collect();
    Ok(vec![resampling.apply(x, &transforms)?])
}

/// A draw from `lower..upper` (the lower end when they are equal).
pub(crate) fn uniform(rng: &mut StdRng, (lower, upper): (f64, f64)) -> f64 {
    let (lower, upper) = (lower.min(upper), lower.max(upper));
    lower + (upper - lower) * rng.random::<f64>()
}

/// One image's transform from output to input coordinates, Keras's eight numbers
/// `[a0, a1, a2, b0, b1, b2, c0, c1]`: output pixel `(x, y)` reads the input at
/// `((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k)` with `k = c0 x + c1 y + 1`
/// (pixel centres at integer coordinates).
///
/// # Examples
/// ```
/// use candle_functional::layers::AffineTransform;
/// // Moving the image 2 pixels right: output x reads input x - 2.
/// assert_eq!(AffineTransform::translation(2.0, 0.0).values(), [1.0, 0.0, -2.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AffineTransform([f32; 8]);

impl AffineTransform {
    /// The eight numbers as Keras orders them.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::AffineTransform;
    /// let t = AffineTransform::new([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
    /// assert_eq!(t, AffineTransform::identity());
    /// ```
    pub fn new(values: [f32; 8]) -> Self {
        Self(values)
    }

    /// Every pixel reads itself.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::AffineTransform;
    /// assert_eq!(AffineTransform::identity().values()[0], 1.0);
    /// ```
    pub fn identity() -> Self {
        Self([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    }

    /// The image moved `dx` pixels right and `dy` down (`RandomTranslation`'s matrix).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::AffineTransform;
    /// assert_eq!(AffineTransform::translation(1.0, -3.0).values()[5], 3.0);
    /// ```
    pub fn translation(dx: f32, dy: f32) -> Self {
        Self([1.0, 0.0, -dx, 0.0, 1.0, -dy, 0.0, 0.0])
    }

    /// The image turned `degrees` about its centre (counter-clockwise for positive angles, as
    /// Keras's `RandomRotation`; its matrix, built as Keras builds it in float32).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::AffineTransform;
    /// let t = AffineTransform::rotation(0.0, 5, 7);
    /// assert_eq!(t, AffineTransform::identity());
    /// ```
    pub fn rotation(degrees: f32, height: usize, width: usize) -> Self {
        let angle = degrees * (std::f64::consts::PI / 180.0) as f32;
        let (sin, cos) = (angle.sin(), angle.cos());
        let cx = 0.5 * (width as f32 - 1.0);
        let cy = 0.5 * (height as f32 - 1.0);
        let (a0, a1, b0, b1) = (cos, -sin, sin, cos);
        let a2 = cx - cx * a0 - cy * a1;
        let b2 = cy - cx * b0 - cy * b1;
        Self([a0, a1, a2, b0, b1, b2, 0.0, 0.0])
    }

    /// Output pixels read the input `zx` (`zy`) times as far from the centre: factors above 1
    /// zoom out, below 1 zoom in (`RandomZoom`'s matrix).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::AffineTransform;
    /// assert_eq!(AffineTransform::zoom(1.0, 1.0, 4, 4), AffineTransform::identity());
    /// ```
    pub fn zoom(zx: f32, zy: f32, height: usize, width: usize) -> Self {
        let x_offset = (width as f32 - 1.0) / 2.0 * (1.0 - zx);
        let y_offset = (height as f32 - 1.0) / 2.0 * (1.0 - zy);
        Self([zx, 0.0, x_offset, 0.0, zy, y_offset, 0.0, 0.0])
    }

    /// The eight numbers.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::AffineTransform;
    /// assert_eq!(AffineTransform::identity().values().len(), 8);
    /// ```
    pub fn values(&self) -> [f32; 8] {
        self.0
    }

    /// The input point output pixel `(x, y)` reads, or `None` where the projection vanishes.
    fn source(&self, x: f32, y: f32) -> Option<(f32, f32)> {
        let [a0, a1, a2, b0, b1, b2, c0, c1] = self.0;
        let k = c0 * x + c1 * y + 1.0;
        if k == 0.0 {
            return None;
        }
        Some(((a0 * x + a1 * y + a2) / k, (b0 * x + b1 * y + b2) / k))
    }
}

/// Resamples each image of `images` `(batch, c, h, w)` through its transform (one per image),
/// as `keras.ops.image.affine_transform` does with the TensorFlow backend: the output has the
/// input's shape; `fill_value` is read outside the input under [`FillMode::Constant`].
/// Differentiable with respect to `images`.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::layers::{affine_transform, AffineTransform, FillMode, Interpolation};
/// let x = Tensor::new(&[[[[1f32, 2.0, 3.0]]]], &Device::Cpu)?;
/// let moved = affine_transform(&x, &[AffineTransform::translation(1.0, 0.0)],
///     Interpolation::Nearest, FillMode::Constant, 0.0)?;
/// assert_eq!(moved.flatten_all()?.to_vec1::<f32>()?, [0.0, 1.0, 2.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn affine_transform(
    images: &Tensor,
    transforms: &[AffineTransform],
    interpolation: Interpolation,
    fill_mode: FillMode,
    fill_value: f64,
) -> Result<Tensor> {
    let (batch, channels, height, width) = images.dims4()?;
    if transforms.len() != batch {
        return Err(Error::InvalidArgument(format!(
            "affine_transform: {} transforms for a batch of {batch} images",
            transforms.len()
        )));
    }
    let taps = Taps::plan(transforms, height, width, interpolation, fill_mode);
    let device = images.device();
    let pixels = height * width;
    let flat = images.reshape((batch, channels, pixels))?;
    let dtype = images.dtype();
    let weights = |w: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(w, (batch, 1, pixels), device)?
            .to_dtype(dtype)?
            .broadcast_as((batch, channels, pixels))?)
    };
    let mut out: Option<Tensor> = None;
    for (index, weight) in taps.index.into_iter().zip(taps.weight) {
        if weight.iter().all(|&w| w == 0.0) {
            continue;
        }
        let index = Tensor::from_vec(index, (batch, 1, pixels), device)?
            .broadcast_as((batch, channels, pixels))?
            .contiguous()?;
        let term = (flat.gather(&index, 2)? * weights(weight)?)?;
        out = Some(match out {
            Some(sum) => (sum + term)?,
            None => term,
        });
    }
    let mut out = match out {
        Some(sum) => sum,
        None => Tensor::zeros((batch, channels, pixels), dtype, device)?,
    };
    if fill_value != 0.0 && taps.fill.iter().any(|&w| w != 0.0) {
        let fill = weights(taps.fill)?.affine(fill_value, 0.0)?;
        out = (out + fill)?;
    }
    Ok(out.reshape((batch, channels, height, width))?)
}

/// Where each output pixel reads: up to four taps (index into the flattened image and weight)
/// and the weight of the fill value, each `batch * h * w` long.
struct Taps {
    index: Vec<Vec<u32>>,
    weight: Vec<Vec<f32>>,
    fill: Vec<f32>,
}

impl Taps {
    fn plan(
        transforms: &[AffineTransform],
        height: usize,
        width: usize,
        interpolation: Interpolation,
        fill_mode: FillMode,
    ) -> Self {
        let count = match interpolation {
            Interpolation::Nearest => 1,
            Interpolation::Bilinear => 4,
        };
        let n = transforms.len() * height * width;
        let mut taps = Taps {
            index: vec![Vec::with_capacity(n); count],
            weight: vec![Vec::with_capacity(n); count],
            fill: Vec::with_capacity(n),
        };
        let in_range =
            |y: f32, x: f32| y >= 0.0 && y < height as f32 && x >= 0.0 && x < width as f32;
        let flat = |y: f32, x: f32| y as u32 * width as u32 + x as u32;
        for transform in transforms {
            for oy in 0..height {
                for ox in 0..width {
                    let Some((sx, sy)) = transform.source(ox as f32, oy as f32) else {
                        for slot in 0..count {
                            taps.index[slot].push(0);
                            taps.weight[slot].push(0.0);
                        }
                        taps.fill.push(1.0);
                        continue;
                    };
                    let x = map_coordinate(sx, width, fill_mode);
                    let y = map_coordinate(sy, height, fill_mode);
                    // Each tap reads a pixel, or the fill value outside the image
                    // (TensorFlow's `read_with_fill_value`).
                    let corners: [(f32, f32, f32); 4];
                    let used: &[(f32, f32, f32)] = match interpolation {
                        Interpolation::Nearest => {
                            corners = [
                                (y.round(), x.round(), 1.0),
                                (0.0, 0.0, 0.0),
                                (0.0, 0.0, 0.0),
                                (0.0, 0.0, 0.0),
                            ];
                            &corners[..1]
                        }
                        Interpolation::Bilinear => {
                            let (y0, x0) = (y.floor(), x.floor());
                            let (y1, x1) = (y0 + 1.0, x0 + 1.0);
                            corners = [
                                (y0, x0, (y1 - y) * (x1 - x)),
                                (y0, x1, (y1 - y) * (x - x0)),
                                (y1, x0, (y - y0) * (x1 - x)),
                                (y1, x1, (y - y0) * (x - x0)),
                            ];
                            &corners
                        }
                    };
                    let mut fill = 0.0;
                    for (slot, &(cy, cx, w)) in used.iter().enumerate() {
                        if in_range(cy, cx) {
                            taps.index[slot].push(flat(cy, cx));
                            taps.weight[slot].push(w);
                        } else {
                            taps.index[slot].push(0);
                            taps.weight[slot].push(0.0);
                            fill += w;
                        }
                    }
                    taps.fill.push(fill);
                }
            }
        }
        taps
    }
}

/// An input coordinate outside `0..len` brought back inside as `fill_mode` says
/// (TensorFlow's `MapCoordinate`, whose integer truncations this repeats).
fn map_coordinate(coordinate: f32, len: usize, fill_mode: FillMode) -> f32 {
    let last = len as f32 - 1.0;
    let mapped = match fill_mode {
        FillMode::Constant => return coordinate,
        FillMode::Nearest => coordinate,
        FillMode::Reflect => {
            let mut c = coordinate;
            if c < 0.0 {
                if len <= 1 {
                    c = 0.0;
                } else {
                    let period = 2.0 * len as f32;
                    if c < period {
                        c += period * (-c / period).trunc();
                    }
                    c = if c < -(len as f32) {
                        c + period
                    } else {
                        -c - 1.0
                    };
                }
            } else if c > last {
                if len <= 1 {
                    c = 0.0;
                } else {
                    let period = 2.0 * len as f32;
                    c -= period * (c / period).trunc();
                    if c >= len as f32 {
                        c = period - c - 1.0;
                    }
                }
            }
            c
        }
        FillMode::Wrap => {
            let mut c = coordinate;
            if c < 0.0 {
                if len <= 1 {
                    c = 0.0;
                } else {
                    let span = last;
                    c += len as f32 * ((-c / span).trunc() + 1.0);
                }
            } else if c > last {
                if len <= 1 {
                    c = 0.0;
                } else {
                    let span = last;
                    c -= len as f32 * (c / span).trunc();
                }
            }
            c
        }
    };
    mapped.clamp(0.0, last)
}

/// Refuses a factor range `(lower, upper)` that is not finite or leaves `bounds`
/// (inclusive), naming the layer and the field.
pub(crate) fn check_factor(
    layer: &str,
    what: &str,
    (lower, upper): (f64, f64),
    bounds: (f64, f64),
) -> Result<()> {
    let (low, high) = (lower.min(upper), lower.max(upper));
    if low.is_finite() && high.is_finite() && low >= bounds.0 && high <= bounds.1 {
        return Ok(());
    }
    Err(Error::InvalidConfig {
        layer: layer.to_string(),
        message: format!(
            "{what} ({lower}, {upper}) must lie within [{}, {}]",
            bounds.0, bounds.1
        ),
    })
}

/// A Keras factor field as Keras normalizes it: one number `f` gives
/// `(max(-|f|, floor), |f|)`, a list of two is sorted.
pub(crate) fn keras_factor(
    value: &serde_json::Value,
    floor: f64,
) -> std::result::Result<(f64, f64), String> {
    match value {
        serde_json::Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0).abs();
            Ok(((-f).max(floor), f))
        }
        serde_json::Value::Array(v) if v.len() == 2 => match (v[0].as_f64(), v[1].as_f64()) {
            (Some(a), Some(b)) => Ok((a.min(b), a.max(b))),
            _ => Err(format!("factor {value} is not two numbers")),
        },
        other => Err(format!("factor {other} is not a number or a pair")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_and_wrap_map_like_tensorflow() {
        // d c b a | a b c d | d c b a
        assert_eq!(map_coordinate(-1.0, 4, FillMode::Reflect), 0.0);
        assert_eq!(map_coordinate(-2.0, 4, FillMode::Reflect), 1.0);
        assert_eq!(map_coordinate(4.0, 4, FillMode::Reflect), 3.0);
        assert_eq!(map_coordinate(5.0, 4, FillMode::Reflect), 2.0);
        // a b c d | a b c d
        assert_eq!(map_coordinate(-1.0, 4, FillMode::Wrap), 3.0);
        assert_eq!(map_coordinate(4.0, 4, FillMode::Wrap), 0.0);
        assert_eq!(map_coordinate(9.0, 4, FillMode::Nearest), 3.0);
        assert_eq!(map_coordinate(-9.0, 4, FillMode::Constant), -9.0);
    }
}

//! `UpSampling2D`: Keras's nearest-neighbour and bilinear upsampling of NCHW tensors, the
//! decoder half of a U-Net.
//!
//! Both are composed from differentiable candle ops: nearest repeats each pixel through a
//! broadcast (candle 0.11's `upsample_nearest2d` backward overwrites, rather than adds to, the
//! gradient of an input that has other consumers), and bilinear blends two gathered rows and
//! columns with TensorFlow's half-pixel centres, as Keras's `ops.image.resize` does.

use candle_core::Tensor;

use crate::Result;
use crate::graph::{Configured, LayerOp, Params};
use crate::layers::image_transform::Interpolation;
use crate::layers::keras::{KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::native_backward::Native;
use crate::layers::padding::{checked_size, expect_chw, expect_positive, one_input};
use crate::layers::resizing::resize_axis;
use crate::ops;

/// Configuration of an [`UpSampling2D`] layer; defaults are Keras's.
///
/// # Examples
/// ```
/// use candle_functional::layers::{Interpolation, UpSampling2DConfig};
/// let c = UpSampling2DConfig::default();
/// assert_eq!((c.size, c.interpolation), ((2, 2), Interpolation::Nearest));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct UpSampling2DConfig {
    /// Factors `(rows, columns)`.
    pub size: (usize, usize),
    /// Nearest (default) or bilinear.
    pub interpolation: Interpolation,
}

impl Default for UpSampling2DConfig {
    fn default() -> Self {
        Self {
            size: (2, 2),
            interpolation: Interpolation::Nearest,
        }
    }
}

/// Upsamples the height and width of NCHW tensors by integer factors (Keras's
/// `UpSampling2D`).
///
/// # Shapes
/// Input `(batch, c, h, w)`; output `(batch, c, h · rows, w · columns)`.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let y = UpSampling2D::new(2).call(&Input::new([8, 16, 16]))?;
/// assert_eq!(y.shape(), &[8, 32, 32]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type UpSampling2D = Configured<UpSampling2DConfig>;

impl UpSampling2D {
    /// The same factor along both axes, nearest-neighbour.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(UpSampling2D::new(3).config().size, (3, 3));
    /// ```
    pub fn new(size: usize) -> Self {
        Self::from_config(UpSampling2DConfig {
            size: (size, size),
            ..Default::default()
        })
    }

    /// Bilinear interpolation instead of nearest.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// use candle_functional::layers::Interpolation;
    /// assert_eq!(UpSampling2D::new(2).bilinear().config().interpolation, Interpolation::Bilinear);
    /// ```
    pub fn bilinear(self) -> Self {
        self.with_config(|c| c.interpolation = Interpolation::Bilinear)
    }

    /// Different factors for rows and columns.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(UpSampling2D::new(2).size(1, 3).config().size, (1, 3));
    /// ```
    pub fn size(self, rows: usize, columns: usize) -> Self {
        self.with_config(|c| c.size = (rows, columns))
    }
}

impl LayerOp for UpSampling2DConfig {
    fn type_name(&self) -> &'static str {
        "UpSampling2D"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let x = one_input(layer, inputs)?;
        let (c, h, w) = expect_chw(layer, x)?;
        expect_positive(layer, "upsampling factors", &[self.size.0, self.size.1])?;
        let what = "the upsampled size";
        Ok(vec![vec![
            c,
            checked_size(layer, what, h.checked_mul(self.size.0))?,
            checked_size(layer, what, w.checked_mul(self.size.1))?,
        ]])
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        let (rows, columns) = self.size;
        Ok(vec![match self.interpolation {
            Interpolation::Nearest => {
                let (n, c, h, w) = x.dims4()?;
                x.reshape((n, c, h, 1, w, 1))?
                    .broadcast_as((n, c, h, rows, w, columns))?
                    .reshape((n, c, h * rows, w * columns))?
            }
            Interpolation::Bilinear => {
                let (_, _, h, w) = x.dims4()?;
                let x = resize_axis(x, 2, h * rows, Interpolation::Bilinear)?;
                resize_axis(&x, 3, w * columns, Interpolation::Bilinear)?
            }
        }])
    }

    /// Lets the plan's own backward pass find the layer (`train/tape.rs`).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl UpSampling2DConfig {
    /// The forward pass for the plan's own backward pass (`train/tape.rs`): the output and
    /// what its gradient needs (nothing but the factors), for nearest upsampling of a float
    /// NCHW batch; `None` elsewhere (bilinear: candle's autograd). The gradient is the CPU's
    /// kernel there, unless `composed`; elsewhere one sum over each window, on any device.
    pub(crate) fn forward_native(
        &self,
        x: &Tensor,
        params: &Params,
        composed: bool,
    ) -> Result<Option<(Tensor, Native)>> {
        // Factors of 0 are refused when the graph is built; a config made by hand is not
        // divided by them here either.
        let (rows, columns) = self.size;
        if self.interpolation != Interpolation::Nearest
            || rows == 0
            || columns == 0
            || x.rank() != 4
            || !x.dtype().is_float()
        {
            return Ok(None);
        }
        let y = self.forward(std::slice::from_ref(x), params)?.remove(0);
        let native = Native::UpsampleNearest {
            factors: self.size,
            composed: composed || !ops::takes_cpu_kernels(x),
        };
        Ok(Some((y, native)))
    }
}

/// `UpSampling2D`, saved and imported from Keras's class of that name (nearest or bilinear).
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<UpSampling2DConfig>(|| {
    let up = UpSampling2D::new(2).size(2, 3).bilinear();
    LayerExample::new(&up, &[&[2, 3, 3]])
})
.keras(&[KerasClass::new("UpSampling2D", upsampling_from_keras)])];

fn upsampling_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    layer.needs_rank4()?;
    let interpolation = match layer.field("interpolation").as_str() {
        Some("nearest") | None => Interpolation::Nearest,
        Some("bilinear") => Interpolation::Bilinear,
        Some(other) => return Err(format!("interpolation `{other}` is not supported")),
    };
    Translated::new(
        "UpSampling2D",
        UpSampling2DConfig {
            size: layer.pair("size")?,
            interpolation,
        },
    )
}

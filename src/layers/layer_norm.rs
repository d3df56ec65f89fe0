//! `LayerNormalization`: normalizes each sample over some of its axes, with Keras's defaults.
//!
//! Unlike batch normalization there is no state and no difference between training and
//! inference: each sample is normalized with its own mean and (biased) variance over `axes`,
//! then scaled by `gamma` and shifted by `beta`, both shaped like those axes.

use candle_core::{DType, Tensor};

use crate::graph::{Configured, Initializer, LayerOp, ParamSpec, Params};
use crate::layers::keras::{Convert, KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::{non_batch_axis, one_input};
use crate::support::dtype::Cast;
use crate::{Error, Result};

/// Configuration of a [`LayerNormalization`] layer; defaults are Keras's.
///
/// # Examples
/// ```
/// use candle_functional::layers::LayerNormalizationConfig;
/// let c = LayerNormalizationConfig::default();
/// assert_eq!((c.axes.as_slice(), c.epsilon, c.center, c.scale), (&[1][..], 1e-3, true, true));
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LayerNormalizationConfig {
    /// Axes of the full tensor (batch is axis 0; negative counts from the end) to normalize
    /// over. Default `[1]`: the channels of an NCHW map, the features of `(batch, features)`,
    /// which is what Keras's default `axis=-1` means in its channels-last layout. Use
    /// `[1, 2, 3]` to normalize over a whole `(C, H, W)` sample.
    pub axes: Vec<isize>,
    /// Added to the variance before the square root (Keras: 1e-3).
    pub epsilon: f64,
    /// Learn a shift `beta` (default `true`).
    pub center: bool,
    /// Learn a scale `gamma` (default `true`).
    pub scale: bool,
    /// Default ones.
    pub gamma_initializer: Initializer,
    /// Default zeros.
    pub beta_initializer: Initializer,
}

impl Default for LayerNormalizationConfig {
    fn default() -> Self {
        Self {
            axes: vec![1],
            epsilon: 1e-3,
            center: true,
            scale: true,
            gamma_initializer: Initializer::Ones,
            beta_initializer: Initializer::Zeros,
        }
    }
}

/// Layer normalization (Keras's `LayerNormalization`).
///
/// Weights: `gamma` and `beta`, shaped like the normalized axes (absent when `scale` /
/// `center` is off).
///
/// # Shapes
/// Output shape = input shape.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// use candle_functional::layers::LayerNormalization;
/// let y = LayerNormalization::new().call(&Input::new([8, 4, 4]))?;
/// assert_eq!(y.layer().param_specs()[0].shape(), &[8]);
/// let z = LayerNormalization::new().axes([1, 2, 3]).call(&Input::new([8, 4, 4]))?;
/// assert_eq!(z.layer().param_specs()[0].shape(), &[8, 4, 4]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type LayerNormalization = Configured<LayerNormalizationConfig>;

impl LayerNormalization {
    /// Layer normalization over the channel axis, Keras's defaults otherwise.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::LayerNormalization;
    /// assert_eq!(LayerNormalization::new().config().epsilon, 1e-3);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The axes to normalize over.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::LayerNormalization;
    /// assert_eq!(LayerNormalization::new().axes([-1]).config().axes, [-1]);
    /// ```
    pub fn axes(self, axes: impl Into<Vec<isize>>) -> Self {
        let axes = axes.into();
        self.with_config(|c| c.axes = axes)
    }

    /// The epsilon added to the variance.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::LayerNormalization;
    /// assert_eq!(LayerNormalization::new().epsilon(1e-6).config().epsilon, 1e-6);
    /// ```
    pub fn epsilon(self, epsilon: f64) -> Self {
        self.with_config(|c| c.epsilon = epsilon)
    }

    /// With or without `gamma` and `beta`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::LayerNormalization;
    /// let c = LayerNormalization::new().scale_center(false, true);
    /// assert_eq!((c.config().scale, c.config().center), (false, true));
    /// ```
    pub fn scale_center(self, scale: bool, center: bool) -> Self {
        self.with_config(|c| {
            c.scale = scale;
            c.center = center;
        })
    }
}

impl LayerNormalizationConfig {
    /// The normalized axes of the full tensor, sorted, each once.
    fn resolved_axes(&self, layer: &str, sample_rank: usize) -> Result<Vec<usize>> {
        let mut axes = self
            .axes
            .iter()
            .map(|&a| non_batch_axis(layer, a, sample_rank))
            .collect::<Result<Vec<_>>>()?;
        axes.sort_unstable();
        axes.dedup();
        if axes.len() != self.axes.len() || axes.is_empty() {
            return Err(Error::InvalidConfig {
                layer: layer.to_string(),
                message: format!("axes {:?} must be distinct and not empty", self.axes),
            });
        }
        Ok(axes)
    }

    /// The shape of `gamma` / `beta`: the sizes of the normalized axes.
    fn param_shape(&self, input: &[usize]) -> Vec<usize> {
        match self.resolved_axes("layer_normalization", input.len()) {
            Ok(axes) => axes.iter().map(|&a| input[a - 1]).collect(),
            Err(_) => vec![1],
        }
    }
}

impl LayerOp for LayerNormalizationConfig {
    fn type_name(&self) -> &'static str {
        "LayerNormalization"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let x = one_input(layer, inputs)?;
        self.resolved_axes(layer, x.len())?;
        Ok(vec![x.to_vec()])
    }

    fn param_specs(&self, inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        let shape = self.param_shape(inputs.first().map(Vec::as_slice).unwrap_or(&[]));
        let mut specs = Vec::new();
        if self.scale {
            specs.push(ParamSpec::new(
                "gamma",
                shape.clone(),
                self.gamma_initializer.clone(),
            ));
        }
        if self.center {
            specs.push(ParamSpec::new("beta", shape, self.beta_initializer.clone()));
        }
        specs
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        let axes = self.resolved_axes("layer_normalization", x.rank() - 1)?;
        // Statistics in f32 at least, as Keras does under mixed precision.
        let dtype = x.dtype();
        let xf = match dtype {
            DType::F16 | DType::BF16 => x.cast(DType::F32)?,
            _ => x.clone(),
        };
        let mean = xf.mean_keepdim(axes.as_slice())?;
        let centered = xf.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(axes.as_slice())?;
        let mut y = centered.broadcast_div(&(var + self.epsilon)?.sqrt()?)?;
        // gamma / beta have the normalized axes' sizes; put them back in place (size 1 on
        // every other axis) to broadcast.
        let broadcast_shape: Vec<usize> = (0..x.rank())
            .map(|d| if axes.contains(&d) { x.dims()[d] } else { 1 })
            .collect();
        if self.scale {
            let gamma = params
                .get_as("gamma", y.dtype())?
                .reshape(broadcast_shape.as_slice())?;
            y = y.broadcast_mul(&gamma)?;
        }
        if self.center {
            let beta = params
                .get_as("beta", y.dtype())?
                .reshape(broadcast_shape.as_slice())?;
            y = y.broadcast_add(&beta)?;
        }
        Ok(vec![y.cast(dtype)?])
    }
}

/// `LayerNormalization`, saved and imported from Keras's class of that name (one axis or
/// several; not `rms_scaling`).
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<LayerNormalizationConfig>(|| {
    LayerExample::new(&LayerNormalization::new().axes([1, 2, 3]), &[&[3, 4, 5]])
})
.keras(&[KerasClass::new("LayerNormalization", layer_norm_from_keras)])];

fn layer_norm_from_keras(layer: &KerasLayer) -> Translation {
    if layer.flag("rms_scaling", false) {
        return Err("rms_scaling is not supported".into());
    }
    let keras_axes: Vec<i64> = match layer.field("axis") {
        serde_json::Value::Array(v) => v.iter().filter_map(serde_json::Value::as_i64).collect(),
        v => v.as_i64().into_iter().collect(),
    };
    if keras_axes.is_empty() {
        return Err(format!("axis {} is not supported", layer.field("axis")));
    }
    let ours = keras_axes
        .iter()
        .map(|&a| layer.axis(a, layer.rank()))
        .collect::<std::result::Result<Vec<isize>, String>>()?;
    let mut sorted = ours.clone();
    sorted.sort_unstable();
    // gamma and beta have Keras's axis order; this crate's follows the sorted axes.
    let order: Vec<usize> = sorted
        .iter()
        .filter_map(|a| ours.iter().position(|b| b == a))
        .collect();
    let convert = if order.len() > 1 {
        Convert::Permute(order)
    } else {
        Convert::Same
    };
    let (scale, center) = (layer.flag("scale", true), layer.flag("center", true));
    let config = LayerNormalizationConfig {
        axes: sorted,
        epsilon: layer.float("epsilon")?,
        center,
        scale,
        ..Default::default()
    };
    Ok(Translated::new("LayerNormalization", config)?
        .optional_weights(&[(scale, "gamma"), (center, "beta")], &convert))
}

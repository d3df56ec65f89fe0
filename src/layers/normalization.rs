//! `Normalization`: Keras's preprocessing layer that standardizes features,
//! `(x - mean) / max(sqrt(variance), 1e-7)` along one axis (the channels), with statistics
//! given or learnt from a data set by `adapt` (in `data/adapt.rs`: it reads a `Dataset`,
//! which lives on a floor above the layers). `invert` undoes it.

use candle_core::Tensor;

use crate::graph::{Configured, LayerOp, Params};
use crate::layers::keras::{KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::{channel_axis, one_input};
use crate::{Error, Result};

/// Keras's `backend.epsilon()`: the smallest standard deviation divided by.
const EPSILON: f64 = 1e-7;

/// Config of a [`Normalization`] layer: the axis of the features, and their statistics
/// (one value for every index of the axis, or one for all).
///
/// # Examples
/// ```
/// use candle_functional::layers::NormalizationConfig;
/// let c = NormalizationConfig::default();
/// assert_eq!((c.axis, c.mean.is_none(), c.invert), (1, true, false));
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct NormalizationConfig {
    /// The axis of the full tensor whose entries each have their statistics (1: channels).
    pub axis: isize,
    /// The means; `None` until given or adapted.
    pub mean: Option<Vec<f64>>,
    /// The variances; `None` until given or adapted.
    pub variance: Option<Vec<f64>>,
    /// Undo the normalization instead: `x · max(sqrt(variance), 1e-7) + mean`.
    pub invert: bool,
}

impl Default for NormalizationConfig {
    fn default() -> Self {
        Self {
            axis: 1,
            mean: None,
            variance: None,
            invert: false,
        }
    }
}

/// Standardizes features along the channel axis (Keras's `Normalization`): with the
/// statistics given here, or learnt from a data set with `Normalization::adapt` (Keras's
/// `layer.adapt(data)`). Saved with the model; the same in training and inference.
///
/// # Shapes
/// Any input with the axis; output of the same shape.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::layers::Normalization;
/// let x = Input::new([2, 1, 1]);
/// let y = Normalization::new(vec![1.0, 10.0], vec![4.0, 100.0]).call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let out = model.forward(&[Tensor::new(&[[[[3f32]], [[30.0]]]], &Device::Cpu)?], Mode::Eval)?;
/// assert_eq!(out[0].flatten_all()?.to_vec1::<f32>()?, [1.0, 2.0]); // (3-1)/2, (30-10)/10
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Normalization = Configured<NormalizationConfig>;

impl Normalization {
    /// With given statistics, one per channel (or one for all).
    ///
    /// # Examples
    /// ```
    /// let n = candle_functional::layers::Normalization::new(vec![0.5], vec![0.25]);
    /// assert_eq!(n.config().mean, Some(vec![0.5]));
    /// ```
    pub fn new(mean: Vec<f64>, variance: Vec<f64>) -> Self {
        Self::from_config(NormalizationConfig {
            mean: Some(mean),
            variance: Some(variance),
            ..Default::default()
        })
    }

    /// Undoes the normalization instead (Keras's `invert=True`).
    ///
    /// # Examples
    /// ```
    /// let n = candle_functional::layers::Normalization::new(vec![0.0], vec![1.0]).invert(true);
    /// assert!(n.config().invert);
    /// ```
    pub fn invert(self, invert: bool) -> Self {
        self.with_config(|c| c.invert = invert)
    }

    /// The axis of the features (default 1, the channels); on `(C, H, W)` maps a negative
    /// axis is refused, as for `Concatenate`.
    ///
    /// # Examples
    /// ```
    /// let n = candle_functional::layers::Normalization::new(vec![0.0], vec![1.0]).axis(2);
    /// assert_eq!(n.config().axis, 2);
    /// ```
    pub fn axis(self, axis: isize) -> Self {
        self.with_config(|c| c.axis = axis)
    }
}

impl NormalizationConfig {
    /// The statistics, checked against the size of the axis: both given, of one length,
    /// one value or one per index, variances finite and not negative.
    fn statistics(&self, layer: &str, size: usize) -> Result<(&[f64], &[f64])> {
        let bad = |message: String| Error::InvalidConfig {
            layer: layer.to_string(),
            message,
        };
        let (Some(mean), Some(variance)) = (&self.mean, &self.variance) else {
            return Err(bad(
                "no statistics: give mean and variance, or adapt the layer to a data set first"
                    .into(),
            ));
        };
        for (what, values) in [("mean", mean), ("variance", variance)] {
            if values.len() != 1 && values.len() != size {
                return Err(bad(format!(
                    "{} {what} values for an axis of {size}: give one, or one per index",
                    values.len()
                )));
            }
        }
        if mean.iter().any(|m| !m.is_finite())
            || variance.iter().any(|v| !(v.is_finite() && *v >= 0.0))
        {
            return Err(bad(
                "means must be finite, variances finite and not negative".into(),
            ));
        }
        Ok((mean, variance))
    }
}

impl LayerOp for NormalizationConfig {
    fn type_name(&self) -> &'static str {
        "Normalization"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let shape = one_input(layer, inputs)?;
        let axis = channel_axis(layer, self.axis, shape.len())?;
        self.statistics(layer, shape[axis - 1])?;
        Ok(vec![shape.to_vec()])
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        let axis = channel_axis("normalization", self.axis, x.rank() - 1)?;
        let size = x.dim(axis)?;
        let (mean, variance) = self.statistics("normalization", size)?;
        // (1, …, size, …, 1): broadcast along every other axis.
        let mut shape = vec![1; x.rank()];
        shape[axis] = mean.len();
        let column = |values: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(values, shape.as_slice(), x.device())?.to_dtype(x.dtype())?)
        };
        let mean = column(mean.to_vec())?;
        let std = column(variance.iter().map(|v| v.sqrt().max(EPSILON)).collect())?;
        let y = if self.invert {
            x.broadcast_mul(&std)?.broadcast_add(&mean)?
        } else {
            x.broadcast_sub(&mean)?.broadcast_div(&std)?
        };
        Ok(vec![y])
    }
}

/// What `adapt` accumulates over a data set for each index of `axis` (every other axis
/// reduced): the sum and the sum of squares, in f64, and the count of values summed.
pub(crate) fn axis_statistics(x: &Tensor, axis: usize) -> Result<(Tensor, Tensor, usize)> {
    let last = x.rank() - 1;
    let features = x
        .transpose(axis, last)?
        .to_dtype(candle_core::DType::F64)?
        .flatten_to(last - 1)?;
    let count = features.dim(0)?;
    let sum = features.sum(0)?;
    let squares = features.sqr()?.sum(0)?;
    Ok((sum, squares, count))
}

pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<NormalizationConfig>(|| {
    LayerExample::new(
        &Normalization::new(vec![0.5, 1.0, -2.0], vec![4.0, 0.25, 1.0]),
        &[&[3, 2, 2]],
    )
})
.keras(&[KerasClass::new("Normalization", normalization_from_keras)])];

fn normalization_from_keras(layer: &KerasLayer) -> Translation {
    let values = |key: &str| -> std::result::Result<Option<Vec<f64>>, String> {
        match layer.field(key) {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::Number(n) => Ok(n.as_f64().map(|v| vec![v])),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|v| v.as_f64().ok_or_else(|| format!("`{key}` holds {v}")))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(Some),
            other => Err(format!("`{key}` {other} is not supported")),
        }
    };
    let (mean, variance) = (values("mean")?, values("variance")?);
    // An adapted layer keeps its statistics as variables (mean, variance, count).
    let adapted = mean.is_none() || variance.is_none();
    let translated = Translated::new(
        "Normalization",
        NormalizationConfig {
            axis: layer.one_axis()?,
            mean,
            variance,
            invert: layer.flag("invert", false),
        },
    )?;
    Ok(if adapted {
        translated
            .config_from_var("mean", 0)
            .config_from_var("variance", 1)
    } else {
        translated
    })
}

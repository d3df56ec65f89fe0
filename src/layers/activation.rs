//! Activations: the [`ActivationFn`] functions, the [`Activation`] layer that applies one, and
//! the [`ReLU`] layer.
//!
//! Softmax normalizes over the channel axis (axis 1 of an NCHW or `(batch, features)`
//! tensor), which is Keras's last axis in its channels-last layout.

use candle_core::Tensor;

use crate::fusion::ElementWise;
use crate::graph::{Configured, LayerOp, Params};
use crate::layers::keras::{FeatureOrder, KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::{non_batch_axis, one_input};
use crate::{Error, Result};

/// An element-wise (or, for softmax, channel-wise) activation function.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::layers::ActivationFn;
/// let x = Tensor::new(&[[-1f32, 2.0]], &Device::Cpu)?;
/// assert_eq!(ActivationFn::Relu.apply(&x)?.to_vec2::<f32>()?, [[0.0, 2.0]]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ActivationFn {
    /// The identity.
    #[default]
    Linear,
    /// `max(x, 0)`.
    Relu,
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
    /// Softmax over the channel axis (axis 1).
    Softmax,
    /// Exact GELU, `x * Φ(x)` with the error function (Keras's `Activation("gelu")` default).
    Gelu,
    /// `x * sigmoid(x)` (also called swish).
    Silu,
    /// `max(x, 0.2 x)`: Keras's `leaky_relu` with its default slope 0.2.
    LeakyRelu,
    /// `x` above 0, `exp(x) - 1` below (Keras's `elu`, alpha 1).
    Elu,
    /// `x * relu6(x + 3) / 6` (Keras's `hard_swish`, also `hard_silu`).
    HardSwish,
}

impl ActivationFn {
    /// Keras's name for it (`"relu"`, `"softmax"`, ...).
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::layers::ActivationFn::Silu.name(), "silu");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            ActivationFn::Linear => "linear",
            ActivationFn::Relu => "relu",
            ActivationFn::Sigmoid => "sigmoid",
            ActivationFn::Tanh => "tanh",
            ActivationFn::Softmax => "softmax",
            ActivationFn::Gelu => "gelu",
            ActivationFn::Silu => "silu",
            ActivationFn::LeakyRelu => "leaky_relu",
            ActivationFn::Elu => "elu",
            ActivationFn::HardSwish => "hard_swish",
        }
    }

    /// Applies the function.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::layers::ActivationFn;
    /// let x = Tensor::new(&[[0f32, 0.0]], &Device::Cpu)?;
    /// assert_eq!(ActivationFn::Softmax.apply(&x)?.to_vec2::<f32>()?, [[0.5, 0.5]]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            ActivationFn::Linear => x.clone(),
            ActivationFn::Relu => crate::ops::relu(x)?,
            ActivationFn::Sigmoid => candle_nn::ops::sigmoid(x)?,
            ActivationFn::Tanh => x.tanh()?,
            ActivationFn::Softmax => candle_nn::ops::softmax(x, 1)?,
            ActivationFn::Gelu => x.gelu_erf()?,
            ActivationFn::Silu => x.silu()?,
            ActivationFn::LeakyRelu => x.maximum(&(x * 0.2)?)?,
            ActivationFn::Elu => x.elu(1.0)?,
            ActivationFn::HardSwish => (x * (x + 3.0)?.clamp(0.0, 6.0)?)?.affine(1.0 / 6.0, 0.0)?,
        })
    }
}

/// Parses Keras's activation names.
///
/// # Examples
/// ```
/// use candle_functional::layers::ActivationFn;
/// assert_eq!("softmax".parse::<ActivationFn>()?, ActivationFn::Softmax);
/// assert!("nope".parse::<ActivationFn>().is_err());
/// # Ok::<(), candle_functional::Error>(())
/// ```
impl std::str::FromStr for ActivationFn {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" | "identity" => ActivationFn::Linear,
            "relu" => ActivationFn::Relu,
            "sigmoid" => ActivationFn::Sigmoid,
            "tanh" => ActivationFn::Tanh,
            "softmax" => ActivationFn::Softmax,
            "gelu" => ActivationFn::Gelu,
            "silu" | "swish" => ActivationFn::Silu,
            "leaky_relu" => ActivationFn::LeakyRelu,
            "elu" => ActivationFn::Elu,
            "hard_swish" | "hard_silu" => ActivationFn::HardSwish,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown activation `{other}`"
                )));
            }
        })
    }
}

fn same_shape_as_input(layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
    Ok(vec![one_input(layer, inputs)?.to_vec()])
}

/// Config of an [`Activation`] layer: the function it applies.
///
/// # Examples
/// ```
/// use candle_functional::layers::{ActivationConfig, ActivationFn};
/// assert_eq!(ActivationConfig::default().function, ActivationFn::Linear);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ActivationConfig {
    /// The function.
    pub function: ActivationFn,
}

/// A layer that applies an [`ActivationFn`].
///
/// # Shapes
/// Output shape = input shape.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let y = Activation::new(ActivationFn::Tanh).call(&Input::new([4, 2, 2]))?;
/// assert_eq!(y.shape(), &[4, 2, 2]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Activation = Configured<ActivationConfig>;

impl Activation {
    /// An activation layer applying `function`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Activation::new(ActivationFn::Gelu).config().function, ActivationFn::Gelu);
    /// ```
    pub fn new(function: ActivationFn) -> Self {
        Self::from_config(ActivationConfig { function })
    }
}

impl LayerOp for ActivationConfig {
    fn type_name(&self) -> &'static str {
        "Activation"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        same_shape_as_input(layer, inputs)
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        Ok(vec![self.function.apply(&inputs[0])?])
    }

    fn as_element_wise(&self) -> Option<ElementWise> {
        (self.function == ActivationFn::Relu).then_some(ElementWise::Relu)
    }
}

/// Config of a [`ReLU`] layer, with Keras's options.
///
/// # Examples
/// ```
/// use candle_functional::layers::ReLUConfig;
/// let c = ReLUConfig::default();
/// assert_eq!((c.max_value, c.negative_slope), (None, 0.0));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ReLUConfig {
    /// Upper clip (`Some(6.0)` gives ReLU6).
    pub max_value: Option<f64>,
    /// Slope below zero (leaky ReLU when positive).
    pub negative_slope: f64,
}

/// Rectified linear unit layer: `max(x, 0)`, optionally leaky or clipped.
///
/// # Shapes
/// Output shape = input shape.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let y = ReLU::new().call(&Input::new([4]))?;
/// assert_eq!(y.layer().op().type_name(), "ReLU");
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type ReLU = Configured<ReLUConfig>;

impl ReLU {
    /// A plain ReLU.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(ReLU::new().config().max_value, None);
    /// ```
    pub fn new() -> Self {
        Self::from_config(ReLUConfig::default())
    }

    /// Clips the output at `max_value`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(ReLU::new().max_value(6.0).config().max_value, Some(6.0));
    /// ```
    pub fn max_value(self, max_value: f64) -> Self {
        self.with_config(|c| c.max_value = Some(max_value))
    }

    /// Leaky slope for negative inputs.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(ReLU::new().negative_slope(0.1).config().negative_slope, 0.1);
    /// ```
    pub fn negative_slope(self, slope: f64) -> Self {
        self.with_config(|c| c.negative_slope = slope)
    }
}

impl LayerOp for ReLUConfig {
    fn type_name(&self) -> &'static str {
        "ReLU"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        same_shape_as_input(layer, inputs)
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        let mut y = crate::ops::relu(x)?;
        if self.negative_slope != 0.0 {
            // x - relu(x) is the negative part.
            y = (&y + ((x - &y)? * self.negative_slope)?)?;
        }
        if let Some(max) = self.max_value {
            y = y.minimum(max)?;
        }
        Ok(vec![y])
    }

    /// A plain ReLU (no slope, no clip) can run inside the layer that reads it.
    fn as_element_wise(&self) -> Option<ElementWise> {
        (self.negative_slope == 0.0 && self.max_value.is_none()).then_some(ElementWise::Relu)
    }
}

/// Config of a [`Softmax`] layer: the axis it normalizes over.
///
/// # Examples
/// ```
/// assert_eq!(candle_functional::layers::SoftmaxConfig::default().axis, 1);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SoftmaxConfig {
    /// Axis of the full tensor (batch is axis 0; negative counts from the end). Default 1, the
    /// channel axis of NCHW tensors and the feature axis of `(batch, features)`: what Keras's
    /// default `axis=-1` means in its channels-last layout.
    pub axis: isize,
}

impl Default for SoftmaxConfig {
    fn default() -> Self {
        Self { axis: 1 }
    }
}

/// Softmax over any non-batch axis.
///
/// # Shapes
/// Output shape = input shape.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::layers::Softmax;
/// let x = Input::new([2, 3]);
/// let y = Softmax::new().axis(-1).call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let out = model.forward(&[Tensor::zeros((1, 2, 3), DType::F32, &Device::Cpu)?], Mode::Eval)?;
/// assert!((out[0].sum_all()?.to_scalar::<f32>()? - 2.0).abs() < 1e-6);
/// assert!(Softmax::new().axis(0).call(&Input::new([2, 3])).is_err());
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Softmax = Configured<SoftmaxConfig>;

impl Softmax {
    /// A softmax over axis 1 (channels).
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::layers::Softmax::new().config().axis, 1);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The axis to normalize over (negative counts from the end; the batch axis is refused).
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::layers::Softmax::new().axis(-1).config().axis, -1);
    /// ```
    pub fn axis(self, axis: isize) -> Self {
        self.with_config(|c| c.axis = axis)
    }
}

impl LayerOp for SoftmaxConfig {
    fn type_name(&self) -> &'static str {
        "Softmax"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let x = one_input(layer, inputs)?;
        non_batch_axis(layer, self.axis, x.len())?;
        Ok(vec![x.to_vec()])
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        let axis = non_batch_axis("softmax", self.axis, x.rank() - 1)?;
        Ok(vec![candle_nn::ops::softmax(x, axis)?])
    }
}

/// `Activation`, `ReLU` and `Softmax`, saved and imported from Keras's `Activation`, `ReLU`,
/// `LeakyReLU` (a `ReLU` with a negative slope) and `Softmax`; all act feature by feature,
/// so they pass a channels-last Flatten's order on.
pub(crate) const KINDS: &[LayerKind] = &[
    LayerKind::of::<ActivationConfig>(|| {
        LayerExample::new(&Activation::new(ActivationFn::Gelu), &[&[6]])
    })
    .keras(&[
        KerasClass::new("Activation", activation_from_keras).feature_order(FeatureOrder::PassesOn)
    ]),
    LayerKind::of::<ReLUConfig>(|| {
        LayerExample::new(
            &ReLU::new().max_value(6.0).negative_slope(0.1),
            &[&[2, 3, 3]],
        )
    })
    .keras(&[
        KerasClass::new("ReLU", relu_from_keras).feature_order(FeatureOrder::PassesOn),
        KerasClass::new("LeakyReLU", leaky_relu_from_keras).feature_order(FeatureOrder::PassesOn),
    ]),
    LayerKind::of::<SoftmaxConfig>(|| LayerExample::new(&Softmax::new().axis(1), &[&[3, 2, 2]]))
        .keras(&[
            KerasClass::new("Softmax", softmax_from_keras).feature_order(FeatureOrder::PassesOn)
        ]),
];

fn activation_from_keras(layer: &KerasLayer) -> Translation {
    Translated::new(
        "Activation",
        ActivationConfig {
            function: layer.named::<ActivationFn>("activation")?,
        },
    )
}

fn relu_from_keras(layer: &KerasLayer) -> Translation {
    if layer.field("threshold").as_f64().unwrap_or(0.0) != 0.0 {
        return Err("a non-zero threshold is not supported".into());
    }
    Translated::new(
        "ReLU",
        ReLUConfig {
            max_value: layer.field("max_value").as_f64(),
            negative_slope: layer.field("negative_slope").as_f64().unwrap_or(0.0),
        },
    )
}

fn leaky_relu_from_keras(layer: &KerasLayer) -> Translation {
    Translated::new(
        "ReLU",
        ReLUConfig {
            max_value: None,
            // Keras's default slope for LeakyReLU.
            negative_slope: layer.field("negative_slope").as_f64().unwrap_or(0.3),
        },
    )
}

fn softmax_from_keras(layer: &KerasLayer) -> Translation {
    Translated::new(
        "Softmax",
        SoftmaxConfig {
            axis: layer.one_axis()?,
        },
    )
}

//! `Dense`: a fully connected layer on the last axis.
//!
//! The kernel is stored in Keras's layout `(in_features, units)`, so `x.matmul(kernel)` needs
//! no transpose and Keras's Dense weights load unchanged.

use candle_core::Tensor;

use crate::graph::Initializer;
use crate::graph::{Configured, LayerOp, ParamSpec, Params};
use crate::layers::ActivationFn;
use crate::layers::Conv2DConfig;
use crate::layers::keras::{
    Convert, FeatureOrder, KerasClass, KerasLayer, Translated, Translation,
};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::native_backward::{DenseActivation, Native};
use crate::ops;
use crate::{Error, Result};

/// Configuration of a [`Dense`] layer; defaults are Keras's.
///
/// # Examples
/// ```
/// use candle_functional::layers::{DenseConfig, Initializer};
/// let c = DenseConfig::default();
/// assert!(c.use_bias);
/// assert_eq!(c.kernel_initializer, Initializer::GlorotUniform);
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DenseConfig {
    /// Number of outputs.
    pub units: usize,
    /// Adds a bias (default `true`).
    pub use_bias: bool,
    /// Applied to the output (default `Linear`).
    pub activation: ActivationFn,
    /// Default Glorot uniform.
    pub kernel_initializer: Initializer,
    /// Default zeros.
    pub bias_initializer: Initializer,
}

impl Default for DenseConfig {
    fn default() -> Self {
        Self {
            units: 1,
            use_bias: true,
            activation: ActivationFn::Linear,
            kernel_initializer: Initializer::GlorotUniform,
            bias_initializer: Initializer::Zeros,
        }
    }
}

/// Fully connected layer: `activation(x · kernel + bias)` over the last axis.
///
/// # Shapes
/// Input `(batch, in_features)` or `(batch, steps, in_features)` (applied to every step, as
/// Keras does for sequences); output `(batch, units)` or `(batch, steps, units)`. A
/// `(channels, height, width)` map is refused: Keras's channels-last Dense would act on its
/// channels, while the last NCHW axis is the width; flatten or pool it first, or use a 1x1
/// `Conv2D`.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let y = Dense::new(10).activation(ActivationFn::Softmax).call(&Input::new([512]))?;
/// assert_eq!(y.shape(), &[10]);
/// let err = Dense::new(10).call(&Input::new([64, 8, 8])).unwrap_err().to_string();
/// assert!(err.contains("GlobalAveragePooling2D"));
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Dense = Configured<DenseConfig>;

impl Dense {
    /// A dense layer with `units` outputs.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Dense::new(3).config().units, 3);
    /// ```
    pub fn new(units: usize) -> Self {
        Self::from_config(DenseConfig {
            units,
            ..Default::default()
        })
    }

    /// Activation applied to the output.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Dense::new(3).activation(ActivationFn::Relu).config().activation, ActivationFn::Relu);
    /// ```
    pub fn activation(self, activation: ActivationFn) -> Self {
        self.with_config(|c| c.activation = activation)
    }

    /// With or without a bias.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert!(!Dense::new(3).use_bias(false).config().use_bias);
    /// ```
    pub fn use_bias(self, use_bias: bool) -> Self {
        self.with_config(|c| c.use_bias = use_bias)
    }

    /// Kernel initializer.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let d = Dense::new(3).kernel_initializer(Initializer::HeNormal);
    /// assert_eq!(d.config().kernel_initializer, Initializer::HeNormal);
    /// ```
    pub fn kernel_initializer(self, init: Initializer) -> Self {
        self.with_config(|c| c.kernel_initializer = init)
    }
}

impl LayerOp for DenseConfig {
    fn type_name(&self) -> &'static str {
        "Dense"
    }

    /// Lets the plan's own backward pass find the layer (`train/tape.rs`).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        if self.units == 0 {
            return Err(Error::InvalidConfig {
                layer: layer.to_string(),
                message: "units must be positive".into(),
            });
        }
        match inputs {
            // A (channels, height, width) map: Keras's Dense, channels-last, would act on the
            // channels; on NCHW the last axis is the width. Refuse rather than surprise.
            [x] if x.len() >= 3 => Err(Error::InvalidInput {
                layer: layer.to_string(),
                message: format!(
                    "Dense on a {x:?} map would act on its last axis (the width, in NCHW), not on \
                     its channels as Keras's channels-last Dense does: use Flatten, \
                     GlobalAveragePooling2D or a 1x1 Conv2D first"
                ),
            }),
            [x] if !x.is_empty() => {
                let mut out = x.clone();
                *out.last_mut().expect("non-empty") = self.units;
                Ok(vec![out])
            }
            _ => Err(Error::InvalidInput {
                layer: layer.to_string(),
                message: format!("takes one input with at least one axis, got {inputs:?}"),
            }),
        }
    }

    fn param_specs(&self, inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        let in_features = inputs.first().and_then(|s| s.last()).copied().unwrap_or(1);
        let mut specs = vec![ParamSpec::new(
            "kernel",
            vec![in_features, self.units],
            self.kernel_initializer.clone(),
        )];
        if self.use_bias {
            specs.push(ParamSpec::new(
                "bias",
                vec![self.units],
                self.bias_initializer.clone(),
            ));
        }
        specs
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        let kernel = params.get("kernel")?;
        let y = if x.rank() == 2 {
            x.matmul(&kernel)?
        } else {
            x.broadcast_matmul(&kernel)?
        };
        let y = if self.use_bias {
            let bias = params.get("bias")?;
            if y.rank() == 2 {
                ops::bias_add(&y, &bias)?
            } else {
                y.broadcast_add(&bias)?
            }
        } else {
            y
        };
        Ok(vec![self.activation.apply(&y)?])
    }
}

impl DenseConfig {
    /// The forward pass for the plan's own backward pass (`train/tape.rs`), `params` handing
    /// out detached weights: the output and what its gradients need, for a batch of vectors
    /// (rank 2) and a linear, ReLU or softmax activation; `None` elsewhere (candle's
    /// autograd). Its gradients are three matrix products and the activation's, on any device.
    pub(crate) fn forward_native(
        &self,
        x: &Tensor,
        params: &Params,
    ) -> Result<Option<(Tensor, Native)>> {
        let activation = match self.activation {
            ActivationFn::Linear => DenseActivation::Linear,
            ActivationFn::Relu => DenseActivation::Relu,
            ActivationFn::Softmax => DenseActivation::Softmax,
            _ => return Ok(None),
        };
        if x.rank() != 2 || !x.dtype().is_float() {
            return Ok(None);
        }
        let y = self.forward(std::slice::from_ref(x), params)?.remove(0);
        let native = Native::Dense {
            x: x.clone(),
            kernel: params.get("kernel")?,
            y: (activation != DenseActivation::Linear).then(|| y.clone()),
            activation,
            kernel_var: params.trainable_var("kernel")?,
            bias_var: match self.use_bias {
                true => params.trainable_var("bias")?,
                false => None,
            },
        };
        Ok(Some((y, native)))
    }
}

/// `Dense`, saved and imported from Keras's `Dense`: on vectors as itself (reading a
/// channels-last Flatten through a kernel whose rows are reordered), on a map as the 1x1
/// `Conv2D` Keras's channels-last Dense is.
pub(crate) const KINDS: &[LayerKind] =
    &[
        LayerKind::of::<DenseConfig>(|| LayerExample::new(&Dense::new(3), &[&[5]])).keras(&[
            KerasClass::new("Dense", dense_from_keras).feature_order(FeatureOrder::Absorbs),
        ]),
    ];

fn dense_from_keras(layer: &KerasLayer) -> Translation {
    let use_bias = layer.flag("use_bias", true);
    let units = layer.int("units")?;
    let activation = layer.named::<ActivationFn>("activation")?;
    match layer.rank() {
        // A rank-3 input (a sequence of vectors, as an Embedding gives) is the same in both
        // layouts: the Dense acts on its last axis.
        2 | 3 => {
            let convert = match layer.order() {
                Some((h, w, c)) => Convert::DenseRowsFromHwc(h, w, c),
                None => Convert::Same,
            };
            let config = DenseConfig {
                units,
                use_bias,
                activation,
                ..Default::default()
            };
            Ok(Translated::new("Dense", config)?
                .weight("kernel", 0, convert)
                .bias(use_bias, 1))
        }
        // Keras's Dense on a map acts on each pixel's channels: a 1x1 convolution.
        4 => {
            let config = Conv2DConfig {
                filters: units,
                kernel_size: (1, 1),
                use_bias,
                activation,
                ..Default::default()
            };
            Ok(Translated::new("Conv2D", config)?
                .weight("kernel", 0, Convert::DenseAsPointwise)
                .bias(use_bias, 1))
        }
        rank => Err(format!("a Dense on a rank-{rank} input is not supported")),
    }
}

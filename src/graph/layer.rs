//! Layers as values: [`Configured`] (a config, an optional name and the identity its calls
//! share), [`IntoLayer`], and the [`Layer`] trait whose `call` records a node.
//!
//! A layer value such as `Conv2D::new(64, 3)` is a [`Configured`] config. The first time it is
//! called it gets an identity (a [`LayerRef`]); every later call of the same value, or of a
//! clone of it, records another node over the same identity, so the calls share weights, as
//! Keras's shared layers do. Changing the configuration with a builder method makes a new layer.

use std::sync::{Arc, OnceLock};

use crate::graph::op::{LayerOp, LayerRef};
use crate::graph::regularizer::Regularizer;
use crate::graph::symbolic::{SymbolicTensor, record_call};
use crate::{Error, Result};

/// A layer value: a config that implements [`LayerOp`], an optional name, and the identity it
/// takes on its first call. The built-in layers are aliases of it (`Conv2D` is
/// `Configured<Conv2DConfig>`), and a custom [`LayerOp`] becomes a layer the same way.
///
/// Clones share the identity (and so the weights); builder methods make a new layer.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let shared = Dense::new(8).name("shared");
/// let a = shared.call(&Input::new([4]))?;
/// let b = shared.clone().call(&Input::new([4]))?;
/// assert!(a.layer().same_layer(&b.layer()));
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Configured<C> {
    config: C,
    name: Option<String>,
    regularizers: Vec<(String, Regularizer)>,
    identity: Arc<OnceLock<LayerRef>>,
}

impl<C: LayerOp + Clone> Configured<C> {
    /// A layer from a config.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{layers::DenseConfig, Configured};
    /// let dense = Configured::from_config(DenseConfig { units: 4, ..Default::default() });
    /// assert_eq!(dense.config().units, 4);
    /// ```
    pub fn from_config(config: C) -> Self {
        Self {
            config,
            name: None,
            regularizers: Vec::new(),
            identity: Arc::default(),
        }
    }

    /// The layer's config.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Conv2D::new(16, 3).config().filters, 16);
    /// ```
    pub fn config(&self) -> &C {
        &self.config
    }

    /// Gives the layer a name (unique within a model). Without one, the model names it
    /// Keras's way: `conv2d`, `conv2d_1`, ... in creation order.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = ReLU::new().name("act").call(&Input::new([3]))?;
    /// assert_eq!(y.layer().name(), Some("act"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self.identity = Arc::default();
        self
    }

    /// Penalizes one of the layer's weights, by name, in the training loss (Keras's
    /// `<weight>_regularizer`); the result is a new layer. A name the layer has no weight of,
    /// or factors that are negative or not finite, fail at the call, naming the layer.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{prelude::*, Regularizer};
    /// let bn = BatchNorm::new().regularizer("gamma", Regularizer::l2(1e-5));
    /// assert!(bn.call(&Input::new([4, 2, 2])).is_ok());
    /// let wrong = Dense::new(2).regularizer("gamma", Regularizer::l2(1e-5));
    /// assert!(wrong.call(&Input::new([4])).is_err());
    /// ```
    pub fn regularizer(mut self, weight: impl Into<String>, regularizer: Regularizer) -> Self {
        let weight = weight.into();
        self.regularizers.retain(|(name, _)| *name != weight);
        self.regularizers.push((weight, regularizer));
        self.identity = Arc::default();
        self
    }

    /// Keras's `kernel_regularizer`: penalizes the weight named `kernel` (Dense, the
    /// convolutions).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{prelude::*, Regularizer};
    /// let conv = Conv2D::new(8, 3).kernel_regularizer(Regularizer::l2(1e-4));
    /// ```
    pub fn kernel_regularizer(self, regularizer: Regularizer) -> Self {
        self.regularizer("kernel", regularizer)
    }

    /// Keras's `bias_regularizer`: penalizes the weight named `bias`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{prelude::*, Regularizer};
    /// let dense = Dense::new(8).bias_regularizer(Regularizer::l1(1e-5));
    /// ```
    pub fn bias_regularizer(self, regularizer: Regularizer) -> Self {
        self.regularizer("bias", regularizer)
    }

    /// Changes the config; the result is a new layer (new weights).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let conv = Conv2D::new(8, 3).with_config(|c| c.use_bias = false);
    /// assert!(!conv.config().use_bias);
    /// ```
    pub fn with_config(mut self, change: impl FnOnce(&mut C)) -> Self {
        change(&mut self.config);
        self.identity = Arc::default();
        self
    }
}

impl<C: LayerOp + Clone> Layer for Configured<C> {
    fn layer_ref(&self) -> LayerRef {
        self.identity
            .get_or_init(|| {
                LayerRef::new(
                    Arc::new(self.config.clone()),
                    self.name.clone(),
                    self.regularizers.clone(),
                )
            })
            .clone()
    }
}

/// Turns any layer config, built-in or your own, into a layer: `config.into_layer()` is
/// [`Configured::from_config`], ready for `.name(..)`, `.with_config(..)` and `.call(..)`. A
/// custom layer writes its builder methods on its own config struct (a type of its crate)
/// and ends the chain with `into_layer()`, or calls it right away with `call`.
///
/// # Examples
/// ```
/// use candle_core::Tensor;
/// use candle_functional::prelude::*;
/// use candle_functional::{IntoLayer, LayerOp, Params};
///
/// #[derive(Clone, Debug, Default)]
/// struct ScaleConfig { factor: f64 }
///
/// impl ScaleConfig {
///     fn new() -> Self { Self { factor: 1.0 } }
///     fn factor(mut self, factor: f64) -> Self { self.factor = factor; self }
/// }
///
/// impl LayerOp for ScaleConfig {
///     fn type_name(&self) -> &'static str { "Scale" }
///     fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
///         Ok(vec![candle_functional::layers::one_input(layer, inputs)?.to_vec()])
///     }
///     fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
///         Ok(vec![(&inputs[0] * self.factor)?])
///     }
/// }
///
/// let y = ScaleConfig::new().factor(2.0).into_layer().name("double").call(&Input::new([4]))?;
/// assert_eq!(y.layer().name(), Some("double"));
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub trait IntoLayer: LayerOp + Clone + Sized {
    /// The layer of this config.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::DenseConfig;
    /// use candle_functional::IntoLayer;
    /// let dense = DenseConfig { units: 3, ..Default::default() }.into_layer();
    /// assert_eq!(dense.config().units, 3);
    /// ```
    fn into_layer(self) -> Configured<Self> {
        Configured::from_config(self)
    }
}

impl<C: LayerOp + Clone> IntoLayer for C {}

/// Something that can be called on symbolic tensors: every layer, and a [`Model`](crate::Model).
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let x = Input::new([3, 8, 8]);
/// let y = Conv2D::new(4, 3).padding(Padding::Same).call(&x)?;
/// let z = Add::new().call_many(&[y.clone(), y])?;
/// assert_eq!(z.shape(), &[4, 8, 8]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub trait Layer {
    /// The identity the calls record (created on first use).
    fn layer_ref(&self) -> LayerRef;

    /// Calls the layer on one symbolic tensor.
    fn call(&self, input: &SymbolicTensor) -> Result<SymbolicTensor> {
        self.call_many(std::slice::from_ref(input))
    }

    /// Calls the layer on several symbolic tensors (merge layers), returning its one output.
    fn call_many(&self, inputs: &[SymbolicTensor]) -> Result<SymbolicTensor> {
        let layer = self.layer_ref();
        let mut outputs = record_call(&layer, inputs)?;
        if outputs.len() != 1 {
            return Err(Error::InvalidInput {
                layer: layer.display_name(),
                message: format!(
                    "has {} outputs: use `call_multi` to get all of them",
                    outputs.len()
                ),
            });
        }
        Ok(outputs.remove(0))
    }

    /// Calls the layer and returns all its outputs (a nested model with several outputs).
    fn call_multi(&self, inputs: &[SymbolicTensor]) -> Result<Vec<SymbolicTensor>> {
        record_call(&self.layer_ref(), inputs)
    }
}

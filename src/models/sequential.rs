//! [`Sequential`]: Keras's `Sequential` as a builder of functional models: a stack of
//! one-input, one-output layers, each called on the previous output as it is added.

use crate::Result;
use crate::graph::{Input, Layer, SymbolicTensor};
use crate::models::Model;

/// Keras's `Sequential`: layers stacked one after the other. Each [`Sequential::add`] calls
/// the layer on the previous output right away, so a layer that does not fit fails there,
/// naming itself and both shapes; [`Sequential::model`] gives the functional [`Model`]
/// (build, train, save, nest it like any other). A nested model with one input and one
/// output is a layer like the others.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device};
/// use candle_functional::prelude::*;
/// let model = Sequential::new([3, 32, 32])
///     .add(Conv2D::new(16, 3).padding(Padding::Same))?
///     .add(BatchNorm::new())?
///     .add(ReLU::new())?
///     .add(GlobalAveragePooling2D::new())?
///     .add(Dense::new(10))?
///     .named("small_cnn")
///     .model()?
///     .build(&Device::Cpu, DType::F32, 0)?;
/// assert_eq!(model.outputs()[0].shape(), &[10]);
/// // A layer that does not fit fails where it is added.
/// assert!(Sequential::new([3, 8, 8]).add(Flatten::new())?.add(Conv2D::new(2, 3)).is_err());
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Sequential {
    input: SymbolicTensor,
    last: SymbolicTensor,
    name: Option<String>,
}

impl Sequential {
    /// An empty stack over an input of per-sample shape `shape` (channels first for images).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Sequential::new([4]).output().shape(), &[4]);
    /// ```
    pub fn new(shape: impl Into<Vec<usize>>) -> Self {
        Self::from_input(Input::new(shape.into()))
    }

    /// An empty stack over a given input (a named one, say).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let stack = Sequential::from_input(Input::named("pixels", [1, 28, 28]));
    /// assert_eq!(stack.output().layer().name(), Some("pixels"));
    /// ```
    pub fn from_input(input: SymbolicTensor) -> Self {
        Self {
            last: input.clone(),
            input,
            name: None,
        }
    }

    /// Calls `layer` on the current output and stacks it (Keras's `model.add(layer)`).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let stack = Sequential::new([6]).add(Dense::new(3))?;
    /// assert_eq!(stack.output().shape(), &[3]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    // Keras's name for it (`model.add`), not an arithmetic `Add`.
    #[allow(clippy::should_implement_trait)]
    pub fn add(mut self, layer: impl Layer) -> Result<Self> {
        self.push(&layer)?;
        Ok(self)
    }

    /// [`Sequential::add`] in place, for loops over layers of one type.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let mut stack = Sequential::new([8]);
    /// for units in [16, 16, 4] {
    ///     stack.push(&Dense::new(units).activation(ActivationFn::Relu))?;
    /// }
    /// assert_eq!(stack.output().shape(), &[4]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn push(&mut self, layer: &dyn Layer) -> Result<&mut Self> {
        self.last = layer.call(&self.last)?;
        Ok(self)
    }

    /// Names the model [`Sequential::model`] makes.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let model = Sequential::new([2]).add(Dense::new(1))?.named("tiny").model()?;
    /// assert_eq!(model.name(), "tiny");
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The input.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Sequential::new([5]).input().shape(), &[5]);
    /// ```
    pub fn input(&self) -> &SymbolicTensor {
        &self.input
    }

    /// The output of the last layer added (the input while empty).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Sequential::new([5]).add(Dense::new(2))?.output().shape(), &[2]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn output(&self) -> &SymbolicTensor {
        &self.last
    }

    /// The functional model from the input to the last output; refused for an empty stack.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert!(Sequential::new([3]).model().is_err());
    /// ```
    pub fn model(self) -> Result<Model> {
        if self.last.layer().same_layer(&self.input.layer()) {
            return Err(crate::Error::InvalidArgument(
                "Sequential: no layer added; a model needs at least one".into(),
            ));
        }
        let model = Model::new(std::slice::from_ref(&self.input), &[self.last])?;
        Ok(match self.name {
            Some(name) => model.named(name),
            None => model,
        })
    }
}

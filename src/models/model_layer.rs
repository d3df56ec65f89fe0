//! [`ModelLayer`]: a layer of a model with the calls it makes there (Keras's `layer.input`,
//! `layer.output`), as [`Model::get_layer`](crate::Model::get_layer) returns it.

use std::sync::Arc;

use crate::graph::LayerRef;
use crate::graph::SymbolicTensor;
use crate::graph::symbolic::Node;
use crate::{Error, Result};

/// A layer of a model together with the calls it makes in that model (from
/// [`Model::get_layer`](crate::Model::get_layer)).
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let x = Input::new([4]);
/// let shared = Dense::new(4).name("shared");
/// let y = shared.call(&shared.call(&x)?)?;
/// let model = Model::new(&[x], &[y])?;
/// let layer = model.get_layer("shared")?;
/// assert_eq!(layer.calls(), 2);
/// assert!(layer.output().is_err()); // two calls: say which
/// assert_eq!(layer.outputs(1)?[0].shape(), &[4]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ModelLayer {
    layer: LayerRef,
    nodes: Vec<Arc<Node>>,
}

impl ModelLayer {
    /// The layer and its calls in one model, in creation order.
    pub(crate) fn new(layer: LayerRef, nodes: Vec<Arc<Node>>) -> Self {
        Self { layer, nodes }
    }

    /// The layer (its name, op, weights, trainable flag).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).name("head").call(&x)?;
    /// assert_eq!(Model::new(&[x], &[y])?.get_layer("head")?.layer().name(), Some("head"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn layer(&self) -> &LayerRef {
        &self.layer
    }

    /// How many times the model calls the layer (1 unless it is shared).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).name("head").call(&x)?;
    /// assert_eq!(Model::new(&[x], &[y])?.get_layer("head")?.calls(), 1);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn calls(&self) -> usize {
        self.nodes.len()
    }

    fn node(&self, call: usize) -> Result<&Arc<Node>> {
        self.nodes.get(call).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "layer `{}` is called {} time(s) in this model, not {}",
                self.layer.display_name(),
                self.nodes.len(),
                call + 1
            ))
        })
    }

    /// The outputs of call `call` (0-based).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).name("head").call(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// assert_eq!(model.get_layer("head")?.outputs(0)?[0].shape(), &[2]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn outputs(&self, call: usize) -> Result<Vec<SymbolicTensor>> {
        Ok(SymbolicTensor::outputs_of(self.node(call)?))
    }

    /// The inputs of call `call` (for an `Input` layer: the input itself).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).name("head").call(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// assert_eq!(model.get_layer("head")?.inputs(0)?[0].shape(), &[4]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn inputs(&self, call: usize) -> Result<Vec<SymbolicTensor>> {
        let node = self.node(call)?;
        Ok(if node.is_input() {
            SymbolicTensor::outputs_of(node)
        } else {
            node.inputs().to_vec()
        })
    }

    /// The one output of the layer's one call (Keras's `layer.output`); an error for a shared
    /// layer or a layer with several outputs.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).name("head").call(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// assert_eq!(model.get_layer("head")?.output()?.shape(), &[2]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn output(&self) -> Result<SymbolicTensor> {
        self.single(self.outputs(0)?, "output", "outputs")
    }

    /// The one input of the layer's one call (Keras's `layer.input`).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).name("head").call(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// assert_eq!(model.get_layer("head")?.input()?.shape(), &[4]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn input(&self) -> Result<SymbolicTensor> {
        self.single(self.inputs(0)?, "input", "inputs")
    }

    fn single(
        &self,
        mut tensors: Vec<SymbolicTensor>,
        one: &str,
        all: &str,
    ) -> Result<SymbolicTensor> {
        if self.nodes.len() != 1 || tensors.len() != 1 {
            return Err(Error::InvalidArgument(format!(
                "layer `{}` has {} call(s) with {} {all} each: use `{all}(call)` to say which {one}",
                self.layer.display_name(),
                self.nodes.len(),
                tensors.len()
            )));
        }
        Ok(tensors.remove(0))
    }
}

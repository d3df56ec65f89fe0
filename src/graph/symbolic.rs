//! Symbolic tensors and the nodes that produce them.
//!
//! A [`SymbolicTensor`] has a shape but no values: it is an output of a [`Node`], the record of
//! one call of a layer on other symbolic tensors. Calling a layer infers the output shape at
//! once, so a wrong graph fails on the line that builds it. Nodes hold their inputs, so the
//! whole graph behind a tensor can be walked back from it, as Keras does.

use std::fmt;
use std::sync::Arc;

use candle_core::Tensor;

use crate::graph::op::{LayerOp, LayerRef, next_id};
use crate::graph::params::Params;
use crate::support::sizes;
use crate::{Error, Result};

/// One call of a layer: its inputs and the shapes of its outputs.
#[derive(Debug)]
pub struct Node {
    id: u64,
    /// `true` for the node of an [`Input`]: set by [`Input`] itself, the only maker of such
    /// nodes.
    is_input: bool,
    layer: LayerRef,
    inputs: Vec<SymbolicTensor>,
    output_shapes: Vec<Vec<usize>>,
}

impl Node {
    /// Creation order: a node is always created after its inputs, so sorting by it is a
    /// topological order, and layers named in it get Keras's names.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The layer called.
    pub(crate) fn layer(&self) -> &LayerRef {
        &self.layer
    }

    /// The symbolic inputs of the call.
    pub(crate) fn inputs(&self) -> &[SymbolicTensor] {
        &self.inputs
    }

    /// Per-sample output shapes.
    pub(crate) fn output_shapes(&self) -> &[Vec<usize>] {
        &self.output_shapes
    }

    /// `true` for the node of an [`Input`].
    pub(crate) fn is_input(&self) -> bool {
        self.is_input
    }
}

/// A tensor of a graph under construction: a shape (batch dimension left open) and the node
/// that computes it.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let x = Input::new([3, 32, 32]);
/// assert_eq!(x.shape(), &[3, 32, 32]);
/// assert_eq!(x.to_string(), "(None, 3, 32, 32)");
/// ```
#[derive(Clone)]
pub struct SymbolicTensor {
    node: Arc<Node>,
    index: usize,
}

impl SymbolicTensor {
    /// Per-sample shape (without the batch dimension).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = Flatten::new().call(&Input::new([2, 3, 4]))?;
    /// assert_eq!(y.shape(), &[24]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn shape(&self) -> &[usize] {
        &self.node.output_shapes[self.index]
    }

    /// The layer that produced this tensor.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::named("image", [3, 8, 8]);
    /// assert_eq!(x.layer().name(), Some("image"));
    /// ```
    pub fn layer(&self) -> LayerRef {
        self.node.layer.clone()
    }

    /// Which output of its node this is (0 except for multi-output nested models).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Input::new([1]).output_index(), 0);
    /// ```
    pub fn output_index(&self) -> usize {
        self.index
    }

    /// The symbolic inputs of the call that produced this tensor (empty for an `Input`):
    /// enough to walk a graph back from its outputs.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = ReLU::new().call(&x)?;
    /// assert_eq!(y.inputs()[0].shape(), x.shape());
    /// assert!(x.inputs().is_empty());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn inputs(&self) -> Vec<SymbolicTensor> {
        self.node.inputs.clone()
    }

    pub(crate) fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Every output of `node`.
    pub(crate) fn outputs_of(node: &Arc<Node>) -> Vec<SymbolicTensor> {
        (0..node.output_shapes.len())
            .map(|index| SymbolicTensor {
                node: node.clone(),
                index,
            })
            .collect()
    }

    /// Identifies the tensor: (node, output index).
    pub(crate) fn key(&self) -> (u64, usize) {
        (self.node.id, self.index)
    }
}

impl fmt::Display for SymbolicTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_batch_shape(self.shape()))
    }
}

impl fmt::Debug for SymbolicTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SymbolicTensor({}, from `{}`[{}])",
            format_batch_shape(self.shape()),
            self.node.layer.display_name(),
            self.index
        )
    }
}

/// `(None, 3, 32, 32)`, Keras's notation for a shape with an open batch dimension.
pub(crate) fn format_batch_shape(shape: &[usize]) -> String {
    let mut parts = vec!["None".to_string()];
    parts.extend(shape.iter().map(|d| d.to_string()));
    if parts.len() == 1 {
        "(None,)".to_string()
    } else {
        format!("({})", parts.join(", "))
    }
}

/// Records a call of `layer` on `inputs`: infers the output shapes and returns the new
/// symbolic outputs.
pub(crate) fn record_call(
    layer: &LayerRef,
    inputs: &[SymbolicTensor],
) -> Result<Vec<SymbolicTensor>> {
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
    for (i, shape) in shapes.iter().enumerate() {
        check_sample_shape(&layer.display_name(), &format!("input {i}"), shape)?;
    }
    let output_shapes = layer.op().output_shapes(&layer.display_name(), &shapes)?;
    for (i, shape) in output_shapes.iter().enumerate() {
        check_sample_shape(&layer.display_name(), &format!("output {i}"), shape)?;
    }
    layer.check_call_shapes(&shapes)?;
    let node = Arc::new(Node {
        id: next_id(),
        is_input: false,
        layer: layer.clone(),
        inputs: inputs.to_vec(),
        output_shapes,
    });
    Ok((0..node.output_shapes.len())
        .map(|index| SymbolicTensor {
            node: node.clone(),
            index,
        })
        .collect())
}

/// A per-sample shape must hold at least one value and no more than a `usize` can count: a
/// zero-sized axis (`Input::new([0, 8, 8])`) has nothing for a layer to compute on, and an
/// uncountable one would wrap every size computed from it.
pub(crate) fn check_sample_shape(layer: &str, what: &str, shape: &[usize]) -> Result<()> {
    let message = if shape.contains(&0) {
        format!("{what} has shape {shape:?}: every axis needs at least one value")
    } else if sizes::elements(shape).is_none() {
        format!("{what} has shape {shape:?}: more values than a usize can count")
    } else {
        return Ok(());
    };
    Err(Error::InvalidInput {
        layer: layer.to_string(),
        message,
    })
}

/// The entry point of a graph: `Input::new([3, 32, 32])` is a symbolic tensor of per-sample
/// shape `[3, 32, 32]` (NCHW, batch left open).
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let x = Input::new([3, 32, 32]);
/// let y = Conv2D::new(8, 3).padding(Padding::Same).call(&x)?;
/// assert_eq!(y.shape(), &[8, 32, 32]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Input;

impl Input {
    /// A new graph input with this per-sample shape, named `input_layer`, `input_layer_1`, ...
    /// by the model that uses it.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Input::new([10]).shape(), &[10]);
    /// ```
    #[allow(clippy::new_ret_no_self)]
    pub fn new(shape: impl Into<Vec<usize>>) -> SymbolicTensor {
        Self::make(shape.into(), None)
    }

    /// A new graph input with a name (a model's inputs are reported and checked by name).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::named("pixels", [3, 4, 4]);
    /// assert_eq!(x.layer().name(), Some("pixels"));
    /// ```
    pub fn named(name: impl Into<String>, shape: impl Into<Vec<usize>>) -> SymbolicTensor {
        Self::make(shape.into(), Some(name.into()))
    }

    fn make(shape: Vec<usize>, name: Option<String>) -> SymbolicTensor {
        let layer = LayerRef::new(Arc::new(InputLayer), name, Vec::new());
        let node = Arc::new(Node {
            id: next_id(),
            is_input: true,
            layer,
            inputs: Vec::new(),
            output_shapes: vec![shape],
        });
        SymbolicTensor { node, index: 0 }
    }
}

/// The layer behind an [`Input`]: it is never called, its node has no inputs.
#[derive(Clone, Copy, Debug)]
struct InputLayer;

impl LayerOp for InputLayer {
    fn type_name(&self) -> &'static str {
        "InputLayer"
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        Err(Error::InvalidInput {
            layer: layer.to_string(),
            message: format!("an Input cannot be called (given {} tensors)", inputs.len()),
        })
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        Ok(inputs.to_vec())
    }
}

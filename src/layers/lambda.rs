//! `Lambda`: a Rust closure as a layer, with a rule for its output shape.
//!
//! The closure is part of the program, not of the model's data: a model with a `Lambda`
//! trains, runs and saves its weights like any other, but its architecture cannot be written
//! to a file ([`Model::save`](crate::Model::save) names the layer in its error). A layer
//! that must be saved is a [`LayerOp`] registered by type name instead (docs/guide.md).

use std::fmt;
use std::sync::Arc;

use candle_core::Tensor;

use crate::graph::{Configured, LayerOp, Params};
use crate::{Error, Result};

type ForwardFn = dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + Sync;
type ShapeFn = dyn Fn(&[Vec<usize>]) -> Result<Vec<Vec<usize>>> + Send + Sync;

/// Config of a [`Lambda`] layer: the function and its shape rule.
///
/// # Examples
/// ```
/// use candle_functional::layers::LambdaConfig;
/// let c = LambdaConfig::new(|x| Ok(x.clone()));
/// assert!(format!("{c:?}").contains("Lambda"));
/// ```
#[derive(Clone)]
pub struct LambdaConfig {
    forward: Arc<ForwardFn>,
    output_shapes: Arc<ShapeFn>,
}

impl LambdaConfig {
    /// A one-input, one-output function whose output has its input's shape (change that with
    /// [`Lambda::output_shape`]).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::LambdaConfig;
    /// let _ = LambdaConfig::new(|x| Ok((x * 2.0)?));
    /// ```
    pub fn new(f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static) -> Self {
        Self {
            forward: Arc::new(move |xs: &[Tensor]| Ok(vec![f(&xs[0])?])),
            output_shapes: Arc::new(|shapes: &[Vec<usize>]| match shapes {
                [x] => Ok(vec![x.clone()]),
                _ => Err(Error::InvalidArgument(format!(
                    "takes one input, got {}",
                    shapes.len()
                ))),
            }),
        }
    }

    /// A function of several inputs with several outputs, and its shape rule (per-sample
    /// shapes in, per-sample shapes out).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::LambdaConfig;
    /// let _ = LambdaConfig::multi(
    ///     |xs| Ok(vec![(&xs[0] + &xs[1])?]),
    ///     |shapes| Ok(vec![shapes[0].clone()]),
    /// );
    /// ```
    pub fn multi(
        f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + Sync + 'static,
        output_shapes: impl Fn(&[Vec<usize>]) -> Result<Vec<Vec<usize>>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            forward: Arc::new(f),
            output_shapes: Arc::new(output_shapes),
        }
    }
}

impl fmt::Debug for LambdaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LambdaConfig { <Rust closure> }")
    }
}

/// A layer that applies a Rust function (Keras's `Lambda`). Its output shape is checked when
/// the graph is built (same as the input unless [`Lambda::output_shape`] says otherwise) and
/// again against what the function returns when it runs.
///
/// # Shapes
/// As the shape rule says.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::layers::Lambda;
/// let x = Input::new([4]);
/// let y = Lambda::new(|t| Ok(((t * 2.0)? + 1.0)?)).call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let out = model.forward(&[Tensor::ones((1, 4), DType::F32, &Device::Cpu)?], Mode::Eval)?;
/// assert_eq!(out[0].to_vec2::<f32>()?, [[3.0; 4]]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Lambda = Configured<LambdaConfig>;

impl Lambda {
    /// A layer applying `f` to its one input.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::Lambda;
    /// let _ = Lambda::new(|x| Ok(x.abs()?));
    /// ```
    pub fn new(f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static) -> Self {
        Self::from_config(LambdaConfig::new(f))
    }

    /// A layer applying `f` to several inputs (call it with `call_many`), with its shape rule.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// use candle_functional::layers::Lambda;
    /// let (a, b) = (Input::new([3]), Input::new([3]));
    /// let diff = Lambda::multi(
    ///     |xs| Ok(vec![(&xs[0] - &xs[1])?.abs()?]),
    ///     |shapes| Ok(vec![shapes[0].clone()]),
    /// );
    /// assert_eq!(diff.call_many(&[a, b])?.shape(), &[3]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn multi(
        f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + Sync + 'static,
        output_shapes: impl Fn(&[Vec<usize>]) -> Result<Vec<Vec<usize>>> + Send + Sync + 'static,
    ) -> Self {
        Self::from_config(LambdaConfig::multi(f, output_shapes))
    }

    /// The output shape rule of a one-output layer: per-sample input shape to per-sample
    /// output shape.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// use candle_functional::layers::Lambda;
    /// let first_channel = Lambda::new(|x| Ok(x.narrow(1, 0, 1)?))
    ///     .output_shape(|s| Ok(vec![1, s[1], s[2]]));
    /// assert_eq!(first_channel.call(&Input::new([3, 4, 4]))?.shape(), &[1, 4, 4]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn output_shape(
        self,
        rule: impl Fn(&[usize]) -> Result<Vec<usize>> + Send + Sync + 'static,
    ) -> Self {
        self.with_config(|c| {
            c.output_shapes = Arc::new(move |shapes: &[Vec<usize>]| match shapes {
                [x] => Ok(vec![rule(x)?]),
                _ => Err(Error::InvalidArgument(format!(
                    "takes one input, got {}",
                    shapes.len()
                ))),
            })
        })
    }
}

impl LayerOp for LambdaConfig {
    fn type_name(&self) -> &'static str {
        "Lambda"
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        (self.output_shapes)(inputs).map_err(|e| Error::InvalidInput {
            layer: layer.to_string(),
            message: format!("shape rule: {e}"),
        })
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let outputs = (self.forward)(inputs)?;
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.dims()[1..].to_vec()).collect();
        let expected = (self.output_shapes)(&shapes)?;
        let got: Vec<Vec<usize>> = outputs.iter().map(|t| t.dims().to_vec()).collect();
        let batch = inputs.first().map(|t| t.dims()[0]);
        let matches = got.len() == expected.len()
            && got
                .iter()
                .zip(&expected)
                .all(|(g, e)| g.first().copied() == batch && g.get(1..) == Some(e.as_slice()));
        if !matches {
            return Err(Error::InvalidInput {
                layer: "lambda".to_string(),
                message: format!(
                    "the function returned shapes {got:?}, but its shape rule says (batch, …) {expected:?}"
                ),
            });
        }
        Ok(outputs)
    }
}

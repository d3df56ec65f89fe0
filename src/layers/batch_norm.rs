//! `BatchNorm`: Keras's `BatchNormalization`, with its defaults and its update rule.
//!
//! In training mode it normalizes with the batch's mean and *biased* variance and moves the
//! running statistics towards them (`moving = momentum * moving + (1 - momentum) * batch`,
//! Keras's convention: momentum 0.99 keeps 99% of the old value; candle-nn's `BatchNorm` uses
//! the opposite convention and the unbiased variance). In eval mode it uses the running
//! statistics. The running statistics are non-trainable state: saved with the weights,
//! never handed to an optimizer.

use candle_core::{DType, Tensor};

use crate::graph::{Configured, LayerOp, ParamSpec, Params};
use crate::layers::Initializer;
use crate::layers::padding::non_batch_axis;
use crate::ops::batch_norm as ops;
use crate::{Error, Result};

/// Configuration of a [`BatchNorm`] layer; defaults are Keras's.
///
/// # Examples
/// ```
/// use candle_functional::layers::BatchNormConfig;
/// let c = BatchNormConfig::default();
/// assert_eq!((c.axis, c.momentum, c.epsilon), (1, 0.99, 1e-3));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// The channel axis of the full tensor (batch is axis 0): 1 for NCHW; negative counts
    /// from the end.
    pub axis: isize,
    /// Weight of the old value in the running-statistics update.
    pub momentum: f64,
    /// Added to the variance before the square root.
    pub epsilon: f64,
    /// Learn a shift `beta` (default `true`).
    pub center: bool,
    /// Learn a scale `gamma` (default `true`).
    pub scale: bool,
    /// Default ones.
    pub gamma_initializer: Initializer,
    /// Default zeros.
    pub beta_initializer: Initializer,
    /// Default zeros.
    pub moving_mean_initializer: Initializer,
    /// Default ones.
    pub moving_variance_initializer: Initializer,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            axis: 1,
            momentum: 0.99,
            epsilon: 1e-3,
            center: true,
            scale: true,
            gamma_initializer: Initializer::Ones,
            beta_initializer: Initializer::Zeros,
            moving_mean_initializer: Initializer::Zeros,
            moving_variance_initializer: Initializer::Ones,
        }
    }
}

/// Batch normalization over the channel axis (Keras's `BatchNormalization`).
///
/// Weights, in order: `gamma`, `beta` (trainable), `moving_mean`, `moving_variance` (state).
///
/// # Shapes
/// Output shape = input shape.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let y = BatchNorm::new().call(&Input::new([64, 32, 32]))?;
/// let specs = y.layer().param_specs();
/// assert_eq!(specs.iter().filter(|s| s.trainable()).count(), 2);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type BatchNorm = Configured<BatchNormConfig>;

impl BatchNorm {
    /// Batch normalization with Keras's defaults.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(BatchNorm::new().config().momentum, 0.99);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Momentum of the running statistics (Keras's convention).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(BatchNorm::new().momentum(0.9).config().momentum, 0.9);
    /// ```
    pub fn momentum(self, momentum: f64) -> Self {
        self.with_config(|c| c.momentum = momentum)
    }

    /// Epsilon added to the variance.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(BatchNorm::new().epsilon(1e-5).config().epsilon, 1e-5);
    /// ```
    pub fn epsilon(self, epsilon: f64) -> Self {
        self.with_config(|c| c.epsilon = epsilon)
    }

    /// The channel axis (1 for NCHW).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(BatchNorm::new().axis(-1).config().axis, -1);
    /// ```
    pub fn axis(self, axis: isize) -> Self {
        self.with_config(|c| c.axis = axis)
    }
}

impl BatchNormConfig {
    /// The channel axis in the full tensor (rank = per-sample rank + 1).
    fn full_axis(&self, layer: &str, sample_rank: usize) -> Result<usize> {
        non_batch_axis(layer, self.axis, sample_rank)
    }

    /// Index of each weight in `param_specs` order.
    fn indices(&self) -> (Option<usize>, Option<usize>, usize, usize) {
        let gamma = self.scale.then_some(0);
        let beta = self.center.then_some(self.scale as usize);
        let mean = self.scale as usize + self.center as usize;
        (gamma, beta, mean, mean + 1)
    }
}

impl BatchNormConfig {
    /// The CPU path: one pass for the batch moments, one for the normalization, and an
    /// analytic backward (see [`crate::ops`]).
    fn forward_fused(&self, x: &Tensor, params: &Params) -> Result<Tensor> {
        let (gamma_i, beta_i, mean_i, var_i) = self.indices();
        let channels = x.dim(1)?;
        let stats = if params.mode().is_train() {
            let x = x.contiguous()?;
            let stats = ops::channel_moments(&x)?;
            let keep = self.momentum;
            for (index, row) in [(mean_i, 0), (var_i, 1)] {
                let var = params.var(index)?;
                let batch = stats.get(row)?.to_dtype(var.dtype())?;
                var.set(&((var.as_tensor().detach() * keep)? + (batch * (1.0 - keep))?)?)?;
            }
            stats
        } else {
            Tensor::stack(&[params.get(mean_i)?, params.get(var_i)?], 0)?.to_dtype(x.dtype())?
        };
        let constant = |value: f64| Tensor::full(value, channels, x.device())?.to_dtype(x.dtype());
        let gamma = match gamma_i {
            Some(i) => params.get(i)?,
            None => constant(1.0)?,
        };
        let beta = match beta_i {
            Some(i) => params.get(i)?,
            None => constant(0.0)?,
        };
        let affine = Tensor::stack(&[gamma, beta], 0)?;
        ops::normalize(x, &stats, &affine, self.epsilon, params.mode().is_train())
    }
}

#[cfg(feature = "cudnn")]
impl BatchNormConfig {
    /// The CUDA training path: cuDNN's fused kernels, and the moving statistics updated here
    /// from the batch moments (biased variance, Keras's rule).
    fn forward_cudnn(&self, x: &Tensor, params: &Params) -> Result<Tensor> {
        let (gamma_i, beta_i, mean_i, var_i) = self.indices();
        let channels = x.dim(1)?;
        let constant = |value: f64| Tensor::full(value as f32, channels, x.device());
        let gamma = match gamma_i {
            Some(i) => params.get_as(i, DType::F32)?,
            None => constant(1.0)?,
        };
        let beta = match beta_i {
            Some(i) => params.get_as(i, DType::F32)?,
            None => constant(0.0)?,
        };
        let (y, moments) =
            crate::ops::cudnn_batch_norm::forward_train(x, &gamma, &beta, self.epsilon)?;
        let mean = moments.get(0)?;
        // cuDNN saves 1 / sqrt(var + epsilon) of the biased batch variance.
        let var = (moments.get(1)?.powf(-2.0)? - self.epsilon)?;
        let keep = self.momentum;
        for (index, batch) in [(mean_i, mean), (var_i, var)] {
            let v = params.var(index)?;
            let batch = batch.to_dtype(v.dtype())?;
            v.set(&((v.as_tensor().detach() * keep)? + (batch * (1.0 - keep))?)?)?;
        }
        Ok(y)
    }
}

impl LayerOp for BatchNormConfig {
    fn type_name(&self) -> &'static str {
        "BatchNormalization"
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let [x] = inputs else {
            return Err(Error::InvalidInput {
                layer: layer.to_string(),
                message: format!("takes one input, got {}", inputs.len()),
            });
        };
        self.full_axis(layer, x.len())?;
        if !(0.0..=1.0).contains(&self.momentum) || self.epsilon <= 0.0 {
            return Err(Error::InvalidConfig {
                layer: layer.to_string(),
                message: format!(
                    "momentum must be in [0, 1] and epsilon positive, got {} and {}",
                    self.momentum, self.epsilon
                ),
            });
        }
        Ok(vec![x.clone()])
    }

    fn param_specs(&self, inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        let Some(shape) = inputs.first() else {
            return Vec::new();
        };
        let Ok(axis) = self.full_axis("", shape.len()) else {
            return Vec::new();
        };
        let c = vec![shape[axis - 1]];
        let mut specs = Vec::new();
        if self.scale {
            specs.push(ParamSpec::new(
                "gamma",
                c.clone(),
                self.gamma_initializer.clone(),
            ));
        }
        if self.center {
            specs.push(ParamSpec::new(
                "beta",
                c.clone(),
                self.beta_initializer.clone(),
            ));
        }
        specs.push(
            ParamSpec::new(
                "moving_mean",
                c.clone(),
                self.moving_mean_initializer.clone(),
            )
            .non_trainable(),
        );
        specs.push(
            ParamSpec::new(
                "moving_variance",
                c,
                self.moving_variance_initializer.clone(),
            )
            .non_trainable(),
        );
        specs
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        // Statistics of half-precision activations are computed in f32.
        let input_dtype = inputs[0].dtype();
        if matches!(input_dtype, DType::BF16 | DType::F16) {
            let x = inputs[0].to_dtype(DType::F32)?;
            let params = Params::new(params.vars(), params.mode(), params.seed());
            let y = self.forward(&[x], &params)?.remove(0);
            return Ok(vec![y.to_dtype(input_dtype)?]);
        }
        let x = &inputs[0];
        let axis = self.full_axis("", x.rank() - 1)?;
        let channels = x.dim(axis)?;
        // Shape that broadcasts a per-channel vector against x: [1, C, 1, 1] for NCHW.
        let mut bshape = vec![1; x.rank()];
        bshape[axis] = channels;
        let reduce: Vec<usize> = (0..x.rank()).filter(|&d| d != axis).collect();
        let (gamma_i, beta_i, mean_i, var_i) = self.indices();
        if ops::fused_applies(x, axis) {
            return Ok(vec![self.forward_fused(x, params)?]);
        }
        #[cfg(feature = "cudnn")]
        if params.mode().is_train() && crate::ops::cudnn_batch_norm::applies(x, axis) {
            return Ok(vec![self.forward_cudnn(x, params)?]);
        }

        let (centered, variance) = if params.mode().is_train() {
            let mean = x.mean_keepdim(reduce.as_slice())?;
            let centered = x.broadcast_sub(&mean)?;
            let variance = centered.sqr()?.mean_keepdim(reduce.as_slice())?;
            let keep = self.momentum;
            for (index, batch) in [(mean_i, &mean), (var_i, &variance)] {
                let var = params.var(index)?;
                let batch = batch.detach().reshape(channels)?.to_dtype(var.dtype())?;
                let updated = ((var.as_tensor().detach() * keep)? + (batch * (1.0 - keep))?)?;
                var.set(&updated)?;
            }
            (centered, variance)
        } else {
            let mean = params.get(mean_i)?.reshape(bshape.as_slice())?;
            let variance = params.get(var_i)?.reshape(bshape.as_slice())?;
            (x.broadcast_sub(&mean)?, variance)
        };
        // One per-channel factor, then one broadcast multiply over the activation.
        let mut factor = (variance + self.epsilon)?.sqrt()?.recip()?;
        if let Some(i) = gamma_i {
            factor = factor.broadcast_mul(&params.get(i)?.reshape(bshape.as_slice())?)?;
        }
        let mut y = centered.broadcast_mul(&factor)?;
        if let Some(i) = beta_i {
            y = y.broadcast_add(&params.get(i)?.reshape(bshape.as_slice())?)?;
        }
        Ok(vec![y])
    }
}

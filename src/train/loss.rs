//! Losses and metrics for classification.

use candle_core::{D, DType, Tensor};

use crate::Result;

/// A training loss; reduced to the batch mean.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::train::Loss;
/// let probs = Tensor::new(&[[0.25f32, 0.75]], &Device::Cpu)?;
/// let labels = Tensor::new(&[1u32], &Device::Cpu)?;
/// let loss = Loss::SparseCategoricalCrossentropy { from_logits: false }.compute(&probs, &labels)?;
/// assert!((loss.to_scalar::<f32>()? - (-(0.75f32).ln())).abs() < 1e-6);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Keras's `sparse_categorical_crossentropy`: integer labels; the model outputs logits
    /// (`from_logits: true`) or probabilities (the article's softmax head).
    SparseCategoricalCrossentropy {
        /// Whether the outputs are logits rather than probabilities.
        from_logits: bool,
    },
}

/// Keras clips probabilities to `[epsilon, 1 - epsilon]` before the log.
const PROBABILITY_EPSILON: f64 = 1e-7;

impl Loss {
    /// Mean loss of `outputs` (`(batch, classes)`) against `labels` (`(batch,)`, `u32`).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::train::Loss;
    /// let logits = Tensor::new(&[[0f32, 0.0]], &Device::Cpu)?;
    /// let labels = Tensor::new(&[0u32], &Device::Cpu)?;
    /// let loss = Loss::SparseCategoricalCrossentropy { from_logits: true }.compute(&logits, &labels)?;
    /// assert!((loss.to_scalar::<f32>()? - 2f32.ln()).abs() < 1e-6);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn compute(&self, outputs: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let Loss::SparseCategoricalCrossentropy { from_logits } = *self;
        // Losses are computed in f32 even for bf16/f16 models.
        let outputs = if outputs.dtype() == DType::F64 {
            outputs.clone()
        } else {
            outputs.to_dtype(DType::F32)?
        };
        let log_probs = if from_logits {
            candle_nn::ops::log_softmax(&outputs, D::Minus1)?
        } else {
            outputs
                .clamp(PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)?
                .log()?
        };
        Ok(candle_nn::loss::nll(&log_probs, labels)?)
    }
}

/// Number of rows whose arg-max equals the label, as a scalar `f32` tensor (kept on the
/// device so a training loop need not wait for it).
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::train::correct_predictions;
/// let out = Tensor::new(&[[0.1f32, 0.9], [0.8, 0.2]], &Device::Cpu)?;
/// let labels = Tensor::new(&[1u32, 1], &Device::Cpu)?;
/// assert_eq!(correct_predictions(&out, &labels)?.to_scalar::<f32>()?, 1.0);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn correct_predictions(outputs: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(outputs
        .argmax(D::Minus1)?
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()?)
}

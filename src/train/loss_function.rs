//! Losses from users' code and the weighting of any loss: the [`LossFunction`] trait (a focal
//! loss, a Dice loss, anything made of tensor ops), [`OutputLoss`] (a built-in [`Loss`] or
//! one of yours, per output), and Keras's `sample_weight` / `class_weight` reduction.
//!
//! Keras reduces a weighted loss as `sum(loss · weight) / count`, where `count` is the number
//! of loss values (samples, times positions for per-pixel outputs), not the sum of the
//! weights: a weight of 2 counts a sample twice, a weight of 0 drops it. This file does the
//! same.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::support::dtype::Cast;
use crate::train::Loss;
use crate::{Error, Result};

/// A loss written by a user: the loss of every sample (or every sample and position),
/// unreduced; `fit` averages it, with sample and class weights when given, and
/// differentiates it with candle's autograd.
///
/// # Examples
/// A binary focal loss (Lin et al.), used for one output of a model:
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::train::{LossFunction, Losses, OutputLoss};
///
/// #[derive(Debug)]
/// struct Focal { gamma: f64 }
///
/// impl LossFunction for Focal {
///     fn name(&self) -> &str { "focal" }
///     fn per_sample(&self, p: &Tensor, t: &Tensor) -> candle_functional::Result<Tensor> {
///         let p = p.clamp(1e-7, 1.0 - 1e-7)?;
///         // p_t: the probability given to the true class.
///         let p_t = ((&p * t)? + (p.affine(-1.0, 1.0)? * t.affine(-1.0, 1.0)?)?)?;
///         let weight = p_t.affine(-1.0, 1.0)?.powf(self.gamma)?;
///         Ok((weight * p_t.log()?)?.neg()?)
///     }
/// }
///
/// let focal = Focal { gamma: 2.0 };
/// let p = Tensor::new(&[[0.9f32], [0.2]], &Device::Cpu)?;
/// let t = Tensor::new(&[[1f32], [1.0]], &Device::Cpu)?;
/// let each = focal.per_sample(&p, &t)?.flatten_all()?.to_vec1::<f32>()?;
/// assert!(each[0] < each[1]); // the confident, right sample counts less
/// let losses = Losses::per_output(vec![OutputLoss::custom(focal)]);
/// assert_eq!(losses.losses()[0].name(), "focal");
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub trait LossFunction: std::fmt::Debug + Send + Sync {
    /// The loss's name (in messages).
    fn name(&self) -> &str;

    /// The loss of every sample, `(batch, …)`: one value per sample, or per sample and
    /// position. `outputs` are the model's (f32 or f64; cast them if they may be half
    /// precision), `targets` the batch's.
    fn per_sample(&self, outputs: &Tensor, targets: &Tensor) -> Result<Tensor>;

    /// Checks a target against its output's per-sample shape before the step runs (so that
    /// a bad batch fails before anything changes). The default asks for the batch size and
    /// the output's per-sample shape.
    fn check_target(
        &self,
        output_shape: &[usize],
        target: &Tensor,
        batch: usize,
        output: &str,
    ) -> Result<()> {
        let dims = target.dims();
        if dims.first() != Some(&batch) || &dims[1..] != output_shape {
            return Err(Error::InvalidInput {
                layer: output.to_string(),
                message: format!(
                    "target for {}: expected shape ({batch}, {output_shape:?}), got {dims:?}",
                    self.name()
                ),
            });
        }
        Ok(())
    }
}

/// The loss of one output: a built-in [`Loss`] (which `fit` knows: default accuracy, labels
/// checked on the device) or a user's [`LossFunction`].
///
/// # Examples
/// ```
/// use candle_functional::train::{Loss, OutputLoss};
/// let loss: OutputLoss = Loss::MeanSquaredError.into();
/// assert_eq!(loss.builtin(), Some(Loss::MeanSquaredError));
/// assert_eq!(loss.name(), "mean_squared_error");
/// ```
#[derive(Clone, Debug)]
pub enum OutputLoss {
    /// One of the crate's losses.
    Builtin(Loss),
    /// A user's loss.
    Custom(Arc<dyn LossFunction>),
}

impl OutputLoss {
    /// A user's loss.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Loss, OutputLoss};
    /// // Any LossFunction, the built-in losses included.
    /// let loss = OutputLoss::custom(Loss::MeanAbsoluteError);
    /// assert!(loss.builtin().is_none());
    /// ```
    pub fn custom(loss: impl LossFunction + 'static) -> Self {
        OutputLoss::Custom(Arc::new(loss))
    }

    /// The built-in loss, if it is one.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Loss, OutputLoss};
    /// assert!(OutputLoss::from(Loss::MeanSquaredError).builtin().is_some());
    /// ```
    pub fn builtin(&self) -> Option<Loss> {
        match self {
            OutputLoss::Builtin(loss) => Some(*loss),
            OutputLoss::Custom(_) => None,
        }
    }

    /// The loss's name.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Loss, OutputLoss};
    /// assert_eq!(OutputLoss::from(Loss::Huber { delta: 1.0 }).name(), "huber");
    /// ```
    pub fn name(&self) -> &str {
        self.function().name()
    }

    /// The loss as a [`LossFunction`].
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::train::{Loss, OutputLoss};
    /// let x = Tensor::new(&[[1f32]], &Device::Cpu)?;
    /// let each = OutputLoss::from(Loss::MeanSquaredError).function().per_sample(&x, &x)?;
    /// assert_eq!(each.dims(), &[1, 1]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn function(&self) -> &dyn LossFunction {
        match self {
            OutputLoss::Builtin(loss) => loss,
            OutputLoss::Custom(loss) => loss.as_ref(),
        }
    }
}

// The built-in losses are loss functions too; the impl lives here so that `loss.rs` needs
// nothing from this file (one direction between the two).
impl LossFunction for Loss {
    fn name(&self) -> &str {
        Loss::name(self)
    }

    fn per_sample(&self, outputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Loss::per_sample(self, outputs, targets)
    }

    fn check_target(
        &self,
        output_shape: &[usize],
        target: &Tensor,
        batch: usize,
        output: &str,
    ) -> Result<()> {
        Loss::check_target(self, output_shape, target, batch, output)
    }
}

impl From<Loss> for OutputLoss {
    fn from(loss: Loss) -> Self {
        OutputLoss::Builtin(loss)
    }
}

impl PartialEq<Loss> for OutputLoss {
    fn eq(&self, other: &Loss) -> bool {
        self.builtin() == Some(*other)
    }
}

/// Keras's reduction of a loss with weights: `sum(loss · weight) / count(loss)`; the plain
/// mean without. `weights` is `(batch,)` (one per sample) or has the loss's per-position
/// shape, with or without a class axis 1 (a per-pixel weight for a per-pixel loss); `output`
/// names the output in an error.
pub(crate) fn weighted_mean(
    losses: &Tensor,
    weights: Option<&Tensor>,
    output: &str,
) -> Result<Tensor> {
    let Some(weights) = weights else {
        return Ok(losses.mean_all()?);
    };
    let (l, w) = (losses.dims(), weights.dims());
    let shape: Vec<usize> = if w == l {
        w.to_vec()
    } else if w.len() == 1 && l.first() == w.first() {
        // One weight per sample, over every position.
        let mut s = vec![1; l.len()];
        s[0] = w[0];
        s
    } else if l.len() == w.len() + 1 && l.first() == w.first() && l[2..] == w[1..] {
        // A per-position weight for a loss that kept a class or feature axis 1.
        let mut s = w.to_vec();
        s.insert(1, 1);
        s
    } else {
        return Err(Error::InvalidInput {
            layer: output.to_string(),
            message: format!(
                "sample weights of shape {w:?} do not fit the loss's shape {l:?}: give one per sample ({:?}) or one per position",
                &l[..1]
            ),
        });
    };
    let weights = weights.cast(losses.dtype())?.reshape(shape)?;
    let count = losses.elem_count().max(1) as f64;
    Ok((losses.broadcast_mul(&weights)?.sum_all()? / count)?)
}

/// Keras's `class_weight` for one output: the weight of each sample's (or position's) class,
/// `class_weights[label]`. The class is the sparse label, the arg-max of a one-hot target
/// over axis 1, or the rounded target of a one-unit binary output. Labels must be in range
/// (checked before, or clamped on the device).
pub(crate) fn class_weights_of(
    loss: Loss,
    class_weights: &Tensor,
    target: &Tensor,
) -> Result<Tensor> {
    let classes = match loss {
        Loss::SparseCategoricalCrossentropy { .. } => target.cast(DType::U32)?,
        Loss::CategoricalCrossentropy { .. } => target.argmax(1)?,
        Loss::BinaryCrossentropy { .. } => target
            .cast(DType::F32)?
            .round()?
            .squeeze(1)?
            .cast(DType::U32)?,
        other => {
            return Err(Error::InvalidArgument(format!(
                "class weights need a classification loss, not {}",
                other.name()
            )));
        }
    };
    let flat = class_weights.index_select(&classes.flatten_all()?, 0)?;
    Ok(flat.reshape(classes.dims())?)
}

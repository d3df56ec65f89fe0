//! What Keras's `compile` and `fit` take besides the model and the optimizer: the losses of
//! the outputs and their weights ([`Losses`]), how progress is shown ([`Progress`]), how
//! divergence is watched ([`NanCheck`]), how gradients are computed ([`BackwardPass`]); and
//! what `evaluate` returns ([`Evaluation`]).

use std::collections::BTreeMap;

use crate::train::Loss;
use crate::train::loss_function::OutputLoss;
use crate::{Error, Result};

/// How `fit` reports progress. The library prints nothing unless asked.
///
/// # Examples
/// ```
/// assert_eq!(candle_functional::train::Progress::default(), candle_functional::train::Progress::Quiet);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Progress {
    /// Nothing.
    #[default]
    Quiet,
    /// A live bar per epoch on stderr: loss, accuracy, images/s, ETA.
    Bar,
    /// One line per epoch on stderr (for logs and CI).
    Lines,
}

/// The loss and metrics over a data set, by Keras's names (`loss`, `accuracy`, and for
/// several outputs `<output>_loss`, `<output>_accuracy`, ...).
///
/// # Examples
/// ```
/// let e = candle_functional::train::Evaluation::default().with("accuracy", 0.9);
/// assert_eq!(e.metric("accuracy"), Some(0.9));
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evaluation {
    /// Mean loss (the weighted sum over the outputs).
    pub loss: f64,
    /// Every other value by name.
    pub metrics: BTreeMap<String, f64>,
}

impl Evaluation {
    /// A value by name (`loss` or a metric).
    ///
    /// # Examples
    /// ```
    /// let e = candle_functional::train::Evaluation { loss: 0.5, ..Default::default() };
    /// assert_eq!(e.metric("loss"), Some(0.5));
    /// ```
    pub fn metric(&self, name: &str) -> Option<f64> {
        match name {
            "loss" => Some(self.loss),
            other => self.metrics.get(other).copied(),
        }
    }

    /// Adds a value (builder style).
    ///
    /// # Examples
    /// ```
    /// let e = candle_functional::train::Evaluation::default().with("mae", 0.25);
    /// assert_eq!(e.metrics["mae"], 0.25);
    /// ```
    pub fn with(mut self, name: impl Into<String>, value: f64) -> Self {
        self.metrics.insert(name.into(), value);
        self
    }
}

/// The losses of a model's outputs and their weights (Keras's `compile(loss=…,
/// loss_weights=…)`): one loss for every output, or one per output, summed with weights
/// (default 1) into the loss that is minimized.
///
/// # Examples
/// ```
/// use candle_functional::train::{Loss, Losses};
/// let one = Losses::from(Loss::MeanSquaredError);
/// let two = Losses::per_output(vec![
///     Loss::SparseCategoricalCrossentropy { from_logits: true },
///     Loss::MeanSquaredError,
/// ])
/// .weights(vec![1.0, 0.5]);
/// assert_eq!(two.losses().len(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct Losses {
    losses: Vec<OutputLoss>,
    weights: Option<Vec<f64>>,
}

impl Losses {
    /// One loss per output, in the order of the model's outputs: built-in [`Loss`]es, or
    /// [`OutputLoss`]es to mix in your own ([`OutputLoss::custom`]).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Loss, Losses};
    /// let l = Losses::per_output(vec![Loss::MeanAbsoluteError, Loss::MeanSquaredError]);
    /// assert_eq!(l.losses()[1], Loss::MeanSquaredError);
    /// ```
    pub fn per_output<L: Into<OutputLoss>>(losses: Vec<L>) -> Self {
        Self {
            losses: losses.into_iter().map(Into::into).collect(),
            weights: None,
        }
    }

    /// Weights of the outputs' losses in the total (default 1 each).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Loss, Losses};
    /// let l = Losses::from(Loss::MeanSquaredError).weights(vec![2.0]);
    /// ```
    pub fn weights(mut self, weights: Vec<f64>) -> Self {
        self.weights = Some(weights);
        self
    }

    /// The losses as given.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Loss, Losses};
    /// assert_eq!(Losses::from(Loss::MeanSquaredError).losses(), &[Loss::MeanSquaredError]);
    /// ```
    pub fn losses(&self) -> &[OutputLoss] {
        &self.losses
    }

    /// One loss and one weight per output of a model with `outputs` outputs.
    pub(super) fn resolve(&self, outputs: usize) -> Result<(Vec<OutputLoss>, Vec<f64>)> {
        let losses = match self.losses.as_slice() {
            [one] => vec![one.clone(); outputs],
            many if many.len() == outputs => many.to_vec(),
            many => {
                return Err(Error::InvalidArgument(format!(
                    "{} losses for a model with {outputs} outputs",
                    many.len()
                )));
            }
        };
        let weights = match &self.weights {
            None => vec![1.0; outputs],
            Some(w) if w.len() == outputs && w.iter().all(|x| x.is_finite()) => w.clone(),
            Some(w) => {
                return Err(Error::InvalidArgument(format!(
                    "loss weights {w:?} for a model with {outputs} outputs: one finite weight per output"
                )));
            }
        };
        Ok((losses, weights))
    }
}

impl From<Loss> for Losses {
    fn from(loss: Loss) -> Self {
        Self::per_output(vec![loss])
    }
}

impl From<OutputLoss> for Losses {
    fn from(loss: OutputLoss) -> Self {
        Self::per_output(vec![loss])
    }
}

/// How a [`Trainer`](crate::train::Trainer) watches for divergence (Keras's `TerminateOnNaN`): a step whose loss or
/// gradients are NaN or infinite stops training with [`Error::NonFinite`], naming the epoch
/// and the step, and nothing of that step is applied.
///
/// # Examples
/// ```
/// use candle_functional::train::NanCheck;
/// assert_ne!(NanCheck::EveryStep, NanCheck::OnDevice);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NanCheck {
    /// Read the verdict after every step, before anything is applied (the CPU's default:
    /// reading two scalars costs nothing there).
    EveryStep,
    /// Decide on the device and never wait for it (the GPU's default): the step's updates are
    /// applied only where a device flag says every step so far was finite, so the first bad
    /// step and all after it change nothing; the error is raised where the trainer reads the
    /// loss anyway (progress, end of epoch) or at [`Trainer::check_divergence`](crate::train::Trainer::check_divergence). Sparse
    /// labels are range-checked the same way, on the device (clamped for the step's loss, so
    /// that nothing is indexed out of bounds), instead of being read before the step.
    OnDevice,
    /// No check (Keras without `TerminateOnNaN`).
    Off,
}

/// How a [`Trainer`](crate::train::Trainer) computes the gradients of a training step.
///
/// The model's own backward pass over its plan ([`BackwardPass::Plan`]) applies on one
/// process without a mixed-precision compute dtype; elsewhere every choice is candle's
/// autograd. Every choice gives the same gradients to rounding.
///
/// # Examples
/// ```
/// use candle_functional::train::BackwardPass;
/// assert_eq!(BackwardPass::default(), BackwardPass::Auto);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackwardPass {
    /// [`BackwardPass::Plan`] on the CPU, [`BackwardPass::Autograd`] elsewhere (the default).
    /// On CUDA the plan's pass is compiled and its composition tested on the CPU
    /// ([`BackwardPass::PlanComposed`]), but it has not yet been run on a GPU: ask for it with
    /// [`BackwardPass::Plan`].
    #[default]
    Auto,
    /// The model's own backward pass over its plan, on any device: convolutions and batch
    /// norms compute their gradients with their own kernels (on the CPU the crate's fused
    /// ones; on CUDA cuDNN's, with the ReLUs' masks and bias sums as passes of their own),
    /// every other layer through candle's autograd on its own step; a tensor's first gradient
    /// is moved in rather than added to zeros.
    Plan,
    /// [`BackwardPass::Plan`] with the gradients composed as on CUDA on every device: on the
    /// CPU, the crate's unfused gradient kernels in cuDNN's place and the ReLUs' masks, bias
    /// sums and residual sums as passes of their own. Slower than [`BackwardPass::Plan`] on
    /// the CPU; it is there to count what a GPU step launches (`bench --counts`) and to test
    /// the GPU's composition where there is no GPU.
    PlanComposed,
    /// candle's autograd over the whole step.
    Autograd,
}

//! [`Trainer`]: Keras's `compile`/`fit`/`evaluate`/`predict` for a [`Model`], with
//! checkpoints that resume a run exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::data::{Batch, Dataset};
use crate::graph::{Mode, StateUpdates};
use crate::models::Model;
use crate::models::weights::converted;
use crate::ops;
use crate::profile::read_vec;
use crate::support::dtype::Cast;
use crate::support::files::{parse_safetensors, to_safetensors_bytes, write_atomically};
use crate::train::callbacks::{Callback, run_callbacks};
use crate::train::metrics::{Metric, default_metrics};
use crate::train::{
    EpochLog, History, Loss, LrSchedule, Optimizer, OptimizerConfig, OptimizerState,
};
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
#[derive(Clone, Debug, PartialEq)]
pub struct Losses {
    losses: Vec<Loss>,
    weights: Option<Vec<f64>>,
}

impl Losses {
    /// One loss per output, in the order of the model's outputs.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Loss, Losses};
    /// let l = Losses::per_output(vec![Loss::MeanAbsoluteError, Loss::MeanSquaredError]);
    /// assert_eq!(l.losses()[1], Loss::MeanSquaredError);
    /// ```
    pub fn per_output(losses: Vec<Loss>) -> Self {
        Self {
            losses,
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
    pub fn losses(&self) -> &[Loss] {
        &self.losses
    }

    /// One loss and one weight per output of a model with `outputs` outputs.
    fn resolve(&self, outputs: usize) -> Result<(Vec<Loss>, Vec<f64>)> {
        let losses = match self.losses.as_slice() {
            [one] => vec![*one; outputs],
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

/// How a [`Trainer`] watches for divergence (Keras's `TerminateOnNaN`): a step whose loss or
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
    /// loss anyway (progress, end of epoch) or at [`Trainer::check_divergence`]. Sparse
    /// labels are range-checked the same way, on the device (clamped for the step's loss, so
    /// that nothing is indexed out of bounds), instead of being read before the step.
    OnDevice,
    /// No check (Keras without `TerminateOnNaN`).
    Off,
}

/// The device-side record of [`NanCheck::OnDevice`], detached from every step's autograd
/// graph (it is carried from step to step: anything it referenced would stay alive).
struct DivergenceFlag {
    /// u8 scalar: 1 while every step was finite (and its labels in range).
    alive: Tensor,
    /// f64 scalar: the epoch and step of the first rejected step, encoded
    /// `epoch · 2³² + step` (0: none).
    first_bad: Tensor,
    /// u8 scalar: 1 when the first rejected step's labels were out of range.
    bad_labels: Tensor,
}

const CHECKPOINT_FORMAT: &str = "candle-functional/checkpoint/1";

/// Trains a model: Keras's `model.compile(optimizer, loss, loss_weights, metrics)` and what
/// follows, for any functional model: several inputs, several outputs each with its loss,
/// weight and metrics, frozen layers. Deterministic on CPU for a given model seed and data
/// seed.
///
/// A training step checks every target against its output (dtype, shape, label range; under
/// [`NanCheck::OnDevice`] the label range on the device, refusing the step) before the
/// forward pass, and writes nothing (weights, optimizer state, BatchNorm statistics, the
/// divergence flag) unless the whole step succeeds.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::data::TensorDataset;
/// use candle_functional::prelude::*;
/// use candle_functional::train::{AdamConfig, Loss, Losses, Trainer};
///
/// // Two inputs, two outputs: a class and a value.
/// let (image, extra) = (Input::new([4]), Input::new([2]));
/// let joined = Concatenate::new(1).call_many(&[image.clone(), extra.clone()])?;
/// let hidden = Dense::new(8).activation(ActivationFn::Relu).call(&joined)?;
/// let class = Dense::new(3).name("class").call(&hidden)?;
/// let value = Dense::new(1).name("value").call(&hidden)?;
/// let model = Model::new(&[image, extra], &[class, value])?.build(&Device::Cpu, DType::F32, 0)?;
///
/// let dev = Device::Cpu;
/// let data = TensorDataset::new(
///     vec![Tensor::randn(0f32, 1.0, (16, 4), &dev)?, Tensor::randn(0f32, 1.0, (16, 2), &dev)?],
///     vec![Tensor::zeros(16, DType::U32, &dev)?, Tensor::ones((16, 1), DType::F32, &dev)?],
///     8,
/// )?;
/// let losses = Losses::per_output(vec![
///     Loss::SparseCategoricalCrossentropy { from_logits: true },
///     Loss::MeanSquaredError,
/// ])
/// .weights(vec![1.0, 0.5]);
/// let mut trainer = Trainer::new(model, AdamConfig::default(), losses)?;
/// let history = trainer.fit(&data, None, 2, &mut [])?;
/// let last = history.last().unwrap();
/// assert!(last.metric("class_accuracy").is_some() && last.metric("value_loss").is_some());
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub struct Trainer {
    model: Model,
    optimizer: Box<dyn Optimizer>,
    losses: Vec<Loss>,
    loss_weights: Vec<f64>,
    metrics: Vec<Vec<Box<dyn Metric>>>,
    output_names: Vec<String>,
    schedule: LrSchedule,
    progress: Progress,
    history: History,
    epochs_done: usize,
    steps_done: usize,
    dtype: DType,
    nan_check: NanCheck,
    divergence: Option<DivergenceFlag>,
    /// Per output, the bounds of its sparse labels on the device (`Loss::label_bounds`),
    /// made at the first step that checks labels on the device.
    label_bounds: Vec<Option<(Tensor, Tensor)>>,
    optimizer_config: OptimizerConfig,
    /// Batches an epoch of the run so far (restored from a checkpoint): resuming with other
    /// data or another batch size would not continue the same run.
    batches_per_epoch: Option<usize>,
    /// Whether the next `fit` continues a run restored by `load_checkpoint` (and so must see
    /// the same number of batches an epoch); a second `fit` in one process may take new data.
    resumed: bool,
}

/// Sums over one pass through a data set, kept on the device.
struct Totals {
    loss: Tensor,
    per_output: Vec<Tensor>,
    samples: usize,
}

impl Totals {
    fn new(outputs: usize, device: &candle_core::Device) -> Result<Self> {
        // f64 sums: an epoch of f32 losses summed in f32 would lose digits.
        let zero = Tensor::zeros((), DType::F64, device)?;
        Ok(Self {
            loss: zero.clone(),
            per_output: vec![zero; outputs],
            samples: 0,
        })
    }

    fn add(&mut self, loss: &Tensor, per_output: &[Tensor], samples: usize) -> Result<()> {
        // Detached: a sum carried over a whole epoch must not hold any step's graph.
        let weighted = |t: &Tensor| t.detach().cast(DType::F64)?.affine(samples as f64, 0.0);
        self.loss = (&self.loss + weighted(loss)?)?;
        for (total, l) in self.per_output.iter_mut().zip(per_output) {
            *total = (&*total + weighted(l)?)?;
        }
        self.samples += samples;
        Ok(())
    }

    fn mean(&self, t: &Tensor) -> Result<f64> {
        Ok(crate::profile::read_scalar::<f64>(t)? / self.samples.max(1) as f64)
    }
}

impl Trainer {
    /// A trainer for a built model: the optimizer, and the loss of every output (a [`Loss`]
    /// for all of them, or [`Losses`] per output with weights). Outputs trained with a
    /// cross-entropy report their accuracy unless [`Trainer::metrics`] says otherwise.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// use candle_functional::train::{Loss, SgdConfig, Trainer};
    /// let x = Input::new([2]);
    /// let y = Dense::new(2).call(&x)?;
    /// let unbuilt = Model::new(&[x], &[y])?;
    /// let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    /// assert!(Trainer::new(unbuilt, SgdConfig::default(), loss).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn new(
        model: Model,
        optimizer: impl Into<OptimizerConfig>,
        losses: impl Into<Losses>,
    ) -> Result<Self> {
        if !model.is_built() {
            return Err(Error::NotBuilt {
                model: model.name().to_string(),
            });
        }
        let outputs = model.outputs().len();
        let (losses, loss_weights) = losses.into().resolve(outputs)?;
        let dtype = model
            .weights()?
            .first()
            .map(|w| w.var().dtype())
            .unwrap_or(DType::F32);
        let output_names = model
            .outputs()
            .iter()
            .map(|t| t.layer().display_name())
            .collect();
        let optimizer_config = optimizer.into();
        let model_device = model.device().unwrap_or(candle_core::Device::Cpu);
        Ok(Self {
            optimizer: optimizer_config.build()?,
            optimizer_config,
            batches_per_epoch: None,
            resumed: false,
            metrics: losses.iter().map(default_metrics).collect(),
            losses,
            loss_weights,
            output_names,
            model,
            schedule: LrSchedule::Constant,
            progress: Progress::Quiet,
            history: History::default(),
            epochs_done: 0,
            steps_done: 0,
            nan_check: if crate::device::reads_wait_for_a_queue(&model_device) {
                NanCheck::OnDevice
            } else {
                NanCheck::EveryStep
            },
            divergence: None,
            label_bounds: Vec::new(),
            dtype,
        })
    }

    /// Sets the metrics of output `output` (replacing its defaults).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// use candle_functional::train::{Loss, MeanError, Metric, SgdConfig, Trainer};
    /// let x = Input::new([2]);
    /// let y = Dense::new(1).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let trainer = Trainer::new(model, SgdConfig::default(), Loss::MeanSquaredError)?
    ///     .metrics(0, vec![Box::new(MeanError::absolute())])?;
    /// assert!(Trainer::new(trainer.model().clone(), SgdConfig::default(), Loss::MeanSquaredError)?
    ///     .metrics(1, vec![]).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn metrics(mut self, output: usize, metrics: Vec<Box<dyn Metric>>) -> Result<Self> {
        let count = self.metrics.len();
        let slot = self.metrics.get_mut(output).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "metrics for output {output} of a model with {count} outputs"
            ))
        })?;
        *slot = metrics;
        Ok(self)
    }

    /// How divergence is watched for (default [`NanCheck::EveryStep`] on the CPU,
    /// [`NanCheck::OnDevice`] elsewhere); see [`NanCheck`].
    ///
    /// # Examples
    /// ```no_run
    /// # use candle_functional::train::{NanCheck, Trainer};
    /// # fn f(t: Trainer) -> Trainer {
    /// t.nan_check(NanCheck::Off)
    /// # }
    /// ```
    pub fn nan_check(mut self, check: NanCheck) -> Self {
        self.nan_check = check;
        self
    }

    /// With [`NanCheck::OnDevice`]: reads the device's verdict (one scalar) and fails with
    /// [`Error::NonFinite`] if a step since the start of this `fit` (or of the trainer) was
    /// not finite, or with [`Error::InvalidInput`] if its labels were out of range (the
    /// check the other modes make before the step). `fit` calls it where it reads the loss
    /// anyway; call it after your own `train_step` loop. Always `Ok` with the other checks.
    ///
    /// # Examples
    /// ```no_run
    /// # fn f(t: &candle_functional::train::Trainer) -> candle_functional::Result<()> {
    /// t.check_divergence()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn check_divergence(&self) -> Result<()> {
        let Some(flag) = &self.divergence else {
            return Ok(());
        };
        let code = crate::profile::read_scalar::<f64>(&flag.first_bad)? as u64;
        if code == 0 {
            return Ok(());
        }
        let (epoch, step) = ((code >> 32) as usize, (code & 0xFFFF_FFFF) as usize);
        if crate::profile::read_scalar::<u8>(&flag.bad_labels)? != 0 {
            return Err(Error::InvalidInput {
                layer: self.output_names.join(", "),
                message: format!(
                    "epoch {epoch}, step {step}: labels out of range (not below the output's classes); the step and any after it were not applied"
                ),
            });
        }
        Err(Error::NonFinite {
            epoch,
            step,
            // One device flag holds every verdict: say everything it covers.
            what: "the loss, the gradients, the BatchNorm statistics or the updated weights".into(),
        })
    }

    /// Sets the learning-rate schedule (default constant).
    ///
    /// # Examples
    /// ```no_run
    /// # use candle_functional::train::{LrSchedule, Trainer};
    /// # fn f(t: Trainer) -> Trainer {
    /// t.schedule(LrSchedule::one_cycle())
    /// # }
    /// ```
    pub fn schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Sets how `fit` reports progress (default quiet).
    ///
    /// # Examples
    /// ```no_run
    /// # use candle_functional::train::{Progress, Trainer};
    /// # fn f(t: Trainer) -> Trainer {
    /// t.progress(Progress::Bar)
    /// # }
    /// ```
    pub fn progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    /// The model being trained.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{AdamConfig, Loss, Trainer};
    /// # let x = Input::new([1, 2, 2]);
    /// # let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// # let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu)?;
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// assert_eq!(trainer.model().name(), "functional");
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The epochs run so far (including those restored from a checkpoint).
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{AdamConfig, Loss, Trainer};
    /// # let x = Input::new([1, 2, 2]);
    /// # let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// # let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu)?;
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// trainer.fit(&loader, None, 1, &mut [])?;
    /// assert_eq!(trainer.history().epochs().len(), 1);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Number of completed epochs.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{AdamConfig, Loss, Trainer};
    /// # let x = Input::new([1, 2, 2]);
    /// # let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// # let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu)?;
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// assert_eq!(trainer.epochs_done(), 0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// One optimization step on a batch: targets checked, forward in training mode, the
    /// weighted sum of the outputs' losses, backward, the metrics accumulate the batch, update
    /// of the trainable weights, then of the BatchNorm statistics. Returns the batch's loss
    /// as a device scalar (reading it waits for the device; `fit` does so only to report).
    /// Nothing is written unless every part succeeds.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{AdamConfig, Loss, Trainer};
    /// # let x = Input::new([1, 2, 2]);
    /// # let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// # let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu)?;
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// use candle_functional::data::Dataset;
    /// let batch = loader.batches(0).next().unwrap()?;
    /// let loss = trainer.train_step(&batch, 1e-3)?;
    /// assert!(loss.to_scalar::<f32>()?.is_finite());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn train_step(&mut self, batch: &Batch, lr: f64) -> Result<Tensor> {
        let position = (self.epochs_done + 1, self.steps_done + 1);
        Ok(self.step(batch, lr, position)?.0)
    }

    /// [`Trainer::train_step`], also returning each output's (unweighted) loss. `position`
    /// (epoch, step) names the step in a divergence error.
    fn step(
        &mut self,
        batch: &Batch,
        lr: f64,
        position: (usize, usize),
    ) -> Result<(Tensor, Vec<Tensor>)> {
        // A NaN or infinite rate would write NaN into every weight; a negative one climbs.
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "learning rate {lr} at epoch {}, step {}: it must be finite and not negative",
                position.0, position.1
            )));
        }
        let on_device = self.nan_check == NanCheck::OnDevice;
        // Off the device check, labels are range-checked before the step (a host read);
        // on it, the verdict joins the divergence flag.
        let (targets, labels_ok) = if on_device {
            self.targets_checked_on_device(batch)?
        } else {
            self.check_targets(batch)?;
            (batch.targets.clone(), None)
        };
        let inputs = self.cast_inputs(&batch.inputs)?;
        let updates = StateUpdates::default();
        let outputs = self
            .model
            .forward_deferred(&inputs, Mode::Train, &updates)?;
        let (total, per_output) = self.losses_of(&outputs, &targets)?;
        let grads = total.backward()?;
        let vars = self.model.trainable_weights()?;
        let gradients: Vec<&Tensor> = vars
            .iter()
            .filter_map(|(_, v)| grads.get(v.as_tensor()))
            .collect();
        // The held-back state (BatchNorm's moving statistics) and what the optimizer would
        // write are checked with the loss and the gradients, before anything is written: the
        // step is applied whole or not at all, and nothing non-finite is ever applied.
        let state = updates.into_latest();
        let new_state: Vec<&Tensor> = state.iter().map(|(_, value)| value).collect();
        let next_flag = match self.nan_check {
            NanCheck::EveryStep => {
                // One read of all the verdicts, in the order of `WHAT`.
                const WHAT: [&str; 4] = [
                    "the loss",
                    "the gradients",
                    "the BatchNorm statistics",
                    "the updated weights or optimizer state",
                ];
                let mut verdicts = vec![ops::all_finite(&[&total])?];
                let one = || Tensor::new(1u8, total.device());
                verdicts.push(match gradients.is_empty() {
                    true => one()?,
                    false => ops::all_finite(&gradients)?,
                });
                verdicts.push(match new_state.is_empty() {
                    true => one()?,
                    false => ops::all_finite(&new_state)?,
                });
                let update = self.optimizer.step_is_finite(&vars, &grads, lr)?;
                verdicts.push(match update {
                    Some(verdict) => verdict,
                    None => one()?,
                });
                let read = read_vec::<u8>(&Tensor::stack(&verdicts, 0)?)?;
                if let Some(bad) = read.iter().position(|&v| v == 0) {
                    return Err(Error::NonFinite {
                        epoch: position.0,
                        step: position.1,
                        what: WHAT[bad].into(),
                    });
                }
                None
            }
            NanCheck::OnDevice => {
                let mut checked = vec![&total];
                checked.extend(&gradients);
                checked.extend(new_state.iter().copied());
                let mut finite = ops::all_finite(&checked)?;
                if let Some(update) = self.optimizer.step_is_finite(&vars, &grads, lr)? {
                    finite = (finite * update)?;
                }
                Some(self.next_divergence(finite, labels_ok, position)?)
            }
            NanCheck::Off => None,
        };
        // Whether the step applies: the new flag's `alive` (the flag itself is kept only once
        // the step is written).
        let keep = next_flag.as_ref().map(|flag| &flag.alive);
        let assignments: Vec<(&Var, &Tensor)> =
            state.iter().map(|(var, value)| (var, value)).collect();
        ops::check_assignments(&assignments, keep)?;
        update_metrics(&mut self.metrics, &outputs, &targets)?;
        match keep {
            Some(keep) => self.optimizer.step_if(&vars, &grads, lr, keep)?,
            None => self.optimizer.step(&vars, &grads, lr)?,
        }
        // One launch on CUDA.
        ops::assign_checked(&assignments, keep)?;
        if next_flag.is_some() {
            self.divergence = next_flag;
        }
        Ok((total.detach(), per_output))
    }

    /// [`NanCheck::OnDevice`]: this step's verdicts (finite loss and gradients, labels in
    /// range) folded into the device flag, which the caller keeps once the step is applied;
    /// its `alive` (u8) says whether the step's updates apply (every step so far good).
    /// Every tensor in it is detached.
    fn next_divergence(
        &self,
        finite: Tensor,
        labels_ok: Option<Tensor>,
        (epoch, step): (usize, usize),
    ) -> Result<DivergenceFlag> {
        let device = finite.device().clone();
        let ok = match &labels_ok {
            Some(labels) => (&finite * labels)?,
            None => finite,
        };
        let start;
        let flag = match &self.divergence {
            Some(flag) => flag,
            None => {
                start = DivergenceFlag {
                    alive: Tensor::new(1u8, &device)?,
                    first_bad: Tensor::new(0f64, &device)?,
                    bad_labels: Tensor::new(0u8, &device)?,
                };
                &start
            }
        };
        let keep = (&flag.alive * &ok)?.detach();
        // The first step that turns `alive` off is recorded: alive - keep is 1 just then.
        let turned_off = (&flag.alive - &keep)?;
        let code = ((epoch as u64) << 32 | step as u64) as f64;
        let first_bad = (&flag.first_bad + turned_off.cast(DType::F64)?.affine(code, 0.0)?)?;
        let bad_labels = match labels_ok {
            // alive - keep is 1 only at the first bad step; that times (1 - labels_ok), written
            // turned_off - turned_off · labels_ok (u8, never negative), is 1 if its labels were
            // the cause.
            Some(labels) => (&flag.bad_labels + (&turned_off - (&turned_off * labels)?)?)?,
            None => flag.bad_labels.clone(),
        };
        Ok(DivergenceFlag {
            alive: keep,
            first_bad: first_bad.detach(),
            bad_labels: bad_labels.detach(),
        })
    }

    /// [`Trainer::check_targets`] without reading values: shapes and dtypes checked at once,
    /// sparse labels range-checked on the device. Returns the targets to train on (sparse
    /// labels clamped into range) and the labels' verdict (a u8 scalar), if any.
    fn targets_checked_on_device(
        &mut self,
        batch: &Batch,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let n = self.check_batch_layout(batch)?;
        let mut bounds = std::mem::take(&mut self.label_bounds);
        bounds.resize(batch.targets.len(), None);
        let mut targets = Vec::with_capacity(batch.targets.len());
        let mut verdict: Option<Tensor> = None;
        for ((shape, target, loss, name), bound) in self.targets_of(batch).zip(&mut bounds) {
            loss.check_target_layout(shape, target, n, name)?;
            // Made again only when the labels' dtype or device changes.
            let stale = bound.as_ref().is_none_or(|(zero, _)| {
                zero.dtype() != target.dtype() || !zero.device().same_device(target.device())
            });
            if stale {
                *bound = loss.label_bounds(shape, target)?;
            }
            let checked = match bound {
                Some(b) => Loss::labels_on_device(target, b)?,
                None => None,
            };
            match checked {
                Some((ok, clamped)) => {
                    verdict = Some(match verdict {
                        Some(v) => (v * ok)?,
                        None => ok,
                    });
                    targets.push(clamped);
                }
                None => targets.push(target.clone()),
            }
        }
        self.label_bounds = bounds;
        Ok((targets, verdict))
    }

    /// Checks the batch's targets against the model's outputs, before anything runs.
    fn check_targets(&self, batch: &Batch) -> Result<()> {
        let n = self.check_batch_layout(batch)?;
        for (shape, target, loss, name) in self.targets_of(batch) {
            loss.check_target(shape, target, n, name)?;
        }
        Ok(())
    }

    /// Each output's per-sample shape, target, loss and name.
    fn targets_of<'a>(
        &'a self,
        batch: &'a Batch,
    ) -> impl Iterator<Item = (&'a [usize], &'a Tensor, &'a Loss, &'a str)> {
        self.model
            .outputs()
            .iter()
            .zip(&batch.targets)
            .zip(&self.losses)
            .zip(&self.output_names)
            .map(|(((output, target), loss), name)| (output.shape(), target, loss, name.as_str()))
    }

    /// One target per output and a non-empty batch; returns the batch size.
    fn check_batch_layout(&self, batch: &Batch) -> Result<usize> {
        let outputs = self.model.outputs();
        if batch.targets.len() != outputs.len() {
            return Err(Error::InvalidArgument(format!(
                "model `{}` has {} output(s), the batch has {} target(s)",
                self.model.name(),
                outputs.len(),
                batch.targets.len()
            )));
        }
        let n = batch.samples()?;
        if n == 0 {
            return Err(Error::InvalidArgument(
                "an empty batch: there is nothing to train or score".into(),
            ));
        }
        Ok(n)
    }

    /// The weighted total and each output's loss.
    fn losses_of(&self, outputs: &[Tensor], targets: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        let mut total: Option<Tensor> = None;
        let mut per_output = Vec::with_capacity(outputs.len());
        for (((out, target), loss), weight) in outputs
            .iter()
            .zip(targets)
            .zip(&self.losses)
            .zip(&self.loss_weights)
        {
            let value = loss.compute(out, target)?;
            let weighted = if *weight == 1.0 {
                value.clone()
            } else {
                (&value * *weight)?
            };
            total = Some(match total {
                Some(t) => (t + weighted)?,
                None => weighted,
            });
            per_output.push(value.detach());
        }
        let total =
            total.ok_or_else(|| Error::InvalidArgument("a model without outputs".into()))?;
        Ok((total, per_output))
    }

    fn cast_inputs(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let dtype = self.model.compute_dtype().unwrap_or(self.dtype);
        inputs
            .iter()
            .map(|t| {
                // Float inputs take the model's dtype; integer inputs (indices) stay as they are.
                Ok(if t.dtype().is_float() {
                    t.cast(dtype)?
                } else {
                    t.clone()
                })
            })
            .collect()
    }

    /// The key prefix of output `i`: none for a single output, `<output>_` otherwise.
    fn prefix(&self, i: usize) -> String {
        if self.output_names.len() == 1 {
            String::new()
        } else {
            format!("{}_", self.output_names[i])
        }
    }

    /// Every metric's value and each output's loss (several outputs), by Keras's names.
    fn named_values(
        &self,
        metrics: &[Vec<Box<dyn Metric>>],
        totals: &Totals,
    ) -> Result<BTreeMap<String, f64>> {
        let mut values = BTreeMap::new();
        for (i, list) in metrics.iter().enumerate() {
            let prefix = self.prefix(i);
            if self.output_names.len() > 1 {
                values.insert(format!("{prefix}loss"), totals.mean(&totals.per_output[i])?);
            }
            for metric in list {
                values.insert(format!("{prefix}{}", metric.name()), metric.result()?);
            }
        }
        Ok(values)
    }

    /// Trains until `epochs` epochs are done in total (a resumed trainer continues from its
    /// checkpoint's epoch), evaluating on `validation` after each, and calling `callbacks`.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{AdamConfig, Loss, Trainer};
    /// # let x = Input::new([1, 2, 2]);
    /// # let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// # let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu)?;
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// let history = trainer.fit(&loader, Some(&loader), 2, &mut [])?;
    /// assert!(history.last().unwrap().metric("val_accuracy").is_some());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn fit(
        &mut self,
        train: &dyn Dataset,
        validation: Option<&dyn Dataset>,
        epochs: usize,
        callbacks: &mut [Box<dyn Callback>],
    ) -> Result<&History> {
        if train.is_empty() {
            return Err(Error::InvalidArgument("no training data".into()));
        }
        self.schedule.validate()?;
        if let Some(n) = self.batches_per_epoch
            && self.resumed
            && n != train.len()
        {
            return Err(Error::InvalidArgument(format!(
                "the run resumed from a checkpoint had {n} batches an epoch, this data has {}: resume with the same data and batch size",
                train.len()
            )));
        }
        self.batches_per_epoch = Some(train.len());
        self.resumed = false;
        self.divergence = None;
        let total_steps = epochs * train.len();
        let base_lr = self.optimizer.learning_rate();
        // Where reading a value waits for a queue (a GPU), refresh the display less often.
        let refresh = if crate::device::reads_wait_for_a_queue(train.device()) {
            25
        } else {
            1
        };
        while self.epochs_done < epochs {
            let epoch = self.epochs_done;
            let bar = self.progress_bar(epoch + 1, epochs, train.len());
            let start = Instant::now();
            let mut totals = Totals::new(self.losses.len(), train.device())?;
            self.metrics.iter_mut().flatten().for_each(|m| m.reset());
            let mut lr = base_lr;
            for (i, batch) in train.batches(epoch as u64).enumerate() {
                let batch = batch?;
                let n = batch.samples()?;
                lr = self
                    .schedule
                    .learning_rate(base_lr, epoch, self.steps_done, total_steps);
                let (loss, per_output) = self.step(&batch, lr, (epoch + 1, i + 1))?;
                totals.add(&loss, &per_output, n)?;
                self.steps_done += 1;
                if let Some(bar) = &bar {
                    bar.inc(1);
                    if i % refresh == 0 || i + 1 == train.len() {
                        self.check_divergence()?;
                        let rate = totals.samples as f64 / start.elapsed().as_secs_f64();
                        let mut message = format!("loss {:.4}", totals.mean(&totals.loss)?);
                        if let Some(first) = self.metrics.iter().flatten().next() {
                            message.push_str(&format!(" {} {:.4}", first.name(), first.result()?));
                        }
                        bar.set_message(format!("{message} {rate:.0} samples/s"));
                    }
                }
            }
            self.check_divergence()?;
            let seconds = start.elapsed().as_secs_f64();
            let mut log = EpochLog {
                epoch: epoch + 1,
                loss: totals.mean(&totals.loss)?,
                metrics: self.named_values(&self.metrics, &totals)?,
                learning_rate: lr,
                seconds,
                images_per_sec: totals.samples as f64 / seconds,
                ..Default::default()
            };
            if let Some(v) = validation {
                let val_start = Instant::now();
                let val = self.evaluate(v)?;
                log.val_loss = Some(val.loss);
                log.metrics.extend(
                    val.metrics
                        .into_iter()
                        .map(|(k, v)| (format!("val_{k}"), v)),
                );
                log.val_seconds = val_start.elapsed().as_secs_f64();
            }
            let line = format_epoch(&log, epochs);
            match (&bar, self.progress) {
                (Some(bar), _) => bar.finish_with_message(line),
                (None, Progress::Lines) => eprintln!("{line}"),
                _ => {}
            }
            self.history.push(log.clone());
            self.epochs_done += 1;
            if run_callbacks(callbacks, self, &log)? {
                break;
            }
        }
        Ok(&self.history)
    }

    fn progress_bar(&self, epoch: usize, epochs: usize, steps: usize) -> Option<ProgressBar> {
        if self.progress != Progress::Bar {
            return None;
        }
        let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("epoch {epoch}/{epochs}"));
        Some(bar)
    }

    /// The loss and metrics over a data set, in inference mode (fresh copies of the metrics:
    /// the training ones are left alone).
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{AdamConfig, Loss, Trainer};
    /// # let x = Input::new([1, 2, 2]);
    /// # let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// # let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu)?;
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// let scores = trainer.evaluate(&loader)?;
    /// assert!((0.0..=1.0).contains(&scores.metric("accuracy").unwrap()));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn evaluate(&self, data: &dyn Dataset) -> Result<Evaluation> {
        let mut totals = Totals::new(self.losses.len(), data.device())?;
        let mut fresh: Vec<Vec<Box<dyn Metric>>> = self
            .metrics
            .iter()
            .map(|list| list.iter().map(|m| m.boxed_clone()).collect())
            .collect();
        for batch in data.batches(0) {
            let batch = batch?;
            self.check_targets(&batch)?;
            let outputs = self
                .model
                .forward(&self.cast_inputs(&batch.inputs)?, Mode::Eval)?;
            let (loss, per_output) = self.losses_of(&outputs, &batch.targets)?;
            totals.add(&loss, &per_output, batch.samples()?)?;
            update_metrics(&mut fresh, &outputs, &batch.targets)?;
        }
        if totals.samples == 0 {
            return Err(Error::InvalidArgument("no evaluation data".into()));
        }
        Ok(Evaluation {
            loss: totals.mean(&totals.loss)?,
            metrics: self.named_values(&fresh, &totals)?,
        })
    }

    /// Every output of the model for every sample, in order, in inference mode (targets, if
    /// the data has any, are ignored).
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{AdamConfig, Loss, Trainer};
    /// # let x = Input::new([1, 2, 2]);
    /// # let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// # let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu)?;
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// assert_eq!(trainer.predict(&loader)?[0].dims(), &[2, 2]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn predict(&self, data: &dyn Dataset) -> Result<Vec<Tensor>> {
        let mut per_output: Vec<Vec<Tensor>> = vec![Vec::new(); self.model.outputs().len()];
        for batch in data.batches(0) {
            let inputs = self.cast_inputs(&batch?.inputs)?;
            for (all, out) in per_output
                .iter_mut()
                .zip(self.model.forward(&inputs, Mode::Eval)?)
            {
                all.push(out);
            }
        }
        per_output
            .iter()
            .map(|parts| Ok(Tensor::cat(parts, 0)?))
            .collect()
    }

    /// Writes everything needed to resume: weights (with BatchNorm state), optimizer state,
    /// completed epochs and steps, the forward-call counter (dropout masks) and the history.
    /// Written to a temporary file and renamed.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{AdamConfig, Loss, Trainer};
    /// # let x = Input::new([1, 2, 2]);
    /// # let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// # let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu)?;
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// let path = std::env::temp_dir().join("cf_doc_trainer.ckpt");
    /// trainer.fit(&loader, None, 1, &mut [])?;
    /// trainer.save_checkpoint(&path)?;
    /// trainer.load_checkpoint(&path)?;
    /// assert_eq!(trainer.epochs_done(), 1);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut tensors: HashMap<String, Tensor> = self
            .model
            .weight_map()?
            .into_iter()
            .map(|(k, v)| (format!("model.{k}"), v))
            .collect();
        let state = self.optimizer.state()?;
        for (name, t) in state.slots {
            tensors.insert(format!("optimizer.{name}"), t);
        }
        let mut meta: HashMap<String, String> = [
            ("format", CHECKPOINT_FORMAT.to_string()),
            ("epochs_done", self.epochs_done.to_string()),
            ("steps_done", self.steps_done.to_string()),
            ("optimizer_iterations", state.iterations.to_string()),
            ("forward_calls", self.model.forward_calls().to_string()),
            ("seed", self.model.seed().to_string()),
            ("history", self.history.to_json()?),
            ("optimizer", format!("{:?}", self.optimizer_config)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(n) = self.batches_per_epoch {
            meta.insert("batches_per_epoch".into(), n.to_string());
        }
        let bytes = to_safetensors_bytes(&tensors, Some(meta), path)?;
        write_atomically(path, &bytes)
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`] for the same model and
    /// optimizer; `fit` then continues where the run stopped. Strict: the weights and the
    /// optimizer state are both checked (names, shapes) and converted before either is
    /// written, so a checkpoint that does not fit changes nothing. The model takes the
    /// checkpoint's seed and forward-call count, so its random layers (Dropout) draw what the
    /// uninterrupted run would have drawn, whatever seed it was built with; compare
    /// [`Model::seed`](crate::Model::seed) afterwards to refuse a resume under another seed.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{AdamConfig, Loss, Trainer};
    /// # let x = Input::new([1, 2, 2]);
    /// # let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// # let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu)?;
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// assert!(trainer.load_checkpoint("no/such.ckpt").is_err());
    /// assert_eq!(trainer.epochs_done(), 0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |message: String| Error::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let device = self.model.device().unwrap_or(candle_core::Device::Cpu);
        let (tensors, meta) = parse_safetensors(&bytes, path, &device)?;
        if meta.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
            return Err(bad(format!("not a {CHECKPOINT_FORMAT} file")));
        }
        let optimizer = format!("{:?}", self.optimizer_config);
        if let Some(saved) = meta.get("optimizer")
            && saved != &optimizer
        {
            return Err(bad(format!(
                "written by a run with optimizer {saved}, this trainer has {optimizer}: resume with the same settings"
            )));
        }
        let number = |key: &str| -> Result<u64> {
            meta.get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("metadata `{key}` is missing or not a number")))
        };
        let mut weights = HashMap::new();
        let mut slots = Vec::new();
        for (name, t) in tensors {
            if let Some(w) = name.strip_prefix("model.") {
                weights.insert(w.to_string(), t);
            } else if let Some(s) = name.strip_prefix("optimizer.") {
                slots.push((s.to_string(), t));
            } else {
                return Err(bad(format!("unexpected tensor `{name}`")));
            }
        }
        let history = History::from_json(meta.get("history").map(String::as_str).unwrap_or("{}"))
            .map_err(|e| bad(e.to_string()))?;
        let batches_per_epoch = meta
            .get("batches_per_epoch")
            .map(|v| v.parse::<usize>())
            .transpose()
            .map_err(|_| bad("metadata `batches_per_epoch` is not a number".into()))?;
        let source = path.display().to_string();
        // The model's seed draws its dropout masks: the run continues with the checkpoint's.
        let seed = meta
            .get("seed")
            .map(|v| v.parse::<u64>())
            .transpose()
            .map_err(|_| bad("metadata `seed` is not a number".into()))?;
        let (epochs_done, steps_done, calls) = (
            number("epochs_done")?,
            number("steps_done")?,
            number("forward_calls")?,
        );
        // Check and convert everything before changing anything: a tensor that cannot take
        // the weight's dtype must not leave new weights beside the old optimizer state.
        self.model.check_weights(&weights, &source)?;
        let vars = self.model.trainable_weights()?;
        let state = OptimizerState {
            iterations: number("optimizer_iterations")?,
            slots,
        };
        self.optimizer.check_state(&state, &vars)?;
        let var_by_name: HashMap<&str, &candle_core::Var> =
            vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let slots = state
            .slots
            .iter()
            .map(|(name, t)| {
                let var = name.split_once('.').and_then(|(_, v)| var_by_name.get(v));
                Ok(match var {
                    Some(var) => {
                        let full = format!("optimizer.{name}");
                        (name.clone(), converted(t, var.as_tensor(), &full, &source)?)
                    }
                    None => (name.clone(), t.clone()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let state = OptimizerState { slots, ..state };
        let weights = self
            .model
            .weights()?
            .iter()
            .map(|w| {
                let full = format!("model.{}", w.name());
                let value = converted(&weights[w.name()], w.var().as_tensor(), &full, &source)?;
                Ok((w.name().to_string(), value))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        self.model.set_weights_from(&weights, &source)?;
        self.optimizer.load_state(&state, &vars)?;
        self.model.set_forward_calls(calls);
        if let Some(seed) = seed {
            self.model.set_seed(seed);
        }
        self.epochs_done = epochs_done as usize;
        self.steps_done = steps_done as usize;
        self.history = history;
        self.batches_per_epoch = batches_per_epoch;
        self.resumed = true;
        Ok(())
    }
}

/// Adds a batch to each output's metrics.
fn update_metrics(
    metrics: &mut [Vec<Box<dyn Metric>>],
    outputs: &[Tensor],
    targets: &[Tensor],
) -> Result<()> {
    for ((list, out), target) in metrics.iter_mut().zip(outputs).zip(targets) {
        let out = out.detach();
        for metric in list.iter_mut() {
            metric.update(&out, target)?;
        }
    }
    Ok(())
}

fn format_epoch(log: &EpochLog, epochs: usize) -> String {
    let mut line = format!("epoch {}/{epochs}: loss {:.4}", log.epoch, log.loss);
    // Training values first, then validation ones, each in name order.
    let (val, train): (Vec<_>, Vec<_>) =
        log.metrics.iter().partition(|(k, _)| k.starts_with("val_"));
    for (name, value) in train {
        line.push_str(&format!(" {name} {value:.4}"));
    }
    if let Some(l) = log.val_loss {
        line.push_str(&format!(" val_loss {l:.4}"));
    }
    for (name, value) in val {
        line.push_str(&format!(" {name} {value:.4}"));
    }
    line.push_str(&format!(
        " lr {:.2e} ({:.1} s, {:.0} samples/s)",
        log.learning_rate, log.seconds, log.images_per_sec
    ));
    line
}

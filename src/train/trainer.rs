//! [`Trainer`]: Keras's `compile`/`fit`/`evaluate`/`predict` for a [`Model`], with
//! checkpoints that resume a run exactly.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use crate::data::Batch;
use crate::distributed::Communicator;
use crate::graph::{Mode, StateUpdates};
use crate::models::Model;
use crate::ops;
use crate::profile::read_vec;
use crate::support::dtype::Cast;
use crate::train::callback_state::CallbackState;
use crate::train::clipping::GradientClipping;
use crate::train::compile::{BackwardPass, Losses, NanCheck, Progress};
use crate::train::data_parallel::DataParallel;
use crate::train::loss_function::{OutputLoss, class_weights_of, weighted_mean};
use crate::train::metrics::{Metric, default_metrics};
use crate::train::{History, Loss, LrSchedule, Optimizer, OptimizerConfig};
use crate::{Error, Result};

/// The device-side record of [`NanCheck::OnDevice`], detached from every step's autograd
/// graph (it is carried from step to step: anything it referenced would stay alive).
pub(super) struct DivergenceFlag {
    /// u8 scalar: 1 while every step was finite (and its labels in range).
    alive: Tensor,
    /// f64 scalar: the epoch and step of the first rejected step, encoded
    /// `epoch · 2³² + step` (0: none).
    first_bad: Tensor,
    /// u8 scalar: 1 when the first rejected step's labels were out of range.
    bad_labels: Tensor,
}

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
    pub(super) model: Model,
    pub(super) optimizer: Box<dyn Optimizer>,
    pub(super) losses: Vec<OutputLoss>,
    pub(super) loss_weights: Vec<f64>,
    /// Per output, Keras's `class_weight` as a `(classes,)` tensor on the model's device.
    pub(super) class_weights: Vec<Option<Tensor>>,
    pub(super) metrics: Vec<Vec<Box<dyn Metric>>>,
    /// Per output, Keras's `weighted_metrics`: fed the sample and class weights.
    pub(super) weighted_metrics: Vec<Vec<Box<dyn Metric>>>,
    pub(super) output_names: Vec<String>,
    pub(super) schedule: LrSchedule,
    /// Keras's `clipnorm` / `global_clipnorm` / `clipvalue`, applied before the optimizer.
    pub(super) clipping: Option<GradientClipping>,
    /// The base learning rate (the optimizer's at first; callbacks may change it): the
    /// schedule scales it at every step, and checkpoints keep it.
    pub(super) learning_rate: f64,
    /// The state of each callback of the run by key (taken at every epoch's end, before the
    /// callbacks that write checkpoints run; restored from a checkpoint).
    pub(super) callback_states: BTreeMap<String, CallbackState>,
    pub(super) progress: Progress,
    pub(super) history: History,
    pub(super) epochs_done: usize,
    pub(super) steps_done: usize,
    pub(super) dtype: DType,
    pub(super) nan_check: NanCheck,
    pub(super) backward_pass: BackwardPass,
    pub(super) divergence: Option<DivergenceFlag>,
    /// Per output, the bounds of its sparse labels on the device (`Loss::label_bounds`),
    /// made at the first step that checks labels on the device.
    pub(super) label_bounds: Vec<Option<(Tensor, Tensor)>>,
    pub(super) optimizer_config: OptimizerConfig,
    /// Batches an epoch of the run so far (restored from a checkpoint): resuming with other
    /// data or another batch size would not continue the same run.
    pub(super) batches_per_epoch: Option<usize>,
    /// Whether the next `fit` continues a run restored by `load_checkpoint` (and so must see
    /// the same number of batches an epoch); a second `fit` in one process may take new data.
    pub(super) resumed: bool,
    /// The run's ranks when it is data-parallel ([`Trainer::distributed`]).
    pub(super) data_parallel: Option<DataParallel>,
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
        let optimizer = optimizer_config.build()?;
        let model_device = model.device().unwrap_or(candle_core::Device::Cpu);
        Ok(Self {
            learning_rate: optimizer_config.learning_rate(),
            clipping: None,
            callback_states: BTreeMap::new(),
            optimizer,
            optimizer_config,
            batches_per_epoch: None,
            resumed: false,
            data_parallel: None,
            metrics: losses
                .iter()
                .map(|loss| {
                    loss.builtin()
                        .map_or_else(Vec::new, |l| default_metrics(&l))
                })
                .collect(),
            class_weights: vec![None; losses.len()],
            weighted_metrics: losses.iter().map(|_| Vec::new()).collect(),
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
            backward_pass: BackwardPass::default(),
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

    /// Keras's `weighted_metrics` for output `output`: metrics fed each sample's weight
    /// (its `sample_weight` times its `class_weight` in training; the sample weights only
    /// in `evaluate`), `sum(value · weight) / sum(weight)`. Reported under the metric's name,
    /// or `weighted_<name>` when an unweighted metric of the output has that name, as Keras
    /// names them. A metric that is not a mean of per-sample values (`MeanIoU`) is refused.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// use candle_functional::train::{Accuracy, Loss, MeanIoU, SgdConfig, Trainer};
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    /// // "accuracy" (unweighted, the default) and "weighted_accuracy".
    /// let trainer = Trainer::new(model, SgdConfig::default(), loss)?
    ///     .weighted_metrics(0, vec![Box::new(Accuracy::sparse())])?;
    /// assert!(trainer.weighted_metrics(0, vec![Box::new(MeanIoU::new(2))]).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn weighted_metrics(
        mut self,
        output: usize,
        metrics: Vec<Box<dyn Metric>>,
    ) -> Result<Self> {
        let count = self.weighted_metrics.len();
        if let Some(m) = metrics.iter().find(|m| !m.supports_weights()) {
            return Err(Error::InvalidArgument(format!(
                "metric `{}` cannot be weighted: it is not a mean of per-sample values",
                m.name()
            )));
        }
        let slot = self.weighted_metrics.get_mut(output).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "weighted metrics for output {output} of a model with {count} outputs"
            ))
        })?;
        *slot = metrics;
        Ok(self)
    }

    /// Keras's `class_weight` for a model with one output: each sample's (or position's)
    /// loss is multiplied by the weight of its class while training (`evaluate` is
    /// unweighted, as in Keras). Classes not given weigh 1. The class is the sparse label,
    /// the arg-max of a one-hot target, or the 0/1 target of a one-unit binary output.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// use candle_functional::train::{Loss, SgdConfig, Trainer};
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    /// // The rare class 1 counts nine times.
    /// let trainer = Trainer::new(model.clone(), SgdConfig::default(), loss)?.class_weight([(1, 9.0)])?;
    /// // A class the output does not have is refused.
    /// assert!(Trainer::new(model, SgdConfig::default(), loss)?.class_weight([(2, 1.0)]).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn class_weight(self, weights: impl IntoIterator<Item = (usize, f64)>) -> Result<Self> {
        if self.losses.len() != 1 {
            return Err(Error::InvalidArgument(format!(
                "class_weight for a model with {} outputs: use output_class_weight(output, ..)",
                self.losses.len()
            )));
        }
        self.output_class_weight(0, weights)
    }

    /// [`Trainer::class_weight`] for output `output` of a model with several outputs.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// use candle_functional::train::{Loss, Losses, SgdConfig, Trainer};
    /// let x = Input::new([4]);
    /// let (a, b) = (Dense::new(3).call(&x)?, Dense::new(1).call(&x)?);
    /// let model = Model::new(&[x], &[a, b])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let losses = Losses::per_output(vec![
    ///     Loss::SparseCategoricalCrossentropy { from_logits: true },
    ///     Loss::MeanSquaredError,
    /// ]);
    /// let trainer = Trainer::new(model, SgdConfig::default(), losses)?;
    /// let trainer = trainer.output_class_weight(0, [(0, 0.5), (2, 4.0)])?;
    /// // Classes mean nothing to a regression output.
    /// assert!(trainer.output_class_weight(1, [(0, 1.0)]).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn output_class_weight(
        mut self,
        output: usize,
        weights: impl IntoIterator<Item = (usize, f64)>,
    ) -> Result<Self> {
        let outputs = self.model.outputs();
        let (Some(loss), Some(symbolic)) = (self.losses.get(output), outputs.get(output)) else {
            return Err(Error::InvalidArgument(format!(
                "class weights for output {output} of a model with {} outputs",
                outputs.len()
            )));
        };
        let name = &self.output_names[output];
        let shape = symbolic.shape();
        let classes = match (loss.builtin(), shape.first()) {
            (
                Some(
                    Loss::SparseCategoricalCrossentropy { .. }
                    | Loss::CategoricalCrossentropy { .. },
                ),
                Some(&classes),
            ) => classes,
            (Some(Loss::BinaryCrossentropy { .. }), Some(1)) if shape.len() == 1 => 2,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "class weights for output `{name}` ({}, per-sample shape {shape:?}): they need a sparse or categorical cross-entropy, or a binary cross-entropy of one unit",
                    loss.name()
                )));
            }
        };
        let mut dense = vec![1f32; classes];
        for (class, weight) in weights {
            if class >= classes || !weight.is_finite() || weight < 0.0 {
                return Err(Error::InvalidArgument(format!(
                    "class weight {weight} for class {class} of output `{name}`: classes are 0..{classes}, weights finite and not negative"
                )));
            }
            dense[class] = weight as f32;
        }
        let device = self.model.device().unwrap_or(candle_core::Device::Cpu);
        self.class_weights[output] = Some(Tensor::from_vec(dense, classes, &device)?);
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

    /// How the gradients of a step are computed (default [`BackwardPass::Auto`]: the plan's own
    /// pass on the CPU, candle's autograd elsewhere); see [`BackwardPass`]. All give the same
    /// gradients to rounding.
    ///
    /// # Examples
    /// ```no_run
    /// # use candle_functional::train::{BackwardPass, Trainer};
    /// # fn f(t: Trainer) -> Trainer {
    /// t.backward_pass(BackwardPass::Autograd)
    /// # }
    /// ```
    pub fn backward_pass(mut self, pass: BackwardPass) -> Self {
        self.backward_pass = pass;
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

    /// The base learning rate: the optimizer's, unless changed by
    /// [`Trainer::set_learning_rate`] or a callback, or restored from a checkpoint. The
    /// schedule ([`Trainer::schedule`]) scales it at every step.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// use candle_functional::train::{Loss, SgdConfig, Trainer};
    /// let x = Input::new([2]);
    /// let model = Model::new(&[x.clone()], &[Dense::new(1).call(&x)?])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let sgd = SgdConfig { learning_rate: 0.05, ..Default::default() };
    /// let mut trainer = Trainer::new(model, sgd, Loss::MeanSquaredError)?;
    /// assert_eq!(trainer.learning_rate(), 0.05);
    /// trainer.set_learning_rate(0.01)?;
    /// assert_eq!(trainer.learning_rate(), 0.01);
    /// assert!(trainer.set_learning_rate(f64::NAN).is_err());
    /// assert_eq!(trainer.learning_rate(), 0.01);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn learning_rate(&self) -> f64 {
        self.learning_rate
    }

    /// Sets the base learning rate from the next step on (Keras's
    /// `optimizer.learning_rate = ...`); refused, changing nothing, unless finite and not
    /// negative. See [`Trainer::learning_rate`].
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{Loss, SgdConfig, Trainer};
    /// # let x = Input::new([2]);
    /// # let model = Model::new(&[x.clone()], &[Dense::new(1).call(&x)?])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let mut trainer = Trainer::new(model, SgdConfig::default(), Loss::MeanSquaredError)?;
    /// assert!(trainer.set_learning_rate(-1.0).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn set_learning_rate(&mut self, learning_rate: f64) -> Result<()> {
        if !(learning_rate.is_finite() && learning_rate >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "learning rate {learning_rate}: it must be finite and not negative"
            )));
        }
        self.learning_rate = learning_rate;
        Ok(())
    }

    /// Clips the gradients of every step before the optimizer reads them (Keras's
    /// `clipnorm`, `global_clipnorm` or `clipvalue` on the optimizer); refused unless the
    /// threshold is positive and finite.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{GradientClipping, Loss, SgdConfig, Trainer};
    /// # let x = Input::new([2]);
    /// # let model = Model::new(&[x.clone()], &[Dense::new(1).call(&x)?])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let trainer = Trainer::new(model, SgdConfig::default(), Loss::MeanSquaredError)?
    ///     .gradient_clipping(GradientClipping::GlobalNorm(1.0))?; // Keras: global_clipnorm=1.0
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn gradient_clipping(mut self, clipping: GradientClipping) -> Result<Self> {
        clipping.validate()?;
        self.clipping = Some(clipping);
        Ok(self)
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

    /// Trains data-parallel across the ranks of `comm` (Keras's `MultiWorkerMirroredStrategy`,
    /// PyTorch's `DistributedDataParallel`): every rank runs the same program with the same
    /// data set and seed, `fit` gives each rank its slice of every global batch
    /// ([`shard`](crate::distributed::shard)) and sums the gradients across ranks, so that a
    /// step equals one process's step over the whole batch. At the start of `fit` the ranks
    /// check that they hold the same model, and a fresh run takes rank 0's weights. Losses and
    /// metrics are those of the whole batch on every rank, so callbacks steer alike; only
    /// rank 0 shows progress and writes checkpoints and logs. `evaluate` is split the same way.
    /// With [`SingleProcess`](crate::distributed::SingleProcess) training is unchanged.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::{DType, Device};
    /// use candle_functional::distributed::from_environment;
    /// use candle_functional::prelude::*;
    /// use candle_functional::train::{Loss, SgdConfig, Trainer};
    /// let x = Input::new([2]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    /// // `mpirun -np 2 ...`: MPI's ranks; otherwise one process.
    /// let trainer = Trainer::new(model, SgdConfig::default(), loss)?.distributed(from_environment()?);
    /// assert!(trainer.communicator().is_some());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn distributed(mut self, comm: Arc<dyn Communicator>) -> Self {
        self.data_parallel = Some(DataParallel::new(comm));
        self
    }

    /// The communicator of a data-parallel run ([`Trainer::distributed`]), if any.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{Loss, SgdConfig, Trainer};
    /// # let x = Input::new([2]);
    /// # let model = Model::new(&[x.clone()], &[Dense::new(1).call(&x)?])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let trainer = Trainer::new(model, SgdConfig::default(), Loss::MeanSquaredError)?;
    /// assert!(trainer.communicator().is_none());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn communicator(&self) -> Option<&dyn Communicator> {
        self.data_parallel.as_ref().map(|dp| dp.comm())
    }

    /// Seconds this rank's training steps have spent in collective calls (summing gradients,
    /// losses and outputs across ranks, taking rank 0's BatchNorm statistics), host copies
    /// around them and waits for slower ranks included; 0 without a communicator. What data
    /// parallelism costs a step, next to the step's own time.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{Loss, SgdConfig, Trainer};
    /// # let x = Input::new([2]);
    /// # let model = Model::new(&[x.clone()], &[Dense::new(1).call(&x)?])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let trainer = Trainer::new(model, SgdConfig::default(), Loss::MeanSquaredError)?;
    /// assert_eq!(trainer.communication_seconds(), 0.0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn communication_seconds(&self) -> f64 {
        self.data_parallel
            .as_ref()
            .map_or(0.0, DataParallel::communication_seconds)
    }

    /// `true` unless this is a data-parallel run's rank other than 0: the rank that shows
    /// progress and writes files.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{Loss, SgdConfig, Trainer};
    /// # let x = Input::new([2]);
    /// # let model = Model::new(&[x.clone()], &[Dense::new(1).call(&x)?])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let trainer = Trainer::new(model, SgdConfig::default(), Loss::MeanSquaredError)?;
    /// assert!(trainer.is_chief());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn is_chief(&self) -> bool {
        self.communicator().is_none_or(|comm| comm.is_chief())
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
    pub(super) fn step(
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
        // Data-parallel: this rank trains on its slice of the global batch.
        let data_parallel = self.data_parallel.clone();
        let shard = match &data_parallel {
            Some(dp) => Some(dp.shard(batch.samples()?)),
            None => None,
        };
        let global = batch;
        let local = match &shard {
            Some(shard) => Some(shard.local(global)?),
            None => None,
        };
        let batch = local.as_ref().unwrap_or(global);
        // Across ranks, labels are checked on the host over the whole batch: every rank
        // then reaches the same verdict.
        let on_device = self.nan_check == NanCheck::OnDevice && shard.is_none();
        // Off the device check, labels are range-checked before the step (a host read);
        // on it, the verdict joins the divergence flag.
        let (targets, labels_ok) = if on_device {
            self.targets_checked_on_device(batch)?
        } else {
            self.check_targets(global)?;
            (batch.targets.clone(), None)
        };
        let inputs = self.cast_inputs(&batch.inputs)?;
        let updates = match (&data_parallel, &shard) {
            (Some(dp), Some(shard)) => dp.state_updates(shard),
            _ => StateUpdates::default(),
        };
        let call = self.model.forward_calls();
        if let Some(dp) = &data_parallel {
            self.model.set_forward_calls(dp.forward_call(call));
        }
        // The plan's own backward pass where it applies: one process, no compute dtype, a
        // non-empty batch (on the CPU only, for `Auto`).
        let taped = data_parallel.is_none()
            && self.model.compute_dtype().is_none()
            && inputs.first().is_some_and(|x| match self.backward_pass {
                BackwardPass::Auto => ops::on_cpu(x),
                BackwardPass::Plan | BackwardPass::PlanComposed => x.elem_count() > 0,
                BackwardPass::Autograd => false,
            });
        let composed = self.backward_pass == BackwardPass::PlanComposed;
        let forward = match taped {
            true => super::tape::forward(&self.model, &inputs, &updates, composed)
                .map(|(outputs, tape)| (outputs, Some(tape))),
            false => self
                .model
                .forward_deferred(&inputs, Mode::Train, &updates)
                .map(|outputs| (outputs, None)),
        };
        if data_parallel.is_some() {
            self.model.set_forward_calls(call + 1);
        }
        let (outputs, tape) = forward?;
        // With a tape, the loss's backward pass stops at the outputs, made leaf variables; the
        // tape takes their gradients on through the model.
        let (outputs, tape) = match tape {
            Some(tape) => {
                let leaves = outputs
                    .iter()
                    .map(Var::from_tensor)
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let outputs = leaves.iter().map(|v| v.as_tensor().clone()).collect();
                (outputs, Some((tape, leaves)))
            }
            None => (outputs, None),
        };
        let weights = self.weights_of(batch, &targets, true)?;
        let (total, per_output) = self.losses_of(&outputs, &targets, &weights)?;
        let total = self.with_penalties(total)?;
        let vars = self.model.trainable_weights()?;
        let (total, per_output, mut grads) = match (&data_parallel, &shard) {
            (Some(dp), Some(shard)) => {
                // The loss scaled by this rank's share: summed over ranks, the gradients are
                // those of the whole batch's mean loss.
                let scaled = match shard.rows.is_empty() {
                    false => total.affine(shard.weight(), 0.0)?,
                    // Not `affine(0.0, _)`: candle's backward prunes the graph behind it, and
                    // a synchronized layer's backward sums must still run on every rank.
                    true => (&total * total.zeros_like()?)?,
                };
                let mut grads = scaled.backward()?;
                let (total, per_output) =
                    dp.reduce_step(&mut grads, &vars, shard, &total, &per_output)?;
                (total, per_output, grads)
            }
            _ => {
                let mut grads = total.backward()?;
                if let Some((tape, leaves)) = tape {
                    let output_grads = leaves.iter().map(|v| grads.remove(v.as_tensor())).collect();
                    let weights: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
                    tape.backward(self.model.plan(), output_grads, &mut grads, &weights)?;
                }
                (total, per_output, grads)
            }
        };
        if let Some(clipping) = &self.clipping {
            clipping.clip(&mut grads, &vars)?;
        }
        let gradients: Vec<&Tensor> = vars
            .iter()
            .filter_map(|(_, v)| grads.get(v.as_tensor()))
            .collect();
        // The held-back state (BatchNorm's moving statistics) and what the optimizer would
        // write are checked with the loss and the gradients, before anything is written: the
        // step is applied whole or not at all, and nothing non-finite is ever applied.
        let mut state = updates.into_latest();
        if let Some(dp) = &data_parallel {
            dp.broadcast_state(&mut state)?;
        }
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
        match (&data_parallel, &shard) {
            (Some(dp), Some(shard)) => {
                // The whole batch's outputs, so every rank's metrics are the global ones.
                let outputs = dp.gather_outputs(&outputs, shard)?;
                let weights = self.weights_of(global, &global.targets, true)?;
                update_metrics(&mut self.metrics, &outputs, &global.targets)?;
                update_weighted_metrics(
                    &mut self.weighted_metrics,
                    &outputs,
                    &global.targets,
                    &weights,
                )?;
            }
            _ => {
                update_metrics(&mut self.metrics, &outputs, &targets)?;
                update_weighted_metrics(&mut self.weighted_metrics, &outputs, &targets, &weights)?;
            }
        }
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
    pub(super) fn next_divergence(
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
    pub(super) fn targets_checked_on_device(
        &mut self,
        batch: &Batch,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let n = self.check_batch_layout(batch)?;
        let mut bounds = std::mem::take(&mut self.label_bounds);
        bounds.resize(batch.targets.len(), None);
        let mut targets = Vec::with_capacity(batch.targets.len());
        let mut verdict: Option<Tensor> = None;
        for ((shape, target, loss, name), bound) in self.targets_of(batch).zip(&mut bounds) {
            let Some(loss) = loss.builtin() else {
                // A user's loss checks its target its own way (reading nothing, by default).
                loss.function().check_target(shape, target, n, name)?;
                targets.push(target.clone());
                continue;
            };
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
    pub(super) fn check_targets(&self, batch: &Batch) -> Result<()> {
        let n = self.check_batch_layout(batch)?;
        for (shape, target, loss, name) in self.targets_of(batch) {
            loss.function().check_target(shape, target, n, name)?;
        }
        Ok(())
    }

    /// Each output's per-sample shape, target, loss and name.
    pub(super) fn targets_of<'a>(
        &'a self,
        batch: &'a Batch,
    ) -> impl Iterator<Item = (&'a [usize], &'a Tensor, &'a OutputLoss, &'a str)> {
        self.model
            .outputs()
            .iter()
            .zip(&batch.targets)
            .zip(&self.losses)
            .zip(&self.output_names)
            .map(|(((output, target), loss), name)| (output.shape(), target, loss, name.as_str()))
    }

    /// One target per output and a non-empty batch; returns the batch size.
    pub(super) fn check_batch_layout(&self, batch: &Batch) -> Result<usize> {
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
        if !batch.sample_weights.is_empty() && batch.sample_weights.len() != outputs.len() {
            return Err(Error::InvalidArgument(format!(
                "model `{}` has {} output(s), the batch has {} sample weight tensor(s) (give none, or one per output)",
                self.model.name(),
                outputs.len(),
                batch.sample_weights.len()
            )));
        }
        for (weights, name) in batch.sample_weights.iter().zip(&self.output_names) {
            if weights.dims().first() != Some(&n) || !weights.dtype().is_float() {
                return Err(Error::InvalidInput {
                    layer: name.clone(),
                    message: format!(
                        "sample weights: a float tensor with the batch's {n} samples first expected, got {:?} of shape {:?}",
                        weights.dtype(),
                        weights.dims()
                    ),
                });
            }
        }
        Ok(n)
    }

    /// Each output's weights for this batch: its sample weights, times its class weights
    /// when `training` (Keras applies `class_weight` in `fit` only); `None` for neither.
    pub(super) fn weights_of(
        &self,
        batch: &Batch,
        targets: &[Tensor],
        training: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        let mut all = Vec::with_capacity(targets.len());
        for (k, target) in targets.iter().enumerate() {
            let sample = batch
                .sample_weights
                .get(k)
                .map(|w| w.cast(DType::F32))
                .transpose()?;
            let class = match (&self.class_weights[k], self.losses[k].builtin()) {
                (Some(weights), Some(loss)) if training => {
                    Some(class_weights_of(loss, weights, target)?)
                }
                _ => None,
            };
            all.push(match (sample, class) {
                (Some(s), Some(c)) => {
                    // A per-sample weight over a per-position class weight.
                    let mut shape = vec![1; c.rank()];
                    shape[0] = s.dim(0)?;
                    let s = if s.rank() == 1 { s.reshape(shape)? } else { s };
                    Some(c.broadcast_mul(&s)?)
                }
                (s, c) => s.or(c),
            });
        }
        Ok(all)
    }

    /// The weighted total and each output's loss, each reduced Keras's way with its sample
    /// and class weights (`weights`, one entry per output).
    pub(super) fn losses_of(
        &self,
        outputs: &[Tensor],
        targets: &[Tensor],
        weights: &[Option<Tensor>],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut total: Option<Tensor> = None;
        let mut per_output = Vec::with_capacity(outputs.len());
        for ((((out, target), loss), weight), (sample_weights, name)) in outputs
            .iter()
            .zip(targets)
            .zip(&self.losses)
            .zip(&self.loss_weights)
            .zip(weights.iter().zip(&self.output_names))
        {
            let each = loss.function().per_sample(out, target)?;
            let value = weighted_mean(&each, sample_weights.as_ref(), name)?;
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

    /// Keras's total loss: the compiled losses plus every weight penalty
    /// ([`Model::regularization_loss`]).
    pub(super) fn with_penalties(&self, loss: Tensor) -> Result<Tensor> {
        Ok(match self.model.regularization_loss()? {
            Some(penalty) => loss.add(&penalty.to_dtype(loss.dtype())?)?,
            None => loss,
        })
    }

    pub(super) fn cast_inputs(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let dtype = self.model.compute_dtype().unwrap_or(self.dtype);
        let index_inputs = self.model.index_inputs();
        inputs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                // Float inputs take the model's dtype here; the model converts integer inputs
                // itself (Keras's input conversion, `Model::forward`). Ids for an Embedding
                // stay as they are (bf16 would round them).
                let indices = index_inputs.get(i).copied().unwrap_or(false);
                Ok(if t.dtype().is_float() && !indices {
                    t.cast(dtype)?
                } else {
                    t.clone()
                })
            })
            .collect()
    }
}

/// Adds a batch to each output's weighted metrics, with its weights (none: each weighs 1).
pub(super) fn update_weighted_metrics(
    metrics: &mut [Vec<Box<dyn Metric>>],
    outputs: &[Tensor],
    targets: &[Tensor],
    weights: &[Option<Tensor>],
) -> Result<()> {
    for (((list, out), target), weights) in
        metrics.iter_mut().zip(outputs).zip(targets).zip(weights)
    {
        let out = out.detach();
        for metric in list.iter_mut() {
            match weights {
                Some(w) => metric.update_weighted(&out, target, w)?,
                None => metric.update(&out, target)?,
            }
        }
    }
    Ok(())
}

/// Adds a batch to each output's metrics.
pub(super) fn update_metrics(
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

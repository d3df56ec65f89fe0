//! [`Trainer`]: Keras's `compile`/`fit`/`evaluate`/`predict` for a [`Model`], with
//! checkpoints that resume a run exactly.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::data::{Batch, DataLoader};
use crate::graph::Mode;
use crate::models::Model;
use crate::support::files::{to_safetensors_bytes, write_atomically};
use crate::train::callbacks::{Callback, run_callbacks};
use crate::train::{
    EpochLog, History, Loss, LrSchedule, Optimizer, OptimizerConfig, OptimizerState,
    correct_predictions,
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

/// Loss and accuracy over a data set.
///
/// # Examples
/// ```
/// let e = candle_functional::train::Evaluation { loss: 0.5, accuracy: 0.9 };
/// assert!(e.accuracy > e.loss);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean loss.
    pub loss: f64,
    /// Fraction of correct arg-max predictions.
    pub accuracy: f64,
}

const CHECKPOINT_FORMAT: &str = "candle-functional/checkpoint/1";

/// Trains a model: Keras's `model.compile(optimizer, loss, metrics=["accuracy"])` and what
/// follows. Deterministic on CPU for a given model seed and loader seed.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device};
/// use candle_functional::data::{DataLoader, ImageDataset};
/// use candle_functional::prelude::*;
/// use candle_functional::train::{AdamConfig, Loss, Trainer};
///
/// let x = Input::new([1, 2, 2]);
/// let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
/// let loader = DataLoader::new(data, 2, &Device::Cpu);
/// let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
/// let history = trainer.fit(&loader, None, 3, &mut [])?;
/// assert_eq!(history.epochs().len(), 3);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub struct Trainer {
    model: Model,
    optimizer: Box<dyn Optimizer>,
    loss: Loss,
    schedule: LrSchedule,
    progress: Progress,
    history: History,
    epochs_done: usize,
    steps_done: usize,
    dtype: DType,
}

impl Trainer {
    /// A trainer for a built model, with an optimizer over its trainable variables.
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
    pub fn new(model: Model, optimizer: impl Into<OptimizerConfig>, loss: Loss) -> Result<Self> {
        if !model.is_built() {
            return Err(Error::NotBuilt {
                model: model.name().to_string(),
            });
        }
        let vars = model.trainable_vars()?;
        let dtype = vars.first().map(|v| v.dtype()).unwrap_or(DType::F32);
        let optimizer = optimizer.into().build(vars)?;
        Ok(Self {
            model,
            optimizer,
            loss,
            schedule: LrSchedule::Constant,
            progress: Progress::Quiet,
            history: History::default(),
            epochs_done: 0,
            steps_done: 0,
            dtype,
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
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu);
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
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu);
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
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu);
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// assert_eq!(trainer.epochs_done(), 0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// One optimization step on a batch: forward in training mode, loss, backward, update.
    /// Returns the batch's mean loss and its number of correct predictions as device scalars
    /// (reading them waits for the device; `fit` does so only to report).
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
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu);
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// let batch = loader.batches(0).next().unwrap()?;
    /// let (loss, correct) = trainer.train_step(&[batch.inputs], &batch.labels, 1e-3)?;
    /// assert!(loss.to_scalar::<f32>()?.is_finite());
    /// assert!(correct.to_scalar::<f32>()? <= 2.0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn train_step(
        &mut self,
        inputs: &[Tensor],
        labels: &Tensor,
        lr: f64,
    ) -> Result<(Tensor, Tensor)> {
        let inputs = self.cast_inputs(inputs)?;
        let outputs = self.model.forward(&inputs, Mode::Train)?.remove(0);
        let loss = self.loss.compute(&outputs, labels)?;
        let grads = loss.backward()?;
        self.optimizer.step(&grads, lr)?;
        let correct = correct_predictions(&outputs.detach(), labels)?;
        Ok((loss.detach(), correct))
    }

    fn cast_inputs(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let dtype = self.model.compute_dtype().unwrap_or(self.dtype);
        inputs.iter().map(|t| Ok(t.to_dtype(dtype)?)).collect()
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
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu);
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// let history = trainer.fit(&loader, Some(&loader), 2, &mut [])?;
    /// assert!(history.last().unwrap().val_accuracy.is_some());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn fit(
        &mut self,
        train: &DataLoader,
        validation: Option<&DataLoader>,
        epochs: usize,
        callbacks: &mut [Box<dyn Callback>],
    ) -> Result<&History> {
        if train.is_empty() {
            return Err(Error::InvalidArgument("no training data".into()));
        }
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
            let mut loss_sum = Tensor::zeros((), DType::F32, train.device())?;
            let mut correct = Tensor::zeros((), DType::F32, train.device())?;
            let mut seen = 0usize;
            let mut lr = base_lr;
            for (i, batch) in train.batches(epoch as u64).enumerate() {
                let Batch { inputs, labels } = batch?;
                let n = labels.dim(0)?;
                lr = self
                    .schedule
                    .learning_rate(base_lr, epoch, self.steps_done, total_steps);
                let (loss, right) = self.train_step(&[inputs], &labels, lr)?;
                loss_sum = (loss_sum + (loss.to_dtype(DType::F32)? * n as f64)?)?;
                correct = (correct + right)?;
                seen += n;
                self.steps_done += 1;
                if let Some(bar) = &bar {
                    bar.inc(1);
                    if i % refresh == 0 || i + 1 == train.len() {
                        let rate = seen as f64 / start.elapsed().as_secs_f64();
                        bar.set_message(format!(
                            "loss {:.4} acc {:.4} {rate:.0} img/s",
                            loss_sum.to_scalar::<f32>()? as f64 / seen as f64,
                            correct.to_scalar::<f32>()? as f64 / seen as f64,
                        ));
                    }
                }
            }
            let loss = loss_sum.to_scalar::<f32>()? as f64 / seen as f64;
            let accuracy = correct.to_scalar::<f32>()? as f64 / seen as f64;
            let seconds = start.elapsed().as_secs_f64();
            let val_start = Instant::now();
            let val = validation.map(|v| self.evaluate(v)).transpose()?;
            let log = EpochLog {
                epoch: epoch + 1,
                loss,
                accuracy,
                val_loss: val.map(|v| v.loss),
                val_accuracy: val.map(|v| v.accuracy),
                learning_rate: lr,
                seconds,
                images_per_sec: seen as f64 / seconds,
                val_seconds: if val.is_some() {
                    val_start.elapsed().as_secs_f64()
                } else {
                    0.0
                },
            };
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

    /// Mean loss and accuracy over a data set, in inference mode.
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
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu);
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// let scores = trainer.evaluate(&loader)?;
    /// assert!((0.0..=1.0).contains(&scores.accuracy));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn evaluate(&self, data: &DataLoader) -> Result<Evaluation> {
        let mut loss_sum = Tensor::zeros((), DType::F32, data.device())?;
        let mut correct = Tensor::zeros((), DType::F32, data.device())?;
        let mut seen = 0usize;
        for batch in data.batches(0) {
            let Batch { inputs, labels } = batch?;
            let n = labels.dim(0)?;
            let outputs = self
                .model
                .forward(&self.cast_inputs(&[inputs])?, Mode::Eval)?
                .remove(0);
            let loss = self.loss.compute(&outputs, &labels)?;
            loss_sum = (loss_sum + (loss.to_dtype(DType::F32)? * n as f64)?)?;
            correct = (correct + correct_predictions(&outputs, &labels)?)?;
            seen += n;
        }
        if seen == 0 {
            return Err(Error::InvalidArgument("no evaluation data".into()));
        }
        Ok(Evaluation {
            loss: loss_sum.to_scalar::<f32>()? as f64 / seen as f64,
            accuracy: correct.to_scalar::<f32>()? as f64 / seen as f64,
        })
    }

    /// The model's first output for every sample, in order, in inference mode.
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
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu);
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// assert_eq!(trainer.predict(&loader)?.dims(), &[2, 2]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn predict(&self, data: &DataLoader) -> Result<Tensor> {
        let mut outputs = Vec::with_capacity(data.len());
        for batch in data.batches(0) {
            let inputs = self.cast_inputs(&[batch?.inputs])?;
            outputs.push(self.model.forward(&inputs, Mode::Eval)?.remove(0));
        }
        Ok(Tensor::cat(&outputs, 0)?)
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
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu);
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
        let state = self.optimizer.state();
        for (name, t) in state.slots {
            tensors.insert(format!("optimizer.{name}"), t);
        }
        let meta: HashMap<String, String> = [
            ("format", CHECKPOINT_FORMAT.to_string()),
            ("epochs_done", self.epochs_done.to_string()),
            ("steps_done", self.steps_done.to_string()),
            ("optimizer_iterations", state.iterations.to_string()),
            ("forward_calls", self.model.forward_calls().to_string()),
            ("history", self.history.to_json()?),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bytes = to_safetensors_bytes(&tensors, Some(meta), path)?;
        write_atomically(path, &bytes)
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`] for the same model and
    /// optimizer; `fit` then continues where the run stopped. Strict: nothing changes unless
    /// every tensor matches.
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
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu);
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
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
            return Err(bad(format!("not a {CHECKPOINT_FORMAT} file")));
        }
        let number = |key: &str| -> Result<u64> {
            meta.get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("metadata `{key}` is missing or not a number")))
        };
        let device = self.model.device().unwrap_or(candle_core::Device::Cpu);
        let tensors = candle_core::safetensors::load_buffer(&bytes, &device)
            .map_err(|e| bad(e.to_string()))?;
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
        let history = History::from_json(meta.get("history").map(String::as_str).unwrap_or("{}"))?;
        let state = OptimizerState {
            iterations: number("optimizer_iterations")?,
            slots,
        };
        let (epochs_done, steps_done, calls) = (
            number("epochs_done")?,
            number("steps_done")?,
            number("forward_calls")?,
        );
        // Check both before changing either.
        self.model.set_weights(&weights)?;
        self.optimizer.load_state(&state)?;
        self.model.set_forward_calls(calls);
        self.epochs_done = epochs_done as usize;
        self.steps_done = steps_done as usize;
        self.history = history;
        Ok(())
    }
}

fn format_epoch(log: &EpochLog, epochs: usize) -> String {
    let mut line = format!(
        "epoch {}/{epochs}: loss {:.4} accuracy {:.4}",
        log.epoch, log.loss, log.accuracy
    );
    if let (Some(l), Some(a)) = (log.val_loss, log.val_accuracy) {
        line.push_str(&format!(" val_loss {l:.4} val_accuracy {a:.4}"));
    }
    line.push_str(&format!(
        " lr {:.2e} ({:.1} s, {:.0} img/s)",
        log.learning_rate, log.seconds, log.images_per_sec
    ));
    line
}

//! The loops over a data set: [`Trainer::fit`] (epochs of training steps, validation,
//! progress, callbacks), [`Trainer::evaluate`] and [`Trainer::predict`].

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::data::Dataset;
use crate::graph::Mode;
use crate::models::Model;
use crate::support::dtype::Cast;
use crate::train::callback::{
    Callback, FitContext, Hook, restore_callback_states, run_epoch_end, run_hook,
};
use crate::train::compile::{Evaluation, Progress};
use crate::train::data_parallel::Resumed;
use crate::train::metrics::Metric;
use crate::train::trainer::{Trainer, update_metrics, update_weighted_metrics};
use crate::train::{EpochLog, History};
use crate::{Error, Result};

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
        weighted: &[Vec<Box<dyn Metric>>],
        totals: &Totals,
    ) -> Result<BTreeMap<String, f64>> {
        let mut values = BTreeMap::new();
        for (i, (list, weighted)) in metrics.iter().zip(weighted).enumerate() {
            let prefix = self.prefix(i);
            if self.output_names.len() > 1 {
                values.insert(format!("{prefix}loss"), totals.mean(&totals.per_output[i])?);
            }
            for metric in list {
                values.insert(format!("{prefix}{}", metric.name()), metric.result()?);
            }
            // Keras's names: a weighted metric keeps its name unless an unweighted one has it.
            for metric in weighted {
                let plain = format!("{prefix}{}", metric.name());
                let name = if values.contains_key(&plain) {
                    format!("{prefix}weighted_{}", metric.name())
                } else {
                    plain
                };
                values.insert(name, metric.result()?);
            }
        }
        Ok(values)
    }

    /// Trains until `epochs` epochs are done in total (a resumed trainer continues from its
    /// checkpoint's epoch), evaluating on `validation` after each, and calling `callbacks`
    /// (Keras's order: train begin; per epoch, epoch begin, batch begin and end around each
    /// step, epoch end; train end). A callback may stop the run after a batch (the epoch is
    /// then ended, validated and logged, as in Keras) or after an epoch. A run resumed from a
    /// checkpoint hands each callback its saved state after `on_train_begin`.
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
        let resumed = std::mem::replace(&mut self.resumed, false);
        self.divergence = None;
        if let Some(dp) = &self.data_parallel {
            let optimizer = self.optimizer.state()?;
            let at = resumed.then_some(Resumed {
                epochs_done: self.epochs_done,
                steps_done: self.steps_done,
                optimizer: &optimizer,
            });
            dp.start(&self.model, at)?;
        }
        let total_steps = epochs * train.len();
        // Where reading a value waits for a queue (a GPU), refresh the display less often.
        let refresh = if crate::device::reads_wait_for_a_queue(train.device()) {
            25
        } else {
            1
        };
        let mut stop = false;
        let first = self.epochs_done + 1;
        run_hook(
            callbacks,
            Hook::TrainBegin,
            &mut FitContext::new(self, first, &mut stop),
        )?;
        if resumed {
            restore_callback_states(callbacks, &self.callback_states)?;
        }
        while self.epochs_done < epochs && !stop {
            let epoch = self.epochs_done;
            let bar = self.progress_bar(epoch + 1, epochs, train.len());
            let start = Instant::now();
            let mut totals = Totals::new(self.losses.len(), train.device())?;
            self.metrics.iter_mut().flatten().for_each(|m| m.reset());
            self.weighted_metrics
                .iter_mut()
                .flatten()
                .for_each(|m| m.reset());
            run_hook(
                callbacks,
                Hook::EpochBegin,
                &mut FitContext::new(self, epoch + 1, &mut stop),
            )?;
            let mut lr = self.learning_rate;
            let mut batches = train.batches(epoch as u64);
            let mut data_wait = std::time::Duration::ZERO;
            for i in 0.. {
                // Time spent waiting for the data pipeline, apart from the step.
                let asked = Instant::now();
                let Some(batch) = batches.next() else { break };
                data_wait += asked.elapsed();
                let batch = batch?;
                let n = batch.samples()?;
                run_hook(
                    callbacks,
                    Hook::BatchBegin,
                    &mut FitContext::new(self, epoch + 1, &mut stop).at_batch(i, None),
                )?;
                lr = self.schedule.learning_rate(
                    self.learning_rate,
                    epoch,
                    self.steps_done,
                    total_steps,
                );
                let (loss, per_output) = self.step(&batch, lr, (epoch + 1, i + 1))?;
                totals.add(&loss, &per_output, n)?;
                self.steps_done += 1;
                run_hook(
                    callbacks,
                    Hook::BatchEnd,
                    &mut FitContext::new(self, epoch + 1, &mut stop).at_batch(i, Some(&loss)),
                )?;
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
                if stop {
                    break;
                }
            }
            // Stops any workers still preparing batches before validation runs.
            drop(batches);
            self.check_divergence()?;
            let seconds = start.elapsed().as_secs_f64();
            let mut log = EpochLog {
                epoch: epoch + 1,
                loss: totals.mean(&totals.loss)?,
                metrics: self.named_values(&self.metrics, &self.weighted_metrics, &totals)?,
                learning_rate: lr,
                seconds,
                images_per_sec: totals.samples as f64 / seconds,
                data_wait_seconds: data_wait.as_secs_f64(),
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
                (None, Progress::Lines) if self.is_chief() => eprintln!("{line}"),
                _ => {}
            }
            self.history.push(log.clone());
            self.epochs_done += 1;
            run_epoch_end(callbacks, self, &log, &mut stop)?;
        }
        let last = self.epochs_done;
        run_hook(
            callbacks,
            Hook::TrainEnd,
            &mut FitContext::new(self, last, &mut stop),
        )?;
        Ok(&self.history)
    }

    fn progress_bar(&self, epoch: usize, epochs: usize, steps: usize) -> Option<ProgressBar> {
        if self.progress != Progress::Bar || !self.is_chief() {
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
        let copies = |lists: &[Vec<Box<dyn Metric>>]| -> Vec<Vec<Box<dyn Metric>>> {
            lists
                .iter()
                .map(|list| list.iter().map(|m| m.boxed_clone()).collect())
                .collect()
        };
        let mut fresh = copies(&self.metrics);
        let mut fresh_weighted = copies(&self.weighted_metrics);
        for batch in data.batches(0) {
            let batch = batch?;
            self.check_targets(&batch)?;
            let samples = batch.samples()?;
            // Data-parallel: this rank's slice of the batch, then the whole batch's loss and
            // outputs put together on every rank.
            let shard = self.data_parallel.as_ref().map(|dp| dp.shard(samples));
            let local = match &shard {
                Some(shard) => shard.local(&batch)?,
                None => batch.clone(),
            };
            let outputs = self
                .model
                .forward(&self.cast_inputs(&local.inputs)?, Mode::Eval)?;
            let weights = self.weights_of(&local, &local.targets, false)?;
            let (loss, per_output) = self.losses_of(&outputs, &local.targets, &weights)?;
            let loss = self.with_penalties(loss)?;
            let (loss, per_output, outputs, weights) = match (&self.data_parallel, &shard) {
                (Some(dp), Some(shard)) => {
                    let (_, loss, per_output) =
                        dp.reduce_losses(Vec::new(), shard, &loss, &per_output)?;
                    let outputs = dp.gather_outputs(&outputs, shard)?;
                    let weights = self.weights_of(&batch, &batch.targets, false)?;
                    (loss, per_output, outputs, weights)
                }
                _ => (loss, per_output, outputs, weights),
            };
            totals.add(&loss, &per_output, samples)?;
            update_metrics(&mut fresh, &outputs, &batch.targets)?;
            update_weighted_metrics(&mut fresh_weighted, &outputs, &batch.targets, &weights)?;
        }
        if totals.samples == 0 {
            return Err(Error::InvalidArgument("no evaluation data".into()));
        }
        Ok(Evaluation {
            loss: totals.mean(&totals.loss)?,
            metrics: self.named_values(&fresh, &fresh_weighted, &totals)?,
        })
    }

    /// Every output of the model for every sample, in order, in inference mode (targets, if
    /// the data has any, are ignored): [`Model::predict`] on the trainer's model.
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
        self.model.predict(data)
    }
}

impl Model {
    /// Keras's `model.predict(x)`: every output for every sample of a data set, batch by
    /// batch in inference mode, concatenated in order (one tensor per output; targets, if
    /// the data has any, are ignored). No trainer needed.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_functional::data::TensorDataset;
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let samples = Tensor::zeros((5, 3), DType::F32, &Device::Cpu)?;
    /// let data = TensorDataset::new(vec![samples], vec![], 2)?; // batches of 2, 2, 1
    /// assert_eq!(model.predict(&data)?[0].dims(), &[5, 2]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn predict(&self, data: &dyn Dataset) -> Result<Vec<Tensor>> {
        let mut per_output: Vec<Vec<Tensor>> = vec![Vec::new(); self.outputs().len()];
        for batch in data.batches(0) {
            for (all, out) in per_output
                .iter_mut()
                .zip(self.forward(&batch?.inputs, Mode::Eval)?)
            {
                all.push(out);
            }
        }
        if per_output.first().is_some_and(Vec::is_empty) {
            return Err(Error::InvalidArgument(
                "predict: the data set has no samples".into(),
            ));
        }
        per_output
            .iter()
            .map(|parts| Ok(Tensor::cat(parts, 0)?))
            .collect()
    }
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
        " lr {:.2e} ({:.1} s, {:.0} samples/s, {:.1}% waiting for data)",
        log.learning_rate,
        log.seconds,
        log.images_per_sec,
        100.0 * log.data_wait_seconds / log.seconds
    ));
    line
}

//! Callbacks that act at the end of epochs: [`ModelCheckpoint`] (best and last, written
//! atomically), [`EarlyStopping`] (with `restore_best_weights`) and [`HistoryLogger`]
//! (JSON and CSV), and what they share ([`Goal`], reading a monitored value). The
//! learning-rate callbacks are in `rate_callbacks.rs`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;

use crate::support::files::{metadata_of, write_atomically};
use crate::train::callback::{Callback, FitContext};
use crate::train::callback_state::CallbackState;
use crate::{Error, Result};

/// Whether a larger or a smaller value of a metric is better.
///
/// # Examples
/// ```
/// use candle_functional::train::Goal;
/// assert_eq!(Goal::for_metric("val_loss"), Goal::Minimize);
/// assert_eq!(Goal::for_metric("val_accuracy"), Goal::Maximize);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// Lower is better (losses).
    Minimize,
    /// Higher is better (accuracies).
    Maximize,
}

impl Goal {
    /// Keras's `mode="auto"`: maximize accuracies, minimize the rest.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::train::Goal::for_metric("accuracy"), candle_functional::train::Goal::Maximize);
    /// ```
    pub fn for_metric(metric: &str) -> Self {
        if metric.contains("acc") {
            Goal::Maximize
        } else {
            Goal::Minimize
        }
    }

    /// Keras's `_is_improvement`: better than `best` by more than `min_delta` (anything
    /// finite improves on no value; NaN and infinities never do).
    pub(crate) fn improves(self, value: f64, best: Option<f64>, min_delta: f64) -> bool {
        if !value.is_finite() {
            return false;
        }
        match (self, best) {
            (_, None) => true,
            (Goal::Minimize, Some(b)) => value < b - min_delta,
            (Goal::Maximize, Some(b)) => value > b + min_delta,
        }
    }
}

/// The monitored value at an epoch's end; an error naming it when the log lacks it (Keras
/// warns and goes on; a misspelt name would then silently never act).
pub(crate) fn read_metric(ctx: &FitContext<'_>, monitor: &str) -> Result<f64> {
    ctx.metric(monitor).ok_or_else(|| {
        let known = ctx.log().map(|log| {
            let mut names = vec!["loss".to_string()];
            names.extend(log.val_loss.map(|_| "val_loss".to_string()));
            names.extend(log.metrics.keys().cloned());
            names.join(", ")
        });
        Error::InvalidArgument(format!(
            "metric `{monitor}` is not in the epoch's logs (validation data needed for val_*); it has: {}",
            known.unwrap_or_default()
        ))
    })
}

/// Writes full training checkpoints (weights, optimizer state, epoch, history): `last.ckpt`
/// after every epoch and `best.ckpt` when the monitored metric improves. Each file is written
/// to a temporary name and renamed.
///
/// # Examples
/// ```
/// use candle_functional::train::ModelCheckpoint;
/// let cb = ModelCheckpoint::new("runs/resnet").monitor("val_loss");
/// assert_eq!(cb.last_path(), std::path::Path::new("runs/resnet/last.ckpt"));
/// ```
#[derive(Clone, Debug)]
pub struct ModelCheckpoint {
    dir: PathBuf,
    monitor: String,
    best: Option<f64>,
}

impl ModelCheckpoint {
    /// Checkpoints into `dir`, monitoring `val_accuracy`.
    ///
    /// # Examples
    /// ```
    /// let cb = candle_functional::train::ModelCheckpoint::new("ckpt");
    /// assert_eq!(cb.best_path(), std::path::Path::new("ckpt/best.ckpt"));
    /// ```
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            monitor: "val_accuracy".into(),
            best: None,
        }
    }

    /// The metric that decides `best.ckpt`.
    ///
    /// # Examples
    /// ```
    /// let cb = candle_functional::train::ModelCheckpoint::new("c").monitor("accuracy");
    /// ```
    pub fn monitor(mut self, metric: impl Into<String>) -> Self {
        self.monitor = metric.into();
        self
    }

    /// Path of the checkpoint written after every epoch.
    ///
    /// # Examples
    /// ```
    /// let cb = candle_functional::train::ModelCheckpoint::new("c");
    /// assert!(cb.last_path().ends_with("last.ckpt"));
    /// ```
    pub fn last_path(&self) -> PathBuf {
        self.dir.join("last.ckpt")
    }

    /// Path of the best checkpoint.
    ///
    /// # Examples
    /// ```
    /// let cb = candle_functional::train::ModelCheckpoint::new("c");
    /// assert!(cb.best_path().ends_with("best.ckpt"));
    /// ```
    pub fn best_path(&self) -> PathBuf {
        self.dir.join("best.ckpt")
    }
}

impl ModelCheckpoint {
    /// Makes `best.ckpt` the restored history's best epoch again where a kill left it behind.
    /// `last.ckpt` is written before `best.ckpt`, so a run killed between the two writes of an
    /// epoch that improved resumes with that epoch in its history (from `last.ckpt`) and an
    /// older `best.ckpt`; the best epoch is then the last one, whose state `last.ckpt` holds
    /// (before this epoch overwrites it): it is copied over `best.ckpt`, atomically.
    fn repair_best(&self, best_epoch: usize, last_epoch: usize) -> Result<()> {
        let epochs_done = |bytes: &[u8]| -> Option<usize> {
            metadata_of(bytes)?.get("epochs_done")?.parse().ok()
        };
        if best_epoch != last_epoch {
            return Ok(());
        }
        let last_path = self.last_path();
        let last = match std::fs::read(&last_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&last_path, e)),
        };
        if epochs_done(&last) != Some(last_epoch) {
            return Ok(());
        }
        let best = std::fs::read(self.best_path()).ok();
        if best.as_deref().and_then(epochs_done) == Some(best_epoch) {
            return Ok(());
        }
        write_atomically(&self.best_path(), &last)
    }
}

impl Callback for ModelCheckpoint {
    fn name(&self) -> &str {
        "model_checkpoint"
    }

    fn writes_checkpoints(&self) -> bool {
        true
    }

    fn on_epoch_end(&mut self, end: &mut FitContext<'_>) -> Result<()> {
        // Data-parallel: every rank keeps the same best value; rank 0 alone writes.
        let writes = end.trainer().is_chief();
        if writes {
            std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
            end.trainer().save_checkpoint(self.last_path())?;
        }
        let value = read_metric(end, &self.monitor)?;
        let epoch = end.epoch();
        let goal = Goal::for_metric(&self.monitor);
        if self.best.is_none() {
            // A resumed run: the best so far is in the restored history, not in this value.
            let earlier: Vec<_> = end
                .history()
                .epochs()
                .iter()
                .filter(|e| e.epoch < epoch)
                .collect();
            let mut best_epoch = None;
            for e in &earlier {
                if let Some(v) = e.metric(&self.monitor)
                    && goal.improves(v, self.best, 0.0)
                {
                    self.best = Some(v);
                    best_epoch = Some(e.epoch);
                }
            }
            if let (Some(best), Some(last), true) = (best_epoch, earlier.last(), writes) {
                self.repair_best(best, last.epoch)?;
            }
        }
        if goal.improves(value, self.best, 0.0) {
            self.best = Some(value);
            if writes {
                end.trainer().save_checkpoint(self.best_path())?;
            }
        }
        Ok(())
    }
}

/// Stops training when the monitored metric has not improved by `min_delta` for `patience`
/// epochs (Keras's `EarlyStopping`, with its `baseline`, `start_from_epoch` and
/// `restore_best_weights`: at the end of training the model gets back the weights of its best
/// epoch, BatchNorm statistics included). Its counters and the best weights are saved in
/// checkpoints, so a resumed run stops where the uninterrupted one would.
///
/// # Examples
/// ```
/// use candle_functional::train::EarlyStopping;
/// let es = EarlyStopping::new("val_loss", 3).min_delta(1e-3).restore_best_weights(true);
/// ```
#[derive(Clone, Debug)]
pub struct EarlyStopping {
    monitor: String,
    goal: Goal,
    patience: usize,
    min_delta: f64,
    baseline: Option<f64>,
    start_from_epoch: usize,
    restore_best_weights: bool,
    best: Option<f64>,
    best_epoch: usize,
    waited: usize,
    best_weights: Option<HashMap<String, Tensor>>,
}

impl EarlyStopping {
    /// Stop after `patience` epochs without improvement of `monitor` (maximized if its name
    /// holds `acc`, minimized otherwise: [`Goal::for_metric`]).
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::EarlyStopping::new("val_accuracy", 5);
    /// ```
    pub fn new(monitor: impl Into<String>, patience: usize) -> Self {
        let monitor = monitor.into();
        Self {
            goal: Goal::for_metric(&monitor),
            monitor,
            patience,
            min_delta: 0.0,
            baseline: None,
            start_from_epoch: 0,
            restore_best_weights: false,
            best: None,
            best_epoch: 0,
            waited: 0,
            best_weights: None,
        }
    }

    /// The smallest change that counts as an improvement.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::EarlyStopping::new("loss", 2).min_delta(0.01);
    /// ```
    pub fn min_delta(mut self, min_delta: f64) -> Self {
        self.min_delta = min_delta.abs();
        self
    }

    /// Whether larger or smaller is better (Keras's `mode`; by default from the name).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{EarlyStopping, Goal};
    /// let _ = EarlyStopping::new("val_dice", 3).goal(Goal::Maximize);
    /// ```
    pub fn goal(mut self, goal: Goal) -> Self {
        self.goal = goal;
        self
    }

    /// A value the metric must beat: until it does, the patience counter is not reset by
    /// improvements.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::EarlyStopping::new("val_loss", 3).baseline(0.5);
    /// ```
    pub fn baseline(mut self, baseline: f64) -> Self {
        self.baseline = Some(baseline);
        self
    }

    /// Epochs (counted from 0) to let pass before watching the metric (a warm-up).
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::EarlyStopping::new("val_loss", 3).start_from_epoch(5);
    /// ```
    pub fn start_from_epoch(mut self, epoch: usize) -> Self {
        self.start_from_epoch = epoch;
        self
    }

    /// At the end of training, give the model back the weights of the best epoch (Keras
    /// 3's rule: whether or not training was stopped early).
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::EarlyStopping::new("val_loss", 3).restore_best_weights(true);
    /// ```
    pub fn restore_best_weights(mut self, restore: bool) -> Self {
        self.restore_best_weights = restore;
        self
    }

    /// The best value seen in this run, if any.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::train::EarlyStopping::new("loss", 1).best(), None);
    /// ```
    pub fn best(&self) -> Option<f64> {
        self.best
    }

    /// A copy of the model's weights, detached from every graph (the model's variables are
    /// updated in place, so a clone would follow them).
    fn snapshot(ctx: &FitContext<'_>) -> Result<HashMap<String, Tensor>> {
        ctx.trainer()
            .model()
            .weight_map()?
            .into_iter()
            .map(|(k, v)| Ok((k, v.copy()?.detach())))
            .collect()
    }
}

impl Callback for EarlyStopping {
    fn name(&self) -> &str {
        "early_stopping"
    }

    fn on_train_begin(&mut self, _ctx: &mut FitContext<'_>) -> Result<()> {
        // Keras: an instance may be reused across `fit` calls.
        self.waited = 0;
        self.best = None;
        self.best_epoch = 0;
        self.best_weights = None;
        Ok(())
    }

    fn on_epoch_end(&mut self, ctx: &mut FitContext<'_>) -> Result<()> {
        let value = read_metric(ctx, &self.monitor)?;
        let epoch = ctx.epoch().saturating_sub(1);
        if epoch < self.start_from_epoch {
            return Ok(());
        }
        if self.restore_best_weights && self.best_weights.is_none() {
            self.best_weights = Some(Self::snapshot(ctx)?);
            self.best_epoch = epoch;
        }
        self.waited += 1;
        if self.goal.improves(value, self.best, self.min_delta) {
            self.best = Some(value);
            self.best_epoch = epoch;
            if self.restore_best_weights {
                self.best_weights = Some(Self::snapshot(ctx)?);
            }
            if self
                .baseline
                .is_none_or(|b| self.goal.improves(value, Some(b), self.min_delta))
            {
                self.waited = 0;
            }
            return Ok(());
        }
        if self.waited >= self.patience && epoch > 0 {
            ctx.stop_training();
        }
        Ok(())
    }

    fn on_train_end(&mut self, ctx: &mut FitContext<'_>) -> Result<()> {
        if let (true, Some(weights)) = (self.restore_best_weights, &self.best_weights) {
            ctx.trainer().model().set_weights(weights)?;
        }
        Ok(())
    }

    fn state(&self) -> Result<Option<CallbackState>> {
        let mut state = CallbackState::new()
            .with_value("waited", self.waited as f64)
            .with_value("best_epoch", self.best_epoch as f64);
        if let Some(best) = self.best {
            state = state.with_value("best", best);
        }
        for (name, t) in self.best_weights.iter().flatten() {
            state = state.with_tensor(name.clone(), t.clone());
        }
        Ok(Some(state))
    }

    fn restore_state(&mut self, state: &CallbackState) -> Result<()> {
        self.waited = state.value("waited").unwrap_or(0.0) as usize;
        self.best_epoch = state.value("best_epoch").unwrap_or(0.0) as usize;
        self.best = state.value("best");
        let weights: HashMap<String, Tensor> = state
            .tensors()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        self.best_weights = (!weights.is_empty()).then_some(weights);
        Ok(())
    }
}

/// Rewrites the history as JSON and/or CSV after every epoch, so an interrupted run keeps
/// its record.
///
/// # Examples
/// ```
/// use candle_functional::train::HistoryLogger;
/// let logger = HistoryLogger::new().json("runs/history.json").csv("runs/history.csv");
/// ```
#[derive(Clone, Debug, Default)]
pub struct HistoryLogger {
    json: Option<PathBuf>,
    csv: Option<PathBuf>,
}

impl HistoryLogger {
    /// A logger that writes nothing until given paths.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::HistoryLogger::new();
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Write JSON here.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::HistoryLogger::new().json("h.json");
    /// ```
    pub fn json(mut self, path: impl Into<PathBuf>) -> Self {
        self.json = Some(path.into());
        self
    }

    /// Write CSV here.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::HistoryLogger::new().csv("h.csv");
    /// ```
    pub fn csv(mut self, path: impl Into<PathBuf>) -> Self {
        self.csv = Some(path.into());
        self
    }
}

impl Callback for HistoryLogger {
    fn on_epoch_end(&mut self, end: &mut FitContext<'_>) -> Result<()> {
        // Data-parallel: every rank has the same history; rank 0 alone writes it.
        if !end.trainer().is_chief() {
            return Ok(());
        }
        if let Some(path) = &self.json {
            end.history().write_json(path)?;
        }
        if let Some(path) = &self.csv {
            end.history().write_csv(path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A checkpoint file as `repair_best` sees it: its `epochs_done`.
    fn fake_checkpoint(path: &std::path::Path, epochs_done: usize) {
        let meta = HashMap::from([("epochs_done".to_string(), epochs_done.to_string())]);
        let none: Vec<(&str, safetensors::tensor::TensorView<'_>)> = Vec::new();
        safetensors::serialize_to_file(none, Some(meta), path).unwrap();
    }

    #[test]
    fn a_best_checkpoint_left_behind_by_a_kill_is_replaced_by_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = ModelCheckpoint::new(dir.path());
        fake_checkpoint(&ckpt.last_path(), 2);
        fake_checkpoint(&ckpt.best_path(), 1);
        // The history's best is epoch 1: best.ckpt is right, nothing changes.
        ckpt.repair_best(1, 2).unwrap();
        let best = std::fs::read(ckpt.best_path()).unwrap();
        assert_ne!(best, std::fs::read(ckpt.last_path()).unwrap());
        // The history's best is its last epoch, 2, which best.ckpt missed: copied over.
        ckpt.repair_best(2, 2).unwrap();
        let best = std::fs::read(ckpt.best_path()).unwrap();
        assert_eq!(best, std::fs::read(ckpt.last_path()).unwrap());
        // A last.ckpt of another epoch (another run's folder) is never copied.
        fake_checkpoint(&ckpt.last_path(), 5);
        ckpt.repair_best(3, 3).unwrap();
        assert_eq!(best, std::fs::read(ckpt.best_path()).unwrap());
        // No best.ckpt yet: made from last.ckpt when that is the best epoch.
        std::fs::remove_file(ckpt.best_path()).unwrap();
        ckpt.repair_best(5, 5).unwrap();
        assert!(ckpt.best_path().is_file());
    }
}

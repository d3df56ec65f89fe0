//! Hooks called by [`Trainer::fit`](crate::train::Trainer::fit) after every epoch:
//! [`ModelCheckpoint`] (best and last, written atomically), [`EarlyStopping`] and
//! [`HistoryLogger`] (JSON and CSV). The learning-rate schedule is the trainer's own
//! ([`LrSchedule`](crate::train::LrSchedule)), evaluated at every step.

use std::path::PathBuf;

use crate::train::{EpochLog, History, Trainer};
use crate::{Error, Result};

/// What a callback sees at the end of an epoch (see [`EpochEnd::stop_training`] for an
/// example).
pub struct EpochEnd<'a> {
    /// The trainer (model, optimizer state, history): enough to write a checkpoint.
    pub trainer: &'a Trainer,
    /// The epoch just finished.
    pub log: &'a EpochLog,
    stop: bool,
}

impl EpochEnd<'_> {
    /// Asks `fit` to stop after this epoch.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, EpochEnd};
    /// /// Stops after the first epoch whose accuracy reaches 90%.
    /// struct GoodEnough;
    /// impl Callback for GoodEnough {
    ///     fn on_epoch_end(&mut self, end: &mut EpochEnd<'_>) -> candle_functional::Result<()> {
    ///         if end.log.metric("accuracy").is_some_and(|a| a >= 0.9) {
    ///             end.stop_training();
    ///         }
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn stop_training(&mut self) {
        self.stop = true;
    }

    /// The run so far, this epoch included.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, EpochEnd};
    /// struct CountEpochs(usize);
    /// impl Callback for CountEpochs {
    ///     fn on_epoch_end(&mut self, end: &mut EpochEnd<'_>) -> candle_functional::Result<()> {
    ///         self.0 = end.history().epochs().len();
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn history(&self) -> &History {
        self.trainer.history()
    }
}

/// A hook into `fit`: see [`EpochEnd::stop_training`] for a complete one.
///
/// # Examples
/// ```
/// use candle_functional::train::{Callback, ModelCheckpoint};
/// let callbacks: Vec<Box<dyn Callback>> = vec![Box::new(ModelCheckpoint::new("runs/x"))];
/// assert_eq!(callbacks.len(), 1);
/// ```
pub trait Callback {
    /// Called after every epoch (validation included).
    fn on_epoch_end(&mut self, end: &mut EpochEnd<'_>) -> Result<()>;
}

/// Runs the callbacks; returns `true` if one asked to stop.
pub(crate) fn run_callbacks(
    callbacks: &mut [Box<dyn Callback>],
    trainer: &Trainer,
    log: &EpochLog,
) -> Result<bool> {
    let mut end = EpochEnd {
        trainer,
        log,
        stop: false,
    };
    for cb in callbacks.iter_mut() {
        cb.on_epoch_end(&mut end)?;
    }
    Ok(end.stop)
}

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

    fn improves(self, value: f64, best: Option<f64>, min_delta: f64) -> bool {
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

fn read_metric(log: &EpochLog, monitor: &str) -> Result<f64> {
    log.metric(monitor).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "metric `{monitor}` is not in the epoch's logs (validation data needed for val_*)"
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

impl Callback for ModelCheckpoint {
    fn on_epoch_end(&mut self, end: &mut EpochEnd<'_>) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        end.trainer.save_checkpoint(self.last_path())?;
        let value = read_metric(end.log, &self.monitor)?;
        let goal = Goal::for_metric(&self.monitor);
        if self.best.is_none() {
            // A resumed run: the best so far is in the restored history, not in this value.
            let earlier = end
                .history()
                .epochs()
                .iter()
                .filter(|e| e.epoch < end.log.epoch);
            for v in earlier.filter_map(|e| e.metric(&self.monitor)) {
                if goal.improves(v, self.best, 0.0) {
                    self.best = Some(v);
                }
            }
        }
        if goal.improves(value, self.best, 0.0) {
            self.best = Some(value);
            end.trainer.save_checkpoint(self.best_path())?;
        }
        Ok(())
    }
}

/// Stops training when the monitored metric has not improved by `min_delta` for `patience`
/// epochs (Keras's `EarlyStopping`).
///
/// # Examples
/// ```
/// use candle_functional::train::EarlyStopping;
/// let es = EarlyStopping::new("val_loss", 3).min_delta(1e-3);
/// ```
#[derive(Clone, Debug)]
pub struct EarlyStopping {
    monitor: String,
    patience: usize,
    min_delta: f64,
    best: Option<f64>,
    waited: usize,
}

impl EarlyStopping {
    /// Stop after `patience` epochs without improvement of `monitor`.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::EarlyStopping::new("val_accuracy", 5);
    /// ```
    pub fn new(monitor: impl Into<String>, patience: usize) -> Self {
        Self {
            monitor: monitor.into(),
            patience,
            min_delta: 0.0,
            best: None,
            waited: 0,
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
}

impl Callback for EarlyStopping {
    fn on_epoch_end(&mut self, end: &mut EpochEnd<'_>) -> Result<()> {
        let value = read_metric(end.log, &self.monitor)?;
        if Goal::for_metric(&self.monitor).improves(value, self.best, self.min_delta) {
            self.best = Some(value);
            self.waited = 0;
        } else {
            self.waited += 1;
            if self.waited >= self.patience {
                end.stop_training();
            }
        }
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
    fn on_epoch_end(&mut self, end: &mut EpochEnd<'_>) -> Result<()> {
        if let Some(path) = &self.json {
            end.history().write_json(path)?;
        }
        if let Some(path) = &self.csv {
            end.history().write_csv(path)?;
        }
        Ok(())
    }
}

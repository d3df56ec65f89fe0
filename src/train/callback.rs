//! The hook into [`Trainer::fit`]: the [`Callback`] trait and what it sees at the end of an
//! epoch ([`EpochEnd`]). The built-in callbacks are in `callbacks.rs`.

use crate::Result;
use crate::train::{EpochLog, History, Trainer};

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

//! Callbacks that steer the learning rate: [`ReduceLrOnPlateau`] (Keras's
//! `ReduceLROnPlateau`) and [`LearningRateScheduler`] (a closure of the epoch and the rate).
//! Both change the trainer's base rate, which checkpoints keep; the plateau counters are
//! saved with them, so a resumed run lowers the rate where the uninterrupted one would.

use crate::train::callback::{Callback, FitContext};
use crate::train::callback_state::CallbackState;
use crate::train::callbacks::{Goal, read_metric};
use crate::{Error, Result};

/// Multiplies the learning rate by `factor` when the monitored metric has not improved by
/// `min_delta` for `patience` epochs, then waits `cooldown` epochs before counting again,
/// never going below `min_lr` (Keras's `ReduceLROnPlateau`, with its defaults: `val_loss`,
/// factor 0.1, patience 10, min_delta 1e-4, cooldown 0, min_lr 0).
///
/// # Examples
/// ```
/// use candle_functional::train::ReduceLrOnPlateau;
/// let plateau = ReduceLrOnPlateau::new("val_loss").factor(0.5).patience(3).min_lr(1e-5);
/// assert_eq!(plateau.wait(), 0);
/// ```
#[derive(Clone, Debug)]
pub struct ReduceLrOnPlateau {
    monitor: String,
    goal: Goal,
    factor: f64,
    patience: usize,
    min_delta: f64,
    cooldown: usize,
    min_lr: f64,
    best: Option<f64>,
    wait: usize,
    cooldown_counter: usize,
}

impl ReduceLrOnPlateau {
    /// Watches `monitor` (maximized if its name holds `acc`, minimized otherwise) with
    /// Keras's defaults.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::ReduceLrOnPlateau::new("val_accuracy");
    /// ```
    pub fn new(monitor: impl Into<String>) -> Self {
        let monitor = monitor.into();
        Self {
            goal: Goal::for_metric(&monitor),
            monitor,
            factor: 0.1,
            patience: 10,
            min_delta: 1e-4,
            cooldown: 0,
            min_lr: 0.0,
            best: None,
            wait: 0,
            cooldown_counter: 0,
        }
    }

    /// The factor applied at each reduction, in `(0, 1)` (`fit` refuses another before its
    /// first step).
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::ReduceLrOnPlateau::new("loss").factor(0.5);
    /// ```
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// Epochs without improvement before a reduction.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::ReduceLrOnPlateau::new("loss").patience(2);
    /// ```
    pub fn patience(mut self, patience: usize) -> Self {
        self.patience = patience;
        self
    }

    /// The smallest change that counts as an improvement.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::ReduceLrOnPlateau::new("loss").min_delta(0.0);
    /// ```
    pub fn min_delta(mut self, min_delta: f64) -> Self {
        self.min_delta = min_delta.abs();
        self
    }

    /// Epochs to wait after a reduction before counting again.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::ReduceLrOnPlateau::new("loss").cooldown(2);
    /// ```
    pub fn cooldown(mut self, cooldown: usize) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// The lowest rate a reduction goes to.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::ReduceLrOnPlateau::new("loss").min_lr(1e-6);
    /// ```
    pub fn min_lr(mut self, min_lr: f64) -> Self {
        self.min_lr = min_lr;
        self
    }

    /// Whether larger or smaller is better (Keras's `mode`; by default from the name).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Goal, ReduceLrOnPlateau};
    /// let _ = ReduceLrOnPlateau::new("val_dice").goal(Goal::Maximize);
    /// ```
    pub fn goal(mut self, goal: Goal) -> Self {
        self.goal = goal;
        self
    }

    /// Epochs without improvement counted so far.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::train::ReduceLrOnPlateau::new("loss").wait(), 0);
    /// ```
    pub fn wait(&self) -> usize {
        self.wait
    }

    /// Keras's step at an epoch's end, given the monitored value and the current rate:
    /// the rate to use from now on (the same one where nothing changes).
    fn next_rate(&mut self, value: f64, rate: f64) -> f64 {
        let in_cooldown = self.cooldown_counter > 0;
        if in_cooldown {
            self.cooldown_counter -= 1;
            self.wait = 0;
        }
        if self.goal.improves(value, self.best, self.min_delta) {
            self.best = Some(value);
            self.wait = 0;
        } else if self.cooldown_counter == 0 {
            self.wait += 1;
            if self.wait >= self.patience && rate > self.min_lr {
                self.cooldown_counter = self.cooldown;
                self.wait = 0;
                return (rate * self.factor).max(self.min_lr);
            }
        }
        rate
    }
}

impl Callback for ReduceLrOnPlateau {
    fn name(&self) -> &str {
        "reduce_lr_on_plateau"
    }

    fn on_train_begin(&mut self, _ctx: &mut FitContext<'_>) -> Result<()> {
        if !(self.factor > 0.0 && self.factor < 1.0) {
            return Err(Error::InvalidArgument(format!(
                "ReduceLrOnPlateau: factor {} must be in (0, 1)",
                self.factor
            )));
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "ReduceLrOnPlateau: min_lr {} must be finite and not negative",
                self.min_lr
            )));
        }
        self.best = None;
        self.wait = 0;
        self.cooldown_counter = 0;
        Ok(())
    }

    fn on_epoch_end(&mut self, ctx: &mut FitContext<'_>) -> Result<()> {
        let value = read_metric(ctx, &self.monitor)?;
        let rate = self.next_rate(value, ctx.learning_rate());
        ctx.set_learning_rate(rate)
    }

    fn state(&self) -> Result<Option<CallbackState>> {
        let mut state = CallbackState::new()
            .with_value("wait", self.wait as f64)
            .with_value("cooldown_counter", self.cooldown_counter as f64);
        if let Some(best) = self.best {
            state = state.with_value("best", best);
        }
        Ok(Some(state))
    }

    fn restore_state(&mut self, state: &CallbackState) -> Result<()> {
        self.wait = state.value("wait").unwrap_or(0.0) as usize;
        self.cooldown_counter = state.value("cooldown_counter").unwrap_or(0.0) as usize;
        self.best = state.value("best");
        Ok(())
    }
}

/// Sets the learning rate at the start of every epoch to `schedule(epoch, rate)`, the epoch
/// counted from 0 and `rate` the current one (Keras's `LearningRateScheduler`). A rate that
/// is not finite or is negative stops `fit` with an error before the epoch's first step.
///
/// # Examples
/// ```
/// use candle_functional::train::LearningRateScheduler;
/// // Keras's documentation example: constant for 10 epochs, then exponential decay.
/// let scheduler = LearningRateScheduler::new(|epoch, lr| {
///     if epoch < 10 { lr } else { lr * (-0.1f64).exp() }
/// });
/// ```
pub struct LearningRateScheduler {
    schedule: Box<dyn FnMut(usize, f64) -> f64>,
}

impl LearningRateScheduler {
    /// A scheduler from a closure of (epoch from 0, current rate).
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::LearningRateScheduler::new(|epoch, _| 0.1 / (1.0 + epoch as f64));
    /// ```
    pub fn new(schedule: impl FnMut(usize, f64) -> f64 + 'static) -> Self {
        Self {
            schedule: Box::new(schedule),
        }
    }
}

impl Callback for LearningRateScheduler {
    fn name(&self) -> &str {
        "learning_rate_scheduler"
    }

    fn on_epoch_begin(&mut self, ctx: &mut FitContext<'_>) -> Result<()> {
        let rate = (self.schedule)(ctx.epoch().saturating_sub(1), ctx.learning_rate());
        ctx.set_learning_rate(rate)
            .map_err(|e| Error::InvalidArgument(format!("LearningRateScheduler: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct Case {
        sequence: String,
        monitor: String,
        values: Vec<f64>,
        settings: std::collections::BTreeMap<String, f64>,
        initial_lr: f64,
        rates: Vec<f64>,
    }

    #[derive(Deserialize)]
    struct Fixture {
        reduce_lr_on_plateau: Vec<Case>,
    }

    /// Keras 3.15's ReduceLROnPlateau fed the same monitored values, rate after each epoch
    /// (scripts/keras_reference.py callbacks). Keras keeps the rate in f32: 1e-6 relative.
    #[test]
    fn reduce_lr_on_plateau_matches_keras() {
        let fixture: Fixture =
            serde_json::from_str(include_str!("../../tests/fixtures/keras_callbacks.json"))
                .unwrap();
        assert_eq!(fixture.reduce_lr_on_plateau.len(), 12);
        let mut reductions = 0;
        for case in &fixture.reduce_lr_on_plateau {
            let setting = |name: &str, default: f64| *case.settings.get(name).unwrap_or(&default);
            let mut plateau = ReduceLrOnPlateau::new(case.monitor.clone())
                .factor(setting("factor", 0.1))
                .patience(setting("patience", 10.0) as usize)
                .min_delta(setting("min_delta", 1e-4))
                .cooldown(setting("cooldown", 0.0) as usize)
                .min_lr(setting("min_lr", 0.0));
            let mut rate = case.initial_lr;
            for (epoch, (&value, &want)) in case.values.iter().zip(&case.rates).enumerate() {
                let next = plateau.next_rate(value, rate);
                reductions += usize::from(next < rate);
                rate = next;
                assert!(
                    (rate - want).abs() <= 1e-6 * want.max(1e-12),
                    "{} {:?} epoch {epoch}: {rate} against Keras's {want}",
                    case.sequence,
                    case.settings
                );
            }
        }
        // The fixture exercises reductions, cooldowns and the floor, not only flat rates.
        assert!(reductions > 30, "{reductions}");
    }
}

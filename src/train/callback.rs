//! The hooks into [`Trainer::fit`]: the [`Callback`] trait (Keras's train, epoch and batch
//! begin and end), what a hook sees and may change ([`FitContext`]: the learning rate, the
//! model's weights, stopping) and what a callback carries across a checkpoint
//! ([`CallbackState`]). The built-in callbacks are in `callbacks.rs`.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::Result;
use crate::train::callback_state::CallbackState;
use crate::train::{EpochLog, History, Trainer};

/// What a hook sees of the run, and what it may change: the learning rate, the trainer (and
/// through it the model's weights), and whether training goes on. The same type is handed to
/// every hook; [`FitContext::batch`], [`FitContext::log`] and [`FitContext::batch_loss`] say
/// where in the run it was called.
///
/// # Examples
/// ```
/// use candle_functional::train::{Callback, FitContext};
/// /// Stops after the first epoch whose accuracy reaches 90%.
/// struct GoodEnough;
/// impl Callback for GoodEnough {
///     fn on_epoch_end(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
///         if ctx.metric("accuracy").is_some_and(|a| a >= 0.9) {
///             ctx.stop_training();
///         }
///         Ok(())
///     }
/// }
/// ```
pub struct FitContext<'a> {
    trainer: &'a mut Trainer,
    epoch: usize,
    batch: Option<usize>,
    log: Option<&'a EpochLog>,
    batch_loss: Option<&'a Tensor>,
    stop: &'a mut bool,
}

impl<'a> FitContext<'a> {
    pub(crate) fn new(trainer: &'a mut Trainer, epoch: usize, stop: &'a mut bool) -> Self {
        Self {
            trainer,
            epoch,
            batch: None,
            log: None,
            batch_loss: None,
            stop,
        }
    }

    pub(crate) fn at_batch(mut self, batch: usize, loss: Option<&'a Tensor>) -> Self {
        self.batch = Some(batch);
        self.batch_loss = loss;
        self
    }

    pub(crate) fn with_log(mut self, log: &'a EpochLog) -> Self {
        self.log = Some(log);
        self
    }

    /// The epoch being run, counted from 1 (at the end of training: the last one run).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// struct Epochs(Vec<usize>);
    /// impl Callback for Epochs {
    ///     fn on_epoch_begin(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         self.0.push(ctx.epoch());
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// The batch within the epoch, counted from 0, in the batch hooks; `None` elsewhere.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// struct FirstBatches(usize);
    /// impl Callback for FirstBatches {
    ///     fn on_train_batch_end(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         if ctx.batch() == Some(0) {
    ///             self.0 += 1;
    ///         }
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn batch(&self) -> Option<usize> {
        self.batch
    }

    /// The finished epoch's log, in `on_epoch_end`; `None` elsewhere.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// struct Seconds(f64);
    /// impl Callback for Seconds {
    ///     fn on_epoch_end(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         self.0 += ctx.log().map_or(0.0, |log| log.seconds);
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn log(&self) -> Option<&EpochLog> {
        self.log
    }

    /// A value of the finished epoch's log by Keras's name (`loss`, `val_loss`, `accuracy`,
    /// `val_accuracy`, `<output>_loss`, …), in `on_epoch_end`; `None` elsewhere or when the
    /// log has no such value.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// struct Best(f64);
    /// impl Callback for Best {
    ///     fn on_epoch_end(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         if let Some(loss) = ctx.metric("val_loss") {
    ///             self.0 = self.0.min(loss);
    ///         }
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.log.and_then(|log| log.metric(name))
    }

    /// The loss of the batch just trained, in `on_train_batch_end` (`None` elsewhere). Read
    /// only when asked: on a GPU the read waits for the step to finish.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// struct Losses(Vec<f64>);
    /// impl Callback for Losses {
    ///     fn on_train_batch_end(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         self.0.extend(ctx.batch_loss()?);
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn batch_loss(&self) -> Result<Option<f64>> {
        self.batch_loss
            .map(|loss| crate::profile::read_scalar::<f64>(&loss.to_dtype(DType::F64)?))
            .transpose()
    }

    /// The base learning rate: the optimizer's, as callbacks and
    /// [`Trainer::set_learning_rate`] left it (a [`LrSchedule`](crate::train::LrSchedule)
    /// scales it at every step).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// struct Halve;
    /// impl Callback for Halve {
    ///     fn on_epoch_end(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         ctx.set_learning_rate(ctx.learning_rate() / 2.0)
    ///     }
    /// }
    /// ```
    pub fn learning_rate(&self) -> f64 {
        self.trainer.learning_rate()
    }

    /// Sets the base learning rate from the next step on (Keras's
    /// `model.optimizer.learning_rate = ...`); refused, changing nothing, unless finite and
    /// not negative.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// struct WarmUp;
    /// impl Callback for WarmUp {
    ///     fn on_train_batch_begin(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         if ctx.epoch() == 1 {
    ///             let b = ctx.batch().unwrap_or(0) as f64;
    ///             ctx.set_learning_rate(1e-3 * (b + 1.0).min(10.0) / 10.0)?;
    ///         }
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn set_learning_rate(&mut self, learning_rate: f64) -> Result<()> {
        self.trainer.set_learning_rate(learning_rate)
    }

    /// Asks `fit` to stop: after this batch (from a batch hook, the epoch is then ended and
    /// logged as Keras does) or after this epoch.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// struct TenBatches;
    /// impl Callback for TenBatches {
    ///     fn on_train_batch_end(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         if ctx.batch() == Some(9) {
    ///             ctx.stop_training();
    ///         }
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn stop_training(&mut self) {
        *self.stop = true;
    }

    /// Whether a hook has asked to stop.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// struct Note(bool);
    /// impl Callback for Note {
    ///     fn on_epoch_end(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         self.0 = ctx.stopping();
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn stopping(&self) -> bool {
        *self.stop
    }

    /// The trainer: model, optimizer state, history; enough to write a checkpoint.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// struct Save;
    /// impl Callback for Save {
    ///     fn on_epoch_end(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         ctx.trainer().save_checkpoint(std::env::temp_dir().join("cf_doc_save.ckpt"))
    ///     }
    /// }
    /// ```
    pub fn trainer(&self) -> &Trainer {
        self.trainer
    }

    /// The trainer, to change: its settings, its learning rate, or to load a checkpoint.
    /// (The model's weights can be set through [`FitContext::trainer`]:
    /// [`Model::set_weights`](crate::Model::set_weights).)
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// /// Goes back to the best checkpoint, at a lower rate, when the loss turns to NaN.
    /// struct Rewind;
    /// impl Callback for Rewind {
    ///     fn on_epoch_end(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         if ctx.metric("loss").is_some_and(f64::is_nan) {
    ///             let rate = ctx.learning_rate() / 10.0;
    ///             ctx.trainer_mut().load_checkpoint("runs/x/best.ckpt")?;
    ///             ctx.trainer_mut().set_learning_rate(rate)?;
    ///         }
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn trainer_mut(&mut self) -> &mut Trainer {
        self.trainer
    }

    /// The run so far (at an epoch's end: that epoch included).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Callback, FitContext};
    /// struct CountEpochs(usize);
    /// impl Callback for CountEpochs {
    ///     fn on_epoch_end(&mut self, ctx: &mut FitContext<'_>) -> candle_functional::Result<()> {
    ///         self.0 = ctx.history().epochs().len();
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn history(&self) -> &History {
        self.trainer.history()
    }
}

/// A hook into `fit`, with Keras's six methods (each does nothing unless implemented). Hooks
/// get a [`FitContext`]: they may read the logs, change the learning rate and the model's
/// weights, and stop training. A callback that keeps state across epochs (counters, a best
/// value) returns it from [`Callback::state`] so that a resumed run continues exactly.
///
/// # Examples
/// ```
/// use candle_functional::train::{Callback, EarlyStopping, ModelCheckpoint, ReduceLrOnPlateau};
/// let callbacks: Vec<Box<dyn Callback>> = vec![
///     Box::new(ReduceLrOnPlateau::new("val_loss").patience(2)),
///     Box::new(EarlyStopping::new("val_loss", 5).restore_best_weights(true)),
///     Box::new(ModelCheckpoint::new("runs/x")),
/// ];
/// assert_eq!(callbacks[1].name(), "early_stopping");
/// ```
pub trait Callback {
    /// Called once before the first epoch of a `fit` call.
    fn on_train_begin(&mut self, _ctx: &mut FitContext<'_>) -> Result<()> {
        Ok(())
    }

    /// Called once after the last epoch of a `fit` call (also when a callback stopped it; not
    /// when a step failed).
    fn on_train_end(&mut self, _ctx: &mut FitContext<'_>) -> Result<()> {
        Ok(())
    }

    /// Called before every epoch.
    fn on_epoch_begin(&mut self, _ctx: &mut FitContext<'_>) -> Result<()> {
        Ok(())
    }

    /// Called after every epoch, validation included.
    fn on_epoch_end(&mut self, _ctx: &mut FitContext<'_>) -> Result<()> {
        Ok(())
    }

    /// Called before every training batch.
    fn on_train_batch_begin(&mut self, _ctx: &mut FitContext<'_>) -> Result<()> {
        Ok(())
    }

    /// Called after every training batch (its loss in [`FitContext::batch_loss`]).
    fn on_train_batch_end(&mut self, _ctx: &mut FitContext<'_>) -> Result<()> {
        Ok(())
    }

    /// The name its state is saved under in checkpoints (letters, digits and `_`).
    fn name(&self) -> &str {
        "callback"
    }

    /// What must survive a checkpoint for a resumed run to continue exactly; `None` (the
    /// default) for a callback without state.
    fn state(&self) -> Result<Option<CallbackState>> {
        Ok(None)
    }

    /// Takes back a state returned by [`Callback::state`] (called after `on_train_begin` of a
    /// resumed run).
    fn restore_state(&mut self, _state: &CallbackState) -> Result<()> {
        Ok(())
    }

    /// Whether this callback writes checkpoints: such callbacks run after the others at the
    /// end of an epoch, so that the checkpoint holds every other callback's state after that
    /// epoch.
    fn writes_checkpoints(&self) -> bool {
        false
    }
}

/// The key of each callback's state: its name, with `#2`, `#3`, … for later ones of the same
/// name (dots, which separate a checkpoint tensor's key from its name, become `_`).
pub(crate) fn state_keys(callbacks: &[Box<dyn Callback>]) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    callbacks
        .iter()
        .map(|cb| {
            let name = cb.name().replace('.', "_");
            let count = seen.entry(name.clone()).or_insert(0);
            *count += 1;
            if *count == 1 {
                name
            } else {
                format!("{name}#{count}")
            }
        })
        .collect()
}

/// Every callback's state, by key.
pub(crate) fn callback_states(
    callbacks: &[Box<dyn Callback>],
) -> Result<BTreeMap<String, CallbackState>> {
    let mut states = BTreeMap::new();
    for (key, cb) in state_keys(callbacks).into_iter().zip(callbacks) {
        if let Some(state) = cb.state()? {
            states.insert(key, state);
        }
    }
    Ok(states)
}

/// Hands each callback its saved state, if the checkpoint has one under its key (a callback
/// added on resume starts fresh; a saved state without its callback is left unused).
pub(crate) fn restore_callback_states(
    callbacks: &mut [Box<dyn Callback>],
    states: &BTreeMap<String, CallbackState>,
) -> Result<()> {
    let keys = state_keys(callbacks);
    for (key, cb) in keys.iter().zip(callbacks.iter_mut()) {
        if let Some(state) = states.get(key) {
            cb.restore_state(state)?;
        }
    }
    Ok(())
}

/// Which hook [`run_hook`] calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hook {
    TrainBegin,
    TrainEnd,
    EpochBegin,
    BatchBegin,
    BatchEnd,
}

/// Calls one hook of every callback, in order.
pub(crate) fn run_hook(
    callbacks: &mut [Box<dyn Callback>],
    hook: Hook,
    ctx: &mut FitContext<'_>,
) -> Result<()> {
    for cb in callbacks.iter_mut() {
        match hook {
            Hook::TrainBegin => cb.on_train_begin(ctx)?,
            Hook::TrainEnd => cb.on_train_end(ctx)?,
            Hook::EpochBegin => cb.on_epoch_begin(ctx)?,
            Hook::BatchBegin => cb.on_train_batch_begin(ctx)?,
            Hook::BatchEnd => cb.on_train_batch_end(ctx)?,
        }
    }
    Ok(())
}

/// Runs `on_epoch_end`: first every callback that does not write checkpoints, then the run's
/// callback states are taken (what [`Trainer::save_checkpoint`] writes), then the callbacks
/// that write checkpoints, so a checkpoint holds every other callback's state after this
/// epoch whatever the order of the list.
pub(crate) fn run_epoch_end(
    callbacks: &mut [Box<dyn Callback>],
    trainer: &mut Trainer,
    log: &EpochLog,
    stop: &mut bool,
) -> Result<()> {
    for writers in [false, true] {
        if writers {
            trainer.callback_states = callback_states(callbacks)?;
        }
        let mut ctx = FitContext::new(trainer, log.epoch, stop).with_log(log);
        for cb in callbacks
            .iter_mut()
            .filter(|cb| cb.writes_checkpoints() == writers)
        {
            cb.on_epoch_end(&mut ctx)?;
        }
    }
    Ok(())
}

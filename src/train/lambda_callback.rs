//! [`LambdaCallback`]: a callback made of closures, one per hook (Keras's `LambdaCallback`).

use crate::Result;
use crate::train::callback::{Callback, FitContext};

/// One hook's closure.
type HookFn = Box<dyn FnMut(&mut FitContext<'_>) -> Result<()>>;

/// A callback made of closures, for what needs no type of its own (Keras's `LambdaCallback`:
/// its `on_epoch_end=` is `.epoch_end(...)` here, and so on for each hook). Hooks left unset
/// do nothing.
///
/// # Examples
/// ```
/// use std::cell::RefCell;
/// use std::rc::Rc;
/// use candle_functional::train::{Callback, LambdaCallback};
/// let losses = Rc::new(RefCell::new(Vec::new()));
/// let sink = losses.clone();
/// let log_batches = LambdaCallback::new().batch_end(move |ctx| {
///     sink.borrow_mut().extend(ctx.batch_loss()?);
///     Ok(())
/// });
/// let callbacks: Vec<Box<dyn Callback>> = vec![Box::new(log_batches)];
/// ```
#[derive(Default)]
pub struct LambdaCallback {
    train_begin: Option<HookFn>,
    train_end: Option<HookFn>,
    epoch_begin: Option<HookFn>,
    epoch_end: Option<HookFn>,
    batch_begin: Option<HookFn>,
    batch_end: Option<HookFn>,
}

impl LambdaCallback {
    /// A callback whose hooks do nothing yet.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::LambdaCallback::new();
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` once before training (Keras's `on_train_begin`).
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::LambdaCallback::new().train_begin(|_| Ok(()));
    /// ```
    pub fn train_begin(
        mut self,
        f: impl FnMut(&mut FitContext<'_>) -> Result<()> + 'static,
    ) -> Self {
        self.train_begin = Some(Box::new(f));
        self
    }

    /// Runs `f` once after training (Keras's `on_train_end`).
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::LambdaCallback::new().train_end(|_| Ok(()));
    /// ```
    pub fn train_end(mut self, f: impl FnMut(&mut FitContext<'_>) -> Result<()> + 'static) -> Self {
        self.train_end = Some(Box::new(f));
        self
    }

    /// Runs `f` before every epoch (Keras's `on_epoch_begin`).
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::LambdaCallback::new().epoch_begin(|_| Ok(()));
    /// ```
    pub fn epoch_begin(
        mut self,
        f: impl FnMut(&mut FitContext<'_>) -> Result<()> + 'static,
    ) -> Self {
        self.epoch_begin = Some(Box::new(f));
        self
    }

    /// Runs `f` after every epoch (Keras's `on_epoch_end`).
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::LambdaCallback::new().epoch_end(|ctx| {
    ///     if ctx.metric("loss").is_some_and(|l| l < 0.01) {
    ///         ctx.stop_training();
    ///     }
    ///     Ok(())
    /// });
    /// ```
    pub fn epoch_end(mut self, f: impl FnMut(&mut FitContext<'_>) -> Result<()> + 'static) -> Self {
        self.epoch_end = Some(Box::new(f));
        self
    }

    /// Runs `f` before every training batch (Keras's `on_train_batch_begin`).
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::LambdaCallback::new().batch_begin(|_| Ok(()));
    /// ```
    pub fn batch_begin(
        mut self,
        f: impl FnMut(&mut FitContext<'_>) -> Result<()> + 'static,
    ) -> Self {
        self.batch_begin = Some(Box::new(f));
        self
    }

    /// Runs `f` after every training batch (Keras's `on_train_batch_end`).
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::train::LambdaCallback::new().batch_end(|_| Ok(()));
    /// ```
    pub fn batch_end(mut self, f: impl FnMut(&mut FitContext<'_>) -> Result<()> + 'static) -> Self {
        self.batch_end = Some(Box::new(f));
        self
    }
}

/// Calls a hook's closure, if set.
fn call(hook: &mut Option<HookFn>, ctx: &mut FitContext<'_>) -> Result<()> {
    hook.as_mut().map_or(Ok(()), |f| f(ctx))
}

impl Callback for LambdaCallback {
    fn on_train_begin(&mut self, ctx: &mut FitContext<'_>) -> Result<()> {
        call(&mut self.train_begin, ctx)
    }

    fn on_train_end(&mut self, ctx: &mut FitContext<'_>) -> Result<()> {
        call(&mut self.train_end, ctx)
    }

    fn on_epoch_begin(&mut self, ctx: &mut FitContext<'_>) -> Result<()> {
        call(&mut self.epoch_begin, ctx)
    }

    fn on_epoch_end(&mut self, ctx: &mut FitContext<'_>) -> Result<()> {
        call(&mut self.epoch_end, ctx)
    }

    fn on_train_batch_begin(&mut self, ctx: &mut FitContext<'_>) -> Result<()> {
        call(&mut self.batch_begin, ctx)
    }

    fn on_train_batch_end(&mut self, ctx: &mut FitContext<'_>) -> Result<()> {
        call(&mut self.batch_end, ctx)
    }
}

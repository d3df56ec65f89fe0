//! Optimizers with Keras 3's update rules and defaults: [`Adam`] (and AdamW through its
//! decoupled weight decay) and [`Sgd`] with momentum, Nesterov momentum and weight decay.
//!
//! candle-nn's `AdamW` defaults to weight decay 0.01 and epsilon 1e-8 and puts epsilon after
//! the bias correction; its `SGD` has no momentum. These follow Keras instead (see each
//! `step`), so a Keras recipe means the same thing here.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::ops;
use crate::support::dtype::Cast;
use crate::{Error, Result};

/// The state an optimizer needs to resume: a step count and named slot tensors.
///
/// # Examples
/// ```
/// use candle_functional::train::OptimizerState;
/// let s = OptimizerState::default();
/// assert_eq!(s.iterations, 0);
/// ```
#[derive(Clone, Debug, Default)]
pub struct OptimizerState {
    /// Updates applied so far.
    pub iterations: u64,
    /// Slot tensors, named `<slot>.<variable>`: `m.conv2d.kernel`, `v.conv2d.kernel`,
    /// `momentum.dense.bias`, ...
    pub slots: Vec<(String, Tensor)>,
}

/// Something that updates named variables from their gradients. Its state (moments,
/// velocities) is kept per variable *name*, created the first time a name is stepped: a
/// variable unfrozen later gets fresh slots, a reordered model keeps each variable's own.
///
/// # Examples
/// ```
/// use candle_core::{Device, Var};
/// use candle_functional::train::{Optimizer, Sgd, SgdConfig};
/// let w = Var::new(&[2.0f32], &Device::Cpu)?;
/// let mut opt: Box<dyn Optimizer> = Box::new(Sgd::new(SgdConfig::default())?);
/// let loss = w.as_tensor().sqr()?.sum_all()?;
/// opt.step(&[("w".to_string(), w.clone())], &loss.backward()?, 0.25)?;
/// assert_eq!(w.to_vec1::<f32>()?, [1.0]);
/// assert_eq!(opt.state()?.iterations, 1);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub trait Optimizer: Send {
    /// Applies one update with learning rate `lr` to every variable of `vars` that has a
    /// gradient. All new values are computed before any is written: a step that fails changes
    /// nothing.
    fn step(&mut self, vars: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<()>;

    /// [`Optimizer::step`], applied only where the device scalar `keep` (u8) is 1: with 0,
    /// every weight and slot keeps its value, without the host waiting for the device to
    /// read `keep` (the trainer's divergence check on a GPU). The default reads `keep`.
    fn step_if(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
        keep: &Tensor,
    ) -> Result<()> {
        if crate::profile::read_scalar::<u8>(&keep.cast(candle_core::DType::U8)?)? != 0 {
            self.step(vars, grads, lr)?;
        }
        Ok(())
    }

    /// Whether [`Optimizer::step`] with these arguments would write only finite values: a
    /// u8 scalar on the variables' device (1 or 0), computed without writing anything, or
    /// `None` when this optimizer cannot tell (the default) or nothing would be stepped. The
    /// trainer's divergence check folds it in, so a step whose loss and gradients are finite
    /// but whose update overflows (a huge learning rate) writes nothing and stops training.
    fn step_is_finite(
        &self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
    ) -> Result<Option<Tensor>> {
        let _ = (vars, grads, lr);
        Ok(None)
    }

    /// The base learning rate of its config (a schedule scales from it).
    fn learning_rate(&self) -> f64;

    /// A copy of its state, for checkpoints (the slots themselves change in place at every
    /// step).
    fn state(&self) -> Result<OptimizerState>;

    /// Checks that `state` fits `vars` (every slot names one of them, with its shape) without
    /// changing anything.
    fn check_state(&self, state: &OptimizerState, vars: &[(String, Var)]) -> Result<()>;

    /// Restores a state saved by [`Optimizer::state`], after [`Optimizer::check_state`].
    fn load_state(&mut self, state: &OptimizerState, vars: &[(String, Var)]) -> Result<()>;
}

/// Slot variables of one kind (`m`, `v`, `momentum`) by variable name, updated in place.
#[derive(Debug, Default)]
struct Slots {
    kind: &'static str,
    by_var: BTreeMap<String, Var>,
}

impl Slots {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            by_var: BTreeMap::new(),
        }
    }

    /// The slot of `name`; the first time, zeros like `var`, also pushed to `fresh` so that
    /// the caller keeps it only if the step succeeds.
    fn get(&self, name: &str, var: &Var, fresh: &mut Vec<(String, Var)>) -> Result<Var> {
        Ok(match self.by_var.get(name) {
            Some(slot) => slot.clone(),
            None => {
                let slot = Var::zeros(var.shape(), var.dtype(), var.device())?;
                fresh.push((name.to_string(), slot.clone()));
                slot
            }
        })
    }

    /// Copies of the slots (the variables change in place at the next step).
    fn saved(&self) -> Result<Vec<(String, Tensor)>> {
        self.by_var
            .iter()
            .map(|(n, v)| Ok((format!("{}.{n}", self.kind), v.as_tensor().detach().copy()?)))
            .collect()
    }
}

/// Checks `state`'s slots against the kinds an optimizer keeps and the variables it steps:
/// every slot must be `<kind>.<variable>` for one of `vars`, with that variable's shape.
fn check_slots(kinds: &[&str], state: &OptimizerState, vars: &[(String, Var)]) -> Result<()> {
    let shapes: BTreeMap<&str, &[usize]> =
        vars.iter().map(|(n, v)| (n.as_str(), v.dims())).collect();
    let mut unexpected = Vec::new();
    let mut mis_shaped = Vec::new();
    for (name, t) in &state.slots {
        let var = kinds
            .iter()
            .find_map(|k| name.strip_prefix(k).and_then(|r| r.strip_prefix('.')));
        match var.and_then(|v| shapes.get(v)) {
            None => unexpected.push(name.clone()),
            Some(shape) if t.dims() != *shape => {
                mis_shaped.push((name.clone(), shape.to_vec(), t.dims().to_vec()))
            }
            Some(_) => {}
        }
    }
    if unexpected.is_empty() && mis_shaped.is_empty() {
        return Ok(());
    }
    Err(Error::WeightsMismatch {
        source_name: "in the optimizer state".into(),
        missing: Vec::new(),
        unexpected,
        mis_shaped,
        mis_typed: Vec::new(),
    })
}

/// Replaces each kind's slots with `state`'s (checked first), on the variables' devices.
fn load_slots(
    slots: &mut [&mut Slots],
    state: &OptimizerState,
    vars: &[(String, Var)],
) -> Result<()> {
    let kinds: Vec<&str> = slots.iter().map(|s| s.kind).collect();
    check_slots(&kinds, state, vars)?;
    let by_name: BTreeMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let mut loaded: Vec<BTreeMap<String, Var>> = vec![BTreeMap::new(); slots.len()];
    for (name, t) in &state.slots {
        for (i, kind) in kinds.iter().enumerate() {
            if let Some(var) = name.strip_prefix(kind).and_then(|r| r.strip_prefix('.')) {
                let target = by_name[var];
                let value = t.to_device(target.device())?.cast(target.dtype())?.copy()?;
                loaded[i].insert(var.to_string(), Var::from_tensor(&value)?);
            }
        }
    }
    for (slot, values) in slots.iter_mut().zip(loaded) {
        slot.by_var = values;
    }
    Ok(())
}

/// Which optimizer to build, with its settings; [`Trainer`](crate::train::Trainer) builds it
/// over the model's trainable variables.
///
/// # Examples
/// ```
/// use candle_functional::train::{AdamConfig, OptimizerConfig};
/// let adam = OptimizerConfig::from(AdamConfig::default());
/// assert_eq!(adam.learning_rate(), 1e-3);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerConfig {
    /// Adam / AdamW.
    Adam(AdamConfig),
    /// SGD with optional momentum.
    Sgd(SgdConfig),
    /// An optimizer of your own ([`OptimizerConfig::custom`]).
    Custom(CustomOptimizer),
}

/// How to make an optimizer of your own, with the name and settings that identify it: a
/// checkpoint records them (as it records Adam's or SGD's settings) and resumes only into a
/// trainer whose optimizer has the same ones, so its slots go back where they came from.
/// Made by [`OptimizerConfig::custom`].
///
/// # Examples
/// ```
/// use candle_functional::train::{OptimizerConfig, Sgd, SgdConfig};
/// let config = OptimizerConfig::custom("plain_sgd", "lr=0.1", 0.1, || {
///     Ok(Box::new(Sgd::new(SgdConfig { learning_rate: 0.1, ..Default::default() })?))
/// });
/// let OptimizerConfig::Custom(custom) = &config else { unreachable!() };
/// assert_eq!(custom.name(), "plain_sgd");
/// ```
#[derive(Clone)]
pub struct CustomOptimizer {
    name: String,
    settings: String,
    learning_rate: f64,
    make: Arc<dyn Fn() -> Result<Box<dyn Optimizer>> + Send + Sync>,
}

impl CustomOptimizer {
    /// The name it is saved under.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::train::{OptimizerConfig, Sgd, SgdConfig};
    /// let c = OptimizerConfig::custom("mine", "", 0.1, || Ok(Box::new(Sgd::new(SgdConfig::default())?)));
    /// let OptimizerConfig::Custom(custom) = c else { unreachable!() };
    /// assert_eq!(custom.name(), "mine");
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings it is saved with.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::train::{OptimizerConfig, Sgd, SgdConfig};
    /// let c = OptimizerConfig::custom("mine", "beta=0.9", 0.1, || Ok(Box::new(Sgd::new(SgdConfig::default())?)));
    /// let OptimizerConfig::Custom(custom) = c else { unreachable!() };
    /// assert_eq!(custom.settings(), "beta=0.9");
    /// ```
    pub fn settings(&self) -> &str {
        &self.settings
    }
}

impl std::fmt::Debug for CustomOptimizer {
    // What a checkpoint records: the name, the settings and the rate (not the closure).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomOptimizer")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("learning_rate", &self.learning_rate)
            .finish()
    }
}

impl PartialEq for CustomOptimizer {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.settings == other.settings
            && self.learning_rate == other.learning_rate
    }
}

impl OptimizerConfig {
    /// The base learning rate.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{OptimizerConfig, SgdConfig};
    /// assert_eq!(OptimizerConfig::from(SgdConfig::default()).learning_rate(), 0.01);
    /// ```
    pub fn learning_rate(&self) -> f64 {
        match self {
            OptimizerConfig::Adam(c) => c.learning_rate,
            OptimizerConfig::Sgd(c) => c.learning_rate,
            OptimizerConfig::Custom(c) => c.learning_rate,
        }
    }

    /// An optimizer of your own: an implementation of [`Optimizer`] made by `make` (once per
    /// trainer), saved in checkpoints as `name` with `settings` (a checkpoint resumes only
    /// into the same name and settings), `learning_rate` its base rate (schedules and
    /// callbacks scale and change it; each step passes the rate to [`Optimizer::step`]).
    ///
    /// # Examples
    /// ```
    /// use candle_core::backprop::GradStore;
    /// use candle_core::Var;
    /// use candle_functional::train::{Optimizer, OptimizerConfig, OptimizerState};
    /// use candle_functional::Result;
    ///
    /// /// signSGD: w -= lr · sign(g). No slots, only a step count.
    /// struct SignSgd { lr: f64, iterations: u64 }
    /// impl Optimizer for SignSgd {
    ///     fn step(&mut self, vars: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<()> {
    ///         // Every new value computed before any is written: a failed step changes nothing.
    ///         let mut updates = Vec::new();
    ///         for (_, v) in vars {
    ///             if let Some(g) = grads.get(v.as_tensor()) {
    ///                 let sign = (g.gt(0.0)?.to_dtype(g.dtype())? - g.lt(0.0)?.to_dtype(g.dtype())?)?;
    ///                 updates.push((v, (v.as_tensor() - (sign * lr)?)?));
    ///             }
    ///         }
    ///         for (v, new) in updates {
    ///             v.set(&new)?;
    ///         }
    ///         self.iterations += 1;
    ///         Ok(())
    ///     }
    ///     fn learning_rate(&self) -> f64 { self.lr }
    ///     fn state(&self) -> Result<OptimizerState> {
    ///         Ok(OptimizerState { iterations: self.iterations, slots: Vec::new() })
    ///     }
    ///     fn check_state(&self, state: &OptimizerState, _: &[(String, Var)]) -> Result<()> {
    ///         match state.slots.first() {
    ///             None => Ok(()),
    ///             Some((name, _)) => Err(candle_functional::Error::InvalidArgument(
    ///                 format!("signSGD keeps no slot, the checkpoint has `{name}`"))),
    ///         }
    ///     }
    ///     fn load_state(&mut self, state: &OptimizerState, _: &[(String, Var)]) -> Result<()> {
    ///         self.iterations = state.iterations;
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let config = OptimizerConfig::custom("sign_sgd", "", 1e-3, || {
    ///     Ok(Box::new(SignSgd { lr: 1e-3, iterations: 0 }))
    /// });
    /// assert_eq!(config.learning_rate(), 1e-3);
    /// ```
    pub fn custom(
        name: impl Into<String>,
        settings: impl Into<String>,
        learning_rate: f64,
        make: impl Fn() -> Result<Box<dyn Optimizer>> + Send + Sync + 'static,
    ) -> Self {
        OptimizerConfig::Custom(CustomOptimizer {
            name: name.into(),
            settings: settings.into(),
            learning_rate,
            make: Arc::new(make),
        })
    }

    /// Builds the optimizer (its settings checked).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{AdamConfig, OptimizerConfig};
    /// let opt = OptimizerConfig::from(AdamConfig::default()).build()?;
    /// assert_eq!(opt.state()?.iterations, 0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn build(&self) -> Result<Box<dyn Optimizer>> {
        Ok(match self {
            OptimizerConfig::Adam(c) => Box::new(Adam::new(c.clone())?),
            OptimizerConfig::Sgd(c) => Box::new(Sgd::new(c.clone())?),
            OptimizerConfig::Custom(c) => {
                if !(c.learning_rate.is_finite() && c.learning_rate >= 0.0) {
                    return Err(Error::InvalidArgument(format!(
                        "optimizer `{}`: learning rate {} must be finite and not negative",
                        c.name, c.learning_rate
                    )));
                }
                (c.make)()?
            }
        })
    }
}

impl From<AdamConfig> for OptimizerConfig {
    fn from(c: AdamConfig) -> Self {
        OptimizerConfig::Adam(c)
    }
}

impl From<SgdConfig> for OptimizerConfig {
    fn from(c: SgdConfig) -> Self {
        OptimizerConfig::Sgd(c)
    }
}

/// Adam's settings; the defaults are Keras's (`lr 1e-3, beta 0.9/0.999, epsilon 1e-7`, no
/// weight decay).
///
/// # Examples
/// ```
/// use candle_functional::train::AdamConfig;
/// let c = AdamConfig::default();
/// assert_eq!((c.beta_1, c.beta_2, c.epsilon, c.weight_decay), (0.9, 0.999, 1e-7, 0.0));
/// let w = AdamConfig::adamw(0.004);
/// assert_eq!(w.weight_decay, 0.004);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct AdamConfig {
    /// Step size.
    pub learning_rate: f64,
    /// Decay of the first-moment average.
    pub beta_1: f64,
    /// Decay of the second-moment average.
    pub beta_2: f64,
    /// Added to `sqrt(v)` (Keras's "epsilon hat", before bias correction).
    pub epsilon: f64,
    /// Decoupled weight decay (AdamW): `w -= lr * weight_decay * w` before each update.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-3,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-7,
            weight_decay: 0.0,
        }
    }
}

impl AdamConfig {
    /// AdamW: Adam with decoupled weight decay (Keras's AdamW default is 0.004).
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::train::AdamConfig::adamw(0.01).weight_decay, 0.01);
    /// ```
    pub fn adamw(weight_decay: f64) -> Self {
        Self {
            weight_decay,
            ..Self::default()
        }
    }
}

/// Decoupled weight decay as a factor on the weight (1 without decay).
fn decay_factor(lr: f64, weight_decay: f64) -> f64 {
    if weight_decay > 0.0 {
        1.0 - lr * weight_decay
    } else {
        1.0
    }
}

/// The variables that have a gradient, each with it detached (gradients carry the step's
/// graph: the slots keep values, not history) and in the variable's dtype.
fn with_gradients<'a>(
    vars: &'a [(String, Var)],
    grads: &GradStore,
) -> Result<Vec<(&'a String, &'a Var, Tensor)>> {
    vars.iter()
        .filter_map(|(name, var)| {
            let g = grads.get(var.as_tensor())?;
            Some(
                g.detach()
                    .cast(var.dtype())
                    .map(|g| (name, var, g))
                    .map_err(Into::into),
            )
        })
        .collect()
}

/// The divergence verdict as the u8 scalar the fused updates take.
fn keep_u8(keep: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(keep.map(|k| k.cast(candle_core::DType::U8)).transpose()?)
}

/// `value` must be finite and positive (or zero, with `zero_ok`).
fn check_positive(name: &str, value: f64, zero_ok: bool) -> Result<()> {
    if value.is_finite() && (value > 0.0 || (zero_ok && value == 0.0)) {
        return Ok(());
    }
    let want = if zero_ok {
        "finite and at least 0"
    } else {
        "finite and positive"
    };
    Err(Error::InvalidArgument(format!(
        "{name} must be {want}, got {value}"
    )))
}

fn check_rate(name: &str, value: f64, range: std::ops::Range<f64>) -> Result<()> {
    if !range.contains(&value) {
        return Err(Error::InvalidArgument(format!(
            "{name} must be in [{}, {}), got {value}",
            range.start, range.end
        )));
    }
    Ok(())
}

/// Adam with Keras's update rule:
///
/// ```text
/// m = beta_1 m + (1 - beta_1) g;  v = beta_2 v + (1 - beta_2) g²
/// w -= lr · sqrt(1 - beta_2^t) / (1 - beta_1^t) · m / (sqrt(v) + epsilon)
/// ```
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use candle_functional::train::{Adam, AdamConfig, Optimizer};
/// let w = Var::new(&[1.0f32], &Device::Cpu)?;
/// let mut adam = Adam::new(AdamConfig::default())?;
/// let loss = (w.as_tensor() * 3.0)?.sum_all()?;
/// adam.step(&[("w".to_string(), w.clone())], &loss.backward()?, 0.1)?;
/// // The first Adam step moves by about lr whatever the gradient's size.
/// assert!((w.to_vec1::<f32>()?[0] - 0.9).abs() < 1e-5);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Debug)]
pub struct Adam {
    m: Slots,
    v: Slots,
    config: AdamConfig,
    iterations: u64,
}

impl Adam {
    /// Adam with these settings (betas checked).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Adam, AdamConfig};
    /// assert!(Adam::new(AdamConfig { beta_1: 1.0, ..Default::default() }).is_err());
    /// assert!(Adam::new(AdamConfig { learning_rate: f64::NAN, ..Default::default() }).is_err());
    /// ```
    pub fn new(config: AdamConfig) -> Result<Self> {
        check_rate("beta_1", config.beta_1, 0.0..1.0)?;
        check_rate("beta_2", config.beta_2, 0.0..1.0)?;
        check_positive("learning_rate", config.learning_rate, true)?;
        check_positive("epsilon", config.epsilon, false)?;
        check_positive("weight_decay", config.weight_decay, true)?;
        Ok(Self {
            m: Slots::new("m"),
            v: Slots::new("v"),
            config,
            iterations: 0,
        })
    }
}

/// One step's operands, gathered before anything is written: the constants, each variable
/// with a gradient, its slots, and the slots made for it now (kept only if the step is).
struct Prepared<'a, S, Slot> {
    step: S,
    stepped: Vec<(&'a String, &'a Var, Tensor)>,
    slots: Vec<Slot>,
    fresh: Vec<Vec<(String, Var)>>,
}

impl Adam {
    /// The operands of one step with learning rate `lr`.
    fn prepare<'a>(
        &self,
        vars: &'a [(String, Var)],
        grads: &GradStore,
        lr: f64,
    ) -> Result<Prepared<'a, ops::AdamStep, (Var, Var)>> {
        let c = &self.config;
        let t = (self.iterations + 1) as i32;
        let alpha = lr * (1.0 - c.beta_2.powi(t)).sqrt() / (1.0 - c.beta_1.powi(t));
        let step = ops::AdamStep {
            alpha,
            beta_1: c.beta_1,
            beta_2: c.beta_2,
            epsilon: c.epsilon,
            decay: decay_factor(lr, c.weight_decay),
        };
        let stepped = with_gradients(vars, grads)?;
        let (mut fresh_m, mut fresh_v) = (Vec::new(), Vec::new());
        let slots = stepped
            .iter()
            .map(|(name, var, _)| {
                Ok((
                    self.m.get(name, var, &mut fresh_m)?,
                    self.v.get(name, var, &mut fresh_v)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Prepared {
            step,
            stepped,
            slots,
            fresh: vec![fresh_m, fresh_v],
        })
    }

    /// One step; with `keep`, every new value is chosen on the device between new and old.
    fn update(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
        keep: Option<&Tensor>,
    ) -> Result<()> {
        let Prepared {
            step,
            stepped,
            slots,
            fresh,
        } = self.prepare(vars, grads, lr)?;
        // Written in place: one fused pass per weight on the CPU, one kernel for all of them
        // on CUDA; every operand is checked before anything is written.
        let items: Vec<(&Var, &Tensor, &Var, &Var)> = stepped
            .iter()
            .zip(&slots)
            .map(|((_, var, g), (m, v))| (*var, g, m, v))
            .collect();
        ops::adam_update_in_place(&items, step, keep_u8(keep)?.as_ref())?;
        for (slots, fresh) in [&mut self.m, &mut self.v].into_iter().zip(fresh) {
            slots.by_var.extend(fresh);
        }
        self.iterations += 1;
        Ok(())
    }
}

impl Optimizer for Adam {
    fn step(&mut self, vars: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<()> {
        self.update(vars, grads, lr, None)
    }

    fn step_if(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
        keep: &Tensor,
    ) -> Result<()> {
        self.update(vars, grads, lr, Some(keep))
    }

    fn step_is_finite(
        &self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
    ) -> Result<Option<Tensor>> {
        let prepared = self.prepare(vars, grads, lr)?;
        let items: Vec<(&Var, &Tensor, &Var, &Var)> = prepared
            .stepped
            .iter()
            .zip(&prepared.slots)
            .map(|((_, var, g), (m, v))| (*var, g, m, v))
            .collect();
        if items.is_empty() {
            return Ok(None);
        }
        Ok(Some(ops::adam_update_is_finite(&items, prepared.step)?))
    }

    fn learning_rate(&self) -> f64 {
        self.config.learning_rate
    }

    fn state(&self) -> Result<OptimizerState> {
        Ok(OptimizerState {
            iterations: self.iterations,
            slots: [self.m.saved()?, self.v.saved()?].concat(),
        })
    }

    fn check_state(&self, state: &OptimizerState, vars: &[(String, Var)]) -> Result<()> {
        check_slots(&["m", "v"], state, vars)
    }

    fn load_state(&mut self, state: &OptimizerState, vars: &[(String, Var)]) -> Result<()> {
        load_slots(&mut [&mut self.m, &mut self.v], state, vars)?;
        self.iterations = state.iterations;
        Ok(())
    }
}

/// SGD's settings; defaults are Keras's (`lr 0.01`, no momentum).
///
/// # Examples
/// ```
/// use candle_functional::train::SgdConfig;
/// let c = SgdConfig::momentum(0.1, 0.9).nesterov(true);
/// assert_eq!((c.learning_rate, c.momentum, c.nesterov), (0.1, 0.9, true));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SgdConfig {
    /// Step size.
    pub learning_rate: f64,
    /// Momentum in `[0, 1)`; 0 is plain SGD.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Decoupled weight decay: `w -= lr * weight_decay * w` before each update (Keras's
    /// convention; PyTorch's SGD instead adds `weight_decay * w` to the gradient).
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            learning_rate: 0.01,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

impl SgdConfig {
    /// SGD with momentum.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::train::SgdConfig::momentum(0.1, 0.9).momentum, 0.9);
    /// ```
    pub fn momentum(learning_rate: f64, momentum: f64) -> Self {
        Self {
            learning_rate,
            momentum,
            ..Self::default()
        }
    }

    /// Turns Nesterov momentum on or off.
    ///
    /// # Examples
    /// ```
    /// assert!(candle_functional::train::SgdConfig::default().nesterov(true).nesterov);
    /// ```
    pub fn nesterov(mut self, nesterov: bool) -> Self {
        self.nesterov = nesterov;
        self
    }

    /// Sets the decoupled weight decay.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::train::SgdConfig::default().weight_decay(5e-4).weight_decay, 5e-4);
    /// ```
    pub fn weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = weight_decay;
        self
    }
}

/// SGD with Keras's momentum rule:
///
/// ```text
/// u = momentum · u - lr · g
/// w += u                          (or w += momentum · u - lr · g with Nesterov)
/// ```
///
/// # Examples
/// ```
/// use candle_core::{Device, Var};
/// use candle_functional::train::{Optimizer, Sgd, SgdConfig};
/// let w = Var::new(&[1.0f32], &Device::Cpu)?;
/// let mut sgd = Sgd::new(SgdConfig::default())?;
/// let loss = (w.as_tensor() * 3.0)?.sum_all()?;
/// sgd.step(&[("w".to_string(), w.clone())], &loss.backward()?, 0.1)?;
/// assert!((w.to_vec1::<f32>()?[0] - 0.7).abs() < 1e-6);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Debug)]
pub struct Sgd {
    velocity: Slots,
    config: SgdConfig,
    iterations: u64,
}

impl Sgd {
    /// SGD with these settings (momentum checked).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Sgd, SgdConfig};
    /// assert!(Sgd::new(SgdConfig::momentum(0.1, 1.5)).is_err());
    /// assert!(Sgd::new(SgdConfig::momentum(f64::INFINITY, 0.9)).is_err());
    /// assert!(Sgd::new(SgdConfig::default().weight_decay(-1.0)).is_err());
    /// ```
    pub fn new(config: SgdConfig) -> Result<Self> {
        check_rate("momentum", config.momentum, 0.0..1.0)?;
        check_positive("learning_rate", config.learning_rate, true)?;
        check_positive("weight_decay", config.weight_decay, true)?;
        Ok(Self {
            velocity: Slots::new("momentum"),
            config,
            iterations: 0,
        })
    }
}

impl Sgd {
    /// The operands of one step with learning rate `lr`.
    fn prepare<'a>(
        &self,
        vars: &'a [(String, Var)],
        grads: &GradStore,
        lr: f64,
    ) -> Result<Prepared<'a, ops::SgdStep, Option<Var>>> {
        let c = &self.config;
        let step = ops::SgdStep {
            learning_rate: lr,
            momentum: c.momentum,
            nesterov: c.nesterov,
            decay: decay_factor(lr, c.weight_decay),
        };
        let stepped = with_gradients(vars, grads)?;
        let mut fresh = Vec::new();
        let slots = stepped
            .iter()
            .map(|(name, var, _)| {
                (c.momentum > 0.0)
                    .then(|| self.velocity.get(name, var, &mut fresh))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Prepared {
            step,
            stepped,
            slots,
            fresh: vec![fresh],
        })
    }

    /// One step; with `keep`, every new value is chosen on the device between new and old.
    fn update(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
        keep: Option<&Tensor>,
    ) -> Result<()> {
        let Prepared {
            step,
            stepped,
            slots,
            fresh,
        } = self.prepare(vars, grads, lr)?;
        // Written in place, as Adam's.
        let items: Vec<(&Var, &Tensor, Option<&Var>)> = stepped
            .iter()
            .zip(&slots)
            .map(|((_, var, g), u)| (*var, g, u.as_ref()))
            .collect();
        ops::sgd_update_in_place(&items, step, keep_u8(keep)?.as_ref())?;
        self.velocity.by_var.extend(fresh.into_iter().flatten());
        self.iterations += 1;
        Ok(())
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, vars: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<()> {
        self.update(vars, grads, lr, None)
    }

    fn step_if(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
        keep: &Tensor,
    ) -> Result<()> {
        self.update(vars, grads, lr, Some(keep))
    }

    fn step_is_finite(
        &self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
    ) -> Result<Option<Tensor>> {
        let prepared = self.prepare(vars, grads, lr)?;
        let items: Vec<(&Var, &Tensor, Option<&Var>)> = prepared
            .stepped
            .iter()
            .zip(&prepared.slots)
            .map(|((_, var, g), u)| (*var, g, u.as_ref()))
            .collect();
        if items.is_empty() {
            return Ok(None);
        }
        Ok(Some(ops::sgd_update_is_finite(&items, prepared.step)?))
    }

    fn learning_rate(&self) -> f64 {
        self.config.learning_rate
    }

    fn state(&self) -> Result<OptimizerState> {
        Ok(OptimizerState {
            iterations: self.iterations,
            slots: self.velocity.saved()?,
        })
    }

    fn check_state(&self, state: &OptimizerState, vars: &[(String, Var)]) -> Result<()> {
        check_slots(&["momentum"], state, vars)
    }

    fn load_state(&mut self, state: &OptimizerState, vars: &[(String, Var)]) -> Result<()> {
        load_slots(&mut [&mut self.velocity], state, vars)?;
        self.iterations = state.iterations;
        Ok(())
    }
}

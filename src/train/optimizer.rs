//! Optimizers with Keras 3's update rules and defaults: [`Adam`] (and AdamW through its
//! decoupled weight decay) and [`Sgd`] with momentum, Nesterov momentum and weight decay.
//!
//! candle-nn's `AdamW` defaults to weight decay 0.01 and epsilon 1e-8 and puts epsilon after
//! the bias correction; its `SGD` has no momentum. These follow Keras instead (see each
//! `step`), so a Keras recipe means the same thing here.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

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
    /// Slot tensors, named `m.3`, `v.3`, `momentum.0`, ... (slot, variable index).
    pub slots: Vec<(String, Tensor)>,
}

/// Something that updates variables from their gradients.
///
/// # Examples
/// ```
/// use candle_core::{Device, Var};
/// use candle_functional::train::{Optimizer, Sgd, SgdConfig};
/// let w = Var::new(&[2.0f32], &Device::Cpu)?;
/// let mut opt: Box<dyn Optimizer> = Box::new(Sgd::new(vec![w.clone()], SgdConfig::default())?);
/// let loss = w.as_tensor().sqr()?.sum_all()?;
/// opt.step(&loss.backward()?, 0.25)?;
/// assert_eq!(w.to_vec1::<f32>()?, [1.0]);
/// assert_eq!(opt.state().iterations, 1);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub trait Optimizer: Send {
    /// Applies one update with learning rate `lr` to every variable that has a gradient.
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()>;

    /// The base learning rate of its config (a schedule scales from it).
    fn learning_rate(&self) -> f64;

    /// Its state, for checkpoints.
    fn state(&self) -> OptimizerState;

    /// Restores a state saved by [`Optimizer::state`] (same variables, same order).
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
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
        }
    }

    /// Builds the optimizer over `vars`.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_functional::train::{AdamConfig, OptimizerConfig};
    /// let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    /// let opt = OptimizerConfig::from(AdamConfig::default()).build(vec![w])?;
    /// assert_eq!(opt.state().iterations, 0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn build(&self, vars: Vec<Var>) -> Result<Box<dyn Optimizer>> {
        Ok(match self {
            OptimizerConfig::Adam(c) => Box::new(Adam::new(vars, c.clone())?),
            OptimizerConfig::Sgd(c) => Box::new(Sgd::new(vars, c.clone())?),
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
/// let mut adam = Adam::new(vec![w.clone()], AdamConfig::default())?;
/// let loss = (w.as_tensor() * 3.0)?.sum_all()?;
/// adam.step(&loss.backward()?, 0.1)?;
/// // The first Adam step moves by about lr whatever the gradient's size.
/// assert!((w.to_vec1::<f32>()?[0] - 0.9).abs() < 1e-5);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Debug)]
pub struct Adam {
    vars: Vec<Var>,
    m: Vec<Var>,
    v: Vec<Var>,
    config: AdamConfig,
    iterations: u64,
}

impl Adam {
    /// Adam over `vars`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Adam, AdamConfig};
    /// let adam = Adam::new(vec![], AdamConfig::default())?;
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn new(vars: Vec<Var>, config: AdamConfig) -> Result<Self> {
        check_rate("beta_1", config.beta_1, 0.0..1.0)?;
        check_rate("beta_2", config.beta_2, 0.0..1.0)?;
        let zeros = |v: &Var| Var::zeros(v.shape(), v.dtype(), v.device());
        let m = vars
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            m,
            v,
            config,
            iterations: 0,
        })
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.iterations += 1;
        let c = &self.config;
        let t = self.iterations as i32;
        let alpha = lr * (1.0 - c.beta_2.powi(t)).sqrt() / (1.0 - c.beta_1.powi(t));
        for ((var, m), v) in self.vars.iter().zip(&self.m).zip(&self.v) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(m.dtype())?;
            let m_new = ((m.as_tensor() * c.beta_1)? + (&g * (1.0 - c.beta_1))?)?;
            let v_new = ((v.as_tensor() * c.beta_2)? + (g.sqr()? * (1.0 - c.beta_2))?)?;
            let mut w = var.as_tensor().detach();
            if c.weight_decay > 0.0 {
                w = (&w * (1.0 - lr * c.weight_decay))?;
            }
            let update = (&m_new / (v_new.sqrt()? + c.epsilon)?)?;
            let w = (w - (update * alpha)?.to_dtype(var.dtype())?)?;
            m.set(&m_new)?;
            v.set(&v_new)?;
            var.set(&w)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.learning_rate
    }

    fn state(&self) -> OptimizerState {
        let mut slots = Vec::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            slots.push((format!("m.{i}"), m.as_tensor().clone()));
            slots.push((format!("v.{i}"), v.as_tensor().clone()));
        }
        OptimizerState {
            iterations: self.iterations,
            slots,
        }
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        let slots = self
            .m
            .iter()
            .enumerate()
            .flat_map(|(i, m)| [(format!("m.{i}"), m)]);
        let slots = slots.chain(
            self.v
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("v.{i}"), v)),
        );
        load_slots(slots, state)?;
        self.iterations = state.iterations;
        Ok(())
    }
}

/// Sets every slot from `state`, checking names and shapes first.
fn load_slots<'a>(
    slots: impl Iterator<Item = (String, &'a Var)>,
    state: &OptimizerState,
) -> Result<()> {
    let saved: std::collections::HashMap<&str, &Tensor> =
        state.slots.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let slots: Vec<(String, &Var)> = slots.collect();
    let mut missing = Vec::new();
    let mut mis_shaped = Vec::new();
    for (name, var) in &slots {
        match saved.get(name.as_str()) {
            None => missing.push(name.clone()),
            Some(t) if t.dims() != var.dims() => {
                mis_shaped.push((name.clone(), var.dims().to_vec(), t.dims().to_vec()))
            }
            Some(_) => {}
        }
    }
    if !missing.is_empty() || !mis_shaped.is_empty() || saved.len() != slots.len() {
        let known: std::collections::HashSet<&str> =
            slots.iter().map(|(n, _)| n.as_str()).collect();
        return Err(Error::WeightsMismatch {
            source_name: "optimizer state".into(),
            missing,
            unexpected: saved
                .keys()
                .filter(|k| !known.contains(*k))
                .map(|k| k.to_string())
                .collect(),
            mis_shaped,
        });
    }
    for (name, var) in slots {
        let t = saved[name.as_str()];
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?.copy()?)?;
    }
    Ok(())
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
/// let mut sgd = Sgd::new(vec![w.clone()], SgdConfig::default())?;
/// let loss = (w.as_tensor() * 3.0)?.sum_all()?;
/// sgd.step(&loss.backward()?, 0.1)?;
/// assert!((w.to_vec1::<f32>()?[0] - 0.7).abs() < 1e-6);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Debug)]
pub struct Sgd {
    vars: Vec<Var>,
    velocity: Vec<Var>,
    config: SgdConfig,
    iterations: u64,
}

impl Sgd {
    /// SGD over `vars`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Sgd, SgdConfig};
    /// assert!(Sgd::new(vec![], SgdConfig::momentum(0.1, 1.5)).is_err());
    /// ```
    pub fn new(vars: Vec<Var>, config: SgdConfig) -> Result<Self> {
        check_rate("momentum", config.momentum, 0.0..1.0)?;
        let velocity = if config.momentum > 0.0 {
            vars.iter()
                .map(|v| Var::zeros(v.shape(), v.dtype(), v.device()))
                .collect::<candle_core::Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            vars,
            velocity,
            config,
            iterations: 0,
        })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.iterations += 1;
        let c = &self.config;
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(var.dtype())?;
            let mut w = var.as_tensor().detach();
            if c.weight_decay > 0.0 {
                w = (&w * (1.0 - lr * c.weight_decay))?;
            }
            let step = (&g * lr)?;
            let w = match self.velocity.get(i) {
                None => (w - step)?,
                Some(u) => {
                    let u_new = ((u.as_tensor() * c.momentum)? - &step)?;
                    let w = if c.nesterov {
                        ((w + (&u_new * c.momentum)?)? - step)?
                    } else {
                        (w + &u_new)?
                    };
                    u.set(&u_new)?;
                    w
                }
            };
            var.set(&w)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.learning_rate
    }

    fn state(&self) -> OptimizerState {
        OptimizerState {
            iterations: self.iterations,
            slots: self
                .velocity
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("momentum.{i}"), u.as_tensor().clone()))
                .collect(),
        }
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        load_slots(
            self.velocity
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("momentum.{i}"), u)),
            state,
        )?;
        self.iterations = state.iterations;
        Ok(())
    }
}

//! What a layer is to the graph: a behaviour ([`LayerOp`]), an identity that owns the weights
//! ([`LayerRef`]), and the call that records a node ([`Layer::call`]).
//!
//! A layer value such as `Conv2D::new(64, 3)` is a [`Configured`] config. The first time it is
//! called it gets an identity (a [`LayerRef`]); every later call of the same value, or of a
//! clone of it, records another node over the same identity, so the calls share weights, as
//! Keras's shared layers do. Changing the configuration with a builder method makes a new layer.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use candle_core::{DType, Device, Tensor, Var};

use crate::graph::init::{Initializer, layer_rng};
use crate::graph::symbolic::{SymbolicTensor, record_call};
use crate::support::dtype::Cast;
use crate::support::sizes;
use crate::{Error, Result};

/// Whether a forward pass trains (batch statistics, dropout on) or infers.
///
/// # Examples
/// ```
/// use candle_functional::Mode;
/// assert!(Mode::Train.is_train());
/// assert!(!Mode::Eval.is_train());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// Training: BatchNorm uses and updates batch statistics, Dropout drops; gradients flow
    /// to the weights.
    Train,
    /// Inference: BatchNorm uses its moving statistics, Dropout is the identity, and the
    /// weights are detached so no autograd graph is kept for them.
    #[default]
    Eval,
}

impl Mode {
    /// `true` for [`Mode::Train`].
    ///
    /// # Examples
    /// ```
    /// assert!(candle_functional::Mode::Train.is_train());
    /// ```
    pub fn is_train(self) -> bool {
        self == Mode::Train
    }
}

/// One weight tensor a layer needs, described before it exists.
///
/// # Examples
/// ```
/// use candle_functional::{Initializer, ParamSpec};
/// let spec = ParamSpec::new("bias", vec![10], Initializer::Zeros);
/// assert!(spec.trainable());
/// assert_eq!(spec.numel(), 10);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    name: String,
    shape: Vec<usize>,
    init: Initializer,
    trainable: bool,
    fans: (usize, usize),
}

impl ParamSpec {
    /// A trainable parameter whose fans (for Glorot/He initializers) are taken from a
    /// `[fan_in, fan_out]`-like shape; use [`ParamSpec::fans`] to set them explicitly.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Initializer, ParamSpec};
    /// let k = ParamSpec::new("kernel", vec![4, 3], Initializer::GlorotUniform);
    /// assert_eq!(k.fan_in_out(), (4, 3));
    /// ```
    pub fn new(name: impl Into<String>, shape: Vec<usize>, init: Initializer) -> Self {
        let fans = match shape.as_slice() {
            [] => (1, 1),
            [n] => (*n, *n),
            [a, b, ..] => (*a, *b),
        };
        Self {
            name: name.into(),
            shape,
            init,
            trainable: true,
            fans,
        }
    }

    /// Marks the tensor as non-trainable state (BatchNorm's moving statistics): it is saved
    /// and loaded with the weights, but never handed to an optimizer.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Initializer, ParamSpec};
    /// let s = ParamSpec::new("moving_mean", vec![8], Initializer::Zeros).non_trainable();
    /// assert!(!s.trainable());
    /// ```
    pub fn non_trainable(mut self) -> Self {
        self.trainable = false;
        self
    }

    /// Sets the fan-in and fan-out used by variance-scaling initializers.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Initializer, ParamSpec};
    /// let k = ParamSpec::new("kernel", vec![8, 3, 3, 3], Initializer::GlorotUniform).fans(27, 72);
    /// assert_eq!(k.fan_in_out(), (27, 72));
    /// ```
    pub fn fans(mut self, fan_in: usize, fan_out: usize) -> Self {
        self.fans = (fan_in, fan_out);
        self
    }

    /// The parameter's short name (`kernel`, `bias`, `gamma`, ...).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// assert_eq!(ParamSpec::new("bias", vec![2], Initializer::Zeros).name(), "bias");
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor's shape.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// assert_eq!(ParamSpec::new("bias", vec![2], Initializer::Zeros).shape(), &[2]);
    /// ```
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// How the tensor is filled when the model is built.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// let s = ParamSpec::new("bias", vec![2], Initializer::Zeros);
    /// assert_eq!(s.initializer(), &Initializer::Zeros);
    /// ```
    pub fn initializer(&self) -> &Initializer {
        &self.init
    }

    /// Whether an optimizer updates it.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// assert!(ParamSpec::new("bias", vec![2], Initializer::Zeros).trainable());
    /// ```
    pub fn trainable(&self) -> bool {
        self.trainable
    }

    /// `(fan_in, fan_out)` for variance-scaling initializers.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// assert_eq!(ParamSpec::new("k", vec![5, 7], Initializer::Zeros).fan_in_out(), (5, 7));
    /// ```
    pub fn fan_in_out(&self) -> (usize, usize) {
        self.fans
    }

    /// Number of scalars (`usize::MAX` for a shape too large to count).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// assert_eq!(ParamSpec::new("k", vec![5, 7], Initializer::Zeros).numel(), 35);
    /// ```
    pub fn numel(&self) -> usize {
        // Saturating: a configured shape may be too large to count (it is refused at build).
        self.shape.iter().fold(1usize, |n, &d| n.saturating_mul(d))
    }
}

/// What a layer's forward pass is given besides its inputs: its weights, reached by the names
/// of its [`LayerOp::param_specs`], the mode, and a seed for random layers.
///
/// In [`Mode::Eval`], [`Params::get`] hands out detached tensors, so inference keeps no
/// autograd graph.
#[derive(Debug)]
pub struct Params<'a> {
    specs: &'a [ParamSpec],
    vars: &'a [Var],
    mode: Mode,
    seed: u64,
    compute_dtype: Option<DType>,
    trainable: bool,
    state_updates: Option<&'a StateUpdates>,
}

/// What a forward pass runs with besides its inputs: the mode, the seed of this call, the
/// mixed-precision dtype, and where state updates are held back.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pass<'a> {
    pub(crate) mode: Mode,
    pub(crate) seed: u64,
    pub(crate) compute_dtype: Option<DType>,
    pub(crate) state_updates: Option<&'a StateUpdates>,
}

impl<'a> Pass<'a> {
    /// The pass a layer's `Params` describe (a nested model runs with its caller's).
    pub(crate) fn of(params: &Params<'a>) -> Self {
        Self {
            mode: params.mode,
            seed: params.seed,
            compute_dtype: params.compute_dtype,
            state_updates: params.state_updates,
        }
    }
}

/// Values for non-trainable state (BatchNorm's moving statistics) computed by a forward pass
/// and held back until the pass, or the training step around it, has succeeded: then
/// [`StateUpdates::apply`] writes them. A step that fails leaves every statistic as it was.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::StateUpdates;
/// let x = Input::new([2, 3]);
/// let y = BatchNorm::new().call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let batch = Tensor::ones((4, 2, 3), DType::F32, &Device::Cpu)?;
/// let updates = StateUpdates::default();
/// model.forward_deferred(&[batch], Mode::Train, &updates)?;
/// assert_eq!(updates.len(), 2); // moving_mean and moving_variance, not yet written
/// assert_eq!(model.weight_map()?["batch_normalization.moving_mean"].to_vec1::<f32>()?, [0.0, 0.0]);
/// updates.apply()?;
/// assert!(model.weight_map()?["batch_normalization.moving_mean"].to_vec1::<f32>()?[0] > 0.0);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct StateUpdates(std::sync::Mutex<Vec<(Var, Tensor)>>);

impl StateUpdates {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Var, Tensor)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, var: &Var, value: Tensor) {
        self.lock().push((var.clone(), value));
    }

    /// The value held back for `var`, if any (the latest, for a layer called twice).
    fn pending(&self, var: &Var) -> Option<Tensor> {
        self.lock()
            .iter()
            .rev()
            .find(|(v, _)| v.as_tensor().id() == var.as_tensor().id())
            .map(|(_, t)| t.clone())
    }

    /// Number of updates held back.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::StateUpdates::default().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// `true` when no update is held back.
    ///
    /// # Examples
    /// ```
    /// assert!(candle_functional::StateUpdates::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The held-back values, one per variable: the latest (a layer called twice in one pass
    /// computes its second update from its first), in the order the variables were first
    /// updated. Writing these is the same as [`StateUpdates::apply`]; a caller that writes
    /// them all at once (the trainer, with `ops::assign_if`) takes them this way.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::StateUpdates;
    /// assert!(StateUpdates::default().into_latest().is_empty());
    /// ```
    pub fn into_latest(self) -> Vec<(Var, Tensor)> {
        let updates = self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut latest: Vec<(Var, Tensor)> = Vec::with_capacity(updates.len());
        for (var, value) in updates {
            match latest
                .iter_mut()
                .find(|(v, _)| v.as_tensor().id() == var.as_tensor().id())
            {
                Some(slot) => slot.1 = value,
                None => latest.push((var, value)),
            }
        }
        latest
    }

    /// Writes every held-back value into its variable, in the order they were computed.
    ///
    /// # Examples
    /// ```
    /// candle_functional::StateUpdates::default().apply()?;
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn apply(self) -> Result<()> {
        let updates = self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        for (var, value) in updates {
            var.set(&value)?;
        }
        Ok(())
    }

    /// [`StateUpdates::apply`] where the device scalar `keep` (u8) is 1; with 0 every variable
    /// keeps its value. Chosen on the device: the host does not wait to read `keep`.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_functional::StateUpdates;
    /// let keep = Tensor::new(0u8, &Device::Cpu)?;
    /// StateUpdates::default().apply_if(&keep)?;
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn apply_if(self, keep: &Tensor) -> Result<()> {
        let updates = self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        for (var, value) in updates {
            let keep = keep.cast(DType::U8)?.broadcast_as(value.shape())?;
            var.set(&keep.where_cond(&value, &var.as_tensor().detach())?)?;
        }
        Ok(())
    }
}

impl<'a> Params<'a> {
    /// Wraps weights for one forward call: `vars[i]` is the weight described by `specs[i]`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// let p = Params::new(&[], &[], Mode::Eval, 0);
    /// assert_eq!(p.len(), 0);
    /// ```
    pub fn new(specs: &'a [ParamSpec], vars: &'a [Var], mode: Mode, seed: u64) -> Self {
        Self {
            specs,
            vars,
            mode,
            seed,
            compute_dtype: None,
            trainable: true,
            state_updates: None,
        }
    }

    /// Marks the layer frozen (`false`): [`Params::get`] hands out detached weights and
    /// [`Params::updates_state`] is `false`, so a frozen BatchNorm runs in inference mode even
    /// in a training step (Keras 3's rule).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// let p = Params::new(&[], &[], Mode::Train, 0).with_trainable(false);
    /// assert!(!p.trainable() && !p.updates_state());
    /// ```
    pub fn with_trainable(mut self, trainable: bool) -> Self {
        self.trainable = trainable;
        self
    }

    /// Holds state updates back in `updates` instead of writing them at once (see
    /// [`StateUpdates`]).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params, StateUpdates};
    /// let updates = StateUpdates::default();
    /// let p = Params::new(&[], &[], Mode::Train, 0).with_state_updates(Some(&updates));
    /// assert!(p.updates_state());
    /// ```
    pub fn with_state_updates(mut self, updates: Option<&'a StateUpdates>) -> Self {
        self.state_updates = updates;
        self
    }

    /// Whether the layer is trainable (not frozen).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// assert!(Params::new(&[], &[], Mode::Train, 0).trainable());
    /// ```
    pub fn trainable(&self) -> bool {
        self.trainable
    }

    /// Whether the layer should use and update batch statistics: training mode, and not
    /// frozen.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// assert!(!Params::new(&[], &[], Mode::Eval, 0).updates_state());
    /// ```
    pub fn updates_state(&self) -> bool {
        self.mode.is_train() && self.trainable
    }

    /// The current value of the state weight `name` (detached), counting an update already
    /// held back in this pass (a layer called twice builds on its first update).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_functional::{Initializer, Mode, ParamSpec, Params};
    /// let specs = [ParamSpec::new("moving_mean", vec![2], Initializer::Zeros).non_trainable()];
    /// let vars = [Var::zeros(2, DType::F32, &Device::Cpu)?];
    /// let p = Params::new(&specs, &vars, Mode::Train, 0);
    /// assert_eq!(p.state("moving_mean")?.to_vec1::<f32>()?, [0.0, 0.0]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn state(&self, name: &str) -> Result<Tensor> {
        let var = self.var(name)?;
        Ok(self
            .state_updates
            .and_then(|u| u.pending(var))
            .unwrap_or_else(|| var.as_tensor().detach()))
    }

    /// Sets the state weight `name` to `value`: at once, or held back when the pass collects
    /// [`StateUpdates`].
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use candle_functional::{Initializer, Mode, ParamSpec, Params};
    /// let specs = [ParamSpec::new("moving_mean", vec![2], Initializer::Zeros).non_trainable()];
    /// let vars = [Var::zeros(2, DType::F32, &Device::Cpu)?];
    /// let p = Params::new(&specs, &vars, Mode::Train, 0);
    /// p.set_state("moving_mean", Tensor::ones(2, DType::F32, &Device::Cpu)?)?;
    /// assert_eq!(vars[0].to_vec1::<f32>()?, [1.0, 1.0]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn set_state(&self, name: &str, value: Tensor) -> Result<()> {
        let var = self.var(name)?;
        let value = value.detach().cast(var.dtype())?;
        if value.dims() != var.dims() {
            return Err(Error::ShapeMismatch {
                layer: String::new(),
                what: format!("new value of state `{name}`"),
                expected: var.dims().to_vec(),
                got: value.dims().to_vec(),
            });
        }
        match self.state_updates {
            Some(updates) => updates.push(var, value),
            None => var.set(&value)?,
        }
        Ok(())
    }

    /// Mixed precision: [`Params::get`] hands out the weights cast to `dtype` (the cast is
    /// differentiable, so gradients reach the full-precision variables).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_functional::{Initializer, Mode, ParamSpec, Params};
    /// let specs = [ParamSpec::new("bias", vec![3], Initializer::Zeros)];
    /// let vars = [Var::zeros(3, DType::F32, &Device::Cpu)?];
    /// let p = Params::new(&specs, &vars, Mode::Train, 0).with_compute_dtype(Some(DType::F16));
    /// assert_eq!(p.get("bias")?.dtype(), DType::F16);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn with_compute_dtype(mut self, dtype: Option<DType>) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// The weight named `name` as a tensor, in the compute dtype: tracked for autograd in
    /// training, detached in eval and when the layer is frozen.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_functional::{Initializer, Mode, ParamSpec, Params};
    /// let specs = [ParamSpec::new("bias", vec![3], Initializer::Zeros)];
    /// let vars = [Var::zeros(3, DType::F32, &Device::Cpu)?];
    /// let p = Params::new(&specs, &vars, Mode::Eval, 0);
    /// assert_eq!(p.get("bias")?.dims(), &[3]);
    /// assert!(p.get("kernel").unwrap_err().to_string().contains("bias"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let var = self.var(name)?;
        self.get_as(name, self.compute_dtype.unwrap_or(var.dtype()))
    }

    /// The weight named `name` in the dtype it is stored in, whatever the compute dtype (the
    /// f32 master copy under mixed precision: BatchNorm keeps its statistics in f32).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_functional::{Initializer, Mode, ParamSpec, Params};
    /// let specs = [ParamSpec::new("gamma", vec![3], Initializer::Ones)];
    /// let vars = [Var::ones(3, DType::F32, &Device::Cpu)?];
    /// let p = Params::new(&specs, &vars, Mode::Eval, 0).with_compute_dtype(Some(DType::BF16));
    /// assert_eq!(p.get_stored("gamma")?.dtype(), DType::F32);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn get_stored(&self, name: &str) -> Result<Tensor> {
        let var = self.var(name)?;
        self.get_as(name, var.dtype())
    }

    /// The weight named `name` cast to `dtype`.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_functional::{Initializer, Mode, ParamSpec, Params};
    /// let specs = [ParamSpec::new("bias", vec![3], Initializer::Zeros)];
    /// let vars = [Var::zeros(3, DType::F32, &Device::Cpu)?];
    /// let p = Params::new(&specs, &vars, Mode::Eval, 0);
    /// assert_eq!(p.get_as("bias", DType::F64)?.dtype(), DType::F64);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn get_as(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let var = self.var(name)?;
        let t = if self.mode.is_train() && self.trainable {
            var.as_tensor().clone()
        } else {
            var.as_tensor().detach()
        };
        Ok(if t.dtype() == dtype {
            t
        } else {
            t.cast(dtype)?
        })
    }

    /// `true` when the layer has a weight named `name` (optional weights: a bias, BatchNorm's
    /// `gamma` and `beta`).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// assert!(!Params::new(&[], &[], Mode::Eval, 0).contains("bias"));
    /// ```
    pub fn contains(&self, name: &str) -> bool {
        self.specs.iter().any(|s| s.name() == name)
    }

    /// The weight named `name` as a variable, for in-place state updates (moving statistics).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// assert!(Params::new(&[], &[], Mode::Eval, 0).var("moving_mean").is_err());
    /// ```
    pub fn var(&self, name: &str) -> Result<&'a Var> {
        self.specs
            .iter()
            .position(|s| s.name() == name)
            .and_then(|i| self.vars.get(i))
            .ok_or_else(|| {
                let names: Vec<&str> = self.specs.iter().map(ParamSpec::name).collect();
                Error::InvalidArgument(format!(
                    "the layer has no weight named `{name}` (its weights: [{}])",
                    names.join(", ")
                ))
            })
    }

    /// The forward mode.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// assert_eq!(Params::new(&[], &[], Mode::Train, 0).mode(), Mode::Train);
    /// ```
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The dtype layers compute in under mixed precision (`None`: the weights' own).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// assert_eq!(Params::new(&[], &[], Mode::Eval, 0).compute_dtype(), None);
    /// ```
    pub fn compute_dtype(&self) -> Option<DType> {
        self.compute_dtype
    }

    /// A seed unique to this node and this forward call, for random layers (Dropout). Derived
    /// from the model's seed and a call counter, so runs are reproducible and resumable.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// assert_eq!(Params::new(&[], &[], Mode::Train, 42).seed(), 42);
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of weights.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// assert_eq!(Params::new(&[], &[], Mode::Train, 0).len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// `true` when the layer has no weights.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// assert!(Params::new(&[], &[], Mode::Train, 0).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}

/// The behaviour of a kind of layer: its shape rule, its weights and its forward pass.
///
/// Every built-in layer's config implements it; implement it for your own config struct and
/// wrap it in [`Configured`] to get a custom layer that takes part in graphs, summaries and
/// weight files like the built-in ones. Shapes are per sample: the batch dimension is left out.
///
/// # Examples
/// ```
/// use candle_core::Tensor;
/// use candle_functional::prelude::*;
/// use candle_functional::{Configured, LayerOp, Params};
///
/// /// Multiplies its input by two.
/// #[derive(Clone, Debug, Default)]
/// struct Double;
/// impl LayerOp for Double {
///     fn type_name(&self) -> &'static str { "Double" }
///     fn output_shapes(&self, _layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
///         Ok(vec![inputs[0].clone()])
///     }
///     fn forward(&self, inputs: &[Tensor], _p: &Params) -> Result<Vec<Tensor>> {
///         Ok(vec![(&inputs[0] * 2.0)?])
///     }
/// }
/// let x = Input::new([4]);
/// let y = Configured::from_config(Double).call(&x)?;
/// assert_eq!(y.shape(), &[4]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub trait LayerOp: fmt::Debug + Send + Sync + 'static {
    /// The class name shown in summaries (`Conv2D`).
    fn type_name(&self) -> &'static str;

    /// The prefix of generated layer names (`conv2d`, `conv2d_1`, ...). Defaults to the type
    /// name in snake case, as Keras does.
    fn base_name(&self) -> String {
        snake_case(self.type_name())
    }

    /// The layer's settings as JSON, for saving a model's architecture
    /// ([`Model::to_json`](crate::Model::to_json), [`Model::save`](crate::Model::save)).
    /// Built-in layers return their config struct (serde); a custom layer that should be
    /// saved returns its own and is registered by [`type_name`](Self::type_name) in a
    /// [`LayerRegistry`](crate::LayerRegistry) to be loaded. `None` (the default)
    /// means the layer cannot be saved: saving a model that holds it fails, naming it.
    fn to_config(&self) -> Option<serde_json::Value> {
        None
    }

    /// Checks the inputs' per-sample shapes and returns the outputs'. `layer` is the name to
    /// put in errors.
    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>>;

    /// The weights the layer needs for these input shapes; `forward` reaches them by name
    /// ([`Params::get`]). Names must be unique within the layer (checked at its first call).
    fn param_specs(&self, _inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        Vec::new()
    }

    /// Computes the outputs from concrete inputs (batch dimension first).
    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>>;

    /// The op as `Any`, for code that looks inside a particular op type (drawing a nested
    /// model's graph expanded). `None` (the default) for ops nobody needs to look into.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// The layers inside this one (a nested model's layers). A layer with sublayers holds no
    /// weights of its own: building, listing, counting and saving weights walk into its
    /// sublayers instead, naming them `<this layer>.<sublayer>`.
    fn sublayers(&self) -> &[LayerRef] {
        &[]
    }

    /// The element-wise function this layer is, when it is nothing more (a plain `ReLU` is
    /// [`Prologue::Relu`], `Add` is [`Prologue::Add`] when called on two tensors). When the
    /// layer's output has one reader, and that layer [`accepts_prologue`](Self::accepts_prologue),
    /// a model's plan leaves this layer out and has the reader apply the function inside its
    /// own kernel. `None` (the default): never.
    fn as_prologue(&self) -> Option<Prologue> {
        None
    }

    /// `true` when [`forward_fused`](Self::forward_fused) can apply `prologue` in place of
    /// this layer's one input. `false` (the default) for every prologue.
    fn accepts_prologue(&self, _prologue: Prologue) -> bool {
        false
    }

    /// `true` when [`forward_fused`](Self::forward_fused) can apply the one-input function
    /// `epilogue` to this layer's one output (a ReLU after a BatchNorm): the plan then leaves
    /// out the element-wise layer that is this layer's output's only reader. `false` (the
    /// default) for every function.
    fn accepts_epilogue(&self, _epilogue: Prologue) -> bool {
        false
    }

    /// [`forward`](Self::forward) with `prologue` applied to `inputs` first (its
    /// [`arity`](Prologue::arity) of them) and `epilogue` to the output after, the same values
    /// and gradients as running the layers one after the other. Called only where
    /// [`accepts_prologue`](Self::accepts_prologue) and
    /// [`accepts_epilogue`](Self::accepts_epilogue) say so; the default is an error.
    fn forward_fused(
        &self,
        prologue: Option<Prologue>,
        epilogue: Option<Prologue>,
        _inputs: &[Tensor],
        _params: &Params,
    ) -> Result<Vec<Tensor>> {
        Err(Error::InvalidArgument(format!(
            "{} does not fuse {prologue:?} before it or {epilogue:?} after it",
            self.type_name()
        )))
    }
}

/// An element-wise function that a layer can apply inside its own kernel, to its input (a
/// prologue) or to its output (an epilogue), in place of the separate layer that computes it
/// ([`LayerOp::as_prologue`]): one pass over memory fewer each way, and the intermediate
/// tensor is never kept for the backward pass.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// use candle_functional::{LayerOp, Prologue};
/// assert_eq!(ReLU::new().config().as_prologue(), Some(Prologue::Relu));
/// assert!(BatchNorm::new().config().accepts_prologue(Prologue::Relu));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Prologue {
    /// `max(x, 0)` of one input, with no gradient where `x ≤ 0`.
    Relu,
    /// `a + b` of two inputs of one shape.
    Add,
    /// `max(a + b, 0)` of two inputs: an Add read only by a ReLU.
    AddRelu,
}

impl Prologue {
    /// How many inputs the function takes.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::Prologue;
    /// assert_eq!((Prologue::Relu.arity(), Prologue::AddRelu.arity()), (1, 2));
    /// ```
    pub fn arity(self) -> usize {
        match self {
            Prologue::Relu => 1,
            Prologue::Add | Prologue::AddRelu => 2,
        }
    }

    /// `self` applied first, then `next` (`None`: nothing), as one prologue where one exists:
    /// an Add then a ReLU is [`Prologue::AddRelu`].
    ///
    /// # Examples
    /// ```
    /// use candle_functional::Prologue;
    /// assert_eq!(Prologue::Add.then(Some(Prologue::Relu)), Some(Prologue::AddRelu));
    /// assert_eq!(Prologue::Relu.then(Some(Prologue::Add)), None);
    /// ```
    pub fn then(self, next: Option<Prologue>) -> Option<Prologue> {
        match (self, next) {
            (first, None) => Some(first),
            // A ReLU of a ReLU is the ReLU.
            (Prologue::Relu, Some(Prologue::Relu)) => Some(Prologue::Relu),
            (Prologue::Add, Some(Prologue::Relu)) => Some(Prologue::AddRelu),
            _ => None,
        }
    }
}

/// `Conv2D` -> `conv2d`, `GlobalAveragePooling2D` -> `global_average_pooling2d`,
/// `ReLU` -> `re_lu` (Keras's own rule, kept so names match Keras's).
pub(crate) fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            // Keras: "(.)([A-Z][a-z]+)" -> "\1_\2", then "([a-z])([A-Z])" -> "\1_\2".
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            let prev_lower = i > 0 && chars[i - 1].is_lowercase();
            if i > 0 && (next_lower || prev_lower) {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Every layer that can hold weights, reached through the sublayers of nested models, each
/// once (a layer reached twice keeps its first name), with its full name: `<layer>` at the top,
/// `<model>.<layer>` inside a nested model. The one walk behind building, listing, counting
/// and saving weights.
pub(crate) fn weight_holders(layers: &[LayerRef]) -> Vec<(String, LayerRef)> {
    fn walk(
        layers: &[LayerRef],
        prefix: &str,
        seen: &mut HashSet<u64>,
        out: &mut Vec<(String, LayerRef)>,
    ) {
        for layer in layers {
            let name = format!("{prefix}{}", layer.display_name());
            let inner = layer.op().sublayers();
            if !inner.is_empty() {
                walk(inner, &format!("{name}."), seen, out);
            } else if seen.insert(layer.id()) {
                out.push((name, layer.clone()));
            }
        }
    }
    let mut out = Vec::new();
    walk(layers, "", &mut HashSet::new(), &mut out);
    out
}

/// Checks `given` against the weights `expected` (name, current value): every one given, with
/// its shape, a float tensor for a float weight, and no other name. Changes nothing; the error
/// lists every problem, naming `source`. The one check behind every strict weight load.
pub(crate) fn check_named_weights<'a>(
    expected: impl Iterator<Item = (&'a str, &'a Tensor)>,
    given: &std::collections::HashMap<String, Tensor>,
    source: &str,
) -> Result<()> {
    check_named_shapes(
        expected.map(|(name, t)| (name.to_string(), t.dims().to_vec(), t.dtype().is_float())),
        given,
        source,
    )
}

/// Whether a float weight can take values stored as `dtype`: the float dtypes candle
/// converts from (not integers, and not the packed F4, F6 and F8_E8M0 formats, which candle
/// reads but cannot convert).
pub(crate) fn loadable_float(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::F8E4M3
    )
}

/// [`check_named_weights`] against shapes alone: `(name, shape, is a float weight)`, for
/// checking a file against a model that is not built yet (nothing allocated for a file that
/// does not fit).
pub(crate) fn check_named_shapes(
    expected: impl Iterator<Item = (String, Vec<usize>, bool)>,
    given: &std::collections::HashMap<String, Tensor>,
    source: &str,
) -> Result<()> {
    let (mut missing, mut mis_shaped, mut mis_typed) = (Vec::new(), Vec::new(), Vec::new());
    let mut known = HashSet::new();
    for (name, shape, is_float) in expected {
        match given.get(&name) {
            None => missing.push(name.clone()),
            Some(t) if t.dims() != shape.as_slice() => {
                mis_shaped.push((name.clone(), shape, t.dims().to_vec()))
            }
            // An integer tensor would be cast silently (an I64 bias of 4.3e18), and the
            // packed 4- and 6-bit formats cannot be converted at all.
            Some(t) if is_float && !loadable_float(t.dtype()) => {
                mis_typed.push((name.clone(), format!("{:?}", t.dtype())))
            }
            Some(_) => {}
        }
        known.insert(name);
    }
    let mut unexpected: Vec<String> = given
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    unexpected.sort();
    if missing.is_empty() && unexpected.is_empty() && mis_shaped.is_empty() && mis_typed.is_empty()
    {
        return Ok(());
    }
    Err(Error::WeightsMismatch {
        source_name: source.into(),
        missing,
        unexpected,
        mis_shaped,
        mis_typed,
    })
}

/// Weights of a built layer, in `param_specs` order.
#[derive(Clone, Debug)]
pub(crate) struct LayerWeights {
    pub(crate) vars: Vec<Var>,
    pub(crate) specs: Vec<ParamSpec>,
}

#[derive(Debug)]
pub(crate) struct LayerCell {
    id: u64,
    op: Arc<dyn LayerOp>,
    name: OnceLock<String>,
    /// Input shapes of the first call: they fix the weights' shapes.
    first_inputs: OnceLock<Vec<Vec<usize>>>,
    weights: RwLock<Option<LayerWeights>>,
    /// `false` once frozen: its weights are not trained, its BatchNorm runs in inference mode.
    trainable: AtomicBool,
}

/// The identity of one layer in a graph: its behaviour, its name and its weights. Nodes that
/// share a `LayerRef` share weights.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let dense = Dense::new(3);
/// let a = Input::new([4]);
/// let b = Input::new([4]);
/// let ya = dense.call(&a)?;
/// let yb = dense.call(&b)?;
/// assert!(ya.layer().same_layer(&yb.layer()));
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LayerRef(Arc<LayerCell>);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A process-wide increasing counter: layer identities and node creation order.
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl LayerRef {
    pub(crate) fn new(op: Arc<dyn LayerOp>, name: Option<String>) -> Self {
        let cell = LayerCell {
            id: next_id(),
            op,
            name: OnceLock::new(),
            first_inputs: OnceLock::new(),
            weights: RwLock::new(None),
            trainable: AtomicBool::new(true),
        };
        if let Some(name) = name {
            let _ = cell.name.set(name);
        }
        Self(Arc::new(cell))
    }

    /// `true` when both refer to the same layer (and so to the same weights).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([2]);
    /// let a = ReLU::new().call(&x)?;
    /// let b = ReLU::new().call(&x)?;
    /// assert!(!a.layer().same_layer(&b.layer()));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn same_layer(&self, other: &LayerRef) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether the layer is trained (Keras's `layer.trainable`). A frozen layer's weights are
    /// left out of [`Model::trainable_vars`](crate::Model::trainable_vars), counted as
    /// non-trainable, still saved and loaded; a frozen BatchNorm runs in inference mode even
    /// in a training step.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = Dense::new(3).call(&Input::new([4]))?;
    /// assert!(y.layer().trainable());
    /// y.layer().set_trainable(false);
    /// assert!(!y.layer().trainable());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn trainable(&self) -> bool {
        self.0.trainable.load(Ordering::Relaxed)
    }

    /// Freezes (`false`) or unfreezes the layer; for a nested model, every layer inside it too,
    /// as Keras does.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// model.set_trainable(false);
    /// assert_eq!(model.count_params().trainable, 0);
    /// model.set_trainable(true);
    /// assert_eq!(model.count_params().trainable, 10);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn set_trainable(&self, trainable: bool) {
        self.0.trainable.store(trainable, Ordering::Relaxed);
        for (_, inner) in weight_holders(self.op().sublayers()) {
            inner.0.trainable.store(trainable, Ordering::Relaxed);
        }
    }

    pub(crate) fn id(&self) -> u64 {
        self.0.id
    }

    /// The layer's behaviour.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = Dense::new(3).call(&Input::new([4]))?;
    /// assert_eq!(y.layer().op().type_name(), "Dense");
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn op(&self) -> &dyn LayerOp {
        self.0.op.as_ref()
    }

    /// The layer's name once it has one: given by the user, or assigned by the first
    /// [`Model`](crate::Model) that contains it.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = Dense::new(3).name("head").call(&Input::new([4]))?;
    /// assert_eq!(y.layer().name(), Some("head"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn name(&self) -> Option<&str> {
        self.0.name.get().map(String::as_str)
    }

    /// The name, or the base name (`conv2d`) while it has none yet: for error messages.
    pub(crate) fn display_name(&self) -> String {
        self.name()
            .map(str::to_string)
            .unwrap_or_else(|| self.0.op.base_name())
    }

    /// Gives the layer its name if it has none yet; returns the name it ends up with.
    pub(crate) fn assign_name(&self, name: String) -> &str {
        self.0.name.get_or_init(|| name)
    }

    /// The weights' specs for the shapes of the first call (empty before any call).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = Dense::new(3).call(&Input::new([4]))?;
    /// let specs = y.layer().param_specs();
    /// assert_eq!(specs[0].shape(), &[4, 3]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        match self.0.first_inputs.get() {
            Some(shapes) => self.0.op.param_specs(shapes),
            None => Vec::new(),
        }
    }

    /// Checks a new call's input shapes against the first call's, since the weights are
    /// shared; on the first call, checks that the weights' names are unique (layers reach
    /// them by name) and records the shapes.
    pub(crate) fn check_call_shapes(&self, shapes: &[Vec<usize>]) -> Result<()> {
        let Some(first) = self.0.first_inputs.get() else {
            let specs = self.0.op.param_specs(shapes);
            for (i, spec) in specs.iter().enumerate() {
                if spec.name().is_empty() || specs[..i].iter().any(|s| s.name() == spec.name()) {
                    return Err(Error::InvalidConfig {
                        layer: self.display_name(),
                        message: format!(
                            "weight names must be unique and non-empty, got {:?}",
                            specs.iter().map(ParamSpec::name).collect::<Vec<_>>()
                        ),
                    });
                }
            }
            let _ = self.0.first_inputs.set(shapes.to_vec());
            return Ok(());
        };
        if first == shapes {
            return Ok(());
        }
        let before = self.0.op.param_specs(first);
        let now = self.0.op.param_specs(shapes);
        for (b, n) in before.iter().zip(&now) {
            if b.shape() != n.shape() {
                return Err(Error::ShapeMismatch {
                    layer: self.display_name(),
                    what: format!(
                        "shared layer called on inputs {shapes:?} that change its `{}` (first call had {first:?})",
                        b.name()
                    ),
                    expected: b.shape().to_vec(),
                    got: n.shape().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// The layer's weights by their short names (`kernel`, `bias`, ...), sharing storage with
    /// the layer (Keras's `layer.get_weights()`, named).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).call(&x)?;
    /// Model::new(&[x], &[y.clone()])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let w = y.layer().get_weights()?;
    /// assert_eq!(w[0].0, "kernel");
    /// assert_eq!(w[1].1.dims(), &[2]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn get_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let Some(weights) = self.weights() else {
            if self.param_specs().is_empty() {
                return Ok(Vec::new());
            }
            return Err(Error::NotBuilt {
                model: self.display_name(),
            });
        };
        Ok(weights
            .specs
            .iter()
            .zip(&weights.vars)
            .map(|(s, v)| (s.name().to_string(), v.as_tensor().clone()))
            .collect())
    }

    /// Sets every weight of the layer from values named by their short names. Strict, like
    /// [`Model::set_weights`](crate::Model::set_weights): nothing changes unless every weight
    /// is given with its shape and no unknown name is.
    ///
    /// # Examples
    /// ```
    /// use std::collections::HashMap;
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([1]);
    /// let y = Dense::new(1).call(&x)?;
    /// Model::new(&[x], &[y.clone()])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let values = HashMap::from([
    ///     ("kernel".to_string(), Tensor::new(&[[2f32]], &Device::Cpu)?),
    ///     ("bias".to_string(), Tensor::new(&[1f32], &Device::Cpu)?),
    /// ]);
    /// y.layer().set_weights(&values)?;
    /// assert_eq!(y.layer().get_weights()?[0].1.to_vec2::<f32>()?, [[2.0]]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn set_weights(&self, values: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let weights = self.get_weights()?;
        check_named_weights(
            weights.iter().map(|(n, t)| (n.as_str(), t)),
            values,
            &format!("for layer `{}`", self.display_name()),
        )?;
        let vars = self.weights().map(|w| w.vars).unwrap_or_default();
        // All converted before any is set: a failure leaves the layer as it was.
        let converted = weights
            .iter()
            .zip(&vars)
            .map(|((name, _), var)| {
                Ok(values[name]
                    .to_device(var.device())?
                    .cast(var.dtype())?
                    .copy()?)
            })
            .collect::<Result<Vec<_>>>()?;
        for (var, value) in vars.iter().zip(converted) {
            var.set(&value)?;
        }
        Ok(())
    }

    /// A snapshot of the weights (cheap: `Var`s share storage), `None` before `build`.
    pub(crate) fn weights(&self) -> Option<LayerWeights> {
        self.0
            .weights
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Creates the weights if the layer has none; checks device and dtype otherwise.
    pub(crate) fn build(
        &self,
        device: &Device,
        dtype: DType,
        seed: u64,
        rng_key: &str,
    ) -> Result<()> {
        let mut guard = self.0.weights.write().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = guard.as_ref() {
            if let Some(v) = existing.vars.first()
                && (!v.device().same_device(device) || v.dtype() != dtype)
            {
                return Err(Error::DeviceMismatch {
                    layer: self.display_name(),
                    existing: format!("{:?}/{:?}", v.device().location(), v.dtype()),
                    requested: format!("{:?}/{dtype:?}", device.location()),
                });
            }
            return Ok(());
        }
        let specs = self.param_specs();
        // A configuration can ask for any shape (a kernel size near `usize::MAX` from a JSON
        // file); refuse what cannot be allocated before the initializer tries to.
        for spec in &specs {
            // Initial values are drawn in f32 or f64 before the cast to `dtype`.
            let value_bytes = dtype.size_in_bytes().max(8);
            if let Some(why) = sizes::unallocatable(spec.shape(), value_bytes, device.is_cpu()) {
                return Err(Error::InvalidConfig {
                    layer: self.display_name(),
                    message: format!("parameter `{}`: {why}", spec.name()),
                });
            }
        }
        let mut rng = layer_rng(seed, rng_key);
        let vars = specs
            .iter()
            .map(|spec| {
                let t = spec.initializer().sample(spec, &mut rng, device)?;
                Ok(Var::from_tensor(&t.cast(dtype)?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        *guard = Some(LayerWeights { vars, specs });
        Ok(())
    }

    /// Runs the layer on concrete tensors.
    pub(crate) fn forward(
        &self,
        inputs: &[Tensor],
        pass: Pass,
        (prologue, epilogue): (Option<Prologue>, Option<Prologue>),
    ) -> Result<Vec<Tensor>> {
        let guard = self.0.weights.read().unwrap_or_else(|e| e.into_inner());
        let (specs, vars): (&[ParamSpec], &[Var]) = match guard.as_ref() {
            Some(w) => (&w.specs, &w.vars),
            None if self.param_specs().is_empty() => (&[], &[]),
            None => {
                return Err(Error::NotBuilt {
                    model: self.display_name(),
                });
            }
        };
        let params = Params::new(specs, vars, pass.mode, pass.seed)
            .with_compute_dtype(pass.compute_dtype)
            .with_trainable(self.trainable())
            .with_state_updates(pass.state_updates);
        match (prologue, epilogue) {
            (None, None) => self.0.op.forward(inputs, &params),
            _ => self.0.op.forward_fused(prologue, epilogue, inputs, &params),
        }
    }
}

/// A layer value: a config that implements [`LayerOp`], an optional name, and the identity it
/// takes on its first call. The built-in layers are aliases of it (`Conv2D` is
/// `Configured<Conv2DConfig>`), and a custom [`LayerOp`] becomes a layer the same way.
///
/// Clones share the identity (and so the weights); builder methods make a new layer.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let shared = Dense::new(8).name("shared");
/// let a = shared.call(&Input::new([4]))?;
/// let b = shared.clone().call(&Input::new([4]))?;
/// assert!(a.layer().same_layer(&b.layer()));
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Configured<C> {
    config: C,
    name: Option<String>,
    identity: Arc<OnceLock<LayerRef>>,
}

impl<C: LayerOp + Clone> Configured<C> {
    /// A layer from a config.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{layers::DenseConfig, Configured};
    /// let dense = Configured::from_config(DenseConfig { units: 4, ..Default::default() });
    /// assert_eq!(dense.config().units, 4);
    /// ```
    pub fn from_config(config: C) -> Self {
        Self {
            config,
            name: None,
            identity: Arc::default(),
        }
    }

    /// The layer's config.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Conv2D::new(16, 3).config().filters, 16);
    /// ```
    pub fn config(&self) -> &C {
        &self.config
    }

    /// Gives the layer a name (unique within a model). Without one, the model names it
    /// Keras's way: `conv2d`, `conv2d_1`, ... in creation order.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = ReLU::new().name("act").call(&Input::new([3]))?;
    /// assert_eq!(y.layer().name(), Some("act"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self.identity = Arc::default();
        self
    }

    /// Changes the config; the result is a new layer (new weights).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let conv = Conv2D::new(8, 3).with_config(|c| c.use_bias = false);
    /// assert!(!conv.config().use_bias);
    /// ```
    pub fn with_config(mut self, change: impl FnOnce(&mut C)) -> Self {
        change(&mut self.config);
        self.identity = Arc::default();
        self
    }
}

impl<C: LayerOp + Clone> Layer for Configured<C> {
    fn layer_ref(&self) -> LayerRef {
        self.identity
            .get_or_init(|| LayerRef::new(Arc::new(self.config.clone()), self.name.clone()))
            .clone()
    }
}

/// Turns any layer config, built-in or your own, into a layer: `config.into_layer()` is
/// [`Configured::from_config`], ready for `.name(..)`, `.with_config(..)` and `.call(..)`. A
/// custom layer writes its builder methods on its own config struct (a type of its crate)
/// and ends the chain with `into_layer()`, or calls it right away with `call`.
///
/// # Examples
/// ```
/// use candle_core::Tensor;
/// use candle_functional::prelude::*;
/// use candle_functional::{IntoLayer, LayerOp, Params};
///
/// #[derive(Clone, Debug, Default)]
/// struct ScaleConfig { factor: f64 }
///
/// impl ScaleConfig {
///     fn new() -> Self { Self { factor: 1.0 } }
///     fn factor(mut self, factor: f64) -> Self { self.factor = factor; self }
/// }
///
/// impl LayerOp for ScaleConfig {
///     fn type_name(&self) -> &'static str { "Scale" }
///     fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
///         Ok(vec![candle_functional::layers::one_input(layer, inputs)?.to_vec()])
///     }
///     fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
///         Ok(vec![(&inputs[0] * self.factor)?])
///     }
/// }
///
/// let y = ScaleConfig::new().factor(2.0).into_layer().name("double").call(&Input::new([4]))?;
/// assert_eq!(y.layer().name(), Some("double"));
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub trait IntoLayer: LayerOp + Clone + Sized {
    /// The layer of this config.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::DenseConfig;
    /// use candle_functional::IntoLayer;
    /// let dense = DenseConfig { units: 3, ..Default::default() }.into_layer();
    /// assert_eq!(dense.config().units, 3);
    /// ```
    fn into_layer(self) -> Configured<Self> {
        Configured::from_config(self)
    }
}

impl<C: LayerOp + Clone> IntoLayer for C {}

/// Something that can be called on symbolic tensors: every layer, and a [`Model`](crate::Model).
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let x = Input::new([3, 8, 8]);
/// let y = Conv2D::new(4, 3).padding(Padding::Same).call(&x)?;
/// let z = Add::new().call_many(&[y.clone(), y])?;
/// assert_eq!(z.shape(), &[4, 8, 8]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub trait Layer {
    /// The identity the calls record (created on first use).
    fn layer_ref(&self) -> LayerRef;

    /// Calls the layer on one symbolic tensor.
    fn call(&self, input: &SymbolicTensor) -> Result<SymbolicTensor> {
        self.call_many(std::slice::from_ref(input))
    }

    /// Calls the layer on several symbolic tensors (merge layers), returning its one output.
    fn call_many(&self, inputs: &[SymbolicTensor]) -> Result<SymbolicTensor> {
        let layer = self.layer_ref();
        let mut outputs = record_call(&layer, inputs)?;
        if outputs.len() != 1 {
            return Err(Error::InvalidInput {
                layer: layer.display_name(),
                message: format!(
                    "has {} outputs: use `call_multi` to get all of them",
                    outputs.len()
                ),
            });
        }
        Ok(outputs.remove(0))
    }

    /// Calls the layer and returns all its outputs (a nested model with several outputs).
    fn call_multi(&self, inputs: &[SymbolicTensor]) -> Result<Vec<SymbolicTensor>> {
        record_call(&self.layer_ref(), inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::snake_case;

    #[test]
    fn snake_case_follows_keras() {
        assert_eq!(snake_case("Conv2D"), "conv2d");
        assert_eq!(snake_case("ReLU"), "re_lu");
        assert_eq!(snake_case("BatchNormalization"), "batch_normalization");
        assert_eq!(
            snake_case("GlobalAveragePooling2D"),
            "global_average_pooling2d"
        );
        assert_eq!(snake_case("ZeroPadding2D"), "zero_padding2d");
        assert_eq!(snake_case("Dense"), "dense");
    }
}

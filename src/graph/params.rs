//! What a layer's forward pass runs with: the [`Mode`], its weights by name ([`Params`]), and
//! the state updates held back until a step succeeds ([`StateUpdates`]).

use candle_core::{DType, Tensor, Var};

use crate::graph::init::ParamSpec;
use crate::support::dtype::Cast;
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

/// What a layer's forward pass is given besides its inputs: its weights, reached by the names
/// of its [`LayerOp::param_specs`](crate::LayerOp::param_specs), the mode, and a seed for random layers.
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
    /// The plan's own backward pass computes this layer's gradients (`train/tape.rs`):
    /// weights are handed out detached, so that the forward pass builds no autograd graph.
    detached: bool,
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
#[derive(Default)]
pub struct StateUpdates {
    updates: std::sync::Mutex<Vec<(Var, Tensor)>>,
    /// In a data-parallel step: the sum across replicas that synchronized layers use.
    replicas: Option<std::sync::Arc<dyn ReplicaSum>>,
}

impl std::fmt::Debug for StateUpdates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateUpdates")
            .field("updates", &self.len())
            .field("replicas", &self.replicas.as_ref().map(|r| r.replicas()))
            .finish()
    }
}

/// A differentiable sum across the replicas of a data-parallel training step: what a
/// synchronized layer (`BatchNorm::synchronized`) uses to compute its batch statistics over
/// the whole global batch. The forward pass sums every replica's tensor; the backward pass
/// sums the gradients flowing back, so each replica's inputs get the gradient of the whole
/// batch's loss. Every replica must call it in the same order with tensors of the same shape.
/// The trainer provides it (`Trainer::distributed`); a custom layer can use it through
/// [`Params::replica_sum`].
pub trait ReplicaSum: Send + Sync {
    /// `local`'s element-wise sum over every replica (f32; a replica with no samples in this
    /// step adds zeros).
    fn sum(&self, local: &Tensor) -> Result<Tensor>;

    /// The number of replicas.
    fn replicas(&self) -> usize;
}

impl StateUpdates {
    /// Held-back updates for a data-parallel step whose synchronized layers sum their
    /// statistics with `replicas`.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::Tensor;
    /// use candle_functional::{ReplicaSum, Result, StateUpdates};
    /// struct One;
    /// impl ReplicaSum for One {
    ///     fn sum(&self, local: &Tensor) -> Result<Tensor> { Ok(local.clone()) }
    ///     fn replicas(&self) -> usize { 1 }
    /// }
    /// assert!(StateUpdates::across_replicas(Arc::new(One)).replica_sum().is_some());
    /// ```
    pub fn across_replicas(replicas: std::sync::Arc<dyn ReplicaSum>) -> Self {
        Self {
            updates: Default::default(),
            replicas: Some(replicas),
        }
    }

    /// The sum across replicas of a data-parallel step, if this is one.
    ///
    /// # Examples
    /// ```
    /// assert!(candle_functional::StateUpdates::default().replica_sum().is_none());
    /// ```
    pub fn replica_sum(&self) -> Option<&dyn ReplicaSum> {
        self.replicas.as_deref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Var, Tensor)>> {
        self.updates.lock().unwrap_or_else(|e| e.into_inner())
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
        let updates = self.updates.into_inner().unwrap_or_else(|e| e.into_inner());
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
        let updates = self.updates.into_inner().unwrap_or_else(|e| e.into_inner());
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
        let updates = self.updates.into_inner().unwrap_or_else(|e| e.into_inner());
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
            detached: false,
        }
    }

    /// Hands out every weight detached (the plan's own backward pass computes the layer's
    /// gradients itself).
    pub(crate) fn with_detached(mut self, detached: bool) -> Self {
        self.detached = detached;
        self
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

    /// In a data-parallel training step, the differentiable sum across replicas that
    /// synchronized layers compute their statistics with; `None` elsewhere.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Mode, Params};
    /// assert!(Params::new(&[], &[], Mode::Train, 0).replica_sum().is_none());
    /// ```
    pub fn replica_sum(&self) -> Option<&dyn ReplicaSum> {
        self.state_updates.and_then(StateUpdates::replica_sum)
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
        let t = if self.mode.is_train() && self.trainable && !self.detached {
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

    /// The weight named `name` as a variable where the layer trains (`None` for a frozen
    /// layer): where the plan's own backward pass sends the weight's gradient
    /// (`layers/native_backward.rs`).
    pub(crate) fn trainable_var(&self, name: &str) -> Result<Option<Var>> {
        Ok(match self.trainable() {
            true => Some(self.var(name)?.clone()),
            false => None,
        })
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

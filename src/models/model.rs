//! [`Model`]: a graph of layers made from input and output symbolic tensors, built once on a
//! device, then run forward (and backward through candle's autograd).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor, Var};

use crate::graph::LayerRef;
use crate::graph::op::weight_holders;
use crate::graph::params::Pass;
use crate::graph::plan::Plan;
use crate::graph::{Mode, StateUpdates, SymbolicTensor};
use crate::models::inference;
use crate::models::model_layer::ModelLayer;
use crate::support::seed::mix;
use crate::{Error, Result};

/// A functional model: the layers between some [`Input`](crate::Input)s (or any symbolic
/// tensors) and some outputs, run in a topological plan computed once.
///
/// `Model::new` checks the graph (disconnected or unused inputs, duplicate names) and names
/// the layers; [`Model::build`] creates the weights on a device; [`Model::forward`] runs it.
/// A model is itself a [`Layer`](crate::Layer): call it on symbolic tensors to nest it in another graph,
/// sharing its weights. Clones share everything.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
///
/// let inputs = Input::new([3, 8, 8]);
/// let t = Conv2D::new(4, 3).padding(Padding::Same).call(&inputs)?;
/// let y = ReLU::new().call(&t)?;
/// let out = Add::new().call_many(&[t, y])?;
/// let model = Model::new(&[inputs], &[out])?.build(&Device::Cpu, DType::F32, 0)?;
/// let x = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu)?;
/// let y = model.forward(&[x], Mode::Eval)?;
/// assert_eq!(y[0].dims(), &[2, 4, 8, 8]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Model {
    pub(crate) plan: Arc<Plan>,
    pub(crate) name: Option<String>,
    /// The identity the model has as a layer of another graph (`models/nesting.rs`).
    pub(crate) identity: Arc<OnceLock<LayerRef>>,
    rng: Arc<ForwardRng>,
    /// The file the weights were last loaded from, with its SHA-256 (`Model::load_weights`);
    /// data-parallel ranks compare it before they train.
    pub(crate) weights_file: Arc<std::sync::Mutex<Option<WeightsFile>>>,
}

/// Where a model's weights were loaded from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WeightsFile {
    pub(crate) path: String,
    pub(crate) sha256: String,
}

/// Seeds for random layers: a base seed (set by `build`) and a count of forward calls, so
/// every call draws fresh masks yet a run is reproducible and can be resumed.
#[derive(Debug, Default)]
struct ForwardRng {
    seed: AtomicU64,
    calls: AtomicU64,
    /// Mixed precision: the dtype layers compute in, when not the weights'.
    compute_dtype: std::sync::RwLock<Option<DType>>,
}

/// Counts of scalars in a model's weights.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let x = Input::new([4]);
/// let y = Dense::new(2).call(&BatchNorm::new().call(&x)?)?;
/// let counts = Model::new(&[x], &[y])?.count_params();
/// assert_eq!(counts.trainable, 8 + 10);
/// assert_eq!(counts.non_trainable, 8);
/// assert_eq!(counts.total, 26);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ParamCounts {
    /// All scalars.
    pub total: usize,
    /// Scalars an optimizer updates.
    pub trainable: usize,
    /// State saved with the weights but not trained (BatchNorm moving statistics).
    pub non_trainable: usize,
}

/// One weight tensor of a built model, under its stable name (`conv2d.kernel`).
///
/// # Examples
/// ```
/// use candle_core::{DType, Device};
/// use candle_functional::prelude::*;
/// let x = Input::new([4]);
/// let y = Dense::new(2).call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let names: Vec<_> = model.weights()?.iter().map(|w| w.name().to_string()).collect();
/// assert_eq!(names, ["dense.kernel", "dense.bias"]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct NamedWeight {
    name: String,
    var: Var,
    trainable: bool,
}

impl NamedWeight {
    /// `<layer>.<param>`, with `<model>.` in front for the layers of a nested model.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_functional::prelude::*;
    /// # let x = Input::new([4]);
    /// # let y = Dense::new(2).name("head").call(&x)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// assert_eq!(model.weights()?[0].name(), "head.kernel");
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The variable (shares storage with the model).
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_functional::prelude::*;
    /// # let x = Input::new([4]);
    /// # let y = Dense::new(2).call(&x)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// assert_eq!(model.weights()?[0].var().dims(), &[4, 2]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn var(&self) -> &Var {
        &self.var
    }

    /// Whether an optimizer updates it.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_functional::prelude::*;
    /// # let x = Input::new([4]);
    /// # let y = Dense::new(2).call(&x)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// assert!(model.weights()?[0].trainable());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn trainable(&self) -> bool {
        self.trainable
    }
}

impl Model {
    /// Makes a model from the graph between `inputs` and `outputs`.
    ///
    /// Fails with [`Error::GraphDisconnected`] when an output needs an `Input` that is not in
    /// `inputs`, [`Error::UnusedInput`] when an input reaches no output,
    /// [`Error::DuplicateInput`] and [`Error::DuplicateLayerName`]. Inputs may be inner tensors
    /// of a bigger graph: the model then starts there (a sub-model sharing weights).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let a = Input::new([4]);
    /// let b = Input::new([4]);
    /// let y = Dense::new(2).call(&b)?;
    /// let err = Model::new(&[a], &[y]).unwrap_err();
    /// assert!(matches!(err, Error::GraphDisconnected { .. }));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn new(inputs: &[SymbolicTensor], outputs: &[SymbolicTensor]) -> Result<Self> {
        if outputs.is_empty() {
            return Err(Error::InvalidArgument(
                "a model needs at least one output".into(),
            ));
        }
        let plan = Plan::new(inputs, outputs)?;
        Ok(Self {
            plan: Arc::new(plan),
            name: None,
            identity: Arc::default(),
            rng: Arc::default(),
            weights_file: Arc::default(),
        })
    }

    /// Names the model (its name in summaries, and its layer name when nested).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([2]);
    /// let m = Model::new(&[x.clone()], &[x])?.named("identity");
    /// assert_eq!(m.name(), "identity");
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self.identity = Arc::default();
        self
    }

    /// The model's name (`functional` unless named).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([2]);
    /// assert_eq!(Model::new(&[x.clone()], &[x])?.name(), "functional");
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn name(&self) -> &str {
        match (&self.name, self.identity.get().and_then(|l| l.name())) {
            (Some(name), _) => name,
            (None, Some(assigned)) => assigned,
            (None, None) => "functional",
        }
    }

    /// Creates every layer's weights on `device` with `dtype` (Keras's initializers, seeded:
    /// each layer draws from a generator keyed by `seed` and its name). Layers that already
    /// have weights (shared with another model) keep them.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 7)?;
    /// assert!(model.is_built());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn build(self, device: &Device, dtype: DType, seed: u64) -> Result<Self> {
        for (name, layer) in weight_holders(&self.plan.layers) {
            layer.build(device, dtype, seed, &name)?;
        }
        self.rng.seed.store(seed, Ordering::Relaxed);
        Ok(self)
    }

    /// The seed given to [`Model::build`] (0 before), or the one of the checkpoint
    /// [`Trainer::load_checkpoint`](crate::train::Trainer::load_checkpoint) restored: random
    /// layers draw from it, and a checkpoint records it so that a run resumes with the same
    /// draws.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 7)?;
    /// assert_eq!(model.seed(), 7);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn seed(&self) -> u64 {
        self.rng.seed.load(Ordering::Relaxed)
    }

    /// `true` when every layer has its weights.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3]);
    /// let y = Dense::new(2).call(&x)?;
    /// assert!(!Model::new(&[x], &[y])?.is_built());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn is_built(&self) -> bool {
        weight_holders(&self.plan.layers)
            .iter()
            .all(|(_, layer)| layer.param_specs().is_empty() || layer.weights().is_some())
    }

    /// Runs the model on concrete tensors (batch first), one per input, in the order given
    /// to [`Model::new`]. Checks their count and shapes first; inputs of another dtype (f64
    /// values, u8 pixels) are converted to the dtype the model computes in, as Keras does.
    /// Intermediate activations are dropped after their last use. An empty batch gives empty
    /// outputs (no layer runs and nothing is updated).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let bad = Tensor::zeros((5, 4), DType::F32, &Device::Cpu)?;
    /// assert!(matches!(model.forward(&[bad], Mode::Eval), Err(Error::InputShape { .. })));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Vec<Tensor>> {
        let updates = StateUpdates::default();
        let outputs = self.forward_deferred(inputs, mode, &updates)?;
        updates.apply()?;
        Ok(outputs)
    }

    /// [`Model::forward`], holding the state updates (BatchNorm's moving statistics) back in
    /// `updates` instead of writing them: a training step applies them only once it has
    /// succeeded, so a step that fails changes no statistic.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_functional::prelude::*;
    /// use candle_functional::StateUpdates;
    /// let x = Input::new([2]);
    /// let y = BatchNorm::new().call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let updates = StateUpdates::default();
    /// let batch = Tensor::ones((3, 2), DType::F32, &Device::Cpu)?;
    /// model.forward_deferred(&[batch], Mode::Train, &updates)?;
    /// drop(updates); // the step failed: nothing was written
    /// assert_eq!(model.weight_map()?["batch_normalization.moving_mean"].to_vec1::<f32>()?, [0.0, 0.0]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn forward_deferred(
        &self,
        inputs: &[Tensor],
        mode: Mode,
        updates: &StateUpdates,
    ) -> Result<Vec<Tensor>> {
        let (inputs, pass) = self.prepare_pass(inputs, mode, self.compute_dtype(), updates)?;
        self.run_plan(&inputs, pass)
            .map_err(|e| self.explain_missing_kernel(e))
    }

    /// A forward pass's inputs, converted to the model's dtype where needed, and its pass:
    /// `mode`, `compute_dtype`, the next seed of the model's sequence, `updates`. An error
    /// for a model not built.
    fn prepare_pass<'a>(
        &self,
        inputs: &[Tensor],
        mode: Mode,
        compute_dtype: Option<DType>,
        updates: &'a StateUpdates,
    ) -> Result<(Vec<Tensor>, Pass<'a>)> {
        if !self.is_built() {
            return Err(Error::NotBuilt {
                model: self.name().to_string(),
            });
        }
        let inputs = self
            .converted_inputs(inputs)?
            .unwrap_or_else(|| inputs.to_vec());
        let call = self.rng.calls.fetch_add(1, Ordering::Relaxed);
        let seed = mix(self.rng.seed.load(Ordering::Relaxed), call);
        let pass = Pass {
            mode,
            seed,
            compute_dtype,
            state_updates: Some(updates),
        };
        Ok((inputs, pass))
    }

    /// Runs the plan: in inference with each batch norm that can be folded into the
    /// convolution before it (`models/inference.rs`).
    pub(crate) fn run_plan(&self, inputs: &[Tensor], pass: Pass) -> Result<Vec<Tensor>> {
        match pass.mode {
            Mode::Eval => inference::run(&self.plan, self.name(), inputs, pass),
            Mode::Train => self.plan.run(self.name(), inputs, pass),
        }
    }

    /// What the trainer's own backward pass (`train/tape.rs`) runs a training step's forward
    /// pass with: the inputs converted as [`Model::forward_deferred`] converts them, and the
    /// pass, its seed drawn as there; no compute dtype (the trainer uses the tape only
    /// without one).
    pub(crate) fn training_pass<'a>(
        &self,
        inputs: &[Tensor],
        updates: &'a StateUpdates,
    ) -> Result<(Vec<Tensor>, Pass<'a>)> {
        self.prepare_pass(inputs, Mode::Train, None, updates)
    }

    /// Adds what to do to candle's bare "unsupported dtype BF16 for op …", which a model
    /// computing in BF16 on the CPU meets at its first convolution (candle's CPU backend lacks
    /// some BF16 kernels; its CUDA backend has them).
    fn explain_missing_kernel(&self, e: Error) -> Error {
        let message = e.to_string();
        if !(matches!(e, Error::Candle(_)) && message.contains("unsupported dtype BF16")) {
            return e;
        }
        Error::InvalidArgument(format!(
            "model `{}` computes in BF16, and candle lacks this kernel in BF16 on this device ({message}): on the CPU compute in F32 (build in F32, no mixed precision) or F16; BF16 runs on CUDA",
            self.name()
        ))
    }

    /// The dtype a forward pass computes in: the mixed-precision compute dtype, else the
    /// weights' (`None` for a model without weights).
    fn working_dtype(&self) -> Option<DType> {
        self.compute_dtype().or_else(|| {
            weight_holders(&self.plan.layers)
                .iter()
                .find_map(|(_, layer)| layer.weights()?.vars.first().map(|v| v.dtype()))
        })
    }

    /// Per input: `true` when only index layers (`Embedding`) read it, so it keeps its dtype.
    pub(crate) fn index_inputs(&self) -> &[bool] {
        &self.plan.index_inputs
    }

    /// Keras's input conversion: every input takes the dtype the model computes in (an f64
    /// batch, or u8 pixels, into an f32 model), and integer inputs of a model without weights
    /// become f32; inputs read only by index layers (`Embedding`) keep theirs. `None` when
    /// every input already fits.
    fn converted_inputs(&self, inputs: &[Tensor]) -> Result<Option<Vec<Tensor>>> {
        let dtype = self.working_dtype();
        let index_inputs = &self.plan.index_inputs;
        let target = |i: usize, t: &Tensor| match dtype {
            _ if index_inputs.get(i).copied().unwrap_or(false) => t.dtype(),
            Some(d) => d,
            None if t.dtype().is_float() => t.dtype(),
            None => DType::F32,
        };
        if inputs
            .iter()
            .enumerate()
            .all(|(i, t)| t.dtype() == target(i, t))
        {
            return Ok(None);
        }
        inputs
            .iter()
            .enumerate()
            .map(|(i, t)| Ok(t.to_dtype(target(i, t))?))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The symbolic inputs.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([2]);
    /// assert_eq!(Model::new(&[x.clone()], &[x])?.inputs().len(), 1);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn inputs(&self) -> &[SymbolicTensor] {
        &self.plan.inputs
    }

    /// The symbolic outputs (use them, or any inner tensor, to cut a sub-model that shares
    /// weights: `Model::new(model.inputs(), &[inner])`).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([2]);
    /// let m = Model::new(&[x.clone()], &[x])?;
    /// assert_eq!(m.outputs()[0].shape(), &[2]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn outputs(&self) -> &[SymbolicTensor] {
        &self.plan.outputs
    }

    /// The distinct layers, `Input`s included, in creation order.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([2]);
    /// let y = ReLU::new().call(&x)?;
    /// let names: Vec<_> = Model::new(&[x], &[y])?
    ///     .layers()
    ///     .iter()
    ///     .map(|l| l.name().unwrap().to_string())
    ///     .collect();
    /// assert_eq!(names, ["input_layer", "re_lu"]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn layers(&self) -> &[LayerRef] {
        &self.plan.layers
    }

    /// The layer with this name.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([2]);
    /// let y = ReLU::new().name("act").call(&x)?;
    /// let m = Model::new(&[x], &[y])?;
    /// assert!(m.layer("act").is_some());
    /// assert!(m.layer("nope").is_none());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn layer(&self, name: &str) -> Option<&LayerRef> {
        self.plan.layers.iter().find(|l| l.name() == Some(name))
    }

    /// The layer named `name` with its calls in this model: its symbolic inputs and outputs
    /// (Keras's `model.get_layer(name).output`), to cut a feature extractor at it, and its
    /// weights.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3, 8, 8]);
    /// let features = Conv2D::new(4, 3).name("features").call(&x)?;
    /// let y = Dense::new(2).call(&GlobalAveragePooling2D::new().call(&features)?)?;
    /// let model = Model::new(&[x], &[y])?;
    /// let cut = model.get_layer("features")?.output()?;
    /// let extractor = Model::new(model.inputs(), &[cut])?;
    /// assert_eq!(extractor.outputs()[0].shape(), &[4, 6, 6]);
    /// assert!(model.get_layer("nope").unwrap_err().to_string().contains("features"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn get_layer(&self, name: &str) -> Result<ModelLayer> {
        let found = self
            .plan
            .layers
            .iter()
            .zip(&self.plan.layer_nodes)
            .find(|(l, _)| l.name() == Some(name));
        match found {
            Some((layer, nodes)) => Ok(ModelLayer::new(layer.clone(), nodes.clone())),
            None => {
                let names: Vec<String> =
                    self.plan.layers.iter().map(|l| l.display_name()).collect();
                Err(Error::InvalidArgument(format!(
                    "model `{}` has no layer named `{name}` (its layers: {})",
                    self.name(),
                    names.join(", ")
                )))
            }
        }
    }

    pub(crate) fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Every weight with its stable name, trainable and state alike, each once (a layer
    /// shared with a nested model is listed under its first name).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3, 4, 4]);
    /// let y = BatchNorm::new().call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let names: Vec<_> = model.weights()?.iter().map(|w| w.name().to_string()).collect();
    /// assert_eq!(
    ///     names,
    ///     ["batch_normalization.gamma", "batch_normalization.beta",
    ///      "batch_normalization.moving_mean", "batch_normalization.moving_variance"]
    /// );
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn weights(&self) -> Result<Vec<NamedWeight>> {
        let mut out = Vec::new();
        for (name, layer) in weight_holders(&self.plan.layers) {
            if layer.param_specs().is_empty() {
                continue;
            }
            let weights = layer.weights().ok_or_else(|| Error::NotBuilt {
                model: self.name().to_string(),
            })?;
            for (spec, var) in weights.specs.iter().zip(weights.vars) {
                out.push(NamedWeight {
                    name: format!("{name}.{}", spec.name()),
                    var,
                    trainable: spec.trainable() && layer.trainable(),
                });
            }
        }
        Ok(out)
    }

    /// Freezes (`false`) or unfreezes every layer of the model, nested models included
    /// (Keras's `model.trainable = False`); see [`LayerRef::set_trainable`].
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// model.set_trainable(false);
    /// assert_eq!(model.count_params().non_trainable, 10);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn set_trainable(&self, trainable: bool) {
        for layer in &self.plan.layers {
            layer.set_trainable(trainable);
        }
        if let Some(identity) = self.identity.get() {
            identity.set_trainable(trainable);
        }
    }

    /// The trainable weights with their names: what an optimizer updates (frozen layers and
    /// BatchNorm's moving statistics left out).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3]);
    /// let y = Dense::new(2).call(&BatchNorm::new().call(&x)?)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let names: Vec<_> = model.trainable_weights()?.into_iter().map(|(n, _)| n).collect();
    /// assert_eq!(names, ["batch_normalization.gamma", "batch_normalization.beta", "dense.kernel", "dense.bias"]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn trainable_weights(&self) -> Result<Vec<(String, Var)>> {
        Ok(self
            .weights()?
            .into_iter()
            .filter(|w| w.trainable)
            .map(|w| (w.name, w.var))
            .collect())
    }

    /// The variables an optimizer should update: the trainable weights only (BatchNorm's
    /// moving statistics and frozen layers are left out).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3, 4, 4]);
    /// let y = BatchNorm::new().call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// assert_eq!(model.trainable_vars()?.len(), 2);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn trainable_vars(&self) -> Result<Vec<Var>> {
        Ok(self
            .weights()?
            .into_iter()
            .filter(|w| w.trainable)
            .map(|w| w.var)
            .collect())
    }

    /// Scalar counts, as Keras's `summary()` reports them; works before `build`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3, 8, 8]);
    /// let y = Conv2D::new(4, 3).call(&x)?;
    /// assert_eq!(Model::new(&[x], &[y])?.count_params().total, 4 * 3 * 9 + 4);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn count_params(&self) -> ParamCounts {
        let mut counts = ParamCounts::default();
        for (_, layer) in weight_holders(&self.plan.layers) {
            for spec in layer.param_specs() {
                counts.total += spec.numel();
                if spec.trainable() && layer.trainable() {
                    counts.trainable += spec.numel();
                } else {
                    counts.non_trainable += spec.numel();
                }
            }
        }
        counts
    }

    /// The device of the weights (`None` before `build` or without weights).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// assert!(matches!(model.device(), Some(Device::Cpu)));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn device(&self) -> Option<Device> {
        self.weights().ok()?.first().map(|w| w.var.device().clone())
    }

    /// The number of forward calls made so far: with the seed given to `build`, it fixes the
    /// random masks of the next call (save it to resume a run exactly).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3]);
    /// let m = Model::new(&[x.clone()], &[x])?.build(&Device::Cpu, DType::F32, 0)?;
    /// m.forward(&[Tensor::zeros((1, 3), DType::F32, &Device::Cpu)?], Mode::Eval)?;
    /// assert_eq!(m.forward_calls(), 1);
    /// m.set_forward_calls(0);
    /// assert_eq!(m.forward_calls(), 0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn forward_calls(&self) -> u64 {
        self.rng.calls.load(Ordering::Relaxed)
    }

    /// Mixed precision: run every layer in `dtype` (bf16 or f16) while the weights stay in
    /// their own dtype (f32 master weights). Inputs and weights are cast at each use, the cast
    /// is differentiable, so gradients and optimizer updates stay in f32; BatchNorm computes
    /// its statistics in f32. `None` turns it off. Meant for CUDA: candle's CPU convolution
    /// has no half-precision kernel.
    ///
    /// # Examples
    /// ```
    /// use candle_core::DType;
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let m = Model::new(&[x.clone()], &[x])?;
    /// m.set_compute_dtype(Some(DType::BF16));
    /// assert_eq!(m.compute_dtype(), Some(DType::BF16));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn set_compute_dtype(&self, dtype: Option<DType>) {
        *self
            .rng
            .compute_dtype
            .write()
            .unwrap_or_else(|e| e.into_inner()) = dtype;
    }

    /// The mixed-precision compute dtype, if any.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// assert_eq!(Model::new(&[x.clone()], &[x])?.compute_dtype(), None);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn compute_dtype(&self) -> Option<DType> {
        *self
            .rng
            .compute_dtype
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the seed random layers draw from (a resumed checkpoint's).
    pub(crate) fn set_seed(&self, seed: u64) {
        self.rng.seed.store(seed, Ordering::Relaxed);
    }

    /// The file the weights were last loaded from by [`Model::load_weights`] and its SHA-256
    /// (`"path (sha256 …)"`), or `None` for weights as built or set another way.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let model = Model::new(&[x.clone()], &[Dense::new(2).call(&x)?])?.build(&Device::Cpu, DType::F32, 0)?;
    /// assert_eq!(model.weights_file(), None);
    /// let path = std::env::temp_dir().join("candle_functional_doc_weights_file.safetensors");
    /// model.save_weights(&path)?;
    /// model.load_weights(&path)?;
    /// assert!(model.weights_file().unwrap().contains("sha256"));
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn weights_file(&self) -> Option<String> {
        self.loaded_weights_file()
            .map(|f| format!("{} (sha256 {})", f.path, f.sha256))
    }

    pub(crate) fn loaded_weights_file(&self) -> Option<WeightsFile> {
        self.weights_file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets the forward-call counter (see [`Model::forward_calls`]).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::prelude::*;
    /// # let x = Input::new([3]);
    /// # let m = Model::new(&[x.clone()], &[x])?;
    /// m.set_forward_calls(5);
    /// assert_eq!(m.forward_calls(), 5);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn set_forward_calls(&self, calls: u64) {
        self.rng.calls.store(calls, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use crate::ElementWise;
    use crate::prelude::*;

    /// The plan's steps as `(type name, prologue)`.
    fn steps(model: &Model) -> Vec<(&'static str, Option<ElementWise>)> {
        model
            .plan
            .steps
            .iter()
            .map(|s| (s.node.layer().op().type_name(), s.fusion.prologue()))
            .collect()
    }

    #[test]
    fn a_relu_read_only_by_a_batch_norm_is_folded_into_it() {
        let x = Input::new([3, 4, 4]);
        let r = ReLU::new().call(&x).unwrap();
        let y = BatchNorm::new().call(&r).unwrap();
        let input = std::slice::from_ref(&x);
        let folded = Model::new(input, std::slice::from_ref(&y)).unwrap();
        assert_eq!(
            steps(&folded),
            [("BatchNormalization", Some(ElementWise::Relu))]
        );
        // The ReLU's output is needed as it is: a model output, a second reader, a leaky ReLU.
        let kept = Model::new(input, &[y.clone(), r.clone()]).unwrap();
        assert_eq!(steps(&kept).len(), 2);
        let z = Add::new().call_many(&[y, r]).unwrap();
        assert_eq!(steps(&Model::new(input, &[z]).unwrap()).len(), 3);
        let leaky = ReLU::new().negative_slope(0.1).call(&x).unwrap();
        let y = BatchNorm::new().call(&leaky).unwrap();
        assert_eq!(steps(&Model::new(input, &[y]).unwrap()).len(), 2);
    }

    #[test]
    fn an_add_read_only_by_a_folded_relu_is_folded_too() {
        let (a, b) = (Input::new([3, 4, 4]), Input::new([3, 4, 4]));
        let sum = Add::new().call_many(&[a.clone(), b.clone()]).unwrap();
        let y = BatchNorm::new()
            .call(&ReLU::new().call(&sum).unwrap())
            .unwrap();
        let model = Model::new(&[a.clone(), b.clone()], &[y]).unwrap();
        assert_eq!(
            steps(&model),
            [("BatchNormalization", Some(ElementWise::AddRelu))]
        );
        assert_eq!(model.plan.steps[0].input_slots, [0, 1]);
        // An Add alone, and an Add of three (no fused kernel for it).
        let y = BatchNorm::new().call(&sum).unwrap();
        let model = Model::new(&[a.clone(), b.clone()], &[y]).unwrap();
        assert_eq!(
            steps(&model),
            [("BatchNormalization", Some(ElementWise::Add))]
        );
        let c = Input::new([3, 4, 4]);
        let sum3 = Add::new()
            .call_many(&[a.clone(), b.clone(), c.clone()])
            .unwrap();
        let y = BatchNorm::new()
            .call(&ReLU::new().call(&sum3).unwrap())
            .unwrap();
        let model = Model::new(&[a, b, c], &[y]).unwrap();
        assert_eq!(
            steps(&model),
            [
                ("Add", None),
                ("BatchNormalization", Some(ElementWise::Relu))
            ]
        );
    }

    #[test]
    fn a_relu_read_only_after_a_batch_norm_is_folded_into_it() {
        let x = Input::new([3, 4, 4]);
        let n = BatchNorm::new().call(&x).unwrap();
        let y = ReLU::new().call(&n).unwrap();
        let input = std::slice::from_ref(&x);
        let model = Model::new(input, std::slice::from_ref(&y)).unwrap();
        let step = &model.plan.steps[..];
        assert_eq!(step.len(), 1);
        assert_eq!(step[0].fusion.epilogue(), Some(ElementWise::Relu));
        assert_eq!(step[0].output_slots, model.plan.output_slots);
        // The BatchNorm's output is needed as it is: no fold.
        let kept = Model::new(input, &[y, n]).unwrap();
        assert_eq!(steps(&kept).len(), 2);
        // A ReLU between two BatchNorms is the second one's prologue, not the first's epilogue.
        let n2 = BatchNorm::new()
            .call(
                &ReLU::new()
                    .call(&BatchNorm::new().call(&x).unwrap())
                    .unwrap(),
            )
            .unwrap();
        let model = Model::new(input, &[n2]).unwrap();
        assert_eq!(
            steps(&model),
            [
                ("BatchNormalization", None),
                ("BatchNormalization", Some(ElementWise::Relu))
            ]
        );
        assert!(
            model
                .plan
                .steps
                .iter()
                .all(|s| s.fusion.epilogue().is_none())
        );
    }

    #[test]
    fn a_relu_read_only_after_a_plain_convolution_is_folded_into_it() {
        let x = Input::new([3, 8, 8]);
        let input = std::slice::from_ref(&x);
        let y = ReLU::new()
            .call(&Conv2D::new(4, 3).call(&x).unwrap())
            .unwrap();
        let model = Model::new(input, &[y]).unwrap();
        assert_eq!(steps(&model), [("Conv2D", None)]);
        assert_eq!(
            model.plan.steps[0].fusion.epilogue(),
            Some(ElementWise::Relu)
        );
        // Not behind a convolution with its own activation; behind a BatchNorm it is the
        // BatchNorm's, which comes after the convolution.
        let sigmoid = Conv2D::new(4, 3).activation(ActivationFn::Sigmoid);
        let y = ReLU::new().call(&sigmoid.call(&x).unwrap()).unwrap();
        assert_eq!(steps(&Model::new(input, &[y]).unwrap()).len(), 2);
        let n = BatchNorm::new()
            .call(&Conv2D::new(4, 3).call(&x).unwrap())
            .unwrap();
        let y = ReLU::new().call(&n).unwrap();
        let model = Model::new(input, &[y]).unwrap();
        let epilogues: Vec<_> = model
            .plan
            .steps
            .iter()
            .map(|s| s.fusion.epilogue())
            .collect();
        assert_eq!(epilogues, [None, Some(ElementWise::Relu)]);
    }

    #[test]
    fn the_article_resnet_folds_every_relu_bn_and_residual_add() {
        let model = crate::models::create_res_net().unwrap();
        let steps = steps(&model);
        let count = |p: ElementWise| steps.iter().filter(|s| s.1 == Some(p)).count();
        // The stem's relu_bn and the first of each block's; then each block's Add → relu_bn.
        assert_eq!(count(ElementWise::Relu), 1 + 14);
        assert_eq!(count(ElementWise::AddRelu), 14);
        assert!(!steps.iter().any(|s| s.0 == "ReLU" || s.0 == "Add"));
    }
}

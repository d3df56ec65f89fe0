//! What a layer is to the graph: [`LayerOp`], the behaviour of a kind of layer (its shape
//! rule, its weights, its forward pass and the fusion hooks the plan asks), and [`LayerRef`],
//! one layer's identity in a graph, which holds an op, the layer's name, the input shapes of
//! its first call and its weights once built. The two refer to each other (a nested model's
//! op lists its layers' identities), so they share this file; everything else of the graph
//! floor sits on one side of them.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use candle_core::{DType, Device, Tensor, Var};

use crate::fusion::{ElementWise, Fusion};
use crate::graph::init::{ParamSpec, layer_rng};
use crate::graph::params::{Params, Pass};
use crate::graph::regularizer::{LayerRegularizers, Regularizer};
use crate::graph::weight_check::check_named_weights;
use crate::support::dtype::Cast;
use crate::support::sizes;
use crate::{Error, Result};

/// The behaviour of a kind of layer: its shape rule, its weights and its forward pass.
///
/// Every built-in layer's config implements it; implement it for your own config struct and
/// wrap it in [`Configured`](crate::Configured) to get a custom layer that takes part in graphs, summaries and
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
    /// [`ElementWise::Relu`], `Add` is [`ElementWise::Add`] when called on two tensors). When
    /// the layer's output has one reader, and that layer
    /// [`accepts_prologue`](Self::accepts_prologue) the function, a model's plan leaves this
    /// layer out and has the reader apply it inside its own kernel. `None` (the default): never.
    fn as_element_wise(&self) -> Option<ElementWise> {
        None
    }

    /// `true` when the layer reads its inputs as integer indices (`Embedding`). A model input
    /// read only by such layers keeps its dtype: `u8`/`u32`/`i64` ids are not converted to the
    /// model's float dtype, nor cast by mixed precision (bf16 holds whole numbers only up to
    /// 256). `false` (the default): inputs are values.
    fn reads_indices(&self) -> bool {
        false
    }

    /// `true` when [`forward_fused`](Self::forward_fused) can apply `function` to its inputs
    /// in place of this layer's one input (a [`Fusion`]'s prologue). `false` (the default) for
    /// every function.
    fn accepts_prologue(&self, _function: ElementWise) -> bool {
        false
    }

    /// `true` when [`forward_fused`](Self::forward_fused) can apply the one-input `function`
    /// to this layer's one output (a [`Fusion`]'s epilogue: a ReLU after a BatchNorm): the plan
    /// then leaves out the element-wise layer that is this layer's output's only reader.
    /// `false` (the default) for every function.
    fn accepts_epilogue(&self, _function: ElementWise) -> bool {
        false
    }

    /// [`forward`](Self::forward) with the fusion's prologue applied to `inputs` first (its
    /// [`arity`](Fusion::arity) of them) and its epilogue to the output after, the same values
    /// and gradients as running the layers one after the other. Called only where
    /// [`accepts_prologue`](Self::accepts_prologue) and
    /// [`accepts_epilogue`](Self::accepts_epilogue) say so; the default is an error.
    fn forward_fused(
        &self,
        fusion: Fusion,
        _inputs: &[Tensor],
        _params: &Params,
    ) -> Result<Vec<Tensor>> {
        Err(Error::InvalidArgument(format!(
            "{} does not fuse {fusion:?}",
            self.type_name()
        )))
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
    /// Keras's `kernel_regularizer` and friends, by weight name.
    regularizers: LayerRegularizers,
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
    pub(crate) fn new(
        op: Arc<dyn LayerOp>,
        name: Option<String>,
        regularizers: Vec<(String, Regularizer)>,
    ) -> Self {
        let cell = LayerCell {
            id: next_id(),
            op,
            name: OnceLock::new(),
            first_inputs: OnceLock::new(),
            weights: RwLock::new(None),
            trainable: AtomicBool::new(true),
            regularizers: LayerRegularizers::new(regularizers),
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

    /// The weight penalties of the layer, by weight name (see [`Regularizer`]).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{prelude::*, Regularizer};
    /// let y = Dense::new(3).kernel_regularizer(Regularizer::l2(1e-4)).call(&Input::new([4]))?;
    /// assert_eq!(y.layer().regularizers(), [("kernel".to_string(), Regularizer::l2(1e-4))]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn regularizers(&self) -> Vec<(String, Regularizer)> {
        self.0.regularizers.get()
    }

    /// Sets (or, with `None`, removes) the penalty of one weight of a called layer, an
    /// imported one included; refused, changing nothing, for a weight the layer does not
    /// have or factors that are negative or not finite.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{prelude::*, Regularizer};
    /// let y = Dense::new(3).call(&Input::new([4]))?;
    /// y.layer().set_regularizer("bias", Some(Regularizer::l1(0.01)))?;
    /// assert!(y.layer().set_regularizer("gamma", Some(Regularizer::l1(0.01))).is_err());
    /// assert_eq!(y.layer().regularizers().len(), 1);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn set_regularizer(&self, weight: &str, regularizer: Option<Regularizer>) -> Result<()> {
        let check = LayerRegularizers::new(
            regularizer
                .map(|r| vec![(weight.to_string(), r)])
                .unwrap_or_default(),
        );
        let specs = self.param_specs();
        check.check(
            &self.display_name(),
            &specs.iter().map(ParamSpec::name).collect::<Vec<_>>(),
        )?;
        self.0.regularizers.set(weight, regularizer);
        Ok(())
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
            let names: Vec<&str> = specs.iter().map(ParamSpec::name).collect();
            self.0.regularizers.check(&self.display_name(), &names)?;
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
            return Err(Error::LayerNotBuilt {
                layer: self.display_name(),
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
        fusion: Fusion,
    ) -> Result<Vec<Tensor>> {
        self.with_params(pass, |op, params| {
            if fusion.is_none() {
                op.forward(inputs, params)
            } else {
                op.forward_fused(fusion, inputs, params)
            }
        })
    }

    /// Runs `f` with the layer's op and its weights as `pass` hands them out (what
    /// [`forward`](Self::forward) runs the op with): for the executors that call a layer's
    /// own methods rather than `forward`.
    pub(crate) fn with_params<R>(
        &self,
        pass: Pass,
        f: impl FnOnce(&dyn LayerOp, &Params) -> Result<R>,
    ) -> Result<R> {
        let guard = self.0.weights.read().unwrap_or_else(|e| e.into_inner());
        let (specs, vars): (&[ParamSpec], &[Var]) = match guard.as_ref() {
            Some(w) => (&w.specs, &w.vars),
            None if self.param_specs().is_empty() => (&[], &[]),
            None => {
                return Err(Error::LayerNotBuilt {
                    layer: self.display_name(),
                });
            }
        };
        let params = Params::new(specs, vars, pass.mode, pass.seed)
            .with_compute_dtype(pass.compute_dtype)
            .with_trainable(self.trainable())
            .with_state_updates(pass.state_updates);
        f(self.0.op.as_ref(), &params)
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

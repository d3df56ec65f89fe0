//! A model's architecture as data: a versioned JSON config of every layer, its settings and
//! the graph of calls, written on its own ([`Model::to_json`]) or with the weights in one
//! safetensors file ([`Model::save`]), and read back without the code that built it
//! ([`Model::from_json`], [`Model::load`]).
//!
//! The JSON follows Keras's `get_config` layout: a list of layers, each with its class name,
//! its config and the inputs of each of its calls as `[layer, call, output]` references; the
//! model's inputs and outputs are references too. Layers are made from their class name by a
//! [`LayerRegistry`]: the built-in layers are in it, custom layers are added by type name. A
//! nested model is a layer of class `Functional` whose config is its own graph.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::graph::op::weight_holders;
use crate::graph::symbolic::record_call;
use crate::graph::weight_check::check_named_shapes;
use crate::graph::{Input, Layer, LayerOp, LayerRef, Regularizer, SymbolicTensor};
use crate::layers::builtin_kinds;
use crate::layers::kind::parse_config;
use crate::models::Model;
use crate::support::files::{parse_safetensors, to_safetensors_bytes, write_atomically};
use crate::{Error, Result};

/// The `format` field of a saved architecture.
const FORMAT: &str = "candle-functional.model";

/// The newest format version this crate writes and reads. A file of a newer version is
/// refused: its layers may have options this version would silently drop.
pub const FORMAT_VERSION: u32 = 1;

/// The safetensors metadata key holding the architecture in a [`Model::save`] file.
const METADATA_KEY: &str = "candle_functional.architecture";

/// A reference to one tensor of the graph: `(layer, call, output)`.
pub(crate) type TensorRef = (String, usize, usize);

/// The saved document: format, versions, the graph.
#[derive(Serialize, Deserialize)]
struct SavedArchitecture {
    format: String,
    format_version: u32,
    /// The crate version that wrote it (for people; not checked).
    crate_version: String,
    model: GraphConfig,
}

/// One functional graph (the model, or a nested model's config).
#[derive(Serialize, Deserialize)]
pub(crate) struct GraphConfig {
    pub(crate) name: String,
    pub(crate) layers: Vec<LayerEntry>,
    pub(crate) inputs: Vec<TensorRef>,
    pub(crate) outputs: Vec<TensorRef>,
}

/// One layer: what it is and how it was called.
#[derive(Serialize, Deserialize)]
pub(crate) struct LayerEntry {
    pub(crate) name: String,
    pub(crate) class_name: String,
    pub(crate) config: Value,
    #[serde(default = "yes")]
    pub(crate) trainable: bool,
    /// Weight penalties by weight name (checked against the layer's weights at its call).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) regularizers: Vec<(String, Regularizer)>,
    /// The inputs of each call, in call order (empty for an `InputLayer`).
    #[serde(default)]
    pub(crate) calls: Vec<Vec<TensorRef>>,
}

fn yes() -> bool {
    true
}

/// The config of an `InputLayer` entry.
#[derive(Serialize, Deserialize)]
pub(crate) struct InputConfig {
    pub(crate) shape: Vec<usize>,
}

type Constructor = Arc<dyn Fn(&Value) -> Result<Arc<dyn LayerOp>> + Send + Sync>;

/// Makes layers from their saved class name and config: the built-in layers, plus the custom
/// layers registered by their [`LayerOp::type_name`].
///
/// # Examples
/// ```
/// use candle_core::Tensor;
/// use candle_functional::models::LayerRegistry;
/// use candle_functional::{LayerOp, Params, Result};
///
/// /// A custom layer: multiplies by a constant.
/// #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
/// struct ScaleConfig { factor: f64 }
///
/// impl LayerOp for ScaleConfig {
///     fn type_name(&self) -> &'static str { "Scale" }
///     fn to_config(&self) -> Option<serde_json::Value> { serde_json::to_value(self).ok() }
///     fn output_shapes(&self, _layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
///         Ok(inputs.to_vec())
///     }
///     fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
///         Ok(vec![(&inputs[0] * self.factor)?])
///     }
/// }
///
/// let mut registry = LayerRegistry::new();
/// registry.register::<ScaleConfig>("Scale");
/// assert!(registry.contains("Scale") && registry.contains("Conv2D"));
/// ```
#[derive(Clone)]
pub struct LayerRegistry {
    constructors: HashMap<String, Constructor>,
}

impl std::fmt::Debug for LayerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.constructors.keys().collect();
        names.sort();
        f.debug_struct("LayerRegistry")
            .field("types", &names)
            .finish()
    }
}

impl Default for LayerRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerRegistry {
    /// A registry of the built-in layers.
    ///
    /// # Examples
    /// ```
    /// let registry = candle_functional::models::LayerRegistry::new();
    /// assert!(registry.contains("BatchNormalization") && !registry.contains("Lambda"));
    /// ```
    pub fn new() -> Self {
        let mut registry = Self {
            constructors: HashMap::new(),
        };
        for kind in builtin_kinds() {
            let kind = *kind;
            let constructor: Constructor = Arc::new(move |config: &Value| kind.load(config));
            registry
                .constructors
                .insert(kind.type_name().to_string(), constructor);
        }
        registry
    }

    /// Registers layer config type `C` under `type_name` (its [`LayerOp::type_name`]), so that
    /// saved models holding it can be loaded. `C` must also write its config in
    /// [`LayerOp::to_config`]; a registration replaces an earlier one of the same name.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::DenseConfig;
    /// let mut registry = candle_functional::models::LayerRegistry::new();
    /// registry.register::<DenseConfig>("Dense");
    /// assert!(registry.contains("Dense"));
    /// ```
    pub fn register<C: LayerOp + DeserializeOwned>(&mut self, type_name: &str) -> &mut Self {
        let name = type_name.to_string();
        let constructor: Constructor =
            Arc::new(move |config: &Value| parse_config::<C>(&name, config));
        self.constructors.insert(type_name.to_string(), constructor);
        self
    }

    /// `true` when layers of class `type_name` can be made.
    ///
    /// # Examples
    /// ```
    /// assert!(candle_functional::models::LayerRegistry::new().contains("Conv2D"));
    /// ```
    pub fn contains(&self, type_name: &str) -> bool {
        self.constructors.contains_key(type_name)
    }

    pub(crate) fn make(&self, entry: &LayerEntry) -> Result<Arc<dyn LayerOp>> {
        let constructor = self
            .constructors
            .get(&entry.class_name)
            .ok_or_else(|| Error::Config {
                source_name: None,
                message: format!(
                    "layer `{}`: unknown layer class `{}` (a custom layer must be registered: LayerRegistry::register)",
                    entry.name, entry.class_name
                ),
            })?;
        constructor(&entry.config).map_err(|e| match e {
            Error::Config { message, .. } => Error::Config {
                source_name: None,
                message: format!("layer `{}`: {message}", entry.name),
            },
            other => other,
        })
    }
}

/// The first layer (depth first, through nested models) that cannot be saved, with its full
/// name.
fn first_unsaveable(layers: &[LayerRef], prefix: &str) -> Option<(String, LayerRef)> {
    for layer in layers {
        let name = format!("{prefix}{}", layer.display_name());
        let inner = layer.op().sublayers();
        if !inner.is_empty() {
            if let Some(found) = first_unsaveable(inner, &format!("{name}.")) {
                return Some(found);
            }
        } else if layer.op().type_name() != "InputLayer" && layer.op().to_config().is_none() {
            return Some((name, layer.clone()));
        }
    }
    None
}

/// The graph config of `model`, or the error naming the first layer that cannot be saved.
fn graph_config(model: &Model) -> Result<GraphConfig> {
    let plan = model.plan();
    if let Some((name, layer)) = first_unsaveable(&plan.layers, "") {
        let type_name = layer.op().type_name().to_string();
        let reason = if type_name == "Lambda" {
            "a Lambda holds a Rust closure, which is code, not data: write it as a LayerOp with to_config and register it"
        } else {
            "its LayerOp has no to_config: implement it and register the type in a LayerRegistry"
        };
        return Err(Error::NotSerializable {
            layer: name,
            type_name,
            reason: reason.into(),
        });
    }
    // Every node of the graph as (layer, call).
    let mut node_ref: HashMap<u64, (String, usize)> = HashMap::new();
    for (layer, nodes) in plan.layers.iter().zip(&plan.layer_nodes) {
        for (call, node) in nodes.iter().enumerate() {
            node_ref.insert(node.id(), (layer.display_name(), call));
        }
    }
    // The model's inputs: its Input layers, or an inner tensor of a bigger graph, which is
    // saved as an Input of its own (it is where the saved model starts).
    let mut layers = Vec::new();
    let mut input_names: HashMap<(u64, usize), String> = HashMap::new();
    for t in &plan.inputs {
        if t.node().is_input() {
            input_names.insert(t.key(), t.layer().display_name());
        } else {
            let name = format!("{}_output_{}", t.layer().display_name(), t.output_index());
            input_names.insert(t.key(), name.clone());
            layers.push(LayerEntry {
                name,
                class_name: "InputLayer".into(),
                config: serde_json::to_value(InputConfig {
                    shape: t.shape().to_vec(),
                })
                .map_err(json_error)?,
                trainable: true,
                regularizers: Vec::new(),
                calls: Vec::new(),
            });
        }
    }
    let reference = |t: &SymbolicTensor| -> Result<TensorRef> {
        if let Some(name) = input_names.get(&t.key()) {
            return Ok((name.clone(), 0, 0));
        }
        let (layer, call) = node_ref.get(&t.node().id()).ok_or_else(|| Error::Config {
            source_name: None,
            message: format!("tensor {t:?} is outside the model's graph"),
        })?;
        Ok((layer.clone(), *call, t.output_index()))
    };
    for (layer, nodes) in plan.layers.iter().zip(&plan.layer_nodes) {
        let is_input = nodes.first().is_some_and(|n| n.is_input());
        let (class_name, config, calls) = if is_input {
            let shape = nodes[0].output_shapes()[0].clone();
            (
                "InputLayer".to_string(),
                serde_json::to_value(InputConfig { shape }).map_err(json_error)?,
                Vec::new(),
            )
        } else {
            let calls = nodes
                .iter()
                .map(|node| node.inputs().iter().map(&reference).collect())
                .collect::<Result<Vec<Vec<TensorRef>>>>()?;
            let config = layer
                .op()
                .to_config()
                .ok_or_else(|| Error::NotSerializable {
                    layer: layer.display_name(),
                    type_name: layer.op().type_name().into(),
                    reason: "its LayerOp has no to_config".into(),
                })?;
            (layer.op().type_name().to_string(), config, calls)
        };
        layers.push(LayerEntry {
            name: layer.display_name(),
            class_name,
            config,
            trainable: layer.trainable(),
            regularizers: layer.regularizers(),
            calls,
        });
    }
    Ok(GraphConfig {
        name: model.name().to_string(),
        layers,
        inputs: plan.inputs.iter().map(&reference).collect::<Result<_>>()?,
        outputs: plan.outputs.iter().map(&reference).collect::<Result<_>>()?,
    })
}

/// A nested model's config (the `Functional` layer's `to_config`).
pub(crate) fn nested_config(model: &Model) -> Option<Value> {
    serde_json::to_value(graph_config(model).ok()?).ok()
}

fn json_error(e: serde_json::Error) -> Error {
    Error::Config {
        source_name: None,
        message: e.to_string(),
    }
}

/// Rebuilds the graph of `config`: layers made by `registry`, calls replayed in an order
/// where every input exists (a shared layer may be called on tensors made after it).
pub(crate) fn build_graph(config: &GraphConfig, registry: &LayerRegistry) -> Result<Model> {
    let bad = |message: String| Error::Config {
        source_name: None,
        message,
    };
    let mut tensors: HashMap<(String, usize), Vec<SymbolicTensor>> = HashMap::new();
    let mut layers: Vec<(&LayerEntry, LayerRef)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in &config.layers {
        if !seen.insert(entry.name.as_str()) {
            return Err(bad(format!("two layers are named `{}`", entry.name)));
        }
        match entry.class_name.as_str() {
            "InputLayer" => {
                let input: InputConfig = serde_json::from_value(entry.config.clone())
                    .map_err(|e| bad(format!("input `{}`: {e}", entry.name)))?;
                tensors.insert(
                    (entry.name.clone(), 0),
                    vec![Input::named(entry.name.clone(), input.shape)],
                );
            }
            "Functional" => {
                let inner: GraphConfig = serde_json::from_value(entry.config.clone())
                    .map_err(|e| bad(format!("nested model `{}`: {e}", entry.name)))?;
                let model = build_graph(&inner, registry)?.named(entry.name.clone());
                let layer = model.layer_ref();
                layer.set_trainable(entry.trainable);
                layers.push((entry, layer));
            }
            _ => {
                let layer = LayerRef::new(
                    registry.make(entry)?,
                    Some(entry.name.clone()),
                    entry.regularizers.clone(),
                );
                layer.set_trainable(entry.trainable);
                layers.push((entry, layer));
            }
        }
    }
    let resolve = |tensors: &HashMap<(String, usize), Vec<SymbolicTensor>>,
                   (layer, call, output): &TensorRef| {
        tensors
            .get(&(layer.clone(), *call))
            .and_then(|outputs| outputs.get(*output))
            .cloned()
    };
    // Replay the calls: each pass makes every call whose inputs exist, in call order per
    // layer, until none is left (or none can be made: a reference to nothing).
    let mut next_call = vec![0usize; layers.len()];
    loop {
        let mut progress = false;
        for (i, (entry, layer)) in layers.iter().enumerate() {
            while let Some(refs) = entry.calls.get(next_call[i]) {
                let Some(inputs) = refs
                    .iter()
                    .map(|r| resolve(&tensors, r))
                    .collect::<Option<Vec<_>>>()
                else {
                    break;
                };
                let outputs = record_call(layer, &inputs)?;
                tensors.insert((entry.name.clone(), next_call[i]), outputs);
                next_call[i] += 1;
                progress = true;
            }
        }
        if !progress {
            break;
        }
    }
    for (i, (entry, _)) in layers.iter().enumerate() {
        if let Some(refs) = entry.calls.get(next_call[i]) {
            return Err(bad(format!(
                "layer `{}`, call {}: its inputs {refs:?} are not all made by the graph",
                entry.name, next_call[i]
            )));
        }
    }
    let ends = |refs: &[TensorRef], what: &str| {
        refs.iter()
            .map(|r| {
                resolve(&tensors, r)
                    .ok_or_else(|| bad(format!("model {what} {r:?} is not in the graph")))
            })
            .collect::<Result<Vec<_>>>()
    };
    let inputs = ends(&config.inputs, "input")?;
    let outputs = ends(&config.outputs, "output")?;
    Ok(Model::new(&inputs, &outputs)?.named(config.name.clone()))
}

/// Checks that `tensors` are exactly the weights of the unbuilt `model` (names and shapes)
/// before anything is allocated: a config naming a huge layer cannot make `build` allocate
/// it.
pub(crate) fn check_fits_unbuilt(
    model: &Model,
    tensors: &HashMap<String, candle_core::Tensor>,
    source: &str,
) -> Result<()> {
    let expected = weight_holders(model.layers())
        .into_iter()
        .flat_map(|(name, layer)| {
            layer.param_specs().into_iter().map(move |spec| {
                (
                    format!("{name}.{}", spec.name()),
                    spec.shape().to_vec(),
                    true,
                )
            })
        });
    check_named_shapes(expected, tensors, source)
}

/// Parses a saved architecture, refusing other formats and newer versions.
fn parse_architecture(json: &str) -> Result<GraphConfig> {
    let bad = |message: String| Error::Config {
        source_name: None,
        message,
    };
    let value: Value = serde_json::from_str(json).map_err(|e| bad(format!("not JSON: {e}")))?;
    if value.get("format").and_then(Value::as_str) != Some(FORMAT) {
        return Err(bad(format!(
            "not a {FORMAT} document (its `format` is {})",
            value.get("format").unwrap_or(&Value::Null)
        )));
    }
    let version = value
        .get("format_version")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("no `format_version`".into()))?;
    if version > u64::from(FORMAT_VERSION) {
        return Err(bad(format!(
            "format version {version} was written by a newer candle-functional ({}); this one ({}) reads versions up to {FORMAT_VERSION}: update the crate",
            value
                .get("crate_version")
                .and_then(Value::as_str)
                .unwrap_or("unknown version"),
            env!("CARGO_PKG_VERSION")
        )));
    }
    let saved: SavedArchitecture = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    Ok(saved.model)
}

impl Model {
    /// The architecture as JSON (no weights): every layer's class, config and calls, the
    /// inputs and outputs, a format version. Fails naming the first layer that cannot be
    /// saved (a [`Lambda`](crate::layers::Lambda), a custom layer without [`LayerOp::to_config`]).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).name("head").call(&x)?;
    /// let json = Model::new(&[x], &[y])?.to_json()?;
    /// assert!(json.contains("\"head\"") && json.contains("\"format_version\": 1"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn to_json(&self) -> Result<String> {
        let saved = SavedArchitecture {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            crate_version: env!("CARGO_PKG_VERSION").into(),
            model: graph_config(self)?,
        };
        serde_json::to_string_pretty(&saved).map_err(json_error)
    }

    /// Rebuilds an (unbuilt) model from [`Model::to_json`]'s output, built-in layers only.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).name("head").call(&x)?;
    /// let model = Model::new(&[x], &[y])?;
    /// let again = Model::from_json(&model.to_json()?)?;
    /// assert_eq!(again.summary(), model.summary());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn from_json(json: &str) -> Result<Model> {
        Self::from_json_with(json, &LayerRegistry::new())
    }

    /// Rebuilds an (unbuilt) model from JSON, making layers with `registry` (for custom
    /// layers).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::models::LayerRegistry;
    /// use candle_functional::prelude::*;
    /// let err = Model::from_json_with("{}", &LayerRegistry::new()).unwrap_err();
    /// assert!(err.to_string().contains("format"));
    /// ```
    pub fn from_json_with(json: &str, registry: &LayerRegistry) -> Result<Model> {
        build_graph(&parse_architecture(json)?, registry)
    }

    /// Saves the whole model in one safetensors file: the weights (under the names of
    /// [`Model::save_weights`]) and the architecture (JSON in the file's metadata). Written to
    /// a temporary file and renamed. [`Model::load`] reads it back without the code that
    /// built the model.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let path = std::env::temp_dir().join("candle_functional_doc_model.safetensors");
    /// model.save(&path)?;
    /// let loaded = Model::load(&path, &Device::Cpu)?;
    /// assert_eq!(loaded.summary(), model.summary());
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self.to_json()?;
        let metadata = HashMap::from([(METADATA_KEY.to_string(), json)]);
        let bytes = to_safetensors_bytes(&self.weight_map()?, Some(metadata), path)?;
        write_atomically(path, &bytes)
    }

    /// Loads a model saved by [`Model::save`] onto `device`, built-in layers only. The
    /// weights keep the dtype they were saved in.
    ///
    /// # Examples
    /// ```
    /// use candle_core::Device;
    /// use candle_functional::prelude::*;
    /// let err = Model::load("no/such/model.safetensors", &Device::Cpu).unwrap_err();
    /// assert!(matches!(err, Error::Io { .. }));
    /// ```
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Model> {
        Self::load_with(path, device, &LayerRegistry::new())
    }

    /// Loads a saved model whose custom layers are in `registry`.
    ///
    /// # Examples
    /// ```
    /// use candle_core::Device;
    /// use candle_functional::models::LayerRegistry;
    /// use candle_functional::prelude::*;
    /// let registry = LayerRegistry::new();
    /// assert!(Model::load_with("no/such/model.safetensors", &Device::Cpu, &registry).is_err());
    /// ```
    pub fn load_with(
        path: impl AsRef<Path>,
        device: &Device,
        registry: &LayerRegistry,
    ) -> Result<Model> {
        let path = path.as_ref();
        let in_file = |e: Error| match e {
            Error::Config { message, .. } => Error::Config {
                source_name: Some(path.display().to_string()),
                message,
            },
            other => other,
        };
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (tensors, metadata) = parse_safetensors(&bytes, path, device)?;
        let json = metadata.get(METADATA_KEY).ok_or_else(|| Error::Config {
            source_name: Some(path.display().to_string()),
            message: "the file holds weights only (Model::save_weights): build the model in code and call load_weights, or save it with Model::save".into(),
        })?;
        let model = Self::from_json_with(json, registry).map_err(in_file)?;
        // The weights' own dtype (the first by name: a model is built in one dtype).
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let dtype = names
            .first()
            .map(|n| tensors[*n].dtype())
            .unwrap_or(DType::F32);
        check_fits_unbuilt(&model, &tensors, &path.display().to_string())?;
        let model = model.build(device, dtype, 0)?;
        model.set_weights_from(&tensors, &path.display().to_string())?;
        Ok(model)
    }
}

//! Importing Keras 3 `.keras` files: a functional model built by Keras (channels-last) becomes
//! an NCHW model of this crate with the same outputs.
//!
//! A `.keras` file is a zip holding `config.json` (the architecture, Keras's `get_config`) and
//! `model.weights.h5` (HDF5: each layer's variables under `layers/<group>/vars/<i>`, the
//! group's `name` attribute naming the layer). The architecture is translated layer by layer
//! into this crate's saved-architecture form and rebuilt by the same code as
//! [`Model::load`](crate::Model::load); the weights are converted on the way:
//!
//! - tensors of rank 4 are NHWC in Keras and NCHW here: an axis `a` of such a tensor (after
//!   resolving negatives) maps `1 → 2, 2 → 3, 3 → 1`, so Keras's default channel axis `-1`
//!   (BatchNormalization, Concatenate, Softmax, LayerNormalization) becomes axis 1;
//! - convolution kernels `(kh, kw, in, out)` become `(out, in, kh, kw)`, transposed
//!   convolution kernels `(kh, kw, out, in)` become `(in, out, kh, kw)`, depthwise kernels
//!   `(kh, kw, in, multiplier)` become `(in * multiplier, 1, kh, kw)`;
//! - a `Flatten` of a `(h, w, c)` map orders its features `(h, w, c)` in Keras and `(c, h, w)`
//!   here: the rows of the `Dense` kernel (or the `BatchNormalization` vectors) that read it
//!   are permuted to match; element-wise layers and merges in between pass the order along;
//! - a `Dense` on a rank-4 map (Keras applies it to the channels of every pixel) becomes a
//!   1x1 `Conv2D`.
//!
//! Layers or options without an exact equivalent are refused with an error naming the layer,
//! its class and the option: nothing is silently approximated.
//!
//! This file reads the archive and walks the graph; each class's translation lives in its
//! layer's file (`KINDS`, in the vocabulary of `layers/keras.rs`), found through
//! `layers::builtin_kinds`.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::graph::Regularizer;
use crate::graph::op::snake_case;
use crate::layers::builtin_kinds;
use crate::layers::keras::{FeatureOrder, KerasClass, KerasInput, KerasLayer};
use crate::models::Model;
use crate::models::architecture::{
    GraphConfig, InputConfig, LayerEntry, LayerRegistry, TensorRef, build_graph, check_fits_unbuilt,
};
use crate::{Error, Result};

/// Variables of one Keras layer, in the file's order: shape and values (as f32).
type LayerVars = Vec<(Vec<usize>, Vec<f32>)>;

/// A Keras tensor as a layer call sees it: where it comes from and its channels-last shape
/// (batch first, `None` as 0).
#[derive(Clone, Debug)]
struct KerasTensor {
    history: TensorRef,
    /// Keras's shape (batch first); absent in the nodes made for a `Sequential`'s layers
    /// that Keras saved without an input shape (weightless ones), found by `shape_of`.
    shape: Option<Vec<usize>>,
}

/// The translator: the file, and the Flatten outputs whose feature order differs.
struct Importer<'a> {
    path: &'a Path,
    /// Tensors holding the features of a channels-last `(h, w, c)` map flattened, by their
    /// full name (nested models' layers prefixed with `<model>.`).
    flattened: HashMap<TensorRef, (usize, usize, usize)>,
    /// The prefix of the (nested) model being translated: `""` at the top.
    scope: String,
    /// Keras's output shape (batch first, channels last) of each call translated so far, by
    /// full layer name and call: the input shape of a `Sequential`'s layer Keras saved
    /// without one, worked out by the translated layer's own shape rule.
    shapes: HashMap<(String, usize), Vec<usize>>,
}

impl Importer<'_> {
    /// The `(h, w, c)` of a channels-last Flatten whose features `t` carries, if any.
    fn flag(&self, t: &KerasTensor) -> Option<(usize, usize, usize)> {
        let (layer, node, index) = &t.history;
        self.flattened
            .get(&(format!("{}{layer}", self.scope), *node, *index))
            .copied()
    }

    /// The shape `t` has: its own, or the one recorded for the call that made it.
    fn shape_of(&self, t: &KerasTensor, layer: &str, class: &str) -> Result<Vec<usize>> {
        let (from, node, _) = &t.history;
        t.shape
            .clone()
            .or_else(|| {
                self.shapes
                    .get(&(format!("{}{from}", self.scope), *node))
                    .cloned()
            })
            .ok_or_else(|| {
                self.layer_error(
                    layer,
                    class,
                    format!(
                        "its input shape is not in the file and cannot be worked out after `{from}`"
                    ),
                )
            })
    }

    /// Records the Keras shape of each call's output from the translated layer's shape rule
    /// (a layer whose rule fails records nothing: the graph stage reports it).
    fn record_shapes(&mut self, name: &str, entry: &LayerEntry, node_inputs: &[Vec<KerasInput>]) {
        let Ok(op) = LayerRegistry::new().make(entry) else {
            return;
        };
        for (k, inputs) in node_inputs.iter().enumerate() {
            let per_sample: Vec<Vec<usize>> = inputs
                .iter()
                .map(|t| channels_first(&t.shape[1.min(t.shape.len())..]))
                .collect();
            if let Some(first) = op
                .output_shapes(name, &per_sample)
                .ok()
                .and_then(|outs| outs.into_iter().next())
            {
                let mut keras = vec![0];
                keras.extend(channels_last(&first));
                self.shapes
                    .insert((format!("{}{name}", self.scope), k), keras);
            }
        }
    }

    fn error(&self, message: String) -> Error {
        Error::KerasImport {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn layer_error(&self, layer: &str, class: &str, message: impl std::fmt::Display) -> Error {
        self.error(format!("layer `{layer}` ({class}): {message}"))
    }
}

/// The translation of Keras's `class`, from the layer files' `KINDS`.
fn keras_class(class: &str) -> Option<&'static KerasClass> {
    builtin_kinds()
        .flat_map(|kind| kind.keras_classes())
        .find(|k| k.class() == class)
}

/// Every `__keras_tensor__` in a node's `args`, in order.
fn keras_tensors(args: &Value, out: &mut Vec<KerasTensor>) {
    match args {
        Value::Array(items) => items.iter().for_each(|v| keras_tensors(v, out)),
        Value::Object(map)
            if map.get("class_name").and_then(Value::as_str) == Some("__keras_tensor__") =>
        {
            // A tensor without a config is left out; the layer then has too few inputs,
            // which the graph stage reports with the file's name.
            let Some(config) = map.get("config") else {
                return;
            };
            let history = config.get("keras_history").and_then(|h| {
                Some((
                    h.get(0)?.as_str()?.to_string(),
                    h.get(1)?.as_u64()? as usize,
                    h.get(2)?.as_u64()? as usize,
                ))
            });
            let shape = config
                .get("shape")
                .and_then(Value::as_array)
                .map(|s| s.iter().map(|d| d.as_u64().unwrap_or(0) as usize).collect());
            if let Some(history) = history {
                out.push(KerasTensor { history, shape });
            }
        }
        _ => {}
    }
}

/// A model input or output list: one `[layer, node, index]` triple or a list of them.
fn tensor_refs(value: &Value) -> Option<Vec<TensorRef>> {
    let triple = |v: &Value| {
        Some((
            v.get(0)?.as_str()?.to_string(),
            v.get(1)?.as_u64()? as usize,
            v.get(2)?.as_u64()? as usize,
        ))
    };
    match value.get(0)? {
        Value::String(_) => Some(vec![triple(value)?]),
        _ => value.as_array()?.iter().map(triple).collect(),
    }
}

/// Reads one zip entry whole.
fn zip_entry(
    archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
    name: &str,
) -> std::result::Result<Vec<u8>, String> {
    let mut file = archive.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    // The declared size is not trusted: cap the first allocation, let reading grow it.
    let mut bytes = Vec::with_capacity(file.size().min(1 << 28) as usize);
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(bytes)
}

/// Every top-level layer's variables in `model.weights.h5`, keyed by the `name` attribute of
/// its `vars` group (Keras 3.15 writes it), else by its group name (`conv2d_1`).
fn read_weights(h5: Vec<u8>) -> std::result::Result<HashMap<String, LayerVars>, String> {
    let file = hdf5_pure::File::from_bytes(h5).map_err(|e| format!("model.weights.h5: {e}"))?;
    let mut out = HashMap::new();
    if let Ok(layers) = file.root().group("layers") {
        read_layer_groups(&layers, "layers", "", 0, &mut out)?;
    }
    Ok(out)
}

/// Nesting depth beyond which a weights file is taken as corrupt (a cycle of group links).
const MAX_NESTING: usize = 32;

/// The variables of every layer group under `layers` (at `path`), keyed by `prefix` and the
/// group's `name` attribute (else its group name); a nested model's group holds a `layers`
/// group of its own, read with `<model name>.` added to the prefix.
fn read_layer_groups(
    layers: &hdf5_pure::Group,
    path: &str,
    prefix: &str,
    depth: usize,
    out: &mut HashMap<String, LayerVars>,
) -> std::result::Result<(), String> {
    if depth > MAX_NESTING {
        return Err(format!("{path}: models nested deeper than {MAX_NESTING}"));
    }
    let groups = layers.groups().map_err(|e| format!("{path}: {e}"))?;
    for group_name in groups {
        let path = format!("{path}/{group_name}");
        let group = layers
            .group(&group_name)
            .map_err(|e| format!("{path}: {e}"))?;
        let vars = group.group("vars").ok();
        let name = match &vars {
            Some(vars) => vars
                .attrs()
                .map_err(|e| format!("{path}/vars: {e}"))?
                .get("name")
                .and_then(|v| v.as_str())
                .map_or_else(|| group_name.clone(), str::to_owned),
            None => group_name.clone(),
        };
        if let Ok(inner) = group.group("layers") {
            read_layer_groups(
                &inner,
                &format!("{path}/layers"),
                &format!("{prefix}{name}."),
                depth + 1,
                out,
            )?;
        }
        let Some(vars) = vars else {
            continue;
        };
        let mut datasets = vars.datasets().map_err(|e| format!("{path}/vars: {e}"))?;
        // h5py lists `10` before `2`: order numerically.
        datasets.sort_by_key(|n| n.parse::<usize>().unwrap_or(usize::MAX));
        let mut values = Vec::new();
        for (i, dataset_name) in datasets.iter().enumerate() {
            let dataset_path = format!("{path}/vars/{dataset_name}");
            if dataset_name.parse::<usize>() != Ok(i) {
                return Err(format!("{dataset_path}: expected variable {i}"));
            }
            let dataset = vars
                .dataset(dataset_name)
                .map_err(|e| format!("{dataset_path}: {e}"))?;
            let shape: Vec<usize> = dataset
                .shape()
                .map_err(|e| format!("{dataset_path}: {e}"))?
                .iter()
                .map(|&d| d as usize)
                .collect();
            let data = read_f32(&dataset).map_err(|e| format!("{dataset_path}: {e}"))?;
            if data.len() != shape.iter().product::<usize>() {
                return Err(format!(
                    "{dataset_path}: {} values for shape {shape:?}",
                    data.len()
                ));
            }
            values.push((shape, data));
        }
        out.insert(format!("{prefix}{name}"), values);
    }
    Ok(())
}

/// A dataset as f32: f32/f64/integers directly, float16 (2-byte HDF5 float) and bfloat16 (a
/// 2-byte opaque type with `dtype="bfloat16"`, Keras's way) widened.
fn read_f32(dataset: &hdf5_pure::Dataset) -> std::result::Result<Vec<f32>, String> {
    use hdf5_pure::{Datatype, DatatypeByteOrder};
    let e = |e: hdf5_pure::Error| e.to_string();
    let halves = |little_endian: bool| -> std::result::Result<Vec<u16>, String> {
        let raw = dataset.read_raw().map_err(e)?;
        Ok(raw
            .chunks_exact(2)
            .map(|c| {
                if little_endian {
                    u16::from_le_bytes([c[0], c[1]])
                } else {
                    u16::from_be_bytes([c[0], c[1]])
                }
            })
            .collect())
    };
    match dataset.datatype().map_err(e)? {
        Datatype::FloatingPoint { size: 4 | 8, .. } | Datatype::FixedPoint { .. } => {
            dataset.read_f32().map_err(e)
        }
        Datatype::FloatingPoint {
            size: 2,
            byte_order,
            ..
        } => Ok(halves(byte_order != DatatypeByteOrder::BigEndian)?
            .into_iter()
            .map(|b| half::f16::from_bits(b).to_f32())
            .collect()),
        Datatype::Opaque { size: 2, .. }
            if dataset
                .attrs()
                .map_err(e)?
                .get("dtype")
                .and_then(|v| v.as_str())
                == Some("bfloat16") =>
        {
            Ok(halves(true)?
                .into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect())
        }
        other => Err(format!("unsupported datatype {other:?}")),
    }
}

impl Model {
    /// Imports a Keras 3 `.keras` file of a functional model (channels-last, as Keras builds
    /// it) as an NCHW model on `device` with the same outputs: axes, kernels and the feature
    /// order after `Flatten` are converted (see the module docs). Layers and options without
    /// an exact equivalent here are refused by name. Weights are f32.
    ///
    /// # Examples
    /// ```
    /// use candle_core::Device;
    /// use candle_functional::prelude::*;
    /// let err = Model::from_keras("no/such/model.keras", &Device::Cpu).unwrap_err();
    /// assert!(matches!(err, Error::Io { .. }));
    /// ```
    pub fn from_keras(path: impl AsRef<Path>, device: &Device) -> Result<Model> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let importer = Importer {
            path,
            flattened: HashMap::new(),
            scope: String::new(),
            shapes: HashMap::new(),
        };
        let (config, weights) = {
            let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes.as_slice()))
                .map_err(|e| importer.error(format!("not a .keras zip archive: {e}")))?;
            let config: Value = serde_json::from_slice(
                &zip_entry(&mut archive, "config.json").map_err(|e| importer.error(e))?,
            )
            .map_err(|e| importer.error(format!("config.json: {e}")))?;
            let h5 = zip_entry(&mut archive, "model.weights.h5").map_err(|e| importer.error(e))?;
            (config, read_weights(h5).map_err(|e| importer.error(e))?)
        };
        importer.import(&config, &weights, device)
    }
}

impl Model {
    /// The Keras layer classes [`Model::from_keras`] translates (besides `InputLayer` and
    /// nested functional models), sorted.
    ///
    /// # Examples
    /// ```
    /// let classes = candle_functional::Model::keras_classes();
    /// assert!(classes.contains(&"Conv2D") && classes.contains(&"LeakyReLU"));
    /// ```
    pub fn keras_classes() -> Vec<&'static str> {
        let mut classes: Vec<&'static str> = builtin_kinds()
            .flat_map(|kind| kind.keras_classes())
            .map(KerasClass::class)
            .collect();
        classes.sort_unstable();
        classes
    }
}

impl Importer<'_> {
    fn import(
        mut self,
        config: &Value,
        weights: &HashMap<String, LayerVars>,
        device: &Device,
    ) -> Result<Model> {
        let class = config
            .get("class_name")
            .and_then(Value::as_str)
            .unwrap_or("?");
        let model_config = match class {
            "Functional" => config["config"].clone(),
            "Sequential" => {
                sequential_as_functional(&config["config"]).map_err(|m| self.error(m))?
            }
            _ => {
                return Err(self.error(format!(
                    "the model is a `{class}`: only functional and Sequential models are imported"
                )));
            }
        };
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let graph = self.graph(&model_config, weights, device, &mut tensors)?;
        // Every error of the graph stage names the file: a shape that does not fit, a
        // dangling reference, a layer that cannot be built.
        let model = build_graph(&graph, &LayerRegistry::new()).map_err(|e| match e {
            Error::Config { message, .. } => self.error(message),
            other => self.error(other.to_string()),
        })?;
        let source = self.path.display().to_string();
        check_fits_unbuilt(&model, &tensors, &source)?;
        let model = model
            .build(device, DType::F32, 0)
            .map_err(|e| self.error(e.to_string()))?;
        model.set_weights_from(&tensors, &source)?;
        Ok(model)
    }

    /// Translates one functional graph (the model's, or a nested model's in `self.scope`),
    /// adding its converted weights to `tensors`.
    fn graph(
        &mut self,
        model_config: &Value,
        weights: &HashMap<String, LayerVars>,
        device: &Device,
        tensors: &mut HashMap<String, Tensor>,
    ) -> Result<GraphConfig> {
        let keras_layers = model_config
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| self.error("config.json has no layer list".into()))?;
        let mut entries = Vec::new();
        let exact_flattens = flattens_no_dense_absorbs(model_config, keras_layers);
        // Keras names weight groups `<snake_case class>[_n]`, counted per class in layer
        // order: the fallback key for files without the groups' `name` attributes.
        let mut class_counts: HashMap<String, usize> = HashMap::new();
        for layer in keras_layers {
            let class = layer
                .get("class_name")
                .and_then(Value::as_str)
                .unwrap_or("?");
            let name = layer
                .get("name")
                .or_else(|| layer["config"].get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| self.error(format!("a `{class}` layer has no name")))?
                .to_string();
            let layer_config = &layer["config"];
            let group = {
                let base = snake_case(class);
                let count = class_counts.entry(base.clone()).or_insert(0);
                let group = match *count {
                    0 => base,
                    n => format!("{base}_{n}"),
                };
                *count += 1;
                group
            };
            if class == "InputLayer" {
                let shape: Vec<Option<u64>> = layer_config
                    .get("batch_shape")
                    .and_then(Value::as_array)
                    .map(|s| s.iter().map(Value::as_u64).collect())
                    .unwrap_or_default();
                let dims: Option<Vec<usize>> = shape
                    .iter()
                    .skip(1)
                    .map(|d| d.map(|d| d as usize))
                    .collect();
                let dims = dims.filter(|d| !d.is_empty()).ok_or_else(|| {
                    self.layer_error(
                        &name,
                        class,
                        format!("input shape {shape:?}: every size but the batch must be known"),
                    )
                })?;
                let mut keras_shape = vec![0];
                keras_shape.extend(&dims);
                self.shapes
                    .insert((format!("{}{name}", self.scope), 0), keras_shape);
                let shape = channels_first(&dims);
                entries.push(LayerEntry {
                    name,
                    class_name: "InputLayer".into(),
                    config: serde_json::to_value(InputConfig { shape })
                        .map_err(|e| self.error(e.to_string()))?,
                    trainable: true,
                    regularizers: Vec::new(),
                    calls: Vec::new(),
                });
                continue;
            }
            let nodes = layer
                .get("inbound_nodes")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if nodes.is_empty() {
                // Keras saves only the layers its graph calls: a config without calls is
                // not one Keras wrote.
                return Err(self.layer_error(&name, class, "the layer is never called"));
            }
            // Each call's inputs, with the feature order of a channels-last Flatten they
            // carry, if any.
            let mut calls: Vec<Vec<TensorRef>> = Vec::new();
            let mut node_inputs: Vec<Vec<KerasInput>> = Vec::new();
            for (k, node) in nodes.iter().enumerate() {
                let mut inputs = Vec::new();
                keras_tensors(node.get("args").unwrap_or(&Value::Null), &mut inputs);
                if inputs.is_empty() {
                    return Err(self.layer_error(
                        &name,
                        class,
                        format!("call {k} has no tensor inputs"),
                    ));
                }
                calls.push(inputs.iter().map(|t| t.history.clone()).collect());
                node_inputs.push(
                    inputs
                        .iter()
                        .map(|t| {
                            Ok(KerasInput {
                                shape: self.shape_of(t, &name, class)?,
                                order: self.flag(t),
                            })
                        })
                        .collect::<Result<_>>()?,
                );
            }
            let flattened = |inputs: &Vec<KerasInput>| inputs.iter().any(|t| t.order.is_some());
            if class == "Functional" || class == "Sequential" {
                // A nested model: its own graph, translated in its own scope, weights under
                // `<model>.<layer>`. Its inputs must not carry a Flatten's channels-last
                // feature order: the inner layers would not know it.
                if node_inputs.iter().any(flattened) {
                    return Err(self.layer_error(
                        &name,
                        class,
                        "it reads the output of a Flatten of a channels-last map: not supported",
                    ));
                }
                let outer = std::mem::take(&mut self.scope);
                self.scope = format!("{outer}{name}.");
                let inner = match class {
                    "Sequential" => sequential_as_functional(layer_config)
                        .map_err(|m| self.layer_error(&name, class, m))
                        .and_then(|c| self.graph(&c, weights, device, tensors)),
                    _ => self.graph(layer_config, weights, device, tensors),
                };
                self.scope = outer;
                let inner = inner?;
                // The nested model's output shape, for a Sequential layer after it.
                if let [(out, node, 0)] = inner.outputs.as_slice() {
                    let key = (format!("{}{name}.{out}", self.scope), *node);
                    if let Some(shape) = self.shapes.get(&key).cloned() {
                        for k in 0..calls.len() {
                            self.shapes
                                .insert((format!("{}{name}", self.scope), k), shape.clone());
                        }
                    }
                }
                entries.push(LayerEntry {
                    name,
                    class_name: "Functional".into(),
                    config: serde_json::to_value(inner).map_err(|e| self.error(e.to_string()))?,
                    trainable: layer_config
                        .get("trainable")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                    regularizers: Vec::new(),
                    calls,
                });
                continue;
            }
            let keras_class = keras_class(class).ok_or_else(|| match class {
                "Model" => self.layer_error(
                    &name,
                    class,
                    "a nested subclassed `Model` has no graph in its config: rebuild it with the functional API or Sequential",
                ),
                other => self.layer_error(
                    &name,
                    class,
                    format!("the layer class `{other}` is not supported"),
                ),
            })?;
            if matches!(
                keras_class.order(),
                FeatureOrder::Refuses | FeatureOrder::Flattens
            ) && node_inputs.iter().any(flattened)
            {
                return Err(self.layer_error(
                    &name,
                    class,
                    "it reads the output of a Flatten of a channels-last map, whose feature order differs in NCHW: not supported",
                ));
            }
            // The translation reads the first call; a shared layer whose calls see different
            // feature orders would need two sets of weights.
            let orders =
                |inputs: &Vec<KerasInput>| -> Vec<_> { inputs.iter().map(|t| t.order).collect() };
            if node_inputs
                .iter()
                .any(|inputs| orders(inputs) != orders(&node_inputs[0]))
            {
                return Err(self.layer_error(
                    &name,
                    class,
                    "its calls read features in different orders (one of them a channels-last Flatten's): not supported",
                ));
            }
            let translated = keras_class
                .translate(&KerasLayer::new(class, layer_config, &node_inputs[0]))
                .map_err(|message| self.layer_error(&name, class, message))?;
            // A channels-last Flatten that no Dense absorbs: translated exactly, by a Permute
            // to (h, w, c) before it, so its features come out in Keras's order.
            let exact = matches!(keras_class.order(), FeatureOrder::Flattens)
                && exact_flattens.contains(&name)
                && node_inputs
                    .iter()
                    .all(|i| i.first().is_some_and(|t| t.shape.len() == 4));
            if exact {
                let permute = unique_name(&format!("{name}_to_hwc"), keras_layers);
                entries.push(LayerEntry {
                    name: permute.clone(),
                    class_name: "Permute".into(),
                    config: serde_json::json!({"dims": [2, 3, 1]}),
                    regularizers: Vec::new(),
                    trainable: true,
                    calls: std::mem::take(&mut calls),
                });
                calls = (0..node_inputs.len())
                    .map(|k| vec![(permute.clone(), k, 0)])
                    .collect();
            }
            // Feature order after a channels-last Flatten, passed along element-wise layers.
            for (k, inputs) in node_inputs.iter().enumerate() {
                let from = match (keras_class.order(), inputs.first()) {
                    _ if exact => None,
                    (FeatureOrder::Flattens, Some(t)) if t.shape.len() == 4 => {
                        Some((t.shape[1], t.shape[2], t.shape[3]))
                    }
                    (FeatureOrder::PassesOn, Some(t)) => t.order,
                    _ => None,
                };
                if let Some(hwc) = from {
                    self.flattened
                        .insert((format!("{}{name}", self.scope), k, 0), hwc);
                }
            }
            let vars = weights
                .get(&format!("{}{name}", self.scope))
                .or_else(|| weights.get(&format!("{}{group}", self.scope)));
            let mut translated = translated;
            for &(key, index) in &translated.config_from_vars {
                let (_, data) = vars.and_then(|v| v.get(index)).ok_or_else(|| {
                    self.layer_error(
                        &name,
                        class,
                        format!("model.weights.h5 has no variable {index} ({key})"),
                    )
                })?;
                translated.config[key] = serde_json::json!(data);
            }
            for (param, index, convert) in &translated.weights {
                let (shape, data) = vars.and_then(|v| v.get(*index)).ok_or_else(|| {
                    self.layer_error(
                        &name,
                        class,
                        format!("model.weights.h5 has no variable {index} ({param})"),
                    )
                })?;
                let value = Tensor::from_vec(data.clone(), shape.as_slice(), device)?;
                tensors.insert(
                    format!("{}{name}.{param}", self.scope),
                    convert.apply(value)?,
                );
            }
            let params: Vec<&str> = translated.weights.iter().map(|w| w.0).collect();
            let regularizers = keras_regularizers(layer_config, &params)
                .map_err(|message| self.layer_error(&name, class, message))?;
            let entry = LayerEntry {
                name,
                class_name: translated.class_name,
                config: translated.config,
                regularizers,
                trainable: layer_config
                    .get("trainable")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
                calls,
            };
            self.record_shapes(&entry.name.clone(), &entry, &node_inputs);
            entries.push(entry);
        }
        let ends = |key: &str| {
            tensor_refs(model_config.get(key).unwrap_or(&Value::Null)).ok_or_else(|| {
                self.error(format!(
                    "config.json: `{key}` is not a list of [layer, node, index]"
                ))
            })
        };
        let graph = GraphConfig {
            name: model_config
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("functional")
                .to_string(),
            layers: entries,
            inputs: ends("input_layers")?,
            outputs: ends("output_layers")?,
        };
        Ok(graph)
    }
}

/// A Keras layer's weight penalties (from its `config`: `kernel_regularizer`, `bias_regularizer`, `gamma_…`,
/// `depthwise_…`: `L1`, `L2`, `L1L2`), by the name of the weight in the translated layer.
/// Anything else set (an activity regularizer, another class) is refused: a model that
/// trained with it would silently train without it.
fn keras_regularizers(
    layer_config: &Value,
    params: &[&str],
) -> std::result::Result<Vec<(String, Regularizer)>, String> {
    let Some(config) = layer_config.as_object() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (key, value) in config {
        let Some(weight) = key.strip_suffix("_regularizer") else {
            continue;
        };
        if value.is_null() {
            continue;
        }
        let class = value
            .get("class_name")
            .and_then(Value::as_str)
            .unwrap_or("?");
        let factor = |name: &str| -> std::result::Result<f64, String> {
            match value.get("config").and_then(|c| c.get(name)) {
                None | Some(Value::Null) => Ok(0.0),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| format!("`{key}`: `{name}` is not a number")),
            }
        };
        let regularizer = match class {
            "L1" => Regularizer::l1(factor("l1")?),
            "L2" => Regularizer::l2(factor("l2")?),
            "L1L2" => Regularizer::l1_l2(factor("l1")?, factor("l2")?),
            other => {
                return Err(format!(
                    "`{key}` is a {other}: only L1, L2 and L1L2 are supported"
                ));
            }
        };
        let param = match weight {
            "activity" => {
                return Err(format!(
                    "`{key}` (a penalty on the layer's outputs) is not supported"
                ));
            }
            "depthwise" if params.contains(&"kernel") => "kernel",
            w if params.contains(&w) => w,
            _ => {
                return Err(format!(
                    "`{key}` is set, but the translated layer has no such weight (its weights: {})",
                    params.join(", ")
                ));
            }
        };
        out.push((param.to_string(), regularizer));
    }
    Ok(out)
}

/// A Keras `Sequential` config rewritten as the functional config it stands for: its
/// `InputLayer` (or one made from `build_input_shape`), then every layer called on the
/// previous one's output, with the input shape Keras recorded for it (`build_config`), if
/// any.
fn sequential_as_functional(config: &Value) -> std::result::Result<Value, String> {
    let layers = config
        .get("layers")
        .and_then(Value::as_array)
        .ok_or("a Sequential config without a layer list")?;
    let model_name = config
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("sequential");
    let name_of = |layer: &Value| -> Option<String> {
        layer
            .get("name")
            .or_else(|| layer["config"].get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let mut out = Vec::new();
    let mut rest = layers.as_slice();
    let input_name = match layers.first() {
        Some(first) if first.get("class_name").and_then(Value::as_str) == Some("InputLayer") => {
            rest = &layers[1..];
            out.push(first.clone());
            name_of(first).ok_or("a Sequential's InputLayer has no name")?
        }
        _ => {
            let shape = config
                .get("build_input_shape")
                .filter(|s| s.is_array())
                .ok_or("a Sequential without an InputLayer or a build_input_shape")?;
            let name = format!("{model_name}_input");
            out.push(serde_json::json!({
                "class_name": "InputLayer",
                "config": {"name": name, "batch_shape": shape},
            }));
            name
        }
    };
    let mut previous = input_name.clone();
    for layer in rest {
        let name = name_of(layer).ok_or("a layer of a Sequential has no name")?;
        // Keras records the input shape of the layers it built (those with weights); the
        // others' is worked out from the layer before (`Importer::shape_of`).
        let mut tensor = serde_json::json!({"keras_history": [previous, 0, 0]});
        if let Some(shape) = layer
            .get("build_config")
            .and_then(|b| b.get("input_shape"))
            .filter(|s| s.is_array())
        {
            tensor["shape"] = shape.clone();
        }
        let mut called = layer.clone();
        called["inbound_nodes"] = serde_json::json!([{
            "args": [{"class_name": "__keras_tensor__", "config": tensor}],
            "kwargs": {},
        }]);
        out.push(called);
        previous = name;
    }
    if rest.is_empty() {
        return Err("a Sequential without layers".into());
    }
    Ok(serde_json::json!({
        "name": model_name,
        "layers": out,
        "input_layers": [[input_name, 0, 0]],
        "output_layers": [[previous, 0, 0]],
    }))
}

/// A per-sample shape in candle's layout: `(h, w, c)` maps become `(c, h, w)`.
fn channels_first(shape: &[usize]) -> Vec<usize> {
    match shape {
        [h, w, c] => vec![*c, *h, *w],
        other => other.to_vec(),
    }
}

/// The inverse of [`channels_first`].
fn channels_last(shape: &[usize]) -> Vec<usize> {
    match shape {
        [c, h, w] => vec![*h, *w, *c],
        other => other.to_vec(),
    }
}

/// The channels-last Flattens whose features some reader takes in their order: a model
/// output, or a layer other than a `Dense` called once (reached through layers that pass
/// the order on). Only such a Dense can take the (h, w, c) order for free, in its kernel's
/// rows (a shared one may read other orders in its other calls); the others get an exact
/// translation.
fn flattens_no_dense_absorbs(model_config: &Value, layers: &[Value]) -> HashSet<String> {
    let name_of = |layer: &Value| {
        layer
            .get("name")
            .or_else(|| layer["config"].get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut class_of: HashMap<String, String> = HashMap::new();
    let mut calls: HashMap<String, usize> = HashMap::new();
    let mut readers: HashMap<String, Vec<String>> = HashMap::new();
    for layer in layers {
        let name = name_of(layer);
        let class = layer
            .get("class_name")
            .and_then(Value::as_str)
            .unwrap_or("?");
        class_of.insert(name.clone(), class.to_string());
        for node in layer
            .get("inbound_nodes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            *calls.entry(name.clone()).or_default() += 1;
            let mut inputs = Vec::new();
            keras_tensors(node.get("args").unwrap_or(&Value::Null), &mut inputs);
            for t in inputs {
                readers.entry(t.history.0).or_default().push(name.clone());
            }
        }
    }
    let outputs: HashSet<String> =
        tensor_refs(model_config.get("output_layers").unwrap_or(&Value::Null))
            .unwrap_or_default()
            .into_iter()
            .map(|(layer, _, _)| layer)
            .collect();
    let order_of = |name: &str| {
        class_of
            .get(name)
            .and_then(|class| keras_class(class))
            .map(KerasClass::order)
    };
    let mut exact = HashSet::new();
    for (name, class) in &class_of {
        if !matches!(
            keras_class(class).map(KerasClass::order),
            Some(FeatureOrder::Flattens)
        ) {
            continue;
        }
        // Depth-first through the layers that pass the order on.
        let mut stack = vec![name.clone()];
        let mut seen = HashSet::new();
        while let Some(at) = stack.pop() {
            if !seen.insert(at.clone()) {
                continue;
            }
            if outputs.contains(&at) {
                exact.insert(name.clone());
                break;
            }
            for reader in readers.get(&at).into_iter().flatten() {
                match order_of(reader) {
                    Some(FeatureOrder::Absorbs) if calls.get(reader) == Some(&1) => {}
                    Some(FeatureOrder::PassesOn) => stack.push(reader.clone()),
                    _ => {
                        exact.insert(name.clone());
                    }
                }
            }
        }
    }
    exact
}

/// `base`, or `base_2`, `base_3`, … where a Keras layer already has that name.
fn unique_name(base: &str, layers: &[Value]) -> String {
    let taken = |candidate: &str| {
        layers.iter().any(|l| {
            l.get("name")
                .or_else(|| l["config"].get("name"))
                .and_then(Value::as_str)
                == Some(candidate)
        })
    };
    let mut name = base.to_string();
    let mut n = 1;
    while taken(&name) {
        n += 1;
        name = format!("{base}_{n}");
    }
    name
}

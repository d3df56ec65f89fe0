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

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use crate::graph::op::snake_case;
use crate::layers::*;
use crate::models::Model;
use crate::models::architecture::{
    GraphConfig, InputConfig, LayerEntry, LayerRegistry, TensorRef, build_graph, check_fits_unbuilt,
};
use crate::{Error, Result};

/// Variables of one Keras layer, in the file's order: shape and values (as f32).
type LayerVars = Vec<(Vec<usize>, Vec<f32>)>;

/// How a Keras variable becomes this crate's weight.
#[derive(Clone, Debug)]
enum Convert {
    /// Same layout.
    Same,
    /// `(kh, kw, in, out)` or `(kh, kw, out, in)` to `(out, in, kh, kw)` / `(in, out, kh, kw)`.
    Kernel,
    /// `(kh, kw, in, multiplier)` to `(in * multiplier, 1, kh, kw)`.
    Depthwise,
    /// A Dense kernel `(h * w * c, out)` whose rows follow a channels-last Flatten, to rows in
    /// `(c, h, w)` order.
    DenseRowsFromHwc(usize, usize, usize),
    /// A vector of `h * w * c` features in `(h, w, c)` order, to `(c, h, w)` order.
    FeaturesFromHwc(usize, usize, usize),
    /// A Dense kernel `(in, out)` used as a 1x1 convolution kernel `(out, in, 1, 1)`.
    DenseAsPointwise,
    /// Axes reordered (LayerNormalization over several axes).
    Permute(Vec<usize>),
}

impl Convert {
    fn apply(&self, t: Tensor) -> Result<Tensor> {
        Ok(match self {
            Convert::Same => t,
            Convert::Kernel => t.permute((3, 2, 0, 1))?,
            Convert::Depthwise => {
                let (kh, kw, cin, mult) = t.dims4()?;
                t.reshape((kh, kw, cin * mult))?
                    .permute((2, 0, 1))?
                    .unsqueeze(1)?
            }
            Convert::DenseRowsFromHwc(h, w, c) => {
                let out = t.dim(1)?;
                t.reshape((*h, *w, *c, out))?
                    .permute((2, 0, 1, 3))?
                    .reshape((h * w * c, out))?
            }
            Convert::FeaturesFromHwc(h, w, c) => {
                t.reshape((*h, *w, *c))?.permute((2, 0, 1))?.flatten_all()?
            }
            Convert::DenseAsPointwise => {
                let (cin, out) = t.dims2()?;
                t.t()?.reshape((out, cin, 1, 1))?
            }
            Convert::Permute(order) => t.permute(order.as_slice())?,
        }
        .contiguous()?)
    }
}

/// One translated layer: this crate's class and config, and its weights.
struct Translated {
    class_name: String,
    config: Value,
    /// (this crate's weight name, Keras variable index, conversion).
    weights: Vec<(&'static str, usize, Convert)>,
}

impl Translated {
    fn new(class_name: &str, config: impl serde::Serialize) -> Result<Self> {
        Ok(Self {
            class_name: class_name.into(),
            config: serde_json::to_value(config)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?,
            weights: Vec::new(),
        })
    }

    fn weight(mut self, name: &'static str, index: usize, convert: Convert) -> Self {
        self.weights.push((name, index, convert));
        self
    }
}

/// A Keras tensor as a layer call sees it: where it comes from and its channels-last shape
/// (batch first, `None` as 0).
#[derive(Clone, Debug)]
struct KerasTensor {
    history: TensorRef,
    shape: Vec<usize>,
}

/// The translator: the file, and the Flatten outputs whose feature order differs.
struct Importer<'a> {
    path: &'a Path,
    /// Tensors holding the features of a channels-last `(h, w, c)` map flattened, by their
    /// full name (nested models' layers prefixed with `<model>.`).
    flattened: HashMap<TensorRef, (usize, usize, usize)>,
    /// The prefix of the (nested) model being translated: `""` at the top.
    scope: String,
}

impl Importer<'_> {
    /// The `(h, w, c)` of a channels-last Flatten whose features `t` carries, if any.
    fn flag(&self, t: &KerasTensor) -> Option<(usize, usize, usize)> {
        let (layer, node, index) = &t.history;
        self.flattened
            .get(&(format!("{}{layer}", self.scope), *node, *index))
            .copied()
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

    /// This crate's axis for Keras axis `axis` of a rank-`rank` tensor (batch included).
    fn axis(&self, layer: &str, class: &str, axis: i64, rank: usize) -> Result<isize> {
        let r = rank as i64;
        let a = if axis < 0 { axis + r } else { axis };
        if a < 1 || a >= r {
            return Err(self.layer_error(
                layer,
                class,
                format!("axis {axis} of a rank-{rank} tensor"),
            ));
        }
        Ok(if rank == 4 {
            [0, 2, 3, 1][a as usize]
        } else {
            a as isize
        })
    }

    fn translate(
        &self,
        name: &str,
        class: &str,
        config: &Value,
        inputs: &[KerasTensor],
    ) -> Result<Translated> {
        let bad = |message: String| self.layer_error(name, class, message);
        let field = |key: &str| config.get(key).unwrap_or(&Value::Null);
        let int = |key: &str| {
            field(key).as_u64().map(|v| v as usize).ok_or_else(|| {
                bad(format!(
                    "`{key}` is not a non-negative integer: {}",
                    field(key)
                ))
            })
        };
        let float = |key: &str| {
            field(key)
                .as_f64()
                .ok_or_else(|| bad(format!("`{key}` is not a number: {}", field(key))))
        };
        let flag = |key: &str, default: bool| field(key).as_bool().unwrap_or(default);
        let pair = |key: &str| -> Result<(usize, usize)> {
            match field(key) {
                Value::Array(v) if v.len() == 2 => match (v[0].as_u64(), v[1].as_u64()) {
                    (Some(a), Some(b)) => Ok((a as usize, b as usize)),
                    _ => Err(bad(format!(
                        "`{key}` is not a pair of integers: {}",
                        field(key)
                    ))),
                },
                Value::Number(n) if n.as_u64().is_some() => {
                    let v = n.as_u64().unwrap_or(0) as usize;
                    Ok((v, v))
                }
                other => Err(bad(format!("`{key}` is not a pair of integers: {other}"))),
            }
        };
        let square = |key: &str| -> Result<usize> {
            let (a, b) = pair(key)?;
            if a != b {
                return Err(bad(format!(
                    "`{key}` = ({a}, {b}): only equal values on both axes are supported"
                )));
            }
            Ok(a)
        };
        let padding = || match field("padding").as_str() {
            Some("valid") => Ok(Padding::Valid),
            Some("same") => Ok(Padding::Same),
            other => Err(bad(format!("padding {other:?} is not supported"))),
        };
        let activation = || match field("activation") {
            Value::Null => Ok(ActivationFn::Linear),
            Value::String(s) => s
                .parse::<ActivationFn>()
                .map_err(|_| bad(format!("activation `{s}` is not supported"))),
            other => Err(bad(format!("activation {other} is not supported"))),
        };
        let channels_last = || match field("data_format") {
            Value::Null => Ok(()),
            Value::String(s) if s == "channels_last" => Ok(()),
            other => Err(bad(format!(
                "data_format {other}: only channels_last models are imported"
            ))),
        };
        // One axis, given as an integer or a one-element list; in this crate's numbering.
        let one_axis = || -> Result<isize> {
            let axis = match field("axis") {
                Value::Array(v) if v.len() == 1 => v[0].as_i64(),
                v => v.as_i64(),
            }
            .ok_or_else(|| bad(format!("axis {} is not supported", field("axis"))))?;
            self.axis(
                name,
                class,
                axis,
                inputs.first().map_or(0, |t| t.shape.len()),
            )
        };
        let ranks: Vec<usize> = inputs.iter().map(|t| t.shape.len()).collect();
        let rank = ranks.first().copied().unwrap_or(0);
        let flattened: Vec<Option<(usize, usize, usize)>> =
            inputs.iter().map(|t| self.flag(t)).collect();
        // Layers that reorder or regroup features cannot take a channels-last Flatten's
        // output: its feature order is not this crate's.
        let element_wise = matches!(
            class,
            "Activation"
                | "ReLU"
                | "LeakyReLU"
                | "Dropout"
                | "Softmax"
                | "Dense"
                | "BatchNormalization"
                | "Add"
                | "Subtract"
                | "Multiply"
                | "Average"
                | "Maximum"
                | "Minimum"
        );
        if !element_wise && flattened.iter().any(Option::is_some) {
            return Err(bad(
                "it reads the output of a Flatten of a channels-last map, whose feature order differs in NCHW: not supported".into(),
            ));
        }
        let needs_rank4 = |what: &str| -> Result<()> {
            if rank != 4 {
                return Err(bad(format!(
                    "{what} needs a (batch, h, w, c) input, got rank {rank}"
                )));
            }
            Ok(())
        };
        let bias_index = |use_bias: bool, index: usize, t: Translated| {
            if use_bias {
                t.weight("bias", index, Convert::Same)
            } else {
                t
            }
        };

        Ok(match class {
            "Conv2D" | "Conv2DTranspose" | "DepthwiseConv2D" | "SeparableConv2D" => {
                channels_last()?;
                needs_rank4(class)?;
                if class == "Conv2DTranspose" && !field("output_padding").is_null() {
                    return Err(bad("output_padding is not supported".into()));
                }
                let use_bias = flag("use_bias", true);
                // The window options the four share, by this crate's field names; the rest
                // by class. The registry checks the config when the graph is rebuilt.
                let mut config = json!({
                    "kernel_size": pair("kernel_size")?,
                    "strides": square("strides")?,
                    "padding": padding()?,
                    "dilation": square("dilation_rate")?,
                    "use_bias": use_bias,
                    "activation": activation()?,
                });
                let weights: &[(&'static str, Convert)] = match class {
                    "Conv2D" => {
                        config["filters"] = json!(int("filters")?);
                        config["groups"] = json!(field("groups").as_u64().unwrap_or(1));
                        &[("kernel", Convert::Kernel)]
                    }
                    "Conv2DTranspose" => {
                        config["filters"] = json!(int("filters")?);
                        &[("kernel", Convert::Kernel)]
                    }
                    "DepthwiseConv2D" => {
                        config["depth_multiplier"] = json!(int("depth_multiplier")?);
                        &[("kernel", Convert::Depthwise)]
                    }
                    _ => {
                        config["filters"] = json!(int("filters")?);
                        config["depth_multiplier"] = json!(int("depth_multiplier")?);
                        &[
                            ("depthwise_kernel", Convert::Depthwise),
                            ("pointwise_kernel", Convert::Kernel),
                        ]
                    }
                };
                let mut t = Translated::new(class, config)?;
                for (index, (weight, convert)) in weights.iter().enumerate() {
                    t = t.weight(weight, index, convert.clone());
                }
                bias_index(use_bias, weights.len(), t)
            }
            "Dense" => {
                let use_bias = flag("use_bias", true);
                let units = int("units")?;
                let activation = activation()?;
                match (rank, flattened[0]) {
                    (2, hwc) => {
                        let convert = match hwc {
                            Some((h, w, c)) => Convert::DenseRowsFromHwc(h, w, c),
                            None => Convert::Same,
                        };
                        let t = Translated::new(
                            "Dense",
                            DenseConfig {
                                units,
                                use_bias,
                                activation,
                                ..Default::default()
                            },
                        )?
                        .weight("kernel", 0, convert);
                        bias_index(use_bias, 1, t)
                    }
                    (4, _) => {
                        // Keras's Dense on a map acts on each pixel's channels: a 1x1 conv.
                        let t = Translated::new(
                            "Conv2D",
                            Conv2DConfig {
                                filters: units,
                                kernel_size: (1, 1),
                                use_bias,
                                activation,
                                ..Default::default()
                            },
                        )?
                        .weight("kernel", 0, Convert::DenseAsPointwise);
                        bias_index(use_bias, 1, t)
                    }
                    _ => {
                        return Err(bad(format!(
                            "a Dense on a rank-{rank} input is not supported"
                        )));
                    }
                }
            }
            "BatchNormalization" => {
                let axis = one_axis()?;
                if axis != 1 {
                    return Err(bad(format!(
                        "normalizing over axis {} (this crate's layout) is not supported: only the channel axis",
                        axis
                    )));
                }
                if flag("renorm", false) || flag("synchronized", false) {
                    return Err(bad("renorm / synchronized are not supported".into()));
                }
                let (scale, center) = (flag("scale", true), flag("center", true));
                let convert = match flattened[0] {
                    Some((h, w, c)) => Convert::FeaturesFromHwc(h, w, c),
                    None => Convert::Same,
                };
                let mut t = Translated::new(
                    "BatchNormalization",
                    BatchNormConfig {
                        axis: 1,
                        momentum: float("momentum")?,
                        epsilon: float("epsilon")?,
                        center,
                        scale,
                        ..Default::default()
                    },
                )?;
                let mut index = 0;
                for (present, weight) in [
                    (scale, "gamma"),
                    (center, "beta"),
                    (true, "moving_mean"),
                    (true, "moving_variance"),
                ] {
                    if present {
                        t = t.weight(weight, index, convert.clone());
                        index += 1;
                    }
                }
                t
            }
            "LayerNormalization" => {
                if flag("rms_scaling", false) {
                    return Err(bad("rms_scaling is not supported".into()));
                }
                let keras_axes: Vec<i64> = match field("axis") {
                    Value::Array(v) => v.iter().filter_map(Value::as_i64).collect(),
                    v => v.as_i64().into_iter().collect(),
                };
                if keras_axes.is_empty() {
                    return Err(bad(format!("axis {} is not supported", field("axis"))));
                }
                let ours = keras_axes
                    .iter()
                    .map(|&a| self.axis(name, class, a, rank))
                    .collect::<Result<Vec<isize>>>()?;
                let mut sorted = ours.clone();
                sorted.sort_unstable();
                // gamma/beta have Keras's axis order; this crate's follows the sorted axes.
                let order: Vec<usize> = sorted
                    .iter()
                    .filter_map(|a| ours.iter().position(|b| b == a))
                    .collect();
                let convert = if order.len() > 1 {
                    Convert::Permute(order)
                } else {
                    Convert::Same
                };
                let (scale, center) = (flag("scale", true), flag("center", true));
                let mut t = Translated::new(
                    "LayerNormalization",
                    LayerNormalizationConfig {
                        axes: sorted,
                        epsilon: float("epsilon")?,
                        center,
                        scale,
                        ..Default::default()
                    },
                )?;
                let mut index = 0;
                for (present, weight) in [(scale, "gamma"), (center, "beta")] {
                    if present {
                        t = t.weight(weight, index, convert.clone());
                        index += 1;
                    }
                }
                t
            }
            "Activation" => Translated::new(
                "Activation",
                ActivationConfig {
                    function: activation()?,
                },
            )?,
            "ReLU" => {
                if field("threshold").as_f64().unwrap_or(0.0) != 0.0 {
                    return Err(bad("a non-zero threshold is not supported".into()));
                }
                Translated::new(
                    "ReLU",
                    ReLUConfig {
                        max_value: field("max_value").as_f64(),
                        negative_slope: field("negative_slope").as_f64().unwrap_or(0.0),
                    },
                )?
            }
            "LeakyReLU" => Translated::new(
                "ReLU",
                ReLUConfig {
                    max_value: None,
                    negative_slope: field("negative_slope").as_f64().unwrap_or(0.3),
                },
            )?,
            "Softmax" => {
                let axis = one_axis()?;
                Translated::new("Softmax", SoftmaxConfig { axis })?
            }
            "Add" | "Subtract" | "Multiply" | "Average" | "Maximum" | "Minimum" => {
                if flattened.iter().any(|f| *f != flattened[0]) {
                    return Err(bad(
                        "it merges a channels-last Flatten's output with another tensor: not supported".into(),
                    ));
                }
                Translated::new(class, Value::Null)?
            }
            "Concatenate" => Translated::new(
                "Concatenate",
                ConcatenateConfig {
                    axis: self.axis(name, class, field("axis").as_i64().unwrap_or(-1), rank)?,
                },
            )?,
            "Flatten" => Translated::new("Flatten", FlattenConfig)?,
            "Dropout" => {
                if !field("noise_shape").is_null() {
                    return Err(bad("noise_shape is not supported".into()));
                }
                Translated::new(
                    "Dropout",
                    DropoutConfig {
                        rate: float("rate")?,
                    },
                )?
            }
            "MaxPooling2D" | "AveragePooling2D" => {
                channels_last()?;
                needs_rank4(class)?;
                let pool = Pool2DConfig {
                    pool_size: pair("pool_size")?,
                    strides: if field("strides").is_null() {
                        None
                    } else {
                        Some(pair("strides")?)
                    },
                    padding: padding()?,
                };
                if class == "MaxPooling2D" {
                    Translated::new(class, MaxPooling2DConfig(pool))?
                } else {
                    Translated::new(class, AveragePooling2DConfig(pool))?
                }
            }
            "GlobalAveragePooling2D" | "GlobalMaxPooling2D" => {
                channels_last()?;
                needs_rank4(class)?;
                Translated::new(class, json!({ "keepdims": flag("keepdims", false) }))?
            }
            "ZeroPadding2D" | "Cropping2D" => {
                channels_last()?;
                needs_rank4(class)?;
                let key = if class == "ZeroPadding2D" {
                    "padding"
                } else {
                    "cropping"
                };
                let sides = |v: &Value| -> Option<(usize, usize)> {
                    Some((v.get(0)?.as_u64()? as usize, v.get(1)?.as_u64()? as usize))
                };
                let rows_cols = field(key)
                    .get(0)
                    .and_then(sides)
                    .zip(field(key).get(1).and_then(sides))
                    .ok_or_else(|| {
                        bad(format!(
                            "`{key}` {} is not ((top, bottom), (left, right))",
                            field(key)
                        ))
                    })?;
                Translated::new(class, json!({ key: rows_cols }))?
            }
            "UpSampling2D" => {
                channels_last()?;
                needs_rank4(class)?;
                let interpolation = match field("interpolation").as_str() {
                    Some("nearest") | None => Interpolation::Nearest,
                    Some("bilinear") => Interpolation::Bilinear,
                    Some(other) => {
                        return Err(bad(format!("interpolation `{other}` is not supported")));
                    }
                };
                Translated::new(
                    class,
                    UpSampling2DConfig {
                        size: pair("size")?,
                        interpolation,
                    },
                )?
            }
            "Reshape" | "Permute" => {
                let target_rank = match class {
                    "Reshape" => field("target_shape").as_array().map_or(0, Vec::len) + 1,
                    _ => field("dims").as_array().map_or(0, Vec::len) + 1,
                };
                if rank == 4 || target_rank == 4 {
                    return Err(bad(
                        "reshaping or permuting (batch, h, w, c) maps is not supported: the layouts differ".into(),
                    ));
                }
                if class == "Reshape" {
                    let target: Option<Vec<i64>> = field("target_shape")
                        .as_array()
                        .map(|v| v.iter().map(|d| d.as_i64().unwrap_or(-1)).collect());
                    Translated::new(
                        class,
                        ReshapeConfig {
                            target_shape: target.unwrap_or_default(),
                        },
                    )?
                } else {
                    let dims: Option<Vec<usize>> = field("dims")
                        .as_array()
                        .map(|v| v.iter().map(|d| d.as_u64().unwrap_or(0) as usize).collect());
                    Translated::new(
                        class,
                        PermuteConfig {
                            dims: dims.unwrap_or_default(),
                        },
                    )?
                }
            }
            "Sequential" | "Model" => {
                return Err(bad(
                    "nested Sequential models are not imported yet: build the inner model with the functional API".into(),
                ));
            }
            other => {
                return Err(bad(format!("the layer class `{other}` is not supported")));
            }
        })
    }
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
            if let (Some(history), Some(shape)) = (history, shape) {
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
        if class != "Functional" {
            return Err(self.error(format!(
                "the model is a `{class}`: only functional models are imported"
            )));
        }
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let graph = self.graph(&config["config"], weights, device, &mut tensors)?;
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
                let shape = match dims.as_slice() {
                    [h, w, c] => vec![*c, *h, *w],
                    _ => dims,
                };
                entries.push(LayerEntry {
                    name,
                    class_name: "InputLayer".into(),
                    config: serde_json::to_value(InputConfig { shape })
                        .map_err(|e| self.error(e.to_string()))?,
                    trainable: true,
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
            let mut calls = Vec::new();
            let mut first_inputs = Vec::new();
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
                if k == 0 {
                    first_inputs = inputs;
                }
            }
            if class == "Functional" {
                // A nested model: its own graph, translated in its own scope, weights under
                // `<model>.<layer>`. Its inputs must not carry a Flatten's channels-last
                // feature order: the inner layers would not know it.
                if nodes.iter().any(|node| {
                    let mut inputs = Vec::new();
                    keras_tensors(node.get("args").unwrap_or(&Value::Null), &mut inputs);
                    inputs.iter().any(|t| self.flag(t).is_some())
                }) {
                    return Err(self.layer_error(
                        &name,
                        class,
                        "it reads the output of a Flatten of a channels-last map: not supported",
                    ));
                }
                let outer = std::mem::take(&mut self.scope);
                self.scope = format!("{outer}{name}.");
                let inner = self.graph(layer_config, weights, device, tensors);
                self.scope = outer;
                entries.push(LayerEntry {
                    name,
                    class_name: "Functional".into(),
                    config: serde_json::to_value(inner?).map_err(|e| self.error(e.to_string()))?,
                    trainable: layer_config
                        .get("trainable")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                    calls,
                });
                continue;
            }
            let translated = self.translate(&name, class, layer_config, &first_inputs)?;
            // Feature order after a channels-last Flatten, passed along element-wise layers.
            for (k, node) in nodes.iter().enumerate() {
                let mut inputs = Vec::new();
                keras_tensors(node.get("args").unwrap_or(&Value::Null), &mut inputs);
                let from = match (class, inputs.first()) {
                    ("Flatten", Some(t)) if t.shape.len() == 4 => {
                        Some((t.shape[1], t.shape[2], t.shape[3]))
                    }
                    ("Dense" | "Flatten" | "Concatenate", _) => None,
                    (_, Some(t)) => self.flag(t),
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
            entries.push(LayerEntry {
                name,
                class_name: translated.class_name,
                config: translated.config,
                trainable: layer_config
                    .get("trainable")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
                calls,
            });
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

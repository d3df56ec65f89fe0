//! The vocabulary a layer file uses to say how a Keras 3 layer becomes it: [`KerasClass`] (a
//! class name and its translation), the [`KerasLayer`] view a translation reads (the layer's
//! Keras config and its channels-last inputs), and the [`Translated`] result (this crate's
//! class, config and weights, each with its layout [`Convert`]).
//!
//! The importer (`models/keras_import.rs`) reads the `.keras` file, walks the graph and looks
//! each class up in the layer files' `KINDS`; everything specific to one layer lives in that
//! layer's file. Translations return a plain message; the importer adds the file, the layer's
//! name and its class.

use serde_json::Value;

use crate::layers::Padding;

/// A translation's result: a message the importer prefixes with the layer and its class.
pub(crate) type Translation = std::result::Result<Translated, String>;

/// The features of a channels-last `(h, w, c)` map flattened by Keras: in `(h, w, c)` order,
/// where this crate's Flatten gives `(c, h, w)`.
pub(crate) type HwcOrder = (usize, usize, usize);

/// How a Keras class treats an input whose features are in a channels-last Flatten's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FeatureOrder {
    /// Refuses it: the layer reorders or regroups features (the default).
    Refuses,
    /// Acts feature by feature (or converts its per-feature weights): the output keeps the
    /// first input's order.
    PassesOn,
    /// Reads it through weights permuted to match (Dense): the output is in this crate's order.
    Absorbs,
    /// Refuses it, and flattens a channels-last map: the output is in `(h, w, c)` order.
    Flattens,
}

/// A Keras class a layer file translates, and how.
#[derive(Clone, Copy)]
pub(crate) struct KerasClass {
    class: &'static str,
    translate: fn(&KerasLayer) -> Translation,
    order: FeatureOrder,
}

impl KerasClass {
    /// Keras's `class` translated by `translate`; an input in a channels-last Flatten's order
    /// is refused.
    pub(crate) const fn new(
        class: &'static str,
        translate: fn(&KerasLayer) -> Translation,
    ) -> Self {
        Self {
            class,
            translate,
            order: FeatureOrder::Refuses,
        }
    }

    /// Sets how the class treats a channels-last Flatten's feature order.
    pub(crate) const fn feature_order(mut self, order: FeatureOrder) -> Self {
        self.order = order;
        self
    }

    /// Keras's class name.
    pub(crate) fn class(&self) -> &'static str {
        self.class
    }

    /// How the class treats a channels-last Flatten's feature order.
    pub(crate) fn order(&self) -> FeatureOrder {
        self.order
    }

    /// Translates one layer of this class.
    pub(crate) fn translate(&self, layer: &KerasLayer) -> Translation {
        (self.translate)(layer)
    }
}

/// One input of a Keras layer as the translation sees it.
#[derive(Clone, Debug)]
pub(crate) struct KerasInput {
    /// Channels-last shape, batch first (`None` as 0).
    pub(crate) shape: Vec<usize>,
    /// `Some((h, w, c))` when its features follow a channels-last Flatten of an `(h, w, c)` map.
    pub(crate) order: Option<HwcOrder>,
}

/// A Keras layer's class, config and inputs (those of its first call), with readers for the
/// config fields that report what they found.
pub(crate) struct KerasLayer<'a> {
    class: &'a str,
    config: &'a Value,
    inputs: &'a [KerasInput],
}

impl<'a> KerasLayer<'a> {
    /// The view of a layer of `class` with Keras config `config`, called on `inputs`.
    pub(crate) fn new(class: &'a str, config: &'a Value, inputs: &'a [KerasInput]) -> Self {
        Self {
            class,
            config,
            inputs,
        }
    }

    /// Keras's class name.
    pub(crate) fn class(&self) -> &str {
        self.class
    }

    /// The inputs of the first call.
    pub(crate) fn inputs(&self) -> &[KerasInput] {
        self.inputs
    }

    /// The rank (batch included) of the first input.
    pub(crate) fn rank(&self) -> usize {
        self.inputs.first().map_or(0, |t| t.shape.len())
    }

    /// The first input's channels-last Flatten order, if any.
    pub(crate) fn order(&self) -> Option<HwcOrder> {
        self.inputs.first().and_then(|t| t.order)
    }

    /// A config field (`null` when absent).
    pub(crate) fn field(&self, key: &str) -> &'a Value {
        self.config.get(key).unwrap_or(&Value::Null)
    }

    /// A non-negative integer field.
    pub(crate) fn int(&self, key: &str) -> Result<usize, String> {
        self.field(key)
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| format!("`{key}` is not a non-negative integer: {}", self.field(key)))
    }

    /// A number field.
    pub(crate) fn float(&self, key: &str) -> Result<f64, String> {
        self.field(key)
            .as_f64()
            .ok_or_else(|| format!("`{key}` is not a number: {}", self.field(key)))
    }

    /// A boolean field, `default` when absent.
    pub(crate) fn flag(&self, key: &str, default: bool) -> bool {
        self.field(key).as_bool().unwrap_or(default)
    }

    /// A pair of integers, or one integer for both.
    pub(crate) fn pair(&self, key: &str) -> Result<(usize, usize), String> {
        match self.field(key) {
            Value::Array(v) if v.len() == 2 => match (v[0].as_u64(), v[1].as_u64()) {
                (Some(a), Some(b)) => Ok((a as usize, b as usize)),
                _ => Err(format!(
                    "`{key}` is not a pair of integers: {}",
                    self.field(key)
                )),
            },
            Value::Number(n) if n.as_u64().is_some() => {
                let v = n.as_u64().unwrap_or(0) as usize;
                Ok((v, v))
            }
            other => Err(format!("`{key}` is not a pair of integers: {other}")),
        }
    }

    /// A pair whose two values are equal (this crate has one stride and one dilation).
    pub(crate) fn square(&self, key: &str) -> Result<usize, String> {
        let (a, b) = self.pair(key)?;
        if a != b {
            return Err(format!(
                "`{key}` = ({a}, {b}): only equal values on both axes are supported"
            ));
        }
        Ok(a)
    }

    /// `padding`: `valid` or `same`.
    pub(crate) fn padding(&self) -> Result<Padding, String> {
        match self.field("padding").as_str() {
            Some("valid") => Ok(Padding::Valid),
            Some("same") => Ok(Padding::Same),
            other => Err(format!("padding {other:?} is not supported")),
        }
    }

    /// A field naming one of a set (parsed by `T`'s `FromStr`); `T::default()` when absent.
    pub(crate) fn named<T: std::str::FromStr + Default>(&self, key: &str) -> Result<T, String> {
        match self.field(key) {
            Value::Null => Ok(T::default()),
            Value::String(s) => s
                .parse::<T>()
                .map_err(|_| format!("{key} `{s}` is not supported")),
            other => Err(format!("{key} {other} is not supported")),
        }
    }

    /// Refuses a `channels_first` layer: the importer converts channels-last models.
    pub(crate) fn channels_last(&self) -> Result<(), String> {
        match self.field("data_format") {
            Value::Null => Ok(()),
            Value::String(s) if s == "channels_last" => Ok(()),
            other => Err(format!(
                "data_format {other}: only channels_last models are imported"
            )),
        }
    }

    /// Refuses an input that is not a `(batch, h, w, c)` map.
    pub(crate) fn needs_rank4(&self) -> Result<(), String> {
        let rank = self.rank();
        if rank != 4 {
            return Err(format!(
                "{} needs a (batch, h, w, c) input, got rank {rank}",
                self.class
            ));
        }
        Ok(())
    }

    /// This crate's axis for Keras axis `axis` of a rank-`rank` tensor (batch included):
    /// on a map, `1 → 2, 2 → 3, 3 → 1`.
    pub(crate) fn axis(&self, axis: i64, rank: usize) -> Result<isize, String> {
        let r = rank as i64;
        let a = if axis < 0 { axis + r } else { axis };
        if a < 1 || a >= r {
            return Err(format!("axis {axis} of a rank-{rank} tensor"));
        }
        Ok(if rank == 4 {
            [0, 2, 3, 1][a as usize]
        } else {
            a as isize
        })
    }

    /// `axis`, an integer or a one-element list, in this crate's numbering for the first
    /// input.
    pub(crate) fn one_axis(&self) -> Result<isize, String> {
        let axis = match self.field("axis") {
            Value::Array(v) if v.len() == 1 => v[0].as_i64(),
            v => v.as_i64(),
        }
        .ok_or_else(|| format!("axis {} is not supported", self.field("axis")))?;
        self.axis(axis, self.rank())
    }
}

/// How a Keras variable becomes this crate's weight.
#[derive(Clone, Debug)]
pub(crate) enum Convert {
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
    /// Converts the Keras variable `t`; the result is contiguous.
    #[cfg(feature = "keras")]
    pub(crate) fn apply(&self, t: candle_core::Tensor) -> crate::Result<candle_core::Tensor> {
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
#[derive(Debug)]
pub(crate) struct Translated {
    /// This crate's class name (a registered type name).
    pub(crate) class_name: String,
    /// This crate's config of it.
    pub(crate) config: Value,
    /// (this crate's weight name, Keras variable index, conversion).
    pub(crate) weights: Vec<(&'static str, usize, Convert)>,
    /// (config field, Keras variable index): values Keras keeps as variables and this crate
    /// in the config (an adapted `Normalization`'s statistics), filled in by the importer.
    pub(crate) config_from_vars: Vec<(&'static str, usize)>,
}

impl Translated {
    /// A layer of this crate's class `class_name` with `config` and no weights yet.
    pub(crate) fn new(class_name: &str, config: impl serde::Serialize) -> Translation {
        Ok(Self {
            class_name: class_name.into(),
            config: serde_json::to_value(config).map_err(|e| e.to_string())?,
            weights: Vec::new(),
            config_from_vars: Vec::new(),
        })
    }

    /// Adds weight `name`, Keras's variable `index` converted by `convert`.
    /// Config field `key` set to Keras variable `index`, flattened to a list of numbers.
    pub(crate) fn config_from_var(mut self, key: &'static str, index: usize) -> Self {
        self.config_from_vars.push((key, index));
        self
    }

    pub(crate) fn weight(mut self, name: &'static str, index: usize, convert: Convert) -> Self {
        self.weights.push((name, index, convert));
        self
    }

    /// Adds `bias` as variable `index` when `use_bias`.
    pub(crate) fn bias(self, use_bias: bool, index: usize) -> Self {
        if use_bias {
            self.weight("bias", index, Convert::Same)
        } else {
            self
        }
    }

    /// Adds the weights that are `present`, in order, numbering Keras's variables from 0
    /// over the present ones only (Keras leaves out what a layer does not have).
    pub(crate) fn optional_weights(
        mut self,
        weights: &[(bool, &'static str)],
        convert: &Convert,
    ) -> Self {
        let mut index = 0;
        for &(present, name) in weights {
            if present {
                self = self.weight(name, index, convert.clone());
                index += 1;
            }
        }
        self
    }
}

//! What a layer file declares about its layers besides their forward pass: the name a model
//! file saves them under, how a saved config becomes the layer again, which Keras classes
//! become them, and a small example the round-trip test builds.
//!
//! Each layer file ends with a `pub(crate) const KINDS: &[LayerKind]`; `layers/mod.rs` lists
//! every file's `KINDS` once ([`builtin_kinds`](super::builtin_kinds)), and that one list
//! makes both the registry `Model::load` uses and the Keras importer's class table. A test
//! (`models::every_layer`) fails when a layer of `src/layers` is missing from it, or when a
//! listed layer does not save, load and rebuild to the same outputs.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::graph::{Configured, LayerOp};
use crate::layers::keras::KerasClass;
use crate::{Error, Result};

/// One saveable layer type: its saved name, its loader, its Keras classes and its example.
#[derive(Clone, Copy)]
pub(crate) struct LayerKind {
    type_name: fn() -> &'static str,
    // Read by the round-trip test, which matches the kinds to the public layer types.
    #[cfg_attr(not(test), allow(dead_code))]
    rust_type: fn() -> &'static str,
    load: fn(&Value) -> Result<Arc<dyn LayerOp>>,
    keras: &'static [KerasClass],
    #[cfg_attr(not(test), allow(dead_code))]
    example: fn() -> LayerExample,
}

impl LayerKind {
    /// The kind of config type `C`, saved under `C::default().type_name()`, with the example
    /// the round-trip test builds.
    pub(crate) const fn of<C: LayerOp + DeserializeOwned + Default + 'static>(
        example: fn() -> LayerExample,
    ) -> Self {
        Self {
            type_name: default_type_name::<C>,
            rust_type: std::any::type_name::<C>,
            load: load_config::<C>,
            keras: &[],
            example,
        }
    }

    /// The Keras classes that import as this kind (a class may translate to another kind when
    /// its input asks for it: Keras's `Dense` on a map becomes a 1x1 `Conv2D`).
    pub(crate) const fn keras(mut self, classes: &'static [KerasClass]) -> Self {
        self.keras = classes;
        self
    }

    /// The class name in saved files (`LayerOp::type_name`).
    pub(crate) fn type_name(&self) -> &'static str {
        (self.type_name)()
    }

    /// The layer a saved config describes.
    pub(crate) fn load(&self, config: &Value) -> Result<Arc<dyn LayerOp>> {
        (self.load)(config)
    }

    /// The Keras classes this file translates.
    pub(crate) fn keras_classes(&self) -> &'static [KerasClass] {
        self.keras
    }

    /// The config's Rust type, path included (`...::DenseConfig`).
    #[cfg(test)]
    pub(crate) fn rust_type(&self) -> &'static str {
        (self.rust_type)()
    }

    /// A small layer of this kind and its input shapes (batch left out).
    #[cfg(test)]
    pub(crate) fn example(&self) -> LayerExample {
        (self.example)()
    }
}

/// A layer and input shapes it accepts (batch left out), for the round-trip test.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct LayerExample {
    /// The layer.
    pub(crate) op: Arc<dyn LayerOp>,
    /// One shape per input.
    pub(crate) inputs: Vec<Vec<usize>>,
}

impl LayerExample {
    /// `layer` called on inputs of `shapes`.
    pub(crate) fn new<C: LayerOp + Clone + 'static>(
        layer: &Configured<C>,
        shapes: &[&[usize]],
    ) -> Self {
        Self {
            op: Arc::new(layer.config().clone()),
            inputs: shapes.iter().map(|s| s.to_vec()).collect(),
        }
    }
}

fn default_type_name<C: LayerOp + Default>() -> &'static str {
    C::default().type_name()
}

fn load_config<C: LayerOp + DeserializeOwned + Default + 'static>(
    config: &Value,
) -> Result<Arc<dyn LayerOp>> {
    parse_config::<C>(default_type_name::<C>(), config)
}

/// A saved config of class `type_name` parsed as `C`; refused when `C` names itself
/// differently (a registration under the wrong name).
pub(crate) fn parse_config<C: LayerOp + DeserializeOwned + 'static>(
    type_name: &str,
    config: &Value,
) -> Result<Arc<dyn LayerOp>> {
    let op: C = serde_json::from_value(config.clone()).map_err(|e| Error::Config {
        source_name: None,
        message: format!("a `{type_name}` config does not parse: {e}"),
    })?;
    if op.type_name() != type_name {
        return Err(Error::Config {
            source_name: None,
            message: format!(
                "`{type_name}` is registered with a config whose type name is `{}`",
                op.type_name()
            ),
        });
    }
    Ok(Arc::new(op))
}

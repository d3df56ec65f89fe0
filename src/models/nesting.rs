//! A model as a layer of another graph: its [`LayerOp`] (shape rule, forward with the
//! caller's pass, its layers as sublayers, saved as a `Functional` entry) and its [`Layer`]
//! identity. Apart from `model.rs` so that the model does not depend on its own serialization.

use std::sync::Arc;

use candle_core::Tensor;

use crate::graph::params::Pass;
use crate::graph::{Layer, LayerOp, LayerRef, Params};
use crate::models::architecture::nested_config;
use crate::models::model::Model;
use crate::{Error, Result};

impl LayerOp for Model {
    fn type_name(&self) -> &'static str {
        "Functional"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        nested_config(self)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        if inputs.len() != self.plan.inputs.len() {
            return Err(Error::InvalidInput {
                layer: layer.to_string(),
                message: format!(
                    "model expects {} input(s), got {}",
                    self.plan.inputs.len(),
                    inputs.len()
                ),
            });
        }
        for (shape, sym) in inputs.iter().zip(&self.plan.inputs) {
            if shape.as_slice() != sym.shape() {
                return Err(Error::ShapeMismatch {
                    layer: layer.to_string(),
                    what: format!("input `{}`", sym.layer().display_name()),
                    expected: sym.shape().to_vec(),
                    got: shape.clone(),
                });
            }
        }
        Ok(self
            .plan
            .outputs
            .iter()
            .map(|t| t.shape().to_vec())
            .collect())
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        // A nested model runs with its caller's seed and compute dtype.
        self.run_plan(inputs, Pass::of(params))
    }

    fn sublayers(&self) -> &[LayerRef] {
        &self.plan.layers
    }
}

impl Layer for Model {
    fn layer_ref(&self) -> LayerRef {
        self.identity
            .get_or_init(|| {
                // The copy inside the layer gets its own identity cell, so that it does not
                // hold the cell that holds it.
                let mut inner = self.clone();
                inner.identity = Arc::default();
                LayerRef::new(Arc::new(inner), self.name.clone(), Vec::new())
            })
            .clone()
    }
}

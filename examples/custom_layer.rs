//! A custom layer with learned weights, written outside the crate the way the built-in layers
//! are written inside it: a config struct with builder methods and Keras-style defaults, a
//! build-time shape rule from the crate's public shape helpers, a weight created from a
//! `ParamSpec`, and a `to_config` so that a model holding it can be saved in one file and
//! loaded back in a program that registers the type. docs/guide.md (section 9) walks
//! through it.
//!
//! The layer is ConvNeXt's "layer scale": each channel multiplied by a learned factor that
//! starts small, so a fresh residual branch starts close to zero.
//!
//! ```text
//! cargo run --release --example custom_layer
//! ```

use candle_core::{DType, Device, Tensor};
use candle_functional::layers::{non_batch_axis, one_input};
use candle_functional::models::LayerRegistry;
use candle_functional::prelude::*;
use candle_functional::{Initializer, IntoLayer, LayerOp, ParamSpec, Params};
use serde::{Deserialize, Serialize};

/// Config of the layer: the channel axis and the factors' starting value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LayerScaleConfig {
    /// The axis scaled channel by channel (1: NCHW channels, or the features of a vector).
    pub axis: isize,
    /// Every factor's starting value (ConvNeXt: 1e-6).
    pub init_value: f64,
}

impl Default for LayerScaleConfig {
    fn default() -> Self {
        Self {
            axis: 1,
            init_value: 1e-6,
        }
    }
}

impl LayerScaleConfig {
    /// Builder: the starting value.
    pub fn init_value(mut self, value: f64) -> Self {
        self.init_value = value;
        self
    }
}

impl LayerOp for LayerScaleConfig {
    fn type_name(&self) -> &'static str {
        "LayerScale"
    }

    /// What `Model::save` writes; `LayerRegistry::register` reads it back.
    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    /// The shape rule runs when the layer is called on symbolic tensors: a wrong graph fails
    /// there, naming the layer.
    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let x = one_input(layer, inputs)?;
        non_batch_axis(layer, self.axis, x.len())?;
        Ok(vec![x.to_vec()])
    }

    /// One weight, `gamma`, with as many factors as the axis has channels.
    fn param_specs(&self, inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        let x = &inputs[0];
        let axis = non_batch_axis("layer_scale", self.axis, x.len()).unwrap_or(1);
        vec![ParamSpec::new(
            "gamma",
            vec![x[axis - 1]],
            Initializer::Constant(self.init_value),
        )]
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        let axis = non_batch_axis("layer_scale", self.axis, x.rank() - 1)?;
        // gamma along `axis`, size 1 elsewhere, to broadcast.
        let mut shape = vec![1; x.rank()];
        shape[axis] = x.dim(axis)?;
        let gamma = params.get("gamma")?.reshape(shape)?;
        Ok(vec![x.broadcast_mul(&gamma)?])
    }
}

/// A ConvNeXt-style residual block: depthwise 7x7, layer norm, pointwise expansion, GELU,
/// pointwise projection, layer scale, residual add.
fn convnext_block(x: &SymbolicTensor, channels: usize) -> Result<SymbolicTensor> {
    let y = DepthwiseConv2D::new(7).padding(Padding::Same).call(x)?;
    let y = LayerNormalization::new().epsilon(1e-6).call(&y)?;
    let y = Conv2D::new(4 * channels, 1)
        .activation(ActivationFn::Gelu)
        .call(&y)?;
    let y = Conv2D::new(channels, 1).call(&y)?;
    let y = LayerScaleConfig::default()
        .init_value(0.1)
        .into_layer()
        .call(&y)?;
    Add::new().call_many(&[x.clone(), y])
}

fn main() -> Result<()> {
    let device = Device::Cpu;
    let x = Input::named("image", [3, 32, 32]);
    let h = Conv2D::new(32, 4).strides(4).call(&x)?;
    let h = convnext_block(&h, 32)?;
    let h = convnext_block(&h, 32)?;
    let h = GlobalAveragePooling2D::new().call(&h)?;
    let y = Dense::new(10).name("classifier").call(&h)?;
    let model = Model::new(&[x], &[y])?
        .named("tiny_convnext")
        .build(&device, DType::F32, 0)?;
    println!("{}", model.summary());

    // Save the whole model, then load it as another program would: the type is registered
    // by name, nothing else of the code above is needed.
    let path = std::env::temp_dir().join("candle_functional_custom_layer.safetensors");
    model.save(&path)?;
    let mut registry = LayerRegistry::new();
    registry.register::<LayerScaleConfig>("LayerScale");
    let loaded = Model::load_with(&path, &device, &registry)?;
    std::fs::remove_file(&path).ok();

    let batch = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &device)?;
    let a = model
        .forward(std::slice::from_ref(&batch), Mode::Eval)?
        .remove(0);
    let b = loaded.forward(&[batch], Mode::Eval)?.remove(0);
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("saved and loaded with a registered LayerScale: max |difference| = {diff}");

    // Without the registration, loading names the layer and its class.
    model.save(&path)?;
    match Model::load(&path, &device) {
        Err(e) => println!("without registering it: {e}"),
        Ok(_) => println!("loaded without registering LayerScale (unexpected)"),
    }
    std::fs::remove_file(&path).ok();
    Ok(())
}

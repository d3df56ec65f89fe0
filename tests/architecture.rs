//! Whole-model save and load: the architecture as JSON (in a safetensors file's metadata with
//! the weights) rebuilt without the code that built it.

// `&[x.clone()]` reads better than `std::slice::from_ref(&x)` in tests.
#![allow(clippy::cloned_ref_to_slice_refs)]

mod common;

use candle_core::{DType, Device, Tensor};
use candle_functional::layers::LambdaConfig;
use candle_functional::models::{LayerRegistry, create_res_net};
use candle_functional::prelude::*;
use candle_functional::{Configured, LayerOp, Params};
use common::max_abs_diff;

fn noise(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Saves `model` (built), loads it back with `registry`, and checks that summaries, weights
/// and outputs (inference and training mode) are identical.
fn assert_round_trip(model: &Model, inputs: &[Tensor], registry: &LayerRegistry) -> Model {
    let loaded = save_and_load(model, inputs, registry);
    assert_eq!(loaded.summary(), model.summary());
    assert_eq!(loaded.to_json().unwrap(), model.to_json().unwrap());
    loaded
}

/// Saves and loads `model`; weights and outputs must be identical.
fn save_and_load(model: &Model, inputs: &[Tensor], registry: &LayerRegistry) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    model.save(&path).unwrap();
    let loaded = Model::load_with(&path, &Device::Cpu, registry).unwrap();
    let (a, b) = (model.weight_map().unwrap(), loaded.weight_map().unwrap());
    assert_eq!(a.len(), b.len());
    for (name, value) in &a {
        assert_eq!(max_abs_diff(value, &b[name]), 0.0, "{name}");
    }
    for mode in [Mode::Eval, Mode::Train] {
        let want = model.forward(inputs, mode).unwrap();
        let got = loaded.forward(inputs, mode).unwrap();
        assert_eq!(want.len(), got.len());
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(w.dims(), g.dims());
            assert_eq!(max_abs_diff(w, g), 0.0, "{mode:?}");
        }
    }
    loaded
}

#[test]
fn seed_resnet_round_trips() {
    let model = create_res_net()
        .unwrap()
        .build(&Device::Cpu, DType::F32, 3)
        .unwrap();
    assert_round_trip(&model, &[noise(&[2, 3, 32, 32], 1)], &LayerRegistry::new());
}

/// A small U-Net: two encoder levels, a transposed-convolution and an upsampling decoder,
/// skips by concatenation, a per-pixel softmax.
fn unet() -> Model {
    let same = Padding::Same;
    let x = Input::named("image", [3, 16, 16]);
    let e1 = Conv2D::new(8, 3)
        .padding(same)
        .activation(ActivationFn::Relu)
        .call(&x)
        .unwrap();
    let p1 = MaxPooling2D::new(2).call(&e1).unwrap();
    let e2 = SeparableConv2D::new(16, 3).padding(same).call(&p1).unwrap();
    let e2 = BatchNorm::new().call(&e2).unwrap();
    let p2 = MaxPooling2D::new(2).call(&e2).unwrap();
    let b = DepthwiseConv2D::new(3).padding(same).call(&p2).unwrap();
    let b = LayerNormalization::new().call(&b).unwrap();
    let u2 = Conv2DTranspose::new(16, 2).strides(2).call(&b).unwrap();
    let d2 = Concatenate::new(1).call_many(&[u2, e2]).unwrap();
    let d2 = Conv2D::new(8, 3).padding(same).call(&d2).unwrap();
    let u1 = UpSampling2D::new(2).bilinear().call(&d2).unwrap();
    let d1 = Concatenate::new(1).call_many(&[u1, e1]).unwrap();
    let d1 = ZeroPadding2D::new(1).call(&d1).unwrap();
    let d1 = Cropping2D::new(1).call(&d1).unwrap();
    let logits = Conv2D::new(3, 1).call(&d1).unwrap();
    let probs = Softmax::new().call(&logits).unwrap();
    Model::new(&[x], &[probs]).unwrap().named("unet")
}

#[test]
fn unet_round_trips() {
    let model = unet().build(&Device::Cpu, DType::F32, 4).unwrap();
    assert_round_trip(&model, &[noise(&[2, 3, 16, 16], 2)], &LayerRegistry::new());
}

/// Two inputs, two outputs, a nested model called twice (shared weights), a shared Dense,
/// a frozen layer, reshapes and a permutation.
fn two_input_model() -> Model {
    let patch = Input::named("patch", [2, 4, 4]);
    let h = Conv2D::new(4, 3)
        .padding(Padding::Same)
        .call(&patch)
        .unwrap();
    let h = GlobalAveragePooling2D::new().call(&h).unwrap();
    let encoder = Model::new(&[patch], &[h]).unwrap().named("encoder");

    let a = Input::named("left", [2, 4, 4]);
    let b = Input::named("right", [2, 4, 4]);
    let meta = Input::named("meta", [6]);
    let ea = encoder.call(&a).unwrap();
    let eb = encoder.call(&b).unwrap();
    let shared = Dense::new(4).name("shared");
    let sa = shared.call(&ea).unwrap();
    let sb = shared.call(&eb).unwrap();
    let m = Reshape::new([3, 2]).call(&meta).unwrap();
    let m = Permute::new([2, 1]).call(&m).unwrap();
    let m = Flatten::new().call(&m).unwrap();
    let m = Dense::new(4).name("frozen").call(&m).unwrap();
    let joined = Concatenate::new(1)
        .call_many(&[sa.clone(), sb.clone(), m])
        .unwrap();
    let class = Dense::new(3)
        .activation(ActivationFn::Softmax)
        .name("class")
        .call(&joined)
        .unwrap();
    let distance = Subtract::new().call_many(&[sa, sb]).unwrap();
    let distance = Dense::new(1).name("distance").call(&distance).unwrap();
    let model = Model::new(&[a, b, meta], &[class, distance]).unwrap();
    model
        .get_layer("frozen")
        .unwrap()
        .layer()
        .set_trainable(false);
    model
}

#[test]
fn two_input_two_output_model_with_nested_and_shared_layers_round_trips() {
    let model = two_input_model()
        .build(&Device::Cpu, DType::F32, 5)
        .unwrap();
    let inputs = [
        noise(&[3, 2, 4, 4], 3),
        noise(&[3, 2, 4, 4], 4),
        noise(&[3, 6], 5),
    ];
    let loaded = assert_round_trip(&model, &inputs, &LayerRegistry::new());
    assert!(!loaded.get_layer("frozen").unwrap().layer().trainable());
    assert_eq!(
        loaded.trainable_weights().unwrap().len(),
        model.trainable_weights().unwrap().len()
    );
}

#[test]
fn mobilenet_block_round_trips_in_f64() {
    let x = Input::new([8, 8, 8]);
    let h = DepthwiseConv2D::new(3)
        .padding(Padding::Same)
        .use_bias(false)
        .call(&x)
        .unwrap();
    let h = BatchNorm::new().call(&h).unwrap();
    let h = ReLU::new().max_value(6.0).call(&h).unwrap();
    let h = Conv2D::new(16, 1).use_bias(false).call(&h).unwrap();
    let h = BatchNorm::new().call(&h).unwrap();
    let model = Model::new(&[x], &[h])
        .unwrap()
        .build(&Device::Cpu, DType::F64, 6)
        .unwrap();
    let input = noise(&[2, 8, 8, 8], 6).to_dtype(DType::F64).unwrap();
    let loaded = assert_round_trip(&model, &[input], &LayerRegistry::new());
    assert!(
        loaded
            .weights()
            .unwrap()
            .iter()
            .all(|w| w.var().dtype() == DType::F64)
    );
}

/// A custom layer that can be saved: `x * factor`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct ScaleConfig {
    factor: f64,
}

impl LayerOp for ScaleConfig {
    fn type_name(&self) -> &'static str {
        "Scale"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, _layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        Ok(inputs.to_vec())
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        Ok(vec![(&inputs[0] * self.factor)?])
    }
}

#[test]
fn custom_layers_load_once_registered_and_name_their_class_otherwise() {
    let x = Input::new([3]);
    let y = Configured::from_config(ScaleConfig { factor: 2.5 })
        .name("scale")
        .call(&x)
        .unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("custom.safetensors");
    model.save(&path).unwrap();

    let err = Model::load(&path, &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("`scale`") && err.contains("`Scale`") && err.contains("custom.safetensors"),
        "{err}"
    );

    let mut registry = LayerRegistry::new();
    registry.register::<ScaleConfig>("Scale");
    let loaded = assert_round_trip(&model, &[noise(&[2, 3], 7)], &registry);
    let out = loaded
        .forward(
            &[Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap()],
            Mode::Eval,
        )
        .unwrap();
    assert_eq!(out[0].to_vec2::<f32>().unwrap(), [[2.5; 3]]);
}

#[test]
fn a_lambda_cannot_be_saved_and_says_so_by_name() {
    let x = Input::new([3]);
    let h = Dense::new(3).call(&x).unwrap();
    let y = Configured::from_config(LambdaConfig::new(|t| Ok(t.exp()?)))
        .name("my_exp")
        .call(&h)
        .unwrap();
    let model = Model::new(&[x], &[y]).unwrap();
    let err = model.to_json().unwrap_err();
    assert!(matches!(err, Error::NotSerializable { .. }));
    let message = err.to_string();
    assert!(
        message.contains("`my_exp`") && message.contains("Lambda"),
        "{message}"
    );

    // Inside a nested model, the full name.
    let outer_x = Input::new([3]);
    let outer_y = model.named("inner").call(&outer_x).unwrap();
    let outer = Model::new(&[outer_x], &[outer_y]).unwrap();
    let message = outer.to_json().unwrap_err().to_string();
    assert!(message.contains("`inner.my_exp`"), "{message}");
}

#[test]
fn newer_formats_and_broken_configs_are_refused_clearly() {
    let model = two_input_model();
    let json = model.to_json().unwrap();

    let newer = json.replace("\"format_version\": 1", "\"format_version\": 2");
    let err = Model::from_json(&newer).unwrap_err().to_string();
    assert!(
        err.contains("format version 2") && err.contains("newer"),
        "{err}"
    );

    let unknown = json.replace(
        "\"class_name\": \"Subtract\"",
        "\"class_name\": \"Frobnicate\"",
    );
    let err = Model::from_json(&unknown).unwrap_err().to_string();
    assert!(
        err.contains("Frobnicate") && err.contains("subtract"),
        "{err}"
    );

    // A call whose input no layer makes, and an output that is not in the graph.
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let layers = value["model"]["layers"].as_array_mut().unwrap();
    let class = layers.iter_mut().find(|l| l["name"] == "class").unwrap();
    class["calls"][0][0] = serde_json::json!(["nowhere", 0, 0]);
    let err = Model::from_json(&value.to_string())
        .unwrap_err()
        .to_string();
    assert!(err.contains("`class`") && err.contains("nowhere"), "{err}");
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["model"]["outputs"][1] = serde_json::json!(["distance", 1, 0]);
    let err = Model::from_json(&value.to_string())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not in the graph"), "{err}");

    let bad_config = json.replace("\"units\": 3", "\"units\": \"three\"");
    let err = Model::from_json(&bad_config).unwrap_err().to_string();
    assert!(err.contains("`class`") && err.contains("three"), "{err}");

    assert!(Model::from_json("not json").is_err());
}

#[test]
fn a_weights_only_file_is_not_a_model() {
    let model = two_input_model()
        .build(&Device::Cpu, DType::F32, 5)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    model.save_weights(&path).unwrap();
    let err = Model::load(&path, &Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("weights only") && err.contains("load_weights"),
        "{err}"
    );
}

#[test]
fn a_sub_model_cut_inside_a_graph_saves_its_start_as_an_input() {
    let model = two_input_model()
        .build(&Device::Cpu, DType::F32, 5)
        .unwrap();
    let start = model.get_layer("frozen").unwrap().input().unwrap();
    let end = model.get_layer("frozen").unwrap().output().unwrap();
    let head = Model::new(&[start], &[end]).unwrap();
    let loaded = save_and_load(&head, &[noise(&[2, 6], 8)], &LayerRegistry::new());
    assert_eq!(loaded.inputs()[0].shape(), &[6]);
    assert_eq!(loaded.inputs()[0].layer().name(), Some("flatten_output_0"));
}

#[test]
fn a_config_that_does_not_fit_its_weights_is_refused_before_building() {
    let x = Input::new([4]);
    let y = Dense::new(2).name("head").call(&x).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edited.safetensors");
    model.save(&path).unwrap();
    // Edit the architecture to a layer of four billion units (a file without a checksum, as
    // another tool could write it): loading must refuse, not allocate 64 GB.
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = header.metadata().clone().unwrap();
    metadata.retain(|k, _| k == "candle_functional.architecture");
    let json =
        metadata["candle_functional.architecture"].replace("\"units\": 2", "\"units\": 4000000000");
    metadata.insert("candle_functional.architecture".into(), json);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let edited = safetensors::serialize(views, Some(metadata)).unwrap();
    std::fs::write(&path, edited).unwrap();
    let err = Model::load(&path, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::WeightsMismatch { .. }), "{err}");
    assert!(err.to_string().contains("4000000000"), "{err}");
}

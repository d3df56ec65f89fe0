//! The same network, with the same weights, gives Keras's outputs.
//!
//! `tests/fixtures/keras_parity.safetensors` is written by `scripts/keras_reference.py parity`
//! (Keras 3.15.1, TensorFlow 2.21.0): a small residual network over a 9x8 input (so 'same'
//! stride-2 convolutions pad 1/1 rows and 0/1 columns) that uses every merge layer,
//! Concatenate, ZeroPadding2D, both poolings, global pooling, Flatten and Dense, with its
//! weights, an input batch, and Keras's outputs in inference and training mode, plus the
//! moving statistics after the training call.

// `&[x.clone()]` reads better than `std::slice::from_ref(&x)` in tests.
#![allow(clippy::cloned_ref_to_slice_refs)]

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_functional::prelude::*;
use common::{max_abs, max_abs_diff};

const TOLERANCE: f64 = 1e-4;

fn fixture() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keras_parity.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The network of `keras_reference.py parity`, layer for layer.
fn parity_model() -> Model {
    let same = Padding::Same;
    let input = Input::named("input", [3, 9, 8]);
    let x = BatchNorm::new().name("bn_in").call(&input).unwrap();
    let x = Conv2D::new(8, 3)
        .padding(same)
        .name("conv_a")
        .call(&x)
        .unwrap();
    let x = ReLU::new().name("relu_a").call(&x).unwrap();
    let x = BatchNorm::new().name("bn_a").call(&x).unwrap();
    let y = Conv2D::new(8, 3)
        .strides(2)
        .padding(same)
        .name("conv_b")
        .call(&x)
        .unwrap();
    let y = ReLU::new().name("relu_b").call(&y).unwrap();
    let y = BatchNorm::new().name("bn_b").call(&y).unwrap();
    let y = Conv2D::new(8, 3)
        .padding(same)
        .name("conv_c")
        .call(&y)
        .unwrap();
    let s = Conv2D::new(8, 1)
        .strides(2)
        .padding(same)
        .name("proj")
        .call(&x)
        .unwrap();
    let add = Add::new()
        .name("add")
        .call_many(&[s.clone(), y.clone()])
        .unwrap();
    let sub = Subtract::new().name("sub").call_many(&[s, y]).unwrap();
    let mul = Multiply::new()
        .name("mul")
        .call_many(&[add.clone(), sub.clone()])
        .unwrap();
    let avg = Average::new()
        .name("avg")
        .call_many(&[add.clone(), sub.clone(), mul])
        .unwrap();
    let mx = Maximum::new()
        .name("max")
        .call_many(&[add, avg.clone()])
        .unwrap();
    let mn = Minimum::new().name("min").call_many(&[sub, avg]).unwrap();
    let cat = Concatenate::new(1)
        .name("concat")
        .call_many(&[mx, mn])
        .unwrap();
    let z = Conv2D::new(6, 3)
        .strides(2)
        .padding(same)
        .use_bias(false)
        .name("conv_d")
        .call(&cat)
        .unwrap();
    let z = Activation::new(ActivationFn::Tanh)
        .name("tanh")
        .call(&z)
        .unwrap();
    let p = ZeroPadding2D::asymmetric((1, 0), (0, 1))
        .name("zpad")
        .call(&z)
        .unwrap();
    let p = MaxPooling2D::new(2).name("maxpool").call(&p).unwrap();
    let f = Flatten::new().name("flatten").call(&p).unwrap();
    let out0 = Dense::new(10)
        .activation(ActivationFn::Softmax)
        .name("dense")
        .call(&f)
        .unwrap();
    let g = GlobalAveragePooling2D::new()
        .name("gap")
        .call(&cat)
        .unwrap();
    let g2 = AveragePooling2D::new(2).name("avgpool").call(&cat).unwrap();
    let f2 = Flatten::new().name("flatten_2").call(&g2).unwrap();
    let h = Concatenate::new(1)
        .name("concat_2")
        .call_many(&[g, f2])
        .unwrap();
    let out1 = Dense::new(4).name("dense_2").call(&h).unwrap();
    Model::new(&[input], &[out0, out1]).unwrap().named("parity")
}

/// A model built with the fixture's weights (a fresh copy each time).
fn loaded_model(fx: &HashMap<String, Tensor>) -> Model {
    let model = parity_model()
        .build(&Device::Cpu, candle_core::DType::F32, 0)
        .unwrap();
    let names: Vec<String> = model
        .weights()
        .unwrap()
        .iter()
        .map(|w| w.name().to_string())
        .collect();
    let weights: HashMap<String, Tensor> = names
        .into_iter()
        .map(|n| {
            let t = fx
                .get(&n)
                .unwrap_or_else(|| panic!("fixture lacks {n}"))
                .clone();
            (n, t)
        })
        .collect();
    model.set_weights(&weights).unwrap();
    model
}

#[test]
fn inference_matches_keras() {
    let fx = fixture();
    let model = loaded_model(&fx);
    let out = model.forward(&[fx["input"].clone()], Mode::Eval).unwrap();
    let d0 = max_abs_diff(&out[0], &fx["eval.out0"]);
    let d1 = max_abs_diff(&out[1], &fx["eval.out1"]);
    println!("max abs diff vs Keras, inference: out0 {d0:.3e}, out1 {d1:.3e}");
    assert!(d0 <= TOLERANCE && d1 <= TOLERANCE, "{d0} {d1}");
}

#[test]
fn inner_tensor_matches_keras_through_a_sub_model() {
    let fx = fixture();
    let model = loaded_model(&fx);
    let concat = model.layer("concat").unwrap().clone();
    let sub_out = sub_model_output(&model, "concat");
    assert!(sub_out.layer().same_layer(&concat));
    let sub = Model::new(model.inputs(), &[sub_out]).unwrap();
    let out = sub.forward(&[fx["input"].clone()], Mode::Eval).unwrap();
    let d = max_abs_diff(&out[0], &fx["eval.concat"]);
    assert!(d <= TOLERANCE, "{d}");
}

/// Walks the graph from the outputs to the tensor produced by `layer`.
fn sub_model_output(model: &Model, layer: &str) -> SymbolicTensor {
    let mut stack: Vec<SymbolicTensor> = model.outputs().to_vec();
    while let Some(t) = stack.pop() {
        if t.layer().name() == Some(layer) {
            return t;
        }
        stack.extend(t.inputs());
    }
    panic!("no tensor from {layer}");
}

#[test]
fn training_mode_matches_keras_outputs_and_moving_statistics() {
    let fx = fixture();
    let model = loaded_model(&fx);
    let out = model.forward(&[fx["input"].clone()], Mode::Train).unwrap();
    let d0 = max_abs_diff(&out[0], &fx["train.out0"]);
    let d1 = max_abs_diff(&out[1], &fx["train.out1"]);
    println!("max abs diff vs Keras, training: out0 {d0:.3e}, out1 {d1:.3e}");
    assert!(d0 <= TOLERANCE && d1 <= TOLERANCE, "{d0} {d1}");
    let weights = model.weight_map().unwrap();
    for bn in ["bn_in", "bn_a", "bn_b"] {
        for stat in ["moving_mean", "moving_variance"] {
            let got = &weights[&format!("{bn}.{stat}")];
            let want = &fx[&format!("train_state.{bn}.{stat}")];
            // Relative: bn_in's variance is in the thousands.
            let scale = max_abs(want);
            let d = max_abs_diff(got, want) / scale;
            assert!(d <= TOLERANCE, "{bn}.{stat}: relative diff {d}");
        }
    }
}

#[test]
fn stride_two_same_padding_is_asymmetric_like_tensorflow() {
    // 9 rows pad 1/1, 8 columns pad 0/1 for a 3x3 stride-2 window.
    assert_eq!(candle_functional::layers::same_padding(9, 3, 2, 1), (1, 1));
    assert_eq!(candle_functional::layers::same_padding(8, 3, 2, 1), (0, 1));
}

/// Single layers against Keras 3.15 (`scripts/keras_reference.py layers` writes the fixture):
/// UpSampling2D (nearest and bilinear, square and rectangular factors), GlobalMaxPooling2D,
/// Cropping2D, and the leaky_relu, elu and hard_swish activations.
#[test]
fn single_layers_match_keras() {
    type Apply = Box<dyn Fn(&SymbolicTensor) -> Result<SymbolicTensor>>;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keras_layers.safetensors");
    let fixture = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let input = &fixture["input"];
    let activation = |f: ActivationFn| -> Apply { Box::new(move |x| Activation::new(f).call(x)) };
    let cases: Vec<(&str, Apply)> = vec![
        ("up_nearest_2x2", Box::new(|x| UpSampling2D::new(2).call(x))),
        (
            "up_nearest_1x3",
            Box::new(|x| UpSampling2D::new(2).size(1, 3).call(x)),
        ),
        (
            "up_bilinear_2x2",
            Box::new(|x| UpSampling2D::new(2).bilinear().call(x)),
        ),
        (
            "up_bilinear_3x2",
            Box::new(|x| UpSampling2D::new(2).size(3, 2).bilinear().call(x)),
        ),
        (
            "global_max_pooling",
            Box::new(|x| GlobalMaxPooling2D::new().call(x)),
        ),
        ("leaky_relu", activation(ActivationFn::LeakyRelu)),
        ("elu", activation(ActivationFn::Elu)),
        ("hard_swish", activation(ActivationFn::HardSwish)),
        (
            "cropping",
            Box::new(|x| Cropping2D::asymmetric((1, 0), (2, 1)).call(x)),
        ),
        (
            "softmax_height",
            Box::new(|x| Softmax::new().axis(2).call(x)),
        ),
        // Layers with weights are named after their case: the fixture holds
        // `<case>.<weight>` in the crate's layouts.
        (
            "conv_transpose_s2_same",
            Box::new(|x| {
                Conv2DTranspose::new(4, 3)
                    .strides(2)
                    .padding(Padding::Same)
                    .name("conv_transpose_s2_same")
                    .call(x)
            }),
        ),
        (
            "conv_transpose_s2_valid",
            Box::new(|x| {
                Conv2DTranspose::new(4, 3)
                    .strides(2)
                    .name("conv_transpose_s2_valid")
                    .call(x)
            }),
        ),
        (
            "conv_transpose_k2_s3_valid",
            Box::new(|x| {
                Conv2DTranspose::new(2, 2)
                    .strides(3)
                    .name("conv_transpose_k2_s3_valid")
                    .call(x)
            }),
        ),
        (
            "conv_transpose_k4_s1_same",
            Box::new(|x| {
                Conv2DTranspose::new(3, 4)
                    .padding(Padding::Same)
                    .name("conv_transpose_k4_s1_same")
                    .call(x)
            }),
        ),
        (
            "depthwise_s2_same_m2",
            Box::new(|x| {
                DepthwiseConv2D::new(3)
                    .strides(2)
                    .padding(Padding::Same)
                    .depth_multiplier(2)
                    .name("depthwise_s2_same_m2")
                    .call(x)
            }),
        ),
        (
            "depthwise_valid",
            Box::new(|x| DepthwiseConv2D::new(2).name("depthwise_valid").call(x)),
        ),
        (
            "separable_same_m2",
            Box::new(|x| {
                SeparableConv2D::new(6, 3)
                    .padding(Padding::Same)
                    .depth_multiplier(2)
                    .name("separable_same_m2")
                    .call(x)
            }),
        ),
        (
            "layer_norm_channels",
            Box::new(|x| {
                LayerNormalization::new()
                    .name("layer_norm_channels")
                    .call(x)
            }),
        ),
        (
            "layer_norm_sample",
            Box::new(|x| {
                LayerNormalization::new()
                    .axes([1, 2, 3])
                    .name("layer_norm_sample")
                    .call(x)
            }),
        ),
    ];
    // Reshape and Permute on a sequence (the layouts agree there).
    let seq = &fixture["seq_input"];
    let sequence_cases: Vec<(&str, Apply)> = vec![
        ("reshape_6x2", Box::new(|x| Reshape::new([6, -1]).call(x))),
        ("permute_21", Box::new(|x| Permute::new([2, 1]).call(x))),
    ];
    for (name, apply) in sequence_cases {
        let x = Input::new(&seq.dims()[1..]);
        let y = apply(&x).unwrap();
        let model = Model::new(&[x], &[y])
            .unwrap()
            .build(&Device::Cpu, DType::F32, 0)
            .unwrap();
        let ours = model.forward(&[seq.clone()], Mode::Eval).unwrap().remove(0);
        assert_eq!(ours.dims(), fixture[name].dims(), "{name}");
        assert_eq!(max_abs_diff(&ours, &fixture[name]), 0.0, "{name}");
    }
    for (name, apply) in cases {
        let x = Input::new(&input.dims()[1..]);
        let y = apply(&x).unwrap();
        let model = Model::new(&[x], &[y])
            .unwrap()
            .build(&Device::Cpu, DType::F32, 0)
            .unwrap();
        let prefix = format!("{name}.");
        let weights: HashMap<String, Tensor> = fixture
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !weights.is_empty() {
            model.set_weights(&weights).unwrap();
        }
        let ours = model
            .forward(&[input.clone()], Mode::Eval)
            .unwrap()
            .remove(0);
        let want = &fixture[name];
        assert_eq!(ours.dims(), want.dims(), "{name}");
        let diff = max_abs_diff(&ours, want);
        assert!(diff <= 1e-5, "{name}: max abs diff {diff}");
    }
}

//! Graph construction: shape errors at build time, graph checks, naming, shared layers,
//! nested models, sub-models, multiple inputs and outputs, and forward-time input checks.

// `&[x.clone()]` reads better than `std::slice::from_ref(&x)` in tests.
#![allow(clippy::cloned_ref_to_slice_refs)]

mod common;

use candle_core::{DType, Device, Tensor};
use candle_functional::prelude::*;
use common::{assert_close, t, values};

#[test]
fn mismatched_add_names_the_layer_and_both_shapes() {
    let a = Input::new([8, 4, 4]);
    let b = Input::new([16, 4, 4]);
    let err = Add::new().name("join").call_many(&[a, b]).unwrap_err();
    match &err {
        Error::ShapeMismatch {
            layer,
            expected,
            got,
            ..
        } => {
            assert_eq!(layer, "join");
            assert_eq!(expected, &[8, 4, 4]);
            assert_eq!(got, &[16, 4, 4]);
        }
        other => panic!("wrong error: {other}"),
    }
    let text = err.to_string();
    assert!(text.contains("join") && text.contains("[8, 4, 4]") && text.contains("[16, 4, 4]"));
}

#[test]
fn residual_shortcut_without_projection_fails_when_built() {
    let x = Input::new([64, 32, 32]);
    let y = Conv2D::new(128, 3)
        .strides(2)
        .padding(Padding::Same)
        .call(&x)
        .unwrap();
    let err = Add::new().call_many(&[x, y]).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("add"));
}

#[test]
fn concatenate_checks_axis_and_other_dimensions() {
    let a = Input::new([8, 4, 4]);
    let b = Input::new([8, 2, 4]);
    // Along channels the heights must agree.
    let err = Concatenate::new(1)
        .call_many(&[a.clone(), b.clone()])
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    // Along height they may differ.
    assert_eq!(
        Concatenate::new(2)
            .call_many(&[a.clone(), b.clone()])
            .unwrap()
            .shape(),
        &[8, 6, 4]
    );
    // The batch axis and axes beyond the rank are refused.
    for axis in [0, 4, -5] {
        let err = Concatenate::new(axis)
            .call_many(&[a.clone(), a.clone()])
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { .. }),
            "axis {axis}: {err}"
        );
    }
}

#[test]
fn disconnected_input_is_reported_by_name() {
    let a = Input::named("a", [4]);
    let b = Input::named("b", [4]);
    let y = Add::new().name("sum").call_many(&[a.clone(), b]).unwrap();
    let err = Model::new(&[a], &[y]).unwrap_err();
    match err {
        Error::GraphDisconnected { layer, input } => {
            assert_eq!(layer, "sum");
            assert_eq!(input, "b");
        }
        other => panic!("wrong error: {other}"),
    }
}

#[test]
fn unused_and_duplicate_inputs_are_refused() {
    let a = Input::named("a", [4]);
    let b = Input::named("unused", [4]);
    let y = Dense::new(2).call(&a).unwrap();
    match Model::new(&[a.clone(), b], &[y.clone()]).unwrap_err() {
        Error::UnusedInput { input } => assert_eq!(input, "unused"),
        other => panic!("wrong error: {other}"),
    }
    assert!(matches!(
        Model::new(&[a.clone(), a], &[y]).unwrap_err(),
        Error::DuplicateInput { .. }
    ));
}

#[test]
fn duplicate_layer_names_are_refused() {
    let x = Input::new([4]);
    let y = Dense::new(4).name("same").call(&x).unwrap();
    let z = Dense::new(4).name("same").call(&y).unwrap();
    match Model::new(&[x], &[z]).unwrap_err() {
        Error::DuplicateLayerName { name } => assert_eq!(name, "same"),
        other => panic!("wrong error: {other}"),
    }
}

#[test]
fn wrong_rank_and_bad_config_are_reported_at_call_time() {
    let flat = Input::new([10]);
    assert!(matches!(
        Conv2D::new(4, 3).call(&flat).unwrap_err(),
        Error::InvalidInput { .. }
    ));
    let img = Input::new([3, 2, 2]);
    let err = Conv2D::new(4, 3).call(&img).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    assert!(matches!(
        Conv2D::new(0, 3).call(&img).unwrap_err(),
        Error::InvalidConfig { .. }
    ));
    assert!(matches!(
        Conv2D::new(4, 1).groups(2).call(&img).unwrap_err(),
        Error::InvalidInput { .. }
    ));
    assert!(matches!(
        Dropout::new(1.5).call(&flat).unwrap_err(),
        Error::InvalidConfig { .. }
    ));
    assert!(matches!(
        Subtract::new().call_many(&[flat.clone()]).unwrap_err(),
        Error::InvalidInput { .. }
    ));
}

#[test]
fn layers_get_keras_names_in_creation_order() {
    let x = Input::new([3, 8, 8]);
    let a = Conv2D::new(4, 3).padding(Padding::Same).call(&x).unwrap();
    let b = Conv2D::new(4, 3)
        .name("conv2d_1")
        .padding(Padding::Same)
        .call(&a)
        .unwrap();
    let c = Conv2D::new(4, 3).padding(Padding::Same).call(&b).unwrap();
    let d = ReLU::new().call(&c).unwrap();
    let model = Model::new(&[x], &[d]).unwrap();
    let names: Vec<&str> = model.layers().iter().map(|l| l.name().unwrap()).collect();
    // The user's `conv2d_1` is kept; the generated names skip it.
    assert_eq!(
        names,
        ["input_layer", "conv2d", "conv2d_1", "conv2d_2", "re_lu"]
    );
}

#[test]
fn a_layer_called_twice_shares_its_weights() {
    let shared = Dense::new(3).name("shared");
    let a = Input::named("a", [4]);
    let b = Input::named("b", [4]);
    let ya = shared.call(&a).unwrap();
    let yb = shared.call(&b).unwrap();
    let out = Add::new().call_many(&[ya, yb]).unwrap();
    let model = Model::new(&[a, b], &[out])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 1)
        .unwrap();
    let names: Vec<String> = model
        .weights()
        .unwrap()
        .iter()
        .map(|w| w.name().to_string())
        .collect();
    assert_eq!(names, ["shared.kernel", "shared.bias"]);
    assert_eq!(model.count_params().total, 4 * 3 + 3);
    // Both calls use the same kernel: f(x) + f(x) == 2 f(x).
    let x = t(&[1.0, 2.0, 3.0, 4.0], &[1, 4]);
    let sum = model.forward(&[x.clone(), x.clone()], Mode::Eval).unwrap();
    let w = model.weight_map().unwrap();
    let single = x
        .matmul(&w["shared.kernel"])
        .unwrap()
        .broadcast_add(&w["shared.bias"])
        .unwrap();
    assert_close(&values(&sum[0]), &values(&(single * 2.0).unwrap()), 1e-5);
    // The summary lists the layer once, with both calls.
    let summary = model.summary();
    assert_eq!(summary.matches("shared (Dense)").count(), 1);
    assert!(summary.contains("a[0][0]") && summary.contains("b[0][0]"));
}

#[test]
fn a_shared_layer_refuses_inputs_that_change_its_weights() {
    let shared = Dense::new(3);
    shared.call(&Input::new([4])).unwrap();
    let err = shared.call(&Input::new([5])).unwrap_err();
    match err {
        Error::ShapeMismatch { expected, got, .. } => {
            assert_eq!(expected, [4, 3]);
            assert_eq!(got, [5, 3]);
        }
        other => panic!("wrong error: {other}"),
    }
}

#[test]
fn builder_methods_make_a_new_layer() {
    let base = Dense::new(3);
    let x = Input::new([4]);
    let a = base.call(&x).unwrap();
    let b = base
        .clone()
        .activation(ActivationFn::Relu)
        .call(&x)
        .unwrap();
    assert!(!a.layer().same_layer(&b.layer()));
}

#[test]
fn a_built_model_nests_as_a_layer_and_keeps_its_weights() {
    let ex = Input::new([4]);
    let ey = Dense::new(2)
        .activation(ActivationFn::Tanh)
        .call(&ex)
        .unwrap();
    let encoder = Model::new(&[ex], &[ey])
        .unwrap()
        .named("encoder")
        .build(&Device::Cpu, DType::F32, 3)
        .unwrap();
    let before = encoder.weight_map().unwrap()["dense.kernel"]
        .to_vec2::<f32>()
        .unwrap();

    // Siamese use: the same encoder on two inputs, then a head.
    let a = Input::named("left", [4]);
    let b = Input::named("right", [4]);
    let za = encoder.call(&a).unwrap();
    let zb = encoder.call(&b).unwrap();
    let joined = Concatenate::new(1).call_many(&[za, zb]).unwrap();
    let head = Dense::new(1).name("head").call(&joined).unwrap();
    let outer = Model::new(&[a, b], &[head])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 99)
        .unwrap();

    let after = outer.weight_map().unwrap()["encoder.dense.kernel"]
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(
        before, after,
        "building the outer model re-initialized the encoder"
    );
    let names: Vec<String> = outer
        .weights()
        .unwrap()
        .iter()
        .map(|w| w.name().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "encoder.dense.kernel",
            "encoder.dense.bias",
            "head.kernel",
            "head.bias"
        ]
    );

    // The outer model computes head(concat(encoder(a), encoder(b))).
    let xa = t(&[1.0, 0.0, -1.0, 2.0], &[1, 4]);
    let xb = t(&[0.5, 0.5, 0.5, 0.5], &[1, 4]);
    let out = outer
        .forward(&[xa.clone(), xb.clone()], Mode::Eval)
        .unwrap();
    let ea = encoder.forward(&[xa], Mode::Eval).unwrap().remove(0);
    let eb = encoder.forward(&[xb], Mode::Eval).unwrap().remove(0);
    let w = outer.weight_map().unwrap();
    let want = Tensor::cat(&[ea, eb], 1)
        .unwrap()
        .matmul(&w["head.kernel"])
        .unwrap()
        .broadcast_add(&w["head.bias"])
        .unwrap();
    assert_close(&values(&out[0]), &values(&want), 1e-5);
    assert!(outer.summary().contains("encoder (Functional)"));
}

#[test]
fn a_sub_model_cut_from_an_inner_tensor_shares_weights() {
    let x = Input::new([3]);
    let hidden = Dense::new(2).name("hidden").call(&x).unwrap();
    let out = Dense::new(1).name("out").call(&hidden).unwrap();
    let full = Model::new(&[x.clone()], &[out])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap();
    let features = Model::new(&[x], &[hidden.clone()]).unwrap();
    assert!(features.is_built());
    let input = t(&[1.0, 2.0, 3.0], &[1, 3]);
    let before = values(&features.forward(&[input.clone()], Mode::Eval).unwrap()[0]);
    // Changing the full model's weights changes the sub-model's output.
    let mut w = full.weight_map().unwrap();
    w.insert("hidden.bias".into(), t(&[10.0, 20.0], &[2]));
    full.set_weights(&w).unwrap();
    let after = values(&features.forward(&[input], Mode::Eval).unwrap()[0]);
    assert_close(
        &[after[0] - before[0], after[1] - before[1]],
        &[10.0, 20.0],
        1e-5,
    );

    // A model can also start at an inner tensor (the head alone).
    let head = Model::new(&[hidden], &[full.outputs()[0].clone()]).unwrap();
    assert_eq!(head.inputs()[0].shape(), &[2]);
    let y = head
        .forward(&[t(&[0.0, 0.0], &[1, 2])], Mode::Eval)
        .unwrap();
    assert_close(&values(&y[0]), &values(&w["out.bias"]), 1e-6);
}

#[test]
fn multiple_inputs_and_outputs_run_in_order() {
    let image = Input::named("image", [1, 2, 2]);
    let meta = Input::named("meta", [2]);
    let pooled = GlobalAveragePooling2D::new().call(&image).unwrap();
    let joined = Concatenate::new(1)
        .call_many(&[pooled.clone(), meta.clone()])
        .unwrap();
    let model = Model::new(&[image, meta], &[joined, pooled]).unwrap();
    let out = model
        .forward(
            &[
                t(&[1.0, 2.0, 3.0, 6.0], &[1, 1, 2, 2]),
                t(&[7.0, 8.0], &[1, 2]),
            ],
            Mode::Eval,
        )
        .unwrap();
    assert_eq!(out.len(), 2);
    assert_close(&values(&out[0]), &[3.0, 7.0, 8.0], 1e-6);
    assert_close(&values(&out[1]), &[3.0], 1e-6);
}

#[test]
fn forward_checks_input_count_and_shapes() {
    let x = Input::named("pixels", [3, 4, 4]);
    let y = Conv2D::new(2, 3).call(&x).unwrap();
    let model = Model::new(&[x], &[y]).unwrap();
    let good = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    // Not built yet.
    assert!(matches!(
        model.forward(&[good.clone()], Mode::Eval).unwrap_err(),
        Error::NotBuilt { .. }
    ));
    let model = model.build(&Device::Cpu, DType::F32, 0).unwrap();
    assert!(matches!(
        model.forward(&[], Mode::Eval).unwrap_err(),
        Error::InputCount {
            expected: 1,
            got: 0,
            ..
        }
    ));
    let bad = Tensor::zeros((2, 4, 4, 3), DType::F32, &Device::Cpu).unwrap();
    match model.forward(&[bad], Mode::Eval).unwrap_err() {
        Error::InputShape {
            input,
            expected,
            got,
            ..
        } => {
            assert_eq!(input, "pixels");
            assert_eq!(expected, [3, 4, 4]);
            assert_eq!(got, [2, 4, 4, 3]);
        }
        other => panic!("wrong error: {other}"),
    }
    assert_eq!(
        model.forward(&[good], Mode::Eval).unwrap()[0].dims(),
        &[2, 2, 2, 2]
    );
}

#[test]
fn summary_and_dot_describe_the_graph() {
    let x = Input::new([3, 8, 8]);
    let y = Conv2D::new(4, 3).padding(Padding::Same).call(&x).unwrap();
    let z = BatchNorm::new().call(&y).unwrap();
    let out = Add::new().call_many(&[y, z]).unwrap();
    let model = Model::new(&[x], &[out]).unwrap().named("demo");
    let s = model.summary();
    for needle in [
        "Model: \"demo\"",
        "conv2d (Conv2D)",
        "(None, 4, 8, 8)",
        "112",
        "['input_layer[0][0]']".trim_matches(|c| c == '[' || c == ']' || c == '\''),
        "conv2d[0][0], batch_normalization[0][0]",
        "Total params: 128",
        "Trainable params: 120",
        "Non-trainable params: 8",
    ] {
        assert!(s.contains(needle), "summary lacks {needle}:\n{s}");
    }
    let dot = model.to_dot();
    assert!(dot.contains("\"conv2d\" -> \"add\""));
    assert!(dot.contains("\"batch_normalization\" -> \"add\""));
    assert!(dot.contains("output: (None, 4, 8, 8)"));
}

/// A custom layer `y = x · scale + shift`, with its weights reached by name.
#[derive(Clone, Debug)]
struct ScaleShift {
    names: [&'static str; 2],
}

impl candle_functional::LayerOp for ScaleShift {
    fn type_name(&self) -> &'static str {
        "ScaleShift"
    }
    fn output_shapes(&self, _layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        Ok(vec![inputs[0].clone()])
    }
    fn param_specs(&self, inputs: &[Vec<usize>]) -> Vec<candle_functional::ParamSpec> {
        let n = inputs[0].clone();
        vec![
            candle_functional::ParamSpec::new(self.names[0], n.clone(), Initializer::Ones),
            candle_functional::ParamSpec::new(self.names[1], n, Initializer::Zeros),
        ]
    }
    fn forward(&self, inputs: &[Tensor], p: &candle_functional::Params) -> Result<Vec<Tensor>> {
        let y = inputs[0].broadcast_mul(&p.get("scale")?)?;
        Ok(vec![y.broadcast_add(&p.get("shift")?)?])
    }
}

#[test]
fn custom_layers_reach_weights_by_name_and_names_must_be_unique() {
    let x = Input::new([3]);
    let layer = candle_functional::Configured::from_config(ScaleShift {
        names: ["shift", "scale"], // declared in the other order: names, not positions, count
    });
    let y = layer.call(&x).unwrap();
    let model = common::build(&x, &y);
    common::set(
        &model,
        &[
            ("scale_shift.scale", t(&[2.0, 3.0, 4.0], &[3])),
            ("scale_shift.shift", t(&[1.0, 1.0, 1.0], &[3])),
        ],
    );
    assert_close(
        &values(&common::run(&model, &t(&[1.0, 1.0, 1.0], &[1, 3]))),
        &[3.0, 4.0, 5.0],
        0.0,
    );

    let twice = candle_functional::Configured::from_config(ScaleShift {
        names: ["scale", "scale"],
    });
    let err = twice.call(&Input::new([3])).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    assert!(err.to_string().contains("unique"), "{err}");

    let misnamed = candle_functional::Configured::from_config(ScaleShift {
        names: ["scale", "offset"],
    });
    let x = Input::new([3]);
    let y = misnamed.call(&x).unwrap();
    let model = common::build(&x, &y);
    let err = model
        .forward(&[t(&[1.0, 1.0, 1.0], &[1, 3])], Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`shift`") && err.contains("offset"), "{err}");
}

#[test]
fn svg_pictures_show_layers_shapes_and_nested_models_either_way() {
    use candle_functional::models::PlotOptions;
    let patch = Input::named("patch", [2, 4, 4]);
    let h = Conv2D::new(4, 3).name("enc_conv").call(&patch).unwrap();
    let encoder = Model::new(&[patch], &[h]).unwrap().named("encoder");
    let (a, b) = (
        Input::named("left", [2, 4, 4]),
        Input::named("right", [2, 4, 4]),
    );
    let joined = Concatenate::new(1)
        .name("join")
        .call_many(&[encoder.call(&a).unwrap(), encoder.call(&b).unwrap()])
        .unwrap();
    let model = Model::new(&[a, b], &[joined]).unwrap();

    let collapsed = model.to_svg().unwrap();
    for text in [
        "left",
        "right",
        "encoder",
        "Functional",
        "join",
        "(None, 4, 2, 2)",
        "(None, 8, 2, 2)",
    ] {
        assert!(collapsed.contains(text), "{text} missing");
    }
    assert!(!collapsed.contains("enc_conv"));

    let expanded = model
        .to_svg_with(PlotOptions {
            expand_nested: true,
            show_shapes: false,
        })
        .unwrap();
    for text in ["encoder/enc_conv", "encoder/patch", "join"] {
        assert!(expanded.contains(text), "{text} missing");
    }
    assert!(!expanded.contains("(None, 8, 2, 2)"));
    // Both calls of the encoder lead into its one drawing: two arrows into its input.
    assert!(expanded.matches("<path").count() >= 4);
}

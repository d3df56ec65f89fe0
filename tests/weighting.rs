//! Sample weights, class weights and users' own losses, against Keras.
//!
//! `tests/fixtures/keras_weighted_losses.json` is written by
//! `scripts/keras_reference.py weighted-losses` (Keras 3.15.1, TensorFlow 2.21.0): Keras's
//! losses reduced with `sample_weight` (one per sample, and one per pixel), and one full-batch
//! SGD step of `fit` with `class_weight` and with `sample_weight`.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_functional::data::{Batch, TensorDataset};
use candle_functional::prelude::*;
use candle_functional::train::{
    Accuracy, Loss, LossFunction, Losses, NanCheck, OutputLoss, SgdConfig, Trainer,
};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keras_weighted_losses.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        v => vec![v.as_f64().unwrap() as f32],
    }
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

fn tensor(values: &Value, dims: &Value) -> Tensor {
    Tensor::from_vec(floats(values), shape(dims), &Device::Cpu).unwrap()
}

fn loss_of(name: &str) -> Loss {
    match name {
        "sparse_logits" | "sparse_per_pixel" => {
            Loss::SparseCategoricalCrossentropy { from_logits: true }
        }
        "categorical_probs" => Loss::CategoricalCrossentropy { from_logits: false },
        "binary_logits" => Loss::BinaryCrossentropy { from_logits: true },
        "mse" => Loss::MeanSquaredError,
        "huber" => Loss::Huber { delta: 0.5 },
        other => panic!("no case {other}"),
    }
}

/// A one-layer model and a trainer whose loss of a batch can be read: the loss `evaluate`
/// reports is the weighted reduction.
fn weighted_loss(loss: Loss, output: &Tensor, target: &Tensor, weight: &Tensor) -> f64 {
    // The model passes its input through: the "output" is the input.
    let x = Input::new(output.dims()[1..].to_vec());
    let y = Activation::new(ActivationFn::Linear).call(&x).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap();
    let trainer = Trainer::new(model, SgdConfig::default(), loss).unwrap();
    let n = output.dim(0).unwrap();
    let data = TensorDataset::new(vec![output.clone()], vec![target.clone()], n)
        .unwrap()
        .sample_weights(vec![weight.clone()])
        .unwrap();
    trainer.evaluate(&data).unwrap().loss
}

#[test]
fn weighted_losses_match_keras_per_sample_and_per_pixel() {
    let fixture = fixture();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let loss = loss_of(name);
        let output = tensor(&case["output"], &case["output_shape"]);
        let mut target = tensor(&case["target"], &case["target_shape"]);
        if matches!(loss, Loss::SparseCategoricalCrossentropy { .. }) {
            target = target.to_dtype(DType::U32).unwrap();
        }
        let weight = tensor(&case["weight"], &case["weight_shape"]);
        let got = weighted_loss(loss, &output, &target, &weight);
        let want = case["loss"].as_f64().unwrap();
        approx::assert_relative_eq!(got, want, max_relative = 1e-5, epsilon = 1e-6);
        // And the weights matter: unweighted, the loss differs.
        let ones = weight.ones_like().unwrap();
        let plain = weighted_loss(loss, &output, &target, &ones);
        assert!((plain - want).abs() > 1e-3, "{name}: weights ignored?");
    }
}

/// A Dense(2) model with the fixture's weights, and its full-batch data.
fn dense_step(step: &Value) -> (Model, Tensor, Tensor) {
    let x = Input::new([4]);
    let y = Dense::new(2).name("dense").call(&x).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap();
    let weights = [
        (
            "dense.kernel".to_string(),
            tensor(&step["kernel"], &Value::from(vec![4, 2])),
        ),
        (
            "dense.bias".to_string(),
            tensor(&step["bias"], &Value::from(vec![2])),
        ),
    ];
    model.set_weights(&weights.into_iter().collect()).unwrap();
    let xs = tensor(&step["x"], &Value::from(vec![6, 4]));
    let ys = tensor(&step["y"], &Value::from(vec![6]))
        .to_dtype(DType::U32)
        .unwrap();
    (model, xs, ys)
}

fn assert_step_matches(model: &Model, step: &Value) {
    let map = model.weight_map().unwrap();
    let got_kernel = map["dense.kernel"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got_bias = map["dense.bias"].to_vec1::<f32>().unwrap();
    common::assert_close(&got_kernel, &floats(&step["new_kernel"]), 1e-6);
    common::assert_close(&got_bias, &floats(&step["new_bias"]), 1e-6);
}

fn sgd() -> SgdConfig {
    SgdConfig {
        learning_rate: 0.1,
        ..Default::default()
    }
}

#[test]
fn one_fit_step_with_class_weight_moves_the_weights_as_keras_does() {
    let fixture = fixture();
    let step = &fixture["steps"][0];
    assert_eq!(step["name"], "class_weight");
    let (_, x, y) = dense_step(step);
    let class_weight: Vec<(usize, f64)> = step["class_weight"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap()))
        .collect();
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let data = TensorDataset::new(vec![x.clone()], vec![y.clone()], 6).unwrap();
    // Both divergence checks: labels read before the step, or checked on the device.
    for check in [NanCheck::EveryStep, NanCheck::OnDevice] {
        let (model, _, _) = dense_step(step);
        let mut trainer = Trainer::new(model.clone(), sgd(), loss)
            .unwrap()
            .nan_check(check)
            .class_weight(class_weight.clone())
            .unwrap();
        trainer.fit(&data, None, 1, &mut []).unwrap();
        assert_step_matches(&model, step);
    }

    // The same step with explicit sample weights (Keras's conversion) is the same step.
    let (model, x, y) = dense_step(step);
    let per_sample: Vec<f32> = y
        .to_vec1::<u32>()
        .unwrap()
        .iter()
        .map(|&c| if c == 1 { 9.0 } else { 1.0 })
        .collect();
    let mut trainer = Trainer::new(model.clone(), sgd(), loss).unwrap();
    let batch = Batch::new(vec![x], vec![y]).with_sample_weights(vec![
        Tensor::new(per_sample.as_slice(), &Device::Cpu).unwrap(),
    ]);
    trainer.train_step(&batch, 0.1).unwrap();
    assert_step_matches(&model, step);
}

#[test]
fn one_fit_step_with_sample_weight_moves_the_weights_as_keras_does() {
    let fixture = fixture();
    let step = &fixture["steps"][1];
    assert_eq!(step["name"], "sample_weight");
    let (model, x, y) = dense_step(step);
    let w = tensor(&step["sample_weight"], &Value::from(vec![6]));
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut trainer = Trainer::new(model.clone(), sgd(), loss).unwrap();
    let data = TensorDataset::new(vec![x], vec![y], 6)
        .unwrap()
        .sample_weights(vec![w])
        .unwrap();
    trainer.fit(&data, None, 1, &mut []).unwrap();
    assert_step_matches(&model, step);
}

/// Mean squared error written by a user, over the last axis: equal to the built-in one.
#[derive(Debug)]
struct MyMse;

impl LossFunction for MyMse {
    fn name(&self) -> &str {
        "my_mse"
    }

    fn per_sample(&self, outputs: &Tensor, targets: &Tensor) -> candle_functional::Result<Tensor> {
        Ok((outputs - targets)?.sqr()?.mean(1)?)
    }
}

fn two_output_model() -> Model {
    let x = Input::new([3]);
    let h = Dense::new(4)
        .activation(ActivationFn::Tanh)
        .call(&x)
        .unwrap();
    let class = Dense::new(2).name("class").call(&h).unwrap();
    let value = Dense::new(2).name("value").call(&h).unwrap();
    Model::new(&[x], &[class, value])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 3)
        .unwrap()
}

#[test]
fn a_users_loss_trains_an_output_like_the_built_in_one() {
    let x = Tensor::randn(0f32, 1.0, (8, 3), &Device::Cpu).unwrap();
    let labels = Tensor::new(&[0u32, 1, 1, 0, 1, 0, 0, 1], &Device::Cpu).unwrap();
    let values = Tensor::randn(0f32, 1.0, (8, 2), &Device::Cpu).unwrap();
    let data = TensorDataset::new(vec![x], vec![labels, values], 4).unwrap();
    let class = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let run = |second: OutputLoss| {
        let model = two_output_model();
        let losses = Losses::per_output(vec![class.into(), second]);
        let mut trainer = Trainer::new(model.clone(), sgd(), losses).unwrap();
        let history = trainer.fit(&data, None, 2, &mut []).unwrap().clone();
        (model.weight_map().unwrap(), history)
    };
    let (built_in, h1) = run(Loss::MeanSquaredError.into());
    let (custom, h2) = run(OutputLoss::custom(MyMse));
    for (name, w) in &built_in {
        let diff = (w - &custom[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{name}: {diff}");
    }
    let last = |h: &candle_functional::train::History| h.epochs().last().unwrap().loss;
    approx::assert_relative_eq!(last(&h1), last(&h2), max_relative = 1e-6);
    // The first output keeps its default accuracy; the user's loss gets no default metric.
    let names: Vec<&String> = h2.last().unwrap().metrics.keys().collect();
    assert!(names.iter().any(|n| *n == "class_accuracy"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("value_acc")),
        "{names:?}"
    );
}

#[test]
fn a_users_loss_checks_its_target_before_the_step() {
    let model = two_output_model();
    let losses = Losses::per_output(vec![
        OutputLoss::from(Loss::SparseCategoricalCrossentropy { from_logits: true }),
        OutputLoss::Custom(Arc::new(MyMse)),
    ]);
    let mut trainer = Trainer::new(model.clone(), sgd(), losses).unwrap();
    let before = model.weight_map().unwrap();
    let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let labels = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
    let wrong = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    let err = trainer
        .train_step(&Batch::new(vec![x], vec![labels, wrong]), 0.1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("value") && err.contains("my_mse") && err.contains("[2, 5]"),
        "{err}"
    );
    for (name, w) in model.weight_map().unwrap() {
        assert_eq!(
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            before[&name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}

#[test]
fn bad_weights_are_refused_with_the_output_named() {
    let model = two_output_model();
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    // class_weight needs one output, or its index.
    let trainer = Trainer::new(model.clone(), sgd(), Losses::per_output(vec![loss, loss])).unwrap();
    let err = trainer.class_weight([(0, 2.0)]).err().unwrap().to_string();
    assert!(err.contains("output_class_weight"), "{err}");
    let trainer = Trainer::new(model.clone(), sgd(), Losses::per_output(vec![loss, loss])).unwrap();
    let err = trainer
        .output_class_weight(1, [(0, -1.0)])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`value`") && err.contains("-1"), "{err}");

    // Sample weights: one tensor per output, the batch's samples first.
    let mut trainer = Trainer::new(model, sgd(), Losses::per_output(vec![loss, loss])).unwrap();
    let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let labels = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
    let batch = Batch::new(vec![x.clone()], vec![labels.clone(), labels.clone()]);
    let one = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
    let err = trainer
        .train_step(&batch.clone().with_sample_weights(vec![one.clone()]), 0.1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sample weight"), "{err}");
    let three = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    let err = trainer
        .train_step(&batch.with_sample_weights(vec![one, three]), 0.1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("value") && err.contains("[3]"), "{err}");
}

/// Keras's `weighted_metrics=["accuracy"]` next to `metrics=["accuracy"]`: the step's
/// metrics (class weights or sample weights applied) and an evaluation of the updated model
/// (sample weights only), named as Keras names them.
#[test]
fn weighted_metrics_match_keras_in_fit_and_evaluate() {
    let fixture = fixture();
    for step in fixture["steps"].as_array().unwrap() {
        let name = step["name"].as_str().unwrap();
        let (model, x, y) = dense_step(step);
        let w = tensor(&step["sample_weight"], &Value::from(vec![6]));
        let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
        let mut trainer = Trainer::new(model, sgd(), loss)
            .unwrap()
            .weighted_metrics(0, vec![Box::new(Accuracy::sparse())])
            .unwrap();
        let mut data = TensorDataset::new(vec![x], vec![y], 6).unwrap();
        if name == "class_weight" {
            trainer = trainer.class_weight([(0, 1.0), (1, 9.0)]).unwrap();
        } else {
            data = data.sample_weights(vec![w]).unwrap();
        }
        let log = trainer
            .fit(&data, None, 1, &mut [])
            .unwrap()
            .last()
            .unwrap()
            .clone();
        let evaluation = trainer.evaluate(&data).unwrap();
        for key in ["accuracy", "weighted_accuracy"] {
            let want = step["history"][key].as_f64().unwrap();
            let got = log.metric(key).unwrap();
            assert!(
                (got - want).abs() < 1e-6,
                "{name} fit {key}: {got} against Keras's {want}"
            );
            let want = step["evaluation"][key].as_f64().unwrap();
            let got = evaluation.metric(key).unwrap();
            assert!(
                (got - want).abs() < 1e-6,
                "{name} evaluate {key}: {got} against {want}"
            );
        }
        assert!((evaluation.loss - step["evaluation"]["loss"].as_f64().unwrap()).abs() < 1e-5);
    }
}

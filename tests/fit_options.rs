//! What a Keras user sets around `fit`: gradient clipping against Keras
//! (`tests/fixtures/keras_clipping.json`, written by `scripts/keras_reference.py clipping`,
//! Keras 3.15.1: one full-batch SGD step with `clipnorm`, `global_clipnorm`, `clipvalue`),
//! `validation_split` with Keras's split, and `Model::predict` without a trainer.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_functional::data::{Batch, Dataset, TensorDataset};
use candle_functional::prelude::*;
use candle_functional::train::{GradientClipping, Loss, SgdConfig, Trainer};
use serde_json::Value;

const CPU: Device = Device::Cpu;

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        v => vec![v.as_f64().unwrap() as f32],
    }
}

fn dense(step: &Value) -> Model {
    let x = Input::new([4]);
    let y = Dense::new(2).name("dense").call(&x).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, 0)
        .unwrap();
    let weights = [
        (
            "dense.kernel".to_string(),
            Tensor::from_vec(floats(&step["kernel"]), (4, 2), &CPU).unwrap(),
        ),
        (
            "dense.bias".to_string(),
            Tensor::from_vec(floats(&step["bias"]), 2, &CPU).unwrap(),
        ),
    ];
    model.set_weights(&weights.into_iter().collect()).unwrap();
    model
}

#[test]
fn gradient_clipping_matches_keras() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keras_clipping.json"
    );
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let steps = fixture["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 4);
    for step in steps {
        let model = dense(step);
        let sgd = SgdConfig {
            learning_rate: 0.1,
            ..Default::default()
        };
        let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
        let mut trainer = Trainer::new(model.clone(), sgd, loss).unwrap();
        let threshold = step["value"].as_f64();
        trainer = match step["name"].as_str().unwrap() {
            "clipnorm" => trainer.gradient_clipping(GradientClipping::Norm(threshold.unwrap())),
            "global_clipnorm" => {
                trainer.gradient_clipping(GradientClipping::GlobalNorm(threshold.unwrap()))
            }
            "clipvalue" => trainer.gradient_clipping(GradientClipping::Value(threshold.unwrap())),
            _ => Ok(trainer),
        }
        .unwrap();
        let x = Tensor::from_vec(floats(&step["x"]), (6, 4), &CPU).unwrap();
        let y = Tensor::from_vec(floats(&step["y"]), 6, &CPU)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        trainer
            .train_step(&Batch::new(vec![x], vec![y]), 0.1)
            .unwrap();
        let map = model.weight_map().unwrap();
        let kernel = map["dense.kernel"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let bias = map["dense.bias"].to_vec1::<f32>().unwrap();
        let name = step["name"].as_str().unwrap();
        for (got, want) in kernel.iter().chain(&bias).zip(
            floats(&step["new_kernel"])
                .iter()
                .chain(&floats(&step["new_bias"])),
        ) {
            assert!(
                (got - want).abs() <= 1e-6,
                "{name}: {got} vs Keras's {want}"
            );
        }
    }
}

#[test]
fn clipping_thresholds_must_be_positive_and_finite() {
    let trainer = || {
        let x = Input::new([2]);
        let y = Dense::new(1).call(&x).unwrap();
        let model = Model::new(&[x], &[y])
            .unwrap()
            .build(&CPU, DType::F32, 0)
            .unwrap();
        Trainer::new(model, SgdConfig::default(), Loss::MeanSquaredError).unwrap()
    };
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        for clipping in [
            GradientClipping::Norm(bad),
            GradientClipping::GlobalNorm(bad),
            GradientClipping::Value(bad),
        ] {
            let err = trainer().gradient_clipping(clipping).err();
            assert!(
                err.is_some_and(|e| e.to_string().contains("positive")),
                "{clipping:?}"
            );
        }
    }
}

#[test]
fn validation_split_takes_the_last_samples_before_shuffling() {
    let x = Tensor::arange(0f32, 10.0, &CPU)
        .unwrap()
        .reshape((10, 1))
        .unwrap();
    let y = Tensor::arange(0u32, 10, &CPU).unwrap();
    let w = Tensor::arange(10f32, 20.0, &CPU).unwrap();
    let data = TensorDataset::new(vec![x], vec![y], 3)
        .unwrap()
        .sample_weights(vec![w])
        .unwrap()
        .shuffle(true)
        .seed(4);
    let (train, val) = data.validation_split(0.2).unwrap();
    let labels = |d: &TensorDataset, epoch: u64| -> Vec<u32> {
        d.batches(epoch)
            .flat_map(|b| b.unwrap().targets[0].to_vec1::<u32>().unwrap())
            .collect()
    };
    // Validation: samples 8 and 9 in order, with their weights, every epoch.
    assert_eq!(labels(&val, 0), [8, 9]);
    assert_eq!(labels(&val, 5), [8, 9]);
    let weights: Vec<f32> = val
        .batches(0)
        .flat_map(|b| b.unwrap().sample_weights[0].to_vec1::<f32>().unwrap())
        .collect();
    assert_eq!(weights, [18.0, 19.0]);
    // Training: samples 0..8, still shuffled.
    let mut seen = labels(&train, 0);
    assert_ne!(seen, (0..8).collect::<Vec<u32>>(), "shuffled");
    seen.sort();
    assert_eq!(seen, (0..8).collect::<Vec<u32>>());
    // Keras's rounding: floor(7 · 0.7) = 4 for training.
    let seven = TensorDataset::new(
        vec![Tensor::zeros((7, 1), DType::F32, &CPU).unwrap()],
        vec![],
        2,
    )
    .unwrap();
    let (t, v) = seven.validation_split(0.3).unwrap();
    assert_eq!((t.samples(), v.samples()), (4, 3));
    assert!(seven.validation_split(0.0).is_err());
    assert!(
        seven.validation_split(0.9).is_err(),
        "no training sample left"
    );
}

#[test]
fn model_predict_needs_no_trainer_and_matches_forward() {
    let x = Input::new([3]);
    let h = Dense::new(4).call(&x).unwrap();
    let a = Dense::new(2).call(&h).unwrap();
    let b = Dense::new(1).call(&h).unwrap();
    let model = Model::new(&[x], &[a, b])
        .unwrap()
        .build(&CPU, DType::F32, 0)
        .unwrap();
    let samples = Tensor::randn(0f32, 1.0, (7, 3), &CPU).unwrap();
    let data = TensorDataset::new(vec![samples.clone()], vec![], 3).unwrap();
    let predicted = model.predict(&data).unwrap();
    let whole = model.forward(&[samples], Mode::Eval).unwrap();
    assert_eq!(predicted.len(), 2);
    for (p, w) in predicted.iter().zip(&whole) {
        assert_eq!(p.dims(), w.dims());
        assert!(common::max_abs_diff(p, w) < 1e-6);
    }
}

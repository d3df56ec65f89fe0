//! Weight penalties (Keras's `kernel_regularizer=l2(...)` and friends): added to the loss
//! `fit` minimizes and reports, as Keras adds `model.losses`; imported from `.keras` files;
//! saved with the architecture. Checked against Keras 3.15 on
//! `tests/fixtures/keras_regularized.keras` and one SGD step of its `fit`
//! (`tests/fixtures/keras_regularizers.json`, both written by
//! `scripts/keras_reference.py regularizers`).

use candle_core::{DType, Device, Tensor};
use candle_functional::Regularizer;
use candle_functional::data::Batch;
use candle_functional::prelude::*;
use candle_functional::train::{Loss, SgdConfig, Trainer};
use serde_json::Value;

const CPU: Device = Device::Cpu;

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        v => vec![v.as_f64().unwrap() as f32],
    }
}

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keras_regularizers.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[cfg(feature = "keras")]
#[test]
fn imported_penalties_train_as_in_keras() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keras_regularized.keras"
    );
    let model = Model::from_keras(path, &CPU).unwrap();
    // Keras keeps the factors as f32: equal to 1e-7 relative.
    let has = |layer: &str, weight: &str, l1: f64, l2: f64| {
        let all = model.get_layer(layer).unwrap().layer().regularizers();
        let (_, r) = all.iter().find(|(w, _)| w == weight).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-7 * b.abs().max(1e-3);
        assert!(
            close(r.l1_factor(), l1) && close(r.l2_factor(), l2),
            "{layer}.{weight}: {r:?}"
        );
        assert_eq!(all.len(), if layer == "head" { 2 } else { 1 }, "{layer}");
    };
    has("conv", "kernel", 0.0, 0.01);
    has("bn", "gamma", 0.005, 0.0);
    has("head", "kernel", 0.001, 0.003);
    has("head", "bias", 0.02, 0.0);
    has("frozen", "kernel", 0.0, 0.5);
    assert!(!model.get_layer("frozen").unwrap().layer().trainable());

    let fixture = fixture();
    // Keras's `sum(model.losses)`: the frozen layer's L2 of 0.5 is left out.
    let penalty = model
        .regularization_loss()
        .unwrap()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let want = fixture["penalty_before"].as_f64().unwrap();
    assert!(
        (penalty - want).abs() <= 1e-6 * want,
        "{penalty} vs Keras's {want}"
    );

    // One full-batch SGD step: the reported loss includes the penalties, and the new
    // weights match.
    let x = Tensor::from_vec(floats(&fixture["x_nchw"]), (6, 3, 8, 8), &CPU).unwrap();
    let y = Tensor::from_vec(floats(&fixture["y"]), 6, &CPU)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let sgd = SgdConfig {
        learning_rate: 0.1,
        ..Default::default()
    };
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut trainer = Trainer::new(model.clone(), sgd, loss).unwrap();
    let reported = trainer
        .train_step(&Batch::new(vec![x], vec![y]), 0.1)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let keras_loss = fixture["loss"].as_f64().unwrap();
    assert!(
        (reported - keras_loss).abs() <= 1e-5,
        "loss {reported} vs Keras's {keras_loss}"
    );
    let weights = model.weight_map().unwrap();
    for (path, values) in fixture["weights_after"].as_object().unwrap() {
        let name = path.replace('/', ".");
        let got = weights[&name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = floats(values);
        assert_eq!(got.len(), want.len(), "{name}");
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-5, "{name}: max diff {diff} from Keras");
    }
}

fn small(regularizer: Option<Regularizer>) -> Model {
    let x = Input::new([3]);
    let mut dense = Dense::new(2).name("dense");
    if let Some(r) = regularizer {
        dense = dense.kernel_regularizer(r);
    }
    let y = dense.call(&x).unwrap();
    Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, 5)
        .unwrap()
}

#[test]
fn penalties_move_the_weights_and_count_in_the_reported_loss() {
    let batch = Batch::new(
        vec![Tensor::new(&[[1f32, 0.5, -1.0], [0.0, 2.0, 1.0]], &CPU).unwrap()],
        vec![Tensor::new(&[0u32, 1], &CPU).unwrap()],
    );
    let step = |model: &Model| -> f32 {
        let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
        let mut trainer = Trainer::new(model.clone(), SgdConfig::default(), loss).unwrap();
        let total = trainer.train_step(&batch, 0.1).unwrap();
        total.to_scalar::<f32>().unwrap()
    };
    let plain = small(None);
    let penalized = small(Some(Regularizer::l2(0.3)));
    let penalty = penalized
        .regularization_loss()
        .unwrap()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(penalty > 0.0);
    assert!(plain.regularization_loss().unwrap().is_none());
    // Same seed, same weights: the reported losses differ by the penalty exactly.
    let (a, b) = (step(&plain), step(&penalized));
    assert!((b - a - penalty).abs() < 1e-5, "{a} + {penalty} vs {b}");
    // And the L2 gradient (2 · 0.3 · w) shrank the penalized kernel more.
    let norm = |m: &Model| -> f32 {
        let k = &m.weight_map().unwrap()["dense.kernel"];
        k.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(norm(&penalized) < norm(&plain));
}

#[test]
fn penalties_are_saved_with_the_architecture_and_checked_at_the_call() {
    let model = small(Some(Regularizer::l1_l2(0.1, 0.2)));
    let loaded = Model::from_json(&model.to_json().unwrap()).unwrap();
    assert_eq!(
        loaded.get_layer("dense").unwrap().layer().regularizers(),
        [("kernel".to_string(), Regularizer::l1_l2(0.1, 0.2))]
    );
    // A weight the layer lacks, or a negative factor: refused at the call, naming the layer.
    let err = Dense::new(2)
        .name("head")
        .regularizer("gamma", Regularizer::l2(0.1))
        .call(&Input::new([3]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("head") && err.contains("gamma") && err.contains("kernel"),
        "{err}"
    );
    let err = Conv2D::new(2, 3)
        .kernel_regularizer(Regularizer::l2(-1.0))
        .call(&Input::new([1, 4, 4]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("negative"), "{err}");
    // Set after the fact on a called layer; refused changes leave it as it was.
    let layer = loaded.get_layer("dense").unwrap().layer().clone();
    assert!(
        layer
            .set_regularizer("bias", Some(Regularizer::l2(f64::NAN)))
            .is_err()
    );
    layer.set_regularizer("kernel", None).unwrap();
    assert!(layer.regularizers().is_empty());
    assert!(loaded.regularization_loss().unwrap().is_none());
}

//! Bad input gets a typed error, never a panic: empty batches, zero-sized shapes, indices past
//! the end, batch sizes of 0, integer tensors for float weights, non-finite training.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_functional::data::{DataLoader, ImageDataset};
use candle_functional::prelude::*;
use candle_functional::train::{AdamConfig, Loss, SgdConfig, Trainer};

const CPU: Device = Device::Cpu;

/// Conv → BatchNorm → pooling → Dense.
fn small_cnn() -> Model {
    let x = Input::new([3, 8, 8]);
    let h = Conv2D::new(4, 3)
        .padding(Padding::Same)
        .strides(2)
        .call(&x)
        .unwrap();
    let h = BatchNorm::new().call(&h).unwrap();
    let h = MaxPooling2D::new(2).call(&h).unwrap();
    let h = GlobalAveragePooling2D::new().call(&h).unwrap();
    let y = Dense::new(5).call(&h).unwrap();
    Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, 0)
        .unwrap()
}

#[test]
fn an_empty_batch_gives_empty_outputs_and_is_refused_for_training() {
    let model = small_cnn();
    let moving_mean = |m: &Model| {
        m.weight_map().unwrap()["batch_normalization.moving_mean"]
            .copy()
            .unwrap()
    };
    let before = moving_mean(&model);
    let empty = Tensor::zeros((0, 3, 8, 8), DType::F32, &CPU).unwrap();
    for mode in [Mode::Eval, Mode::Train] {
        let out = model.forward(std::slice::from_ref(&empty), mode).unwrap();
        assert_eq!(out[0].dims(), &[0, 5], "{mode:?}");
    }
    assert_eq!(common::max_abs_diff(&before, &moving_mean(&model)), 0.0);
    // Training on nothing is refused with words, not a NaN.
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut trainer = Trainer::new(model, SgdConfig::default(), loss).unwrap();
    let batch = candle_functional::data::Batch::new(
        vec![empty],
        vec![Tensor::zeros(0, DType::U32, &CPU).unwrap()],
    );
    let err = trainer.train_step(&batch, 0.1).unwrap_err().to_string();
    assert!(err.contains("empty batch"), "{err}");
    // The kernels themselves refuse batch statistics of nothing, naming the argument.
    let nothing = Tensor::zeros((0, 2), DType::F32, &CPU).unwrap();
    let err = candle_functional::ops::batch_norm_train(&nothing, None, None, 1e-3).unwrap_err();
    assert!(
        matches!(err, Error::InvalidOpArgument { argument: "x", .. }),
        "{err}"
    );
}

#[test]
fn image_datasets_and_loaders_refuse_bad_shapes_indices_and_batch_sizes() {
    assert!(ImageDataset::from_parts(&[], &[1], [3, 0, 4]).is_err());
    assert!(ImageDataset::from_records(vec![0; 4], [0, 1, 1]).is_err());
    let ds = ImageDataset::from_parts(&[1, 2, 3, 4], &[7], [1, 2, 2]).unwrap();
    assert_eq!(ds.label(0).unwrap(), 7);
    let err = ds.label(1).unwrap_err().to_string();
    assert!(
        err.contains("index 1") && err.contains("1 samples"),
        "{err}"
    );
    assert!(ds.image(5).is_err());
    let err = DataLoader::new(ds, 0, &CPU).unwrap_err().to_string();
    assert!(err.contains("batch size"), "{err}");
}

#[test]
fn integer_tensors_are_refused_for_float_weights() {
    let x = Input::new([2]);
    let y = Dense::new(1).call(&x).unwrap();
    let model = common::build(&x, &y);
    let before = model.weight_map().unwrap()["dense.kernel"].copy().unwrap();
    let map = HashMap::from([
        (
            "dense.kernel".to_string(),
            Tensor::new(&[[1f32], [2.0]], &CPU).unwrap(),
        ),
        (
            "dense.bias".to_string(),
            Tensor::new(&[4i64], &CPU).unwrap(),
        ),
    ]);
    let err = model.set_weights(&map).unwrap_err().to_string();
    assert!(err.contains("dense.bias") && err.contains("I64"), "{err}");
    let after = model.weight_map().unwrap()["dense.kernel"].copy().unwrap();
    assert_eq!(
        common::max_abs_diff(&before, &after),
        0.0,
        "nothing changes"
    );
}

#[test]
fn a_non_finite_loss_stops_fit_with_the_epoch_and_step_and_applies_nothing() {
    let x = Input::new([2]);
    let h = BatchNorm::new().call(&x).unwrap();
    let y = Dense::new(2).call(&h).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, 0)
        .unwrap();
    // A NaN input in the third batch.
    let mut values = vec![1f32; 6 * 2];
    values[4 * 2] = f32::NAN;
    let data = candle_functional::data::TensorDataset::new(
        vec![Tensor::from_vec(values, (6, 2), &CPU).unwrap()],
        vec![Tensor::new(&[0u32, 1, 0, 1, 0, 1], &CPU).unwrap()],
        2,
    )
    .unwrap();
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut trainer = Trainer::new(model.clone(), AdamConfig::default(), loss).unwrap();
    let err = trainer.fit(&data, None, 1, &mut []).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NonFinite {
                epoch: 1,
                step: 3,
                ..
            }
        ),
        "{err}"
    );
    let weights = model.weights().unwrap();
    for w in &weights {
        let finite = w
            .var()
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite());
        assert!(finite, "{} became non-finite", w.name());
    }
    assert_eq!(
        trainer.history().epochs().len(),
        0,
        "the epoch did not complete"
    );

    // Switched off, the run goes on (Keras without TerminateOnNaN).
    let mut lenient = Trainer::new(model, SgdConfig::default(), loss)
        .unwrap()
        .terminate_on_nan(false);
    assert!(lenient.fit(&data, None, 1, &mut []).is_ok());
}

#[test]
fn a_resumed_run_remembers_its_best_score() {
    let dir = tempfile::tempdir().unwrap();
    let (first, resumed) = (dir.path().join("first"), dir.path().join("resumed"));
    let x = Input::new([4]);
    let y = Dense::new(3).call(&x).unwrap();
    let build = || {
        Model::new(&[x.clone()], &[y.clone()])
            .unwrap()
            .build(&CPU, DType::F32, 0)
            .unwrap()
    };
    let data = candle_functional::data::TensorDataset::new(
        vec![Tensor::randn(0f32, 1.0, (8, 4), &CPU).unwrap()],
        vec![Tensor::new(&[0u32, 1, 2, 0, 1, 2, 0, 1], &CPU).unwrap()],
        4,
    )
    .unwrap();
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut trainer = Trainer::new(build(), SgdConfig::default(), loss).unwrap();
    let mut callbacks: Vec<Box<dyn candle_functional::train::Callback>> = vec![Box::new(
        candle_functional::train::ModelCheckpoint::new(&first).monitor("val_loss"),
    )];
    trainer.fit(&data, Some(&data), 1, &mut callbacks).unwrap();

    // The first epoch's record says it was (impossibly) good.
    let last = first.join("last.ckpt");
    let bytes = std::fs::read(&last).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut history = candle_functional::train::History::from_json(&meta["history"]).unwrap();
    let mut epoch = history.epochs()[0].clone();
    epoch.val_loss = Some(1e-9);
    history = candle_functional::train::History::default();
    history.push(epoch);
    meta.insert("history".into(), history.to_json().unwrap());
    let tensors = candle_core::safetensors::load_buffer(&bytes, &CPU).unwrap();
    meta.remove("sha256"); // an older file without a checksum still loads
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        Some(meta),
        &last,
    )
    .unwrap();

    let mut again = Trainer::new(build(), SgdConfig::default(), loss).unwrap();
    again.load_checkpoint(&last).unwrap();
    let checkpoint = candle_functional::train::ModelCheckpoint::new(&resumed).monitor("val_loss");
    let mut callbacks: Vec<Box<dyn candle_functional::train::Callback>> =
        vec![Box::new(checkpoint)];
    again.fit(&data, Some(&data), 2, &mut callbacks).unwrap();
    assert!(resumed.join("last.ckpt").is_file());
    assert!(
        !resumed.join("best.ckpt").exists(),
        "epoch 2 is worse than epoch 1's record: best.ckpt must not be replaced"
    );
}

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
        .nan_check(candle_functional::train::NanCheck::Off);
    assert!(lenient.fit(&data, None, 1, &mut []).is_ok());
}

#[test]
fn a_resumed_run_remembers_its_best_score() {
    let dir = tempfile::tempdir().unwrap();
    let (first, resumed) = (dir.path().join("first"), dir.path().join("resumed"));
    let x = Input::new([4]);
    let y = Dense::new(3).call(&x).unwrap();
    let build = || {
        Model::new(std::slice::from_ref(&x), std::slice::from_ref(&y))
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

/// A tiny built model and the path of its saved weights.
fn saved_weights(dir: &std::path::Path) -> (Model, std::path::PathBuf) {
    let x = Input::new([3]);
    let y = Dense::new(2)
        .call(&BatchNorm::new().call(&x).unwrap())
        .unwrap();
    let model = common::build(&x, &y);
    let path = dir.join("w.safetensors");
    model.save_weights(&path).unwrap();
    (model, path)
}

#[test]
fn bit_flipped_weight_files_never_load_changed_values() {
    let dir = tempfile::tempdir().unwrap();
    let (model, path) = saved_weights(dir.path());
    let original = std::fs::read(&path).unwrap();
    let reference = model.weight_map().unwrap();
    let reference: HashMap<String, Vec<f32>> = reference
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    // A seeded walk over every byte position (several bits each): no panic, and a load that
    // succeeds must give exactly the saved values (a flip in JSON white space, say).
    let mut state = 7u64;
    let mut refused = 0;
    let cases = 12_000;
    for i in 0..cases {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut bytes = original.clone();
        let at = i % bytes.len();
        bytes[at] ^= 1 << ((state >> 59) as u8 % 8);
        let flipped = dir.path().join("flipped.safetensors");
        std::fs::write(&flipped, &bytes).unwrap();
        match model.load_weights(&flipped) {
            Err(_) => refused += 1,
            Ok(()) => {
                for (name, values) in model.weight_map().unwrap() {
                    let got = values.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(
                        got, reference[&name],
                        "flip at byte {at} changed {name} silently"
                    );
                }
            }
        }
    }
    eprintln!("{refused} of {cases} corrupted files refused, the rest loaded unchanged");
    assert!(
        refused > cases * 9 / 10,
        "only {refused} of {cases} flips were refused"
    );
    model.load_weights(&path).unwrap();
}

#[test]
fn saves_use_their_own_temporary_files_and_clean_up_after_killed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (model, path) = saved_weights(dir.path());
    // A temporary file left by a process that is gone (pid 4 000 000 000 never runs).
    let stale = dir.path().join(".w.safetensors.tmp4000000000-0");
    std::fs::write(&stale, b"half a file").unwrap();
    model.save_weights(&path).unwrap();
    if std::path::Path::new("/proc").is_dir() {
        assert!(!stale.exists(), "the stale temporary file is still there");
    }
    // Two threads saving to one path: every save succeeds, the file stays whole.
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                for _ in 0..50 {
                    model.save_weights(&path).unwrap();
                }
            });
        }
    });
    model.load_weights(&path).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // An unwritable place fails with its path.
    let err = model
        .save_weights(dir.path().join("no/such/folder/w.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no/such/folder"), "{err}");
}

#[test]
fn a_resume_with_other_data_or_another_optimizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ckpt");
    let x = Input::new([2]);
    let y = Dense::new(2).call(&x).unwrap();
    let model = || common::build(&x, &y);
    let data = |batch| {
        candle_functional::data::TensorDataset::new(
            vec![Tensor::randn(0f32, 1.0, (8, 2), &CPU).unwrap()],
            vec![Tensor::new(&[0u32, 1, 0, 1, 0, 1, 0, 1], &CPU).unwrap()],
            batch,
        )
        .unwrap()
    };
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut first = Trainer::new(model(), SgdConfig::default(), loss).unwrap();
    first.fit(&data(4), None, 1, &mut []).unwrap();
    first.save_checkpoint(&path).unwrap();

    let mut other_optimizer = Trainer::new(model(), AdamConfig::default(), loss).unwrap();
    let err = other_optimizer
        .load_checkpoint(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Sgd") && err.contains("Adam"), "{err}");

    let mut resumed = Trainer::new(model(), SgdConfig::default(), loss).unwrap();
    resumed.load_checkpoint(&path).unwrap();
    let err = resumed
        .fit(&data(2), None, 2, &mut [])
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 batches") && err.contains("4"), "{err}");
    resumed.fit(&data(4), None, 2, &mut []).unwrap();
}

#[test]
fn a_history_with_non_finite_values_round_trips() {
    use candle_functional::train::{EpochLog, History};
    let mut history = History::default();
    history.push(
        EpochLog {
            epoch: 1,
            loss: f64::NAN,
            val_loss: Some(f64::INFINITY),
            ..Default::default()
        }
        .with_metric("accuracy", f64::NAN)
        .with_metric("mae", 0.5),
    );
    let back = History::from_json(&history.to_json().unwrap()).unwrap();
    let epoch = &back.epochs()[0];
    assert!(epoch.loss.is_nan());
    assert_eq!(
        epoch.metric("accuracy"),
        None,
        "non-finite metrics are skipped"
    );
    assert_eq!(epoch.metric("mae"), Some(0.5));
}

#[test]
fn the_device_side_divergence_check_stops_at_the_same_state_without_waiting() {
    use candle_functional::train::NanCheck;
    let data = || {
        let mut values = vec![1f32; 8 * 2];
        values[2 * 2 + 1] = f32::INFINITY; // the second batch of four (steps of two samples)
        candle_functional::data::TensorDataset::new(
            vec![Tensor::from_vec(values, (8, 2), &CPU).unwrap()],
            vec![Tensor::new(&[0u32, 1, 0, 1, 0, 1, 0, 1], &CPU).unwrap()],
            2,
        )
        .unwrap()
    };
    let model = || {
        let x = Input::new([2]);
        let h = BatchNorm::new().call(&x).unwrap();
        let y = Dense::new(2).call(&h).unwrap();
        Model::new(&[x], &[y])
            .unwrap()
            .build(&CPU, DType::F32, 0)
            .unwrap()
    };
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut states = Vec::new();
    for check in [NanCheck::EveryStep, NanCheck::OnDevice] {
        let model = model();
        let mut trainer = Trainer::new(model.clone(), AdamConfig::default(), loss)
            .unwrap()
            .nan_check(check);
        let err = trainer.fit(&data(), None, 1, &mut []).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NonFinite {
                    epoch: 1,
                    step: 2,
                    ..
                }
            ),
            "{check:?}: {err}"
        );
        states.push(model.weight_map().unwrap());
    }
    // Every weight and statistic is as after step 1 in both: the device-side check applied
    // nothing from step 2 on, though it only found out at the end of the epoch.
    for (name, value) in &states[0] {
        assert_eq!(
            common::max_abs_diff(value, &states[1][name]),
            0.0,
            "{name} differs"
        );
    }
}

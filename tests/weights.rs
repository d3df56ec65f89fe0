//! Saving and loading weights: round trip, stable names, strict errors, atomic writes.

// `&[x.clone()]` reads better than `std::slice::from_ref(&x)` in tests.
#![allow(clippy::cloned_ref_to_slice_refs)]

mod common;

use candle_core::{DType, Device, Tensor};
use candle_functional::models::ResNetConfig;
use candle_functional::prelude::*;
use common::values;

fn tiny_res_net(seed: u64) -> Model {
    ResNetConfig::default()
        .width_divisor(16)
        .stages(vec![1, 1])
        .res_net()
        .unwrap()
        .build(&Device::Cpu, DType::F32, seed)
        .unwrap()
}

fn batch() -> Tensor {
    Tensor::arange(0f32, 2.0 * 3.0 * 32.0 * 32.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3, 32, 32))
        .unwrap()
}

#[test]
fn round_trip_restores_outputs_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let a = tiny_res_net(1);
    // Move the BatchNorm state away from its initial values first.
    a.forward(&[batch()], Mode::Train).unwrap();
    a.save_weights(&path).unwrap();

    let b = tiny_res_net(2);
    let before = values(&b.forward(&[batch()], Mode::Eval).unwrap()[0]);
    let want = values(&a.forward(&[batch()], Mode::Eval).unwrap()[0]);
    assert_ne!(before, want);
    b.load_weights(&path).unwrap();
    assert_eq!(values(&b.forward(&[batch()], Mode::Eval).unwrap()[0]), want);

    // Only the target file is left: the temporary file was renamed.
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1);
}

#[test]
fn weight_names_are_stable_keras_style() {
    let model = tiny_res_net(0);
    let names: Vec<String> = model
        .weights()
        .unwrap()
        .iter()
        .map(|w| w.name().to_string())
        .collect();
    for expected in [
        "batch_normalization.gamma",
        "batch_normalization.beta",
        "batch_normalization.moving_mean",
        "batch_normalization.moving_variance",
        "conv2d.kernel",
        "conv2d.bias",
        "dense.kernel",
        "dense.bias",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "missing {expected} in {names:?}"
        );
    }
}

#[test]
fn loading_names_every_missing_unexpected_and_misshaped_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.safetensors");
    // A model that differs: wider first stage, no second stage.
    let other = ResNetConfig::default()
        .width_divisor(8)
        .stages(vec![1])
        .res_net()
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap();
    other.save_weights(&path).unwrap();

    let model = tiny_res_net(0);
    let snapshot = values(&model.weight_map().unwrap()["conv2d.kernel"]);
    let err = model.load_weights(&path).unwrap_err();
    match &err {
        Error::WeightsMismatch {
            missing,
            unexpected,
            mis_shaped,
            ..
        } => {
            // The second stage's projection exists only in `model`.
            assert!(
                missing.iter().any(|n| n.starts_with("conv2d_")),
                "{missing:?}"
            );
            assert!(unexpected.is_empty(), "{unexpected:?}");
            let conv = mis_shaped
                .iter()
                .find(|(n, _, _)| n == "conv2d.kernel")
                .unwrap();
            assert_eq!(conv.1, [4, 3, 3, 3]);
            assert_eq!(conv.2, [8, 3, 3, 3]);
        }
        other => panic!("wrong error: {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("other.safetensors") && text.contains("conv2d.kernel"),
        "{text}"
    );
    // Nothing was changed.
    assert_eq!(
        values(&model.weight_map().unwrap()["conv2d.kernel"]),
        snapshot
    );

    // Unexpected names are listed too.
    let mut map = model.weight_map().unwrap();
    map.insert(
        "ghost.kernel".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    match model.set_weights(&map).unwrap_err() {
        Error::WeightsMismatch {
            unexpected,
            missing,
            ..
        } => {
            assert_eq!(unexpected, ["ghost.kernel"]);
            assert!(missing.is_empty());
        }
        other => panic!("wrong error: {other}"),
    }
}

#[test]
fn corrupt_files_report_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.safetensors");
    std::fs::write(&path, b"not a safetensors file").unwrap();
    let err = tiny_res_net(0).load_weights(&path).unwrap_err();
    assert!(matches!(err, Error::Safetensors { .. }), "{err}");
    assert!(err.to_string().contains("broken.safetensors"));
}

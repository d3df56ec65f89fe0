//! `fit` for any functional model: several outputs with weighted losses, every loss and metric
//! against values computed by hand, per-pixel cross-entropy, freezing, failed steps that
//! change nothing, strict checkpoint loading, layer introspection and image folders.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_functional::data::{Batch, Dataset, ImageFolder, ImageFolderConfig, TensorDataset};
use candle_functional::prelude::*;
use candle_functional::train::*;
use common::max_abs_diff;

const CPU: Device = Device::Cpu;

fn t2(values: &[&[f32]]) -> Tensor {
    Tensor::new(values.iter().map(|r| r.to_vec()).collect::<Vec<_>>(), &CPU).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn log_softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f64::MIN, f64::max);
    let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
    row.iter().map(|v| v - max - sum.ln()).collect()
}

#[test]
fn every_loss_matches_its_formula() {
    let out: [[f64; 3]; 2] = [[0.2, 0.5, 0.3], [0.7, 0.1, 0.2]];
    let outputs = t2(&[&[0.2, 0.5, 0.3], &[0.7, 0.1, 0.2]]);
    let labels = Tensor::new(&[1u32, 2], &CPU).unwrap();
    let one_hot = t2(&[&[0.0, 1.0, 0.0], &[0.0, 0.0, 1.0]]);
    let check = |loss: Loss, targets: &Tensor, want: f64| {
        let got = scalar(&loss.compute(&outputs, targets).unwrap());
        approx::assert_abs_diff_eq!(got, want, epsilon = 1e-6);
    };
    // Probabilities: -mean(log p[label]).
    let sparse = -(out[0][1].ln() + out[1][2].ln()) / 2.0;
    check(
        Loss::SparseCategoricalCrossentropy { from_logits: false },
        &labels,
        sparse,
    );
    check(
        Loss::CategoricalCrossentropy { from_logits: false },
        &one_hot,
        sparse,
    );
    // Logits: the same through a log-softmax.
    let logit = -(log_softmax(&[0.2, 0.5, 0.3])[1] + log_softmax(&[0.7, 0.1, 0.2])[2]) / 2.0;
    check(
        Loss::SparseCategoricalCrossentropy { from_logits: true },
        &labels,
        logit,
    );
    check(
        Loss::CategoricalCrossentropy { from_logits: true },
        &one_hot,
        logit,
    );

    // Element-wise losses over all six values.
    let targets = t2(&[&[0.0, 1.0, 0.0], &[1.0, 0.0, 3.0]]);
    let pairs: Vec<(f64, f64)> = [0.2, 0.5, 0.3, 0.7, 0.1, 0.2]
        .iter()
        .zip([0.0, 1.0, 0.0, 1.0, 0.0, 3.0])
        .map(|(&o, t)| (o, t))
        .collect();
    let mean = |f: &dyn Fn(f64, f64) -> f64| pairs.iter().map(|&(o, t)| f(o, t)).sum::<f64>() / 6.0;
    check(
        Loss::MeanSquaredError,
        &targets,
        mean(&|o, t| (o - t).powi(2)),
    );
    check(
        Loss::MeanAbsoluteError,
        &targets,
        mean(&|o, t| (o - t).abs()),
    );
    let huber = |d: f64| {
        move |o: f64, t: f64| {
            let e = (o - t).abs();
            if e <= d {
                0.5 * e * e
            } else {
                d * (e - 0.5 * d)
            }
        }
    };
    check(Loss::Huber { delta: 1.0 }, &targets, mean(&huber(1.0)));
    check(Loss::Huber { delta: 0.3 }, &targets, mean(&huber(0.3)));

    let binary = t2(&[&[0.0, 1.0, 0.0], &[1.0, 0.0, 1.0]]);
    let bce = |p: f64, t: f64| -(t * p.ln() + (1.0 - t) * (1.0 - p).ln());
    let bce_pairs: Vec<(f64, f64)> = [0.2, 0.5, 0.3, 0.7, 0.1, 0.2]
        .iter()
        .zip([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
        .map(|(&o, t)| (o, t))
        .collect();
    let want = bce_pairs.iter().map(|&(p, t)| bce(p, t)).sum::<f64>() / 6.0;
    check(
        Loss::BinaryCrossentropy { from_logits: false },
        &binary,
        want,
    );
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let want = bce_pairs
        .iter()
        .map(|&(x, t)| bce(sigmoid(x), t))
        .sum::<f64>()
        / 6.0;
    check(
        Loss::BinaryCrossentropy { from_logits: true },
        &binary,
        want,
    );
}

#[test]
fn per_pixel_cross_entropy_averages_over_every_position() {
    // (batch 1, classes 2, 1 x 3 positions), labels per position.
    let logits = Tensor::new(&[[[[1f32, 0.0, -2.0]], [[0.0, 3.0, 1.0]]]], &CPU).unwrap();
    let labels = Tensor::new(&[[[0u32, 1, 0]]], &CPU).unwrap();
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    loss.check_target(&[2, 1, 3], &labels, 1, "mask").unwrap();
    let want =
        -(log_softmax(&[1.0, 0.0])[0] + log_softmax(&[0.0, 3.0])[1] + log_softmax(&[-2.0, 1.0])[0])
            / 3.0;
    approx::assert_abs_diff_eq!(
        scalar(&loss.compute(&logits, &labels).unwrap()),
        want,
        epsilon = 1e-6
    );
    // Two positions of three are right: per-pixel accuracy 2/3.
    let mut acc = Accuracy::sparse();
    acc.update(&logits, &labels).unwrap();
    approx::assert_abs_diff_eq!(acc.result().unwrap(), 2.0 / 3.0, epsilon = 1e-12);
}

#[test]
fn every_metric_matches_a_hand_count() {
    let out = t2(&[
        &[0.1, 0.6, 0.3],
        &[0.5, 0.2, 0.3],
        &[0.2, 0.3, 0.5],
        &[0.4, 0.35, 0.25],
    ]);
    let labels = Tensor::new(&[1u32, 2, 2, 1], &CPU).unwrap();
    let one_hot = t2(&[
        &[0.0, 1.0, 0.0],
        &[0.0, 0.0, 1.0],
        &[0.0, 0.0, 1.0],
        &[0.0, 1.0, 0.0],
    ]);
    let result = |mut m: Box<dyn Metric>, targets: &Tensor| {
        // Two updates of the same batch: results are means, not sums.
        m.update(&out, targets).unwrap();
        m.update(&out, targets).unwrap();
        m.result().unwrap()
    };
    // Arg-max 1, 0, 2, 0 against 1, 2, 2, 1: two right.
    assert_eq!(result(Box::new(Accuracy::sparse()), &labels), 0.5);
    assert_eq!(result(Box::new(Accuracy::categorical()), &one_hot), 0.5);
    // Top 2: {1, 2}, {0, 2}, {2, 1}, {0, 1}: all four contain the label.
    assert_eq!(result(Box::new(TopKAccuracy::new(2)), &labels), 1.0);
    assert_eq!(result(Box::new(TopKAccuracy::new(1)), &labels), 0.5);
    // Binary at 0.5 over the one-hot targets: only 0.6 is above the threshold, so the
    // prediction is wrong exactly where the other three ones are: 9 of 12 right.
    assert_eq!(
        result(Box::new(Accuracy::binary(0.5)), &one_hot),
        9.0 / 12.0
    );
    let abs: f64 = [0.1, 0.4, 0.3, 0.5, 0.2, 0.7, 0.2, 0.3, 0.5, 0.4, 0.65, 0.25]
        .iter()
        .sum();
    approx::assert_abs_diff_eq!(
        result(Box::new(MeanError::absolute()), &one_hot),
        abs / 12.0,
        epsilon = 1e-6
    );
    let sq: f64 = [
        0.1f64, 0.4, 0.3, 0.5, 0.2, 0.7, 0.2, 0.3, 0.5, 0.4, 0.65, 0.25,
    ]
    .iter()
    .map(|v| v * v)
    .sum();
    approx::assert_abs_diff_eq!(
        result(Box::new(MeanError::squared()), &one_hot),
        sq / 12.0,
        epsilon = 1e-6
    );
    // IoU: predictions 1, 0, 2, 0 vs labels 1, 2, 2, 1. Class 0: 0 / 2; class 1: 1 / 2;
    // class 2: 1 / 2.
    approx::assert_abs_diff_eq!(
        result(Box::new(MeanIoU::new(3)), &labels),
        (0.0 + 0.5 + 0.5) / 3.0,
        epsilon = 1e-12
    );
}

/// `x (3) → dense "shared" (4, relu) → "class" (3 logits), "value" (1)`.
fn two_head_model() -> Model {
    let x = Input::new([3]);
    let h = Dense::new(4)
        .activation(ActivationFn::Relu)
        .name("shared")
        .call(&x)
        .unwrap();
    let class = Dense::new(3).name("class").call(&h).unwrap();
    let value = Dense::new(1).name("value").call(&h).unwrap();
    Model::new(&[x], &[class, value])
        .unwrap()
        .build(&CPU, DType::F64, 3)
        .unwrap()
}

fn weight(model: &Model, name: &str) -> Tensor {
    model.weight_map().unwrap()[name].copy().unwrap()
}

#[test]
fn a_two_output_step_minimizes_the_weighted_sum_and_moves_both_heads() {
    let model = two_head_model();
    let x = Tensor::new(&[[1f64, -0.5, 2.0], [0.3, 0.8, -1.0]], &CPU).unwrap();
    let labels = Tensor::new(&[2u32, 0], &CPU).unwrap();
    let values = Tensor::new(&[[1.5f64], [-0.5]], &CPU).unwrap();
    // The losses by hand, from the model's own outputs before the step.
    let out = model.forward(std::slice::from_ref(&x), Mode::Eval).unwrap();
    let logits = out[0].to_vec2::<f64>().unwrap();
    let ce = -(log_softmax(&logits[0])[2] + log_softmax(&logits[1])[0]) / 2.0;
    let v = out[1].to_vec2::<f64>().unwrap();
    let mse = ((v[0][0] - 1.5).powi(2) + (v[1][0] + 0.5).powi(2)) / 2.0;

    let losses = Losses::per_output(vec![
        Loss::SparseCategoricalCrossentropy { from_logits: true },
        Loss::MeanSquaredError,
    ])
    .weights(vec![1.0, 0.25]);
    let mut trainer = Trainer::new(model.clone(), SgdConfig::default(), losses).unwrap();
    let before = (
        weight(&model, "class.kernel"),
        weight(&model, "value.kernel"),
    );
    let batch = Batch::new(vec![x], vec![labels, values]);
    let loss = scalar(&trainer.train_step(&batch, 0.1).unwrap());
    approx::assert_abs_diff_eq!(loss, ce + 0.25 * mse, epsilon = 1e-12);
    assert!(
        max_abs_diff(&before.0, &weight(&model, "class.kernel")) > 0.0,
        "class head moved"
    );
    assert!(
        max_abs_diff(&before.1, &weight(&model, "value.kernel")) > 0.0,
        "value head moved"
    );

    // fit reports each output's loss and metrics under Keras's names.
    let data = TensorDataset::new(batch.inputs.clone(), batch.targets.clone(), 2).unwrap();
    let log = trainer
        .fit(&data, Some(&data), 1, &mut [])
        .unwrap()
        .last()
        .unwrap()
        .clone();
    for key in [
        "class_loss",
        "value_loss",
        "class_accuracy",
        "val_class_accuracy",
        "val_value_loss",
    ] {
        assert!(
            log.metric(key).is_some(),
            "{key} missing from {:?}",
            log.metrics
        );
    }
    approx::assert_abs_diff_eq!(
        log.metric("val_loss").unwrap(),
        log.metric("val_class_loss").unwrap() + 0.25 * log.metric("val_value_loss").unwrap(),
        epsilon = 1e-9
    );
}

#[test]
fn a_step_with_bad_targets_changes_nothing_and_names_the_output() {
    let x = Input::new([2]);
    let h = BatchNorm::new().call(&x).unwrap();
    let y = Dense::new(3).name("head").call(&h).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, 0)
        .unwrap();
    let mut trainer = Trainer::new(
        model.clone(),
        AdamConfig::default(),
        Loss::SparseCategoricalCrossentropy { from_logits: true },
    )
    .unwrap();
    let before = model.weight_map().unwrap();
    let before: HashMap<String, Tensor> = before
        .into_iter()
        .map(|(k, v)| (k, v.copy().unwrap()))
        .collect();
    let x = Tensor::new(&[[1f32, 2.0], [3.0, 5.0]], &CPU).unwrap();
    let bad_batches = [
        (Tensor::new(&[0u32, 3], &CPU).unwrap(), "0..3"), // label out of range
        (Tensor::new(&[0f32, 1.0], &CPU).unwrap(), "integer"), // float labels
        (Tensor::new(&[[0u32], [1]], &CPU).unwrap(), "per-sample"), // wrong shape
        (Tensor::new(&[0u32, 1, 2], &CPU).unwrap(), "batch of 2"), // wrong batch
    ];
    for (labels, says) in bad_batches {
        let err = trainer
            .train_step(&Batch::new(vec![x.clone()], vec![labels]), 0.1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("head") && err.contains(says), "{err}");
    }
    let err = trainer
        .train_step(&Batch::new(vec![x], vec![]), 0.1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 output"), "{err}");
    for (name, value) in model.weight_map().unwrap() {
        assert_eq!(max_abs_diff(&value, &before[&name]), 0.0, "{name} changed");
    }
}

#[test]
fn a_frozen_base_keeps_its_weights_and_statistics_while_the_head_learns() {
    // The base: conv, batch norm; the head on top.
    let x = Input::new([2, 4, 4]);
    let h = Conv2D::new(3, 3)
        .padding(Padding::Same)
        .name("base_conv")
        .call(&x)
        .unwrap();
    let h = BatchNorm::new().name("base_bn").call(&h).unwrap();
    let base = Model::new(std::slice::from_ref(&x), std::slice::from_ref(&h))
        .unwrap()
        .named("base");
    let pooled = GlobalAveragePooling2D::new().call(&h).unwrap();
    let y = Dense::new(2).name("head").call(&pooled).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, 1)
        .unwrap();
    let all = model.count_params();
    base.set_trainable(false);
    let frozen = model.count_params();
    assert_eq!(frozen.trainable, 2 * 3 + 2, "only the head trains");
    assert_eq!(frozen.total, all.total);
    assert!(
        model
            .summary()
            .contains(&format!("Trainable params: {}", frozen.trainable))
    );

    let data = TensorDataset::new(
        vec![Tensor::randn(3f32, 2.0, (8, 2, 4, 4), &CPU).unwrap()],
        vec![Tensor::new(&[0u32, 1, 0, 1, 1, 0, 1, 0], &CPU).unwrap()],
        4,
    )
    .unwrap();
    let snapshot = |names: &[&str]| names.iter().map(|n| weight(&model, n)).collect::<Vec<_>>();
    let base_names = [
        "base_conv.kernel",
        "base_bn.gamma",
        "base_bn.moving_mean",
        "base_bn.moving_variance",
    ];
    let (base_before, head_before) = (snapshot(&base_names), snapshot(&["head.kernel"]));
    let mut trainer = Trainer::new(
        model.clone(),
        AdamConfig::default(),
        Loss::SparseCategoricalCrossentropy { from_logits: true },
    )
    .unwrap();
    trainer.fit(&data, None, 2, &mut []).unwrap();
    for (name, (a, b)) in base_names
        .iter()
        .zip(base_before.iter().zip(snapshot(&base_names)))
    {
        assert_eq!(max_abs_diff(a, &b), 0.0, "{name} changed while frozen");
    }
    assert!(
        max_abs_diff(&head_before[0], &weight(&model, "head.kernel")) > 0.0,
        "the head learns"
    );

    // Unfrozen, the base trains too (its optimizer slots are created then).
    base.set_trainable(true);
    trainer.fit(&data, None, 3, &mut []).unwrap();
    for (name, (a, b)) in base_names
        .iter()
        .zip(base_before.iter().zip(snapshot(&base_names)))
    {
        assert!(max_abs_diff(a, &b) > 0.0, "{name} still frozen");
    }
}

#[test]
fn a_checkpoint_that_fails_on_the_optimizer_leaves_the_model_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ckpt");
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let data = TensorDataset::new(
        vec![Tensor::randn(0f64, 1.0, (4, 3), &CPU).unwrap()],
        vec![
            Tensor::new(&[0u32, 1, 2, 1], &CPU).unwrap(),
            Tensor::randn(0f64, 1.0, (4, 1), &CPU).unwrap(),
        ],
        2,
    )
    .unwrap();
    let losses = Losses::per_output(vec![loss, Loss::MeanSquaredError]);
    let mut trained =
        Trainer::new(two_head_model(), AdamConfig::default(), losses.clone()).unwrap();
    trained.fit(&data, None, 1, &mut []).unwrap();
    trained.save_checkpoint(&path).unwrap();

    // Same file, one optimizer slot reshaped.
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &CPU).unwrap();
    let slot = "optimizer.m.class.kernel";
    assert!(tensors.contains_key(slot), "slots are named by variable");
    tensors.insert(
        slot.into(),
        Tensor::zeros((2, 2), DType::F64, &CPU).unwrap(),
    );
    let broken = dir.path().join("broken.ckpt");
    let write = |meta: &HashMap<String, String>| {
        safetensors::serialize_to_file(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            Some(meta.clone()),
            &broken,
        )
        .unwrap()
    };
    // With its checksum the edit is caught as such; without one (an older file), by the
    // optimizer's own check.
    write(&meta);
    let mut probe = Trainer::new(two_head_model(), AdamConfig::default(), losses.clone()).unwrap();
    let err = probe.load_checkpoint(&broken).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    meta.remove("sha256");
    write(&meta);

    let fresh = two_head_model();
    let before: Vec<Tensor> = fresh
        .weights()
        .unwrap()
        .iter()
        .map(|w| w.var().as_tensor().copy().unwrap())
        .collect();
    let mut resumed = Trainer::new(fresh.clone(), AdamConfig::default(), losses).unwrap();
    let err = resumed.load_checkpoint(&broken).unwrap_err().to_string();
    assert!(
        err.contains("m.class.kernel") && err.contains("[4, 3]"),
        "{err}"
    );
    for (w, b) in fresh.weights().unwrap().iter().zip(&before) {
        assert_eq!(
            max_abs_diff(w.var().as_tensor(), b),
            0.0,
            "{} changed",
            w.name()
        );
    }
    assert_eq!(resumed.epochs_done(), 0);
    resumed.load_checkpoint(&path).unwrap();
    assert_eq!(resumed.epochs_done(), 1);
}

#[test]
fn get_layer_cuts_a_feature_extractor_that_shares_weights() {
    let model = two_head_model();
    let features = model.get_layer("shared").unwrap().output().unwrap();
    let extractor = Model::new(model.inputs(), &[features]).unwrap();
    let x = Tensor::new(&[[1f64, 2.0, 3.0]], &CPU).unwrap();
    let h = extractor
        .forward(std::slice::from_ref(&x), Mode::Eval)
        .unwrap()
        .remove(0);
    // The head applied to the extracted features gives the full model's output.
    let w = model
        .get_layer("class")
        .unwrap()
        .layer()
        .get_weights()
        .unwrap();
    let by_hand = h.matmul(&w[0].1).unwrap().broadcast_add(&w[1].1).unwrap();
    let full = model.forward(&[x], Mode::Eval).unwrap().remove(0);
    assert!(max_abs_diff(&by_hand, &full) < 1e-12);
    assert_eq!(
        model.get_layer("shared").unwrap().input().unwrap().shape(),
        &[3]
    );
}

#[test]
fn tensor_datasets_shuffle_every_epoch_and_cover_every_sample() {
    let x = Tensor::arange(0u32, 10, &CPU).unwrap();
    let data = TensorDataset::new(vec![x.clone()], vec![x], 3)
        .unwrap()
        .shuffle(true)
        .seed(4);
    let epoch = |e| -> Vec<u32> {
        data.batches(e)
            .flat_map(|b| b.unwrap().inputs[0].to_vec1::<u32>().unwrap())
            .collect()
    };
    let (a, b) = (epoch(0), epoch(1));
    assert_ne!(a, b);
    assert_eq!(a, epoch(0));
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    // Inputs and targets stay paired.
    for batch in data.batches(2) {
        let batch = batch.unwrap();
        assert_eq!(
            batch.inputs[0].to_vec1::<u32>().unwrap(),
            batch.targets[0].to_vec1::<u32>().unwrap()
        );
    }
}

#[test]
fn an_image_folder_reads_classes_resizes_and_splits() {
    let dir = tempfile::tempdir().unwrap();
    // Two classes of solid-colour 5x7 images, PNG and JPEG mixed, and a stray text file.
    for (class, colour) in [("cats", [200u8, 10, 10]), ("dogs", [10u8, 10, 200])] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        for i in 0..3 {
            let img = image::RgbImage::from_pixel(7, 5, image::Rgb(colour));
            let ending = if i == 0 { "jpg" } else { "png" };
            img.save(dir.path().join(class).join(format!("{i}.{ending}")))
                .unwrap();
        }
    }
    std::fs::write(dir.path().join("cats").join("notes.txt"), "not an image").unwrap();
    let config = ImageFolderConfig {
        image_size: (4, 4),
        validation_split: 1.0 / 3.0,
        seed: 2,
    };
    let folder = ImageFolder::load(dir.path(), config.clone()).unwrap();
    assert_eq!(folder.class_names(), ["cats", "dogs"]);
    let (train, val) = (folder.train(), folder.validation().unwrap());
    assert_eq!((train.len(), val.len()), (4, 2));
    assert_eq!(train.image_shape(), [3, 4, 4]);
    for ds in [train, val] {
        for i in 0..ds.len() {
            // Channel 0 is red: high for cats, low for dogs (JPEG is lossy: a tolerance).
            let red = ds.image(i).unwrap()[0] as i32;
            let want = if ds.label(i).unwrap() == 0 { 200 } else { 10 };
            assert!(
                (red - want).abs() <= 12,
                "label {} red {red}",
                ds.label(i).unwrap()
            );
        }
    }
    // The split is a function of the seed.
    let again = ImageFolder::load(dir.path(), config).unwrap();
    assert_eq!(
        again.validation().unwrap().label(0).unwrap(),
        val.label(0).unwrap()
    );
    assert_eq!(
        again.validation().unwrap().label(1).unwrap(),
        val.label(1).unwrap()
    );

    // A file that does not decode is named.
    std::fs::write(dir.path().join("dogs").join("broken.png"), "garbage").unwrap();
    let err = ImageFolder::load(dir.path(), ImageFolderConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.png"), "{err}");
}

#[test]
fn optimizer_slots_follow_variable_names() {
    let w = Var::new(&[1.0f32, 2.0], &CPU).unwrap();
    let mut adam = Adam::new(AdamConfig::default()).unwrap();
    let grads = w
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    adam.step(&[("layer.kernel".to_string(), w.clone())], &grads, 0.1)
        .unwrap();
    let slots = adam.state().unwrap().slots;
    // Slots hold values, not the step's autograd graph (which would keep every step's
    // activations alive from one step to the next).
    assert!(
        slots.iter().all(|(_, t)| !t.track_op()),
        "a slot tracks its history"
    );
    let names: Vec<String> = slots.into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["m.layer.kernel", "v.layer.kernel"]);
    let mut sgd = Sgd::new(SgdConfig::momentum(0.1, 0.9)).unwrap();
    let grads = w
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    sgd.step(&[("layer.kernel".to_string(), w.clone())], &grads, 0.1)
        .unwrap();
    assert!(
        sgd.state()
            .unwrap()
            .slots
            .iter()
            .all(|(_, t)| !t.track_op()),
        "a velocity tracks its history"
    );
    let wrong = OptimizerState {
        iterations: 1,
        slots: vec![(
            "m.other".into(),
            Tensor::zeros(2, DType::F32, &CPU).unwrap(),
        )],
    };
    let vars = [("layer.kernel".to_string(), w)];
    assert!(
        adam.check_state(&wrong, &vars)
            .unwrap_err()
            .to_string()
            .contains("m.other")
    );
}

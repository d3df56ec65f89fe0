//! Training: optimizers against hand-computed updates, every optimizer lowers the loss, a
//! tiny ResNet memorizes 64 random images, BatchNorm state in fit, checkpoints, and resuming
//! a run gives the weights of an uninterrupted one.

// `&[x.clone()]` reads better than `std::slice::from_ref(&x)` in tests.
#![allow(clippy::cloned_ref_to_slice_refs)]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_functional::data::{Batch, DataLoader, ImageDataset};
use candle_functional::models::ResNetConfig;
use candle_functional::prelude::*;
use candle_functional::train::*;
use common::max_abs_diff;

fn scalar_values(v: &Var) -> Vec<f64> {
    v.as_tensor().to_vec1::<f64>().unwrap()
}

/// Loss `3 a + b²` at (a, b) = (1, 2): gradient (3, 4).
fn two_parameter_grads(w: &Var) -> candle_core::backprop::GradStore {
    let coeffs = Tensor::new(&[3.0f64, 0.0], &Device::Cpu).unwrap();
    let square = Tensor::new(&[0.0f64, 1.0], &Device::Cpu).unwrap();
    let loss = ((w.as_tensor() * &coeffs).unwrap()
        + (w.as_tensor().sqr().unwrap() * &square).unwrap())
    .unwrap()
    .sum_all()
    .unwrap();
    loss.backward().unwrap()
}

/// The variable under the name an optimizer keys its slots by.
fn named(w: &Var) -> Vec<(String, Var)> {
    vec![("w".to_string(), w.clone())]
}

#[test]
fn adam_matches_keras_update_rule_by_hand() {
    let w = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
    let mut adam = Adam::new(AdamConfig::default()).unwrap();
    let lr = 0.1;
    adam.step(&named(&w), &two_parameter_grads(&w), lr).unwrap();
    // t = 1: m = 0.1 g, v = 0.001 g², alpha = lr * sqrt(0.001) / 0.1,
    // step = alpha * m / (sqrt(v) + 1e-7).
    let expected = |w0: f64, g: f64| {
        let (m, v) = (0.1 * g, 0.001 * g * g);
        let alpha = lr * 0.001f64.sqrt() / 0.1;
        w0 - alpha * m / (v.sqrt() + 1e-7)
    };
    let got = scalar_values(&w);
    approx::assert_abs_diff_eq!(got[0], expected(1.0, 3.0), epsilon = 1e-12);
    approx::assert_abs_diff_eq!(got[1], expected(2.0, 4.0), epsilon = 1e-12);

    // t = 2, gradient (3, 2 * b1).
    let b1 = got[1];
    adam.step(&named(&w), &two_parameter_grads(&w), lr).unwrap();
    let m = [0.9 * 0.3 + 0.1 * 3.0, 0.9 * 0.4 + 0.1 * 2.0 * b1];
    let v = [
        0.999 * 0.009 + 0.001 * 9.0,
        0.999 * 0.016 + 0.001 * (2.0 * b1).powi(2),
    ];
    let alpha = lr * (1.0 - 0.999f64.powi(2)).sqrt() / (1.0 - 0.9f64.powi(2));
    let got2 = scalar_values(&w);
    approx::assert_abs_diff_eq!(
        got2[0],
        got[0] - alpha * m[0] / (v[0].sqrt() + 1e-7),
        epsilon = 1e-12
    );
    approx::assert_abs_diff_eq!(
        got2[1],
        b1 - alpha * m[1] / (v[1].sqrt() + 1e-7),
        epsilon = 1e-12
    );
}

#[test]
fn adamw_decays_weights_before_the_update() {
    let w = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
    let plain = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
    let mut adamw = Adam::new(AdamConfig::adamw(0.5)).unwrap();
    let mut adam = Adam::new(AdamConfig::default()).unwrap();
    adamw
        .step(&named(&w), &two_parameter_grads(&w), 0.1)
        .unwrap();
    adam.step(&named(&plain), &two_parameter_grads(&plain), 0.1)
        .unwrap();
    // w = w (1 - lr wd) - step: differs from plain Adam by lr * wd * w0.
    let (a, b) = (scalar_values(&w), scalar_values(&plain));
    approx::assert_abs_diff_eq!(b[0] - a[0], 0.1 * 0.5 * 1.0, epsilon = 1e-12);
    approx::assert_abs_diff_eq!(b[1] - a[1], 0.1 * 0.5 * 2.0, epsilon = 1e-12);
}

#[test]
fn sgd_momentum_and_nesterov_match_keras_by_hand() {
    let lr = 0.1;
    for nesterov in [false, true] {
        let w = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        let config = SgdConfig::momentum(lr, 0.9).nesterov(nesterov);
        let mut sgd = Sgd::new(config).unwrap();
        let mut expected = [1.0f64, 2.0];
        let mut u = [0.0f64, 0.0];
        for _ in 0..3 {
            let g = [3.0, 2.0 * expected[1]];
            sgd.step(&named(&w), &two_parameter_grads(&w), lr).unwrap();
            for i in 0..2 {
                u[i] = 0.9 * u[i] - lr * g[i];
                expected[i] += if nesterov {
                    0.9 * u[i] - lr * g[i]
                } else {
                    u[i]
                };
            }
            let got = scalar_values(&w);
            approx::assert_abs_diff_eq!(got[0], expected[0], epsilon = 1e-12);
            approx::assert_abs_diff_eq!(got[1], expected[1], epsilon = 1e-12);
        }
    }
    // Plain SGD with decoupled weight decay: w = w (1 - lr wd) - lr g.
    let w = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
    let mut sgd = Sgd::new(SgdConfig::default().weight_decay(0.5)).unwrap();
    sgd.step(&named(&w), &two_parameter_grads(&w), lr).unwrap();
    let got = scalar_values(&w);
    approx::assert_abs_diff_eq!(got[0], 1.0 * 0.95 - 0.3, epsilon = 1e-12);
    approx::assert_abs_diff_eq!(got[1], 2.0 * 0.95 - 0.4, epsilon = 1e-12);
}

/// 64 random 3x16x16 images with random labels: nothing to learn but the images themselves.
fn random_images(n: usize, seed: u64) -> ImageDataset {
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let images: Vec<u8> = (0..n * 3 * 16 * 16).map(|_| (next() % 256) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|_| (next() % 10) as u8).collect();
    ImageDataset::from_parts(&images, &labels, [3, 16, 16]).unwrap()
}

fn tiny_res_net(seed: u64) -> Model {
    let config = ResNetConfig {
        input_shape: [3, 16, 16],
        stages: vec![1, 1],
        filters: vec![16, 32],
        ..Default::default()
    };
    config
        .res_net()
        .unwrap()
        .build(&Device::Cpu, DType::F32, seed)
        .unwrap()
}

const PROBS: Loss = Loss::SparseCategoricalCrossentropy { from_logits: false };

#[test]
fn tiny_res_net_memorizes_64_random_images() {
    let data = random_images(64, 1);
    let train = DataLoader::new(data.clone(), 16, &Device::Cpu)
        .unwrap()
        .shuffle(true)
        .seed(3);
    let mut trainer = Trainer::new(
        tiny_res_net(0),
        AdamConfig {
            learning_rate: 3e-3,
            ..Default::default()
        },
        PROBS,
    )
    .unwrap();
    trainer.fit(&train, None, 40, &mut []).unwrap();
    // Judge in inference mode on the same images (moving statistics have settled).
    let eval = trainer
        .evaluate(&DataLoader::new(data, 64, &Device::Cpu).unwrap())
        .unwrap();
    let last = trainer.history().last().unwrap();
    let accuracy = last.metric("accuracy").unwrap();
    assert!(accuracy >= 0.95, "training accuracy {accuracy}");
    let accuracy = eval.metric("accuracy").unwrap();
    assert!(accuracy >= 0.95, "accuracy in inference mode {accuracy}");
}

#[test]
fn every_optimizer_lowers_the_loss() {
    let data = random_images(32, 2);
    let loader = DataLoader::new(data, 16, &Device::Cpu).unwrap();
    let configs: Vec<(&str, OptimizerConfig)> = vec![
        ("adam", AdamConfig::default().into()),
        ("adamw", AdamConfig::adamw(0.004).into()),
        (
            "sgd",
            SgdConfig {
                learning_rate: 0.05,
                ..Default::default()
            }
            .into(),
        ),
        ("momentum", SgdConfig::momentum(0.02, 0.9).into()),
        (
            "nesterov",
            SgdConfig::momentum(0.02, 0.9)
                .nesterov(true)
                .weight_decay(1e-4)
                .into(),
        ),
    ];
    for (name, config) in configs {
        let mut trainer = Trainer::new(tiny_res_net(1), config, PROBS).unwrap();
        let history = trainer.fit(&loader, None, 6, &mut []).unwrap();
        let (first, last) = (history.epochs()[0].loss, history.last().unwrap().loss);
        assert!(last < first * 0.9, "{name}: loss {first} -> {last}");
    }
}

#[test]
fn batch_norm_state_moves_in_fit_and_not_in_evaluate() {
    let data = random_images(16, 3);
    let loader = DataLoader::new(data, 8, &Device::Cpu).unwrap();
    let model = tiny_res_net(2);
    let mut trainer = Trainer::new(model.clone(), AdamConfig::default(), PROBS).unwrap();
    let mean = |m: &Model| {
        m.weight_map().unwrap()["batch_normalization.moving_mean"]
            .to_vec1::<f32>()
            .unwrap()
    };
    let before = mean(&model);
    trainer.evaluate(&loader).unwrap();
    assert_eq!(mean(&model), before);
    trainer.fit(&loader, None, 1, &mut []).unwrap();
    let after = mean(&model);
    assert!(after.iter().zip(&before).all(|(a, b)| a != b));
    // Raw pixels average about 127.5: two steps of momentum 0.99 move the mean ~2% of the way.
    assert!(after.iter().all(|&m| m > 1.0 && m < 10.0), "{after:?}");
}

#[test]
fn checkpoint_round_trip_restores_weights_optimizer_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ckpt");
    let loader = DataLoader::new(random_images(16, 4), 8, &Device::Cpu).unwrap();
    let mut a = Trainer::new(tiny_res_net(3), AdamConfig::default(), PROBS).unwrap();
    a.fit(&loader, Some(&loader), 2, &mut []).unwrap();
    a.save_checkpoint(&path).unwrap();

    let mut b = Trainer::new(tiny_res_net(4), AdamConfig::default(), PROBS).unwrap();
    b.load_checkpoint(&path).unwrap();
    assert_eq!(b.epochs_done(), 2);
    assert_eq!(b.history(), a.history());
    let wa = a.model().weight_map().unwrap();
    let wb = b.model().weight_map().unwrap();
    for (name, t) in &wa {
        let same = max_abs_diff(t, &wb[name]);
        assert_eq!(same, 0.0, "{name}");
    }
    // A checkpoint of another model is refused and names the problem.
    let mut other = Trainer::new(
        ResNetConfig {
            input_shape: [3, 16, 16],
            stages: vec![1],
            filters: vec![8],
            ..Default::default()
        }
        .res_net()
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap(),
        AdamConfig::default(),
        PROBS,
    )
    .unwrap();
    let err = other.load_checkpoint(&path).unwrap_err();
    assert!(matches!(err, Error::WeightsMismatch { .. }), "{err}");
    assert_eq!(other.epochs_done(), 0);
}

/// Stops a run as a crash would, after a given epoch.
struct Interrupt {
    after_epoch: usize,
}

impl Callback for Interrupt {
    fn on_epoch_end(&mut self, end: &mut FitContext<'_>) -> candle_functional::Result<()> {
        if end.epoch() == self.after_epoch {
            end.stop_training();
        }
        Ok(())
    }
}

#[test]
fn resuming_gives_the_weights_of_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_images(24, 5);
    let loader = DataLoader::new(data, 8, &Device::Cpu)
        .unwrap()
        .shuffle(true)
        .augmentation(candle_functional::data::Augmentation::standard())
        .seed(9);
    let config = || SgdConfig::momentum(0.01, 0.9);

    // Uninterrupted: 4 epochs with a one-cycle schedule.
    let mut full = Trainer::new(tiny_res_net(6), config(), PROBS)
        .unwrap()
        .schedule(LrSchedule::one_cycle());
    full.fit(&loader, None, 4, &mut []).unwrap();

    // The same run, interrupted after its second epoch's checkpoint, then resumed in a
    // fresh trainer whose model was built with another seed.
    let mut first = Trainer::new(tiny_res_net(6), config(), PROBS)
        .unwrap()
        .schedule(LrSchedule::one_cycle());
    let mut callbacks: Vec<Box<dyn Callback>> = vec![
        Box::new(ModelCheckpoint::new(dir.path()).monitor("loss")),
        Box::new(Interrupt { after_epoch: 2 }),
    ];
    first.fit(&loader, None, 4, &mut callbacks).unwrap();
    assert_eq!(first.epochs_done(), 2);
    let mut resumed = Trainer::new(tiny_res_net(77), config(), PROBS)
        .unwrap()
        .schedule(LrSchedule::one_cycle());
    resumed
        .load_checkpoint(dir.path().join("last.ckpt"))
        .unwrap();
    resumed.fit(&loader, None, 4, &mut []).unwrap();

    assert_eq!(resumed.history().epochs().len(), 4);
    let wf = full.model().weight_map().unwrap();
    let wr = resumed.model().weight_map().unwrap();
    for (name, t) in &wf {
        let diff = max_abs_diff(t, &wr[name]);
        assert_eq!(diff, 0.0, "{name} differs by {diff}");
    }
    assert_eq!(
        full.history().last().unwrap().loss,
        resumed.history().last().unwrap().loss
    );
}

#[test]
fn callbacks_stop_early_and_log_history() {
    let dir = tempfile::tempdir().unwrap();
    let loader = DataLoader::new(random_images(8, 6), 8, &Device::Cpu).unwrap();
    // A learning rate of zero never improves the loss: patience 2 stops after epoch 3.
    let mut trainer = Trainer::new(
        tiny_res_net(8),
        SgdConfig {
            learning_rate: 0.0,
            ..Default::default()
        },
        PROBS,
    )
    .unwrap();
    let json = dir.path().join("h.json");
    let csv = dir.path().join("h.csv");
    let mut callbacks: Vec<Box<dyn Callback>> = vec![
        Box::new(EarlyStopping::new("loss", 2).min_delta(1e-3)),
        Box::new(HistoryLogger::new().json(&json).csv(&csv)),
    ];
    trainer.fit(&loader, None, 10, &mut callbacks).unwrap();
    assert_eq!(trainer.epochs_done(), 3);
    let saved = History::from_json(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(&saved, trainer.history());
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 4);
}

#[test]
fn schedules_follow_their_definitions() {
    let total = 100;
    let step = LrSchedule::Step {
        every_epochs: 2,
        gamma: 0.5,
    };
    assert_eq!(step.learning_rate(1.0, 3, 0, total), 0.5);
    assert_eq!(step.learning_rate(1.0, 4, 0, total), 0.25);
    let cosine = LrSchedule::Cosine {
        min_fraction: 0.1,
        warmup_steps: 10,
    };
    approx::assert_abs_diff_eq!(cosine.learning_rate(1.0, 0, 4, total), 0.5, epsilon = 1e-12);
    approx::assert_abs_diff_eq!(
        cosine.learning_rate(1.0, 0, 10, total),
        1.0,
        epsilon = 1e-12
    );
    approx::assert_abs_diff_eq!(
        cosine.learning_rate(1.0, 0, 100, total),
        0.1,
        epsilon = 1e-12
    );
    let one = LrSchedule::one_cycle();
    let peak = (0..total)
        .map(|s| one.learning_rate(1.0, 0, s, total))
        .fold(0.0, f64::max);
    approx::assert_abs_diff_eq!(peak, 1.0, epsilon = 1e-3);
    approx::assert_abs_diff_eq!(
        one.learning_rate(1.0, 0, total - 1, total),
        1.0 / 25.0 / 1e4,
        epsilon = 1e-9
    );
}

#[test]
fn predict_returns_one_row_per_sample() {
    let loader = DataLoader::new(random_images(10, 7), 4, &Device::Cpu).unwrap();
    let trainer = Trainer::new(tiny_res_net(9), AdamConfig::default(), PROBS).unwrap();
    let probs = trainer.predict(&loader).unwrap().remove(0);
    assert_eq!(probs.dims(), &[10, 10]);
    let sums = probs.sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
}

#[test]
fn mixed_precision_computes_in_half_and_keeps_f32_master_weights() {
    let x = Input::new([6]);
    let h = BatchNorm::new().call(&x).unwrap();
    let h = Dense::new(8)
        .activation(ActivationFn::Relu)
        .call(&h)
        .unwrap();
    let y = Dense::new(3).call(&h).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap();
    model.set_compute_dtype(Some(DType::BF16));
    let inputs = Tensor::randn(0f32, 1.0, (16, 6), &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(
        (0..16u32).map(|i| i % 3).collect::<Vec<_>>(),
        16,
        &Device::Cpu,
    )
    .unwrap();
    let out = model
        .forward(&[inputs.clone()], Mode::Eval)
        .unwrap()
        .remove(0);
    assert_eq!(out.dtype(), DType::BF16);

    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut trainer = Trainer::new(
        model.clone(),
        AdamConfig {
            learning_rate: 1e-2,
            ..Default::default()
        },
        loss,
    )
    .unwrap();
    let batch = Batch::new(vec![inputs], vec![labels]);
    let first = trainer
        .train_step(&batch, 1e-2)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    for _ in 0..30 {
        trainer.train_step(&batch, 1e-2).unwrap();
    }
    let last = trainer
        .train_step(&batch, 1e-2)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(last < first * 0.8, "loss {first} -> {last}");
    // Weights and BatchNorm state stay f32.
    for w in model.weights().unwrap() {
        assert_eq!(w.var().dtype(), DType::F32, "{}", w.name());
    }
}

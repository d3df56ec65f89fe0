//! Callbacks that steer `fit`: Keras's hooks in Keras's order, the learning rate and stopping
//! changed from a hook, `ReduceLrOnPlateau` and `EarlyStopping(restore_best_weights)` against
//! Keras (`tests/fixtures/keras_callbacks.json`, written by `scripts/keras_reference.py
//! callbacks`, Keras 3.15.1), and runs resumed from a checkpoint that continue their
//! callbacks' counters exactly.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_functional::Result;
use candle_functional::data::TensorDataset;
use candle_functional::prelude::*;
use candle_functional::train::{
    Callback, EarlyStopping, Goal, LambdaCallback, LearningRateScheduler, Loss, Metric,
    ModelCheckpoint, ReduceLrOnPlateau, SgdConfig, Trainer,
};
use serde_json::Value;

fn model() -> Model {
    let x = Input::new([3]);
    let y = Dense::new(2).call(&x).unwrap();
    Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 3)
        .unwrap()
}

/// Six samples of three features, two classes, in batches of `batch`.
fn data(batch: usize) -> TensorDataset {
    let x: Vec<f32> = (0..18).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
    let x = Tensor::from_vec(x, (6, 3), &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 1, 0, 1, 0], &Device::Cpu).unwrap();
    TensorDataset::new(vec![x], vec![y], batch).unwrap()
}

fn trainer(learning_rate: f64) -> Trainer {
    let sgd = SgdConfig {
        learning_rate,
        ..Default::default()
    };
    Trainer::new(
        model(),
        sgd,
        Loss::SparseCategoricalCrossentropy { from_logits: true },
    )
    .unwrap()
}

fn weights(trainer: &Trainer) -> HashMap<String, Vec<f32>> {
    trainer
        .model()
        .weight_map()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// A metric that reports a scripted value each epoch (the n-th reset starts epoch n), so a
/// callback sees the monitored values Keras was fed.
#[derive(Clone)]
struct Scripted {
    values: Arc<Vec<f64>>,
    epoch: Arc<Mutex<usize>>,
}

impl Metric for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn update(&mut self, _outputs: &Tensor, _targets: &Tensor) -> Result<()> {
        Ok(())
    }
    fn result(&self) -> Result<f64> {
        let epoch = self.epoch.lock().unwrap().saturating_sub(1);
        Ok(self.values[epoch.min(self.values.len() - 1)])
    }
    fn reset(&mut self) {
        *self.epoch.lock().unwrap() += 1;
    }
    fn boxed_clone(&self) -> Box<dyn Metric> {
        Box::new(self.clone())
    }
}

fn scripted_trainer(values: &[f64]) -> Trainer {
    let metric = Scripted {
        values: Arc::new(values.to_vec()),
        epoch: Arc::new(Mutex::new(0)),
    };
    trainer(0.1).metrics(0, vec![Box::new(metric)]).unwrap()
}

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keras_callbacks.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn goal(monitor: &str) -> Goal {
    if monitor.contains("acc") {
        Goal::Maximize
    } else {
        Goal::Minimize
    }
}

fn setting(case: &Value, name: &str) -> Option<f64> {
    case["settings"][name].as_f64()
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn reduce_lr_on_plateau_in_fit_follows_keras() {
    let fixture = fixture();
    for case in fixture["reduce_lr_on_plateau"].as_array().unwrap() {
        let values = numbers(&case["values"]);
        let want = numbers(&case["rates"]);
        let mut trainer = scripted_trainer(&values);
        let plateau = ReduceLrOnPlateau::new("scripted")
            .goal(goal(case["monitor"].as_str().unwrap()))
            .factor(setting(case, "factor").unwrap_or(0.1))
            .patience(setting(case, "patience").unwrap_or(10.0) as usize)
            .min_delta(setting(case, "min_delta").unwrap_or(1e-4))
            .cooldown(setting(case, "cooldown").unwrap_or(0.0) as usize)
            .min_lr(setting(case, "min_lr").unwrap_or(0.0));
        let mut callbacks: Vec<Box<dyn Callback>> = vec![Box::new(plateau)];
        let history = trainer
            .fit(&data(6), None, values.len(), &mut callbacks)
            .unwrap()
            .clone();
        // The rate set at the end of epoch k is the one epoch k + 1 trains with.
        let used: Vec<f64> = history.epochs().iter().map(|e| e.learning_rate).collect();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.max(1e-12);
        for (k, (&got, &keras)) in used[1..].iter().zip(&want).enumerate() {
            assert!(
                close(got, keras),
                "{case}: epoch {}: {got} vs {keras}",
                k + 2
            );
        }
        assert!(close(trainer.learning_rate(), *want.last().unwrap()));
    }
}

#[test]
fn early_stopping_stops_and_restores_where_keras_does() {
    let fixture = fixture();
    for case in fixture["early_stopping"].as_array().unwrap() {
        let values = numbers(&case["values"]);
        let mut trainer = scripted_trainer(&values);
        let mut stopping =
            EarlyStopping::new("scripted", setting(case, "patience").unwrap() as usize)
                .goal(goal(case["monitor"].as_str().unwrap()))
                .min_delta(setting(case, "min_delta").unwrap_or(0.0))
                .start_from_epoch(setting(case, "start_from_epoch").unwrap_or(0.0) as usize)
                .restore_best_weights(true);
        if let Some(b) = setting(case, "baseline") {
            stopping = stopping.baseline(b);
        }
        // The weights at the end of every epoch, to see which one comes back.
        let snapshots = Rc::new(RefCell::new(Vec::new()));
        let sink = snapshots.clone();
        let record = LambdaCallback::new().epoch_end(move |ctx| {
            sink.borrow_mut().push(weights(ctx.trainer()));
            Ok(())
        });
        let mut callbacks: Vec<Box<dyn Callback>> = vec![Box::new(record), Box::new(stopping)];
        trainer
            .fit(&data(3), None, values.len(), &mut callbacks)
            .unwrap();
        let epochs = trainer.history().epochs().len();
        let stopped = case["stopped_epoch"].as_u64().map(|e| e as usize);
        assert_eq!(epochs, stopped.map_or(values.len(), |e| e + 1), "{case}");
        let restored = case["restored_epoch"].as_f64().unwrap() as usize;
        let snapshots = snapshots.borrow();
        assert_eq!(weights(&trainer), snapshots[restored], "{case}");
        if restored + 1 != epochs {
            assert_ne!(weights(&trainer), snapshots[epochs - 1], "{case}");
        }
    }
}

#[test]
fn hooks_run_in_keras_order_and_a_batch_hook_can_stop_mid_epoch() {
    let events = Rc::new(RefCell::new(Vec::<String>::new()));
    let (a, b, c, d, e, f) = (
        events.clone(),
        events.clone(),
        events.clone(),
        events.clone(),
        events.clone(),
        events.clone(),
    );
    let hooks = LambdaCallback::new()
        .train_begin(move |ctx| {
            a.borrow_mut().push(format!("train_begin {}", ctx.epoch()));
            Ok(())
        })
        .epoch_begin(move |ctx| {
            b.borrow_mut().push(format!("epoch_begin {}", ctx.epoch()));
            Ok(())
        })
        .batch_begin(move |ctx| {
            assert!(ctx.batch_loss()?.is_none() && ctx.log().is_none());
            c.borrow_mut()
                .push(format!("batch_begin {:?}", ctx.batch()));
            Ok(())
        })
        .batch_end(move |ctx| {
            let loss = ctx.batch_loss()?.expect("a batch's loss at its end");
            assert!(loss.is_finite() && loss > 0.0);
            d.borrow_mut().push(format!("batch_end {:?}", ctx.batch()));
            if ctx.epoch() == 2 && ctx.batch() == Some(0) {
                ctx.stop_training();
            }
            Ok(())
        })
        .epoch_end(move |ctx| {
            assert!(ctx.metric("loss").is_some() && ctx.batch().is_none());
            e.borrow_mut().push(format!("epoch_end {}", ctx.epoch()));
            Ok(())
        })
        .train_end(move |ctx| {
            f.borrow_mut().push(format!("train_end {}", ctx.epoch()));
            Ok(())
        });
    let mut trainer = trainer(0.1);
    let mut callbacks: Vec<Box<dyn Callback>> = vec![Box::new(hooks)];
    trainer.fit(&data(3), None, 5, &mut callbacks).unwrap();
    let want = [
        "train_begin 1",
        "epoch_begin 1",
        "batch_begin Some(0)",
        "batch_end Some(0)",
        "batch_begin Some(1)",
        "batch_end Some(1)",
        "epoch_end 1",
        "epoch_begin 2",
        "batch_begin Some(0)",
        "batch_end Some(0)",
        "epoch_end 2",
        "train_end 2",
    ];
    assert_eq!(*events.borrow(), want);
    // The stopped epoch is ended and logged over the one batch it ran, as in Keras.
    assert_eq!(trainer.history().epochs().len(), 2);
    assert_eq!(trainer.epochs_done(), 2);
}

#[test]
fn hooks_set_the_learning_rate_of_the_next_steps() {
    // A rate of 0 from the first batch on: SGD moves nothing.
    let mut frozen = trainer(0.1);
    let before = weights(&frozen);
    let zero = LambdaCallback::new().batch_begin(|ctx| ctx.set_learning_rate(0.0));
    let mut callbacks: Vec<Box<dyn Callback>> = vec![Box::new(zero)];
    frozen.fit(&data(3), None, 2, &mut callbacks).unwrap();
    assert_eq!(weights(&frozen), before);
    // LearningRateScheduler: the closure's rate, epoch by epoch, from the optimizer's.
    let mut scheduled = trainer(0.1);
    let halve_after_one =
        LearningRateScheduler::new(|epoch, lr| if epoch == 0 { lr } else { lr / 2.0 });
    let mut callbacks: Vec<Box<dyn Callback>> = vec![Box::new(halve_after_one)];
    scheduled.fit(&data(3), None, 4, &mut callbacks).unwrap();
    let rates: Vec<f64> = scheduled
        .history()
        .epochs()
        .iter()
        .map(|e| e.learning_rate)
        .collect();
    assert_eq!(rates, [0.1, 0.05, 0.025, 0.0125]);
    // A NaN rate is refused before the epoch's first step, naming the scheduler.
    let mut broken = trainer(0.1);
    let before = weights(&broken);
    let nan = LearningRateScheduler::new(|_, _| f64::NAN);
    let mut callbacks: Vec<Box<dyn Callback>> = vec![Box::new(nan)];
    let err = broken.fit(&data(3), None, 2, &mut callbacks).unwrap_err();
    assert!(err.to_string().contains("LearningRateScheduler"), "{err}");
    assert_eq!(weights(&broken), before);
    assert_eq!(broken.learning_rate(), 0.1);
}

#[test]
fn a_bad_plateau_factor_is_refused_before_the_first_step() {
    let mut trainer = trainer(0.1);
    let before = weights(&trainer);
    let mut callbacks: Vec<Box<dyn Callback>> =
        vec![Box::new(ReduceLrOnPlateau::new("loss").factor(1.5))];
    let err = trainer.fit(&data(3), None, 2, &mut callbacks).unwrap_err();
    assert!(err.to_string().contains("factor 1.5"), "{err}");
    assert_eq!(weights(&trainer), before);
    assert_eq!(trainer.epochs_done(), 0);
}

#[test]
fn a_misspelt_monitor_names_what_the_logs_hold() {
    let mut trainer = trainer(0.1);
    let mut callbacks: Vec<Box<dyn Callback>> = vec![Box::new(EarlyStopping::new("val_los", 2))];
    let err = trainer
        .fit(&data(3), None, 2, &mut callbacks)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`val_los`") && err.contains("accuracy"),
        "{err}"
    );
}

/// The callbacks of the resume test: a plateau and an early stop that never see an
/// improvement after the first epoch (min_delta 10), so their counters decide everything.
fn steering(dir: &std::path::Path) -> Vec<Box<dyn Callback>> {
    vec![
        // Checkpoints first in the list: they still hold the others' state of the epoch.
        Box::new(ModelCheckpoint::new(dir).monitor("loss")),
        Box::new(
            ReduceLrOnPlateau::new("loss")
                .patience(2)
                .factor(0.5)
                .min_delta(10.0),
        ),
        Box::new(
            EarlyStopping::new("loss", 6)
                .min_delta(10.0)
                .restore_best_weights(true),
        ),
    ]
}

/// An epoch's number, loss, rate and metrics (not its timings).
type EpochRecord = (usize, f64, f64, Vec<(String, f64)>);

fn record(trainer: &Trainer) -> Vec<EpochRecord> {
    trainer
        .history()
        .epochs()
        .iter()
        .map(|e| {
            let metrics = e.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect();
            (e.epoch, e.loss, e.learning_rate, metrics)
        })
        .collect()
}

#[test]
fn a_resumed_run_continues_its_callbacks_exactly() {
    let whole_dir = tempfile::tempdir().unwrap();
    let mut whole = trainer(0.1);
    whole
        .fit(&data(3), None, 10, &mut steering(whole_dir.path()))
        .unwrap();
    // The uninterrupted run: rates halved at epochs 3, 5 and 7 (patience 2), stopped at
    // epoch 7 (6 epochs without improvement), weights of epoch 1 restored.
    let rates: Vec<f64> = whole
        .history()
        .epochs()
        .iter()
        .map(|e| e.learning_rate)
        .collect();
    assert_eq!(rates, [0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025]);
    assert_eq!(whole.learning_rate(), 0.0125);

    // The same run stopped after epoch 4 (plateau counter at 1, early-stop counter at 3)
    // and resumed in a new trainer with new callbacks from `last.ckpt`.
    let dir = tempfile::tempdir().unwrap();
    let mut first = trainer(0.1);
    first
        .fit(&data(3), None, 4, &mut steering(dir.path()))
        .unwrap();
    let mut resumed = trainer(0.1);
    resumed
        .load_checkpoint(ModelCheckpoint::new(dir.path()).last_path())
        .unwrap();
    assert_eq!(resumed.learning_rate(), 0.05);
    resumed
        .fit(&data(3), None, 10, &mut steering(dir.path()))
        .unwrap();
    assert_eq!(record(&resumed), record(&whole));
    assert_eq!(resumed.learning_rate(), whole.learning_rate());
    assert_eq!(weights(&resumed), weights(&whole));
}

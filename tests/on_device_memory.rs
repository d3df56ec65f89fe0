//! Memory over many training steps, and what a step costs a GPU, measured on the CPU with the
//! crate's counting allocator: nothing kept from one step to the next may hold on to a step's
//! autograd graph (a flag, a running sum, a metric, an optimizer slot), and the GPU's default
//! divergence check ([`NanCheck::OnDevice`]) may not read anything back inside a step.
//!
//! `cargo test on_device` runs them. Each test takes the lock: the counters are process-wide,
//! and the test harness runs tests on several threads.

mod common;

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use candle_functional::data::{Batch, Dataset, TensorDataset};
use candle_functional::prelude::*;
use candle_functional::profile::{AllocationCounts, CountingAllocator, host_reads};
use candle_functional::train::{
    AdamConfig, BackwardPass, Loss, Losses, MeanIoU, NanCheck, OutputLoss, SgdConfig, Trainer,
};

#[global_allocator]
static ALLOCATOR: CountingAllocator<std::alloc::System> =
    CountingAllocator::new(std::alloc::System);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const CPU: Device = Device::Cpu;

/// Two inputs, two outputs (a class and a value), a residual block with BatchNorm: every
/// kind of state a training step carries (moving statistics, Adam's slots, the flag, sums).
fn model() -> Model {
    let image = Input::new([3, 8, 8]);
    let extra = Input::new([2]);
    let x = Conv2D::new(4, 3)
        .padding(Padding::Same)
        .call(&image)
        .unwrap();
    let y = BatchNorm::new()
        .call(&ReLU::new().call(&x).unwrap())
        .unwrap();
    let y = Conv2D::new(4, 3).padding(Padding::Same).call(&y).unwrap();
    let x = Add::new().call_many(&[x, y]).unwrap();
    let x = BatchNorm::new()
        .call(&ReLU::new().call(&x).unwrap())
        .unwrap();
    let x = GlobalAveragePooling2D::new().call(&x).unwrap();
    let x = Concatenate::new(1).call_many(&[x, extra.clone()]).unwrap();
    let class = Dense::new(3).name("class").call(&x).unwrap();
    let value = Dense::new(1).name("value").call(&x).unwrap();
    Model::new(&[image, extra], &[class, value])
        .unwrap()
        .build(&CPU, DType::F32, 0)
        .unwrap()
}

fn batch(seed: u64) -> Batch {
    let n = 4;
    let images = Tensor::randn(0f32, 1.0, (n, 3, 8, 8), &CPU).unwrap();
    let extra = Tensor::randn(0f32, 1.0, (n, 2), &CPU).unwrap();
    let labels: Vec<u32> = (0..n as u32).map(|i| (i + seed as u32) % 3).collect();
    Batch::new(
        vec![images, extra],
        vec![
            Tensor::from_vec(labels, n, &CPU).unwrap(),
            Tensor::ones((n, 1), DType::F32, &CPU).unwrap(),
        ],
    )
}

fn trainer(optimizer: impl Into<candle_functional::train::OptimizerConfig>) -> Trainer {
    let losses = candle_functional::train::Losses::per_output(vec![
        Loss::SparseCategoricalCrossentropy { from_logits: true },
        Loss::MeanSquaredError,
    ]);
    Trainer::new(model(), optimizer, losses)
        .unwrap()
        .metrics(0, vec![Box::new(MeanIoU::new(3))])
        .unwrap()
        .nan_check(NanCheck::OnDevice)
}

/// The tensor buffers and bytes still held after `steps` steps of `train_step`, measured after
/// step `from` and after the last.
fn held_after(
    trainer: &mut Trainer,
    from: usize,
    steps: usize,
) -> (AllocationCounts, AllocationCounts) {
    let batches: Vec<Batch> = (0..3).map(batch).collect();
    let mut at_from = AllocationCounts::default();
    for i in 0..steps {
        trainer.train_step(&batches[i % 3], 1e-3).unwrap();
        if i + 1 == from {
            at_from = AllocationCounts::now();
        }
    }
    (at_from, AllocationCounts::now())
}

#[test]
fn on_device_nan_check_keeps_memory_flat_over_train_steps() {
    let _serial = serial();
    let cases = [
        (
            candle_functional::train::OptimizerConfig::from(AdamConfig::default()),
            BackwardPass::Auto,
        ),
        (SgdConfig::momentum(0.01, 0.9).into(), BackwardPass::Auto),
        // The GPU's composition of the plan's own backward pass, and candle's autograd.
        (AdamConfig::default().into(), BackwardPass::PlanComposed),
        (AdamConfig::default().into(), BackwardPass::Autograd),
    ];
    for (optimizer, pass) in cases {
        let mut t = trainer(optimizer.clone()).backward_pass(pass);
        let (early, late) = held_after(&mut t, 20, 300);
        let change = late.since(&early);
        // A leak of one step's graph holds its activations: dozens of buffers and tens of KB
        // a step, thousands over 280 steps. Flat means flat.
        assert!(
            change.live_tensor_buffers() <= 0,
            "{optimizer:?}, {pass:?}: {} tensor buffers more held after 300 steps than after 20",
            change.live_tensor_buffers()
        );
        assert!(
            change.live_bytes_change() < 16 * 1024,
            "{optimizer:?}, {pass:?}: {} bytes more held after 300 steps than after 20",
            change.live_bytes_change()
        );
        t.check_divergence().unwrap();
    }
}

#[test]
fn on_device_weighted_and_custom_losses_keep_memory_flat() {
    let _serial = serial();
    // A class weight, sample weights on both outputs, and a user's loss (the built-in MSE
    // behind the LossFunction trait): nothing of it may keep a step's graph.
    let losses = Losses::per_output(vec![
        OutputLoss::from(Loss::SparseCategoricalCrossentropy { from_logits: true }),
        OutputLoss::custom(Loss::MeanSquaredError),
    ]);
    let mut t = Trainer::new(model(), AdamConfig::default(), losses)
        .unwrap()
        .nan_check(NanCheck::OnDevice)
        .output_class_weight(0, [(1, 3.0)])
        .unwrap();
    let batches: Vec<Batch> = (0..3)
        .map(|k| {
            let w = Tensor::new(&[1f32, 2.0, 0.5, 1.0], &CPU).unwrap();
            batch(k).with_sample_weights(vec![w.clone(), w])
        })
        .collect();
    let mut early = AllocationCounts::default();
    for i in 0..300 {
        t.train_step(&batches[i % 3], 1e-3).unwrap();
        if i + 1 == 20 {
            early = AllocationCounts::now();
        }
    }
    let change = AllocationCounts::now().since(&early);
    assert!(
        change.live_tensor_buffers() <= 0,
        "{} tensor buffers more held after 300 steps than after 20",
        change.live_tensor_buffers()
    );
    assert!(
        change.live_bytes_change() < 16 * 1024,
        "{} bytes",
        change.live_bytes_change()
    );
    t.check_divergence().unwrap();
}

/// `n` random samples for [`model`], in batches of 4.
fn random_data(n: usize) -> TensorDataset {
    TensorDataset::new(
        vec![
            Tensor::randn(0f32, 1.0, (n, 3, 8, 8), &CPU).unwrap(),
            Tensor::randn(0f32, 1.0, (n, 2), &CPU).unwrap(),
        ],
        vec![
            Tensor::from_vec((0..n as u32).map(|i| i % 3).collect(), n, &CPU).unwrap(),
            Tensor::ones((n, 1), DType::F32, &CPU).unwrap(),
        ],
        4,
    )
    .unwrap()
}

#[test]
fn on_device_nan_check_keeps_peak_memory_flat_in_fit() {
    let _serial = serial();
    let peak_of = |batches: usize| -> u64 {
        let n = batches * 4;
        let data = random_data(n);
        assert_eq!(data.len(), batches);
        let mut t = trainer(AdamConfig::default());
        AllocationCounts::reset_peak();
        let base = AllocationCounts::now().live_bytes();
        t.fit(&data, None, 2, &mut []).unwrap();
        let peak = AllocationCounts::now().peak_live_bytes() - base;
        eprintln!("{batches} batches: peak {peak} bytes above the start");
        peak
    };
    // A first run takes the process's one-time allocations (thread pools, kernel buffers).
    peak_of(2);
    let (short, long) = (peak_of(10), peak_of(200));
    // The data set is held before the peak is reset; what training adds above it (the
    // slots, the flag, one step's activations) must not grow with the number of steps.
    assert!(
        long < short + short / 2 + 64 * 1024,
        "an epoch of 200 steps peaks {long} bytes above its start, one of 10 steps {short}"
    );
}

#[test]
fn on_device_train_step_reads_nothing_back() {
    let _serial = serial();
    let batches: Vec<Batch> = (0..3).map(batch).collect();
    for pass in [
        BackwardPass::Auto,
        BackwardPass::PlanComposed,
        BackwardPass::Autograd,
    ] {
        let mut t = trainer(AdamConfig::default()).backward_pass(pass);
        t.train_step(&batches[0], 1e-3).unwrap();
        let before = host_reads();
        for b in &batches {
            t.train_step(b, 1e-3).unwrap();
        }
        assert_eq!(
            host_reads() - before,
            0,
            "{pass:?}: a step read a value back to the host"
        );
    }
    // The default check reads its verdict at every step.
    let mut every = trainer(AdamConfig::default()).nan_check(NanCheck::EveryStep);
    let before = host_reads();
    every.train_step(&batches[0], 1e-3).unwrap();
    assert!(host_reads() - before >= 1);
}

/// The tensor buffers one training step of `t` makes (each a device allocation and a kernel
/// launch on CUDA), after two steps that create the optimizer's slots.
fn buffers_per_step(mut t: Trainer, batches: &[Batch]) -> u64 {
    t.train_step(&batches[0], 1e-3).unwrap();
    t.train_step(&batches[1], 1e-3).unwrap();
    let before = AllocationCounts::now();
    t.train_step(&batches[2], 1e-3).unwrap();
    AllocationCounts::now().since(&before).tensor_buffers()
}

/// The plan's own backward pass composed as on CUDA (`BackwardPass::PlanComposed`) makes far
/// fewer tensors a step than candle's autograd over the whole step, on a small ResNet of the
/// article's blocks (`bench --counts` gives the full network's figures) and on the two-input,
/// two-output model; on the CPU the fused kernels make fewer still.
#[test]
fn on_device_the_plans_own_backward_pass_makes_fewer_tensors_than_autograd() {
    let _serial = serial();
    let config = ResNetConfig {
        input_shape: [3, 16, 16],
        stages: vec![1, 1],
        filters: vec![4, 8],
        pool_size: 4,
        num_classes: 3,
        ..Default::default()
    };
    let resnet = config
        .res_net()
        .unwrap()
        .build(&CPU, DType::F32, 0)
        .unwrap();
    let images: Vec<Batch> = (0..3)
        .map(|seed| {
            let x = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &CPU).unwrap();
            let labels: Vec<u32> = (0..4).map(|i| (i + seed) % 3).collect();
            Batch::new(vec![x], vec![Tensor::from_vec(labels, 4, &CPU).unwrap()])
        })
        .collect();
    let resnet_step = |pass| {
        let loss = Loss::SparseCategoricalCrossentropy { from_logits: false };
        let t = Trainer::new(resnet.clone(), AdamConfig::default(), loss)
            .unwrap()
            .nan_check(NanCheck::OnDevice)
            .backward_pass(pass);
        buffers_per_step(t, &images)
    };
    let autograd = resnet_step(BackwardPass::Autograd);
    let composed = resnet_step(BackwardPass::PlanComposed);
    let fused = resnet_step(BackwardPass::Plan);
    assert!(
        composed * 4 <= autograd * 3,
        "ResNet: composed {composed} against autograd's {autograd} tensor buffers a step"
    );
    assert!(
        fused <= composed,
        "ResNet: fused {fused}, composed {composed}"
    );
    let batches: Vec<Batch> = (0..3).map(batch).collect();
    let two_inputs = |pass| {
        let t = trainer(AdamConfig::default()).backward_pass(pass);
        buffers_per_step(t, &batches)
    };
    let autograd = two_inputs(BackwardPass::Autograd);
    let composed = two_inputs(BackwardPass::PlanComposed);
    assert!(
        composed < autograd,
        "two inputs: composed {composed} against autograd's {autograd} tensor buffers a step"
    );
}

#[test]
fn on_device_labels_out_of_range_are_refused_without_a_read() {
    let _serial = serial();
    let mut t = trainer(AdamConfig::default());
    let mut bad = batch(0);
    bad.targets[0] = Tensor::new(&[0u32, 1, 7, 2], &CPU).unwrap();
    // Copies: `weight_map` shares its tensors' storage with the weights.
    let snapshot = |t: &Trainer| -> Vec<(String, Tensor)> {
        let map = t.model().weight_map().unwrap();
        map.iter()
            .map(|(n, w)| (n.clone(), w.copy().unwrap()))
            .collect()
    };
    let before = snapshot(&t);
    let reads = host_reads();
    // Clamped for the loss: the step runs, applies nothing, and fails at the next check.
    t.train_step(&bad, 1e-3).unwrap();
    assert_eq!(host_reads(), reads);
    let after = t.model().weight_map().unwrap();
    for (name, w) in &before {
        let diff = common::max_abs_diff(w, &after[name]);
        assert_eq!(diff, 0.0, "{name} changed in a step with bad labels");
    }
    // The same batch with good labels does move them (so the comparison can fail).
    let mut fresh = trainer(AdamConfig::default());
    let start = snapshot(&fresh);
    fresh.train_step(&batch(0), 1e-3).unwrap();
    let moved = fresh.model().weight_map().unwrap();
    assert!(
        start
            .iter()
            .any(|(n, w)| common::max_abs_diff(w, &moved[n]) > 0.0)
    );
    let err = t.check_divergence().unwrap_err().to_string();
    assert!(
        err.contains("labels out of range") && err.contains("step 1"),
        "{err}"
    );
    // A later good step changes nothing either: the flag stays down.
    t.train_step(&batch(1), 1e-3).unwrap();
    assert!(t.check_divergence().is_err());
}

#[test]
fn on_device_counting_allocator_counts_tensor_buffers() {
    let _serial = serial();
    let a = Tensor::randn(0f32, 1.0, (4, 8), &CPU).unwrap();
    let w = Var::randn(0f32, 1.0, (4, 8), &CPU).unwrap();
    let count = |f: &dyn Fn() -> Tensor| {
        let before = AllocationCounts::now();
        let t = f();
        let made = AllocationCounts::now().since(&before).tensor_buffers();
        drop(t);
        made
    };
    // One result, one buffer; views none; tracked ops (which allocate their graph node too)
    // still one.
    assert_eq!(count(&|| (&a + &a).unwrap()), 1);
    assert_eq!(count(&|| a.reshape((8, 4)).unwrap()), 0);
    assert_eq!(count(&|| a.narrow(0, 1, 2).unwrap()), 0);
    assert_eq!(count(&|| (w.as_tensor() * &a).unwrap()), 1);
    assert_eq!(count(&|| a.t().unwrap().contiguous().unwrap()), 1);
    assert_eq!(count(&|| a.exp().unwrap().sum_all().unwrap()), 2);
    let before = AllocationCounts::now();
    w.set(&a).unwrap();
    assert_eq!(AllocationCounts::now().since(&before).tensor_buffers(), 0);
}

#[test]
fn on_device_steering_callbacks_keep_memory_flat() {
    use std::sync::Arc;

    use candle_functional::train::{Callback, EarlyStopping, LambdaCallback, ReduceLrOnPlateau};
    let _serial = serial();
    let n = 12;
    let data = random_data(n);
    // Live tensor buffers at the end of epoch 5 and of epoch 60: the best-weights snapshot,
    // the plateau's state and every batch's loss read must not pile up.
    let counts = Arc::new(Mutex::new(Vec::new()));
    let sink = counts.clone();
    let measure = LambdaCallback::new()
        .batch_end(|ctx| ctx.batch_loss().map(|_| ()))
        .epoch_end(move |ctx| {
            if ctx.epoch() == 5 || ctx.epoch() == 60 {
                sink.lock().unwrap().push(AllocationCounts::now());
            }
            Ok(())
        });
    let mut callbacks: Vec<Box<dyn Callback>> = vec![
        Box::new(EarlyStopping::new("loss", 1000).restore_best_weights(true)),
        Box::new(ReduceLrOnPlateau::new("loss").patience(2).min_delta(0.5)),
        Box::new(measure),
    ];
    let mut t = trainer(AdamConfig::default());
    t.fit(&data, None, 60, &mut callbacks).unwrap();
    let counts = counts.lock().unwrap();
    let change = counts[1].since(&counts[0]);
    assert!(
        change.live_tensor_buffers() <= 0,
        "{} tensor buffers more held after 60 epochs than after 5",
        change.live_tensor_buffers()
    );
    // The history's 55 new epochs are host bytes; tensors are what a leak would add.
    assert!(
        change.live_bytes_change() < 64 * 1024,
        "{} bytes",
        change.live_bytes_change()
    );
    assert!(t.learning_rate() < 1e-3, "the plateau lowered the rate");
}

#[test]
fn on_device_data_parallel_steps_keep_memory_flat() {
    let _serial = serial();
    // The data-parallel step (one rank: shards, scaled loss, gradient buckets, gathered
    // outputs, rank 0's BatchNorm statistics, the communication clock) keeps nothing of a
    // step either.
    let comm = std::sync::Arc::new(candle_functional::distributed::SingleProcess);
    let mut t = trainer(AdamConfig::default()).distributed(comm);
    let (early, late) = held_after(&mut t, 20, 300);
    let change = late.since(&early);
    assert!(
        change.live_tensor_buffers() <= 0,
        "{} tensor buffers more held after 300 data-parallel steps than after 20",
        change.live_tensor_buffers()
    );
    assert!(
        change.live_bytes_change() < 16 * 1024,
        "{} bytes more held after 300 data-parallel steps than after 20",
        change.live_bytes_change()
    );
    // The clock of collective calls ran (on one rank they are no-ops, but timed).
    assert!(t.communication_seconds() > 0.0);
}

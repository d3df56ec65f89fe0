//! Every GPU check in one run, printing one JSON object:
//!
//! 1. **correctness**: a small residual network built with the same seed on the CPU and on the
//!    requested device, run in training mode on the same batch; outputs, the gradients of
//!    every weight and the updated BatchNorm statistics are compared; the same for a small
//!    U-Net of the decoder and MobileNet layers (depthwise, separable, transposed
//!    convolution, layer norm, bilinear upsampling); and the multi-tensor optimizer kernels
//!    (one launch for all weights) against the CPU's fused updates; and one SGD step of the
//!    small network and of a small U-Net through the plan's own backward pass
//!    (`BackwardPass::Plan`: cuDNN's gradient kernels composed) against candle's autograd on
//!    the device;
//! 2. **throughput**: training steps of the article's ResNet at batch 128 in f32 (TF32 matrix
//!    products) through candle's autograd (the device's default) and through the plan's own
//!    backward pass, and in bf16 mixed precision (f32 master weights), median of timed steps;
//! 3. **epoch time**: one epoch over 50,000 synthetic CIFAR-shaped images through
//!    `Trainer::fit` with the data loader (one host-to-device copy per batch); its start and
//!    end times (Unix seconds) are printed, so that `scripts/gpu-check.sh` can check the
//!    device memory it samples meanwhile for growth;
//! 4. **counts**: what one training step of the ResNet launches on this device, through each
//!    backward pass (`common/step_counts.rs`: tensor buffers, allocations, host reads).
//!
//! ```text
//! cargo run --release --features cudnn --example gpu_check -- --device cuda
//! cargo run --release --example gpu_check -- --device cpu --steps 2 --epoch-images 512   # dry run
//! ```
//! `scripts/gpu-check.sh` runs it on the GPU machine next to the PyTorch reference.

#[path = "common/allocator.rs"]
mod allocator;
#[path = "common/step_counts.rs"]
mod step_counts;
#[path = "common/unet.rs"]
mod unet;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_functional::data::{Batch, DataLoader, ImageDataset};
use candle_functional::models::ResNetConfig;
use candle_functional::ops::{AdamStep, SgdStep};
use candle_functional::prelude::*;
use candle_functional::select_device;
use candle_functional::train::{AdamConfig, BackwardPass, Loss, SgdConfig, Trainer};
use clap::Parser;

/// GPU correctness and speed checks.
#[derive(Parser, Debug)]
struct Args {
    /// Device to check against the CPU.
    #[arg(long, default_value = "cuda")]
    device: String,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Timed training steps per precision.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Images in the timed epoch (0 skips it).
    #[arg(long, default_value_t = 50_000)]
    epoch_images: usize,
    /// Blocks per stage of the timed network (the article's by default).
    #[arg(long, default_value = "2,5,5,2", value_delimiter = ',')]
    stages: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    width_divisor: usize,
    /// Also time one 3×3 convolution (64 → 64 channels at 32×32, forward + backward) through
    /// `ops::conv2d` (cuDNN forward and backward) and through candle's own convolution
    /// (`ops::reference::conv2d`: cuDNN forward, candle's backward).
    #[arg(long)]
    compare_candle_conv: bool,
    /// Only the correctness check (run it with NVIDIA_TF32_OVERRIDE=0 for full-f32 products).
    #[arg(long)]
    correctness_only: bool,
    /// Only time single layers (forward + backward) at the first stage's shape, and the
    /// phases of a training step, to see where the time goes.
    #[arg(long)]
    profile: bool,
    /// Only the NCCL check at world size 1 (a `--features nccl` build): one all-reduce of the
    /// article's ResNet's 15.6 M gradient values on the device, and three training steps
    /// through `Trainer::distributed(Nccl)` against none.
    #[arg(long)]
    nccl: bool,
}

const PROBS: Loss = Loss::SparseCategoricalCrossentropy { from_logits: false };

fn labels(n: usize, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_vec((0..n as u32).map(|i| i % 10).collect::<Vec<_>>(), n, device)
}

/// Max |a - b| / max(1, max |b|) over a pair of tensors.
/// NaN when any element of either differs from the other by NaN or infinity (a NaN or
/// infinite value on one side only, or NaNs on both).
fn rel_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diffs = (&a - &b)?.abs()?.flatten_all()?;
    // candle's `max` skips NaNs; their sum does not.
    if !diffs.sum_all()?.to_scalar::<f64>()?.is_finite() {
        return Ok(f64::NAN);
    }
    let diff = diffs.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(1.0);
    Ok(diff / scale)
}

/// The larger of two differences, NaN if either is (`f64::max` would drop it).
fn worse(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// The outputs, the gradients of every trainable weight and the state after one training
/// step of `make()` on the CPU and on `device`: (max relative difference of the outputs, of
/// the gradients and state, number of tensors compared).
fn compare_devices(
    device: &Device,
    make: impl Fn() -> Result<Model>,
    x: &Tensor,
    loss: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(f64, f64, usize)> {
    let mut results = Vec::new();
    for dev in [Device::Cpu, device.clone()] {
        let model = make()?.build(&dev, DType::F32, 7)?;
        let out = model.forward(&[x.to_device(&dev)?], Mode::Train)?.remove(0);
        let grads = loss(&out)?.backward()?;
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for w in model.weights()? {
            let tensor = if w.trainable() {
                grads.get(w.var().as_tensor()).cloned().ok_or_else(|| {
                    Error::InvalidArgument(format!("no gradient for {}", w.name()))
                })?
            } else {
                // BatchNorm's moving statistics after the training step.
                w.var().as_tensor().clone()
            };
            named.push((w.name().to_string(), tensor));
        }
        results.push((out, named));
    }
    let out_diff = rel_diff(&results[1].0, &results[0].0)?;
    let mut grad_diff = 0f64;
    for ((_, a), (_, b)) in results[1].1.iter().zip(&results[0].1) {
        grad_diff = worse(grad_diff, rel_diff(a, b)?);
    }
    Ok((out_diff, grad_diff, results[0].1.len()))
}

/// A small residual network of the article's blocks, and a batch for it (on the CPU).
fn small_res_net() -> Result<(ResNetConfig, Tensor, Tensor)> {
    let config = ResNetConfig {
        input_shape: [3, 16, 16],
        stages: vec![1, 1],
        filters: vec![8, 16],
        ..Default::default()
    };
    let x = (Tensor::rand(0f32, 255.0, (8, 3, 16, 16), &Device::Cpu)?).to_dtype(DType::F32)?;
    Ok((config, x, labels(8, &Device::Cpu)?))
}

/// A small residual network: the article's blocks.
fn correctness(device: &Device) -> Result<(f64, f64, usize)> {
    let (config, x, y) = small_res_net()?;
    compare_devices(
        device,
        || config.res_net(),
        &x,
        |out| PROBS.compute(out, &y.to_device(out.device())?),
    )
}

/// A small U-Net of the decoder and MobileNet layers: depthwise, separable, transposed
/// convolution, layer norm, bilinear upsampling, cropping, per-pixel softmax.
fn correctness_decoder_layers(device: &Device) -> Result<(f64, f64, usize)> {
    let make = || -> Result<Model> {
        let same = Padding::Same;
        let x = Input::new([3, 16, 16]);
        let e = DepthwiseConv2D::new(3)
            .padding(same)
            .depth_multiplier(2)
            .call(&x)?;
        let e = SeparableConv2D::new(8, 3)
            .strides(2)
            .padding(same)
            .call(&e)?;
        let e = LayerNormalization::new().call(&e)?;
        let u = Conv2DTranspose::new(4, 3)
            .strides(2)
            .padding(same)
            .call(&e)?;
        let b = UpSampling2D::new(2).bilinear().call(&e)?;
        let b = Conv2D::new(4, 1).call(&b)?;
        let d = Concatenate::new(1).call_many(&[u, b])?;
        let d = Cropping2D::new(1).call(&ZeroPadding2D::new(1).call(&d)?)?;
        let y = Softmax::new().call(&Conv2D::new(3, 1).call(&d)?)?;
        Model::new(&[x], &[y])
    };
    let x = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu)?;
    let mix = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu)?;
    compare_devices(device, make, &x, |out| {
        Ok((out * mix.to_device(out.device())?)?.sum_all()?)
    })
}

/// `[w, g, m, v]` by reference.
fn adam_refs(v: &[[Tensor; 4]]) -> Vec<[&Tensor; 4]> {
    v.iter().map(|[a, b, c, d]| [a, b, c, d]).collect()
}

/// `(w, g, velocity)` by reference, the velocity being the third tensor.
fn sgd_refs(v: &[[Tensor; 4]]) -> Vec<(&Tensor, &Tensor, Option<&Tensor>)> {
    v.iter().map(|t| (&t[0], &t[1], Some(&t[2]))).collect()
}

/// The optimizer steps the kernel checks compare: Adam with weight decay, SGD with Nesterov
/// momentum.
const ADAM: AdamStep = AdamStep {
    alpha: 3e-4,
    beta_1: 0.9,
    beta_2: 0.999,
    epsilon: 1e-7,
    decay: 0.99996,
};
const SGD: SgdStep = SgdStep {
    learning_rate: 0.01,
    momentum: 0.9,
    nesterov: true,
    decay: 0.9999,
};

/// `[w, g, m, v]` on the CPU for three weights of the shapes of a convolution kernel, a bias
/// and a dense kernel, with the magnitudes of a training run.
fn optimizer_operands() -> Result<Vec<[Tensor; 4]>> {
    let shapes: [&[usize]; 3] = [&[64, 3, 3, 3], &[64], &[1000, 10]];
    let make = |shape: &[usize], scale: f64| -> Result<Tensor> {
        Ok((Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * scale)?)
    };
    shapes
        .iter()
        .map(|s| {
            Ok([
                make(s, 1.0)?,
                make(s, 0.1)?,
                make(s, 0.01)?,
                make(s, 0.001)?.abs()?,
            ])
        })
        .collect()
}

/// The multi-tensor optimizer kernels (one launch for all weights on CUDA) against the CPU's
/// fused updates on the same values: Adam with weight decay and a skipped step, SGD with
/// Nesterov momentum. Returns the largest relative difference (0 when bit-identical).
fn correctness_fused_optimizer(device: &Device) -> Result<f64> {
    use candle_functional::ops::{adam_update_many, sgd_update_many};
    let cpu = optimizer_operands()?;
    let on_device: Vec<[Tensor; 4]> = cpu
        .iter()
        .map(|ts| {
            Ok([
                ts[0].to_device(device)?,
                ts[1].to_device(device)?,
                ts[2].to_device(device)?,
                ts[3].to_device(device)?,
            ])
        })
        .collect::<Result<_>>()?;
    let mut worst = 0f64;
    for keep in [1u8, 0] {
        let k_cpu = Tensor::new(keep, &Device::Cpu)?;
        let k_dev = k_cpu.to_device(device)?;
        let a = adam_update_many(&adam_refs(&cpu), ADAM, Some(&k_cpu))?;
        let b = adam_update_many(&adam_refs(&on_device), ADAM, Some(&k_dev))?;
        for (x, y) in a.iter().zip(&b) {
            for (new, old) in [(&y.0, &x.0), (&y.1, &x.1), (&y.2, &x.2)] {
                worst = worse(worst, rel_diff(new, old)?);
            }
        }
    }
    let a = sgd_update_many(&sgd_refs(&cpu), SGD, None)?;
    let b = sgd_update_many(&sgd_refs(&on_device), SGD, None)?;
    for (x, y) in a.iter().zip(&b) {
        worst = worse(worst, rel_diff(&y.0, &x.0)?);
        if let (Some(u), Some(v)) = (&x.1, &y.1) {
            worst = worse(worst, rel_diff(v, u)?);
        }
    }
    Ok(worst)
}

/// The end-of-step kernels that write in place, and whole training steps: the same values on
/// the CPU and on `device`. Returns (in-place Adam and SGD, the finite check and `assign_if`
/// as one largest relative difference (0 when bit-identical, 1 when a verdict differs), the
/// largest relative difference of every weight and statistic after three training steps of
/// a small ResNet, and whether a NaN step was refused on the device).
fn correctness_in_place(device: &Device) -> Result<(f64, f64, bool)> {
    use candle_core::Var;
    use candle_functional::ops::{
        adam_update_in_place, all_finite, assign_if, sgd_update_in_place,
    };
    let values = optimizer_operands()?;
    let mut results: Vec<Vec<Tensor>> = Vec::new();
    for dev in [Device::Cpu, device.clone()] {
        let vars = |k: usize| -> Result<Vec<Var>> {
            values
                .iter()
                .map(|v| Ok(Var::from_tensor(&v[k].to_device(&dev)?)?))
                .collect()
        };
        let (w, m, v, u) = (vars(0)?, vars(2)?, vars(3)?, vars(2)?);
        let g: Vec<Tensor> = values
            .iter()
            .map(|v| v[1].to_device(&dev))
            .collect::<candle_core::Result<_>>()?;
        let items: Vec<_> = (0..w.len()).map(|i| (&w[i], &g[i], &m[i], &v[i])).collect();
        adam_update_in_place(&items, ADAM, None)?;
        // A skipped step changes nothing.
        adam_update_in_place(&items, ADAM, Some(&Tensor::new(0u8, &dev)?))?;
        let sgd_items: Vec<_> = (0..w.len()).map(|i| (&w[i], &g[i], Some(&u[i]))).collect();
        sgd_update_in_place(&sgd_items, SGD, None)?;
        let mut nan = g[2].to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        nan[999][9] = f32::NAN;
        let nan = Tensor::new(nan, &dev)?;
        let verdicts = [
            all_finite(&g.iter().collect::<Vec<_>>())?,
            all_finite(&[&g[0], &nan, &g[1]])?,
        ];
        let stats = Var::zeros(64, DType::F32, &dev)?;
        assign_if(&[(&stats, &g[1])], Some(&Tensor::new(1u8, &dev)?))?;
        let mut out: Vec<Tensor> = Vec::new();
        out.extend(
            w.iter()
                .chain(&m)
                .chain(&v)
                .chain(&u)
                .map(|x| x.as_tensor().clone()),
        );
        out.extend(
            verdicts
                .iter()
                .map(|t| t.to_dtype(DType::F32))
                .collect::<candle_core::Result<Vec<_>>>()?,
        );
        out.push(stats.as_tensor().clone());
        results.push(out);
    }
    let mut kernels = 0f64;
    for (a, b) in results[0].iter().zip(&results[1]) {
        kernels = worse(kernels, rel_diff(b, a)?);
    }
    // Three training steps of a small ResNet, each device with its default divergence check
    // (the CPU reads its verdict, CUDA keeps it on the device), then a NaN batch.
    let (config, x, y) = small_res_net()?;
    let mut weights = Vec::new();
    let mut refused = true;
    for dev in [Device::Cpu, device.clone()] {
        let model = config.res_net()?.build(&dev, DType::F32, 7)?;
        let mut trainer = Trainer::new(model, AdamConfig::default(), PROBS)?;
        let batch = Batch::new(vec![x.to_device(&dev)?], vec![y.to_device(&dev)?]);
        for _ in 0..3 {
            trainer.train_step(&batch, 1e-3)?;
        }
        // Copies: `weight_map` shares its tensors' storage with the weights.
        let before: std::collections::HashMap<String, Tensor> = trainer
            .model()
            .weight_map()?
            .into_iter()
            .map(|(n, w)| Ok((n, w.copy()?)))
            .collect::<Result<_>>()?;
        if !dev.is_cpu() {
            let nan_x = (x.to_device(&dev)? * f64::NAN)?;
            let nan_batch = Batch::new(vec![nan_x], vec![y.to_device(&dev)?]);
            trainer.train_step(&nan_batch, 1e-3)?;
            let after = trainer.model().weight_map()?;
            for (name, w) in &before {
                // A NaN difference (a NaN weight) fails too: `== 0.0` is false for NaN.
                refused &= rel_diff(&after[name], w)? == 0.0;
            }
            refused &= trainer.check_divergence().is_err();
        }
        weights.push(before);
    }
    let mut steps = 0f64;
    for (name, w) in &weights[0] {
        steps = worse(steps, rel_diff(&weights[1][name], w)?);
    }
    Ok((kernels, steps, refused))
}

/// One SGD step at rate 1 (the weights move by minus their gradients) on `device` of a small
/// ResNet and of the segmentation example's U-Net (max pooling, nearest upsampling,
/// concatenated skips), each from the same weights through candle's autograd and through the
/// plan's own backward pass (on CUDA `BackwardPass::Plan`, cuDNN's gradient kernels composed;
/// on the CPU the same composition, `BackwardPass::PlanComposed`): the largest relative
/// difference of the weights' moves and moving statistics, and of the losses, over both.
fn correctness_plan(device: &Device) -> Result<(f64, f64)> {
    let (config, x, y) = small_res_net()?;
    let resnet = config.res_net()?.build(device, DType::F32, 7)?;
    let batch = Batch::new(vec![x.to_device(device)?], vec![y.to_device(device)?]);
    let (mut moves, mut loss) = plan_against_autograd(&resnet, &batch, PROBS)?;
    let unet = unet::u_net(16, 3, 4)?.build(device, DType::F32, 7)?;
    let images = Tensor::rand(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu)?;
    let masks = Tensor::rand(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu)?;
    let batch = Batch::new(
        vec![images.to_device(device)?],
        vec![masks.to_device(device)?],
    );
    let (unet_moves, unet_loss) = plan_against_autograd(&unet, &batch, Loss::MeanSquaredError)?;
    moves = worse(moves, unet_moves);
    loss = worse(loss, unet_loss);
    Ok((moves, loss))
}

/// [`correctness_plan`] for one model and batch.
fn plan_against_autograd(model: &Model, batch: &Batch, loss: Loss) -> Result<(f64, f64)> {
    // Copies: `weight_map` shares its tensors' storage with the weights.
    let copy = |m: &Model| -> Result<std::collections::HashMap<String, Tensor>> {
        m.weight_map()?
            .into_iter()
            .map(|(n, w)| Ok((n, w.copy()?)))
            .collect()
    };
    let start = copy(model)?;
    let plan = match batch.inputs[0].device().is_cpu() {
        true => BackwardPass::PlanComposed,
        false => BackwardPass::Plan,
    };
    let mut after = Vec::new();
    let mut losses = Vec::new();
    for pass in [BackwardPass::Autograd, plan] {
        model.set_weights(&start)?;
        let sgd = SgdConfig {
            learning_rate: 1.0,
            ..Default::default()
        };
        let mut trainer = Trainer::new(model.clone(), sgd, loss)?.backward_pass(pass);
        losses.push(trainer.train_step(batch, 1.0)?);
        after.push(copy(model)?);
    }
    let mut moves = 0f64;
    for (name, w0) in &start {
        let autograd = (&after[0][name] - w0)?;
        let own = (&after[1][name] - w0)?;
        moves = worse(moves, rel_diff(&own, &autograd)?);
    }
    Ok((moves, rel_diff(&losses[1], &losses[0])?))
}

fn throughput(
    args: &Args,
    device: &Device,
    compute: Option<DType>,
    pass: BackwardPass,
) -> Result<(f64, f64, String)> {
    let config = ResNetConfig::default()
        .stages(args.stages.clone())
        .width_divisor(args.width_divisor);
    let model = config.res_net()?.build(device, DType::F32, 0)?;
    model.set_compute_dtype(compute);
    let mut trainer = Trainer::new(model, AdamConfig::default(), PROBS)?.backward_pass(pass);
    let x =
        (Tensor::rand(0f32, 255.0, (args.batch_size, 3, 32, 32), device)?).to_dtype(DType::F32)?;
    let y = labels(args.batch_size, device)?;
    let batch = Batch::new(vec![x], vec![y]);
    let mut times = Vec::new();
    for i in 0..args.warmup + args.steps {
        let start = Instant::now();
        let loss = trainer.train_step(&batch, 1e-3)?;
        loss.to_scalar::<f32>()?; // waits for the device
        if i >= args.warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let model = trainer.model().clone();
    let counts = step_counts::step_counts(&model, &batch, PROBS, pass)?;
    Ok((median * 1e3, args.batch_size as f64 / median, counts))
}

/// Seconds since the Unix epoch.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One epoch through `fit`: (seconds, images/s, images, Unix start, Unix end).
fn epoch_time(args: &Args, device: &Device) -> Result<(f64, f64, usize, f64, f64)> {
    let n = args.epoch_images;
    let mut s = 1u64;
    let images: Vec<u8> = (0..n * 3072)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect();
    let lbl: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let data = ImageDataset::from_parts(&images, &lbl, [3, 32, 32])?;
    let loader = DataLoader::new(data, args.batch_size, device)?.shuffle(true);
    let config = ResNetConfig::default()
        .stages(args.stages.clone())
        .width_divisor(args.width_divisor);
    let model = config.res_net()?.build(device, DType::F32, 0)?;
    let mut trainer = Trainer::new(model, AdamConfig::default(), PROBS)?;
    let (start, unix_start) = (Instant::now(), unix_now());
    let history = trainer.fit(&loader, None, 1, &mut [])?;
    let seconds = start.elapsed().as_secs_f64();
    Ok((
        seconds,
        history.epochs()[0].images_per_sec,
        n,
        unix_start,
        unix_now(),
    ))
}

/// NCCL at world size 1: the sum of one rank is the identity, so the device all-reduce must
/// return its input and training through it must equal training without a communicator.
#[cfg(feature = "nccl")]
fn nccl_check(device: &Device) -> Result<String> {
    use std::sync::Arc;

    use candle_functional::distributed::{Communicator, Nccl, SingleProcess};
    let nccl: Arc<dyn Communicator> = Arc::new(Nccl::init(Arc::new(SingleProcess), device)?);
    // The article's ResNet's trainable parameters: one step's gradient all-reduce.
    let flat = Tensor::rand(-1f32, 1.0, 15_607_568, device)?;
    let identity = rel_diff(&nccl.all_reduce_sum_tensor(&flat)?, &flat)?;
    let all_reduce_ms = time_ms(10, || {
        nccl.all_reduce_sum_tensor(&flat)?;
        Ok(device.synchronize()?)
    })?;
    let (config, x, y) = small_res_net()?;
    let batch = Batch::new(vec![x.to_device(device)?], vec![y.to_device(device)?]);
    let mut weights = Vec::new();
    for comm in [None, Some(nccl.clone())] {
        let model = config.res_net()?.build(device, DType::F32, 7)?;
        let mut trainer = Trainer::new(model, AdamConfig::default(), PROBS)?;
        if let Some(comm) = comm {
            trainer = trainer.distributed(comm);
        }
        for _ in 0..3 {
            trainer.train_step(&batch, 1e-3)?;
        }
        weights.push(trainer.model().weight_map()?);
    }
    let mut steps = 0f64;
    for (name, w) in &weights[0] {
        steps = worse(steps, rel_diff(&weights[1][name], w)?);
    }
    Ok(format!(
        "{{\"backend\": \"{}\", \"world_size\": {}, \"identity_max_rel_diff\": {identity:.3e}, \"all_reduce_15_6m_f32_median_ms\": {all_reduce_ms:.3}, \"train_steps_vs_no_communicator_max_rel_diff\": {steps:.3e}}}",
        nccl.backend(),
        nccl.world_size()
    ))
}

#[cfg(not(feature = "nccl"))]
fn nccl_check(_device: &Device) -> Result<String> {
    Err(candle_functional::Error::InvalidArgument(
        "--nccl needs a build with `--features nccl`".into(),
    ))
}

/// Median milliseconds of `f` (which must wait for the device itself).
fn time_ms(steps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..steps + 3 {
        let start = Instant::now();
        f()?;
        if i >= 3 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Median forward + backward milliseconds of one 3×3 convolution at `(batch, 64, 32, 32)`:
/// `ops::conv2d` against candle's own (`ops::reference::conv2d`), the same arguments.
fn conv_comparison(args: &Args, device: &Device) -> Result<(f64, f64)> {
    use candle_functional::ops::{self, Conv2dGeometry};
    type ConvFn = fn(&Tensor, &Tensor, Conv2dGeometry) -> Result<Tensor>;
    let n = args.batch_size;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, 64, 32, 32), device)?)?;
    let k = candle_core::Var::from_tensor(&Tensor::randn(0f32, 0.05, (64, 64, 3, 3), device)?)?;
    let geometry = Conv2dGeometry {
        pad: (1, 1, 1, 1),
        stride: 1,
        dilation: 1,
        groups: 1,
    };
    let mut times = Vec::new();
    for conv in [ops::conv2d as ConvFn, ops::reference::conv2d as ConvFn] {
        times.push(time_ms(args.steps, || {
            let y = conv(x.as_tensor(), k.as_tensor(), geometry)?;
            let grads = y.sum_all()?.backward()?;
            for v in [&x, &k] {
                if let Some(g) = grads.get(v.as_tensor()) {
                    g.sum_all()?.to_scalar::<f32>()?;
                }
            }
            Ok(())
        })?);
    }
    Ok((times[0], times[1]))
}

/// Forward + backward time of single layers at `(batch, 64, 32, 32)`, and of the phases of a
/// full training step.
fn profile(args: &Args, device: &Device) -> Result<String> {
    let n = args.batch_size;
    let mut out = Vec::new();
    let layers: Vec<(&str, SymbolicTensor, SymbolicTensor)> = {
        let x = Input::new([64, 32, 32]);
        vec![
            (
                "conv3x3",
                x.clone(),
                Conv2D::new(64, 3).padding(Padding::Same).call(&x)?,
            ),
            ("batch_norm", x.clone(), BatchNorm::new().call(&x)?),
            ("relu", x.clone(), ReLU::new().call(&x)?),
            (
                "add",
                x.clone(),
                Add::new().call_many(&[x.clone(), x.clone()])?,
            ),
        ]
    };
    for (name, x, y) in layers {
        let model = Model::new(&[x], &[y])?.build(device, DType::F32, 0)?;
        let input =
            candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, 64, 32, 32), device)?)?;
        let ms = time_ms(args.steps, || {
            let y = model
                .forward(&[input.as_tensor().clone()], Mode::Train)?
                .remove(0);
            let g = y.sum_all()?.backward()?;
            g.get(input.as_tensor())
                .map(|t| t.sum_all())
                .transpose()?
                .map(|t| t.to_scalar::<f32>())
                .transpose()?;
            Ok(())
        })?;
        out.push(format!("\"{name}_fwd_bwd_ms\": {ms:.3}"));
    }
    let config = ResNetConfig::default()
        .stages(args.stages.clone())
        .width_divisor(args.width_divisor);
    let model = config.res_net()?.build(device, DType::F32, 0)?;
    let x = (Tensor::rand(0f32, 255.0, (n, 3, 32, 32), device)?).to_dtype(DType::F32)?;
    let y = labels(n, device)?;
    let fwd = time_ms(args.steps, || {
        let out = model
            .forward(std::slice::from_ref(&x), Mode::Train)?
            .remove(0);
        PROBS.compute(&out, &y)?.to_scalar::<f32>()?;
        Ok(())
    })?;
    let fwd_bwd = time_ms(args.steps, || {
        let out = model
            .forward(std::slice::from_ref(&x), Mode::Train)?
            .remove(0);
        let grads = PROBS.compute(&out, &y)?.backward()?;
        let first = model.trainable_vars()?.remove(0);
        grads
            .get(first.as_tensor())
            .map(|g| g.sum_all())
            .transpose()?
            .map(|t| t.to_scalar::<f32>())
            .transpose()?;
        Ok(())
    })?;
    let mut trainer = Trainer::new(model.clone(), AdamConfig::default(), PROBS)?;
    let batch = Batch::new(vec![x.clone()], vec![y.clone()]);
    let step = time_ms(args.steps, || {
        trainer.train_step(&batch, 1e-3)?.to_scalar::<f32>()?;
        Ok(())
    })?;
    out.push(format!("\"resnet_forward_ms\": {fwd:.2}, \"resnet_forward_backward_ms\": {fwd_bwd:.2}, \"resnet_train_step_ms\": {step:.2}"));
    Ok(format!("{{{}}}", out.join(", ")))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    allocator::keep_freed_memory();
    let args = Args::parse();
    let device = select_device(&args.device)?;
    // TF32 for f32 matrix products on CUDA (a no-op on the CPU).
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    if args.profile {
        println!("{}", profile(&args, &device)?);
        return Ok(());
    }
    if args.nccl {
        println!("{}", nccl_check(&device)?);
        return Ok(());
    }
    let (out_diff, grad_diff, n_grads) = correctness(&device)?;
    eprintln!("correctness: outputs {out_diff:.2e}, gradients {grad_diff:.2e} ({n_grads} tensors)");
    let (dec_out, dec_grad, dec_n) = correctness_decoder_layers(&device)?;
    eprintln!(
        "correctness, decoder layers: outputs {dec_out:.2e}, gradients {dec_grad:.2e} ({dec_n} tensors)"
    );
    let optimizer_diff = correctness_fused_optimizer(&device)?;
    eprintln!("correctness, multi-tensor optimizer kernels: {optimizer_diff:.2e}");
    let (in_place, steps, refused) = correctness_in_place(&device)?;
    eprintln!(
        "correctness, in-place kernels {in_place:.2e}, three training steps {steps:.2e}, NaN step refused on the device: {refused}"
    );
    let (plan_moves, plan_loss) = correctness_plan(&device)?;
    eprintln!(
        "correctness, the plan's own backward pass against autograd: weights' moves {plan_moves:.2e}, loss {plan_loss:.2e}"
    );
    let decoder_json = format!(
        "{{\"max_rel_diff_outputs\": {dec_out:.3e}, \"max_rel_diff_gradients\": {dec_grad:.3e}, \"gradient_tensors\": {dec_n}}}, \"in_place_kernels_max_rel_diff\": {in_place:.3e}, \"train_steps_max_rel_diff\": {steps:.3e}, \"nan_step_refused\": {refused}"
    );
    if args.correctness_only {
        println!(
            "{{\"max_rel_diff_outputs\": {out_diff:.3e}, \"max_rel_diff_gradients\": {grad_diff:.3e}, \"gradient_tensors\": {n_grads}, \"decoder_layers\": {decoder_json}, \"optimizer_kernels_max_rel_diff\": {optimizer_diff:.3e}, \"plan_vs_autograd\": {{\"max_rel_diff_moves\": {plan_moves:.3e}, \"rel_diff_loss\": {plan_loss:.3e}}}}}"
        );
        return Ok(());
    }
    let (f32_ms, f32_ips, counts) = throughput(&args, &device, None, BackwardPass::Autograd)?;
    eprintln!("per-step counts (f32, autograd): {counts}");
    eprintln!("f32/tf32, autograd: {f32_ms:.1} ms/step, {f32_ips:.0} img/s");
    // The plan's own backward pass: on CUDA cuDNN's gradient kernels composed (not the
    // default there until measured here); on the CPU its composition, for a dry run.
    let plan = match device.is_cpu() {
        true => BackwardPass::PlanComposed,
        false => BackwardPass::Plan,
    };
    let (plan_ms, plan_ips, plan_counts) = throughput(&args, &device, None, plan)?;
    eprintln!("per-step counts (f32, {plan:?}): {plan_counts}");
    eprintln!("f32/tf32, {plan:?}: {plan_ms:.1} ms/step, {plan_ips:.0} img/s");
    let candle_conv = if args.compare_candle_conv {
        let r = conv_comparison(&args, &device)?;
        eprintln!(
            "conv3x3 forward + backward: ops::conv2d {:.2} ms, candle's own {:.2} ms",
            r.0, r.1
        );
        Some(r)
    } else {
        None
    };
    let bf16 = if device.is_cpu() {
        None // candle's CPU convolution has no bf16 kernel
    } else {
        let (ms, ips, _) = throughput(&args, &device, Some(DType::BF16), BackwardPass::Auto)?;
        Some((ms, ips))
    };
    if let Some((ms, ips)) = bf16 {
        eprintln!("bf16 mixed: {ms:.1} ms/step, {ips:.0} img/s");
    }
    let epoch = if args.epoch_images > 0 {
        Some(epoch_time(&args, &device)?)
    } else {
        None
    };
    if let Some((secs, ips, n, _, _)) = epoch {
        eprintln!("epoch of {n} images: {secs:.1} s ({ips:.0} img/s in fit)");
    }
    let opt = |v: Option<f64>| {
        v.map(|v| format!("{v:.2}"))
            .unwrap_or_else(|| "null".into())
    };
    println!(
        "{{\"framework\": \"candle-functional\", \"device\": \"{:?}\", \"batch_size\": {}, \"stages\": {:?}, \"width_divisor\": {}, \
         \"correctness\": {{\"max_rel_diff_outputs\": {out_diff:.3e}, \"max_rel_diff_gradients\": {grad_diff:.3e}, \"gradient_tensors\": {n_grads}}}, \"correctness_decoder_layers\": {decoder_json}, \"optimizer_kernels_max_rel_diff\": {optimizer_diff:.3e}, \
         \"plan_vs_autograd\": {{\"max_rel_diff_moves\": {plan_moves:.3e}, \"rel_diff_loss\": {plan_loss:.3e}}}, \
         \"train_f32_tf32\": {{\"median_ms\": {f32_ms:.2}, \"images_per_sec\": {f32_ips:.1}}}, \
         \"train_f32_tf32_plan\": {{\"backward_pass\": \"{plan:?}\", \"median_ms\": {plan_ms:.2}, \"images_per_sec\": {plan_ips:.1}, \"counts_per_step\": {plan_counts}}}, \
         \"train_bf16_mixed\": {{\"median_ms\": {}, \"images_per_sec\": {}}}, \
         \"conv3x3_fwd_bwd_ms\": {{\"ops\": {}, \"candle_reference\": {}}}, \
         \"epoch\": {{\"images\": {}, \"seconds\": {}, \"images_per_sec\": {}, \"unix_start\": {}, \"unix_end\": {}}}, \
         \"counts_per_step\": {counts}}}",
        device.location(),
        args.batch_size,
        args.stages,
        args.width_divisor,
        opt(bf16.map(|b| b.0)),
        opt(bf16.map(|b| b.1)),
        opt(candle_conv.map(|b| b.0)),
        opt(candle_conv.map(|b| b.1)),
        epoch.map(|e| e.2).unwrap_or(0),
        opt(epoch.map(|e| e.0)),
        opt(epoch.map(|e| e.1)),
        opt(epoch.map(|e| e.3)),
        opt(epoch.map(|e| e.4)),
    );
    Ok(())
}

//! Throughput of the article's networks: training steps (forward, backward, Adam update) and
//! inference, on synthetic CIFAR-shaped data. Prints one JSON line per measurement with the
//! median, minimum and maximum step time and images per second.
//!
//! With `--counts`, the line also holds `counts_per_step`: what one training step would
//! launch on a GPU, counted on any device (tensor buffers, allocations and bytes, host reads;
//! `common/step_counts.rs`), with the GPU's divergence check (`NanCheck::OnDevice`), through
//! candle's autograd and through `--backward-pass` (`plan-composed` composes the gradients as
//! CUDA does, so that the CPU counts what a GPU step runs). The counts do not depend on the
//! batch size (the bytes do), so a small batch measures them fast.
//!
//! ```text
//! cargo run --release --example bench -- --model resnet --mode train --batch-size 128 --steps 5
//! cargo run --release --example bench -- --counts --backward-pass plan-composed --batch-size 8 --steps 1 --warmup 0
//! ```
//! `scripts/compare-cpu.sh` runs it alternately with the PyTorch and Keras references.
//!
//! Under `mpirun -np N` (built with `--features distributed`) training is data-parallel:
//! `--batch-size` is the global batch, each rank trains on its share, rank 0 prints the line
//! with `ranks` and `comm_ms_median` (the step's time in collective calls, see
//! `Trainer::communication_seconds`). `scripts/compare-distributed.sh` runs it beside
//! PyTorch's DistributedDataParallel.

#[path = "common/allocator.rs"]
mod allocator;
#[path = "common/openmp.rs"]
mod openmp;
#[path = "common/step_counts.rs"]
mod step_counts;
#[path = "common/unet.rs"]
mod unet;

use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_functional::data::Batch;
use candle_functional::models::ResNetConfig;
use candle_functional::prelude::*;
use candle_functional::select_device;
use candle_functional::train::{AdamConfig, BackwardPass, Loss, Trainer};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Net {
    Resnet,
    Plain,
    /// The segmentation example's U-Net (16-32-64 filters, concatenated skips, 3 classes per
    /// pixel of a 32x32 image); `--stages` and `--width-divisor` do not apply.
    Unet,
}

/// How the trainer computes gradients (`Trainer::backward_pass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Gradients {
    /// The trainer's default: its own backward pass on the CPU, candle's autograd elsewhere.
    Auto,
    /// The trainer's own backward pass over the model's plan, on any device.
    Plan,
    /// The plan's pass with the gradients composed as on CUDA (separate gradient kernels and
    /// element-wise passes), on any device: on the CPU, what `--counts` counts for a GPU.
    PlanComposed,
    /// candle's autograd over the whole step.
    Autograd,
}

impl Gradients {
    fn pass(self) -> BackwardPass {
        match self {
            Gradients::Auto => BackwardPass::Auto,
            Gradients::Plan => BackwardPass::Plan,
            Gradients::PlanComposed => BackwardPass::PlanComposed,
            Gradients::Autograd => BackwardPass::Autograd,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Phase {
    Train,
    Infer,
}

/// Benchmark one network in one mode.
#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_enum, default_value_t = Net::Resnet)]
    model: Net,
    #[arg(long, value_enum, default_value_t = Phase::Train)]
    mode: Phase,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "2,5,5,2", value_delimiter = ',')]
    stages: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    width_divisor: usize,
    /// Also count what one training step launches (see the module docs).
    #[arg(long)]
    counts: bool,
    /// How the training step computes its gradients.
    #[arg(long, value_enum, default_value_t = Gradients::Auto)]
    backward_pass: Gradients,
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    openmp::wait_passively();
    allocator::keep_freed_memory();
    let args = Args::parse();
    let device = select_device(&args.device)?;
    let config = ResNetConfig::default()
        .stages(args.stages.clone())
        .width_divisor(args.width_divisor);
    let model = match args.model {
        Net::Resnet => config.res_net()?,
        Net::Plain => config.plain_net()?,
        Net::Unet => unet::u_net(32, 3, 16)?,
    }
    .build(&device, DType::F32, 0)?;
    let x = (Tensor::rand(0f32, 1.0, (args.batch_size, 3, 32, 32), &device)? * 255.0)?;
    // A class per image (softmax outputs), or per pixel (the U-Net's logits).
    let (labels, loss) = match args.model {
        Net::Unet => {
            let labels: Vec<u32> = (0..args.batch_size as u32 * 32 * 32)
                .map(|i| i % 3)
                .collect();
            (
                Tensor::from_vec(labels, (args.batch_size, 32, 32), &device)?,
                Loss::SparseCategoricalCrossentropy { from_logits: true },
            )
        }
        _ => {
            let labels: Vec<u32> = (0..args.batch_size as u32).map(|i| i % 10).collect();
            (
                Tensor::from_vec(labels, args.batch_size, &device)?,
                Loss::SparseCategoricalCrossentropy { from_logits: false },
            )
        }
    };
    // Under mpirun: MPI between CPU ranks; NCCL between GPUs in a `nccl` build.
    let comm = candle_functional::distributed::for_device(
        candle_functional::distributed::from_environment()?,
        &device,
    )?;
    let ranks = comm.world_size();
    if ranks > 1 && (args.mode == Phase::Infer || args.counts) {
        return Err("under mpirun only --mode train is measured (inference is per process)".into());
    }
    let mut trainer = Trainer::new(model.clone(), AdamConfig::default(), loss)?
        .backward_pass(args.backward_pass.pass());
    if ranks > 1 {
        trainer = trainer.distributed(comm.clone());
    }

    let batch = Batch::new(vec![x.clone()], vec![labels.clone()]);
    let mut times = Vec::new();
    let mut comm_times = Vec::new();
    for i in 0..args.warmup + args.steps {
        let start = Instant::now();
        let comm_before = trainer.communication_seconds();
        match args.mode {
            Phase::Train => {
                let loss = trainer.train_step(&batch, 1e-3)?;
                loss.to_scalar::<f32>()?; // waits for the device
            }
            Phase::Infer => {
                let y = model
                    .forward(std::slice::from_ref(&x), Mode::Eval)?
                    .remove(0);
                y.sum_all()?.to_scalar::<f32>()?;
            }
        }
        if i >= args.warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
            comm_times.push((trainer.communication_seconds() - comm_before) * 1e3);
        }
    }
    if !comm.is_chief() {
        return Ok(());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    comm_times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let comm_median = comm_times[comm_times.len() / 2];
    let counts = if args.counts {
        // Fresh trainers with the GPU's check, so that the counts are a GPU step's.
        format!(
            ", \"counts_per_step\": {}",
            step_counts::step_counts(&model, &batch, loss, args.backward_pass.pass())?
        )
    } else {
        String::new()
    };
    println!(
        "{{\"framework\": \"candle-functional\", \"device\": \"{:?}\", \"model\": \"{}\", \"mode\": \"{}\", \"batch_size\": {}, \"steps\": {}, \"median_ms\": {median:.1}, \"min_ms\": {:.1}, \"max_ms\": {:.1}, \"images_per_sec\": {:.2}, \"threads\": {}, \"allocator\": \"{}\", \"stages\": {:?}, \"width_divisor\": {}, \"ranks\": {ranks}, \"comm_ms_median\": {comm_median:.1}, \"backward_pass\": \"{:?}\"{counts}}}",
        device.location(),
        match args.model {
            Net::Resnet => "resnet",
            Net::Plain => "plain",
            Net::Unet => "unet",
        },
        match args.mode {
            Phase::Train => "train",
            Phase::Infer => "infer",
        },
        args.batch_size,
        args.steps,
        times[0],
        times[times.len() - 1],
        args.batch_size as f64 / (median / 1e3),
        candle_core::utils::get_num_threads(),
        if cfg!(system_allocator) {
            "system"
        } else {
            "mimalloc"
        },
        args.stages,
        args.width_divisor,
        args.backward_pass,
    );
    Ok(())
}

//! The crate at its best on real data: He et al.'s ResNet-20 for CIFAR-10 (3 stages of 3
//! residual blocks, 16-32-64 filters, about 0.27 M parameters), built from the crate's
//! helpers (`he_residual_block`, or with `--block article` the article's `residual_block`), with the augmentation inside the model (horizontal
//! flips and pad-4-and-crop as layers, the identity at inference) and the pixel
//! standardization too, trained with SGD + momentum, decoupled weight decay and a one-cycle
//! (or cosine) schedule. `scripts/torch_reference.py resnet20` is the same recipe in
//! PyTorch.
//!
//! ```text
//! cargo run --release --example resnet20 -- --data-dir ../shared/data/cifar-10-batches-bin
//! cargo run --release --example resnet20 -- --quick      # the mini data set, one epoch
//! ```
//!
//! Writes `OUT/`: `history.json`, `history.csv`, checkpoints (`last.ckpt`, `best.ckpt`;
//! `--resume` continues from the last), `weights.safetensors` and `result.json` (final and
//! best test accuracy, epoch times, the machine).

#[path = "common/allocator.rs"]
mod allocator;

use std::path::PathBuf;

use candle_core::DType;
use candle_functional::data::{Cifar10, DataLoader};
use candle_functional::layers::Normalization;
use candle_functional::models::{he_residual_block, relu_bn, residual_block};
use candle_functional::prelude::*;
use candle_functional::select_device;
use candle_functional::train::{
    Callback, HistoryLogger, Loss, LrSchedule, ModelCheckpoint, Progress, SgdConfig, Trainer,
};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Block {
    /// He et al.'s: BatchNorm before the addition, ReLU after it (`he_residual_block`).
    He,
    /// The article's: ReLU then BatchNorm after the addition (`residual_block`).
    Article,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Schedule {
    /// Smith's one-cycle (PyTorch's OneCycleLR defaults: 30% warm-up, /25, /1e4).
    OneCycle,
    /// Cosine decay to 0 after a one-epoch linear warm-up.
    Cosine,
}

/// ResNet-20 on CIFAR-10, the recipe of docs/RESULTS.md.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Folder with data_batch_1..5.bin and test_batch.bin.
    #[arg(long, default_value = "data/cifar-10-batches-bin")]
    data_dir: PathBuf,
    /// The mini data set beside the default data folder, one epoch, for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Decoupled weight decay (`w -= lr * wd * w` each step; 5e-3 matches PyTorch's coupled
    /// 5e-4 under momentum 0.9).
    #[arg(long, default_value_t = 5e-3)]
    weight_decay: f64,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value_t = Schedule::OneCycle)]
    schedule: Schedule,
    /// Which residual block.
    #[arg(long, value_enum, default_value_t = Block::He)]
    block: Block,
    /// Residual blocks per stage: n gives ResNet-(6n+2); 3 is ResNet-20.
    #[arg(long, default_value_t = 3)]
    blocks: usize,
    /// Threads preparing batches ahead of training.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Train on the first N training records only (0 = all).
    #[arg(long, default_value_t = 0)]
    subset: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output folder.
    #[arg(long, default_value = "runs/resnet20")]
    out: PathBuf,
    /// Seed of the weights, the shuffling and the augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from OUT/last.ckpt.
    #[arg(long)]
    resume: bool,
    /// One line per epoch instead of a progress bar.
    #[arg(long)]
    quiet: bool,
}

/// CIFAR-10's per-channel pixel means and variances (0-255 scale).
const MEAN: [f64; 3] = [125.307, 122.950, 113.865];
const STD: [f64; 3] = [62.993, 62.089, 66.705];

/// ResNet-(6n+2) as He et al. lay it out for CIFAR-10, from the crate's helpers: raw
/// pixels in, logits out. The shortcut of a downsampling block is a 1x1 stride-2
/// convolution (He et al.'s option B).
fn resnet(blocks: usize, kind: Block) -> candle_functional::Result<Model> {
    let image = Input::named("image", [3, 32, 32]);
    // Augmentation, in training only: mirror, then shift by -4..=4 whole pixels with black
    // brought in (pad-4-and-crop, per image): shifts drawn in (-4.5, 4.5) and rounded are
    // uniform over the nine offsets, as PyTorch's RandomCrop(32, padding=4) draws them.
    let x = RandomFlip::new(FlipMode::Horizontal).call(&image)?;
    let x = RandomTranslation::new(4.5 / 32.0, 4.5 / 32.0)
        .fill_mode(FillMode::Constant)
        .interpolation(Interpolation::Nearest)
        .call(&x)?;
    let x = Normalization::new(MEAN.to_vec(), STD.iter().map(|s| s * s).collect()).call(&x)?;
    let mut x = match kind {
        Block::He => {
            let x = Conv2D::new(16, 3)
                .padding(Padding::Same)
                .use_bias(false)
                .call(&x)?;
            ReLU::new().call(&BatchNorm::new().call(&x)?)?
        }
        Block::Article => relu_bn(&Conv2D::new(16, 3).padding(Padding::Same).call(&x)?)?,
    };
    for (stage, filters) in [16, 32, 64].into_iter().enumerate() {
        for block in 0..blocks {
            let downsample = block == 0 && stage > 0;
            x = match kind {
                Block::He => he_residual_block(&x, downsample, filters)?,
                Block::Article => residual_block(&x, downsample, filters, 3)?,
            };
        }
    }
    let x = GlobalAveragePooling2D::new().call(&x)?;
    let logits = Dense::new(10).call(&x)?;
    Ok(Model::new(&[image], &[logits])?.named(format!("resnet{}", 6 * blocks + 2)))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    allocator::keep_freed_memory();
    let mut args = Args::parse();
    if args.quick {
        args.data_dir = args
            .data_dir
            .parent()
            .map(|p| p.join("cifar-10-mini"))
            .unwrap_or_else(|| PathBuf::from("cifar-10-mini"));
        args.epochs = 1;
    }
    let device = select_device(&args.device)?;
    let data = Cifar10::load(&args.data_dir)?;
    let train_set = data.train().subset(args.subset);
    let train = DataLoader::new(train_set, args.batch_size, &device)?
        .shuffle(true)
        .seed(args.seed)
        .workers(args.workers);
    let test = DataLoader::new(data.test().clone(), 500, &device)?;

    let model = resnet(args.blocks, args.block)?.build(&device, DType::F32, args.seed)?;
    let params = model.count_params();
    eprintln!(
        "{}: {} parameters, {} training images, {} epochs",
        model.name(),
        params.total,
        train.dataset().len(),
        args.epochs
    );
    let optimizer = SgdConfig {
        learning_rate: args.lr,
        momentum: args.momentum,
        nesterov: false,
        weight_decay: args.weight_decay,
    };
    let schedule = match args.schedule {
        Schedule::OneCycle => LrSchedule::one_cycle(),
        Schedule::Cosine => LrSchedule::Cosine {
            min_fraction: 0.0,
            warmup_steps: train.len(),
        },
    };
    let mut trainer = Trainer::new(
        model,
        optimizer,
        Loss::SparseCategoricalCrossentropy { from_logits: true },
    )?
    .schedule(schedule)
    .progress(if args.quiet {
        Progress::Lines
    } else {
        Progress::Bar
    });
    std::fs::create_dir_all(&args.out)?;
    let checkpoint = ModelCheckpoint::new(&args.out).monitor("val_accuracy");
    if args.resume && checkpoint.last_path().is_file() {
        trainer.load_checkpoint(checkpoint.last_path())?;
        eprintln!("resumed after epoch {}", trainer.epochs_done());
    }
    let mut callbacks: Vec<Box<dyn Callback>> = vec![
        Box::new(checkpoint),
        Box::new(
            HistoryLogger::new()
                .json(args.out.join("history.json"))
                .csv(args.out.join("history.csv")),
        ),
    ];
    let history = trainer
        .fit(&train, Some(&test), args.epochs, &mut callbacks)?
        .clone();
    trainer
        .model()
        .save_weights(args.out.join("weights.safetensors"))?;

    let accuracy = |e: &candle_functional::train::EpochLog| e.metric("val_accuracy");
    let best = history
        .epochs()
        .iter()
        .filter_map(accuracy)
        .fold(f64::NAN, f64::max);
    let last = history.last().and_then(accuracy).unwrap_or(f64::NAN);
    let seconds: Vec<f64> = history.epochs().iter().map(|e| e.seconds).collect();
    let result = serde_json::json!({
        "model": trainer.model().name(),
        "parameters": params.total,
        "epochs": history.epochs().len(),
        "final_test_accuracy": last,
        "best_test_accuracy": best,
        "epoch_seconds": seconds,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay_decoupled": args.weight_decay,
        "schedule": format!("{:?}", args.schedule),
        "block": format!("{:?}", args.block),
        "device": args.device,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    std::fs::write(
        args.out.join("result.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    println!("{result}");
    Ok(())
}

//! Transfer learning with the article's ResNet: cut the network at an inner tensor (the input
//! of its average pooling), freeze everything below the cut, put a new head on it and train
//! only the head with `fit`; then unfreeze the base (its BatchNorm layers kept frozen) and
//! fine-tune for an epoch at a ten times lower learning rate, as Keras's guide to transfer
//! learning does.
//!
//! The base starts from `--weights` (a file written by `train_cifar10`, for the same
//! `--width-divisor`/`--stages`) when given, else from its random initialization. The data is
//! CIFAR-10 from `--data-dir` when given, else synthetic images (ten classes told apart by
//! their colour).
//!
//! ```text
//! cargo run --release --example transfer_learning -- --quick    # about 15 s on 2 cores
//! cargo run --release --example transfer_learning -- --data-dir path/to/cifar-10-batches-bin \
//!     --weights runs/resnet/weights.safetensors
//! ```

#[path = "common/allocator.rs"]
mod allocator;

use std::path::PathBuf;

use candle_core::{DType, Device};
use candle_functional::data::{Cifar10, DataLoader, ImageDataset, Normalization};
use candle_functional::models::ResNetConfig;
use candle_functional::prelude::*;
use candle_functional::train::{AdamConfig, Loss, Progress, Trainer};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Freeze the article's ResNet, train a new head, then fine-tune.
#[derive(Parser, Debug)]
struct Args {
    /// A short run: a small network (filters ÷ 4, one block a stage) and 512 images.
    #[arg(long)]
    quick: bool,
    /// The CIFAR-10 binary folder (synthetic data without it).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Weights of the base network (from `train_cifar10`).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Training images used (the first N).
    #[arg(long, default_value_t = 5000)]
    subset: usize,
    /// Epochs of the head alone.
    #[arg(long, default_value_t = 8)]
    head_epochs: usize,
    /// Learning rate of the head's training (fine-tuning uses a tenth of it).
    #[arg(long, default_value_t = 1e-2)]
    head_lr: f64,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    width_divisor: usize,
    #[arg(long, default_value = "2,5,5,2", value_delimiter = ',')]
    stages: Vec<usize>,
}

/// `n` 32×32 images whose class (0–9) is their colour (one palette for every set), with
/// noise drawn from `seed`.
fn synthetic(n: usize, seed: u64) -> Result<ImageDataset> {
    let mut palette_rng = StdRng::seed_from_u64(0);
    let palette: Vec<[f32; 3]> = (0..10).map(|_| palette_rng.random()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pixels = Vec::with_capacity(n * 3 * 32 * 32);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % 10;
        for value in palette[class] {
            for _ in 0..32 * 32 {
                let v = 255.0 * (0.7 * value + 0.3 * rng.random::<f32>());
                pixels.push(v as u8);
            }
        }
        labels.push(class as u8);
    }
    ImageDataset::from_parts(&pixels, &labels, [3, 32, 32])
}

/// Keras's Adam at another learning rate.
fn adam(learning_rate: f64) -> AdamConfig {
    AdamConfig {
        learning_rate,
        ..Default::default()
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    allocator::keep_freed_memory();
    let mut args = Args::parse();
    if args.quick {
        args.width_divisor = args.width_divisor.max(4);
        args.stages = vec![1, 1, 1, 1];
        args.subset = args.subset.min(512);
    }
    let device = Device::Cpu;
    let (train, test) = match &args.data_dir {
        Some(dir) => {
            let data = Cifar10::load(dir)?;
            (
                data.train().subset(args.subset),
                data.test().subset(args.subset / 5),
            )
        }
        None => (
            synthetic(args.subset, 1)?,
            synthetic(args.subset / 5 + 10, 2)?,
        ),
    };
    // The article feeds raw pixels (its first BatchNorm scales them): keep that for trained
    // weights; a randomly initialized base gets pixels in [0, 1].
    let normalization = if args.weights.is_some() {
        Normalization::Raw
    } else {
        Normalization::UnitRange
    };
    let train = DataLoader::new(train, args.batch_size, &device)?
        .normalization(normalization)
        .shuffle(true);
    let test = DataLoader::new(test, 256, &device)?.normalization(normalization);

    // The article's network, and its weights if any.
    let config = ResNetConfig::default()
        .stages(args.stages.clone())
        .width_divisor(args.width_divisor);
    let resnet = config.res_net()?.build(&device, DType::F32, 0)?;
    if let Some(path) = &args.weights {
        resnet.load_weights(path)?;
    }

    // Cut at the input of the average pooling: the last feature map.
    let features = resnet.get_layer("average_pooling2d")?.input()?;
    let base = Model::new(resnet.inputs(), std::slice::from_ref(&features))?.named("base");
    base.set_trainable(false);
    let pooled = GlobalAveragePooling2D::new().call(&features)?;
    let logits = Dense::new(10).name("new_head").call(&pooled)?;
    let model = Model::new(resnet.inputs(), &[logits])?.build(&device, DType::F32, 1)?;
    let counts = model.count_params();
    println!(
        "cut at {} ({features}); trainable {} of {} parameters",
        features.layer().name().unwrap_or("?"),
        counts.trainable,
        counts.total
    );

    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut head = Trainer::new(model.clone(), adam(args.head_lr), loss)?.progress(Progress::Lines);
    head.fit(&train, Some(&test), args.head_epochs, &mut [])?;
    let after_head = head.evaluate(&test)?.metric("accuracy").unwrap_or(f64::NAN);

    // Fine-tuning: everything trains, ten times slower, except the BatchNorm layers, which
    // stay frozen (inference mode, statistics kept) as Keras's transfer-learning guide advises:
    // a few hundred steps would not bring their moving statistics in line with the batches'.
    base.set_trainable(true);
    for layer in base.layers() {
        if layer.op().type_name() == "BatchNormalization" {
            layer.set_trainable(false);
        }
    }
    println!(
        "unfrozen: trainable {} parameters",
        model.count_params().trainable
    );
    let fine = adam(args.head_lr / 10.0);
    let mut tuner = Trainer::new(model, fine, loss)?.progress(Progress::Lines);
    tuner.fit(&train, Some(&test), 1, &mut [])?;
    let after_tuning = tuner
        .evaluate(&test)?
        .metric("accuracy")
        .unwrap_or(f64::NAN);
    println!("test accuracy: head only {after_head:.4}, after fine-tuning {after_tuning:.4}");
    Ok(())
}

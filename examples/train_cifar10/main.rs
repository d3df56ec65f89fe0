//! Reproduces the experiment of "Building a ResNet in Keras": the article's ResNet and its
//! plain twin trained on CIFAR-10 (Adam, sparse categorical cross-entropy, batch 128, 20
//! epochs, raw pixels, the test set as validation), compared side by side.
//!
//! ```text
//! cargo run --release --example train_cifar10 -- --data-dir path/to/cifar-10-batches-bin
//! # a quick CPU run: narrower, shallower networks on part of the data
//! cargo run --release --example train_cifar10 -- --data-dir DIR --width-divisor 4 \
//!     --stages 1,1,1,1 --epochs 3 --subset 10000
//! # data-parallel over 2 processes (build with --features distributed; MPI's ranks are
//! # found automatically, each trains on half of every batch of 128):
//! mpirun -np 2 -x RAYON_NUM_THREADS=1 target/release/examples/train_cifar10 --data-dir DIR
//! ```
//!
//! For each model it writes `OUT/<model>/`: `history.json`, `history.csv`,
//! `weights.safetensors`, `summary.txt`, `curves.png` and checkpoints (`last.ckpt`,
//! `best.ckpt`); with `--model both` also `OUT/comparison.png` (both models on the same axes)
//! and `OUT/comparison.md`, and prints the final comparison table.

mod plot;

#[path = "../common/allocator.rs"]
mod allocator;
#[path = "../common/openmp.rs"]
mod openmp;

use std::path::{Path, PathBuf};

use candle_core::DType;
use candle_functional::data::cifar10::{TEST_FILE, TRAIN_FILES};
use candle_functional::data::{Augmentation, Cifar10, DataLoader, Normalization};
use candle_functional::distributed::{for_device, from_environment};
use candle_functional::models::ResNetConfig;
use candle_functional::train::{
    AdamConfig, Callback, HistoryLogger, Loss, LrSchedule, ModelCheckpoint, OptimizerConfig,
    Progress, SgdConfig, Trainer,
};
use candle_functional::{Model, select_device};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Resnet,
    Plain,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OptimizerName {
    Adam,
    Adamw,
    Sgd,
    Momentum,
    Nesterov,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Normalize {
    /// Raw 0-255 pixels (the article's; its first BatchNorm scales them).
    Raw,
    /// Pixels / 255.
    Unit,
    /// Per-channel mean/std of CIFAR-10.
    Standard,
}

/// Train the article's ResNet and/or PlainNet on CIFAR-10.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Which network(s) to train.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    model: Which,
    /// Epochs.
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    batch_size: usize,
    /// Optimizer (Keras's rules and defaults).
    #[arg(long, value_enum, default_value_t = OptimizerName::Adam)]
    optimizer: OptimizerName,
    /// Learning rate (default: the optimizer's, 1e-3 for Adam, 0.01 for SGD).
    #[arg(long, value_parser = positive_finite)]
    lr: Option<f64>,
    /// Decoupled weight decay (default 0; 0.004 for adamw).
    #[arg(long, value_parser = non_negative_finite)]
    weight_decay: Option<f64>,
    /// Learning-rate schedule: constant, step[:EVERY:GAMMA], cosine[:WARMUP_STEPS], one-cycle.
    #[arg(long, default_value = "constant", value_parser = schedule)]
    schedule: LrSchedule,
    /// Random 4-pixel crops and horizontal flips.
    #[arg(long)]
    augment: bool,
    /// Pixel scaling.
    #[arg(long, value_enum, default_value_t = Normalize::Raw)]
    normalize: Normalize,
    /// Folder with data_batch_1..5.bin and test_batch.bin.
    #[arg(long, default_value = "data/cifar-10-batches-bin")]
    data_dir: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Train on the first N training records only (0 = all 50,000).
    #[arg(long, default_value_t = 0)]
    subset: usize,
    /// Validate on the first N test records only (0 = all 10,000).
    #[arg(long, default_value_t = 0)]
    test_subset: usize,
    /// Divide every stage's filters by this (4 gives 16-32-64-128).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    width_divisor: usize,
    /// Blocks per stage, comma-separated.
    #[arg(long, default_value = "2,5,5,2", value_delimiter = ',', value_parser = at_least_one)]
    stages: Vec<usize>,
    /// Output folder.
    #[arg(long, default_value = "runs/cifar10")]
    out: PathBuf,
    /// Seed of the weights, the shuffling and the augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from OUT/<model>/last.ckpt when it exists.
    #[arg(long)]
    resume: bool,
    /// Threads preparing batches ahead of training (0: on the training thread).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// One line per epoch instead of live progress bars.
    #[arg(long)]
    quiet: bool,
}

/// A whole number of at least 1 (epochs, batch size, divisors, blocks).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number of at least 1")),
    }
}

/// A finite number above 0 (learning rates).
fn positive_finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a finite number above 0")),
    }
}

/// A finite number of at least 0 (weight decay).
fn non_negative_finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a finite number of at least 0")),
    }
}

/// A learning-rate schedule, checked by its parser.
fn schedule(s: &str) -> Result<LrSchedule, String> {
    s.parse::<LrSchedule>().map_err(|e| e.to_string())
}

fn main() {
    openmp::wait_passively();
    allocator::keep_freed_memory();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn optimizer(args: &Args) -> OptimizerConfig {
    let wd = args.weight_decay;
    match args.optimizer {
        OptimizerName::Adam | OptimizerName::Adamw => {
            let mut c = if args.optimizer == OptimizerName::Adamw {
                AdamConfig::adamw(0.004)
            } else {
                AdamConfig::default()
            };
            c.learning_rate = args.lr.unwrap_or(c.learning_rate);
            c.weight_decay = wd.unwrap_or(c.weight_decay);
            c.into()
        }
        OptimizerName::Sgd | OptimizerName::Momentum | OptimizerName::Nesterov => {
            let momentum = if args.optimizer == OptimizerName::Sgd {
                0.0
            } else {
                0.9
            };
            SgdConfig::momentum(args.lr.unwrap_or(0.01), momentum)
                .nesterov(args.optimizer == OptimizerName::Nesterov)
                .weight_decay(wd.unwrap_or(0.0))
                .into()
        }
    }
}

fn load_data(dir: &Path) -> Result<Cifar10, Box<dyn std::error::Error>> {
    if !Cifar10::is_present(dir) {
        // A folder with some of the files is not a missing data set: name what is missing.
        let files: Vec<&str> = TRAIN_FILES.iter().copied().chain([TEST_FILE]).collect();
        let missing: Vec<&str> = files
            .iter()
            .copied()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if missing.len() < files.len() {
            return Err(format!(
                "the CIFAR-10 folder {} is incomplete: {} missing",
                dir.display(),
                missing.join(", ")
            )
            .into());
        }
        #[cfg(feature = "download")]
        {
            let root = dir.parent().unwrap_or(Path::new("."));
            eprintln!(
                "CIFAR-10 not found in {}: downloading the official archive",
                dir.display()
            );
            let folder = candle_functional::data::download_cifar10(root)
                .map_err(|e| format!("{e}\n{}", Cifar10::missing_help(dir)))?;
            return Ok(Cifar10::load(folder)?);
        }
        #[cfg(not(feature = "download"))]
        return Err(Cifar10::missing_help(dir).into());
    }
    Ok(Cifar10::load(dir)?)
}

/// Fails now, naming the folder, if results cannot be written there: not after an epoch.
fn check_writable(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let probe = dir.join(".write-check");
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&probe, b"ok"))
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| format!("cannot write results to {}: {e}", dir.display()).into())
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Under mpirun: one rank of a data-parallel run; rank 0 alone prints and writes.
    let host = from_environment()?;
    let chief = host.is_chief();
    if chief {
        check_writable(&args.out)?;
    }
    // Each rank takes its own GPU (`local_rank`); with the `nccl` feature GPUs sum their
    // gradients with NCCL, otherwise through the host (MPI).
    let device = select_device(&args.device)?;
    let comm = for_device(host, &device)?;
    let data = load_data(&args.data_dir)?;
    let train_set = data.train().subset(args.subset);
    let test_set = data.test().subset(args.test_subset);
    if chief {
        eprintln!(
            "device {:?}; {} training and {} test images; {} rank(s) ({})",
            device.location(),
            train_set.len(),
            test_set.len(),
            comm.world_size(),
            comm.backend()
        );
    }
    let normalization = match args.normalize {
        Normalize::Raw => Normalization::Raw,
        Normalize::Unit => Normalization::UnitRange,
        Normalize::Standard => Normalization::cifar10(),
    };
    let train = DataLoader::new(train_set, args.batch_size, &device)?
        .shuffle(true)
        .seed(args.seed)
        .normalization(normalization)
        .augmentation(if args.augment {
            Augmentation::standard()
        } else {
            Augmentation::default()
        })
        .workers(args.workers);
    let test =
        DataLoader::new(test_set, args.batch_size.max(256), &device)?.normalization(normalization);

    let config = ResNetConfig::default()
        .stages(args.stages.clone())
        .width_divisor(args.width_divisor);
    let models: Vec<Model> = match args.model {
        Which::Resnet => vec![config.res_net()?],
        Which::Plain => vec![config.plain_net()?],
        Which::Both => vec![config.res_net()?, config.plain_net()?],
    };
    let schedule = args.schedule;
    let mut results = Vec::new();
    for model in models {
        let name = model.name().to_string();
        let dir = args.out.join(&name);
        let model = model.build(&device, DType::F32, args.seed)?;
        if chief {
            check_writable(&dir)?;
            std::fs::write(dir.join("summary.txt"), model.summary())?;
            let counts = model.count_params();
            eprintln!(
                "{name}: {} parameters ({} trainable)",
                counts.total, counts.trainable
            );
        }

        let loss = Loss::SparseCategoricalCrossentropy { from_logits: false };
        let progress = if args.quiet {
            Progress::Lines
        } else {
            Progress::Bar
        };
        let mut trainer = Trainer::new(model, optimizer(&args), loss)?
            .schedule(schedule)
            .progress(progress)
            .distributed(comm.clone());
        let checkpoint = ModelCheckpoint::new(&dir);
        if args.resume && checkpoint.last_path().is_file() {
            trainer.load_checkpoint(checkpoint.last_path())?;
            // The seed also shuffles and augments the data: another one would not continue
            // the run.
            let saved = trainer.model().seed();
            if saved != args.seed {
                return Err(format!(
                    "{}: written by a run with --seed {saved}, this one has --seed {}: resume with the same seed",
                    checkpoint.last_path().display(),
                    args.seed
                )
                .into());
            }
            if chief {
                eprintln!("{name}: resumed after epoch {}", trainer.epochs_done());
            }
        }
        let mut callbacks: Vec<Box<dyn Callback>> = vec![
            Box::new(checkpoint),
            Box::new(
                HistoryLogger::new()
                    .json(dir.join("history.json"))
                    .csv(dir.join("history.csv")),
            ),
        ];
        trainer.fit(&train, Some(&test), args.epochs, &mut callbacks)?;
        let history = trainer.history().clone();
        if chief {
            trainer
                .model()
                .save_weights(dir.join("weights.safetensors"))?;
            plot::draw_curves(
                &dir.join("curves.png"),
                &name,
                &[(name.clone(), history.clone())],
            )?;
            eprintln!("{name}: wrote {}", dir.display());
        }
        results.push((name, history));
    }
    if !chief {
        return Ok(());
    }

    if results.len() > 1 {
        plot::draw_curves(
            &args.out.join("comparison.png"),
            "ResNet vs PlainNet on CIFAR-10",
            &results,
        )?;
        let table = comparison_table(&results);
        std::fs::write(args.out.join("comparison.md"), &table)?;
        println!("{table}");
    } else if let Some((name, h)) = results.first()
        && let Some(last) = h.last()
    {
        println!(
            "{name}: final val_accuracy {:.4}",
            last.metric("val_accuracy").unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

/// The article's comparison: final and best validation accuracy, and the gap in points.
fn comparison_table(results: &[(String, candle_functional::train::History)]) -> String {
    let mut out = String::from(
        "| model | epochs | final train acc | final val acc | best val acc | mean epoch s | data wait |\n|---|---|---|---|---|---|---|\n",
    );
    let mut finals = Vec::new();
    for (name, h) in results {
        let last = h.last();
        let val = last
            .and_then(|e| e.metric("val_accuracy"))
            .unwrap_or(f64::NAN);
        let best = h
            .epochs()
            .iter()
            .filter_map(|e| e.metric("val_accuracy"))
            .fold(f64::NAN, f64::max);
        let total: f64 = h.epochs().iter().map(|e| e.seconds).sum();
        let secs = total / h.epochs().len().max(1) as f64;
        // The share of training time spent waiting for the next batch.
        let wait = h.epochs().iter().map(|e| e.data_wait_seconds).sum::<f64>() / total;
        out.push_str(&format!(
            "| {name} | {} | {:.4} | {val:.4} | {best:.4} | {secs:.1} | {:.2}% |\n",
            h.epochs().len(),
            last.and_then(|e| e.metric("accuracy")).unwrap_or(f64::NAN),
            100.0 * wait,
        ));
        finals.push(val);
    }
    if finals.len() == 2 {
        out.push_str(&format!(
            "\n{} - {}: {:+.2} points of final validation accuracy\n",
            results[0].0,
            results[1].0,
            100.0 * (finals[0] - finals[1])
        ));
    }
    out
}

//! A U-Net for semantic segmentation, trained with `fit` on synthetic shapes: every image
//! holds a disc and a square on a noisy background, and the target is a class per pixel
//! (0 background, 1 disc, 2 square). The skips are `Concatenate` layers from the encoder to
//! the decoder, `UpSampling2D` doubles the decoder's resolution, and the loss is a per-pixel
//! sparse categorical cross-entropy. Reports per-pixel accuracy and mean
//! IoU on held-out images and writes a PNG: inputs, true masks, predicted masks.
//!
//! ```text
//! cargo run --release --example segmentation -- --quick       # under a minute on 2 cores
//! cargo run --release --example segmentation -- --out masks.png
//! ```

#[path = "common/allocator.rs"]
mod allocator;
#[path = "common/unet.rs"]
mod unet;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_functional::data::TensorDataset;
use candle_functional::prelude::*;
use candle_functional::train::{Accuracy, AdamConfig, Loss, MeanIoU, Progress, Trainer};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Train a small U-Net on synthetic shapes.
#[derive(Parser, Debug)]
struct Args {
    /// A short run (fewer images and epochs).
    #[arg(long)]
    quick: bool,
    /// Training images.
    #[arg(long, default_value_t = 1024)]
    images: usize,
    #[arg(long, default_value_t = 12)]
    epochs: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the picture of inputs, true and predicted masks.
    #[arg(long, default_value = "segmentation.png")]
    out: PathBuf,
}

const SIZE: usize = 32;
const CLASSES: usize = 3;

/// `n` images (N, 3, 32, 32) in [0, 1] and their masks (N, 32, 32): a disc and a square each,
/// in random colours, positions and sizes, on a noisy background.
fn shapes(n: usize, seed: u64, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pixels = vec![0f32; n * 3 * SIZE * SIZE];
    let mut masks = vec![0u32; n * SIZE * SIZE];
    for i in 0..n {
        let image = &mut pixels[i * 3 * SIZE * SIZE..][..3 * SIZE * SIZE];
        for v in image.iter_mut() {
            *v = rng.random_range(0.0..0.35);
        }
        let mask = &mut masks[i * SIZE * SIZE..][..SIZE * SIZE];
        // The square first, then the disc, which may cover part of it.
        let side = rng.random_range(6..14);
        let (sy, sx) = (
            rng.random_range(0..SIZE - side),
            rng.random_range(0..SIZE - side),
        );
        let r = rng.random_range(4.0..8.0f32);
        let (cy, cx) = (
            rng.random_range(r..SIZE as f32 - r),
            rng.random_range(r..SIZE as f32 - r),
        );
        for (class, colour) in [
            (2u32, rng.random::<[f32; 3]>()),
            (1, rng.random::<[f32; 3]>()),
        ] {
            for y in 0..SIZE {
                for x in 0..SIZE {
                    let inside = if class == 2 {
                        (sy..sy + side).contains(&y) && (sx..sx + side).contains(&x)
                    } else {
                        (y as f32 + 0.5 - cy).powi(2) + (x as f32 + 0.5 - cx).powi(2) <= r * r
                    };
                    if inside {
                        mask[y * SIZE + x] = class;
                        for (c, value) in colour.iter().enumerate() {
                            image[(c * SIZE + y) * SIZE + x] = 0.35 + 0.65 * value;
                        }
                    }
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(pixels, (n, 3, SIZE, SIZE), device)?,
        Tensor::from_vec(masks, (n, SIZE, SIZE), device)?,
    ))
}

/// One row per sample: the input, the true mask, the predicted mask, each scaled 4×.
fn write_png(path: &PathBuf, images: &Tensor, truth: &Tensor, predicted: &Tensor) -> Result<()> {
    const SCALE: usize = 4;
    const PALETTE: [[u8; 3]; CLASSES] = [[20, 20, 20], [230, 160, 30], [40, 140, 230]];
    let rows = images.dim(0)?;
    let (tile, gap) = (SIZE * SCALE, 4);
    let (width, height) = (3 * tile + 2 * gap, rows * tile + (rows - 1) * gap);
    let mut canvas = image::RgbImage::from_pixel(width as u32, height as u32, image::Rgb([255; 3]));
    for row in 0..rows {
        let img = images.get(row)?.to_vec3::<f32>()?;
        let masks = [
            truth.get(row)?.to_vec2::<u32>()?,
            predicted.get(row)?.to_vec2::<u32>()?,
        ];
        for y in 0..tile {
            for x in 0..tile {
                let (py, px) = (y / SCALE, x / SCALE);
                let top = (row * (tile + gap) + y) as u32;
                let colour = |c: usize| (img[c][py][px].clamp(0.0, 1.0) * 255.0) as u8;
                canvas.put_pixel(x as u32, top, image::Rgb([colour(0), colour(1), colour(2)]));
                for (column, mask) in masks.iter().enumerate() {
                    let left = ((column + 1) * (tile + gap) + x) as u32;
                    let class = (mask[py][px] as usize).min(CLASSES - 1);
                    canvas.put_pixel(left, top, image::Rgb(PALETTE[class]));
                }
            }
        }
    }
    canvas
        .save(path)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    allocator::keep_freed_memory();
    let mut args = Args::parse();
    if args.quick {
        args.images = args.images.min(320);
        args.epochs = args.epochs.min(4);
    }
    let device = Device::Cpu;
    let (train_x, train_y) = shapes(args.images, args.seed, &device)?;
    let (val_x, val_y) = shapes(128, args.seed + 1, &device)?;
    let train = TensorDataset::new(vec![train_x], vec![train_y], args.batch_size)?
        .shuffle(true)
        .seed(args.seed);
    let validation = TensorDataset::new(vec![val_x.clone()], vec![val_y.clone()], 64)?;

    let model = unet::u_net(SIZE, CLASSES, 16)?.build(&device, DType::F32, args.seed)?;
    println!("{}", model.summary());
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut trainer = Trainer::new(
        model.clone(),
        AdamConfig {
            learning_rate: 3e-3,
            ..Default::default()
        },
        loss,
    )?
    .metrics(
        0,
        vec![
            Box::new(Accuracy::sparse()),
            Box::new(MeanIoU::new(CLASSES)),
        ],
    )?
    .progress(Progress::Lines);
    trainer.fit(&train, Some(&validation), args.epochs, &mut [])?;
    let scores = trainer.evaluate(&validation)?;
    println!(
        "held-out images: per-pixel accuracy {:.4}, mean IoU {:.4}",
        scores.metric("accuracy").unwrap_or(f64::NAN),
        scores.metric("mean_iou").unwrap_or(f64::NAN)
    );

    let shown = 6;
    let logits = model
        .forward(&[val_x.narrow(0, 0, shown)?], Mode::Eval)?
        .remove(0);
    let predicted = logits.argmax(1)?;
    write_png(
        &args.out,
        &val_x.narrow(0, 0, shown)?,
        &val_y.narrow(0, 0, shown)?,
        &predicted,
    )?;
    println!("wrote {}", args.out.display());
    Ok(())
}

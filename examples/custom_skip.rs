//! Skip connections beyond the article: a DenseNet-style block (each layer sees the
//! concatenation of all earlier feature maps) and a two-input model (an image and a metadata
//! vector). Builds both, prints their summaries, and trains each with `Trainer::fit` for a few
//! epochs on a small random set (a `TensorDataset` of one or two input tensors), to show
//! gradients flowing through the concatenation skips: the training loss goes down.
//!
//! ```text
//! cargo run --release --example custom_skip
//! ```

use candle_core::{DType, Device, Tensor};
use candle_functional::data::TensorDataset;
use candle_functional::prelude::*;
use candle_functional::train::{AdamConfig, Loss, Progress, Trainer};

/// BatchNorm → ReLU → Conv 3x3 producing `growth` new channels, concatenated to the input.
fn dense_layer(x: &SymbolicTensor, growth: usize) -> Result<SymbolicTensor> {
    let y = BatchNorm::new().call(x)?;
    let y = ReLU::new().call(&y)?;
    let y = Conv2D::new(growth, 3).padding(Padding::Same).call(&y)?;
    Concatenate::new(1).call_many(&[x.clone(), y])
}

fn dense_net(classes: usize) -> Result<Model> {
    let inputs = Input::named("image", [3, 32, 32]);
    let mut x = Conv2D::new(16, 3).padding(Padding::Same).call(&inputs)?;
    for _ in 0..3 {
        x = dense_layer(&x, 12)?; // 16 -> 28 -> 40 -> 52 channels
    }
    // Transition: 1x1 conv and pooling, then global pooling and the classifier.
    let x = Conv2D::new(32, 1).call(&x)?;
    let x = AveragePooling2D::new(2).call(&x)?;
    let x = GlobalAveragePooling2D::new().call(&x)?;
    let out = Dense::new(classes).call(&x)?;
    Ok(Model::new(&[inputs], &[out])?.named("dense_net"))
}

fn two_input_model(classes: usize) -> Result<Model> {
    let image = Input::named("image", [3, 32, 32]);
    let meta = Input::named("metadata", [8]);
    let x = Conv2D::new(16, 3)
        .strides(2)
        .padding(Padding::Same)
        .activation(ActivationFn::Relu)
        .call(&image)?;
    let x = GlobalAveragePooling2D::new().call(&x)?;
    let m = Dense::new(16).activation(ActivationFn::Relu).call(&meta)?;
    let joined = Concatenate::new(1).call_many(&[x, m])?;
    let out = Dense::new(classes).call(&joined)?;
    Ok(Model::new(&[image, meta], &[out])?.named("image_and_metadata"))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let samples = 32;
    let labels: Vec<u32> = (0..samples as u32).map(|i| i % 10).collect();
    let labels = Tensor::from_vec(labels, samples, &device)?;
    let images = Tensor::randn(0f32, 1.0, (samples, 3, 32, 32), &device)?;
    let meta = Tensor::randn(0f32, 1.0, (samples, 8), &device)?;

    let dense = dense_net(10)?.build(&device, DType::F32, 0)?;
    println!("{}", dense.summary());
    let data = TensorDataset::new(vec![images.clone()], vec![labels.clone()], 8)?.shuffle(true);
    train(dense, &data)?;

    let two = two_input_model(10)?.build(&device, DType::F32, 0)?;
    println!("{}", two.summary());
    let data = TensorDataset::new(vec![images, meta], vec![labels], 8)?.shuffle(true);
    train(two, &data)?;
    Ok(())
}

/// A few epochs of Adam with `fit`; the training loss goes down.
fn train(
    model: Model,
    data: &TensorDataset,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let name = model.name().to_string();
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut trainer = Trainer::new(model, AdamConfig::default(), loss)?.progress(Progress::Lines);
    let history = trainer.fit(data, None, 5, &mut [])?;
    let (first, last) = (&history.epochs()[0], history.last().expect("five epochs"));
    println!(
        "{name}: loss {:.4} -> {:.4}, accuracy {:.2} -> {:.2}\n",
        first.loss,
        last.loss,
        first.metric("accuracy").unwrap_or(f64::NAN),
        last.metric("accuracy").unwrap_or(f64::NAN)
    );
    Ok(())
}

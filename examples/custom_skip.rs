//! Skip connections beyond the article: a DenseNet-style block (each layer sees the
//! concatenation of all earlier feature maps) and a two-input model (an image and a metadata
//! vector). Builds both, prints their summaries, and runs a training step on random data to
//! show gradients flowing through the concatenation skips.
//!
//! ```text
//! cargo run --release --example custom_skip
//! ```

use candle_core::{D, DType, Device, Tensor};
use candle_functional::prelude::*;
use candle_nn::Optimizer;

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
    let batch = 8;
    let labels = Tensor::arange(0u32, batch as u32, &device)?;

    let dense = dense_net(10)?.build(&device, DType::F32, 0)?;
    println!("{}", dense.summary());
    let images = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &device)?;
    train_steps(&dense, std::slice::from_ref(&images), &labels)?;

    let two = two_input_model(10)?.build(&device, DType::F32, 0)?;
    println!("{}", two.summary());
    let meta = Tensor::randn(0f32, 1.0, (batch, 8), &device)?;
    train_steps(&two, &[images, meta], &labels)?;
    Ok(())
}

/// A few SGD steps on one batch; the loss goes down.
fn train_steps(
    model: &Model,
    inputs: &[Tensor],
    labels: &Tensor,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let mut sgd = candle_nn::SGD::new(model.trainable_vars()?, 0.05)?;
    for step in 0..5 {
        let logits = model.forward(inputs, Mode::Train)?.remove(0);
        let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
        sgd.backward_step(&loss)?;
        let accuracy = logits
            .argmax(D::Minus1)?
            .eq(labels)?
            .to_dtype(DType::F32)?
            .mean_all()?;
        println!(
            "{}: step {step} loss {:.4} accuracy {:.2}",
            model.name(),
            loss.to_scalar::<f32>()?,
            accuracy.to_scalar::<f32>()?
        );
    }
    println!();
    Ok(())
}

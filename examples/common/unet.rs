//! The small U-Net of the segmentation example (`examples/segmentation.rs`), shared with the
//! benchmark (`examples/bench.rs --model unet`): two encoder stages with Conv → BatchNorm →
//! ReLU blocks and max pooling, a bottom block, and a decoder that upsamples and concatenates
//! the encoder's maps (the skips) before each block; a 1x1 convolution gives per-pixel logits.

use candle_functional::prelude::*;

/// Conv 3×3 → BatchNorm → ReLU. The BatchNorm momentum is 0.9, not Keras's 0.99: a run of a
/// few hundred steps must bring the moving statistics (which held-out images are scored
/// with) close to the data's.
fn conv_bn_relu(x: &SymbolicTensor, filters: usize) -> Result<SymbolicTensor> {
    let y = Conv2D::new(filters, 3).padding(Padding::Same).call(x)?;
    let y = BatchNorm::new().momentum(0.9).call(&y)?;
    ReLU::new().call(&y)
}

/// The U-Net on `size`×`size` RGB images, `classes` logits per pixel; `width` filters in the
/// first stage (16 in the example), doubled at each stage down.
pub fn u_net(size: usize, classes: usize, width: usize) -> Result<Model> {
    let image = Input::named("image", [3, size, size]);
    let s1 = conv_bn_relu(&conv_bn_relu(&image, width)?, width)?;
    let down = MaxPooling2D::new(2).call(&s1)?;
    let s2 = conv_bn_relu(&conv_bn_relu(&down, 2 * width)?, 2 * width)?;
    let down = MaxPooling2D::new(2).call(&s2)?;
    let bottom = conv_bn_relu(&down, 4 * width)?;
    let up = UpSampling2D::new(2).call(&bottom)?;
    let up = conv_bn_relu(&Concatenate::new(1).call_many(&[up, s2])?, 2 * width)?;
    let up = UpSampling2D::new(2).call(&up)?;
    let up = conv_bn_relu(&Concatenate::new(1).call_many(&[up, s1])?, width)?;
    let mask = Conv2D::new(classes, 1).name("mask").call(&up)?; // per-pixel logits
    Ok(Model::new(&[image], &[mask])?.named("u_net"))
}

//! # candle-functional
//!
//! Keras's functional API on Hugging Face's [candle](https://github.com/huggingface/candle):
//! symbolic [`Input`]s, layers called as functions on them, a [`Model`] made from the
//! resulting graph, and the ResNet helpers of "Building a ResNet in Keras".
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_functional::prelude::*;
//!
//! fn relu_bn(x: &SymbolicTensor) -> Result<SymbolicTensor> {
//!     BatchNorm::default().call(&ReLU::new().call(x)?)
//! }
//!
//! let inputs = Input::new([3, 32, 32]); // NCHW, batch left open
//! let t = Conv2D::new(64, 3).padding(Padding::Same).call(&inputs)?;
//! let out = Add::new().call_many(&[t.clone(), relu_bn(&t)?])?;
//! let model = Model::new(&[inputs], &[out])?.build(&Device::Cpu, DType::F32, 42)?;
//! assert!(model.summary().contains("Total params"));
//!
//! let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu)?;
//! let y = model.forward(&[x], Mode::Train)?;
//! assert_eq!(y[0].dims(), &[2, 64, 32, 32]);
//! # Ok::<(), candle_functional::Error>(())
//! ```
//!
//! Tensors are NCHW. Shapes are checked when the graph is built: a wrong graph fails on the
//! line that calls the layer, with an [`Error`] naming the layer and both shapes.
//!
//! | module | what is in it |
//! |---|---|
//! | [`fusion`] | the element-wise functions a kernel applies before or after its op, from the plan down to the kernels |
//! | [`graph`] | `Input`, `SymbolicTensor`, the `Layer` trait, `LayerOp` and `Params` for custom layers, initializers |
//! | [`layers`] | the built-in layers and their configs, padding |
//! | [`models`] | `Model` (build, forward, summary, weights) and the article's ResNet helpers |
//! | [`train`] | `Trainer` (fit, evaluate, predict, checkpoints) for any inputs and outputs, losses, metrics, optimizers, schedules, callbacks |
//! | [`data`] | the `Dataset` trait, tensor datasets, image folders, the CIFAR-10 reader and batch loader |
//! | [`ops`] | the kernels and the one place that picks a backend: convolution, batch norm, bias (GEMM on CPU, cuDNN on CUDA, candle's ops elsewhere), the multi-tensor end of a training step |
//! | [`profile`] | counts that predict GPU speed on any device: tensor buffers and bytes a step allocates (with [`profile::CountingAllocator`]), reads back to the host |
//!
//! Features: `cuda`, `cudnn` (candle's CUDA backend; cuDNN convolutions and batch norm
//! forward and backward), `download` (fetch CIFAR-10). [`select_device`] picks a device.

#![warn(missing_docs)]

pub mod data;
mod device;
pub mod distributed;
mod error;
pub mod fusion;
pub mod graph;
pub mod layers;
pub mod models;
pub mod ops;
pub mod profile;
mod support;
pub mod train;

pub use device::{keep_freed_gpu_memory, select_device};
pub use error::{Error, Result};
pub use fusion::{ElementWise, Fusion};
pub use graph::{
    Configured, Initializer, Input, IntoLayer, Layer, LayerOp, LayerRef, Mode, ParamSpec, Params,
    Regularizer, ReplicaSum, StateUpdates, SymbolicTensor,
};
pub use models::{LayerRegistry, Model, NamedWeight, ParamCounts, Sequential};

/// Everything needed to write a model: `use candle_functional::prelude::*;`.
pub mod prelude {
    pub use crate::graph::{Input, IntoLayer, Layer, Mode, SymbolicTensor};
    pub use crate::layers::{
        Activation, ActivationFn, Add, Average, AveragePooling2D, BatchNorm, CenterCrop,
        Concatenate, Conv2D, Conv2DTranspose, Cropping2D, Dense, DepthwiseConv2D, Dropout,
        Embedding, FillMode, Flatten, FlipMode, GlobalAveragePooling2D, GlobalMaxPooling2D,
        Initializer, Interpolation, Lambda, LayerNormalization, MaxPooling2D, Maximum, Minimum,
        Multiply, Padding, Permute, RandomContrast, RandomCrop, RandomFlip, RandomRotation,
        RandomTranslation, RandomZoom, ReLU, Rescaling, Reshape, Resizing, SeparableConv2D,
        Softmax, Subtract, UpSampling2D, ZeroPadding2D,
    };
    pub use crate::models::{Model, ResNetConfig, Sequential};
    pub use crate::{Error, Result};
}

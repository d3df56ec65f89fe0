//! The built-in layers, one file per layer or family, each a config struct (with Keras's
//! defaults in `Default`) that implements [`LayerOp`](crate::LayerOp), exposed as a
//! [`Configured`](crate::Configured) alias with a small constructor and builder methods.
//!
//! A layer file holds everything about its layers: config, shape rule, parameters, forward,
//! and at its end a `KINDS` list (`kind.rs`): the name saved files use, the Keras classes that
//! import as it (`keras.rs`) and a small example. `builtin_kinds` lists every file's
//! `KINDS`; the registry of `Model::load` and the Keras importer are both made from it.

pub(crate) mod activation;
pub(crate) mod batch_norm;
pub(crate) mod concatenate;
pub(crate) mod conv;
pub(crate) mod conv_transpose;
pub(crate) mod dense;
pub(crate) mod depthwise;
pub(crate) mod dropout;
pub(crate) mod embedding;
pub(crate) mod image_transform;
pub(crate) mod keras;
pub(crate) mod kind;
pub(crate) mod lambda;
pub(crate) mod layer_norm;
pub(crate) mod merge;
pub(crate) mod native_backward;
pub(crate) mod normalization;
pub(crate) mod padding;
pub(crate) mod pooling;
pub(crate) mod random_contrast;
pub(crate) mod random_crop;
pub(crate) mod random_flip;
pub(crate) mod random_rotation;
pub(crate) mod random_translation;
pub(crate) mod random_zoom;
pub(crate) mod rescaling;
pub(crate) mod reshape;
pub(crate) mod resizing;
pub(crate) mod upsampling;
pub(crate) mod window_builders;

/// Initializers belong to the graph floor (a [`ParamSpec`](crate::ParamSpec) names one); they
/// are re-exported here, beside the layers whose configs take them.
pub use crate::graph::Initializer;
pub use activation::{
    Activation, ActivationConfig, ActivationFn, ReLU, ReLUConfig, Softmax, SoftmaxConfig,
};
pub use batch_norm::{BatchNorm, BatchNormConfig};
pub use concatenate::{Concatenate, ConcatenateConfig};
pub use conv::{Conv2D, Conv2DConfig};
pub use conv_transpose::{Conv2DTranspose, Conv2DTransposeConfig};
pub use dense::{Dense, DenseConfig};
pub use depthwise::{
    DepthwiseConv2D, DepthwiseConv2DConfig, SeparableConv2D, SeparableConv2DConfig,
};
pub use dropout::{Dropout, DropoutConfig};
pub use embedding::{Embedding, EmbeddingConfig};
pub use image_transform::{
    AffineTransform, FillMode, Interpolation, Resampled, Resampling, affine_transform,
};
pub use lambda::{Lambda, LambdaConfig};
pub use layer_norm::{LayerNormalization, LayerNormalizationConfig};
pub use merge::{
    Add, AddConfig, Average, AverageConfig, Maximum, MaximumConfig, Minimum, MinimumConfig,
    Multiply, MultiplyConfig, Subtract, SubtractConfig,
};
pub use normalization::{Normalization, NormalizationConfig};
pub use padding::{
    Padding, channel_axis, expect_chw, expect_positive, non_batch_axis, one_input, same_padding,
    window_output_len,
};
pub use pooling::{
    AveragePooling2D, AveragePooling2DConfig, GlobalAveragePooling2D, GlobalAveragePooling2DConfig,
    GlobalMaxPooling2D, GlobalMaxPooling2DConfig, MaxPooling2D, MaxPooling2DConfig, Pool2DConfig,
};
pub use random_contrast::{RandomContrast, RandomContrastConfig};
pub use random_crop::{RandomCrop, RandomCropConfig};
pub use random_flip::{FlipMode, RandomFlip, RandomFlipConfig};
pub use random_rotation::{RandomRotation, RandomRotationConfig};
pub use random_translation::{RandomTranslation, RandomTranslationConfig};
pub use random_zoom::{RandomZoom, RandomZoomConfig};
pub use rescaling::{Rescaling, RescalingConfig};
pub use reshape::{
    Cropping2D, Cropping2DConfig, Flatten, FlattenConfig, Permute, PermuteConfig, Reshape,
    ReshapeConfig, ZeroPadding2D, ZeroPadding2DConfig,
};
pub use resizing::{CenterCrop, CenterCropConfig, Resizing, ResizingConfig};
pub use upsampling::{UpSampling2D, UpSampling2DConfig};

use kind::LayerKind;

/// Every layer file's `KINDS`: the one list the registry of `Model::load` and the Keras
/// importer read. A new layer file adds its `KINDS` here; `Lambda` holds a closure and cannot
/// be saved, so it has none (the test `models::every_layer` checks that nothing else is
/// missing).
const BUILTIN_KINDS: &[&[LayerKind]] = &[
    activation::KINDS,
    batch_norm::KINDS,
    concatenate::KINDS,
    conv::KINDS,
    conv_transpose::KINDS,
    dense::KINDS,
    depthwise::KINDS,
    dropout::KINDS,
    embedding::KINDS,
    layer_norm::KINDS,
    merge::KINDS,
    pooling::KINDS,
    normalization::KINDS,
    random_contrast::KINDS,
    random_crop::KINDS,
    random_flip::KINDS,
    random_rotation::KINDS,
    random_translation::KINDS,
    random_zoom::KINDS,
    rescaling::KINDS,
    reshape::KINDS,
    resizing::KINDS,
    upsampling::KINDS,
];

/// Every saveable built-in layer kind, file by file.
pub(crate) fn builtin_kinds() -> impl Iterator<Item = &'static LayerKind> {
    BUILTIN_KINDS.iter().flat_map(|kinds| kinds.iter())
}

/// `t` in NCHW: a tensor a layer handed over in oneDNN's blocked layout (feature `onednn`, in
/// inference: rank 5, `models/inference.rs`) as the NCHW tensor it holds; any other tensor
/// as it is. What a layer that reads only NCHW is given.
#[cfg(feature = "onednn")]
pub(crate) fn nchw(t: &candle_core::Tensor) -> crate::Result<candle_core::Tensor> {
    Ok(crate::ops::onednn::to_nchw(t)?)
}

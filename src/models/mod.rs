//! Models: [`Model`] (graph, build, forward, summary, weights), [`Sequential`] and the
//! article's networks.

pub(crate) mod architecture;
#[cfg(test)]
mod every_layer;
pub(crate) mod inference;
#[cfg(feature = "keras")]
pub(crate) mod keras_import;
pub(crate) mod model;
pub(crate) mod model_layer;
pub(crate) mod nesting;
pub(crate) mod plot;
pub(crate) mod resnet;
pub(crate) mod sequential;
pub(crate) mod summary;
pub(crate) mod weights;

pub use architecture::{FORMAT_VERSION, LayerRegistry};
pub use model::{Model, NamedWeight, ParamCounts};
pub use model_layer::ModelLayer;
pub use plot::PlotOptions;
pub use resnet::{
    ResNetConfig, create_plain_net, create_res_net, he_residual_block, plain_block, relu_bn,
    residual_block,
};
pub use sequential::Sequential;

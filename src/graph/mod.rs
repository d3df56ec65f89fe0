//! The symbolic graph, the bottom floor of the crate: [`Input`], [`SymbolicTensor`], the
//! [`Layer`] trait that records calls, [`LayerOp`] (what a kind of layer does), weights'
//! descriptions and initializers, and the plan that runs a graph. It imports nothing from the
//! layers, models, training or data floors above it.

pub(crate) mod init;
pub(crate) mod layer;
pub(crate) mod plan;
pub(crate) mod symbolic;

pub use init::Initializer;
pub use layer::{
    Configured, IntoLayer, Layer, LayerOp, LayerRef, Mode, ParamSpec, Params, Prologue,
    StateUpdates,
};
pub use symbolic::{Input, SymbolicTensor};

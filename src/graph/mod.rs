//! The symbolic graph, the floor above the crate's bottom: [`Input`], [`SymbolicTensor`], the
//! [`Layer`] trait that records calls, [`LayerOp`] (what a kind of layer does), weights'
//! descriptions and initializers, and the plan that runs a graph. It imports nothing from the
//! ops, layers, models, training or data floors above it.
//!
//! One file per concern, each importing only the ones listed before it:
//!
//! | file | what is in it |
//! |---|---|
//! | `init.rs` | [`ParamSpec`] (a weight before it exists) and its [`Initializer`] |
//! | `params.rs` | [`Mode`], [`Params`] (a forward pass's weights by name), [`StateUpdates`] |
//! | `weight_check.rs` | the check of given weights against expected names, shapes, dtypes |
//! | `op.rs` | [`LayerOp`] (shape rule, weights, forward, fusion hooks) and [`LayerRef`] (one layer's identity, name and weights), which refer to each other; the walk over weight holders |
//! | `symbolic.rs` | [`Input`], [`SymbolicTensor`], the nodes that calls record |
//! | `layer.rs` | [`Layer`] (`call`), [`Configured`], [`IntoLayer`] |
//! | `plan.rs` | the plan made once per model (order, names, slots, fusion) and its executor |

pub(crate) mod init;
pub(crate) mod layer;
pub(crate) mod op;
pub(crate) mod params;
pub(crate) mod plan;
pub(crate) mod regularizer;
pub(crate) mod symbolic;
pub(crate) mod weight_check;

pub use init::{Initializer, ParamSpec};
pub use layer::{Configured, IntoLayer, Layer};
pub use op::{LayerOp, LayerRef};
pub use params::{Mode, Params, ReplicaSum, StateUpdates};
pub use regularizer::Regularizer;
pub use symbolic::{Input, SymbolicTensor};

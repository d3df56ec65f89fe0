//! The symbolic graph: [`Input`], [`SymbolicTensor`], the [`Layer`] trait that records calls,
//! and the plan a [`Model`](crate::Model) runs.

pub(crate) mod layer;
pub(crate) mod plan;
pub(crate) mod symbolic;

pub use layer::{Configured, Layer, LayerOp, LayerRef, Mode, ParamSpec, Params};
pub use symbolic::{Input, SymbolicTensor};

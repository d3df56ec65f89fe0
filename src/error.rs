//! The crate's one error type.
//!
//! Every fallible function of the crate returns [`Result`], whose error is [`Error`]. Graph
//! errors are raised while a graph is being built (when a layer is called on symbolic tensors,
//! or when a [`Model`](crate::Model) is made from them), never later in the middle of training,
//! and they name the layer and the shapes involved.

use std::path::PathBuf;

/// Shorthand for `std::result::Result<T, candle_functional::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in this crate.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
///
/// let a = Input::new([8, 4, 4]);
/// let b = Input::new([16, 4, 4]);
/// let err = Add::new().call_many(&[a, b]).unwrap_err();
/// assert!(matches!(err, Error::ShapeMismatch { .. }));
/// assert!(err.to_string().contains("[8, 4, 4]"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two shapes that must agree do not. Shapes are per sample (the batch dimension left out).
    #[error("layer `{layer}`: {what}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The layer being called.
        layer: String,
        /// What was being compared.
        what: String,
        /// The shape the layer expected.
        expected: Vec<usize>,
        /// The shape it was given.
        got: Vec<usize>,
    },

    /// A layer was called on inputs it cannot take (wrong count, wrong rank, bad axis, ...).
    #[error("layer `{layer}`: {message}")]
    InvalidInput {
        /// The layer being called.
        layer: String,
        /// What is wrong.
        message: String,
    },

    /// A layer's configuration is invalid (zero filters, a stride of 0, ...).
    #[error("layer `{layer}`: invalid configuration: {message}")]
    InvalidConfig {
        /// The layer being configured.
        layer: String,
        /// What is wrong.
        message: String,
    },

    /// An output of the model depends on an `Input` that was not given to [`Model::new`](crate::Model::new).
    #[error(
        "graph disconnected: layer `{layer}` needs input `{input}`, which is not among the model's inputs"
    )]
    GraphDisconnected {
        /// The layer whose input cannot be computed.
        layer: String,
        /// The input that is missing.
        input: String,
    },

    /// An input given to [`Model::new`](crate::Model::new) does not reach any output.
    #[error("input `{input}` is not used by any output of the model")]
    UnusedInput {
        /// The unused input.
        input: String,
    },

    /// The same tensor was given twice as a model input.
    #[error("input `{input}` is given more than once")]
    DuplicateInput {
        /// The repeated input.
        input: String,
    },

    /// Two different layers of one model have the same name.
    #[error("two different layers of the model are named `{name}`")]
    DuplicateLayerName {
        /// The name used twice.
        name: String,
    },

    /// A model was given the wrong number of tensors.
    #[error("model `{model}` expects {expected} input tensor(s), got {got}")]
    InputCount {
        /// The model.
        model: String,
        /// How many inputs the graph has.
        expected: usize,
        /// How many were given.
        got: usize,
    },

    /// A tensor given to a model does not have the shape of the graph's input.
    #[error("model `{model}`, input `{input}`: expected shape (batch, {expected:?}), got {got:?}")]
    InputShape {
        /// The model.
        model: String,
        /// The input's name.
        input: String,
        /// Per-sample shape of the input.
        expected: Vec<usize>,
        /// Full shape of the tensor given.
        got: Vec<usize>,
    },

    /// The model has no weights yet: call [`Model::build`](crate::Model::build) first.
    #[error("model `{model}` is not built: call `build` first")]
    NotBuilt {
        /// The model.
        model: String,
    },

    /// A layer's weights were needed before a model holding it was built.
    #[error("layer `{layer}` has no weights yet: build a model that holds it (`Model::build`)")]
    LayerNotBuilt {
        /// The layer.
        layer: String,
    },

    /// A layer already holds weights on another device or dtype than the one asked for.
    #[error("layer `{layer}` already holds weights on {existing}, cannot build it on {requested}")]
    DeviceMismatch {
        /// The layer.
        layer: String,
        /// Where its weights are.
        existing: String,
        /// Where they were asked for.
        requested: String,
    },

    /// A set of weights does not match the model: every problem is listed.
    #[error(
        "weights {source_name} do not match the model:{}",
        weights_report(missing, unexpected, mis_shaped, mis_typed)
    )]
    WeightsMismatch {
        /// Where the weights came from (a file name, or "map").
        source_name: Box<str>,
        /// Tensors the model needs that were not given.
        missing: Vec<String>,
        /// Tensors given that the model does not have.
        unexpected: Vec<String>,
        /// Tensors whose shape is wrong: (name, expected, got).
        mis_shaped: Vec<(String, Vec<usize>, Vec<usize>)>,
        /// Tensors of a float weight stored with a dtype it cannot be loaded from (an integer,
        /// or a packed 4-, 6- or 8-bit format): (name, stored dtype).
        mis_typed: Vec<(String, String)>,
    },

    /// A data file is malformed; the record index is given when one record is at fault.
    #[error("{}: {}{message}", path.display(), record.map(|r| format!("record {r}: ")).unwrap_or_default())]
    Data {
        /// The file.
        path: PathBuf,
        /// The faulty record, if one.
        record: Option<usize>,
        /// What is wrong.
        message: String,
    },

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A safetensors file could not be parsed or written.
    #[error("{}: safetensors: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// A kernel of [`ops`](crate::ops) was called with an argument it cannot take (a shape, a
    /// dtype, a device, or a geometry that does not fit).
    #[error("ops::{op}: argument `{argument}`: {message}")]
    InvalidOpArgument {
        /// The kernel (`conv2d`, `batch_norm_train`, ...).
        op: &'static str,
        /// The argument at fault (`x`, `kernel`, `geometry`, ...).
        argument: &'static str,
        /// What is wrong.
        message: String,
    },

    /// Training diverged: a loss or a gradient is NaN or infinite. Nothing of that step (no
    /// weight, no optimizer slot, no BatchNorm statistic) was applied.
    #[error(
        "training diverged at epoch {epoch}, step {step}: {what} is not finite; nothing of that step was applied"
    )]
    NonFinite {
        /// The epoch (1-based).
        epoch: usize,
        /// The step (1-based, within the epoch in `fit`).
        step: usize,
        /// What was not finite (`the loss`, `the gradients`, `the BatchNorm statistics`, `the
        /// updated weights or optimizer state`).
        what: String,
    },

    /// A model's architecture cannot be written: a layer has no serializable config (a
    /// [`Lambda`](crate::layers::Lambda), a custom layer without `to_config`).
    #[error("layer `{layer}` ({type_name}) cannot be saved as part of the architecture: {reason}")]
    NotSerializable {
        /// The layer's name.
        layer: String,
        /// Its type.
        type_name: String,
        /// Why, and what to do instead.
        reason: String,
    },

    /// A saved architecture (JSON config) could not be read back.
    #[error("model config{}: {message}", source_name.as_ref().map(|s| format!(" in {s}")).unwrap_or_default())]
    Config {
        /// The file it came from, if any.
        source_name: Option<String>,
        /// What is wrong, naming the layer when one is at fault.
        message: String,
    },

    /// A Keras `.keras` file could not be imported: unreadable, or it uses a layer or an
    /// option this crate does not support (named in the message).
    #[error("{}: Keras import: {message}", path.display())]
    KerasImport {
        /// The `.keras` file.
        path: std::path::PathBuf,
        /// What is wrong or unsupported, naming the layer and its class.
        message: String,
    },

    /// Data-parallel training across processes cannot go on: the ranks disagree (on the
    /// architecture, on a resumed checkpoint), or the communicator failed. Every rank
    /// returns it, so that none is left waiting in a collective call.
    #[error("distributed training, rank {rank} of {world_size}: {message}")]
    Distributed {
        /// The rank that reports it.
        rank: usize,
        /// The number of ranks.
        world_size: usize,
        /// What is wrong, naming the rank and the variable at fault where one is.
        message: String,
    },

    /// A training or data argument is out of range (learning rate, batch size, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An error from candle itself. Its message leaves out the backtrace candle attaches
    /// when `RUST_BACKTRACE` is set (about a hundred frames inside the text);
    /// [`Error::candle_backtrace`] still has it.
    #[error("{}", candle_message(.0))]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// candle's message without its backtrace (which candle puts inside `Display`).
fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_message(inner))
        }
        candle_core::Error::WithPath { inner, path } => {
            format!("{}: {}", path.display(), candle_message(inner))
        }
        other => other.to_string(),
    }
}

impl Error {
    /// The backtrace candle captured for this error (when `RUST_BACKTRACE` was set), which the
    /// message leaves out.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::Error;
    /// let err = Error::from(candle_core::Error::Msg("no".into()));
    /// assert_eq!(err.to_string(), "no");
    /// assert!(err.candle_backtrace().is_none());
    /// ```
    pub fn candle_backtrace(&self) -> Option<&std::backtrace::Backtrace> {
        let Error::Candle(e) = self else {
            return None;
        };
        let mut e: &candle_core::Error = e;
        loop {
            match e {
                candle_core::Error::WithBacktrace { backtrace, .. } => return Some(backtrace),
                candle_core::Error::Context { inner, .. }
                | candle_core::Error::WithPath { inner, .. } => e = inner,
                _ => return None,
            }
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

fn weights_report(
    missing: &[String],
    unexpected: &[String],
    mis_shaped: &[(String, Vec<usize>, Vec<usize>)],
    mis_typed: &[(String, String)],
) -> String {
    let mut out = String::new();
    if !missing.is_empty() {
        out.push_str(&format!(" missing: [{}];", missing.join(", ")));
    }
    if !unexpected.is_empty() {
        out.push_str(&format!(" unexpected: [{}];", unexpected.join(", ")));
    }
    for (name, expected, got) in mis_shaped {
        out.push_str(&format!(
            " `{name}` has shape {got:?}, expected {expected:?};"
        ));
    }
    for (name, dtype) in mis_typed {
        out.push_str(&format!(
            " `{name}` is stored as {dtype}, which a float weight cannot be loaded from;"
        ));
    }
    out.pop();
    out
}

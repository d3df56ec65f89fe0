//! Training: [`Trainer`] (`fit`, `evaluate`, `predict`, checkpoints), optimizers with Keras's
//! rules ([`Adam`], [`Sgd`]), the loss, learning-rate schedules, callbacks and the history.

pub(crate) mod callbacks;
pub(crate) mod history;
pub(crate) mod loss;
pub(crate) mod optimizer;
pub(crate) mod schedule;
pub(crate) mod trainer;

pub use callbacks::{Callback, EarlyStopping, EpochEnd, Goal, HistoryLogger, ModelCheckpoint};
pub use history::{EpochLog, History};
pub use loss::{Loss, correct_predictions};
pub use optimizer::{Adam, AdamConfig, Optimizer, OptimizerConfig, OptimizerState, Sgd, SgdConfig};
pub use schedule::LrSchedule;
pub use trainer::{Evaluation, Progress, Trainer};

//! Training: [`Trainer`] (`fit`, `evaluate`, `predict`, checkpoints) for models with any
//! inputs and outputs, optimizers with Keras's rules ([`Adam`], [`Sgd`]), losses per output
//! ([`Loss`], [`Losses`], your own [`LossFunction`]), sample and class weights, [`Metric`]s, learning-rate schedules, callbacks and the history.

pub(crate) mod callback;
pub(crate) mod callback_state;
pub(crate) mod callbacks;
pub(crate) mod checkpoint;
pub(crate) mod clipping;
pub(crate) mod compile;
pub(crate) mod data_parallel;
pub(crate) mod fit;
pub(crate) mod history;
pub(crate) mod lambda_callback;
pub(crate) mod loss;
pub(crate) mod loss_function;
pub(crate) mod metrics;
pub(crate) mod optimizer;
pub(crate) mod rate_callbacks;
pub(crate) mod schedule;
pub(crate) mod tape;
pub(crate) mod trainer;

pub use callback::{Callback, FitContext};
pub use callback_state::CallbackState;
pub use callbacks::{EarlyStopping, Goal, HistoryLogger, ModelCheckpoint};
pub use clipping::GradientClipping;
pub use compile::{BackwardPass, Evaluation, Losses, NanCheck, Progress};
pub use history::{EpochLog, History};
pub use lambda_callback::LambdaCallback;
pub use loss::{Loss, correct_predictions};
pub use loss_function::{LossFunction, OutputLoss};
pub use metrics::{Accuracy, AccuracyKind, ErrorKind, MeanError, MeanIoU, Metric, TopKAccuracy};
pub use optimizer::{
    Adam, AdamConfig, CustomOptimizer, Optimizer, OptimizerConfig, OptimizerState, Sgd, SgdConfig,
};
pub use rate_callbacks::{LearningRateScheduler, ReduceLrOnPlateau};
pub use schedule::LrSchedule;
pub use trainer::Trainer;

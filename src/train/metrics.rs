//! Metrics: values that accumulate over an epoch (`update`), report (`result`) and start over
//! (`reset`), as Keras's `keras.metrics` do. Their sums stay on the device until `result`,
//! so a training loop need not wait for them.
//!
//! Classification outputs are channels-first: the class axis is axis 1, so per-pixel outputs
//! `(batch, classes, h, w)` against labels `(batch, h, w)` work like `(batch, classes)`.

use candle_core::{DType, Tensor};

use crate::support::dtype::Cast;
use crate::train::loss::correct_predictions;
use crate::{Error, Result};

/// A value accumulated over batches.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::train::{Accuracy, Metric};
/// let mut acc = Accuracy::sparse();
/// let out = Tensor::new(&[[0.1f32, 0.9], [0.8, 0.2]], &Device::Cpu)?;
/// acc.update(&out, &Tensor::new(&[1u32, 1], &Device::Cpu)?)?;
/// assert_eq!(acc.result()?, 0.5);
/// acc.reset();
/// assert!(acc.result()?.is_nan());
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub trait Metric: Send {
    /// The name in the history (`accuracy`, `mae`, `mean_iou`, ...).
    fn name(&self) -> &str;

    /// Adds a batch: the model's output and its target.
    fn update(&mut self, outputs: &Tensor, targets: &Tensor) -> Result<()>;

    /// `true` when [`update_weighted`](Self::update_weighted) works: the metric can be one
    /// of `Trainer::weighted_metrics`. `false` by default.
    fn supports_weights(&self) -> bool {
        false
    }

    /// Adds a batch whose samples (or positions) carry weights, Keras's `weighted_metrics`:
    /// the metric becomes `sum(value · weight) / sum(weight)` over its per-sample values, the
    /// weights broadcast over any trailing axes. The default refuses: a metric that is not
    /// a mean of per-sample values (`MeanIoU`) has no weighted form.
    fn update_weighted(
        &mut self,
        _outputs: &Tensor,
        _targets: &Tensor,
        _weights: &Tensor,
    ) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "metric `{}` cannot be weighted: it is not a mean of per-sample values",
            self.name()
        )))
    }

    /// The value over every batch since the last reset (NaN before any batch).
    fn result(&self) -> Result<f64>;

    /// Starts over.
    fn reset(&mut self);

    /// A fresh copy (same settings, no data), for validation next to training.
    fn boxed_clone(&self) -> Box<dyn Metric>;
}

/// A sum kept on the device and a count kept on the host; weighted batches add their
/// weights' sum on the device.
#[derive(Clone, Debug, Default)]
struct Mean {
    sum: Option<Tensor>,
    count: f64,
    weight: Option<Tensor>,
}

impl Mean {
    fn add(&mut self, sum: Tensor, count: usize) -> Result<()> {
        // Detached: the running sum lives across steps and must not hold a step's graph.
        let sum = sum.detach().cast(DType::F64)?;
        self.sum = Some(match self.sum.take() {
            Some(s) => (s + sum)?,
            None => sum,
        });
        self.count += count as f64;
        Ok(())
    }

    /// Adds per-sample `values` weighted by `weights` (`(batch,)` or the values' shape),
    /// Keras's `Mean.update_state(values, sample_weight)`.
    fn add_weighted(&mut self, values: &Tensor, weights: &Tensor) -> Result<()> {
        let values = values.cast(DType::F32)?;
        let mut weights = weights.cast(DType::F32)?;
        if weights.dim(0)? != values.dim(0)? || weights.rank() > values.rank() {
            return Err(Error::InvalidArgument(format!(
                "weights of shape {:?} for metric values of shape {:?}",
                weights.dims(),
                values.dims()
            )));
        }
        while weights.rank() < values.rank() {
            weights = weights.unsqueeze(weights.rank())?;
        }
        let weights = weights.broadcast_as(values.shape())?;
        self.add(values.mul(&weights)?.sum_all()?, 0)?;
        let total = weights.sum_all()?.detach().cast(DType::F64)?;
        self.weight = Some(match self.weight.take() {
            Some(w) => (w + total)?,
            None => total,
        });
        Ok(())
    }

    fn value(&self) -> Result<f64> {
        let weight = match &self.weight {
            Some(w) => crate::profile::read_scalar::<f64>(w)?,
            None => 0.0,
        };
        let total = self.count + weight;
        match &self.sum {
            Some(s) if total > 0.0 => Ok(crate::profile::read_scalar::<f64>(s)? / total),
            _ => Ok(f64::NAN),
        }
    }
}

/// Each value's mean over the last axis when it has more than the batch axis (Keras's
/// `mean(…, axis=-1)` in `mae` and `binary_accuracy`).
fn per_sample(values: Tensor) -> Result<Tensor> {
    Ok(if values.rank() > 1 {
        values.mean(values.rank() - 1)?
    } else {
        values
    })
}

/// How an [`Accuracy`] compares outputs and targets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AccuracyKind {
    /// Integer labels against the arg-max over the class axis (Keras's
    /// `SparseCategoricalAccuracy`).
    Sparse,
    /// One-hot targets: arg-max against arg-max (Keras's `CategoricalAccuracy`).
    Categorical,
    /// Targets in `{0, 1}` against outputs above a threshold (Keras's `BinaryAccuracy`).
    Binary {
        /// The output value above which a prediction is 1 (0.5 for probabilities, 0 for
        /// logits).
        threshold: f64,
    },
}

/// The fraction of correct predictions.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::train::{Accuracy, Metric};
/// let mut acc = Accuracy::binary(0.5);
/// acc.update(&Tensor::new(&[0.2f32, 0.7, 0.9], &Device::Cpu)?, &Tensor::new(&[0f32, 0.0, 1.0], &Device::Cpu)?)?;
/// assert!((acc.result()? - 2.0 / 3.0).abs() < 1e-12);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Accuracy {
    kind: AccuracyKind,
    name: String,
    mean: Mean,
}

impl Accuracy {
    /// Accuracy of a given kind, named `accuracy`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Accuracy, AccuracyKind, Metric};
    /// assert_eq!(Accuracy::new(AccuracyKind::Categorical).name(), "accuracy");
    /// ```
    pub fn new(kind: AccuracyKind) -> Self {
        Self {
            kind,
            name: "accuracy".into(),
            mean: Mean::default(),
        }
    }

    /// Integer labels (Keras's `SparseCategoricalAccuracy`).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Accuracy, Metric};
    /// assert_eq!(Accuracy::sparse().name(), "accuracy");
    /// ```
    pub fn sparse() -> Self {
        Self::new(AccuracyKind::Sparse)
    }

    /// One-hot targets (Keras's `CategoricalAccuracy`).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Accuracy, Metric};
    /// assert_eq!(Accuracy::categorical().name(), "accuracy");
    /// ```
    pub fn categorical() -> Self {
        Self::new(AccuracyKind::Categorical)
    }

    /// Binary targets, outputs above `threshold` count as 1 (Keras's `BinaryAccuracy`).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Accuracy, Metric};
    /// assert_eq!(Accuracy::binary(0.5).name(), "accuracy");
    /// ```
    pub fn binary(threshold: f64) -> Self {
        Self::new(AccuracyKind::Binary { threshold })
    }

    /// Renames it (its key in the history).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{Accuracy, Metric};
    /// assert_eq!(Accuracy::sparse().named("acc").name(), "acc");
    /// ```
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl Accuracy {
    /// 1 where the prediction is right, 0 where not, per sample (or position).
    fn hits(&self, outputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let hits = match self.kind {
            AccuracyKind::Sparse => outputs.argmax(1)?.eq(&targets.cast(DType::U32)?)?,
            AccuracyKind::Categorical => outputs.argmax(1)?.eq(&targets.argmax(1)?)?,
            AccuracyKind::Binary { threshold } => {
                let predicted = outputs.cast(DType::F32)?.gt(threshold)?;
                predicted.eq(&targets.cast(DType::F32)?.gt(0.5)?)?
            }
        };
        Ok(hits.cast(DType::F32)?)
    }
}

impl Metric for Accuracy {
    fn name(&self) -> &str {
        &self.name
    }

    fn update(&mut self, outputs: &Tensor, targets: &Tensor) -> Result<()> {
        let (correct, count) = match self.kind {
            AccuracyKind::Sparse => (correct_predictions(outputs, targets)?, targets.elem_count()),
            _ => {
                let hits = self.hits(outputs, targets)?;
                (hits.sum_all()?, hits.elem_count())
            }
        };
        self.mean.add(correct, count)
    }

    fn supports_weights(&self) -> bool {
        true
    }

    fn update_weighted(
        &mut self,
        outputs: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
    ) -> Result<()> {
        let hits = self.hits(outputs, targets)?;
        let hits = match self.kind {
            AccuracyKind::Binary { .. } => per_sample(hits)?,
            _ => hits,
        };
        self.mean.add_weighted(&hits, weights)
    }

    fn result(&self) -> Result<f64> {
        self.mean.value()
    }

    fn reset(&mut self) {
        self.mean = Mean::default();
    }

    fn boxed_clone(&self) -> Box<dyn Metric> {
        let mut fresh = self.clone();
        fresh.reset();
        Box::new(fresh)
    }
}

/// The fraction of samples whose label is among the `k` highest outputs (Keras's
/// `SparseTopKCategoricalAccuracy`), named `top_{k}_accuracy`.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::train::{Metric, TopKAccuracy};
/// let mut top2 = TopKAccuracy::new(2);
/// let out = Tensor::new(&[[0.5f32, 0.3, 0.2], [0.1, 0.2, 0.7]], &Device::Cpu)?;
/// top2.update(&out, &Tensor::new(&[1u32, 0], &Device::Cpu)?)?;
/// assert_eq!(top2.result()?, 0.5);
/// assert_eq!(top2.name(), "top_2_accuracy");
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct TopKAccuracy {
    k: usize,
    name: String,
    mean: Mean,
}

impl TopKAccuracy {
    /// Top-`k` accuracy.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::TopKAccuracy;
    /// let _ = TopKAccuracy::new(5);
    /// ```
    pub fn new(k: usize) -> Self {
        Self {
            k,
            name: format!("top_{k}_accuracy"),
            mean: Mean::default(),
        }
    }
}

impl TopKAccuracy {
    /// 1 where the label is among the `k` highest outputs, per sample.
    fn hits(&self, outputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let outputs = outputs.cast(DType::F32)?;
        let labels = targets.cast(DType::U32)?.unsqueeze(1)?.contiguous()?;
        let own = outputs.gather(&labels, 1)?;
        // Outputs strictly above the label's own: fewer than k means it is in the top k.
        let above = outputs.broadcast_gt(&own)?.cast(DType::F32)?.sum(1)?;
        Ok(above.lt(self.k as f64)?.cast(DType::F32)?)
    }
}

impl Metric for TopKAccuracy {
    fn name(&self) -> &str {
        &self.name
    }

    fn update(&mut self, outputs: &Tensor, targets: &Tensor) -> Result<()> {
        let hits = self.hits(outputs, targets)?;
        self.mean.add(hits.sum_all()?, hits.elem_count())
    }

    fn supports_weights(&self) -> bool {
        true
    }

    fn update_weighted(
        &mut self,
        outputs: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
    ) -> Result<()> {
        let hits = self.hits(outputs, targets)?;
        self.mean.add_weighted(&hits, weights)
    }

    fn result(&self) -> Result<f64> {
        self.mean.value()
    }

    fn reset(&mut self) {
        self.mean = Mean::default();
    }

    fn boxed_clone(&self) -> Box<dyn Metric> {
        Box::new(Self::new(self.k))
    }
}

/// Which error a [`MeanError`] averages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// `|output - target|` (Keras's `mae`).
    Absolute,
    /// `(output - target)²` (Keras's `mse`).
    Squared,
}

/// The mean absolute or squared error over every element, named `mae` or `mse`.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::train::{MeanError, Metric};
/// let mut mse = MeanError::squared();
/// mse.update(&Tensor::new(&[1f32, 2.0], &Device::Cpu)?, &Tensor::new(&[0f32, 0.0], &Device::Cpu)?)?;
/// assert_eq!(mse.result()?, 2.5);
/// assert_eq!(mse.name(), "mse");
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct MeanError {
    kind: ErrorKind,
    mean: Mean,
}

impl MeanError {
    /// Mean absolute error, `mae`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{MeanError, Metric};
    /// assert_eq!(MeanError::absolute().name(), "mae");
    /// ```
    pub fn absolute() -> Self {
        Self {
            kind: ErrorKind::Absolute,
            mean: Mean::default(),
        }
    }

    /// Mean squared error, `mse`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{MeanError, Metric};
    /// assert_eq!(MeanError::squared().name(), "mse");
    /// ```
    pub fn squared() -> Self {
        Self {
            kind: ErrorKind::Squared,
            mean: Mean::default(),
        }
    }
}

impl MeanError {
    /// Each element's absolute or squared error.
    fn errors(&self, outputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let diff = (outputs.cast(DType::F32)? - targets.cast(DType::F32)?)?;
        Ok(match self.kind {
            ErrorKind::Absolute => diff.abs()?,
            ErrorKind::Squared => diff.sqr()?,
        })
    }
}

impl Metric for MeanError {
    fn name(&self) -> &str {
        match self.kind {
            ErrorKind::Absolute => "mae",
            ErrorKind::Squared => "mse",
        }
    }

    fn update(&mut self, outputs: &Tensor, targets: &Tensor) -> Result<()> {
        let errors = self.errors(outputs, targets)?;
        self.mean.add(errors.sum_all()?, errors.elem_count())
    }

    fn supports_weights(&self) -> bool {
        true
    }

    fn update_weighted(
        &mut self,
        outputs: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
    ) -> Result<()> {
        let errors = per_sample(self.errors(outputs, targets)?)?;
        self.mean.add_weighted(&errors, weights)
    }

    fn result(&self) -> Result<f64> {
        self.mean.value()
    }

    fn reset(&mut self) {
        self.mean = Mean::default();
    }

    fn boxed_clone(&self) -> Box<dyn Metric> {
        let mut fresh = self.clone();
        fresh.reset();
        Box::new(fresh)
    }
}

/// Mean intersection over union over `classes` classes (Keras's `MeanIoU` with
/// `sparse_y_pred=False`): predictions are the arg-max over the class axis 1, targets integer
/// labels; classes absent from both predictions and targets are left out of the mean.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::train::{MeanIoU, Metric};
/// let mut iou = MeanIoU::new(2);
/// // Predictions [0, 1, 1, 1] against labels [0, 0, 1, 1]: IoU 1/2 for class 0, 2/3 for 1.
/// let out = Tensor::new(&[[0.9f32, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]], &Device::Cpu)?;
/// iou.update(&out, &Tensor::new(&[0u32, 0, 1, 1], &Device::Cpu)?)?;
/// assert!((iou.result()? - (0.5 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct MeanIoU {
    classes: usize,
    /// `confusion[label][prediction]` counts, on the device.
    confusion: Option<Tensor>,
}

impl MeanIoU {
    /// Mean IoU over `classes` classes.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{MeanIoU, Metric};
    /// assert_eq!(MeanIoU::new(3).name(), "mean_iou");
    /// ```
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            confusion: None,
        }
    }
}

impl Metric for MeanIoU {
    fn name(&self) -> &str {
        "mean_iou"
    }

    fn update(&mut self, outputs: &Tensor, targets: &Tensor) -> Result<()> {
        let device = outputs.device();
        let classes = Tensor::arange(0u32, self.classes as u32, device)?.unsqueeze(0)?;
        let one_hot = |ids: &Tensor| -> Result<Tensor> {
            let ids = ids.cast(DType::U32)?.flatten_all()?.unsqueeze(1)?;
            Ok(ids.broadcast_eq(&classes)?.cast(DType::F32)?)
        };
        let (labels, predictions) = (one_hot(targets)?, one_hot(&outputs.argmax(1)?)?);
        if labels.dim(0)? != predictions.dim(0)? {
            return Err(Error::InvalidArgument(format!(
                "mean_iou: {} labels for {} predictions",
                labels.dim(0)?,
                predictions.dim(0)?
            )));
        }
        let counts = labels.t()?.matmul(&predictions)?.cast(DType::F64)?.detach();
        self.confusion = Some(match self.confusion.take() {
            Some(c) => (c + counts)?,
            None => counts,
        });
        Ok(())
    }

    fn result(&self) -> Result<f64> {
        let Some(confusion) = &self.confusion else {
            return Ok(f64::NAN);
        };
        let m: Vec<Vec<f64>> = crate::profile::read_vec::<f64>(confusion)?
            .chunks(self.classes.max(1))
            .map(<[f64]>::to_vec)
            .collect();
        let mut sum = 0.0;
        let mut present = 0usize;
        for c in 0..self.classes {
            let intersection = m[c][c];
            let union: f64 =
                m[c].iter().sum::<f64>() + m.iter().map(|r| r[c]).sum::<f64>() - intersection;
            if union > 0.0 {
                sum += intersection / union;
                present += 1;
            }
        }
        Ok(if present == 0 {
            f64::NAN
        } else {
            sum / present as f64
        })
    }

    fn reset(&mut self) {
        self.confusion = None;
    }

    fn boxed_clone(&self) -> Box<dyn Metric> {
        Box::new(Self::new(self.classes))
    }
}

/// The default metrics for an output trained with `loss`: its accuracy for the
/// cross-entropies (the article's `metrics=["accuracy"]`), nothing for regression losses.
pub(crate) fn default_metrics(loss: &crate::train::Loss) -> Vec<Box<dyn Metric>> {
    use crate::train::Loss;
    match loss {
        Loss::SparseCategoricalCrossentropy { .. } => vec![Box::new(Accuracy::sparse())],
        Loss::CategoricalCrossentropy { .. } => vec![Box::new(Accuracy::categorical())],
        Loss::BinaryCrossentropy { from_logits } => {
            let threshold = if *from_logits { 0.0 } else { 0.5 };
            vec![Box::new(Accuracy::binary(threshold))]
        }
        _ => Vec::new(),
    }
}

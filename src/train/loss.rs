//! Losses with Keras's names, definitions and reduction (the mean over every sample, and over
//! the positions of a per-pixel output), and the checks of a target against its output.
//!
//! Outputs are channels-first: the class axis of a classification output is axis 1, whatever
//! its rank, so `(batch, classes)` and per-pixel `(batch, classes, h, w)` outputs both work.

use candle_core::{D, DType, Tensor};

use crate::support::dtype::Cast;
use crate::{Error, Result};

/// A training loss, reduced to the mean over the batch (and over positions, for outputs with
/// spatial axes).
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::train::Loss;
/// let probs = Tensor::new(&[[0.25f32, 0.75]], &Device::Cpu)?;
/// let labels = Tensor::new(&[1u32], &Device::Cpu)?;
/// let loss = Loss::SparseCategoricalCrossentropy { from_logits: false }.compute(&probs, &labels)?;
/// assert!((loss.to_scalar::<f32>()? - (-(0.75f32).ln())).abs() < 1e-6);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loss {
    /// Keras's `sparse_categorical_crossentropy`: integer class labels of shape `(batch, …)`
    /// against outputs `(batch, classes, …)` of logits or probabilities.
    SparseCategoricalCrossentropy {
        /// Whether the outputs are logits rather than probabilities.
        from_logits: bool,
    },
    /// Keras's `categorical_crossentropy`: one-hot (or soft) targets of the output's shape.
    CategoricalCrossentropy {
        /// Whether the outputs are logits rather than probabilities.
        from_logits: bool,
    },
    /// Keras's `binary_crossentropy`: targets in `[0, 1]` of the output's shape.
    BinaryCrossentropy {
        /// Whether the outputs are logits rather than probabilities.
        from_logits: bool,
    },
    /// Keras's `mean_squared_error`.
    MeanSquaredError,
    /// Keras's `mean_absolute_error`.
    MeanAbsoluteError,
    /// Keras's `Huber`: quadratic within `delta` of the target, linear beyond.
    Huber {
        /// Where the loss turns linear (Keras's default 1.0).
        delta: f64,
    },
}

/// Keras clips probabilities to `[epsilon, 1 - epsilon]` before the log.
const PROBABILITY_EPSILON: f64 = 1e-7;

impl Loss {
    /// Keras's name of the loss (`sparse_categorical_crossentropy`, `mean_squared_error`, ...).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::Loss;
    /// assert_eq!(Loss::Huber { delta: 1.0 }.name(), "huber");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            Loss::SparseCategoricalCrossentropy { .. } => "sparse_categorical_crossentropy",
            Loss::CategoricalCrossentropy { .. } => "categorical_crossentropy",
            Loss::BinaryCrossentropy { .. } => "binary_crossentropy",
            Loss::MeanSquaredError => "mean_squared_error",
            Loss::MeanAbsoluteError => "mean_absolute_error",
            Loss::Huber { .. } => "huber",
        }
    }

    /// `true` for the cross-entropies, whose outputs are classes: `fit` reports their accuracy
    /// unless told otherwise.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::Loss;
    /// assert!(Loss::BinaryCrossentropy { from_logits: true }.is_classification());
    /// assert!(!Loss::MeanSquaredError.is_classification());
    /// ```
    pub fn is_classification(&self) -> bool {
        matches!(
            self,
            Loss::SparseCategoricalCrossentropy { .. }
                | Loss::CategoricalCrossentropy { .. }
                | Loss::BinaryCrossentropy { .. }
        )
    }

    /// Checks a target against the output it is compared with: dtype, shape, and for sparse
    /// labels their range (which reads the labels' minimum and maximum). `output_shape` is the
    /// output's per-sample shape; `output` names the output in the error. Run before the
    /// forward pass, so that a bad batch fails before anything changes.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::train::Loss;
    /// let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    /// let labels = Tensor::new(&[0u32, 3], &Device::Cpu)?;
    /// let err = loss.check_target(&[3], &labels, 2, "head").unwrap_err().to_string();
    /// assert!(err.contains("head") && err.contains("3"), "{err}");
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn check_target(
        &self,
        output_shape: &[usize],
        target: &Tensor,
        batch: usize,
        output: &str,
    ) -> Result<()> {
        self.check_target_layout(output_shape, target, batch, output)?;
        let Some(&classes) = output_shape.first() else {
            return Ok(());
        };
        if !matches!(self, Loss::SparseCategoricalCrossentropy { .. }) || target.elem_count() == 0 {
            return Ok(());
        }
        // One read of the extremes (one host synchronisation on a GPU); unsigned labels need
        // only their maximum.
        let flat = target.flatten_all()?.cast(DType::F64)?;
        let (min, max) = if matches!(target.dtype(), DType::U8 | DType::U32) {
            (0.0, crate::profile::read_scalar::<f64>(&flat.max(0)?)?)
        } else {
            let both =
                crate::profile::read_vec::<f64>(&Tensor::stack(&[flat.min(0)?, flat.max(0)?], 0)?)?;
            (both[0], both[1])
        };
        if min < 0.0 || max >= classes as f64 {
            // Unsigned labels were checked by their maximum alone: the error reads the true
            // minimum too, so the message shows the range the batch held.
            let min = if matches!(target.dtype(), DType::U8 | DType::U32) {
                crate::profile::read_scalar::<f64>(&flat.min(0)?)?
            } else {
                min
            };
            return Err(self.bad_target(
                output,
                format!(
                    "labels must be in 0..{classes} (the output's classes), found {min}..={max}"
                ),
            ));
        }
        Ok(())
    }

    /// The error of a target that does not fit its output.
    fn bad_target(&self, output: &str, message: String) -> Error {
        Error::InvalidInput {
            layer: output.to_string(),
            message: format!("target for {}: {message}", self.name()),
        }
    }

    /// [`Loss::check_target`] without reading values: dtype and shape only.
    pub(crate) fn check_target_layout(
        &self,
        output_shape: &[usize],
        target: &Tensor,
        batch: usize,
        output: &str,
    ) -> Result<()> {
        let bad = |message: String| Err(self.bad_target(output, message));
        let dims = target.dims();
        if dims.first() != Some(&batch) {
            return bad(format!(
                "expected a batch of {batch}, got target shape {dims:?}"
            ));
        }
        match self {
            Loss::SparseCategoricalCrossentropy { .. } => {
                let Some((_, positions)) = output_shape.split_first() else {
                    return bad("the output has no class axis".into());
                };
                if &dims[1..] != positions {
                    return bad(format!(
                        "integer labels of per-sample shape {positions:?} expected (the output's {output_shape:?} without its class axis), got {:?}",
                        &dims[1..]
                    ));
                }
                if target.dtype().is_float() {
                    return bad(format!(
                        "integer class labels expected, got {:?} (use CategoricalCrossentropy for one-hot targets)",
                        target.dtype()
                    ));
                }
            }
            _ => {
                if &dims[1..] != output_shape {
                    return bad(format!(
                        "per-sample shape {output_shape:?} expected (the output's), got {:?}",
                        &dims[1..]
                    ));
                }
                if !target.dtype().is_float() {
                    return bad(format!("float targets expected, got {:?}", target.dtype()));
                }
            }
        }
        Ok(())
    }

    /// The bounds of sparse labels for an output of per-sample shape `output_shape`, as
    /// scalars of `target`'s dtype on its device: `(0, classes - 1)`; `None` for other
    /// losses. Made once and kept by the caller, so that the check on the device uploads
    /// nothing per step.
    pub(crate) fn label_bounds(
        &self,
        output_shape: &[usize],
        target: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let (Loss::SparseCategoricalCrossentropy { .. }, Some(&classes)) =
            (self, output_shape.first())
        else {
            return Ok(None);
        };
        if classes == 0 {
            return Ok(None);
        }
        let scalar = |v: f64| -> Result<Tensor> {
            Ok(Tensor::new(v, &candle_core::Device::Cpu)?
                .cast(target.dtype())?
                .to_device(target.device())?)
        };
        // A bound beyond the dtype's range saturates, which is still every label it holds.
        Ok(Some((scalar(0.0)?, scalar(classes as f64 - 1.0)?)))
    }

    /// The label-range check of [`Loss::check_target`] decided on the device, for a target
    /// whose layout was checked, with the bounds of [`Loss::label_bounds`]: a u8 scalar (1
    /// when every label is in `0..classes`) and the labels clamped into that range, so that
    /// the loss of a bad batch indexes nothing out of bounds while the verdict keeps its step
    /// from being applied. Nothing is read back; `None` for an empty target.
    pub(crate) fn labels_on_device(
        target: &Tensor,
        (zero, top): &(Tensor, Tensor),
    ) -> Result<Option<(Tensor, Tensor)>> {
        if target.elem_count() == 0 {
            return Ok(None);
        }
        let flat = target.flatten_all()?;
        let below_top = flat.max(0)?.le(top)?;
        Ok(Some(if matches!(target.dtype(), DType::U8 | DType::U32) {
            (below_top, target.broadcast_minimum(top)?)
        } else {
            let ok = (flat.min(0)?.ge(zero)? * below_top)?;
            (ok, target.broadcast_maximum(zero)?.broadcast_minimum(top)?)
        }))
    }

    /// The mean loss of `outputs` against `targets` (a scalar, f32 for f32/bf16/f16 outputs):
    /// the mean of [`Loss::per_sample`].
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::train::Loss;
    /// let logits = Tensor::new(&[[0f32, 0.0]], &Device::Cpu)?;
    /// let labels = Tensor::new(&[0u32], &Device::Cpu)?;
    /// let loss = Loss::SparseCategoricalCrossentropy { from_logits: true }.compute(&logits, &labels)?;
    /// assert!((loss.to_scalar::<f32>()? - 2f32.ln()).abs() < 1e-6);
    /// let mse = Loss::MeanSquaredError.compute(&logits, &Tensor::new(&[[1f32, 3.0]], &Device::Cpu)?)?;
    /// assert_eq!(mse.to_scalar::<f32>()?, 5.0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn compute(&self, outputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(self.per_sample(outputs, targets)?.mean_all()?)
    }

    /// The loss at every sample and position, unreduced: `(batch, …)` with the output's
    /// positions (the class axis summed away for the cross-entropies over classes). Its mean
    /// is [`Loss::compute`]; sample and class weights multiply it before the mean.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::train::Loss;
    /// let out = Tensor::new(&[[1f32, 1.0], [0.0, 0.0]], &Device::Cpu)?;
    /// let target = Tensor::new(&[[0f32, 0.0], [0.0, 0.0]], &Device::Cpu)?;
    /// let each = Loss::MeanSquaredError.per_sample(&out, &target)?;
    /// assert_eq!(each.to_vec2::<f32>()?, vec![vec![1.0, 1.0], vec![0.0, 0.0]]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn per_sample(&self, outputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        // Losses are computed in f32 even for bf16/f16 models.
        let outputs = if outputs.dtype() == DType::F64 {
            outputs.clone()
        } else {
            outputs.cast(DType::F32)?
        };
        let dtype = outputs.dtype();
        let float_targets = || targets.cast(dtype);
        Ok(match *self {
            Loss::SparseCategoricalCrossentropy { from_logits } => {
                let log_probs = class_log_probs(&outputs, from_logits)?;
                let labels = targets.cast(DType::U32)?.unsqueeze(1)?.contiguous()?;
                log_probs.gather(&labels, 1)?.squeeze(1)?.neg()?
            }
            Loss::CategoricalCrossentropy { from_logits } => {
                let log_probs = class_log_probs(&outputs, from_logits)?;
                (log_probs * float_targets()?)?.sum(1)?.neg()?
            }
            Loss::BinaryCrossentropy { from_logits } => {
                let t = float_targets()?;
                if from_logits {
                    // max(x, 0) - x·t + log(1 + exp(-|x|)): stable for any logit.
                    let softplus = outputs.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
                    ((outputs.relu()? - (&outputs * &t)?)? + softplus)?
                } else {
                    let p = outputs.clamp(PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)?;
                    let pos = (&t * p.log()?)?;
                    let neg = (t.affine(-1.0, 1.0)? * p.affine(-1.0, 1.0)?.log()?)?;
                    (pos + neg)?.neg()?
                }
            }
            Loss::MeanSquaredError => (&outputs - float_targets()?)?.sqr()?,
            Loss::MeanAbsoluteError => (&outputs - float_targets()?)?.abs()?,
            Loss::Huber { delta } => {
                let error = (&outputs - float_targets()?)?.abs()?;
                // 0.5·min(e, d)² + d·(e - min(e, d)): quadratic inside, linear outside.
                let inside = error.clamp(0.0, delta)?;
                let quadratic = (inside.sqr()? * 0.5)?;
                let linear = ((error - inside)? * delta)?;
                (quadratic + linear)?
            }
        })
    }
}

/// Log-probabilities over the class axis 1: a log-softmax of logits, or the log of
/// probabilities normalized to sum to one and clipped as Keras does.
fn class_log_probs(outputs: &Tensor, from_logits: bool) -> Result<Tensor> {
    Ok(if from_logits {
        if outputs.rank() == 2 {
            candle_nn::ops::log_softmax(outputs, D::Minus1)?
        } else {
            let max = outputs.max_keepdim(1)?.detach();
            let shifted = outputs.broadcast_sub(&max)?;
            let log_sum = shifted.exp()?.sum_keepdim(1)?.log()?;
            shifted.broadcast_sub(&log_sum)?
        }
    } else {
        let sum = outputs.sum_keepdim(1)?;
        outputs
            .broadcast_div(&sum)?
            .clamp(PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)?
            .log()?
    })
}

/// Number of samples (or positions) whose arg-max over the class axis 1 equals the label, as
/// a scalar `f32` tensor (kept on the device so a training loop need not wait for it).
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::train::correct_predictions;
/// let out = Tensor::new(&[[0.1f32, 0.9], [0.8, 0.2]], &Device::Cpu)?;
/// let labels = Tensor::new(&[1u32, 1], &Device::Cpu)?;
/// assert_eq!(correct_predictions(&out, &labels)?.to_scalar::<f32>()?, 1.0);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn correct_predictions(outputs: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(outputs
        .argmax(1)?
        .eq(&labels.cast(DType::U32)?)?
        .cast(DType::F32)?
        .sum_all()?)
}

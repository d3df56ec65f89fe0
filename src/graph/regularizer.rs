//! [`Regularizer`]: Keras's L1/L2 weight penalties (`kernel_regularizer=l2(1e-4)`), held by a
//! layer for one of its weights and added to the training loss as Keras adds `model.losses`.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// A weight penalty: `l1 · sum(|w|) + l2 · sum(w²)` (Keras's `L1`, `L2` and `L1L2`, without
/// a factor ½). Set on a layer's weight with
/// [`Configured::kernel_regularizer`](crate::Configured::kernel_regularizer) (or `bias_…`,
/// or any weight by name); the trainer adds the penalties of every trainable weight to the
/// loss it minimizes and reports, in training and evaluation, as Keras does.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::Regularizer;
/// let w = Tensor::new(&[1f32, -2.0], &Device::Cpu)?;
/// let penalty = Regularizer::l1_l2(0.1, 0.01).penalty(&w)?.to_scalar::<f32>()?;
/// assert!((penalty - (0.1 * 3.0 + 0.01 * 5.0)).abs() < 1e-6);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Regularizer {
    l1: f64,
    l2: f64,
}

impl Regularizer {
    /// Keras's `L1(l1)`: `l1 · sum(|w|)`.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::Regularizer::l1(0.01).l1_factor(), 0.01);
    /// ```
    pub fn l1(l1: f64) -> Self {
        Self { l1, l2: 0.0 }
    }

    /// Keras's `L2(l2)`: `l2 · sum(w²)`.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::Regularizer::l2(1e-4).l2_factor(), 1e-4);
    /// ```
    pub fn l2(l2: f64) -> Self {
        Self { l1: 0.0, l2 }
    }

    /// Keras's `L1L2(l1, l2)`: both.
    ///
    /// # Examples
    /// ```
    /// let r = candle_functional::Regularizer::l1_l2(0.1, 0.2);
    /// assert_eq!((r.l1_factor(), r.l2_factor()), (0.1, 0.2));
    /// ```
    pub fn l1_l2(l1: f64, l2: f64) -> Self {
        Self { l1, l2 }
    }

    /// The L1 factor.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::Regularizer::l2(0.5).l1_factor(), 0.0);
    /// ```
    pub fn l1_factor(&self) -> f64 {
        self.l1
    }

    /// The L2 factor.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::Regularizer::l1(0.5).l2_factor(), 0.0);
    /// ```
    pub fn l2_factor(&self) -> f64 {
        self.l2
    }

    /// Both factors must be finite and not negative.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::Regularizer;
    /// assert!(Regularizer::l2(1e-4).validate().is_ok());
    /// assert!(Regularizer::l2(f64::NAN).validate().is_err());
    /// assert!(Regularizer::l1(-1.0).validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !(ok(self.l1) && ok(self.l2)) {
            return Err(Error::InvalidArgument(format!(
                "regularizer {self:?}: factors must be finite and not negative"
            )));
        }
        Ok(())
    }

    /// The penalty of one weight, an f32 scalar (f64 for an f64 weight), in the autograd
    /// graph of `weight`.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let w = Tensor::new(&[3f32, 4.0], &Device::Cpu)?;
    /// let p = candle_functional::Regularizer::l2(0.5).penalty(&w)?;
    /// assert_eq!(p.to_scalar::<f32>()?, 12.5);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn penalty(&self, weight: &Tensor) -> Result<Tensor> {
        // Summed in f32 at least: half-precision squares of a large layer would overflow.
        let w = match weight.dtype() {
            DType::F64 => weight.clone(),
            _ => weight.to_dtype(DType::F32)?,
        };
        let mut total = Tensor::zeros((), w.dtype(), w.device())?;
        if self.l1 != 0.0 {
            total = (total + (w.abs()?.sum_all()? * self.l1)?)?;
        }
        if self.l2 != 0.0 {
            total = (total + (w.sqr()?.sum_all()? * self.l2)?)?;
        }
        Ok(total)
    }
}

/// The penalties a layer holds, by weight name (behind a lock: a layer is shared by the
/// calls that record it).
#[derive(Debug, Default)]
pub(crate) struct LayerRegularizers(std::sync::RwLock<Vec<(String, Regularizer)>>);

impl LayerRegularizers {
    pub(crate) fn new(entries: Vec<(String, Regularizer)>) -> Self {
        Self(std::sync::RwLock::new(entries))
    }

    /// The penalties, by weight name.
    pub(crate) fn get(&self) -> Vec<(String, Regularizer)> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets (or with `None` removes) the penalty of `weight`.
    pub(crate) fn set(&self, weight: &str, regularizer: Option<Regularizer>) {
        let mut entries = self.0.write().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(name, _)| name != weight);
        if let Some(r) = regularizer {
            entries.push((weight.to_string(), r));
        }
    }

    /// Every penalty names one of `weights` and has valid factors; an error naming `layer`
    /// otherwise.
    pub(crate) fn check(&self, layer: &str, weights: &[&str]) -> Result<()> {
        for (name, r) in self.get() {
            r.validate().map_err(|e| Error::InvalidConfig {
                layer: layer.to_string(),
                message: format!("weight `{name}`: {e}"),
            })?;
            if !weights.contains(&name.as_str()) {
                return Err(Error::InvalidConfig {
                    layer: layer.to_string(),
                    message: format!(
                        "no weight `{name}` to regularize (its weights: {})",
                        weights.join(", ")
                    ),
                });
            }
        }
        Ok(())
    }
}

//! What a callback carries across a checkpoint ([`CallbackState`]): named numbers and named
//! tensors, written by [`Trainer::save_checkpoint`](crate::train::Trainer::save_checkpoint)
//! and handed back to the callback of a resumed run.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::{Error, Result};

/// What a callback carries across a checkpoint: named numbers (counters, best values) and
/// named tensors (a snapshot of weights). [`Trainer::save_checkpoint`](crate::train::Trainer::save_checkpoint) writes the state of
/// every callback of the run, and a run resumed with [`Trainer::load_checkpoint`](crate::train::Trainer::load_checkpoint) hands it
/// back to the callback of the same [`Callback::name`](crate::train::Callback::name) (and rank among those of that name)
/// after its `on_train_begin`, so a plateau counter or a schedule continues exactly.
///
/// # Examples
/// ```
/// use candle_functional::train::CallbackState;
/// let state = CallbackState::new().with_value("wait", 2.0).with_value("best", f64::INFINITY);
/// assert_eq!(state.value("wait"), Some(2.0));
/// assert_eq!(state.value("best"), Some(f64::INFINITY));
/// assert_eq!(state.value("other"), None);
/// ```
#[derive(Clone, Debug, Default)]
pub struct CallbackState {
    values: BTreeMap<String, f64>,
    tensors: BTreeMap<String, Tensor>,
}

impl CallbackState {
    /// An empty state.
    ///
    /// # Examples
    /// ```
    /// assert!(candle_functional::train::CallbackState::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a number (infinities and NaN are kept as they are).
    ///
    /// # Examples
    /// ```
    /// let s = candle_functional::train::CallbackState::new().with_value("wait", 1.0);
    /// assert_eq!(s.value("wait"), Some(1.0));
    /// ```
    pub fn with_value(mut self, name: impl Into<String>, value: f64) -> Self {
        self.values.insert(name.into(), value);
        self
    }

    /// Adds a tensor (written to the checkpoint as `callback.<key>.<name>`).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let t = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?;
    /// let s = candle_functional::train::CallbackState::new().with_tensor("w", t);
    /// assert_eq!(s.tensor("w").unwrap().dims(), &[2]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_tensor(mut self, name: impl Into<String>, tensor: Tensor) -> Self {
        self.tensors.insert(name.into(), tensor);
        self
    }

    /// A number by name.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::train::CallbackState::new().value("x"), None);
    /// ```
    pub fn value(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }

    /// A tensor by name.
    ///
    /// # Examples
    /// ```
    /// assert!(candle_functional::train::CallbackState::new().tensor("x").is_none());
    /// ```
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensors, by name.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::train::CallbackState::new().tensors().count(), 0);
    /// ```
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether the state holds nothing.
    ///
    /// # Examples
    /// ```
    /// assert!(!candle_functional::train::CallbackState::new().with_value("a", 0.0).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.tensors.is_empty()
    }

    /// The numbers as text (Rust's shortest round-trip form, which keeps `inf` and `NaN`,
    /// where JSON numbers cannot).
    pub(crate) fn values_as_text(&self) -> BTreeMap<String, String> {
        self.values
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect()
    }

    /// The inverse of `values_as_text`.
    pub(crate) fn from_text(values: &BTreeMap<String, String>) -> Result<Self> {
        let values = values
            .iter()
            .map(|(k, v)| {
                let value = v.parse::<f64>().map_err(|_| {
                    Error::InvalidArgument(format!("callback value `{k}` is not a number: {v}"))
                })?;
                Ok((k.clone(), value))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            values,
            tensors: BTreeMap::new(),
        })
    }
}

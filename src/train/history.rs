//! The record of a training run: one [`EpochLog`] per epoch, written as JSON or CSV.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::support::files::write_atomically;
use crate::{Error, Result};

/// What one epoch measured. Besides the fixed fields, `metrics` holds every loss and metric
/// by Keras's names: `accuracy`, `val_accuracy`, and for a model with several outputs
/// `<output>_loss`, `<output>_accuracy`, `val_<output>_…`. In JSON they sit beside the fixed
/// fields, as in Keras's `history.history`.
///
/// # Examples
/// ```
/// use candle_functional::train::EpochLog;
/// let log = EpochLog { epoch: 1, loss: 2.0, ..Default::default() }.with_metric("accuracy", 0.3);
/// assert_eq!(log.metric("accuracy"), Some(0.3));
/// assert_eq!(log.metric("loss"), Some(2.0));
/// assert_eq!(log.metric("val_accuracy"), None);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch (the weighted sum over the outputs).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Validation loss (when validation data was given).
    pub val_loss: Option<f64>,
    /// Learning rate at the epoch's last step.
    #[serde(deserialize_with = "nan_if_null")]
    pub learning_rate: f64,
    /// Seconds of training (validation excluded).
    #[serde(deserialize_with = "nan_if_null")]
    pub seconds: f64,
    /// Training samples per second.
    #[serde(deserialize_with = "nan_if_null")]
    pub images_per_sec: f64,
    /// Seconds of validation.
    #[serde(deserialize_with = "nan_if_null")]
    pub val_seconds: f64,
    /// Seconds of training spent waiting for the next batch (inside `seconds`): how much a
    /// faster data pipeline (`DataLoader::workers`) could save. 0 in files from before it.
    #[serde(default)]
    pub data_wait_seconds: f64,
    /// Every other value by its Keras name (see above). Values that are not finite are
    /// written as JSON `null` and skipped when read back.
    #[serde(flatten, deserialize_with = "finite_values")]
    pub metrics: BTreeMap<String, f64>,
}

/// Reads a number that JSON may hold as `null` (serde_json writes NaN and infinities so).
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Reads the flattened metrics, skipping nulls (non-finite values written by serde_json).
fn finite_values<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, f64>, D::Error> {
    let raw: BTreeMap<String, Option<f64>> = BTreeMap::deserialize(d)?;
    Ok(raw.into_iter().filter_map(|(k, v)| Some((k, v?))).collect())
}

impl EpochLog {
    /// A value by Keras's name: `loss`, `val_loss`, or any key of `metrics`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::EpochLog;
    /// let log = EpochLog { val_loss: Some(1.5), ..Default::default() };
    /// assert_eq!(log.metric("val_loss"), Some(1.5));
    /// ```
    pub fn metric(&self, name: &str) -> Option<f64> {
        match name {
            "loss" => Some(self.loss),
            "val_loss" => self.val_loss,
            other => self.metrics.get(other).copied(),
        }
    }

    /// Adds a metric (builder style).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::EpochLog;
    /// assert_eq!(EpochLog::default().with_metric("mae", 0.1).metric("mae"), Some(0.1));
    /// ```
    pub fn with_metric(mut self, name: impl Into<String>, value: f64) -> Self {
        self.metrics.insert(name.into(), value);
        self
    }
}

/// Every epoch of a run, in order.
///
/// # Examples
/// ```
/// use candle_functional::train::{EpochLog, History};
/// let mut h = History::default();
/// h.push(EpochLog { epoch: 1, loss: 1.0, ..Default::default() });
/// assert!(h.to_csv().starts_with("epoch,loss,val_loss"));
/// assert_eq!(History::from_json(&h.to_json()?)?, h);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    epochs: Vec<EpochLog>,
}

impl History {
    /// Appends an epoch.
    ///
    /// # Examples
    /// ```
    /// let mut h = candle_functional::train::History::default();
    /// h.push(Default::default());
    /// assert_eq!(h.epochs().len(), 1);
    /// ```
    pub fn push(&mut self, log: EpochLog) {
        self.epochs.push(log);
    }

    /// The epochs so far.
    ///
    /// # Examples
    /// ```
    /// assert!(candle_functional::train::History::default().epochs().is_empty());
    /// ```
    pub fn epochs(&self) -> &[EpochLog] {
        &self.epochs
    }

    /// The last epoch.
    ///
    /// # Examples
    /// ```
    /// assert!(candle_functional::train::History::default().last().is_none());
    /// ```
    pub fn last(&self) -> Option<&EpochLog> {
        self.epochs.last()
    }

    /// Pretty JSON: `{"epochs": [{"epoch": 1, "loss": …}, …]}`.
    ///
    /// # Examples
    /// ```
    /// let json = candle_functional::train::History::default().to_json()?;
    /// assert!(json.contains("epochs"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::InvalidArgument(e.to_string()))
    }

    /// Parses [`History::to_json`]'s output.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::History;
    /// assert!(History::from_json("{\"epochs\": []}")?.epochs().is_empty());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| Error::InvalidArgument(format!("history JSON: {e}")))
    }

    /// CSV with a header: the fixed columns, then one column per metric seen in any epoch;
    /// empty cells for missing values.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::train::{EpochLog, History};
    /// let mut h = History::default();
    /// h.push(EpochLog { epoch: 1, ..Default::default() }.with_metric("accuracy", 0.5));
    /// assert!(h.to_csv().starts_with("epoch,loss,val_loss,learning_rate,seconds,images_per_sec,val_seconds,data_wait_seconds,accuracy\n"));
    /// assert_eq!(h.to_csv().lines().count(), 2);
    /// ```
    pub fn to_csv(&self) -> String {
        let names: BTreeSet<&str> = self
            .epochs
            .iter()
            .flat_map(|e| e.metrics.keys().map(String::as_str))
            .collect();
        let mut out = String::from(
            "epoch,loss,val_loss,learning_rate,seconds,images_per_sec,val_seconds,data_wait_seconds",
        );
        for name in &names {
            out.push(',');
            out.push_str(name);
        }
        out.push('\n');
        let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        for e in &self.epochs {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{}",
                e.epoch,
                e.loss,
                opt(e.val_loss),
                e.learning_rate,
                e.seconds,
                e.images_per_sec,
                e.val_seconds,
                e.data_wait_seconds
            ));
            for name in &names {
                out.push(',');
                out.push_str(&opt(e.metrics.get(*name).copied()));
            }
            out.push('\n');
        }
        out
    }

    /// Writes the JSON (atomically).
    ///
    /// # Examples
    /// ```
    /// let path = std::env::temp_dir().join("cf_doc_history.json");
    /// candle_functional::train::History::default().write_json(&path)?;
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn write_json(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomically(path.as_ref(), self.to_json()?.as_bytes())
    }

    /// Writes the CSV (atomically).
    ///
    /// # Examples
    /// ```
    /// let path = std::env::temp_dir().join("cf_doc_history.csv");
    /// candle_functional::train::History::default().write_csv(&path)?;
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn write_csv(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomically(path.as_ref(), self.to_csv().as_bytes())
    }
}

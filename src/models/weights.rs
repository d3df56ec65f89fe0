//! Saving and loading a model's weights in safetensors files, under stable names
//! (`<layer>.kernel`, `<layer>.bias`, `<layer>.gamma`, `<layer>.moving_mean`, ...).
//!
//! Loading is strict: every missing, unexpected or mis-shaped tensor is named in one error
//! and nothing is changed unless everything matches. Files are written to a temporary file
//! beside the target and renamed, so a crash never leaves a half-written file.

use std::collections::HashMap;
use std::path::Path;

use sha2::Digest;

use candle_core::{Device, Tensor};

use crate::graph::op::weight_holders;
use crate::graph::weight_check::check_named_weights;
use crate::models::Model;
use crate::models::model::WeightsFile;
use crate::support::dtype::Cast;
use crate::support::files::{parse_safetensors, to_safetensors_bytes, write_atomically};
use crate::{Error, Result};

impl Model {
    /// The weights as a map from stable names to tensors (sharing storage with the model).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).name("head").call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// assert_eq!(model.weight_map()?["head.kernel"].dims(), &[4, 2]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn weight_map(&self) -> Result<HashMap<String, Tensor>> {
        Ok(self
            .weights()?
            .into_iter()
            .map(|w| (w.name().to_string(), w.var().as_tensor().clone()))
            .collect())
    }

    /// The sum of the weight penalties ([`Regularizer`](crate::Regularizer)) of every
    /// trainable weight, in the autograd graph of the weights: Keras's `sum(model.losses)`,
    /// which `fit` adds to the loss it minimizes and reports. `None` when no trainable layer
    /// has a penalty. A frozen layer's penalties are left out, as Keras leaves them out.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_functional::{prelude::*, Regularizer};
    /// let x = Input::new([2]);
    /// let y = Dense::new(1).kernel_regularizer(Regularizer::l2(0.5)).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let mut w = std::collections::HashMap::new();
    /// w.insert("dense.kernel".to_string(), Tensor::new(&[[3f32], [4.0]], &Device::Cpu)?);
    /// w.insert("dense.bias".to_string(), Tensor::new(&[1f32], &Device::Cpu)?);
    /// model.set_weights(&w)?;
    /// let penalty = model.regularization_loss()?.unwrap().to_scalar::<f32>()?;
    /// assert_eq!(penalty, 12.5); // 0.5 · (9 + 16), the bias unpenalized
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn regularization_loss(&self) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for (_, layer) in weight_holders(&self.plan.layers) {
            let penalties = layer.regularizers();
            if penalties.is_empty() || !layer.trainable() {
                continue;
            }
            let weights = layer.weights().ok_or_else(|| Error::NotBuilt {
                model: self.name().to_string(),
            })?;
            for (name, regularizer) in penalties {
                // The names were checked against the layer's weights at its call.
                let Some(i) = weights.specs.iter().position(|s| s.name() == name) else {
                    continue;
                };
                if !weights.specs[i].trainable() {
                    continue;
                }
                let penalty = regularizer.penalty(weights.vars[i].as_tensor())?;
                total = Some(match total {
                    None => penalty,
                    Some(t) => t.add(&penalty.to_dtype(t.dtype())?)?,
                });
            }
        }
        Ok(total)
    }

    /// Writes the weights (trainable and state) to a safetensors file, atomically.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let path = std::env::temp_dir().join("candle_functional_doc_save.safetensors");
    /// model.save_weights(&path)?;
    /// model.load_weights(&path)?;
    /// # std::fs::remove_file(&path).ok();
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn save_weights(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = to_safetensors_bytes(&self.weight_map()?, None, path)?;
        write_atomically(path, &bytes)
    }

    /// Loads weights saved by [`Model::save_weights`] (or written by any tool under the same
    /// names). Strict: see [`Model::set_weights`].
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let err = model.load_weights("no/such/file.safetensors").unwrap_err();
    /// assert!(matches!(err, Error::Io { .. }));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn load_weights(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let device = self.device().unwrap_or(Device::Cpu);
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (tensors, _) = parse_safetensors(&bytes, path, &device)?;
        self.set_weights_from(&tensors, &path.display().to_string())?;
        let sha256: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        *self.weights_file.lock().unwrap_or_else(|e| e.into_inner()) = Some(WeightsFile {
            path: path.display().to_string(),
            sha256,
        });
        Ok(())
    }

    /// Sets every weight from a map of named tensors. Strict: if any weight is missing, any
    /// name is unknown, or any shape differs, nothing changes and the error lists them all.
    /// Values are converted to each weight's device and dtype.
    ///
    /// # Examples
    /// ```
    /// use std::collections::HashMap;
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).call(&x)?;
    /// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// let mut map = HashMap::new();
    /// map.insert("dense.kernel".to_string(), Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?);
    /// let err = model.set_weights(&map).unwrap_err().to_string();
    /// assert!(err.contains("dense.bias") && err.contains("[4, 3]"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn set_weights(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.set_weights_from(tensors, "map")
    }

    pub(crate) fn set_weights_from(
        &self,
        tensors: &HashMap<String, Tensor>,
        source: &str,
    ) -> Result<()> {
        self.check_weights(tensors, source)?;
        let weights = self.weights()?;
        // Every value converted before any is set: a conversion that fails half-way through
        // must not leave the model half loaded.
        let values = weights
            .iter()
            .map(|w| converted(&tensors[w.name()], w.var().as_tensor(), w.name(), source))
            .collect::<Result<Vec<_>>>()?;
        for (w, value) in weights.iter().zip(values) {
            w.var().set(&value)?;
        }
        Ok(())
    }

    /// Checks that `tensors` gives every weight of the model with its shape and nothing else,
    /// changing nothing; the error lists every problem, naming `source`.
    pub(crate) fn check_weights(
        &self,
        tensors: &HashMap<String, Tensor>,
        source: &str,
    ) -> Result<()> {
        let weights = self.weights()?;
        check_named_weights(
            weights.iter().map(|w| (w.name(), w.var().as_tensor())),
            tensors,
            source,
        )
    }
}

/// `value` on `like`'s device and in its dtype, in storage of its own (a value taken from this
/// model by `weight_map` shares the variable's storage, which `Var::set` refuses); an error
/// naming `source` and the tensor `name` when it cannot be converted.
pub(crate) fn converted(value: &Tensor, like: &Tensor, name: &str, source: &str) -> Result<Tensor> {
    let convert = || -> candle_core::Result<Tensor> {
        value.to_device(like.device())?.cast(like.dtype())?.copy()
    };
    convert().map_err(|e| Error::WeightsMismatch {
        source_name: source.into(),
        missing: Vec::new(),
        unexpected: Vec::new(),
        mis_shaped: Vec::new(),
        mis_typed: vec![(
            name.to_string(),
            format!(
                "{:?} ({e}; the weight is {:?})",
                value.dtype(),
                like.dtype()
            ),
        )],
    })
}

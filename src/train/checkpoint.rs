//! Checkpoints that resume a run exactly: [`Trainer::save_checkpoint`] (weights, optimizer
//! state, history, counters and seed, written to a temporary file and renamed) and
//! [`Trainer::load_checkpoint`] (all or nothing).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;

use crate::models::weights::converted;
use crate::support::files::{parse_safetensors, to_safetensors_bytes, write_atomically};
use crate::train::callback_state::CallbackState;
use crate::train::trainer::Trainer;
use crate::train::{History, OptimizerState};
use crate::{Error, Result};

const CHECKPOINT_FORMAT: &str = "candle-functional/checkpoint/1";

impl Trainer {
    /// Writes everything needed to resume: weights (with BatchNorm state), optimizer state,
    /// completed epochs and steps, the base learning rate (as callbacks left it), the
    /// forward-call counter (dropout masks), the history and the state of the run's
    /// callbacks (as of the last epoch's end). Written to a temporary file and renamed.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{AdamConfig, Loss, Trainer};
    /// # let x = Input::new([1, 2, 2]);
    /// # let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// # let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu)?;
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// let path = std::env::temp_dir().join("cf_doc_trainer.ckpt");
    /// trainer.fit(&loader, None, 1, &mut [])?;
    /// trainer.save_checkpoint(&path)?;
    /// trainer.load_checkpoint(&path)?;
    /// assert_eq!(trainer.epochs_done(), 1);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn save_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut tensors: HashMap<String, Tensor> = self
            .model
            .weight_map()?
            .into_iter()
            .map(|(k, v)| (format!("model.{k}"), v))
            .collect();
        let state = self.optimizer.state()?;
        for (name, t) in state.slots {
            tensors.insert(format!("optimizer.{name}"), t);
        }
        let mut values = BTreeMap::new();
        for (key, state) in &self.callback_states {
            values.insert(key.clone(), state.values_as_text());
            for (name, t) in state.tensors() {
                tensors.insert(format!("callback.{key}.{name}"), t.clone());
            }
        }
        let callbacks = serde_json::to_string(&values)
            .map_err(|e| Error::InvalidArgument(format!("callback states: {e}")))?;
        let mut meta: HashMap<String, String> = [
            ("format", CHECKPOINT_FORMAT.to_string()),
            ("epochs_done", self.epochs_done.to_string()),
            ("steps_done", self.steps_done.to_string()),
            ("optimizer_iterations", state.iterations.to_string()),
            ("forward_calls", self.model.forward_calls().to_string()),
            ("seed", self.model.seed().to_string()),
            ("history", self.history.to_json()?),
            // Rust's shortest round-trip text: the rate comes back bit for bit.
            ("learning_rate", self.learning_rate.to_string()),
            ("callbacks", callbacks),
            ("optimizer", format!("{:?}", self.optimizer_config)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(n) = self.batches_per_epoch {
            meta.insert("batches_per_epoch".into(), n.to_string());
        }
        let bytes = to_safetensors_bytes(&tensors, Some(meta), path)?;
        write_atomically(path, &bytes)
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`] for the same model and
    /// optimizer; `fit` then continues where the run stopped. Strict: the weights and the
    /// optimizer state are both checked (names, shapes) and converted before either is
    /// written, so a checkpoint that does not fit changes nothing. The model takes the
    /// checkpoint's seed and forward-call count, so its random layers (Dropout) draw what the
    /// uninterrupted run would have drawn, whatever seed it was built with; compare
    /// [`Model::seed`](crate::Model::seed) afterwards to refuse a resume under another seed.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # use candle_functional::prelude::*;
    /// # use candle_functional::train::{AdamConfig, Loss, Trainer};
    /// # let x = Input::new([1, 2, 2]);
    /// # let y = Dense::new(2).call(&Flatten::new().call(&x)?)?;
    /// # let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
    /// # let data = ImageDataset::from_parts(&[0, 0, 0, 0, 255, 255, 255, 255], &[0, 1], [1, 2, 2])?;
    /// # let loader = DataLoader::new(data, 2, &Device::Cpu)?;
    /// # let mut trainer = Trainer::new(model, AdamConfig::default(), Loss::SparseCategoricalCrossentropy { from_logits: true })?;
    /// assert!(trainer.load_checkpoint("no/such.ckpt").is_err());
    /// assert_eq!(trainer.epochs_done(), 0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |message: String| Error::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let device = self.model.device().unwrap_or(candle_core::Device::Cpu);
        let (tensors, meta) = parse_safetensors(&bytes, path, &device)?;
        if meta.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
            return Err(bad(format!("not a {CHECKPOINT_FORMAT} file")));
        }
        let optimizer = format!("{:?}", self.optimizer_config);
        if let Some(saved) = meta.get("optimizer")
            && saved != &optimizer
        {
            return Err(bad(format!(
                "written by a run with optimizer {saved}, this trainer has {optimizer}: resume with the same settings"
            )));
        }
        let number = |key: &str| -> Result<u64> {
            meta.get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("metadata `{key}` is missing or not a number")))
        };
        let values: BTreeMap<String, BTreeMap<String, String>> = match meta.get("callbacks") {
            Some(json) => {
                serde_json::from_str(json).map_err(|e| bad(format!("metadata `callbacks`: {e}")))?
            }
            None => BTreeMap::new(),
        };
        let mut callback_states = values
            .iter()
            .map(|(key, v)| Ok((key.clone(), CallbackState::from_text(v)?)))
            .collect::<Result<BTreeMap<_, _>>>()
            .map_err(|e| bad(e.to_string()))?;
        let mut weights = HashMap::new();
        let mut slots = Vec::new();
        for (name, t) in tensors {
            if let Some(w) = name.strip_prefix("model.") {
                weights.insert(w.to_string(), t);
            } else if let Some(s) = name.strip_prefix("optimizer.") {
                slots.push((s.to_string(), t));
            } else if let Some((key, tensor)) = name
                .strip_prefix("callback.")
                .and_then(|rest| rest.split_once('.'))
            {
                let state = callback_states.remove(key).unwrap_or_default();
                callback_states.insert(key.to_string(), state.with_tensor(tensor, t));
            } else {
                return Err(bad(format!("unexpected tensor `{name}`")));
            }
        }
        let learning_rate = match meta.get("learning_rate") {
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|lr| lr.is_finite() && *lr >= 0.0)
                .ok_or_else(|| bad(format!("metadata `learning_rate` is not a rate: {v}")))?,
            // Written before rates were kept: the optimizer's.
            None => self.optimizer_config.learning_rate(),
        };
        let history = History::from_json(meta.get("history").map(String::as_str).unwrap_or("{}"))
            .map_err(|e| bad(e.to_string()))?;
        let batches_per_epoch = meta
            .get("batches_per_epoch")
            .map(|v| v.parse::<usize>())
            .transpose()
            .map_err(|_| bad("metadata `batches_per_epoch` is not a number".into()))?;
        let source = path.display().to_string();
        // The model's seed draws its dropout masks: the run continues with the checkpoint's.
        let seed = meta
            .get("seed")
            .map(|v| v.parse::<u64>())
            .transpose()
            .map_err(|_| bad("metadata `seed` is not a number".into()))?;
        let (epochs_done, steps_done, calls) = (
            number("epochs_done")?,
            number("steps_done")?,
            number("forward_calls")?,
        );
        // Check and convert everything before changing anything: a tensor that cannot take
        // the weight's dtype must not leave new weights beside the old optimizer state.
        self.model.check_weights(&weights, &source)?;
        let vars = self.model.trainable_weights()?;
        let state = OptimizerState {
            iterations: number("optimizer_iterations")?,
            slots,
        };
        self.optimizer.check_state(&state, &vars)?;
        let var_by_name: HashMap<&str, &candle_core::Var> =
            vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let slots = state
            .slots
            .iter()
            .map(|(name, t)| {
                let var = name.split_once('.').and_then(|(_, v)| var_by_name.get(v));
                Ok(match var {
                    Some(var) => {
                        let full = format!("optimizer.{name}");
                        (name.clone(), converted(t, var.as_tensor(), &full, &source)?)
                    }
                    None => (name.clone(), t.clone()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let state = OptimizerState { slots, ..state };
        let weights = self
            .model
            .weights()?
            .iter()
            .map(|w| {
                let full = format!("model.{}", w.name());
                let value = converted(&weights[w.name()], w.var().as_tensor(), &full, &source)?;
                Ok((w.name().to_string(), value))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        self.model.set_weights_from(&weights, &source)?;
        self.optimizer.load_state(&state, &vars)?;
        self.model.set_forward_calls(calls);
        if let Some(seed) = seed {
            self.model.set_seed(seed);
        }
        self.epochs_done = epochs_done as usize;
        self.steps_done = steps_done as usize;
        self.history = history;
        self.learning_rate = learning_rate;
        self.callback_states = callback_states;
        self.batches_per_epoch = batches_per_epoch;
        self.resumed = true;
        Ok(())
    }
}

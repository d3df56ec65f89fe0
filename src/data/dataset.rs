//! What `fit`, `evaluate` and `predict` read: a [`Dataset`] of [`Batch`]es, each any number
//! of input tensors and target tensors of any dtype and rank, for models with any number of
//! inputs and outputs. [`TensorDataset`] batches tensors already in memory (on the device).

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::support::seed::mix;
use crate::{Error, Result};

/// One batch: a tensor per model input and a target per model output, batch first.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::data::Batch;
/// let batch = Batch::new(
///     vec![Tensor::zeros((4, 3), DType::F32, &Device::Cpu)?],
///     vec![Tensor::zeros(4, DType::U32, &Device::Cpu)?],
/// );
/// assert_eq!(batch.samples()?, 4);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Batch {
    /// One tensor per model input, in the order of the model's inputs.
    pub inputs: Vec<Tensor>,
    /// One target per model output, in the order of the model's outputs (empty for
    /// prediction-only data).
    pub targets: Vec<Tensor>,
    /// Keras's `sample_weight`: empty, or one float tensor per output, `(batch,)` (a weight
    /// per sample) or of the output's per-position shape (a weight per pixel). Each
    /// sample's loss is multiplied by its weight in training and evaluation.
    pub sample_weights: Vec<Tensor>,
}

impl Batch {
    /// A batch from its inputs and targets.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::data::Batch;
    /// let b = Batch::new(vec![Tensor::new(&[[1f32]], &Device::Cpu)?], vec![]);
    /// assert!(b.targets.is_empty());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn new(inputs: Vec<Tensor>, targets: Vec<Tensor>) -> Self {
        Self {
            inputs,
            targets,
            sample_weights: Vec::new(),
        }
    }

    /// The batch with sample weights, one tensor per output (see [`Batch::sample_weights`]).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::data::Batch;
    /// let x = Tensor::new(&[[1f32], [2.0]], &Device::Cpu)?;
    /// let w = Tensor::new(&[1f32, 0.0], &Device::Cpu)?;
    /// let b = Batch::new(vec![x.clone()], vec![x]).with_sample_weights(vec![w]);
    /// assert_eq!(b.sample_weights.len(), 1);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn with_sample_weights(mut self, sample_weights: Vec<Tensor>) -> Self {
        self.sample_weights = sample_weights;
        self
    }

    /// The number of samples (the first input's batch dimension).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::data::Batch;
    /// assert!(Batch::new(vec![], vec![]).samples().is_err());
    /// ```
    pub fn samples(&self) -> Result<usize> {
        let first = self
            .inputs
            .first()
            .ok_or_else(|| Error::InvalidArgument("a batch without inputs".into()))?;
        Ok(first.dim(0)?)
    }
}

/// A source of batches, epoch after epoch: what [`Trainer`](crate::train::Trainer) reads.
/// [`DataLoader`](crate::data::DataLoader) (images and class labels) and [`TensorDataset`]
/// implement it; implement it for your own data.
///
/// # Examples
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_functional::data::{Batch, Dataset};
/// use candle_functional::Result;
///
/// /// The same single batch every epoch.
/// struct Once(Batch, Device);
/// impl Dataset for Once {
///     fn len(&self) -> usize { 1 }
///     fn device(&self) -> &Device { &self.1 }
///     fn batches(&self, _epoch: u64) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
///         Box::new(std::iter::once(Ok(self.0.clone())))
///     }
/// }
/// let once = Once(Batch::new(vec![Tensor::new(&[[1f32]], &Device::Cpu)?], vec![]), Device::Cpu);
/// assert_eq!(once.batches(0).count(), 1);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub trait Dataset {
    /// Batches per epoch.
    fn len(&self) -> usize;

    /// `true` when an epoch has no batch.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device the batches are on.
    fn device(&self) -> &Device;

    /// The batches of epoch `epoch` (shuffling and augmentation may depend on it).
    fn batches(&self, epoch: u64) -> Box<dyn Iterator<Item = Result<Batch>> + '_>;
}

/// Tensors in memory, batched along their first axis: any number of inputs and targets, of
/// any dtype and rank (Keras's `fit(x=[…], y=[…])` with arrays). Shuffling draws a new order
/// each epoch from a seed; a shuffled batch is gathered on the device with one index select
/// per tensor.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::data::{Dataset, TensorDataset};
/// let x = Tensor::arange(0f32, 10.0, &Device::Cpu)?.reshape((5, 2))?;
/// let y = Tensor::new(&[0u32, 1, 0, 1, 1], &Device::Cpu)?;
/// let data = TensorDataset::new(vec![x], vec![y], 2)?.shuffle(true).seed(7);
/// assert_eq!(data.len(), 3);
/// let sizes: Vec<usize> = data.batches(0).map(|b| b.unwrap().samples().unwrap()).collect();
/// assert_eq!(sizes, [2, 2, 1]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct TensorDataset {
    inputs: Vec<Tensor>,
    targets: Vec<Tensor>,
    sample_weights: Vec<Tensor>,
    batch_size: usize,
    samples: usize,
    shuffle: bool,
    seed: u64,
    device: Device,
}

impl TensorDataset {
    /// Batches of `batch_size` samples from `inputs` and `targets`, which must all have the
    /// same first dimension and live on one device.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_functional::data::TensorDataset;
    /// let x = Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?;
    /// let y = Tensor::zeros(3, DType::U32, &Device::Cpu)?;
    /// assert!(TensorDataset::new(vec![x], vec![y], 2).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn new(inputs: Vec<Tensor>, targets: Vec<Tensor>, batch_size: usize) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::InvalidArgument(
                "TensorDataset: batch size must be positive".into(),
            ));
        }
        let first = inputs.first().ok_or_else(|| {
            Error::InvalidArgument("TensorDataset: at least one input tensor is needed".into())
        })?;
        if first.rank() == 0 {
            return Err(Error::InvalidArgument(
                "TensorDataset: tensors need a batch axis".into(),
            ));
        }
        let samples = first.dim(0)?;
        let device = first.device().clone();
        for (what, t) in inputs
            .iter()
            .map(|t| ("input", t))
            .chain(targets.iter().map(|t| ("target", t)))
        {
            if t.rank() == 0 || t.dim(0)? != samples {
                return Err(Error::InvalidArgument(format!(
                    "TensorDataset: every tensor needs {samples} samples on its first axis, a {what} has shape {:?}",
                    t.dims()
                )));
            }
            if !t.device().same_device(&device) {
                return Err(Error::InvalidArgument(format!(
                    "TensorDataset: a {what} is on {:?}, the first input on {:?}",
                    t.device().location(),
                    device.location()
                )));
            }
        }
        Ok(Self {
            inputs,
            targets,
            sample_weights: Vec::new(),
            batch_size,
            samples,
            shuffle: false,
            seed: 0,
            device,
        })
    }

    /// Keras's `sample_weight`: one float tensor per target, `(samples,)` or of the target's
    /// per-position shape, batched and shuffled with the rest.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::data::{Dataset, TensorDataset};
    /// let x = Tensor::new(&[[0f32], [1.0], [2.0]], &Device::Cpu)?;
    /// let y = Tensor::new(&[0u32, 1, 1], &Device::Cpu)?;
    /// let w = Tensor::new(&[1f32, 9.0, 9.0], &Device::Cpu)?;
    /// let data = TensorDataset::new(vec![x], vec![y], 2)?.sample_weights(vec![w])?;
    /// let first = data.batches(0).next().unwrap()?;
    /// assert_eq!(first.sample_weights[0].to_vec1::<f32>()?, [1.0, 9.0]);
    /// // One per sample, like everything else.
    /// let short = Tensor::new(&[1f32], &Device::Cpu)?;
    /// assert!(data.clone().sample_weights(vec![short]).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn sample_weights(mut self, sample_weights: Vec<Tensor>) -> Result<Self> {
        if sample_weights.len() != self.targets.len() {
            return Err(Error::InvalidArgument(format!(
                "TensorDataset: {} sample weight tensor(s) for {} target(s): give one per target",
                sample_weights.len(),
                self.targets.len()
            )));
        }
        for w in &sample_weights {
            if w.rank() == 0 || w.dim(0)? != self.samples || !w.dtype().is_float() {
                return Err(Error::InvalidArgument(format!(
                    "TensorDataset: sample weights must be floats with {} samples on their first axis, got {:?} of shape {:?}",
                    self.samples,
                    w.dtype(),
                    w.dims()
                )));
            }
            if !w.device().same_device(&self.device) {
                return Err(Error::InvalidArgument(format!(
                    "TensorDataset: sample weights are on {:?}, the inputs on {:?}",
                    w.device().location(),
                    self.device.location()
                )));
            }
        }
        self.sample_weights = sample_weights;
        Ok(self)
    }

    /// Keras's `validation_split`: the last `fraction` of the samples, taken before any
    /// shuffling, become a validation set and the rest the training set (Keras's split:
    /// the training set keeps the first `floor(samples · (1 − fraction))`). Both keep the
    /// batch size and the sample weights of their samples; the training set keeps the
    /// shuffling, the validation set is never shuffled. Refused unless `fraction` is in
    /// `(0, 1)` and both sets get at least one sample.
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::data::TensorDataset;
    /// let x = Tensor::arange(0f32, 10.0, &Device::Cpu)?.reshape((10, 1))?;
    /// let y = Tensor::arange(0u32, 10, &Device::Cpu)?;
    /// let data = TensorDataset::new(vec![x], vec![y], 4)?.shuffle(true);
    /// let (train, val) = data.validation_split(0.25)?;
    /// assert_eq!((train.samples(), val.samples()), (7, 3)); // floor(10 · 0.75) = 7
    /// assert!(data.validation_split(1.0).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn validation_split(&self, fraction: f64) -> Result<(Self, Self)> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(Error::InvalidArgument(format!(
                "validation_split {fraction}: it must be in (0, 1)"
            )));
        }
        let split_at = (self.samples as f64 * (1.0 - fraction)).floor() as usize;
        if split_at == 0 || split_at == self.samples {
            return Err(Error::InvalidArgument(format!(
                "validation_split {fraction} of {} samples leaves {split_at} for training and {} for validation: both need at least one",
                self.samples,
                self.samples - split_at
            )));
        }
        let part = |start: usize, len: usize| -> Result<Self> {
            let cut = |tensors: &[Tensor]| -> Result<Vec<Tensor>> {
                tensors
                    .iter()
                    .map(|t| Ok(t.narrow(0, start, len)?))
                    .collect()
            };
            Ok(Self {
                inputs: cut(&self.inputs)?,
                targets: cut(&self.targets)?,
                sample_weights: cut(&self.sample_weights)?,
                samples: len,
                ..self.clone()
            })
        };
        let train = part(0, split_at)?;
        let validation = part(split_at, self.samples - split_at)?.shuffle(false);
        Ok((train, validation))
    }

    /// Draws a new sample order every epoch (default off).
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::TensorDataset;
    /// let x = Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?;
    /// let data = TensorDataset::new(vec![x], vec![], 2)?.shuffle(true);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// The seed of the shuffling (default 0).
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::TensorDataset;
    /// let x = Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?;
    /// let data = TensorDataset::new(vec![x], vec![], 2)?.shuffle(true).seed(3);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Number of samples.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_functional::data::TensorDataset;
    /// let x = Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?;
    /// assert_eq!(TensorDataset::new(vec![x], vec![], 3)?.samples(), 4);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn samples(&self) -> usize {
        self.samples
    }

    fn batch(&self, order: Option<&[u32]>, start: usize) -> Result<Batch> {
        let n = self.batch_size.min(self.samples - start);
        let take = |t: &Tensor| -> Result<Tensor> {
            Ok(match order {
                None => t.narrow(0, start, n)?,
                Some(order) => {
                    let index = Tensor::from_slice(&order[start..start + n], n, &self.device)?;
                    t.index_select(&index, 0)?
                }
            })
        };
        Ok(Batch {
            inputs: self.inputs.iter().map(take).collect::<Result<_>>()?,
            targets: self.targets.iter().map(take).collect::<Result<_>>()?,
            sample_weights: self
                .sample_weights
                .iter()
                .map(take)
                .collect::<Result<_>>()?,
        })
    }
}

impl Dataset for TensorDataset {
    fn len(&self) -> usize {
        self.samples.div_ceil(self.batch_size)
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn batches(&self, epoch: u64) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        let order = self.shuffle.then(|| {
            let mut order: Vec<u32> = (0..self.samples as u32).collect();
            order.shuffle(&mut StdRng::seed_from_u64(mix(self.seed, epoch)));
            order
        });
        Box::new(
            (0..self.samples)
                .step_by(self.batch_size)
                .map(move |start| self.batch(order.as_deref(), start)),
        )
    }
}

//! In-memory image datasets and the loader that turns them into batches on a device.
//!
//! A dataset keeps each sample as one record of bytes: its label, then its `u8` pixels (the
//! CIFAR-10 layout). A batch is assembled on the host (shuffled, cropped and flipped there,
//! which is only copying bytes) and sent to the device in **one** copy of `u8` records; the
//! device splits labels from pixels and converts and normalizes the pixels. With
//! `workers(n)` the host part runs on `n` threads ahead of training (`prefetch.rs`), in the
//! same order and with the same draws as without.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::data::prefetch::Prefetcher;
use crate::data::{Batch, Dataset};
use crate::support::dtype::Cast;
use crate::support::seed::mix;
use crate::support::sizes;
use crate::{Error, Result};

/// Images with one `u8` label each, held as records `[label, pixels…]`.
///
/// # Examples
/// ```
/// use candle_functional::data::ImageDataset;
/// let ds = ImageDataset::from_parts(&[0u8; 2 * 12], &[3, 7], [3, 2, 2])?;
/// assert_eq!(ds.len(), 2);
/// assert_eq!(ds.label(1)?, 7);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ImageDataset {
    records: Arc<Vec<u8>>,
    image_shape: [usize; 3],
    len: usize,
}

impl ImageDataset {
    /// From records laid out as `[label, c·h·w pixels]` one after the other (CIFAR-10's).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::data::ImageDataset;
    /// assert!(ImageDataset::from_records(vec![0u8; 5], [1, 2, 2]).is_ok());
    /// assert!(ImageDataset::from_records(vec![0u8; 6], [1, 2, 2]).is_err());
    /// ```
    pub fn from_records(records: Vec<u8>, image_shape: [usize; 3]) -> Result<Self> {
        let record = 1 + image_bytes(image_shape)?;
        if !records.len().is_multiple_of(record) {
            return Err(Error::InvalidArgument(format!(
                "{} bytes are not a whole number of {record}-byte records",
                records.len()
            )));
        }
        Ok(Self {
            len: records.len() / record,
            records: Arc::new(records),
            image_shape,
        })
    }

    /// From separate images (`n · c · h · w` bytes, NCHW) and labels.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::data::ImageDataset;
    /// assert!(ImageDataset::from_parts(&[0u8; 4], &[1, 2], [1, 2, 2]).is_err());
    /// assert!(ImageDataset::from_parts(&[], &[1], [1, 0, 2]).is_err());
    /// ```
    pub fn from_parts(images: &[u8], labels: &[u8], image_shape: [usize; 3]) -> Result<Self> {
        let size = image_bytes(image_shape)?;
        // `images` exists, so its length counts; compare by division, which cannot overflow.
        if images.len() / size != labels.len() || !images.len().is_multiple_of(size) {
            return Err(Error::InvalidArgument(format!(
                "{} image bytes for {} labels of {size}-byte images",
                images.len(),
                labels.len()
            )));
        }
        let mut records = Vec::with_capacity(images.len() + labels.len());
        for (label, image) in labels.iter().zip(images.chunks_exact(size)) {
            records.push(*label);
            records.extend_from_slice(image);
        }
        Self::from_records(records, image_shape)
    }

    /// The first `n` samples (all of them if `n` is larger or 0).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::data::ImageDataset;
    /// let ds = ImageDataset::from_parts(&[0u8; 3 * 4], &[0, 1, 2], [1, 2, 2])?;
    /// assert_eq!(ds.subset(2).len(), 2);
    /// assert_eq!(ds.subset(0).len(), 3);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn subset(&self, n: usize) -> Self {
        if n == 0 || n >= self.len {
            return self.clone();
        }
        let record = self.record_bytes();
        Self {
            records: Arc::new(self.records[..n * record].to_vec()),
            image_shape: self.image_shape,
            len: n,
        }
    }

    /// Number of samples.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::data::ImageDataset;
    /// assert_eq!(ImageDataset::from_records(vec![], [1, 1, 1])?.len(), 0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` without samples.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::data::ImageDataset;
    /// assert!(ImageDataset::from_records(vec![], [1, 1, 1])?.is_empty());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `(channels, height, width)`.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::data::ImageDataset;
    /// assert_eq!(ImageDataset::from_records(vec![], [3, 32, 32])?.image_shape(), [3, 32, 32]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn image_shape(&self) -> [usize; 3] {
        self.image_shape
    }

    /// The label of sample `i` (an error past the end).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::data::ImageDataset;
    /// let ds = ImageDataset::from_parts(&[9u8; 4], &[5], [1, 2, 2])?;
    /// assert_eq!(ds.label(0)?, 5);
    /// assert!(ds.label(1).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn label(&self, i: usize) -> Result<u8> {
        self.check_index(i)?;
        Ok(self.records[i * self.record_bytes()])
    }

    /// The pixels of sample `i` (NCHW order within the image; an error past the end).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::data::ImageDataset;
    /// let ds = ImageDataset::from_parts(&[1, 2, 3, 4], &[0], [1, 2, 2])?;
    /// assert_eq!(ds.image(0)?, &[1, 2, 3, 4]);
    /// assert!(ds.image(1).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn image(&self, i: usize) -> Result<&[u8]> {
        self.check_index(i)?;
        let r = self.record_bytes();
        Ok(&self.records[i * r + 1..(i + 1) * r])
    }

    fn check_index(&self, i: usize) -> Result<()> {
        if i < self.len {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "sample index {i} is out of range for a dataset of {} samples",
            self.len
        )))
    }

    fn record_bytes(&self) -> usize {
        // Checked by `image_bytes` when the dataset was made.
        1 + self.image_shape.iter().product::<usize>()
    }
}

/// The bytes of one image of `image_shape`: an error for a 0 in the shape, or a product that
/// does not fit a record (one byte is the label).
fn image_bytes(image_shape: [usize; 3]) -> Result<usize> {
    if image_shape.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "image shape {image_shape:?}: every dimension must be positive"
        )));
    }
    sizes::elements(&image_shape)
        .filter(|&n| n < usize::MAX)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "image shape {image_shape:?}: more bytes than a usize can count"
            ))
        })
}

/// How pixels are scaled before the model sees them.
///
/// # Examples
/// ```
/// use candle_functional::data::Normalization;
/// assert_eq!(Normalization::default(), Normalization::Raw);
/// let cifar = Normalization::cifar10();
/// assert!(matches!(cifar, Normalization::MeanStd { .. }));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Normalization {
    /// Raw 0–255 values (the article's recipe: its first BatchNorm does the scaling).
    #[default]
    Raw,
    /// Divided by 255.
    UnitRange,
    /// `(x / 255 - mean) / std` per channel.
    MeanStd {
        /// Per-channel means of `x / 255`.
        mean: [f32; 3],
        /// Per-channel standard deviations of `x / 255`.
        std: [f32; 3],
    },
}

impl Normalization {
    /// The usual CIFAR-10 training-set statistics.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::data::Normalization::cifar10();
    /// ```
    pub fn cifar10() -> Self {
        Normalization::MeanStd {
            mean: [0.4914, 0.4822, 0.4465],
            std: [0.2470, 0.2435, 0.2616],
        }
    }

    /// Per-channel `(scale, shift)` with `y = x · scale + shift`.
    fn affine(&self, channels: usize) -> (Vec<f32>, Vec<f32>) {
        match *self {
            Normalization::Raw => (vec![1.0; channels], vec![0.0; channels]),
            Normalization::UnitRange => (vec![1.0 / 255.0; channels], vec![0.0; channels]),
            Normalization::MeanStd { mean, std } => (0..channels)
                .map(|c| {
                    let (m, s) = (mean[c % 3], std[c % 3]);
                    (1.0 / (255.0 * s), -m / s)
                })
                .unzip(),
        }
    }
}

/// Random augmentation applied to training batches.
///
/// # Examples
/// ```
/// use candle_functional::data::Augmentation;
/// assert_eq!(Augmentation::standard(), Augmentation { crop_padding: 4, horizontal_flip: true });
/// assert_eq!(Augmentation::default(), Augmentation { crop_padding: 0, horizontal_flip: false });
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Augmentation {
    /// Random crop of the original size from the image padded with this many zero pixels on
    /// each side (0 = no crop).
    pub crop_padding: usize,
    /// Mirror half of the images left-right.
    pub horizontal_flip: bool,
}

impl Augmentation {
    /// The usual CIFAR-10 augmentation: 4-pixel padded random crops and horizontal flips.
    ///
    /// # Examples
    /// ```
    /// assert!(candle_functional::data::Augmentation::standard().horizontal_flip);
    /// ```
    pub fn standard() -> Self {
        Self {
            crop_padding: 4,
            horizontal_flip: true,
        }
    }

    fn is_active(&self) -> bool {
        self.crop_padding > 0 || self.horizontal_flip
    }
}

/// Turns an [`ImageDataset`] into batches on a device, shuffled and augmented per epoch from
/// a seed (so a run can be repeated and resumed exactly).
///
/// # Examples
/// ```
/// use candle_core::Device;
/// use candle_functional::data::{DataLoader, ImageDataset};
/// let ds = ImageDataset::from_parts(&[7u8; 5 * 12], &[0, 1, 2, 3, 4], [3, 2, 2])?;
/// let loader = DataLoader::new(ds, 2, &Device::Cpu)?;
/// let batches: Vec<_> = loader.batches(0).collect::<Result<_, _>>()?;
/// assert_eq!(batches.len(), 3);
/// assert_eq!(batches[2].inputs[0].dims(), &[1, 3, 2, 2]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct DataLoader {
    dataset: ImageDataset,
    batch_size: usize,
    device: Device,
    shuffle: bool,
    augmentation: Augmentation,
    normalization: Normalization,
    seed: u64,
    workers: usize,
    prefetch: usize,
}

impl DataLoader {
    /// A loader that keeps the dataset's order, without augmentation, raw pixels. A batch size
    /// of 0 is an error.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// let ds = ImageDataset::from_records(vec![0u8; 5], [1, 2, 2])?;
    /// assert_eq!(DataLoader::new(ds.clone(), 32, &Device::Cpu)?.len(), 1);
    /// assert!(DataLoader::new(ds, 0, &Device::Cpu).is_err());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn new(dataset: ImageDataset, batch_size: usize, device: &Device) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::InvalidArgument(
                "DataLoader: batch size must be positive".into(),
            ));
        }
        Ok(Self {
            dataset,
            batch_size,
            device: device.clone(),
            shuffle: false,
            augmentation: Augmentation::default(),
            normalization: Normalization::default(),
            seed: 0,
            workers: 0,
            prefetch: 2,
        })
    }

    /// Shuffles every epoch (a permutation drawn from the seed and the epoch).
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # let ds = ImageDataset::from_records(vec![0u8; 5], [1, 2, 2])?;
    /// let loader = DataLoader::new(ds, 32, &Device::Cpu)?.shuffle(true).seed(7);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// Random augmentation of every batch.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{Augmentation, DataLoader, ImageDataset};
    /// # let ds = ImageDataset::from_records(vec![0u8; 5], [1, 2, 2])?;
    /// let loader = DataLoader::new(ds, 32, &Device::Cpu)?.augmentation(Augmentation::standard());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn augmentation(mut self, augmentation: Augmentation) -> Self {
        self.augmentation = augmentation;
        self
    }

    /// Pixel scaling.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset, Normalization};
    /// # let ds = ImageDataset::from_records(vec![0u8; 5], [1, 2, 2])?;
    /// let loader = DataLoader::new(ds, 32, &Device::Cpu)?.normalization(Normalization::UnitRange);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn normalization(mut self, normalization: Normalization) -> Self {
        self.normalization = normalization;
        self
    }

    /// Seed of the shuffling and augmentation.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # let ds = ImageDataset::from_records(vec![0u8; 5], [1, 2, 2])?;
    /// let loader = DataLoader::new(ds, 32, &Device::Cpu)?.seed(1);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Prepares batches on `workers` background threads (PyTorch's `num_workers`, Keras's
    /// `prefetch`) while the training thread computes; 0 (the default) prepares each batch
    /// when it is asked for. Order and augmentation are the same either way: each batch
    /// draws from its own seed. Worker errors reach the reader at the batch that failed;
    /// stopping early stops the workers.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// let ds = ImageDataset::from_parts(&[7u8; 5 * 4], &[0, 1, 2, 3, 4], [1, 2, 2])?;
    /// let inline = DataLoader::new(ds.clone(), 2, &Device::Cpu)?.shuffle(true);
    /// let background = inline.clone().workers(2);
    /// let labels = |l: &DataLoader| -> Vec<Vec<u32>> {
    ///     l.batches(0).map(|b| b.unwrap().targets[0].to_vec1().unwrap()).collect()
    /// };
    /// assert_eq!(labels(&inline), labels(&background));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// How many finished batches each worker may hold ahead (default 2, at least 1): the
    /// memory bound of [`workers`](Self::workers).
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # let ds = ImageDataset::from_records(vec![0u8; 5], [1, 2, 2])?;
    /// let loader = DataLoader::new(ds, 32, &Device::Cpu)?.workers(2).prefetch(4);
    /// assert_eq!(loader.worker_count(), 2);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn prefetch(mut self, depth: usize) -> Self {
        self.prefetch = depth.max(1);
        self
    }

    /// Background workers (0: batches are prepared on the reading thread).
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # let ds = ImageDataset::from_records(vec![0u8; 5], [1, 2, 2])?;
    /// assert_eq!(DataLoader::new(ds, 32, &Device::Cpu)?.worker_count(), 0);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn worker_count(&self) -> usize {
        self.workers
    }

    /// Batches per epoch (the last one may be smaller).
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// let ds = ImageDataset::from_records(vec![0u8; 5 * 10], [1, 2, 2])?;
    /// assert_eq!(DataLoader::new(ds, 4, &Device::Cpu)?.len(), 3);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.dataset.len().div_ceil(self.batch_size)
    }

    /// `true` when there is no batch.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// let ds = ImageDataset::from_records(vec![], [1, 2, 2])?;
    /// assert!(DataLoader::new(ds, 4, &Device::Cpu)?.is_empty());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.dataset.is_empty()
    }

    /// The dataset.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// let ds = ImageDataset::from_records(vec![0u8; 10], [1, 2, 2])?;
    /// assert_eq!(DataLoader::new(ds, 4, &Device::Cpu)?.dataset().len(), 2);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn dataset(&self) -> &ImageDataset {
        &self.dataset
    }

    /// The device batches are made on.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// # let ds = ImageDataset::from_records(vec![0u8; 10], [1, 2, 2])?;
    /// assert!(DataLoader::new(ds, 4, &Device::Cpu)?.device().is_cpu());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The batches of one epoch.
    ///
    /// # Examples
    /// ```
    /// # use candle_core::Device;
    /// # use candle_functional::data::{DataLoader, ImageDataset};
    /// let ds = ImageDataset::from_parts(&[1u8, 2, 3, 4], &[6], [1, 2, 2])?;
    /// let batch = DataLoader::new(ds, 4, &Device::Cpu)?.batches(0).next().unwrap()?;
    /// assert_eq!(batch.targets[0].to_vec1::<u32>()?, [6]);
    /// assert_eq!(batch.inputs[0].flatten_all()?.to_vec1::<f32>()?, [1.0, 2.0, 3.0, 4.0]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn batches(&self, epoch: u64) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(mix(self.seed, epoch)));
        }
        let (scale, shift) = self.normalization.affine(self.dataset.image_shape[0]);
        let affine = self.affine_tensors(&scale, &shift);
        let chunks: Vec<Vec<usize>> = order
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        let host = HostBatches {
            dataset: self.dataset.clone(),
            augmentation: self.augmentation,
            seed: mix(self.seed ^ 0xA5A5_A5A5, epoch),
            chunks: Arc::new(chunks),
        };
        let upload = match affine {
            Ok(affine) => Upload {
                device: self.device.clone(),
                image_shape: self.dataset.image_shape,
                normalization: self.normalization,
                affine,
            },
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        let jobs = host.chunks.len();
        if self.workers == 0 {
            return Box::new((0..jobs).map(move |b| upload.batch(host.records(b)?)));
        }
        // Where tensors are made synchronously (the CPU), the workers do everything; a device
        // with a queue (a GPU) gets its copy from the training thread, which owns the stream.
        let started = if !crate::device::reads_wait_for_a_queue(&self.device) {
            Prefetcher::start(jobs, self.workers, self.prefetch, move |b| {
                upload.batch(host.records(b)?)
            })
            .map(|p| Box::new(p) as Box<dyn Iterator<Item = Result<Batch>>>)
        } else {
            Prefetcher::start(jobs, self.workers, self.prefetch, move |b| host.records(b)).map(
                |p| {
                    Box::new(p.map(move |r| upload.batch(r?)))
                        as Box<dyn Iterator<Item = Result<Batch>>>
                },
            )
        };
        started.unwrap_or_else(|e| Box::new(std::iter::once(Err(e))))
    }

    fn affine_tensors(&self, scale: &[f32], shift: &[f32]) -> Result<(Tensor, Tensor)> {
        let c = scale.len();
        Ok((
            Tensor::from_slice(scale, (1, c, 1, 1), &self.device)?,
            Tensor::from_slice(shift, (1, c, 1, 1), &self.device)?,
        ))
    }
}

/// Turns a batch's records into tensors on the device, normalized.
struct Upload {
    device: Device,
    image_shape: [usize; 3],
    normalization: Normalization,
    affine: (Tensor, Tensor),
}

impl Upload {
    /// The one host-to-device copy of a batch of `n` records (labels and pixels together);
    /// the device splits and converts them.
    fn batch(&self, (n, bytes): (usize, Vec<u8>)) -> Result<Batch> {
        let [c, h, w] = self.image_shape;
        let record = 1 + c * h * w;
        let records = Tensor::from_vec(bytes, (n, record), &self.device)?;
        let labels = records.narrow(1, 0, 1)?.squeeze(1)?.cast(DType::U32)?;
        let pixels = records
            .narrow(1, 1, record - 1)?
            .cast(DType::F32)?
            .reshape((n, c, h, w))?;
        let inputs = match self.normalization {
            Normalization::Raw => pixels,
            _ => pixels
                .broadcast_mul(&self.affine.0)?
                .broadcast_add(&self.affine.1)?,
        };
        Ok(Batch::new(vec![inputs], vec![labels]))
    }
}

/// What a worker needs to assemble an epoch's batches on the host: shared, cheap to move.
struct HostBatches {
    dataset: ImageDataset,
    augmentation: Augmentation,
    /// The epoch's augmentation seed; batch `b` draws from `mix(seed, b)`.
    seed: u64,
    chunks: Arc<Vec<Vec<usize>>>,
}

impl HostBatches {
    /// Batch `b`'s records (shuffled, augmented) and their count.
    fn records(&self, b: usize) -> Result<(usize, Vec<u8>)> {
        let indices = &self.chunks[b];
        let [c, h, w] = self.dataset.image_shape;
        let record = self.dataset.record_bytes();
        let mut rng = StdRng::seed_from_u64(mix(self.seed, b as u64));
        let mut bytes = vec![0u8; indices.len() * record];
        for (dst, &i) in bytes.chunks_exact_mut(record).zip(indices) {
            dst[0] = self.dataset.label(i)?;
            let src = self.dataset.image(i)?;
            if self.augmentation.is_active() {
                augment_into(&mut dst[1..], src, [c, h, w], &self.augmentation, &mut rng);
            } else {
                dst[1..].copy_from_slice(src);
            }
        }
        Ok((indices.len(), bytes))
    }
}

impl Dataset for DataLoader {
    fn len(&self) -> usize {
        DataLoader::len(self)
    }

    fn device(&self) -> &Device {
        DataLoader::device(self)
    }

    fn batches(&self, epoch: u64) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        DataLoader::batches(self, epoch)
    }
}

/// Copies `src` into `dst` through a random padded crop and an optional mirror.
fn augment_into(
    dst: &mut [u8],
    src: &[u8],
    [c, h, w]: [usize; 3],
    aug: &Augmentation,
    rng: &mut StdRng,
) {
    let pad = aug.crop_padding as i64;
    let (dy, dx) = if pad > 0 {
        (
            rng.random_range(-pad..=pad) as isize,
            rng.random_range(-pad..=pad) as isize,
        )
    } else {
        (0, 0)
    };
    let flip = aug.horizontal_flip && rng.random::<bool>();
    for ch in 0..c {
        for y in 0..h {
            let sy = y as isize + dy;
            for x in 0..w {
                let xx = if flip { w - 1 - x } else { x };
                let sx = xx as isize + dx;
                dst[(ch * h + y) * w + x] =
                    if sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize {
                        src[(ch * h + sy as usize) * w + sx as usize]
                    } else {
                        0
                    };
            }
        }
    }
}

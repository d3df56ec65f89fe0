//! [`ImageFolder`]: Keras's `image_dataset_from_directory` — one subfolder per class, every
//! image decoded (PNG, JPEG, BMP, GIF), converted to RGB, resized bilinearly to one size, and
//! split into training and validation sets after a seeded shuffle.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::data::ImageDataset;
use crate::{Error, Result};

/// How an [`ImageFolder`] is read; the defaults are Keras's (`image_size=(256, 256)`, no
/// validation split, seed 0 for the shuffle).
///
/// # Examples
/// ```
/// use candle_functional::data::ImageFolderConfig;
/// let c = ImageFolderConfig::default();
/// assert_eq!((c.image_size, c.validation_split), ((256, 256), 0.0));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ImageFolderConfig {
    /// `(height, width)` every image is resized to.
    pub image_size: (usize, usize),
    /// Fraction of the images (after the shuffle) kept for validation, in `[0, 1)`.
    pub validation_split: f64,
    /// Seed of the shuffle that precedes the split.
    pub seed: u64,
}

impl Default for ImageFolderConfig {
    fn default() -> Self {
        Self {
            image_size: (256, 256),
            validation_split: 0.0,
            seed: 0,
        }
    }
}

/// Images read from a folder with one subfolder per class (sorted names give the labels
/// 0, 1, …), as `ImageDataset`s of RGB images, ready for a
/// [`DataLoader`](crate::data::DataLoader).
///
/// # Examples
/// ```no_run
/// use candle_core::Device;
/// use candle_functional::data::{DataLoader, ImageFolder, ImageFolderConfig};
/// let folder = ImageFolder::load(
///     "flowers",
///     ImageFolderConfig { image_size: (64, 64), validation_split: 0.2, seed: 1 },
/// )?;
/// println!("classes: {:?}", folder.class_names());
/// let train = DataLoader::new(folder.train().clone(), 32, &Device::Cpu)?.shuffle(true);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ImageFolder {
    train: ImageDataset,
    validation: Option<ImageDataset>,
    class_names: Vec<String>,
}

/// File endings Keras reads (and that the decoders here handle).
const IMAGE_ENDINGS: [&str; 5] = ["png", "jpg", "jpeg", "bmp", "gif"];

impl ImageFolder {
    /// Reads `dir`: its subfolders are the classes, in sorted order; files with other endings
    /// are skipped. A file that does not decode is an error naming it.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::data::{ImageFolder, ImageFolderConfig};
    /// let err = ImageFolder::load("no/such/folder", ImageFolderConfig::default()).unwrap_err();
    /// assert!(err.to_string().contains("no/such/folder"));
    /// ```
    pub fn load(dir: impl AsRef<Path>, config: ImageFolderConfig) -> Result<Self> {
        let dir = dir.as_ref();
        let (h, w) = config.image_size;
        if h == 0 || w == 0 || !(0.0..1.0).contains(&config.validation_split) {
            return Err(Error::InvalidArgument(format!(
                "image folder: image size {:?} must be positive and the validation split {} in [0, 1)",
                config.image_size, config.validation_split
            )));
        }
        let class_names = sorted_entries(dir, true)?;
        if class_names.is_empty() || class_names.len() > 256 {
            return Err(Error::Data {
                path: dir.to_path_buf(),
                record: None,
                message: format!(
                    "expected 1 to 256 class subfolders, found {}",
                    class_names.len()
                ),
            });
        }
        let mut files: Vec<(PathBuf, u8)> = Vec::new();
        for (label, class) in class_names.iter().enumerate() {
            for name in sorted_entries(&dir.join(class), false)? {
                let ending = name.rsplit('.').next().unwrap_or("").to_lowercase();
                if IMAGE_ENDINGS.contains(&ending.as_str()) {
                    files.push((dir.join(class).join(name), label as u8));
                }
            }
        }
        if files.is_empty() {
            return Err(Error::Data {
                path: dir.to_path_buf(),
                record: None,
                message: "no image files in the class subfolders".into(),
            });
        }
        files.shuffle(&mut StdRng::seed_from_u64(config.seed));
        let validation_count = (files.len() as f64 * config.validation_split).round() as usize;
        let (train_files, validation_files) = files.split_at(files.len() - validation_count);
        let train = read_images(train_files, config.image_size)?;
        let validation = (!validation_files.is_empty())
            .then(|| read_images(validation_files, config.image_size))
            .transpose()?;
        Ok(Self {
            train,
            validation,
            class_names,
        })
    }

    /// The training images (all of them without a validation split).
    ///
    /// # Examples
    /// ```no_run
    /// # use candle_functional::data::{ImageFolder, ImageFolderConfig};
    /// let folder = ImageFolder::load("flowers", ImageFolderConfig::default())?;
    /// println!("{} training images", folder.train().len());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn train(&self) -> &ImageDataset {
        &self.train
    }

    /// The validation images, when a split was asked for and left any.
    ///
    /// # Examples
    /// ```no_run
    /// # use candle_functional::data::{ImageFolder, ImageFolderConfig};
    /// let folder = ImageFolder::load("flowers", ImageFolderConfig::default())?;
    /// assert!(folder.validation().is_none());
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn validation(&self) -> Option<&ImageDataset> {
        self.validation.as_ref()
    }

    /// The class names, indexed by label.
    ///
    /// # Examples
    /// ```no_run
    /// # use candle_functional::data::{ImageFolder, ImageFolderConfig};
    /// let folder = ImageFolder::load("flowers", ImageFolderConfig::default())?;
    /// println!("label 0 is {}", folder.class_names()[0]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }
}

/// Sorted names of the subfolders (`folders`) or files of `dir`, hidden entries skipped.
fn sorted_entries(dir: &Path, folders: bool) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let is_dir = entry
            .file_type()
            .map_err(|e| Error::io(entry.path(), e))?
            .is_dir();
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_dir == folders && !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Decodes, converts to RGB and resizes every file into one CHW `u8` dataset.
fn read_images(files: &[(PathBuf, u8)], (h, w): (usize, usize)) -> Result<ImageDataset> {
    let mut pixels = Vec::with_capacity(files.len() * 3 * h * w);
    let mut labels = Vec::with_capacity(files.len());
    for (path, label) in files {
        let decoded = image::open(path).map_err(|e| Error::Data {
            path: path.clone(),
            record: None,
            message: format!("cannot decode the image: {e}"),
        })?;
        let rgb =
            image::imageops::resize(&decoded.to_rgb8(), w as u32, h as u32, FilterType::Triangle);
        // HWC as decoded, CHW as the crate's tensors.
        for channel in 0..3 {
            pixels.extend(rgb.pixels().map(|p| p[channel]));
        }
        labels.push(*label);
    }
    ImageDataset::from_parts(&pixels, &labels, [3, h, w])
}

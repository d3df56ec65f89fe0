//! CIFAR-10 in its official *binary* layout: `data_batch_1.bin` … `data_batch_5.bin` and
//! `test_batch.bin`, each a run of 3073-byte records (a label byte 0–9, then the red, green
//! and blue 32×32 planes, row-major). Every file is checked before use: its size must be a
//! whole number of records and every label at most 9; errors name the file and the record.

use std::path::{Path, PathBuf};

use crate::data::ImageDataset;
use crate::{Error, Result};

/// Where the official binary archive lives.
pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// Its SHA-256.
pub const CIFAR10_SHA256: &str = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd";
/// The folder the archive unpacks to.
pub const CIFAR10_FOLDER: &str = "cifar-10-batches-bin";

/// Bytes of one record: a label and a 3×32×32 image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Bytes of one image.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;
/// The training files, in order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test file.
pub const TEST_FILE: &str = "test_batch.bin";
/// Class names in label order.
pub const CLASS_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The training and test sets.
///
/// # Examples
/// ```no_run
/// use candle_functional::data::Cifar10;
/// let data = Cifar10::load("data/cifar-10-batches-bin")?;
/// assert_eq!(data.train().len(), 50_000);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Cifar10 {
    train: ImageDataset,
    test: ImageDataset,
}

impl Cifar10 {
    /// Reads and checks the six files of a `cifar-10-batches-bin` folder.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{data::Cifar10, Error};
    /// let err = Cifar10::load("no/such/folder").unwrap_err();
    /// assert!(matches!(err, Error::Io { .. }));
    /// ```
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut train = Vec::new();
        for name in TRAIN_FILES {
            train.extend(read_records(&dir.join(name))?);
        }
        let test = read_records(&dir.join(TEST_FILE))?;
        Ok(Self {
            train: ImageDataset::from_records(train, [3, 32, 32])?,
            test: ImageDataset::from_records(test, [3, 32, 32])?,
        })
    }

    /// The 50,000 training images (or fewer in a smaller copy).
    ///
    /// # Examples
    /// ```no_run
    /// # let data = candle_functional::data::Cifar10::load("d")?;
    /// let first_1000 = data.train().subset(1000);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn train(&self) -> &ImageDataset {
        &self.train
    }

    /// The 10,000 test images.
    ///
    /// # Examples
    /// ```no_run
    /// # let data = candle_functional::data::Cifar10::load("d")?;
    /// assert_eq!(data.test().len(), 10_000);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn test(&self) -> &ImageDataset {
        &self.test
    }

    /// `true` when `dir` holds all six files (it does not check their contents).
    ///
    /// # Examples
    /// ```
    /// assert!(!candle_functional::data::Cifar10::is_present("no/such/folder"));
    /// ```
    pub fn is_present(dir: impl AsRef<Path>) -> bool {
        let dir = dir.as_ref();
        TRAIN_FILES
            .iter()
            .chain([&TEST_FILE])
            .all(|f| dir.join(f).is_file())
    }

    /// What to tell a user whose data folder is missing.
    ///
    /// # Examples
    /// ```
    /// let help = candle_functional::data::Cifar10::missing_help("data/cifar-10-batches-bin");
    /// assert!(help.contains("cifar-10-binary.tar.gz"));
    /// ```
    pub fn missing_help(dir: impl AsRef<Path>) -> String {
        format!(
            "CIFAR-10 was not found in {}.\n\
             Get the binary version (170,052,171 bytes) and unpack it:\n  \
             curl -O {url}\n  \
             echo '{sha}  cifar-10-binary.tar.gz' | sha256sum -c\n  \
             tar xzf cifar-10-binary.tar.gz   # creates cifar-10-batches-bin/\n\
             then pass --data-dir path/to/cifar-10-batches-bin \
             (or build with `--features download` to fetch it automatically).",
            dir.as_ref().display(),
            url = CIFAR10_URL,
            sha = CIFAR10_SHA256,
        )
    }
}

/// Reads one binary batch file and checks it: the size must be a whole number of records
/// and every label at most 9.
///
/// # Examples
/// ```
/// use candle_functional::data::cifar10::{read_records, RECORD_BYTES};
/// let dir = std::env::temp_dir().join("cf_doc_cifar");
/// std::fs::create_dir_all(&dir)?;
/// let path = dir.join("bad.bin");
/// std::fs::write(&path, vec![0u8; RECORD_BYTES + 10])?;
/// let err = read_records(&path).unwrap_err().to_string();
/// assert!(err.contains("bad.bin") && err.contains("record 1"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_records(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let path_buf = PathBuf::from(path);
    if bytes.is_empty() {
        return Err(Error::Data {
            path: path_buf,
            record: None,
            message: "the file is empty".into(),
        });
    }
    let rest = bytes.len() % RECORD_BYTES;
    if rest != 0 {
        return Err(Error::Data {
            path: path_buf,
            record: Some(bytes.len() / RECORD_BYTES),
            message: format!(
                "truncated: the file has {} bytes, not a multiple of {RECORD_BYTES}; its last record has {rest} bytes",
                bytes.len()
            ),
        });
    }
    if let Some((record, label)) = bytes
        .chunks_exact(RECORD_BYTES)
        .map(|r| r[0])
        .enumerate()
        .find(|&(_, label)| label > 9)
    {
        return Err(Error::Data {
            path: path_buf,
            record: Some(record),
            message: format!("label {label} is not a CIFAR-10 class (0-9)"),
        });
    }
    Ok(bytes)
}

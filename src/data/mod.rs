//! Data: the [`Dataset`] trait that training reads (batches of any inputs and targets),
//! [`TensorDataset`] for tensors in memory, the CIFAR-10 reader ([`Cifar10`]), image
//! datasets and their batch loader ([`DataLoader`]), and the official archive's checksum and
//! extraction.

pub(crate) mod adapt;
pub(crate) mod archive;
pub mod cifar10;
pub(crate) mod dataset;
pub(crate) mod image_folder;
pub(crate) mod loader;
pub(crate) mod prefetch;

#[cfg(feature = "download")]
pub use archive::download_cifar10;
pub use archive::{extract_cifar10_archive, sha256_file};
pub use cifar10::{CIFAR10_FOLDER, CIFAR10_SHA256, CIFAR10_URL, Cifar10};
pub use dataset::{Batch, Dataset, TensorDataset};
pub use image_folder::{ImageFolder, ImageFolderConfig};
pub use loader::{Augmentation, DataLoader, ImageDataset, Normalization};

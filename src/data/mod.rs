//! Data: the CIFAR-10 reader ([`Cifar10`]), in-memory image datasets and the batch loader
//! ([`DataLoader`]), and the official archive's checksum and extraction.

pub(crate) mod archive;
pub mod cifar10;
pub(crate) mod loader;

#[cfg(feature = "download")]
pub use archive::download_cifar10;
pub use archive::{
    CIFAR10_FOLDER, CIFAR10_SHA256, CIFAR10_URL, extract_cifar10_archive, sha256_file,
};
pub use cifar10::Cifar10;
pub use loader::{Augmentation, Batch, DataLoader, ImageDataset, Normalization};

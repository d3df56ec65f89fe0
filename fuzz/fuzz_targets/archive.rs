//! Any bytes as the CIFAR-10 archive: a data folder or an error, never a panic, never a file
//! outside the destination.
#![no_main]

use candle_functional::data::extract_cifar10_archive;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let archive = dir.path().join("cifar-10-binary.tar.gz");
    std::fs::write(&archive, data).expect("write");
    let _ = extract_cifar10_archive(&archive, None, &dir.path().join("out"));
});

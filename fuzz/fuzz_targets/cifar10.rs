//! Any bytes as a CIFAR-10 batch file: records or an error naming the file, never a panic.
#![no_main]

use candle_functional::data::cifar10::read_records;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("data_batch_1.bin");
    std::fs::write(&path, data).expect("write");
    let _ = read_records(&path);
});

//! Any bytes as a `.keras` file: an error or a model, never a panic.
#![no_main]

use candle_core::Device;
use candle_functional::prelude::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("m.keras");
    std::fs::write(&path, data).expect("write");
    let _ = Model::from_keras(&path, &Device::Cpu);
});

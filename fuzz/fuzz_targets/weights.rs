//! Any bytes as a weights file: an error or a load, never a panic.
#![no_main]

use candle_core::{DType, Device};
use candle_functional::prelude::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let x = Input::new([3]);
    let y = Dense::new(2)
        .call(&BatchNorm::new().call(&x).expect("graph"))
        .expect("graph");
    let model = Model::new(&[x], &[y])
        .expect("model")
        .build(&Device::Cpu, DType::F32, 0)
        .expect("build");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("w.safetensors");
    std::fs::write(&path, data).expect("write");
    let _ = model.load_weights(&path);
});

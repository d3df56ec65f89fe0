//! Any bytes as a training checkpoint: an error or a load, never a panic.
#![no_main]

use candle_core::{DType, Device};
use candle_functional::prelude::*;
use candle_functional::train::{AdamConfig, Loss, Trainer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let x = Input::new([3]);
    let y = Dense::new(2).call(&x).expect("graph");
    let model = Model::new(&[x], &[y])
        .expect("model")
        .build(&Device::Cpu, DType::F32, 0)
        .expect("build");
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    let mut trainer = Trainer::new(model, AdamConfig::default(), loss).expect("trainer");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("run.ckpt");
    std::fs::write(&path, data).expect("write");
    let _ = trainer.load_checkpoint(&path);
});

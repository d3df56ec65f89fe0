//! Seeded mutation tests of every parser that reads a file (the stable-Rust counterpart of the
//! fuzz targets in `fuzz/`): thousands of corrupted inputs each, asserting no panic and no
//! silent acceptance of changed data where the format can tell (checksummed checkpoints),
//! and an error naming the file and record where it cannot (CIFAR-10 labels).

mod common;

use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_functional::data::cifar10::{RECORD_BYTES, read_records};
use candle_functional::data::{TensorDataset, extract_cifar10_archive};
use candle_functional::prelude::*;
use candle_functional::train::{AdamConfig, Loss, Trainer};

/// A seeded stream of mutations: flip one bit, overwrite a byte, or cut the file.
struct Mutator(u64);

impl Mutator {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }

    fn mutate(&mut self, original: &[u8]) -> Vec<u8> {
        let mut bytes = original.to_vec();
        let at = self.next() as usize % bytes.len();
        match self.next() % 8 {
            0 => bytes.truncate(at),
            1 => bytes[at] = self.next() as u8,
            _ => bytes[at] ^= 1 << (self.next() % 8),
        }
        bytes
    }
}

fn trainer() -> Trainer {
    let x = Input::new([3]);
    let y = Dense::new(2)
        .call(&BatchNorm::new().call(&x).unwrap())
        .unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap();
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    Trainer::new(model, AdamConfig::default(), loss).unwrap()
}

#[test]
fn corrupted_checkpoints_are_refused_or_load_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ckpt");
    let mut trained = trainer();
    let data = TensorDataset::new(
        vec![Tensor::randn(0f32, 1.0, (4, 3), &Device::Cpu).unwrap()],
        vec![Tensor::new(&[0u32, 1, 1, 0], &Device::Cpu).unwrap()],
        2,
    )
    .unwrap();
    trained.fit(&data, None, 1, &mut []).unwrap();
    trained.save_checkpoint(&path).unwrap();
    let original = fs::read(&path).unwrap();
    let reference = trained.model().weight_map().unwrap();

    let mut target = trainer();
    let mut mutator = Mutator(11);
    let corrupted = dir.path().join("corrupted.ckpt");
    let (cases, mut refused) = (10_000, 0);
    for _ in 0..cases {
        fs::write(&corrupted, mutator.mutate(&original)).unwrap();
        match target.load_checkpoint(&corrupted) {
            Err(_) => refused += 1,
            Ok(()) => {
                assert_eq!(
                    target.epochs_done(),
                    1,
                    "a corrupted checkpoint changed the epoch"
                );
                assert_eq!(target.history(), trained.history());
                for (name, value) in target.model().weight_map().unwrap() {
                    let diff = common::max_abs_diff(&value, &reference[&name]);
                    assert_eq!(diff, 0.0, "a corrupted checkpoint changed {name}");
                }
            }
        }
    }
    eprintln!("{refused} of {cases} corrupted files refused, the rest loaded unchanged");
    assert!(
        refused > cases * 8 / 10,
        "only {refused} of {cases} refused"
    );
}

#[test]
fn corrupted_cifar_files_never_panic_and_bad_labels_name_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data_batch_1.bin");
    let mut original = Vec::new();
    for i in 0..4 {
        original.push(i as u8);
        original.extend(std::iter::repeat_n(i as u8, RECORD_BYTES - 1));
    }
    let mut mutator = Mutator(5);
    for _ in 0..10_000 {
        let bytes = mutator.mutate(&original);
        fs::write(&path, &bytes).unwrap();
        let result = read_records(&path);
        let labels_ok =
            bytes.len() == original.len() && bytes.chunks(RECORD_BYTES).all(|r| r[0] < 10);
        match result {
            Ok(_) => assert!(labels_ok, "a file with bad labels or length was accepted"),
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("data_batch_1.bin"), "{text}");
                if bytes.len() == original.len() {
                    assert!(text.contains("record"), "{text}");
                }
            }
        }
    }
}

#[test]
fn corrupted_archives_never_panic_and_leave_nothing_half_done() {
    let dir = tempfile::tempdir().unwrap();
    // A tiny archive: six files of two records each.
    let src = dir.path().join("src/cifar-10-batches-bin");
    fs::create_dir_all(&src).unwrap();
    for name in candle_functional::data::cifar10::TRAIN_FILES
        .iter()
        .chain([&candle_functional::data::cifar10::TEST_FILE])
    {
        let mut bytes = Vec::new();
        for i in 0..2u8 {
            bytes.push(i);
            bytes.extend(std::iter::repeat_n(i, RECORD_BYTES - 1));
        }
        fs::write(src.join(name), bytes).unwrap();
    }
    let tarball = dir.path().join("a.tar.gz");
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        fs::File::create(&tarball).unwrap(),
        flate2::Compression::fast(),
    ));
    builder
        .append_dir_all("cifar-10-batches-bin", &src)
        .unwrap();
    builder.into_inner().unwrap().finish().unwrap();
    let original = fs::read(&tarball).unwrap();

    let mut mutator = Mutator(3);
    let corrupted = dir.path().join("corrupted.tar.gz");
    for i in 0..10_000 {
        fs::write(&corrupted, mutator.mutate(&original)).unwrap();
        let dest = dir.path().join(format!("out{}", i % 4));
        if extract_cifar10_archive(&corrupted, None, &dest).is_ok() {
            // Whatever was accepted reads as CIFAR-10.
            assert!(
                candle_functional::data::Cifar10::load(dest.join("cifar-10-batches-bin")).is_ok()
            );
        }
        // No staging folder is left behind either way.
        let left: Vec<_> = fs::read_dir(&dest)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".partial"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
    assert!(Path::new(&tarball).is_file());
}

#[cfg(feature = "keras")]
#[test]
fn corrupted_keras_files_never_panic_and_name_the_file() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keras_import_cnn.keras");
    let original = fs::read(fixture).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mutated.keras");
    let mut mutator = Mutator(7);
    let mut refused = 0;
    for _ in 0..2_000 {
        fs::write(&path, mutator.mutate(&original)).unwrap();
        if let Err(e) = Model::from_keras(&path, &Device::Cpu) {
            refused += 1;
            let text = e.to_string();
            assert!(text.contains("mutated.keras"), "{text}");
        }
    }
    // Most changes hit checksummed zip entries or the HDF5 structure and are refused.
    assert!(
        refused > 1_000,
        "only {refused} of 2000 corrupted files refused"
    );
}

#[test]
fn corrupted_architectures_never_panic() {
    let x = Input::named("image", [3, 8, 8]);
    let h = Conv2D::new(4, 3).padding(Padding::Same).call(&x).unwrap();
    let h = BatchNorm::new().call(&h).unwrap();
    let skip = Conv2D::new(4, 1).call(&x).unwrap();
    let h = Add::new().call_many(&[h, skip]).unwrap();
    let h = Flatten::new().call(&h).unwrap();
    let y = Dense::new(2).call(&h).unwrap();
    let json = Model::new(&[x], &[y]).unwrap().to_json().unwrap();
    // Mutate the text where the numbers, names and structure are.
    let original = json.as_bytes();
    let mut mutator = Mutator(9);
    let mut loaded = 0;
    for _ in 0..3_000 {
        let bytes = mutator.mutate(original);
        if let Ok(text) = std::str::from_utf8(&bytes)
            && Model::from_json(text).is_ok()
        {
            loaded += 1;
        }
    }
    // Some changes (a digit of an unused field, a trainable flag) still describe a model.
    assert!(loaded < 3_000);
}

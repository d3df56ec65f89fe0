//! CIFAR-10 reading and checking on synthetic files, the archive path on a tarball made here,
//! and the batch loader (order, shuffling, normalization, augmentation).

use std::fs;
use std::path::Path;

use candle_core::Device;
use candle_functional::Error;
use candle_functional::data::cifar10::{RECORD_BYTES, TEST_FILE, TRAIN_FILES};
use candle_functional::data::*;

/// Writes `n` records per file: label `i % 10`, every pixel of image `i` equal to `i % 256`.
fn write_fake_cifar(dir: &Path, n: usize) {
    fs::create_dir_all(dir).unwrap();
    for name in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        let mut bytes = Vec::with_capacity(n * RECORD_BYTES);
        for i in 0..n {
            bytes.push((i % 10) as u8);
            bytes.extend(std::iter::repeat_n((i % 256) as u8, RECORD_BYTES - 1));
        }
        fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn reads_the_binary_layout() {
    let dir = tempfile::tempdir().unwrap();
    write_fake_cifar(dir.path(), 7);
    let data = Cifar10::load(dir.path()).unwrap();
    assert_eq!(data.train().len(), 35);
    assert_eq!(data.test().len(), 7);
    assert_eq!(data.train().label(3).unwrap(), 3);
    assert_eq!(data.train().label(8).unwrap(), 1); // second file, second record
    assert_eq!(data.train().image(3).unwrap()[0], 3);
    assert_eq!(data.train().image(3).unwrap().len(), 3072);
    assert_eq!(data.train().subset(10).len(), 10);
}

#[test]
fn truncated_file_names_file_and_record() {
    let dir = tempfile::tempdir().unwrap();
    write_fake_cifar(dir.path(), 4);
    let path = dir.path().join("data_batch_3.bin");
    let mut bytes = fs::read(&path).unwrap();
    bytes.truncate(3 * RECORD_BYTES + 100);
    fs::write(&path, bytes).unwrap();
    let err = Cifar10::load(dir.path()).unwrap_err();
    match &err {
        Error::Data {
            path: p, record, ..
        } => {
            assert!(p.ends_with("data_batch_3.bin"));
            assert_eq!(*record, Some(3));
        }
        other => panic!("wrong error: {other}"),
    }
    assert!(err.to_string().contains("data_batch_3.bin"));
}

#[test]
fn bad_label_names_file_and_record() {
    let dir = tempfile::tempdir().unwrap();
    write_fake_cifar(dir.path(), 4);
    let path = dir.path().join(TEST_FILE);
    let mut bytes = fs::read(&path).unwrap();
    bytes[2 * RECORD_BYTES] = 12;
    fs::write(&path, bytes).unwrap();
    let err = Cifar10::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("test_batch.bin") && err.contains("record 2") && err.contains("12"),
        "{err}"
    );
}

#[test]
fn missing_folder_says_how_to_get_the_data() {
    assert!(!Cifar10::is_present("nowhere"));
    let help = Cifar10::missing_help("nowhere");
    assert!(help.contains(CIFAR10_URL) && help.contains(CIFAR10_SHA256));
}

fn make_tarball(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    write_fake_cifar(&src.join(CIFAR10_FOLDER), 3);
    let tarball = dir.join("cifar-10-binary.tar.gz");
    let file = fs::File::create(&tarball).unwrap();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    builder
        .append_dir_all(CIFAR10_FOLDER, src.join(CIFAR10_FOLDER))
        .unwrap();
    builder.into_inner().unwrap().finish().unwrap();
    tarball
}

#[test]
fn archive_is_checked_and_unpacked() {
    let dir = tempfile::tempdir().unwrap();
    let tarball = make_tarball(dir.path());
    let digest = sha256_file(&tarball).unwrap();
    let dest = dir.path().join("data");
    let folder = extract_cifar10_archive(&tarball, Some(&digest), &dest).unwrap();
    assert_eq!(folder, dest.join(CIFAR10_FOLDER));
    assert_eq!(Cifar10::load(&folder).unwrap().train().len(), 15);
    // Only the data folder is left behind.
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 1);
}

#[test]
fn wrong_checksum_is_refused_before_unpacking() {
    let dir = tempfile::tempdir().unwrap();
    let tarball = make_tarball(dir.path());
    let dest = dir.path().join("data");
    let err = extract_cifar10_archive(&tarball, Some(CIFAR10_SHA256), &dest).unwrap_err();
    assert!(err.to_string().contains("SHA-256"), "{err}");
    assert!(!dest.join(CIFAR10_FOLDER).exists());
}

#[test]
fn loader_batches_keep_order_and_normalize() {
    let images: Vec<u8> = (0..5u8).flat_map(|i| [i * 10; 4]).collect();
    let ds = ImageDataset::from_parts(&images, &[0, 1, 2, 3, 4], [1, 2, 2]).unwrap();
    let loader = DataLoader::new(ds.clone(), 2, &Device::Cpu)
        .unwrap()
        .normalization(Normalization::UnitRange);
    let batches: Vec<Batch> = loader.batches(0).collect::<Result<_, _>>().unwrap();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[1].targets[0].to_vec1::<u32>().unwrap(), [2, 3]);
    let px = batches[1].inputs[0]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    approx::assert_abs_diff_eq!(px[0], 20.0 / 255.0, epsilon = 1e-6);
    approx::assert_abs_diff_eq!(px[4], 30.0 / 255.0, epsilon = 1e-6);

    let std = DataLoader::new(ds, 5, &Device::Cpu)
        .unwrap()
        .normalization(Normalization::MeanStd {
            mean: [0.5; 3],
            std: [0.25; 3],
        });
    let batch = std.batches(0).next().unwrap().unwrap();
    let px = batch.inputs[0]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    approx::assert_abs_diff_eq!(px[4], (10.0 / 255.0 - 0.5) / 0.25, epsilon = 1e-5);
}

#[test]
fn shuffling_is_a_seeded_permutation_per_epoch() {
    let ds =
        ImageDataset::from_parts(&[0u8; 20 * 4], &(0..20).collect::<Vec<u8>>(), [1, 2, 2]).unwrap();
    let loader = DataLoader::new(ds, 20, &Device::Cpu)
        .unwrap()
        .shuffle(true)
        .seed(1);
    let order = |epoch| {
        loader.batches(epoch).next().unwrap().unwrap().targets[0]
            .to_vec1::<u32>()
            .unwrap()
    };
    let (e0, e1) = (order(0), order(1));
    assert_ne!(e0, (0..20).collect::<Vec<u32>>());
    assert_ne!(e0, e1);
    assert_eq!(e0, order(0));
    let mut sorted = e1.clone();
    sorted.sort();
    assert_eq!(sorted, (0..20).collect::<Vec<u32>>());
}

#[test]
fn augmentation_crops_and_flips() {
    // One 1x4x4 image with distinct pixels 1..16.
    let image: Vec<u8> = (1..=16).collect();
    let ds = ImageDataset::from_parts(&image, &[0], [1, 4, 4]).unwrap();
    let loader = DataLoader::new(ds, 1, &Device::Cpu)
        .unwrap()
        .augmentation(Augmentation {
            crop_padding: 1,
            horizontal_flip: true,
        })
        .seed(5);
    let original: Vec<f32> = image.iter().map(|&v| v as f32).collect();
    let mut seen_changed = false;
    for epoch in 0..20 {
        let out = loader.batches(epoch).next().unwrap().unwrap().inputs[0]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Every output is the image shifted by at most one pixel (zeros shifted in),
        // possibly mirrored.
        let matches = |flip: bool, dy: isize, dx: isize| {
            (0..4).all(|y| {
                (0..4).all(|x| {
                    let xx = if flip { 3 - x } else { x };
                    let (sy, sx) = (y as isize + dy, xx as isize + dx);
                    let want = if (0..4).contains(&sy) && (0..4).contains(&sx) {
                        original[(sy * 4 + sx) as usize]
                    } else {
                        0.0
                    };
                    out[y * 4 + x] == want
                })
            })
        };
        let ok = [false, true]
            .iter()
            .any(|&f| (-1..=1).any(|dy| (-1..=1).any(|dx| matches(f, dy, dx))));
        assert!(ok, "epoch {epoch}: {out:?} is not a shifted/flipped crop");
        seen_changed |= out != original;
    }
    assert!(seen_changed);
}

#[test]
fn archives_with_links_are_refused_and_stale_staging_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("linked.tar.gz");
    let file = fs::File::create(&tarball).unwrap();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    builder
        .append_link(
            &mut header,
            format!("{CIFAR10_FOLDER}/data_batch_1.bin"),
            "/etc/passwd",
        )
        .unwrap();
    builder.into_inner().unwrap().finish().unwrap();
    let dest = dir.path().join("data");
    // A staging folder of an extraction killed long ago (that pid never runs).
    let stale = dest.join(format!(".{CIFAR10_FOLDER}.partial4000000000"));
    fs::create_dir_all(&stale).unwrap();
    let err = extract_cifar10_archive(&tarball, None, &dest)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data_batch_1.bin") && err.contains("refused"),
        "{err}"
    );
    assert!(!dest.join(CIFAR10_FOLDER).exists());
    if Path::new("/proc").is_dir() {
        assert!(!stale.exists(), "the stale staging folder is still there");
    }
}

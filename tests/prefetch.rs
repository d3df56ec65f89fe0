//! `DataLoader::workers`: batches prepared on background threads come in the same order with
//! the same augmentation as without workers, `fit` records the time it waited for data, and
//! a `fit` that fails mid-epoch leaves no worker thread behind. One test in its own binary,
//! so that the thread count it reads is not disturbed by other tests.

use candle_core::{DType, Device};
use candle_functional::data::{Augmentation, DataLoader, ImageDataset};
use candle_functional::prelude::*;
use candle_functional::train::{AdamConfig, Loss, Trainer};

const CPU: Device = Device::Cpu;

/// This process's threads (Linux's `/proc/self/status`).
fn threads() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

fn images(labels: &[u8]) -> ImageDataset {
    let pixels: Vec<u8> = (0..labels.len() * 3 * 8 * 8)
        .map(|i| (i * 37 % 251) as u8)
        .collect();
    ImageDataset::from_parts(&pixels, labels, [3, 8, 8]).unwrap()
}

fn trainer() -> Trainer {
    let x = Input::new([3, 8, 8]);
    let h = Conv2D::new(4, 3).call(&x).unwrap();
    let y = Dense::new(3)
        .call(&GlobalAveragePooling2D::new().call(&h).unwrap())
        .unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, 0)
        .unwrap();
    Trainer::new(
        model,
        AdamConfig::default(),
        Loss::SparseCategoricalCrossentropy { from_logits: true },
    )
    .unwrap()
}

#[test]
fn background_workers_keep_order_record_waiting_and_leave_no_thread() {
    let labels: Vec<u8> = (0..50).map(|i| (i % 3) as u8).collect();
    let loader = DataLoader::new(images(&labels), 8, &CPU)
        .unwrap()
        .shuffle(true)
        .seed(5)
        .augmentation(Augmentation::standard());
    let collect = |l: &DataLoader, epoch| -> Vec<(Vec<f32>, Vec<u32>)> {
        l.batches(epoch)
            .map(|b| {
                let b = b.unwrap();
                (
                    b.inputs[0].flatten_all().unwrap().to_vec1().unwrap(),
                    b.targets[0].to_vec1().unwrap(),
                )
            })
            .collect()
    };
    for epoch in [0, 3] {
        let inline = collect(&loader, epoch);
        assert_eq!(inline.len(), 7);
        for workers in [1, 3] {
            let background = collect(&loader.clone().workers(workers).prefetch(1), epoch);
            assert!(
                inline == background,
                "epoch {epoch}, {workers} workers differ"
            );
        }
    }

    // fit records how long it waited for batches, inside the epoch's time.
    let mut t = trainer();
    let history = t.fit(&loader.clone().workers(2), None, 1, &mut []).unwrap();
    let log = history.last().unwrap();
    assert!(
        log.data_wait_seconds > 0.0 && log.data_wait_seconds <= log.seconds,
        "{log:?}"
    );

    // A label out of range in the fourth batch fails the step there: fit returns the error
    // and the workers, some still preparing later batches, are gone.
    let before = threads();
    let mut bad = labels.clone();
    bad[30] = 9;
    let failing = DataLoader::new(images(&bad), 8, &CPU).unwrap().workers(2);
    assert_eq!(failing.len(), 7);
    let err = trainer()
        .fit(&failing, None, 1, &mut [])
        .expect_err("label 9 of 3 classes")
        .to_string();
    assert!(err.contains('9'), "{err}");
    match (before, threads()) {
        (Some(before), Some(after)) => assert_eq!(after, before, "threads left behind"),
        _ => eprintln!("skipped the thread count: /proc/self/status is not readable here"),
    }
}

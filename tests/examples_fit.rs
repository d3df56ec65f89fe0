//! The `fit` examples run end to end with small settings: the U-Net segmentation (writes its
//! PNG, reports mean IoU), transfer learning (freezes, trains the head, fine-tunes) and the
//! custom skip connections (two models trained with `fit`).

use std::path::PathBuf;
use std::process::Command;

/// `cargo test` builds the examples next to the test binaries.
fn example(name: &str) -> Command {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin: PathBuf = dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run through `cargo test`",
        bin.display()
    );
    Command::new(bin)
}

fn run(mut command: Command) -> String {
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn segmentation_trains_a_u_net_and_draws_its_masks() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("masks.png");
    let mut command = example("segmentation");
    command.args([
        "--images",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
    ]);
    command.arg(&png);
    let text = run(command);
    assert!(
        text.contains("val_mean_iou") && text.contains("mean IoU"),
        "{text}"
    );
    let picture = image::open(&png).unwrap();
    assert_eq!(picture.width(), 3 * 128 + 2 * 4);
}

#[test]
fn transfer_learning_freezes_then_fine_tunes() {
    let mut command = example("transfer_learning");
    command.args([
        "--quick",
        "--subset",
        "64",
        "--head-epochs",
        "1",
        "--batch-size",
        "32",
    ]);
    let text = run(command);
    assert!(
        text.contains("cut at") && text.contains("unfrozen"),
        "{text}"
    );
    assert!(text.contains("after fine-tuning"), "{text}");
}

#[test]
fn custom_skip_trains_both_models_with_fit() {
    let text = run(example("custom_skip"));
    assert!(
        text.contains("dense_net: loss") && text.contains("image_and_metadata: loss"),
        "{text}"
    );
}

//! The main example runs end to end on a tiny synthetic CIFAR-10 folder: it trains both
//! networks, writes histories, weights, summaries, checkpoints and PNG curves, prints the
//! comparison, and resumes; without data it says how to get it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_functional::data::cifar10::{RECORD_BYTES, TEST_FILE, TRAIN_FILES};
use candle_functional::train::History;

/// `cargo test` builds the examples next to the test binaries.
fn example_binary() -> PathBuf {
    example("train_cifar10")
}

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run through `cargo test`",
        bin.display()
    );
    bin
}

fn write_tiny_cifar(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let mut s = 1u64;
    for name in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        let mut bytes = Vec::new();
        for i in 0..8 {
            bytes.push((i % 10) as u8);
            bytes.extend((0..RECORD_BYTES - 1).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                (s >> 56) as u8
            }));
        }
        fs::write(dir.join(name), bytes).unwrap();
    }
}

fn train(data: &Path, out: &Path, epochs: &str, extra: &[&str]) -> std::process::Output {
    Command::new(example_binary())
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args([
            "--epochs",
            epochs,
            "--batch-size",
            "16",
            "--width-divisor",
            "16",
            "--stages",
            "1,1",
        ])
        .args(["--device", "cpu", "--quiet"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn trains_both_models_and_writes_every_artifact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar-10-batches-bin");
    write_tiny_cifar(&data);
    let out = tmp.path().join("runs");
    let run = train(&data, &out, "2", &["--augment", "--schedule", "cosine"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("resnet - plain_net:") && stdout.contains("points"),
        "{stdout}"
    );
    for model in ["resnet", "plain_net"] {
        let dir = out.join(model);
        for file in [
            "history.json",
            "history.csv",
            "weights.safetensors",
            "summary.txt",
            "curves.png",
            "last.ckpt",
            "best.ckpt",
        ] {
            let path = dir.join(file);
            assert!(
                path.is_file() && fs::metadata(&path).unwrap().len() > 0,
                "{} missing",
                path.display()
            );
        }
        let history =
            History::from_json(&fs::read_to_string(dir.join("history.json")).unwrap()).unwrap();
        assert_eq!(history.epochs().len(), 2);
        assert!(
            history
                .epochs()
                .iter()
                .all(|e| e.metric("val_accuracy").is_some() && e.loss.is_finite())
        );
    }
    let png = fs::read(out.join("comparison.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Resuming under another seed (other shuffles, other augmentation) is refused, naming both.
    let other = train(
        &data,
        &out,
        "3",
        &[
            "--augment",
            "--schedule",
            "cosine",
            "--resume",
            "--model",
            "resnet",
            "--seed",
            "5",
        ],
    );
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{stderr}");
    assert!(
        stderr.contains("--seed") && stderr.contains("5"),
        "{stderr}"
    );

    // Resuming continues from the checkpoint instead of starting over.
    let more = train(
        &data,
        &out,
        "3",
        &[
            "--augment",
            "--schedule",
            "cosine",
            "--resume",
            "--model",
            "resnet",
        ],
    );
    let stderr = String::from_utf8_lossy(&more.stderr);
    assert!(more.status.success(), "{stderr}");
    assert!(stderr.contains("resumed after epoch 2"), "{stderr}");
    let history =
        History::from_json(&fs::read_to_string(out.join("resnet/history.json")).unwrap()).unwrap();
    assert_eq!(history.epochs().len(), 3);
}

#[test]
fn missing_data_explains_how_to_get_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train(
        &tmp.path().join("nothing"),
        &tmp.path().join("out"),
        "1",
        &[],
    );
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("cifar-10-binary.tar.gz") && stderr.contains("--data-dir"),
        "{stderr}"
    );
}

#[test]
fn numeric_arguments_are_checked_by_the_parser() {
    for bad in [
        ["--epochs", "0"],
        ["--lr=-1", "--quiet"],
        ["--lr", "nan"],
        ["--width-divisor", "0"],
        ["--schedule", "step:0:0.5"],
        ["--schedule", "cosine:-3"],
        ["--stages", "1,0"],
        ["--batch-size", "0"],
    ] {
        let out = Command::new(example_binary())
            .args(bad)
            .args(["--data-dir", "no/such/folder"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert!(text.contains("invalid value"), "{bad:?}: {text}");
    }
}

#[test]
fn a_run_killed_mid_epoch_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar-10-batches-bin");
    // Enough records for an epoch of many steps, so that the kill lands inside one.
    fs::create_dir_all(&data).unwrap();
    let mut s = 3u64;
    for name in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        let mut bytes = Vec::new();
        for i in 0..120 {
            bytes.push((i % 10) as u8);
            bytes.extend((0..RECORD_BYTES - 1).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                (s >> 56) as u8
            }));
        }
        fs::write(data.join(name), bytes).unwrap();
    }
    let args = |out: &Path| -> Vec<String> {
        [
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--width-divisor",
            "16",
            "--stages",
            "1,1",
            "--model",
            "resnet",
            "--test-subset",
            "16",
            "--device",
            "cpu",
            "--quiet",
        ]
        .map(String::from)
        .to_vec()
    };
    let whole = tmp.path().join("whole");
    let run = Command::new(example_binary())
        .args(args(&whole))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // The same run, killed (SIGKILL) once the first epoch's checkpoint is written.
    let killed = tmp.path().join("killed");
    let mut child = Command::new(example_binary())
        .args(args(&killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoint = killed.join("resnet/last.ckpt");
    let start = std::time::Instant::now();
    while !checkpoint.is_file() {
        assert!(
            start.elapsed().as_secs() < 120,
            "no checkpoint after two minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(30));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run finished before it could be killed"
    );

    let mut resumed = args(&killed);
    resumed.push("--resume".into());
    let run = Command::new(example_binary())
        .args(resumed)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("resumed after epoch"), "{stderr}");
    let read = |dir: &Path| {
        candle_core::safetensors::load(
            dir.join("resnet/weights.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (read(&whole), read(&killed));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let (x, y) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(x == y, "{name} differs after the killed run resumed");
    }
}

#[test]
fn a_partial_data_folder_and_an_unwritable_output_are_named_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar-10-batches-bin");
    write_tiny_cifar(&data);
    fs::remove_file(data.join("data_batch_3.bin")).unwrap();
    let run = train(&data, &tmp.path().join("out"), "1", &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("incomplete") && stderr.contains("data_batch_3.bin"),
        "{stderr}"
    );

    // An output path below a file cannot be created: the error names it, before any epoch.
    write_tiny_cifar(&data);
    let blocker = tmp.path().join("a-file");
    fs::write(&blocker, b"x").unwrap();
    let run = train(&data, &blocker.join("out"), "1", &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("cannot write results") && stderr.contains("a-file"),
        "{stderr}"
    );
    assert!(!stderr.contains("epoch 1/"), "{stderr}");
}

#[test]
fn the_resnet20_recipe_runs_end_to_end_and_resumes() {
    let tmp = std::env::temp_dir().join(format!("cf_resnet20_{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let (data, out) = (tmp.join("data"), tmp.join("out"));
    write_tiny_cifar(&data);
    let run = |epochs: &str, extra: &[&str]| {
        let output = Command::new(example("resnet20"))
            .args([
                "--data-dir",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args([
                "--epochs",
                epochs,
                "--batch-size",
                "16",
                "--blocks",
                "1",
                "--quiet",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    };
    let first = run("1", &[]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    // ResNet-8 here (one block a stage); the parameter count is printed.
    assert!(stderr.contains("resnet8: "), "{stderr}");
    let result: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("result.json")).unwrap()).unwrap();
    assert_eq!(result["epochs"], 1);
    assert!(result["final_test_accuracy"].as_f64().is_some());
    // A second epoch continues from the checkpoint.
    let second = run("2", &["--resume"]);
    assert!(String::from_utf8_lossy(&second.stderr).contains("resumed after epoch 1"));
    let history =
        History::from_json(&fs::read_to_string(out.join("history.json")).unwrap()).unwrap();
    assert_eq!(history.epochs().len(), 2);
    let _ = fs::remove_dir_all(&tmp);
}

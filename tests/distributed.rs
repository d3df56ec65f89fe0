//! Data-parallel training (`Trainer::distributed`). In every build: one rank
//! (`SingleProcess`) trains bit for bit as no communicator does. With `--features
//! distributed`: `mpirun -np 2` runs this test binary's ignored `worker` test as two ranks,
//! and the parent test compares what they wrote with one process: the same weights and
//! metrics for the same global batch, ranks that agree bit for bit, a refusal naming the
//! difference when the ranks' models differ, a lost rank ending the job, and checkpoints that
//! resume on another world size.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_functional::data::TensorDataset;
use candle_functional::distributed::SingleProcess;
use candle_functional::prelude::*;
use candle_functional::train::{Loss, SgdConfig, Trainer};

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// The normalization in [`model`].
#[derive(Clone, Copy, PartialEq)]
enum Norm {
    /// None: the data-parallel step is the one-process step exactly.
    Off,
    /// BatchNorm with statistics per replica.
    PerReplica,
    /// BatchNorm synchronized across replicas: the one-process step again.
    Synchronized,
}

/// A two-input, two-output model, with a BatchNorm or not.
fn model(norm: Norm, width: usize) -> Result<Model> {
    let image = Input::new([2, 4, 4]);
    let extra = Input::new([3]);
    let mut x = Conv2D::new(4, 3).padding(Padding::Same).call(&image)?;
    if norm != Norm::Off {
        x = BatchNorm::new()
            .synchronized(norm == Norm::Synchronized)
            .call(&x)?;
    }
    let x = ReLU::new().call(&x)?;
    let x = GlobalAveragePooling2D::new().call(&x)?;
    let joined = Concatenate::new(1).call_many(&[x, extra.clone()])?;
    let hidden = Dense::new(width)
        .activation(ActivationFn::Relu)
        .call(&joined)?;
    let class = Dense::new(3).name("class").call(&hidden)?;
    let value = Dense::new(1).name("value").call(&hidden)?;
    Model::new(&[image, extra], &[class, value])?.build(&Device::Cpu, DType::F32, 3)
}

/// `samples` samples of seeded random data, shuffled per epoch, in global batches of 64.
fn data(samples: usize, seed: u64) -> Result<TensorDataset> {
    let dev = Device::Cpu;
    let mut rng_seed = seed;
    let mut next = |shape: &[usize]| -> Result<Tensor> {
        rng_seed += 1;
        let n: usize = shape.iter().product();
        // A fixed pseudo-random sequence (the same on every rank, without a shared RNG).
        let values: Vec<f32> = (0..n)
            .map(|i| (((i as u64 + 1) * 2_654_435_761 * rng_seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Ok(Tensor::from_vec(values, shape, &dev)?)
    };
    let image = next(&[samples, 2, 4, 4])?;
    let extra = next(&[samples, 3])?;
    let value = next(&[samples, 1])?;
    let class: Vec<u32> = (0..samples as u32).map(|i| (i * 7 + 1) % 3).collect();
    let class = Tensor::from_vec(class, samples, &dev)?;
    Ok(
        TensorDataset::new(vec![image, extra], vec![class, value], 64)?
            .shuffle(true)
            .seed(11),
    )
}

fn trainer(model: Model) -> Result<Trainer> {
    let losses = candle_functional::train::Losses::per_output(vec![
        Loss::SparseCategoricalCrossentropy { from_logits: true },
        Loss::MeanSquaredError,
    ])
    .weights(vec![1.0, 0.5]);
    let sgd = SgdConfig {
        learning_rate: 0.05,
        momentum: 0.9,
        ..Default::default()
    };
    Trainer::new(model, sgd, losses)
}

fn max_difference(a: &Model, b: &Model) -> Result<f32> {
    let (a, b) = (a.weight_map()?, b.weight_map()?);
    let mut worst = 0f32;
    for (name, t) in &a {
        let d = (t - &b[name])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        worst = worst.max(d);
    }
    Ok(worst)
}

#[test]
fn one_rank_trains_exactly_as_no_communicator() -> TestResult {
    // 129 samples: batches of 64, 64 and 1.
    let (train, val) = (data(129, 1)?, data(35, 2)?);
    let mut plain = trainer(model(Norm::PerReplica, 8)?)?;
    plain.fit(&train, Some(&val), 2, &mut [])?;
    let mut ranked = trainer(model(Norm::PerReplica, 8)?)?.distributed(Arc::new(SingleProcess));
    ranked.fit(&train, Some(&val), 2, &mut [])?;
    assert_eq!(max_difference(plain.model(), ranked.model())?, 0.0);
    assert_eq!(
        plain.history().last().unwrap().metrics,
        ranked.history().last().unwrap().metrics
    );
    assert_eq!(ranked.communicator().map(|c| c.world_size()), Some(1));
    Ok(())
}

#[cfg(feature = "distributed")]
mod mpi_runs {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};
    use std::time::{Duration, Instant};

    use candle_functional::distributed::{Communicator, Mpi};
    use candle_functional::train::{Callback, LambdaCallback, ModelCheckpoint};

    use super::*;

    /// What the ranks run, chosen by the parent test through `CF_MPI_MODE`.
    #[test]
    #[ignore = "a rank of the mpirun tests below: they start it with mpirun -np 2"]
    fn worker() -> TestResult {
        let (Ok(mode), Ok(out)) = (std::env::var("CF_MPI_MODE"), std::env::var("CF_MPI_OUT"))
        else {
            eprintln!("worker: not started by the mpirun tests (no CF_MPI_MODE): nothing to do");
            return Ok(());
        };
        let out = PathBuf::from(out);
        let comm: Arc<dyn Communicator> = Arc::new(Mpi::init()?);
        let rank = comm.rank();
        let (train, val) = (data(129, 1)?, data(35, 2)?);
        let norm = match mode.as_str() {
            "batch_norm" => Norm::PerReplica,
            "sync_batch_norm" => Norm::Synchronized,
            _ => Norm::Off,
        };
        // "mismatch": rank 1 builds a wider hidden layer.
        let width = if mode == "mismatch" && rank == 1 {
            9
        } else {
            8
        };
        let mut trainer = trainer(model(norm, width)?)?.distributed(comm.clone());
        if mode == "weights_file" {
            // Each rank loads its own file; rank 1's has one weight changed.
            let file = out.join(format!("init{rank}.safetensors"));
            if rank == 1 {
                let first = trainer.model().weights()?.remove(0);
                first.var().set(&(first.var().as_tensor() + 1.0)?)?;
            }
            trainer.model().save_weights(&file)?;
            trainer.model().load_weights(&file)?;
        }
        let mut callbacks: Vec<Box<dyn Callback>> = vec![Box::new(
            ModelCheckpoint::new(out.join("ckpt")).monitor("val_loss"),
        )];
        if mode == "kill" {
            // Rank 1 dies by SIGKILL in the middle of epoch 2.
            callbacks.push(Box::new(LambdaCallback::new().batch_end(move |ctx| {
                if rank == 1 && ctx.epoch() == 2 && ctx.batch() == Some(1) {
                    let pid = std::process::id().to_string();
                    let _ = Command::new("kill").args(["-9", &pid]).status();
                    std::thread::sleep(Duration::from_secs(30));
                }
                Ok(())
            })));
        }
        let epochs = if mode == "stop_after_2" { 2 } else { 3 };
        match trainer.fit(&train, Some(&val), epochs, &mut callbacks) {
            Ok(_) => {}
            Err(e) => {
                std::fs::write(out.join(format!("error{rank}.txt")), e.to_string())?;
                return Ok(());
            }
        }
        trainer
            .model()
            .save_weights(out.join(format!("weights{rank}.safetensors")))?;
        if trainer.is_chief() {
            trainer.history().write_json(out.join("history.json"))?;
        }
        Ok(())
    }

    /// Runs the worker as 2 ranks under mpirun, at most `limit`.
    fn mpirun(mode: &str, out: &Path, limit: Duration) -> (Output, Duration) {
        let exe = std::env::current_exe().expect("the test binary's path");
        let start = Instant::now();
        let mut child = Command::new("mpirun")
            .args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
            .args(["-x", "CF_MPI_MODE", "-x", "CF_MPI_OUT", "-x", "RAYON_NUM_THREADS"])
            .arg(exe)
            .args(["--exact", "mpi_runs::worker", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("CF_MPI_MODE", mode)
            .env("CF_MPI_OUT", out)
            .env("RAYON_NUM_THREADS", "1")
            // CI runs as root, which Open MPI refuses unless told.
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("mpirun (Debian: openmpi-bin) must be installed for the `distributed` feature's tests");
        while child.try_wait().expect("waiting for mpirun").is_none() {
            if start.elapsed() > limit {
                let _ = child.kill();
                panic!("mpirun {mode}: still running after {limit:?}: a hang");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (
            child.wait_with_output().expect("mpirun's output"),
            start.elapsed(),
        )
    }

    fn text(output: &Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    fn load(path: &Path, norm: Norm) -> Result<Model> {
        let m = model(norm, 8)?;
        m.load_weights(path)?;
        Ok(m)
    }

    /// One process over the same global batches, `epochs` epochs.
    fn one_process(norm: Norm, epochs: usize) -> Result<Trainer> {
        let mut t = trainer(model(norm, 8)?)?;
        t.fit(&data(129, 1)?, Some(&data(35, 2)?), epochs, &mut [])?;
        Ok(t)
    }

    #[test]
    fn two_ranks_train_as_one_process_over_the_same_global_batch() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (output, _) = mpirun("plain", dir.path(), Duration::from_secs(300));
        assert!(output.status.success(), "mpirun failed:\n{}", text(&output));
        let single = one_process(Norm::Off, 3)?;
        let rank0 = load(&dir.path().join("weights0.safetensors"), Norm::Off)?;
        let rank1 = load(&dir.path().join("weights1.safetensors"), Norm::Off)?;
        // The ranks hold the same model, bit for bit.
        assert_eq!(max_difference(&rank0, &rank1)?, 0.0);
        // 2 ranks x 32 (uneven tails 18/17 and 1/0 included) = 1 process x 64.
        let worst = max_difference(&rank0, single.model())?;
        eprintln!("2 ranks vs 1 process, 3 epochs: largest weight difference {worst:e}");
        assert!(
            worst <= 1e-5,
            "2 ranks vs 1 process: weights differ by {worst}"
        );
        // The metrics of every epoch are the global ones.
        let history = candle_functional::train::History::from_json(&std::fs::read_to_string(
            dir.path().join("history.json"),
        )?)?;
        assert_eq!(history.epochs().len(), 3);
        for (ranked, one) in history.epochs().iter().zip(single.history().epochs()) {
            approx::assert_relative_eq!(ranked.loss, one.loss, max_relative = 1e-5);
            for name in [
                "class_accuracy",
                "value_loss",
                "val_class_accuracy",
                "val_value_loss",
            ] {
                let got = ranked.metric(name).unwrap_or_else(|| panic!("{name}"));
                approx::assert_relative_eq!(got, one.metric(name).unwrap(), max_relative = 1e-5);
            }
        }
        Ok(())
    }

    #[test]
    fn batch_norm_replicas_end_identical_on_every_rank() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (output, _) = mpirun("batch_norm", dir.path(), Duration::from_secs(300));
        assert!(output.status.success(), "mpirun failed:\n{}", text(&output));
        let rank0 = load(&dir.path().join("weights0.safetensors"), Norm::PerReplica)?;
        let rank1 = load(&dir.path().join("weights1.safetensors"), Norm::PerReplica)?;
        // Moving statistics included: rank 0's are sent to the others every step.
        assert_eq!(max_difference(&rank0, &rank1)?, 0.0);
        // Statistics per replica (32 samples each) are not one process's (64): the weights
        // are close to one process's, not equal.
        let single = one_process(Norm::PerReplica, 3)?;
        let worst = max_difference(&rank0, single.model())?;
        eprintln!(
            "per-replica BatchNorm vs 1 process, 3 epochs: largest weight difference {worst:e}"
        );
        assert!(
            worst > 0.0 && worst < 0.5,
            "per-replica BatchNorm vs 1 process: {worst}"
        );
        Ok(())
    }

    #[test]
    fn synchronized_batch_norm_over_two_ranks_trains_as_one_process() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (output, _) = mpirun("sync_batch_norm", dir.path(), Duration::from_secs(300));
        assert!(output.status.success(), "mpirun failed:\n{}", text(&output));
        let rank0 = load(&dir.path().join("weights0.safetensors"), Norm::Synchronized)?;
        let rank1 = load(&dir.path().join("weights1.safetensors"), Norm::Synchronized)?;
        assert_eq!(max_difference(&rank0, &rank1)?, 0.0);
        // Statistics over the whole global batch, gradients through them summed across
        // ranks: one process's BatchNorm over 64 samples, moving statistics included.
        let single = one_process(Norm::Synchronized, 3)?;
        let worst = max_difference(&rank0, single.model())?;
        eprintln!(
            "synchronized BatchNorm, 2 ranks vs 1 process, 3 epochs: largest weight difference {worst:e}"
        );
        assert!(
            worst <= 1e-5,
            "synchronized BatchNorm, 2 ranks vs 1 process: {worst}"
        );
        Ok(())
    }

    #[test]
    fn ranks_with_different_models_refuse_to_start_naming_the_difference() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (output, _) = mpirun("mismatch", dir.path(), Duration::from_secs(120));
        assert!(output.status.success(), "mpirun failed:\n{}", text(&output));
        let error =
            |rank: usize| std::fs::read_to_string(dir.path().join(format!("error{rank}.txt")));
        let (e0, e1) = (error(0)?, error(1)?);
        assert!(
            e1.contains("rank 1 of 2") && e1.contains("dense.kernel"),
            "{e1}"
        );
        assert!(e1.contains("[7, 9]") && e1.contains("[7, 8]"), "{e1}");
        assert!(e0.contains("1 rank(s) disagree with rank 0"), "{e0}");
        // Nothing was trained or written.
        assert!(!dir.path().join("ckpt").exists());
        Ok(())
    }

    #[test]
    fn ranks_that_loaded_different_weights_files_refuse_to_start() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (output, _) = mpirun("weights_file", dir.path(), Duration::from_secs(120));
        assert!(output.status.success(), "mpirun failed:\n{}", text(&output));
        let error =
            |rank: usize| std::fs::read_to_string(dir.path().join(format!("error{rank}.txt")));
        let (e0, e1) = (error(0)?, error(1)?);
        assert!(
            e1.contains("init1.safetensors") && e1.contains("sha256"),
            "{e1}"
        );
        assert!(
            e0.contains("disagree with rank 0 on the weights file"),
            "{e0}"
        );
        assert!(!dir.path().join("ckpt").exists());
        Ok(())
    }

    #[test]
    fn a_killed_rank_ends_the_job_and_the_last_checkpoint_resumes() -> TestResult {
        let dir = tempfile::tempdir()?;
        let limit = Duration::from_secs(120);
        let (output, took) = mpirun("kill", dir.path(), limit);
        let log = text(&output);
        assert!(!output.status.success(), "the job must fail:\n{log}");
        // mpirun names the lost rank and ends the others: no hang.
        assert!(log.contains("rank 1") && log.contains("signal 9"), "{log}");
        assert!(took < limit, "took {took:?}");
        // Epoch 1's checkpoint, written by rank 0, is intact: one process resumes it and ends
        // where an uninterrupted run does.
        let mut resumed = trainer(model(Norm::Off, 8)?)?;
        resumed.load_checkpoint(dir.path().join("ckpt").join("last.ckpt"))?;
        assert_eq!(resumed.epochs_done(), 1);
        resumed.fit(&data(129, 1)?, Some(&data(35, 2)?), 3, &mut [])?;
        let worst = max_difference(resumed.model(), one_process(Norm::Off, 3)?.model())?;
        assert!(worst <= 1e-5, "resumed vs uninterrupted: {worst}");
        Ok(())
    }

    #[test]
    fn a_two_rank_checkpoint_resumes_on_one_rank_as_the_uninterrupted_run() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (output, _) = mpirun("stop_after_2", dir.path(), Duration::from_secs(300));
        assert!(output.status.success(), "mpirun failed:\n{}", text(&output));
        let mut resumed = trainer(model(Norm::Off, 8)?)?.distributed(Arc::new(SingleProcess));
        resumed.load_checkpoint(dir.path().join("ckpt").join("last.ckpt"))?;
        assert_eq!(resumed.epochs_done(), 2);
        resumed.fit(&data(129, 1)?, Some(&data(35, 2)?), 3, &mut [])?;
        let single = one_process(Norm::Off, 3)?;
        let worst = max_difference(resumed.model(), single.model())?;
        assert!(worst <= 1e-5, "resumed on 1 rank vs uninterrupted: {worst}");
        let (a, b) = (
            resumed.history().last().unwrap(),
            single.history().last().unwrap(),
        );
        approx::assert_relative_eq!(a.loss, b.loss, max_relative = 1e-5);
        Ok(())
    }
}

#[cfg(not(feature = "distributed"))]
#[test]
fn mpirun_tests_need_the_distributed_feature() {
    eprintln!(
        "skipped: the mpirun tests (2 ranks vs 1 process, refusals, a killed rank, resume) \
         need `--features distributed` and Open MPI; .ci/run runs them"
    );
}

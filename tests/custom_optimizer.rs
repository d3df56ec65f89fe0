//! An optimizer of the user's own, through `OptimizerConfig::custom`: trained by `fit`, its
//! slots saved in checkpoints under its name and restored on resume exactly.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_functional::data::TensorDataset;
use candle_functional::prelude::*;
use candle_functional::train::{
    AdamConfig, Callback, Loss, ModelCheckpoint, Optimizer, OptimizerConfig, OptimizerState,
    Trainer,
};

const CPU: Device = Device::Cpu;

/// Sign momentum (Lion's update without its interpolation): m ← β·m + (1−β)·g,
/// w ← w − lr·sign(m). One slot per variable, `m.<variable>`.
struct SignMomentum {
    beta: f64,
    iterations: u64,
    m: Vec<(String, Var)>,
}

impl SignMomentum {
    fn slot(&mut self, name: &str, var: &Var) -> candle_functional::Result<Var> {
        if let Some((_, m)) = self.m.iter().find(|(n, _)| n == name) {
            return Ok(m.clone());
        }
        let m = Var::zeros(var.shape(), var.dtype(), var.device())?;
        self.m.push((name.to_string(), m.clone()));
        Ok(m)
    }
}

impl Optimizer for SignMomentum {
    fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
    ) -> candle_functional::Result<()> {
        let mut writes = Vec::new();
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = self.slot(name, var)?;
            let new_m = ((m.as_tensor() * self.beta)? + (g * (1.0 - self.beta))?)?;
            let sign =
                (new_m.gt(0.0)?.to_dtype(DType::F32)? - new_m.lt(0.0)?.to_dtype(DType::F32)?)?;
            writes.push((m, new_m));
            writes.push((var.clone(), (var.as_tensor() - (sign * lr)?)?));
        }
        for (target, value) in writes {
            target.set(&value)?;
        }
        self.iterations += 1;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        0.01
    }

    fn state(&self) -> candle_functional::Result<OptimizerState> {
        let slots = self
            .m
            .iter()
            .map(|(n, v)| Ok((format!("m.{n}"), v.as_tensor().copy()?)))
            .collect::<candle_functional::Result<_>>()?;
        Ok(OptimizerState {
            iterations: self.iterations,
            slots,
        })
    }

    fn check_state(
        &self,
        state: &OptimizerState,
        vars: &[(String, Var)],
    ) -> candle_functional::Result<()> {
        for (name, t) in &state.slots {
            let var = name
                .strip_prefix("m.")
                .and_then(|v| vars.iter().find(|(n, _)| n == v));
            match var {
                Some((_, var)) if var.dims() == t.dims() => {}
                _ => {
                    return Err(candle_functional::Error::InvalidArgument(format!(
                        "sign momentum: no variable for slot `{name}`"
                    )));
                }
            }
        }
        Ok(())
    }

    fn load_state(
        &mut self,
        state: &OptimizerState,
        _vars: &[(String, Var)],
    ) -> candle_functional::Result<()> {
        self.iterations = state.iterations;
        self.m = state
            .slots
            .iter()
            .map(|(n, t)| Ok((n["m.".len()..].to_string(), Var::from_tensor(&t.copy()?)?)))
            .collect::<candle_functional::Result<_>>()?;
        Ok(())
    }
}

fn config(beta: f64) -> OptimizerConfig {
    OptimizerConfig::custom("sign_momentum", format!("beta={beta}"), 0.01, move || {
        Ok(Box::new(SignMomentum {
            beta,
            iterations: 0,
            m: Vec::new(),
        }))
    })
}

fn trainer(optimizer: OptimizerConfig) -> Trainer {
    let x = Input::new([3]);
    let h = Dense::new(4)
        .activation(ActivationFn::Relu)
        .call(&x)
        .unwrap();
    let y = Dense::new(2).call(&h).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, 1)
        .unwrap();
    Trainer::new(
        model,
        optimizer,
        Loss::SparseCategoricalCrossentropy { from_logits: true },
    )
    .unwrap()
}

fn data() -> TensorDataset {
    let x: Vec<f32> = (0..24).map(|i| ((i * 5 % 7) as f32 - 3.0) / 3.0).collect();
    let x = Tensor::from_vec(x, (8, 3), &CPU).unwrap();
    let y = Tensor::new(&[0u32, 1, 1, 0, 1, 0, 0, 1], &CPU).unwrap();
    TensorDataset::new(vec![x], vec![y], 4).unwrap()
}

fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    let mut all: Vec<_> = t
        .model()
        .weight_map()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[test]
fn a_users_optimizer_trains_and_resumes_exactly() {
    let mut whole = trainer(config(0.9));
    let before = weights(&whole);
    let first_loss = whole.fit(&data(), None, 6, &mut []).unwrap().epochs()[0].loss;
    let last_loss = whole.history().last().unwrap().loss;
    assert!(last_loss < first_loss, "{first_loss} -> {last_loss}");
    assert_ne!(weights(&whole), before);

    // Stopped after 3 epochs, resumed from the checkpoint in a new trainer: its momentum
    // slots come back, and the run ends where the uninterrupted one did.
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = ModelCheckpoint::new(dir.path()).monitor("loss");
    let mut first = trainer(config(0.9));
    let mut callbacks: Vec<Box<dyn Callback>> = vec![Box::new(checkpoint.clone())];
    first.fit(&data(), None, 3, &mut callbacks).unwrap();
    let mut resumed = trainer(config(0.9));
    resumed.load_checkpoint(checkpoint.last_path()).unwrap();
    resumed.fit(&data(), None, 6, &mut []).unwrap();
    assert_eq!(weights(&resumed), weights(&whole));

    // The checkpoint holds its slots under its name, and only the same optimizer with the
    // same settings takes it.
    let saved = candle_core::safetensors::load(checkpoint.last_path(), &CPU).unwrap();
    assert!(
        saved.keys().any(|k| k.starts_with("optimizer.m.")),
        "{:?}",
        saved.keys()
    );
    let err = trainer(config(0.5))
        .load_checkpoint(checkpoint.last_path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sign_momentum") && err.contains("beta=0.5"),
        "{err}"
    );
    assert!(
        trainer(AdamConfig::default().into())
            .load_checkpoint(checkpoint.last_path())
            .is_err()
    );
}

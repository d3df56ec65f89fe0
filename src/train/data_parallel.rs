//! Data-parallel training across ranks ([`Trainer::distributed`]): what `fit` and `evaluate`
//! do differently when a [`Communicator`] joins them. One process with [`SingleProcess`] (or
//! none) trains exactly as before.
//!
//! Per step, every rank takes its slice of the same global batch
//! ([`shard`](crate::distributed::shard)), scales its loss by its share of the batch, and
//! after the backward pass the gradients are summed across ranks in flat buckets: every
//! rank then holds the gradient of the mean loss over the whole batch, the one a single
//! process computes. BatchNorm normalizes each rank's slice with its own batch statistics
//! (per replica, as PyTorch's DistributedDataParallel does); the moving statistics kept for
//! inference are rank 0's, sent to the others after every step (DDP's `broadcast_buffers`).
//! The loss and the model's outputs are gathered, so every rank updates its metrics with the
//! whole batch and reports the global figures.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;
use crate::data::Batch;
use crate::distributed::{
    Communicator, all_reduce_gradients, broadcast_tensors, digest, reduce_sum_tensors, replica_sum,
    shard,
};
use crate::graph::{ReplicaSum, StateUpdates};
use crate::models::Model;
use crate::train::OptimizerState;

/// A trainer's place in a data-parallel run.
#[derive(Clone)]
pub(super) struct DataParallel {
    comm: Arc<dyn Communicator>,
    /// Nanoseconds spent in the steps' collective calls so far, host copies around them
    /// included (shared by clones of the trainer's handle).
    communication_nanos: Arc<AtomicU64>,
}

/// Where a run resumed from a checkpoint stands, for [`DataParallel::start`].
pub(super) struct Resumed<'a> {
    pub(super) epochs_done: usize,
    pub(super) steps_done: usize,
    pub(super) optimizer: &'a OptimizerState,
}

/// This rank's part of one global batch.
pub(super) struct Shard {
    /// Its rows of the global batch (empty when the batch has fewer samples than ranks).
    pub(super) rows: std::ops::Range<usize>,
    /// The global batch's samples.
    pub(super) total: usize,
}

impl Shard {
    /// The rank's share of the batch, the factor on its loss.
    pub(super) fn weight(&self) -> f64 {
        self.rows.len() as f64 / self.total as f64
    }

    /// The rows this rank runs through the model: its own, or (an empty slice) the batch's
    /// first row, whose loss then weighs 0, so that every rank takes part in every
    /// collective with tensors of the same shapes.
    pub(super) fn local(&self, batch: &Batch) -> Result<Batch> {
        let (start, len) = match self.rows.is_empty() {
            true => (0, 1),
            false => (self.rows.start, self.rows.len()),
        };
        let narrow = |ts: &[Tensor]| -> Result<Vec<Tensor>> {
            ts.iter().map(|t| Ok(t.narrow(0, start, len)?)).collect()
        };
        Ok(Batch {
            inputs: narrow(&batch.inputs)?,
            targets: narrow(&batch.targets)?,
            sample_weights: narrow(&batch.sample_weights)?,
        })
    }
}

impl DataParallel {
    pub(super) fn new(comm: Arc<dyn Communicator>) -> Self {
        Self {
            comm,
            communication_nanos: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Seconds spent in the training steps' collective calls so far.
    pub(super) fn communication_seconds(&self) -> f64 {
        self.communication_nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Runs `f`, adding its duration to the communication time.
    fn timed<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let out = f();
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.communication_nanos.fetch_add(nanos, Ordering::Relaxed);
        out
    }

    pub(super) fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// This rank's part of a global batch of `samples` samples.
    pub(super) fn shard(&self, samples: usize) -> Shard {
        Shard {
            rows: shard(samples, self.comm.rank(), self.comm.world_size()),
            total: samples,
        }
    }

    /// Where this step's state updates are held back, with the sum across replicas that
    /// synchronized BatchNorm layers use (a rank without rows adds zeros).
    pub(super) fn state_updates(&self, shard: &Shard) -> StateUpdates {
        StateUpdates::across_replicas(Arc::new(StepReplicas {
            comm: self.comm.clone(),
            factor: if shard.rows.is_empty() { 0.0 } else { 1.0 },
            communication_nanos: self.communication_nanos.clone(),
        }))
    }

    /// The forward-call number this rank's step uses for call `call` of the run: distinct on
    /// every rank (random layers draw differently on each rank's slice), `call` itself on
    /// one rank.
    pub(super) fn forward_call(&self, call: u64) -> u64 {
        call.wrapping_mul(self.comm.world_size() as u64) + self.comm.rank() as u64
    }

    /// Sums across ranks, after the backward pass of a loss scaled by the rank's share: the
    /// gradients (in place), and the loss and per-output losses (each rank's mean weighted
    /// by its share, so their sum is the global batch's mean). Returns the global losses.
    pub(super) fn reduce_step(
        &self,
        grads: &mut GradStore,
        vars: &[(String, Var)],
        shard: &Shard,
        total: &Tensor,
        per_output: &[Tensor],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        // Which vars have a gradient on some rank, in the same f64 sum as the losses.
        let has_gradient: Vec<f64> = vars
            .iter()
            .map(|(_, v)| f64::from(u8::from(grads.get(v.as_tensor()).is_some())))
            .collect();
        let (counts, total, per_output) =
            self.timed(|| self.reduce_losses(has_gradient, shard, total, per_output))?;
        let present: Vec<bool> = counts.iter().map(|&n| n > 0.0).collect();
        let tensors: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        self.timed(|| all_reduce_gradients(self.comm(), grads, &tensors, &present))?;
        Ok((total, per_output))
    }

    /// The global batch's loss and per-output losses from every rank's (its mean weighted
    /// by its share), with `extra` values summed in the same call (returned first).
    pub(super) fn reduce_losses(
        &self,
        extra: Vec<f64>,
        shard: &Shard,
        total: &Tensor,
        per_output: &[Tensor],
    ) -> Result<(Vec<f64>, Tensor, Vec<Tensor>)> {
        let weight = shard.weight();
        let mut sums = extra;
        let head = sums.len();
        for loss in std::iter::once(total).chain(per_output) {
            let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            // A rank with no rows ran one row only for shapes: it adds nothing, not even a NaN.
            sums.push(if weight == 0.0 { 0.0 } else { value * weight });
        }
        self.comm.all_reduce_sum_f64(&mut sums)?;
        let global = |value: f64, like: &Tensor| -> Result<Tensor> {
            Ok(Tensor::new(value, like.device())?.to_dtype(like.dtype())?)
        };
        let losses = sums.split_off(head);
        let per_output = per_output
            .iter()
            .zip(&losses[1..])
            .map(|(l, &v)| global(v, l))
            .collect::<Result<_>>()?;
        Ok((sums, global(losses[0], total)?, per_output))
    }

    /// Rank 0's values of the state the step is about to write (BatchNorm's moving
    /// statistics), on every rank.
    pub(super) fn broadcast_state(&self, state: &mut [(Var, Tensor)]) -> Result<()> {
        if state.is_empty() || self.comm.world_size() == 1 {
            return Ok(());
        }
        let values: Vec<Tensor> = state.iter().map(|(_, t)| t.clone()).collect();
        let root = self.timed(|| broadcast_tensors(self.comm(), &values, 0))?;
        for ((_, value), from_root) in state.iter_mut().zip(root) {
            *value = from_root;
        }
        Ok(())
    }

    /// Each output over the whole global batch, put together from every rank's rows.
    pub(super) fn gather_outputs(&self, outputs: &[Tensor], shard: &Shard) -> Result<Vec<Tensor>> {
        self.timed(|| self.gather(outputs, shard))
    }

    fn gather(&self, outputs: &[Tensor], shard: &Shard) -> Result<Vec<Tensor>> {
        outputs
            .iter()
            .map(|o| {
                let full = reduce_sum_tensors(
                    self.comm(),
                    &o.detach(),
                    shard.rows.clone(),
                    shard.total,
                    o.device(),
                )?;
                Ok(full.to_dtype(o.dtype())?)
            })
            .collect()
    }

    /// Before the first step of `fit`: every rank must hold the same model (same weights by
    /// name, shape and dtype), or all of them refuse, naming the first difference. In a fresh
    /// run, weights loaded from a file must come from the same file (by content) on every
    /// rank; rank 0's weights are then taken everywhere (as DistributedDataParallel does). A
    /// run resumed from a checkpoint must have loaded the same checkpoint on every rank
    /// (weights, optimizer state, epoch and step), or all refuse.
    pub(super) fn start(&self, model: &Model, resumed: Option<Resumed<'_>>) -> Result<()> {
        let comm = self.comm();
        let weights = model.weights()?;
        let layout: String = weights
            .iter()
            .map(|w| format!("{} {:?} {:?}\n", w.name(), w.var().dtype(), w.var().dims()))
            .collect();
        self.agree(
            &layout,
            "the model's architecture (its weights' names, dtypes and shapes)",
        )?;
        if let Some(Resumed {
            epochs_done,
            steps_done,
            optimizer: state,
        }) = resumed
        {
            let mut lines = format!(
                "epoch {epochs_done} step {steps_done} optimizer iterations {}\n",
                state.iterations
            );
            for w in &weights {
                lines.push_str(&format!(
                    "{} {:016x}\n",
                    w.name(),
                    digest([w.var().as_tensor()])?
                ));
            }
            for (name, t) in &state.slots {
                lines.push_str(&format!("optimizer.{name} {:016x}\n", digest([t])?));
            }
            return self.agree(
                &lines,
                "the resumed checkpoint (weights, optimizer state, epoch)",
            );
        }
        // Weights loaded from a file must come from the same file everywhere (compared by
        // content: paths may differ between machines); built ones are replaced by rank 0's.
        let (source, loaded) = match model.loaded_weights_file() {
            Some(file) => (
                format!("weights from a file with sha256 {}", file.sha256),
                file.path,
            ),
            None => (
                "weights as built, not loaded from a file".to_string(),
                "none".to_string(),
            ),
        };
        self.agree(
            &source,
            &format!("the weights file (this rank loaded: {loaded})"),
        )?;
        let vars: Vec<Tensor> = weights
            .iter()
            .map(|w| w.var().as_tensor().clone())
            .collect();
        let root = broadcast_tensors(comm, &vars, 0)?;
        for (w, value) in weights.iter().zip(root) {
            w.var().set(&value)?;
        }
        Ok(())
    }

    /// Compares `text` (one item per line) with rank 0's: every rank learns whether all
    /// agree, and the ranks that differ name the first line that does.
    fn agree(&self, text: &str, what: &str) -> Result<()> {
        let comm = self.comm();
        // Rank 0's length first, so every rank passes a buffer of the same size.
        let mut length = (text.len() as u64).to_le_bytes();
        comm.broadcast_bytes(&mut length, 0)?;
        let mut root_text = vec![0u8; u64::from_le_bytes(length) as usize];
        if comm.is_chief() {
            root_text.copy_from_slice(text.as_bytes());
        }
        comm.broadcast_bytes(&mut root_text, 0)?;
        let root_text = String::from_utf8_lossy(&root_text);
        let differs = root_text != text;
        let mut verdict = [f64::from(u8::from(differs))];
        comm.all_reduce_sum_f64(&mut verdict)?;
        if verdict[0] == 0.0 {
            return Ok(());
        }
        let message = match differs {
            true => {
                let mine: Vec<&str> = text.lines().collect();
                let theirs: Vec<&str> = root_text.lines().collect();
                let at = (0..mine.len().max(theirs.len()))
                    .find(|&i| mine.get(i) != theirs.get(i))
                    .unwrap_or(0);
                format!(
                    "this rank and rank 0 disagree on {what}: here `{}`, on rank 0 `{}`; every rank must start from the same model",
                    mine.get(at).unwrap_or(&"(nothing)"),
                    theirs.get(at).unwrap_or(&"(nothing)"),
                )
            }
            false => format!(
                "{} rank(s) disagree with rank 0 on {what} (their errors name the difference); every rank must start from the same model",
                verdict[0]
            ),
        };
        Err(crate::distributed::error(comm, message))
    }
}

/// One step's [`ReplicaSum`]: MPI's sum, differentiable (`distributed::replica_sum`).
struct StepReplicas {
    comm: Arc<dyn Communicator>,
    /// 0 on a rank without rows in this step, 1 otherwise.
    factor: f32,
    communication_nanos: Arc<AtomicU64>,
}

impl ReplicaSum for StepReplicas {
    fn sum(&self, local: &Tensor) -> Result<Tensor> {
        let start = Instant::now();
        let sum = replica_sum(&self.comm, local, self.factor);
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.communication_nanos.fetch_add(nanos, Ordering::Relaxed);
        sum
    }

    fn replicas(&self) -> usize {
        self.comm.world_size()
    }
}

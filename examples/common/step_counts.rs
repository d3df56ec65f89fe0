//! What one training step costs a GPU, counted on any device (the examples' allocator counts,
//! see `allocator.rs`): tensor buffers (on CUDA, device allocations, each written by a kernel
//! launch), allocations and bytes, and the crate's reads back to the host (each one a wait for
//! the device's queue). Measured for the forward pass with its loss, for forward and backward,
//! and for the whole `train_step` (divergence check, optimizer, state updates, metrics); the
//! difference of the last two is the part of a step outside forward and backward.

use candle_core::Tensor;
use candle_functional::data::Batch;
use candle_functional::prelude::*;
use candle_functional::profile::{AllocationCounts, host_reads};
use candle_functional::train::{AdamConfig, BackwardPass, Loss, NanCheck, Trainer};

/// The counters of one run of `f`, after `warmup` runs (the optimizer's slots and the
/// first-use caches exist by then), as a JSON object.
fn counted(warmup: usize, mut f: impl FnMut() -> Result<()>) -> Result<(AllocationCounts, u64)> {
    for _ in 0..warmup {
        f()?;
    }
    let (before, reads) = (AllocationCounts::now(), host_reads());
    f()?;
    Ok((AllocationCounts::now().since(&before), host_reads() - reads))
}

fn json(counts: &AllocationCounts, reads: u64) -> String {
    format!(
        "{{\"tensor_buffers\": {}, \"allocations\": {}, \"allocated_bytes\": {}, \"host_reads\": {}}}",
        counts.tensor_buffers(),
        counts.allocations(),
        counts.bytes(),
        reads
    )
}

/// Per-step counts of training `model` on `batch` with `loss`, Adam and the GPU's divergence
/// check (`NanCheck::OnDevice`), the step's gradients computed by `pass`, as a JSON object:
/// `forward` (the forward pass and the loss), `forward_backward` (those and candle's autograd
/// over them), `train_step_autograd` (a whole step through candle's autograd),
/// `outside_forward_backward` (the two before's difference: the divergence check, optimizer,
/// state updates and metrics, the same code whatever the pass) and `train_step` (a whole step
/// with `pass`).
pub fn step_counts(model: &Model, batch: &Batch, loss: Loss, pass: BackwardPass) -> Result<String> {
    let target = &batch.targets[0];
    let wait = |t: &Tensor| -> Result<()> {
        // The harness's own wait for the device, not counted as the crate's read.
        t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        Ok(())
    };
    let forward = counted(1, || {
        let out = model.forward(&batch.inputs, Mode::Train)?.remove(0);
        wait(&loss.compute(&out, target)?)
    })?;
    let forward_backward = counted(1, || {
        let out = model.forward(&batch.inputs, Mode::Train)?.remove(0);
        let grads = loss.compute(&out, target)?.backward()?;
        let first = model.trainable_vars()?.remove(0);
        if let Some(g) = grads.get(first.as_tensor()) {
            // A view of one element: reading it makes no tensor buffer.
            g.flatten_all()?.get(0)?.to_scalar::<f32>()?;
        }
        Ok(())
    })?;
    let step_with = |pass: BackwardPass| {
        let mut trainer = Trainer::new(model.clone(), AdamConfig::default(), loss)?
            .nan_check(NanCheck::OnDevice)
            .backward_pass(pass);
        counted(2, || wait(&trainer.train_step(batch, 1e-3)?))
    };
    let autograd = step_with(BackwardPass::Autograd)?;
    let step = step_with(pass)?;
    Ok(format!(
        "{{\"backward_pass\": \"{pass:?}\", \"forward\": {}, \"forward_backward\": {}, \"train_step_autograd\": {}, \"outside_forward_backward\": {{\"tensor_buffers\": {}, \"host_reads\": {}}}, \"train_step\": {}}}",
        json(&forward.0, forward.1),
        json(&forward_backward.0, forward_backward.1),
        json(&autograd.0, autograd.1),
        autograd.0.tensor_buffers() as i64 - forward_backward.0.tensor_buffers() as i64,
        autograd.1 as i64 - forward_backward.1 as i64,
        json(&step.0, step.1),
    ))
}

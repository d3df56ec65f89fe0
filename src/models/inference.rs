//! A model's forward pass in inference, with each batch norm that alone reads a convolution's
//! output folded into that convolution.
//!
//! In inference a BatchNorm is a fixed map per channel, `y = a·x + b` from its moving
//! statistics, gamma and beta (a ReLU before it, as in the article's `relu_bn`, and one after
//! it, as in Conv → BatchNorm → ReLU, included). Run as its own step it reads the
//! convolution's whole output and writes a tensor as large; folded in, the convolution
//! applies it as it writes its output (in the GEMM path's copy-out; on oneDNN in the weights
//! and bias, or in one pass over the fresh output), the same values as the two steps one after
//! the other (up to rounding where oneDNN's weights take the map).
//!
//! The fold is decided step by step at run time, since it depends on the pass: inference
//! mode, no mixed precision, an f32/f64 input on the CPU (elsewhere the map's per-channel
//! values would be read back from the device on every call) that asks for no gradient (an
//! input that is a variable, as for a saliency map, runs the two steps, whose gradients are
//! candle's). The plan itself is not changed: the folded batch norm's step passes the
//! convolution's output on. Each fold is counted in
//! [`profile::folded_batch_norms`](crate::profile::folded_batch_norms).

use candle_core::Tensor;

use crate::Result;
use crate::graph::params::Pass;
use crate::graph::plan::{Plan, Step};
use crate::layers::{BatchNormConfig, Conv2DConfig};
use crate::profile;

/// Runs `plan` on `inputs` in inference (`pass.mode` is eval), folding each batch norm that
/// can be folded into the convolution before it; `model` names the model in errors.
pub(crate) fn run(plan: &Plan, model: &str, inputs: &[Tensor], pass: Pass) -> Result<Vec<Tensor>> {
    let readers = batch_norm_readers(plan);
    let mut folded = vec![false; plan.steps.len()];
    plan.run_with(model, inputs, pass, |index, step, args, step_pass| {
        if folded[index] {
            // Its map was applied by the convolution that wrote `args[0]`.
            return Ok(vec![args[0].clone()]);
        }
        if let Some(reader) = readers[index]
            && let Some(y) = fold(step, &plan.steps[reader], args, step_pass)?
        {
            folded[reader] = true;
            return Ok(vec![y]);
        }
        step.node.layer().forward(args, step_pass, step.fusion)
    })
}

/// Per step, the step that may fold into it: a `BatchNorm` of one input that is the only
/// reader of this step's one output, a `Conv2D`'s, which is not a model output.
fn batch_norm_readers(plan: &Plan) -> Vec<Option<usize>> {
    let mut reads = vec![0usize; plan.slot_count];
    for step in &plan.steps {
        for &slot in &step.input_slots {
            reads[slot] += 1;
        }
    }
    let mut reader_of = vec![None; plan.slot_count];
    for (index, step) in plan.steps.iter().enumerate() {
        if let ([slot], true) = (&step.input_slots[..], is::<BatchNormConfig>(step)) {
            reader_of[*slot] = Some(index);
        }
    }
    plan.steps
        .iter()
        .map(
            |step| match (&step.output_slots[..], is::<Conv2DConfig>(step)) {
                ([slot], true) if reads[*slot] == 1 && !plan.output_slots.contains(slot) => {
                    reader_of[*slot]
                }
                _ => None,
            },
        )
        .collect()
}

fn is<T: 'static>(step: &Step) -> bool {
    config::<T>(step).is_some()
}

fn config<T: 'static>(step: &Step) -> Option<&T> {
    step.node.layer().op().as_any()?.downcast_ref::<T>()
}

/// The convolution `conv` with the batch norm `norm` applied as it writes its output, on
/// `args` (the convolution's input); `None` where the pass or the layers do not allow it
/// (then both run as steps of their own).
fn fold(conv: &Step, norm: &Step, args: &[Tensor], pass: Pass) -> Result<Option<Tensor>> {
    let (Some(conv_config), Some(norm_config), [x]) = (
        config::<Conv2DConfig>(conv),
        config::<BatchNormConfig>(norm),
        args,
    ) else {
        return Ok(None);
    };
    if pass.mode.is_train()
        || pass.compute_dtype.is_some()
        || x.track_op()
        || !conv_config.runs_cpu_kernel(x, conv.fusion)
    {
        return Ok(None);
    }
    let Some(&channels) = conv.node.output_shapes().first().and_then(|s| s.first()) else {
        return Ok(None);
    };
    let affine = norm.node.layer().with_params(pass, |_, params| {
        norm_config.eval_affine((x.dtype(), channels), params, norm.fusion)
    })?;
    let Some(affine) = affine else {
        return Ok(None);
    };
    let y = conv.node.layer().with_params(pass, |_, params| {
        conv_config.forward_then_affine(
            x,
            params,
            (conv.fusion, norm.fusion.relu_before()),
            &affine,
        )
    })?;
    profile::count_folded_batch_norm();
    Ok(Some(y))
}

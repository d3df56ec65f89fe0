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
//!
//! With the feature `onednn`, a convolution whose output only convolutions and batch norms
//! read (through a folded batch norm or not) leaves it in the blocked layout oneDNN's
//! primitive wrote (nChw8c on AVX2, nChw16c on AVX-512), as a rank-5 tensor, and the next
//! convolution reads it there; a batch norm whose inputs all came so (the Add → ReLU →
//! BatchNorm that ends the article's residual block) computes in that layout and hands its
//! output on the same way. The reorders out of that layout and back into it, about a tenth
//! of a convolution's time at batch 128, are saved: a PlainNet or ResNet stays blocked from
//! its first convolution to its pooling. Any other step gets such a tensor in NCHW first,
//! and a reader whose primitive wants another layout (or that runs on the crate's own
//! kernels) converts it; each handover is counted in
//! [`profile::blocked_handoffs`](crate::profile::blocked_handoffs).

use candle_core::Tensor;

use crate::Result;
use crate::graph::params::Pass;
use crate::graph::plan::{Plan, Step};
use crate::layers::batch_norm::BatchNormMap;
use crate::layers::{BatchNormConfig, Conv2DConfig};
use crate::profile;

/// Runs `plan` on `inputs` in inference (`pass.mode` is eval), folding each batch norm that
/// can be folded into the convolution before it; `model` names the model in errors.
pub(crate) fn run(plan: &Plan, model: &str, inputs: &[Tensor], pass: Pass) -> Result<Vec<Tensor>> {
    let readers = batch_norm_readers(plan);
    #[cfg(feature = "onednn")]
    let blocked = read_in_blocked_layout(plan);
    let mut folded = vec![false; plan.steps.len()];
    plan.run_with(model, inputs, pass, |index, step, args, step_pass| {
        if folded[index] {
            // Its map was applied by the convolution that wrote `args[0]`.
            return Ok(vec![args[0].clone()]);
        }
        #[cfg(feature = "onednn")]
        let args = {
            let plan = (plan, &readers[..], &blocked[..]);
            if let Some(y) = hand_over(plan, (index, step), args, step_pass, &mut folded)? {
                return Ok(vec![y]);
            }
            // Every other step reads NCHW.
            &args
                .iter()
                .map(crate::layers::nchw)
                .collect::<Result<Vec<_>>>()?
        };
        if let Some(reader) = readers[index]
            && let Some(y) = fold(step, &plan.steps[reader], args, step_pass)?
        {
            folded[reader] = true;
            return Ok(vec![y]);
        }
        step.node.layer().forward(args, step_pass, step.fusion)
    })
}

/// Per slot, whether the steps that read it all take oneDNN's blocked layout (one or more
/// convolutions and batch norms, and it is not a model output): then the step that writes
/// it may leave it in that layout.
#[cfg(feature = "onednn")]
fn read_in_blocked_layout(plan: &Plan) -> Vec<bool> {
    let mut only = vec![None; plan.slot_count];
    for step in &plan.steps {
        let takes = is::<Conv2DConfig>(step) || is::<BatchNormConfig>(step);
        for &slot in &step.input_slots {
            only[slot] = Some(only[slot].unwrap_or(true) && takes);
        }
    }
    for &slot in &plan.output_slots {
        only[slot] = Some(false);
    }
    only.into_iter().map(|o| o == Some(true)).collect()
}

/// The plan as [`hand_over`] reads it: the plan, each step's batch norm to fold
/// (`batch_norm_readers`) and the slots that may stay blocked (`read_in_blocked_layout`).
#[cfg(feature = "onednn")]
type Handovers<'a> = (&'a Plan, &'a [Option<usize>], &'a [bool]);

/// With the feature `onednn`, in inference: a convolution or batch norm on oneDNN's blocked
/// layout, `None` where the step is neither or does not take part (the usual path runs it
/// then, on NCHW). A convolution reads its input as the step before handed it over (NCHW or
/// blocked), folds its batch norm in where it can (marked in `folded`) and leaves its output
/// blocked where the readers all take that layout ([`read_in_blocked_layout`]); a batch norm
/// whose inputs were all handed over blocked (a residual block's Add → ReLU → BatchNorm)
/// computes in that layout. Each output left blocked saves the reorder out of the layout here and
/// the one back into it in the reader.
#[cfg(feature = "onednn")]
fn hand_over(
    (plan, readers, blocked): Handovers,
    (index, step): (usize, &Step),
    args: &[Tensor],
    pass: Pass,
    folded: &mut [bool],
) -> Result<Option<Tensor>> {
    if pass.mode.is_train() || pass.compute_dtype.is_some() {
        return Ok(None);
    }
    let y = if let (Some(conv), [x]) = (config::<Conv2DConfig>(step), args) {
        let norm = readers[index].map(|reader| (reader, &plan.steps[reader]));
        let affine = match norm {
            Some((_, norm)) => folded_map(step, norm, x, pass)?,
            None => None,
        };
        let (output, relu_before) = match (&affine, norm) {
            (Some(_), Some((_, norm))) => (norm.output_slots[0], norm.fusion.relu_before()),
            _ => (step.output_slots[0], false),
        };
        let blocked_output = blocked[output];
        if x.rank() != 5 && !blocked_output {
            return Ok(None);
        }
        let y = step.node.layer().with_params(pass, |_, params| {
            let fusion = (step.fusion, relu_before);
            conv.forward_handoff(x, params, fusion, affine.as_ref(), blocked_output)
        })?;
        let Some(y) = y else {
            return Ok(None);
        };
        if let (Some(_), Some((reader, _))) = (&affine, norm) {
            folded[reader] = true;
            profile::count_folded_batch_norm();
        }
        y
    } else if let Some(norm) = config::<BatchNormConfig>(step) {
        let blocked_output = blocked[step.output_slots[0]];
        let y = step.node.layer().with_params(pass, |_, params| {
            norm.forward_blocked(args, params, step.fusion, blocked_output)
        })?;
        let Some(y) = y else {
            return Ok(None);
        };
        y
    } else {
        return Ok(None);
    };
    if y.rank() == 5 {
        profile::count_blocked_handoff();
    }
    Ok(Some(y))
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

/// The map of the batch norm `norm` for the convolution `conv` to apply as it writes its
/// output from `x`; `None` where the pass or the layers do not allow it.
fn folded_map(conv: &Step, norm: &Step, x: &Tensor, pass: Pass) -> Result<Option<BatchNormMap>> {
    let (Some(conv_config), Some(norm_config)) = (
        config::<Conv2DConfig>(conv),
        config::<BatchNormConfig>(norm),
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
    norm.node.layer().with_params(pass, |_, params| {
        norm_config.eval_affine((x.dtype(), channels), params, norm.fusion)
    })
}

/// The convolution `conv` with the batch norm `norm` applied as it writes its output, on
/// `args` (the convolution's input); `None` where the pass or the layers do not allow it
/// (then both run as steps of their own).
fn fold(conv: &Step, norm: &Step, args: &[Tensor], pass: Pass) -> Result<Option<Tensor>> {
    let (Some(conv_config), [x]) = (config::<Conv2DConfig>(conv), args) else {
        return Ok(None);
    };
    let Some(affine) = folded_map(conv, norm, x, pass)? else {
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

//! The plan's own backward pass (issue 22, item 2): a training forward pass that records
//! what each step's gradients need, and a backward pass over the plan in reverse.
//!
//! Through candle's autograd, every gradient edge costs a zero-filled tensor and then a fresh
//! sum (`GradStore::or_insert`, then `add`): a measured 11% of the full ResNet's training
//! step on the CPU, 25% of the shrunken one's and half of the shrunken PlainNet's at batch 32
//! (`scripts/measure-bookkeeping.sh`, docs/PERFORMANCE.md). The plan knows every slot's
//! readers, so here a slot's first gradient is moved in, and only a slot read twice (a
//! residual branch) pays an add.
//!
//! Convolutions and batch norms (the layers that hold nearly all of a convolutional
//! network's activations), the max pooling, nearest upsampling and concatenation that
//! connect an encoder to its decoder, and a classifier's head (tiling and global average
//! pooling, `Flatten`, a `Dense` layer on vectors with a linear, ReLU or softmax activation) run their
//! forward pass on detached tensors and keep what their gradients need ([`Native`]). Every
//! other step (custom layers, nested models, other activations, …) runs as before on fresh
//! leaf variables of its inputs (a copy of each), and its gradients come from candle's
//! autograd on that step alone (`Σ y·dy`, differentiated), so any
//! [`LayerOp`](crate::LayerOp) works without a backward of its own.
//!
//! On the CPU the convolutions' and batch norms' gradients come from the crate's fused
//! kernels. Elsewhere they are *composed*: on CUDA, cuDNN's backward-data, backward-filter and
//! batch-norm backward kernels, with the ReLU masks, bias sums and the prologue's sum as
//! element-wise passes of their own, max pooling's and nearest upsampling's gradients a few
//! ops over the windows. `BackwardPass::PlanComposed` runs that composition on the CPU, with the crate's
//! unfused kernels in cuDNN's place: what a GPU step launches is counted there (`bench
//! --counts`) and its gradients tested against the fused kernels' (`tests/own_backward.rs`).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};

use crate::fusion::Fusion;
use crate::graph::params::Pass;
use crate::graph::plan::{Plan, Step};
use crate::graph::{LayerRef, Params, StateUpdates};
use crate::layers::native_backward::Native;
use crate::layers::{
    AveragePooling2DConfig, BatchNormConfig, ConcatenateConfig, Conv2DConfig, DenseConfig,
    FlattenConfig, GlobalAveragePooling2DConfig, MaxPooling2DConfig, UpSampling2DConfig,
};
use crate::models::Model;
use crate::ops;
use crate::{Error, Result};

/// How one step's gradients will be computed.
#[derive(Debug)]
enum Backward {
    Native(Native),
    /// The step ran on fresh leaf variables of its inputs (`None`: a model input, which needs
    /// no gradient); its outputs carry candle's graph back to them and to the weights.
    Autograd {
        inputs: Vec<Option<Var>>,
        outputs: Vec<Tensor>,
    },
    /// Nothing to pass back: the step read only model inputs and has no trainable weight
    /// (an augmentation or rescaling layer at the input).
    Nothing,
}

/// A training forward pass's record: per step, where its gradients go and how they are
/// computed. [`Tape::backward`] consumes it.
#[derive(Debug)]
pub(crate) struct Tape {
    steps: Vec<(usize, Backward)>,
    slot_count: usize,
    input_slots: Vec<usize>,
    output_slots: Vec<usize>,
}

/// The model's training forward pass for a step whose gradients [`Tape::backward`]
/// computes: the outputs carry no autograd graph, the tape holds what the backward pass
/// needs. Inputs are converted and checked, and the seeds drawn, as
/// [`Model::forward_deferred`] does; for a model without a compute dtype (mixed precision
/// goes through candle's autograd), on a non-empty batch. With `composed_on_cpu` the CPU
/// composes gradients as the GPU does (see the module's documentation).
pub(crate) fn forward(
    model: &Model,
    inputs: &[Tensor],
    updates: &StateUpdates,
    composed_on_cpu: bool,
) -> Result<(Vec<Tensor>, Tape)> {
    let (inputs, pass) = model.training_pass(inputs, updates)?;
    run(model.plan(), model.name(), &inputs, (pass, composed_on_cpu))
}

/// [`forward`] on the plan: each step's outputs, detached, and its record.
fn run(
    plan: &Plan,
    model: &str,
    inputs: &[Tensor],
    (pass, composed_on_cpu): (Pass, bool),
) -> Result<(Vec<Tensor>, Tape)> {
    plan.check_inputs(model, inputs)?;
    let mut steps = Vec::with_capacity(plan.steps.len());
    let detached = inputs.iter().map(Tensor::detach).collect();
    let outputs = plan.execute(model, detached, pass, |index, step, args, step_pass| {
        let composed = args
            .first()
            .is_some_and(|x| ops::composes_gradients(x, composed_on_cpu));
        let (outputs, backward) = record(plan, step, args, (step_pass, composed))?;
        steps.push((index, backward));
        Ok(outputs)
    })?;
    let tape = Tape {
        steps,
        slot_count: plan.slot_count,
        input_slots: plan.input_slots.clone(),
        output_slots: plan.output_slots.clone(),
    };
    Ok((outputs, tape))
}

/// One step's forward pass and how its gradients will be computed: natively where the layer
/// can ([`native_step`]), else through candle's autograd on leaf variables of its inputs (a
/// copy of each input that needs a gradient; a model input needs none), which stop candle's
/// graph at this step.
fn record(
    plan: &Plan,
    step: &Step,
    args: &[Tensor],
    (pass, composed): (Pass, bool),
) -> Result<(Vec<Tensor>, Backward)> {
    let layer = step.node.layer();
    if let Some((output, native)) = native_step(layer, args, (pass, composed), step.fusion)? {
        return Ok((vec![output], Backward::Native(native)));
    }
    let vars = step
        .input_slots
        .iter()
        .zip(args)
        .map(|(slot, t)| match plan.input_slots.contains(slot) {
            true => Ok(None),
            false => Ok(Some(Var::from_tensor(&t.detach())?)),
        })
        .collect::<Result<Vec<_>>>()?;
    let leaves: Vec<Tensor> = vars
        .iter()
        .zip(args)
        .map(|(v, t)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let outputs = layer.forward(&leaves, pass, step.fusion)?;
    let detached = outputs.iter().map(Tensor::detach).collect();
    let backward = match outputs.iter().any(Tensor::track_op) {
        true => Backward::Autograd {
            inputs: vars,
            outputs,
        },
        false => Backward::Nothing,
    };
    Ok((detached, backward))
}

/// The layer's forward pass with its weights detached, when it computes its own gradients (a
/// convolution, a batch norm, max pooling, nearest upsampling, a concatenation, average
/// pooling, `Flatten`, `Dense`: their `forward_native`, `layers/native_backward.rs`); `None`
/// otherwise, and for a layer not built (its forward pass then reports that). With
/// `composed`, the gradients of convolutions, batch norms, max pooling and upsampling are
/// composed of the device's separate kernels and candle's ops.
fn native_step(
    layer: &LayerRef,
    inputs: &[Tensor],
    (pass, composed): (Pass, bool),
    fusion: Fusion,
) -> Result<Option<(Tensor, Native)>> {
    let Some(any) = layer.op().as_any() else {
        return Ok(None);
    };
    // The layers without weights that connect an encoder to its decoder.
    match (inputs, fusion.is_none()) {
        (_, false) => {}
        ([x], true) => {
            if let Some(pool) = any.downcast_ref::<MaxPooling2DConfig>() {
                return pool.forward_native(x, composed);
            }
            if let Some(up) = any.downcast_ref::<UpSampling2DConfig>() {
                let params = Params::new(&[], &[], pass.mode, pass.seed);
                return up.forward_native(x, &params, composed);
            }
            // The classifier's head, on any device.
            if let Some(pool) = any.downcast_ref::<AveragePooling2DConfig>() {
                return pool.forward_native(x);
            }
            if let Some(pool) = any.downcast_ref::<GlobalAveragePooling2DConfig>() {
                return pool.forward_native(x);
            }
            if let Some(flatten) = any.downcast_ref::<FlattenConfig>() {
                return flatten.forward_native(x);
            }
        }
        (_, true) => {
            if let Some(cat) = any.downcast_ref::<ConcatenateConfig>() {
                return cat.forward_native(inputs);
            }
        }
    }
    let Some(weights) = layer.weights() else {
        return Ok(None);
    };
    let params = Params::new(&weights.specs, &weights.vars, pass.mode, pass.seed)
        .with_compute_dtype(pass.compute_dtype)
        .with_trainable(layer.trainable())
        .with_state_updates(pass.state_updates)
        .with_detached(true);
    if let Some(conv) = any.downcast_ref::<Conv2DConfig>() {
        return match inputs {
            [x] => conv.forward_native(x, &params, fusion, composed),
            _ => Ok(None),
        };
    }
    if let Some(dense) = any.downcast_ref::<DenseConfig>() {
        return match (inputs, fusion.is_none()) {
            ([x], true) => dense.forward_native(x, &params),
            _ => Ok(None),
        };
    }
    match any.downcast_ref::<BatchNormConfig>() {
        Some(bn) => bn.forward_native(inputs, &params, fusion, composed),
        None => Ok(None),
    }
}

impl Tape {
    /// The gradients of the weights, given those of the model's outputs (`None`: the output
    /// takes no part in the loss), added into `grads` (which may already hold the weights'
    /// penalty gradients). `weights` are the model's trainable variables: a step that ran
    /// through candle's autograd hands on the gradients it found for any of them (a nested
    /// model's included). Each step's record is dropped once its gradients are out, so
    /// activations are freed as the pass goes back.
    pub(crate) fn backward(
        self,
        plan: &Plan,
        output_grads: Vec<Option<Tensor>>,
        grads: &mut GradStore,
        weights: &[Var],
    ) -> Result<()> {
        let mut slot_grads: Vec<Option<Tensor>> = vec![None; self.slot_count];
        for (&slot, g) in self.output_slots.iter().zip(output_grads) {
            if let Some(g) = g {
                accumulate(&mut slot_grads[slot], g)?;
            }
        }
        let by_id: HashMap<TensorId, &Var> = weights.iter().map(|v| (v.id(), v)).collect();
        let model_inputs = self.input_slots;
        // A model input needs no gradient.
        let add_to_slot =
            |slot_grads: &mut [Option<Tensor>], slot: usize, g: Tensor| -> Result<()> {
                match model_inputs.contains(&slot) {
                    true => Ok(()),
                    false => accumulate(&mut slot_grads[slot], g),
                }
            };
        for (index, backward) in self.steps.into_iter().rev() {
            let step = &plan.steps[index];
            let dys: Vec<Option<Tensor>> = step
                .output_slots
                .iter()
                .map(|&s| slot_grads[s].take())
                .collect();
            if dys.iter().all(Option::is_none) {
                continue;
            }
            match backward {
                Backward::Native(native) => {
                    let [Some(dy)] = &dys[..] else {
                        return Err(Error::InvalidArgument(
                            "own backward pass: a layer with its own gradients has one output"
                                .into(),
                        ));
                    };
                    let (dxs, weight_grads) = native.gradients(dy)?;
                    if dxs.len() != step.input_slots.len() {
                        return Err(Error::InvalidArgument(format!(
                            "own backward pass: {} input gradients for {} inputs",
                            dxs.len(),
                            step.input_slots.len()
                        )));
                    }
                    for (&slot, dx) in step.input_slots.iter().zip(dxs) {
                        add_to_slot(&mut slot_grads, slot, dx)?;
                    }
                    for (var, g) in weight_grads {
                        add_to_store(grads, &var, g)?;
                    }
                }
                Backward::Nothing => {}
                Backward::Autograd { inputs, outputs } => {
                    let mut terms = Vec::new();
                    for (y, dy) in outputs.iter().zip(&dys) {
                        if let Some(dy) = dy {
                            terms.push((y * dy.to_dtype(y.dtype())?)?.sum_all()?);
                        }
                    }
                    let total = match terms.len() {
                        1 => terms.remove(0),
                        _ => Tensor::stack(&terms, 0)?.sum_all()?,
                    };
                    let local = total.backward()?;
                    for (slot, var) in step.input_slots.iter().zip(&inputs) {
                        if let Some(g) = var.as_ref().and_then(|v| local.get(v.as_tensor())) {
                            add_to_slot(&mut slot_grads, *slot, g.clone())?;
                        }
                    }
                    for (id, var) in &by_id {
                        if let Some(g) = local.get_id(*id) {
                            add_to_store(grads, var, g.clone())?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A slot's first gradient is moved in; a later one is added. Detached: a gradient that
/// candle's autograd computed from a weight (`dy · Wᵀ`) still carries the weight in its
/// graph, and the next step's `Σ y·dy` would differentiate it again.
fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    let g = g.detach();
    *slot = Some(match slot.take() {
        None => g,
        Some(sum) => (sum + g)?,
    });
    Ok(())
}

/// Adds `g` to the gradient `grads` holds for `var` (a weight shared by several calls, or
/// one with a penalty).
fn add_to_store(grads: &mut GradStore, var: &Var, g: Tensor) -> Result<()> {
    let g = g.detach();
    let sum = match grads.remove(var.as_tensor()) {
        None => g,
        Some(sum) => (sum + g)?,
    };
    grads.insert(var.as_tensor(), sum);
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::Backward;
    use crate::graph::{Input, Layer, StateUpdates};
    use crate::layers::{
        BatchNorm, Concatenate, Conv2D, MaxPooling2D, Padding, ReLU, UpSampling2D,
    };
    use crate::models::{Model, ResNetConfig};

    /// The layer types of the steps that went native, and of those that did not, with the
    /// gradients `composed` as on CUDA or not.
    fn paths(
        model: &Model,
        input: Tensor,
        composed: bool,
    ) -> (Vec<&'static str>, Vec<&'static str>) {
        let updates = StateUpdates::default();
        let (_, tape) = super::forward(model, &[input], &updates, composed).unwrap();
        let (mut native, mut autograd) = (Vec::new(), Vec::new());
        for (index, backward) in &tape.steps {
            let kind = model.plan().steps[*index].node.layer().op().type_name();
            match backward {
                Backward::Native(_) => native.push(kind),
                _ => autograd.push(kind),
            }
        }
        (native, autograd)
    }

    /// In a U-Net, the pooling, upsampling and concatenation between the convolutions
    /// compute their own gradients too, with the CPU's kernels or composed as on CUDA:
    /// nothing goes through candle's autograd.
    #[test]
    fn a_u_nets_connecting_layers_take_the_native_path() {
        let image = Input::new([3, 8, 8]);
        let conv = |x, f| {
            let y = Conv2D::new(f, 3).padding(Padding::Same).call(x).unwrap();
            let y = BatchNorm::new().call(&y).unwrap();
            ReLU::new().call(&y).unwrap()
        };
        let s1 = conv(&image, 4);
        let down = MaxPooling2D::new(2).call(&s1).unwrap();
        let up = UpSampling2D::new(2).call(&conv(&down, 8)).unwrap();
        let joined = Concatenate::new(1).call_many(&[up, s1]).unwrap();
        let mask = Conv2D::new(3, 1).call(&conv(&joined, 4)).unwrap();
        let model = Model::new(&[image], &[mask])
            .unwrap()
            .build(&Device::Cpu, DType::F32, 1)
            .unwrap();
        let input = Tensor::ones((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let (native, autograd) = paths(&model, input.clone(), false);
        assert!(autograd.is_empty(), "through autograd: {autograd:?}");
        for kind in ["MaxPooling2D", "UpSampling2D", "Concatenate"] {
            assert!(native.contains(&kind), "{kind} not native: {native:?}");
        }
        let (native, autograd) = paths(&model, input, true);
        assert!(
            autograd.is_empty(),
            "composed, through autograd: {autograd:?}"
        );
        for kind in ["MaxPooling2D", "UpSampling2D", "Concatenate"] {
            assert!(native.contains(&kind), "{kind} not native: {native:?}");
        }
    }

    /// In the article's ResNet every step computes its own gradients: the convolutions and
    /// batch norms with the CPU's fused kernels or composed as on CUDA, the pooling,
    /// flattening and Dense head with candle's ops on any device. Nothing goes through
    /// candle's autograd.
    #[test]
    fn convolutions_and_batch_norms_take_the_native_path() {
        for composed in [false, true] {
            resnet_paths(composed);
        }
    }

    fn resnet_paths(composed: bool) {
        let config = ResNetConfig {
            input_shape: [3, 8, 8],
            stages: vec![1, 1],
            filters: vec![4, 8],
            pool_size: 2,
            num_classes: 3,
            ..Default::default()
        };
        let model = config
            .res_net()
            .unwrap()
            .build(&Device::Cpu, DType::F32, 1)
            .unwrap();
        let updates = StateUpdates::default();
        let input = Tensor::ones((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let (outputs, tape) = super::forward(&model, &[input], &updates, composed).unwrap();
        assert_eq!(outputs[0].dims(), &[2, 3]);
        let (mut native, mut autograd) = (0, Vec::new());
        for (index, backward) in &tape.steps {
            let kind = model.plan().steps[*index].node.layer().op().type_name();
            let kernels = matches!(kind, "Conv2D" | "BatchNormalization");
            match backward {
                Backward::Native(native_step) => {
                    native += 1;
                    let expected = kernels.then_some(composed);
                    assert_eq!(native_step.composed(), expected, "{kind}");
                }
                _ => autograd.push(kind),
            }
        }
        assert!(autograd.is_empty(), "through autograd: {autograd:?}");
        assert!(native >= 13, "{native} native steps");
    }
}

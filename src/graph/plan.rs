//! The execution plan of a graph, computed once when a [`Model`](crate::Model) is made, and
//! the executor that runs it.
//!
//! Following Keras's `functional.py`: walk back from the outputs to the inputs, collecting the
//! nodes that are needed, check that every needed value is computable from the given inputs
//! ("graph disconnected" otherwise), order the nodes topologically, give the layers unique
//! names, and number every intermediate tensor with an integer slot. Each step also lists the
//! slots it is the last reader of, so the executor frees activations as early as possible.
//!
//! One rewrite, where it changes no value or gradient: an element-wise layer whose output has
//! one reader that can apply it itself (a ReLU read only by a BatchNorm: the article's
//! `relu_bn`; the residual Add before it) is left out of the steps, and its reader runs on its
//! inputs with the function as its [`Fusion`]'s prologue (a ReLU after a BatchNorm becomes its
//! epilogue): one pass over memory fewer each way, and one
//! activation fewer kept for the backward pass.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::Tensor;

use crate::fusion::Fusion;
use crate::graph::op::LayerRef;
use crate::graph::params::Pass;
use crate::graph::symbolic::{Node, SymbolicTensor, check_sample_shape};
use crate::support::dtype::Cast;
use crate::support::seed::mix;
use crate::{Error, Result};

/// One node to run: where its inputs are, where its outputs go, what to free afterwards.
#[derive(Debug)]
pub(crate) struct Step {
    pub(crate) node: Arc<Node>,
    pub(crate) input_slots: Vec<usize>,
    pub(crate) output_slots: Vec<usize>,
    pub(crate) free_after: Vec<usize>,
    /// The element-wise layers folded into this one: applied to the inputs first (the
    /// prologue) and to the output after (the epilogue).
    pub(crate) fusion: Fusion,
    /// The node's place in topological order, which seeds its randomness: the same with and
    /// without folded steps.
    pub(crate) order: usize,
}

/// A graph ready to run.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) inputs: Vec<SymbolicTensor>,
    pub(crate) outputs: Vec<SymbolicTensor>,
    pub(crate) steps: Vec<Step>,
    /// Distinct layers in creation order, `Input` layers included.
    pub(crate) layers: Vec<LayerRef>,
    /// Nodes of each layer in `layers` that belong to this graph, in creation order.
    pub(crate) layer_nodes: Vec<Vec<Arc<Node>>>,
    pub(crate) input_slots: Vec<usize>,
    pub(crate) output_slots: Vec<usize>,
    pub(crate) slot_count: usize,
    /// Per input: read only by layers that take indices (`LayerOp::reads_indices`), so kept
    /// in its own dtype.
    pub(crate) index_inputs: Vec<bool>,
}

impl Plan {
    pub(crate) fn new(inputs: &[SymbolicTensor], outputs: &[SymbolicTensor]) -> Result<Self> {
        let mut input_keys = HashMap::new();
        for (i, t) in inputs.iter().enumerate() {
            check_sample_shape(&t.layer().display_name(), "the input", t.shape())?;
            if input_keys.insert(t.key(), i).is_some() {
                return Err(Error::DuplicateInput {
                    input: t.layer().display_name(),
                });
            }
        }

        // Walk back from the outputs; stop at the given inputs.
        let mut needed: HashMap<u64, Arc<Node>> = HashMap::new();
        let mut reached_inputs = HashSet::new();
        let mut stack: Vec<(SymbolicTensor, String)> = outputs
            .iter()
            .map(|t| (t.clone(), "<model output>".to_string()))
            .collect();
        while let Some((tensor, consumer)) = stack.pop() {
            if let Some(&i) = input_keys.get(&tensor.key()) {
                reached_inputs.insert(i);
                continue;
            }
            let node = tensor.node();
            if node.is_input() {
                return Err(Error::GraphDisconnected {
                    layer: consumer,
                    input: node.layer().display_name(),
                });
            }
            if needed.insert(node.id(), node.clone()).is_none() {
                let name = node.layer().display_name();
                stack.extend(node.inputs().iter().map(|t| (t.clone(), name.clone())));
            }
        }
        if let Some(unused) = (0..inputs.len()).find(|i| !reached_inputs.contains(i)) {
            return Err(Error::UnusedInput {
                input: inputs[unused].layer().display_name(),
            });
        }

        let mut nodes: Vec<Arc<Node>> = needed.into_values().collect();
        nodes.sort_by_key(|n| n.id());

        let (layers, layer_nodes) = collect_layers(inputs, &nodes);
        assign_names(&layers)?;

        // Slots: inputs first, then every output of every node, in plan order.
        let mut slot_of: HashMap<(u64, usize), usize> = HashMap::new();
        for t in inputs {
            let next = slot_of.len();
            slot_of.insert(t.key(), next);
        }
        let mut steps = Vec::with_capacity(nodes.len());
        for (order, node) in nodes.iter().enumerate() {
            let input_slots = node.inputs().iter().map(|t| slot_of[&t.key()]).collect();
            let output_slots = (0..node.output_shapes().len())
                .map(|i| {
                    let next = slot_of.len();
                    slot_of.insert((node.id(), i), next);
                    next
                })
                .collect();
            steps.push(Step {
                node: node.clone(),
                input_slots,
                output_slots,
                free_after: Vec::new(),
                fusion: Fusion::new(),
                order,
            });
        }
        let output_slots: Vec<usize> = outputs.iter().map(|t| slot_of[&t.key()]).collect();
        let mut steps = fold_element_wise(steps, &output_slots);

        // The last reader of a slot frees it, unless it is a model output.
        let mut last_reader: HashMap<usize, usize> = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            for &s in &step.input_slots {
                last_reader.insert(s, i);
            }
        }
        let kept: HashSet<usize> = output_slots.iter().copied().collect();
        for (slot, step) in last_reader {
            if !kept.contains(&slot) {
                steps[step].free_after.push(slot);
            }
        }
        for step in &mut steps {
            step.free_after.sort_unstable();
            step.free_after.dedup();
        }

        // Inputs take slots 0..n; an index input has readers, all of them index layers.
        let index_inputs = (0..inputs.len())
            .map(|slot| {
                let mut readers = steps.iter().filter(|s| s.input_slots.contains(&slot));
                let mut any = false;
                let all = readers.all(|s| {
                    any = true;
                    s.node.layer().op().reads_indices()
                });
                any && all && !kept.contains(&slot)
            })
            .collect();

        Ok(Self {
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
            steps,
            layers,
            layer_nodes,
            input_slots: (0..inputs.len()).collect(),
            output_slots,
            slot_count: slot_of.len(),
            index_inputs,
        })
    }
}

impl Plan {
    /// Runs the steps on concrete tensors (batch first), one per input, after checking their
    /// count and shapes. Each activation is dropped right after its last reader (candle's
    /// autograd keeps what backward needs; the executor keeps nothing more). Step `i` gets
    /// the seed `mix(pass.seed, i)`; the pass's compute dtype casts float inputs for mixed
    /// precision. `model` names the model in errors.
    pub(crate) fn run(&self, model: &str, inputs: &[Tensor], pass: Pass) -> Result<Vec<Tensor>> {
        self.run_with(model, inputs, pass, |_, step, args, step_pass| {
            step.node.layer().forward(args, step_pass, step.fusion)
        })
    }

    /// [`run`](Self::run) with `run_step` computing each step's outputs, as in
    /// [`execute`](Self::execute): for an executor that runs some steps its own way (a model
    /// in inference folding a batch norm into the convolution before it).
    pub(crate) fn run_with(
        &self,
        model: &str,
        inputs: &[Tensor],
        pass: Pass,
        run_step: impl FnMut(usize, &Step, &[Tensor], Pass) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        self.check_inputs(model, inputs)?;
        if let Some(first) = inputs.first()
            && first.dim(0)? == 0
        {
            return self.empty_outputs(first, pass);
        }
        let inputs = inputs
            .iter()
            .zip(&self.index_inputs)
            .map(|(t, &indices)| {
                Ok(match pass.compute_dtype {
                    Some(dtype) if !indices && t.dtype().is_float() && t.dtype() != dtype => {
                        t.cast(dtype)?
                    }
                    _ => t.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.execute(model, inputs, pass, run_step)
    }

    /// The executor: runs the steps in order on `inputs` (one per model input, as the steps
    /// take them), `run_step(index, step, arguments, pass)` computing each step's outputs with
    /// the step's pass (seed `mix(pass.seed, order)`). Each activation is dropped right after
    /// its last reader; returns the model's outputs. The one loop behind [`Plan::run`] and
    /// the trainer's recorded forward pass (`train/tape.rs`).
    pub(crate) fn execute(
        &self,
        model: &str,
        inputs: Vec<Tensor>,
        pass: Pass,
        mut run_step: impl FnMut(usize, &Step, &[Tensor], Pass) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let internal = |slot: usize| {
            Error::InvalidArgument(format!(
                "model `{model}`: slot {slot} read before it was computed (a bug in the plan)"
            ))
        };
        let mut slots: Vec<Option<Tensor>> = vec![None; self.slot_count];
        for (&slot, t) in self.input_slots.iter().zip(inputs) {
            slots[slot] = Some(t);
        }
        for (index, step) in self.steps.iter().enumerate() {
            let args = step
                .input_slots
                .iter()
                .map(|&s| slots[s].clone().ok_or_else(|| internal(s)))
                .collect::<Result<Vec<_>>>()?;
            let step_pass = Pass {
                seed: mix(pass.seed, step.order as u64),
                ..pass
            };
            let outputs = run_step(index, step, &args, step_pass)?;
            for (&slot, t) in step.output_slots.iter().zip(outputs) {
                slots[slot] = Some(t);
            }
            for &slot in &step.free_after {
                slots[slot] = None;
            }
        }
        self.output_slots
            .iter()
            .map(|&s| slots[s].clone().ok_or_else(|| internal(s)))
            .collect()
    }

    /// An empty batch gives empty outputs of the graph's shapes: no layer runs (batch
    /// statistics of nothing are undefined), nothing is updated.
    fn empty_outputs(&self, first: &Tensor, pass: Pass) -> Result<Vec<Tensor>> {
        let dtype = match pass.compute_dtype {
            Some(dtype) => dtype,
            None if first.dtype().is_float() => first.dtype(),
            None => candle_core::DType::F32,
        };
        self.outputs
            .iter()
            .map(|t| {
                let mut shape = vec![0];
                shape.extend_from_slice(t.shape());
                Ok(Tensor::zeros(shape, dtype, first.device())?)
            })
            .collect()
    }

    pub(crate) fn check_inputs(&self, model: &str, inputs: &[Tensor]) -> Result<()> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::InputCount {
                model: model.to_string(),
                expected: self.inputs.len(),
                got: inputs.len(),
            });
        }
        for ((t, sym), &indices) in inputs.iter().zip(&self.inputs).zip(&self.index_inputs) {
            if t.rank() != sym.shape().len() + 1 || &t.dims()[1..] != sym.shape() {
                return Err(Error::InputShape {
                    model: model.to_string(),
                    input: sym.layer().display_name(),
                    expected: sym.shape().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            // Every layer but an index reader computes in floats; candle's integer kernels
            // would wrap (or panic in a debug build) on what a float model does to its input.
            if !t.dtype().is_float() && !indices {
                return Err(Error::InvalidArgument(format!(
                    "model `{model}`: input `{}` is {:?}, but the model computes in floats: convert it first (`to_dtype(DType::F32)`)",
                    sym.layer().display_name(),
                    t.dtype()
                )));
            }
        }
        Ok(())
    }
}

/// Leaves out each element-wise step ([`LayerOp::as_element_wise`], as many inputs as its
/// function takes, one output) whose output is read once, by a step of one input that is not
/// a model output and [`accepts_prologue`](crate::LayerOp::accepts_prologue) the function
/// (composed with what it already applies: an Add folded behind a folded ReLU is one
/// [`ElementWise::AddRelu`](crate::ElementWise::AddRelu)); that reader takes the step's inputs and the function as its
/// prologue. Then each one-input element-wise step left whose input is read only by it and is
/// the one output of a step that [`accepts_epilogue`](crate::LayerOp::accepts_epilogue) the
/// function: that step takes over its output, with the function as its epilogue.
///
/// [`LayerOp::as_element_wise`]: crate::LayerOp::as_element_wise
fn fold_element_wise(mut steps: Vec<Step>, model_outputs: &[usize]) -> Vec<Step> {
    // Folding moves reads from the folded step to its reader: the counts stay right.
    let mut reads: HashMap<usize, usize> = HashMap::new();
    for step in &steps {
        for &s in &step.input_slots {
            *reads.entry(s).or_default() += 1;
        }
    }
    let producer: HashMap<usize, usize> = steps
        .iter()
        .enumerate()
        .flat_map(|(i, step)| step.output_slots.iter().map(move |&s| (s, i)))
        .collect();
    let mut folded = vec![false; steps.len()];
    for reader in 0..steps.len() {
        // Fold backwards from the reader as long as there is something to fold.
        while let [slot] = steps[reader].input_slots[..] {
            let Some(&elementwise) = producer.get(&slot) else {
                break;
            };
            let producing = &steps[elementwise];
            let Some(own) = producing.node.layer().op().as_element_wise() else {
                break;
            };
            let composed = own.then(steps[reader].fusion.prologue());
            let fits = producing.input_slots.len() == own.arity()
                && producing.output_slots.len() == 1
                && producing.fusion.prologue().is_none()
                && reads[&slot] == 1
                && !model_outputs.contains(&slot)
                && composed.is_some_and(|p| steps[reader].node.layer().op().accepts_prologue(p));
            if !fits {
                break;
            }
            folded[elementwise] = true;
            steps[reader].input_slots = steps[elementwise].input_slots.clone();
            if let Some(composed) = composed {
                steps[reader].fusion = steps[reader].fusion.with_prologue(composed);
            }
        }
    }
    // What is left of the one-input element-wise steps may fold into the step before them,
    // when that step's one output is read only by them (BatchNorm → ReLU).
    for elementwise in 0..steps.len() {
        let step = &steps[elementwise];
        let (Some(function), false, &[slot], 1) = (
            step.node.layer().op().as_element_wise(),
            folded[elementwise],
            &step.input_slots[..],
            step.output_slots.len(),
        ) else {
            continue;
        };
        let Some(&producing) = producer.get(&slot) else {
            continue;
        };
        let before = &steps[producing];
        let fits = function.arity() == 1
            && step.fusion.prologue().is_none()
            && !folded[producing]
            && before.output_slots.len() == 1
            && before.fusion.epilogue().is_none()
            && reads[&slot] == 1
            && !model_outputs.contains(&slot)
            && before.node.layer().op().accepts_epilogue(function);
        if fits {
            folded[elementwise] = true;
            steps[producing].output_slots = steps[elementwise].output_slots.clone();
            steps[producing].fusion = steps[producing].fusion.with_epilogue(function);
        }
    }
    steps
        .into_iter()
        .zip(folded)
        .filter_map(|(step, folded)| (!folded).then_some(step))
        .collect()
}

/// Distinct layers in order of first appearance (inputs' layers first), with their nodes.
fn collect_layers(
    inputs: &[SymbolicTensor],
    nodes: &[Arc<Node>],
) -> (Vec<LayerRef>, Vec<Vec<Arc<Node>>>) {
    let mut layers: Vec<LayerRef> = Vec::new();
    let mut layer_nodes: Vec<Vec<Arc<Node>>> = Vec::new();
    let mut index_of: HashMap<u64, usize> = HashMap::new();
    let all = inputs
        .iter()
        .filter(|t| t.node().is_input())
        .map(|t| t.node().clone())
        .chain(nodes.iter().cloned());
    for node in all {
        let layer = node.layer().clone();
        let i = *index_of.entry(layer.id()).or_insert_with(|| {
            layers.push(layer);
            layer_nodes.push(Vec::new());
            layers.len() - 1
        });
        layer_nodes[i].push(node);
    }
    (layers, layer_nodes)
}

/// Keras's naming: a layer keeps a name it already has (given by the user or by an earlier
/// model); the others get `base`, `base_1`, `base_2`, ... in creation order, skipping names
/// already taken. Two layers with one name are an error.
fn assign_names(layers: &[LayerRef]) -> Result<()> {
    let mut taken: HashSet<String> = HashSet::new();
    for layer in layers {
        if let Some(name) = layer.name()
            && !taken.insert(name.to_string())
        {
            return Err(Error::DuplicateLayerName {
                name: name.to_string(),
            });
        }
    }
    let mut counters: HashMap<String, usize> = HashMap::new();
    for layer in layers.iter().filter(|l| l.name().is_none()) {
        let base = layer.op().base_name();
        let counter = counters.entry(base.clone()).or_insert(0);
        let name = loop {
            let candidate = match *counter {
                0 => base.clone(),
                n => format!("{base}_{n}"),
            };
            *counter += 1;
            if !taken.contains(&candidate) {
                break candidate;
            }
        };
        taken.insert(name.clone());
        layer.assign_name(name);
    }
    Ok(())
}

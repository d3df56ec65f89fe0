//! The plan's own backward pass (`BackwardPass::Plan`, the CPU's default, and
//! `BackwardPass::PlanComposed`, the composition of separate gradient kernels that CUDA runs)
//! against candle's autograd over the whole step (`BackwardPass::Autograd`): from the same
//! weights, one SGD
//! step at learning rate 1 (the weights move by minus their gradients) must give the same
//! loss, the same gradient of every trainable weight and the same moving statistics, to 1e-5
//! of the gradients' scale in f32. On the article's ResNet and PlainNet, a U-Net with
//! concatenated skips, a model of two inputs and two outputs, a custom layer and a GELU
//! convolution between native steps, a layer called twice, and frozen layers.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_functional::data::Batch;
use candle_functional::prelude::*;
use candle_functional::train::{BackwardPass, Loss, Losses, NanCheck, SgdConfig, Trainer};
use candle_functional::{Configured, LayerOp, ParamSpec, Params};
use common::max_abs_diff;

const CPU: Device = Device::Cpu;

/// Deep copies of every weight (a `Var`'s storage is written in place by the optimizer).
fn snapshot(model: &Model) -> HashMap<String, Tensor> {
    model
        .weight_map()
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, t.copy().unwrap()))
        .collect()
}

/// One step with each backward pass from the same weights; the losses, the weights' moves
/// (their gradients) and the moving statistics must agree to `rel` of the moves' scale.
fn assert_same_step(model: &Model, batch: &Batch, losses: Losses, rel: f64) {
    let start = snapshot(model);
    let step = |pass: BackwardPass| {
        model.set_weights(&start).unwrap();
        let sgd = SgdConfig {
            learning_rate: 1.0,
            ..Default::default()
        };
        let mut trainer = Trainer::new(model.clone(), sgd, losses.clone())
            .unwrap()
            .nan_check(NanCheck::EveryStep)
            .backward_pass(pass);
        let loss = trainer.train_step(batch, 1.0).unwrap();
        (loss.to_dtype(DType::F64).unwrap(), snapshot(model))
    };
    let (loss_autograd, after_autograd) = step(BackwardPass::Autograd);
    for pass in [BackwardPass::Plan, BackwardPass::PlanComposed] {
        let (loss_plan, after_plan) = step(pass);
        let loss_diff = max_abs_diff(&loss_autograd, &loss_plan);
        assert!(loss_diff <= 1e-6, "{pass:?}: loss differs by {loss_diff}");
        let moves: HashMap<&String, (Tensor, Tensor)> = start
            .iter()
            .map(|(name, w0)| {
                let moved = |after: &HashMap<String, Tensor>| (&after[name] - w0).unwrap();
                (name, (moved(&after_autograd), moved(&after_plan)))
            })
            .collect();
        let scale = moves
            .values()
            .map(|(a, _)| max_abs_diff(a, &a.zeros_like().unwrap()))
            .fold(0.0, f64::max);
        assert!(scale > 0.0, "the step moved no weight");
        let mut moved = 0;
        for (name, (a, p)) in &moves {
            let d = max_abs_diff(a, p);
            assert!(
                d <= rel * scale,
                "{name}: autograd and {pass:?} differ by {d} (scale {scale})"
            );
            moved += usize::from(max_abs_diff(a, &a.zeros_like().unwrap()) > 0.0);
        }
        assert!(moved * 2 > moves.len(), "most weights should move");
    }
}

/// `n` samples of per-sample `shape`, f32, deterministic.
fn data(n: usize, shape: &[usize], seed: u64) -> Tensor {
    let mut dims = vec![n];
    dims.extend_from_slice(shape);
    let count: usize = dims.iter().product();
    common::varied(count, seed, DType::F32)
        .clamp(-3f32, 3f32)
        .unwrap()
        .reshape(dims)
        .unwrap()
}

fn labels(n: usize, classes: u32) -> Tensor {
    Tensor::from_vec((0..n as u32).map(|i| i % classes).collect(), n, &CPU).unwrap()
}

fn small_resnet_config() -> ResNetConfig {
    ResNetConfig {
        input_shape: [3, 16, 16],
        stages: vec![1, 1],
        filters: vec![8, 16],
        kernel_size: 3,
        pool_size: 4,
        num_classes: 5,
        ..Default::default()
    }
}

#[test]
fn the_articles_resnet_and_plain_net_get_the_same_gradients() {
    let config = small_resnet_config();
    let batch = Batch::new(vec![data(6, &[3, 16, 16], 1)], vec![labels(6, 5)]);
    for model in [config.res_net().unwrap(), config.plain_net().unwrap()] {
        let model = model.build(&CPU, DType::F32, 7).unwrap();
        let loss = Loss::SparseCategoricalCrossentropy { from_logits: false };
        assert_same_step(&model, &batch, loss.into(), 1e-5);
    }
}

fn conv_bn_relu(x: &SymbolicTensor, filters: usize) -> SymbolicTensor {
    let y = Conv2D::new(filters, 3)
        .padding(Padding::Same)
        .call(x)
        .unwrap();
    let y = BatchNorm::new().momentum(0.9).call(&y).unwrap();
    ReLU::new().call(&y).unwrap()
}

/// Max pooling over a map its windows do not tile (7x7 by 2: the last row and column take
/// no part), ties among the ReLU's zeros, nearest upsampling by (2, 3), and a concatenation
/// with a model input (which needs no gradient): the layers the own backward pass computes
/// natively between convolutions, at their edges.
#[test]
fn pooling_upsampling_and_concatenation_at_their_edges_get_the_same_gradients() {
    let image = Input::new([3, 7, 7]);
    let extra = Input::new([2, 6, 9]);
    let s = conv_bn_relu(&image, 4);
    let down = MaxPooling2D::new(2).call(&s).unwrap();
    let up = UpSampling2D::new(2).size(2, 3).call(&down).unwrap();
    let joined = Concatenate::new(1).call_many(&[up, extra.clone()]).unwrap();
    let out = Conv2D::new(3, 1).call(&conv_bn_relu(&joined, 4)).unwrap();
    let model = Model::new(&[image, extra], &[out])
        .unwrap()
        .build(&CPU, DType::F32, 5)
        .unwrap();
    let masks = Tensor::from_vec(
        (0..4 * 6 * 9).map(|i| (i % 3) as u32).collect(),
        (4, 6, 9),
        &CPU,
    )
    .unwrap();
    let inputs = vec![data(4, &[3, 7, 7], 4), data(4, &[2, 6, 9], 6)];
    let batch = Batch::new(inputs, vec![masks]);
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    assert_same_step(&model, &batch, loss.into(), 1e-5);
}

#[test]
fn a_u_net_with_concatenated_skips_gets_the_same_gradients() {
    let image = Input::new([3, 16, 16]);
    let s1 = conv_bn_relu(&image, 4);
    let down = MaxPooling2D::new(2).call(&s1).unwrap();
    let bottom = conv_bn_relu(&down, 8);
    let up = UpSampling2D::new(2).call(&bottom).unwrap();
    let joined = Concatenate::new(1).call_many(&[up, s1]).unwrap();
    let up = conv_bn_relu(&joined, 4);
    let mask = Conv2D::new(3, 1).call(&up).unwrap();
    let model = Model::new(&[image], &[mask])
        .unwrap()
        .build(&CPU, DType::F32, 3)
        .unwrap();
    let masks = Tensor::from_vec(
        (0..4 * 16 * 16).map(|i| (i % 3) as u32).collect(),
        (4, 16, 16),
        &CPU,
    )
    .unwrap();
    let batch = Batch::new(vec![data(4, &[3, 16, 16], 2)], vec![masks]);
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    assert_same_step(&model, &batch, loss.into(), 1e-5);
}

#[test]
fn two_inputs_and_two_outputs_get_the_same_gradients() {
    let image = Input::new([2, 8, 8]);
    let extra = Input::new([4]);
    let h = conv_bn_relu(&image, 4);
    let h = Conv2D::new(4, 3)
        .strides(2)
        .padding(Padding::Same)
        .call(&h)
        .unwrap();
    let h = BatchNorm::new().call(&h).unwrap();
    let pooled = GlobalAveragePooling2D::new().call(&h).unwrap();
    let both = Concatenate::new(1)
        .call_many(&[pooled, extra.clone()])
        .unwrap();
    let class = Dense::new(3).call(&both).unwrap();
    let value = Dense::new(1).call(&both).unwrap();
    // A ReLU and a softmax Dense: under a squared error the softmax's gradient has a part
    // across the classes (under cross-entropy on probabilities it sums to zero).
    let hidden = Dense::new(6)
        .activation(ActivationFn::Relu)
        .call(&both)
        .unwrap();
    let mix = Dense::new(2)
        .activation(ActivationFn::Softmax)
        .call(&hidden)
        .unwrap();
    let model = Model::new(&[image, extra], &[class, value, mix])
        .unwrap()
        .build(&CPU, DType::F32, 5)
        .unwrap();
    let batch = Batch::new(
        vec![data(5, &[2, 8, 8], 3), data(5, &[4], 4)],
        vec![labels(5, 3), data(5, &[1], 5), data(5, &[2], 6)],
    );
    let losses = Losses::per_output(vec![
        Loss::SparseCategoricalCrossentropy { from_logits: true },
        Loss::MeanSquaredError,
        Loss::MeanSquaredError,
    ])
    .weights(vec![1.0, 0.5, 2.0]);
    assert_same_step(&model, &batch, losses, 1e-5);
}

/// A layer of its own, without a backward pass: scales its input by a learned factor per
/// channel.
#[derive(Clone, Debug, Default)]
struct ChannelScale;

impl LayerOp for ChannelScale {
    fn type_name(&self) -> &'static str {
        "ChannelScale"
    }
    fn output_shapes(&self, _layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        Ok(vec![inputs[0].clone()])
    }
    fn param_specs(&self, inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        vec![ParamSpec::new(
            "scale",
            vec![inputs[0][0]],
            Initializer::Constant(0.5),
        )]
    }
    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        let scale = params.get("scale")?.reshape(((), 1, 1))?;
        Ok(vec![inputs[0].broadcast_mul(&scale)?])
    }
}

#[test]
fn custom_layers_shared_layers_and_frozen_layers_get_the_same_gradients() {
    let x = Input::new([3, 8, 8]);
    let h = conv_bn_relu(&x, 6);
    // A layer without a backward of its own between native steps.
    let h = Configured::from_config(ChannelScale).call(&h).unwrap();
    // A convolution whose activation (GELU) goes through candle's autograd.
    let h = Conv2D::new(6, 3)
        .padding(Padding::Same)
        .activation(ActivationFn::Gelu)
        .call(&h)
        .unwrap();
    // One convolution called twice: its gradients add up.
    let shared = Conv2D::new(6, 3).padding(Padding::Same).name("shared");
    let a = shared.call(&h).unwrap();
    let b = shared.call(&a).unwrap();
    // Frozen: a convolution and a batch norm (which then runs in inference mode).
    let frozen_conv = Conv2D::new(6, 1).name("frozen_conv");
    let frozen_bn = BatchNorm::new().name("frozen_bn");
    let c = frozen_conv.call(&b).unwrap();
    let c = frozen_bn.call(&c).unwrap();
    let sum = Add::new().call_many(&[c, h]).unwrap();
    let y = BatchNorm::new().call(&sum).unwrap();
    let y = GlobalAveragePooling2D::new().call(&y).unwrap();
    let y = Dense::new(4).call(&y).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, 11)
        .unwrap();
    model.layer("frozen_conv").unwrap().set_trainable(false);
    model.layer("frozen_bn").unwrap().set_trainable(false);
    let batch = Batch::new(vec![data(4, &[3, 8, 8], 6)], vec![labels(4, 4)]);
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: true };
    assert_same_step(&model, &batch, loss.into(), 1e-5);
}

#[test]
fn f64_models_get_the_same_gradients_to_f64_precision() {
    let config = small_resnet_config();
    let model = config
        .res_net()
        .unwrap()
        .build(&CPU, DType::F64, 9)
        .unwrap();
    let x = data(4, &[3, 16, 16], 8).to_dtype(DType::F64).unwrap();
    let batch = Batch::new(vec![x], vec![labels(4, 5)]);
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: false };
    assert_same_step(&model, &batch, loss.into(), 1e-10);
}

//! In inference a model folds each batch norm that alone reads a convolution's output into
//! that convolution (`models/inference.rs`): the outputs must be those of the two layers run
//! one after the other (an input that is a variable, asking for gradients, runs them so),
//! with fewer tensors written; training mode never folds.

mod common;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, Var};
use candle_functional::layers::BatchNormConfig;
use candle_functional::models::ResNetConfig;
use candle_functional::prelude::*;
use candle_functional::profile::{AllocationCounts, CountingAllocator, folded_batch_norms};
use common::{assert_same, max_abs, max_abs_diff, varied};

#[global_allocator]
static ALLOCATOR: CountingAllocator<std::alloc::System> =
    CountingAllocator::new(std::alloc::System);

/// The counts are the process's: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gives every batch norm of `model` statistics and weights away from 0 and 1 (varied
/// signs, gamma negative in places), so that a fold that dropped or misplaced one shows.
fn vary_batch_norms(model: &Model, seed: u64) {
    let mut weights: HashMap<String, Tensor> = model.weight_map().unwrap();
    for (i, (name, t)) in weights.iter_mut().enumerate() {
        let n = t.elem_count();
        let dtype = t.dtype();
        let v = varied(n, seed + i as u64, DType::F64)
            .clamp(-3.0, 3.0)
            .unwrap();
        let v = if name.ends_with("moving_variance") {
            (v.abs().unwrap() + 0.25).unwrap()
        } else if name.ends_with("gamma") || name.ends_with("beta") || name.ends_with("moving_mean")
        {
            (v * 2.0).unwrap()
        } else {
            continue;
        };
        *t = v.reshape(t.dims()).unwrap().to_dtype(dtype).unwrap();
    }
    model.set_weights(&weights).unwrap();
}

/// What one inference pass gave and cost: its outputs, the batch norms it folded, the tensor
/// buffers and bytes it allocated.
struct Pass {
    outputs: Vec<Tensor>,
    folds: u64,
    buffers: u64,
    bytes: u64,
}

fn infer(model: &Model, x: Tensor) -> Pass {
    // Once first: primitives and work buffers are made on the first call.
    model.forward(std::slice::from_ref(&x), Mode::Eval).unwrap();
    let (before, folds) = (AllocationCounts::now(), folded_batch_norms());
    let outputs = model.forward(&[x], Mode::Eval).unwrap();
    let counts = AllocationCounts::now().since(&before);
    Pass {
        outputs,
        folds: folded_batch_norms() - folds,
        buffers: counts.tensor_buffers(),
        bytes: counts.bytes(),
    }
}

/// The model in inference on `x` as a plain tensor (folded) and as a variable (the layers
/// one after the other, as a pass that asks for the input's gradient runs them): the outputs
/// agree, the folded pass folds `folds` batch norms and allocates fewer buffers and bytes,
/// the other folds none.
fn check_fold(model: &Model, x: &Tensor, folds: u64, what: &str) {
    let folded = infer(model, x.clone());
    let unfolded = infer(model, Var::from_tensor(x).unwrap().as_tensor().clone());
    for (i, (yf, yu)) in folded.outputs.iter().zip(&unfolded.outputs).enumerate() {
        assert_outputs_agree(yf, yu, &format!("{what}: output {i}"));
    }
    assert_eq!((folded.folds, unfolded.folds), (folds, 0), "{what}: folds");
    assert!(
        folded.buffers < unfolded.buffers && folded.bytes < unfolded.bytes,
        "{what}: buffers {} vs {}, bytes {} vs {}",
        folded.buffers,
        unfolded.buffers,
        folded.bytes,
        unfolded.bytes
    );
}

fn input(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    let n = shape.iter().product();
    varied(n, seed, DType::F64)
        .clamp(-4.0, 4.0)
        .unwrap()
        .reshape(shape)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// f64 runs the GEMM path (the same arithmetic as the two kernels: bit for bit); f32 may run
/// oneDNN with the map folded into its weights (feature `onednn`), rounded differently.
fn assert_outputs_agree(folded: &Tensor, unfolded: &Tensor, what: &str) {
    match folded.dtype() {
        DType::F64 => assert_same(
            &folded.flatten_all().unwrap(),
            &unfolded.flatten_all().unwrap(),
            what,
        ),
        _ => {
            let scale = max_abs(unfolded).max(1.0);
            let diff = max_abs_diff(folded, unfolded);
            assert!(
                diff <= 1e-5 * scale,
                "{what}: differ by {diff} (scale {scale})"
            );
        }
    }
}

/// A small version of the article's networks: the stem's and each block's first `relu_bn`
/// fold (PlainNet: every one after a convolution; ResNet: not those after the Add).
#[test]
fn the_article_networks_fold_their_batch_norms_in_inference() {
    let _serial = serial();
    for dtype in [DType::F32, DType::F64] {
        for (name, plain, pairs) in [("plain_net", true, 5u64), ("resnet", false, 3)] {
            let config = ResNetConfig {
                input_shape: [3, 8, 8],
                stages: vec![1, 1],
                filters: vec![4, 8],
                pool_size: 4,
                ..ResNetConfig::default()
            };
            let model = match plain {
                true => config.plain_net(),
                false => config.res_net(),
            }
            .unwrap()
            .build(&Device::Cpu, dtype, 3)
            .unwrap();
            vary_batch_norms(&model, 11);
            // 8 images of 8x8: enough output pixels for oneDNN's path in that build.
            let x = input(&[8, 3, 8, 8], dtype, 5);
            check_fold(&model, &x, pairs, &format!("{name} {dtype:?}"));
        }
    }
}

/// Conv → BatchNorm → ReLU (the ReLU as the batch norm's epilogue), a convolution with its
/// own ReLU and bias, a batch norm without scale or centre, a stride-2 'same' convolution, a
/// convolution whose output has a second reader (no fold), one that is a model output (no
/// fold), and a nested model's own pair.
#[test]
fn every_kind_of_pair_folds_and_the_others_do_not() {
    let _serial = serial();
    for dtype in [DType::F32, DType::F64] {
        let inner_in = Input::new([6, 4, 4]);
        let inner_conv = Conv2D::new(6, 3)
            .padding(Padding::Same)
            .call(&inner_in)
            .unwrap();
        let inner_out = BatchNorm::new().call(&inner_conv).unwrap();
        let inner = Model::new(&[inner_in], &[inner_out]).unwrap();

        let x = Input::new([3, 8, 8]);
        let a = Conv2D::new(6, 3).padding(Padding::Same).call(&x).unwrap();
        let a = BatchNorm::new().call(&a).unwrap();
        let a = ReLU::new().call(&a).unwrap();
        let b = Conv2D::new(6, 3)
            .padding(Padding::Same)
            .strides(2)
            .activation(ActivationFn::Relu)
            .call(&a)
            .unwrap();
        let b = BatchNorm::new().call(&b).unwrap();
        let c = Conv2D::new(6, 1).call(&b).unwrap();
        let c_norm = BatchNorm::new().call(&c).unwrap();
        let d = Add::new().call_many(&[c_norm, c]).unwrap();
        let e = Conv2D::new(6, 3).padding(Padding::Same).call(&d).unwrap();
        let e = ReLU::new().call(&e).unwrap();
        let e = BatchNorm::from_config(BatchNormConfig {
            scale: false,
            center: false,
            ..BatchNormConfig::default()
        })
        .call(&e)
        .unwrap();
        let f = inner.call(&e).unwrap();
        let g = Conv2D::new(2, 1).call(&f).unwrap();
        let model = Model::new(&[x], &[g.clone(), f])
            .unwrap()
            .build(&Device::Cpu, dtype, 7)
            .unwrap();
        vary_batch_norms(&model, 23);
        let input = input(&[16, 3, 8, 8], dtype, 9);
        // a, b, e and the nested model's pair fold; c (two readers) and g (an output) do not.
        check_fold(&model, &input, 4, &format!("{dtype:?}"));
    }
}

/// With the feature `onednn`, a convolution whose output convolutions and batch norms alone
/// read leaves it in oneDNN's blocked layout for them (`profile::blocked_handoffs`),
/// directly or through a folded batch norm, and a batch norm given such an input computes
/// in that layout; one with another kind of reader, or whose output is the model's, does
/// not. The outputs are those of the layers run one after the other, on NCHW.
#[cfg(feature = "onednn")]
#[test]
fn convolutions_hand_over_onednns_blocked_layout_in_inference() {
    use candle_functional::profile::blocked_handoffs;
    let _serial = serial();
    let same = |filters| Conv2D::new(filters, 3).padding(Padding::Same);
    let x = Input::new([8, 16, 16]);
    // a: read by b alone, hands over; b: through its folded batch norm, read by c alone,
    // hands over; c: read by d and by the Add, does not; d: read by the Add, does not.
    let a = same(16).call(&x).unwrap();
    let b = same(32).strides(2).call(&a).unwrap();
    let b = BatchNorm::new().call(&b).unwrap();
    let b = ReLU::new().call(&b).unwrap();
    let c = Conv2D::new(16, 1).call(&b).unwrap();
    let d = same(16).call(&c).unwrap();
    let y = Add::new().call_many(&[c, d]).unwrap();
    let model = Model::new(&[x], &[y]).unwrap();
    let model = model.build(&Device::Cpu, DType::F32, 5).unwrap();
    vary_batch_norms(&model, 31);
    // 4 images of 16x16: oneDNN runs every one of these convolutions, on every CPU.
    let x = input(&[4, 8, 16, 16], DType::F32, 3);
    let before = blocked_handoffs();
    let handed = model.forward(std::slice::from_ref(&x), Mode::Eval).unwrap();
    assert_eq!(blocked_handoffs() - before, 2, "a and b hand over");
    let x_var = Var::from_tensor(&x).unwrap().as_tensor().clone();
    let before = blocked_handoffs();
    let layers = model.forward(&[x_var], Mode::Eval).unwrap();
    assert_eq!(blocked_handoffs(), before, "a pass asking for gradients");
    assert_outputs_agree(&handed[0], &layers[0], "hand-made model");

    // The article's networks with 16 and 32 filters, a block a stage: the PlainNet's 5
    // convolutions hand over all but the last one's output (read by the pooling). In the
    // ResNet, every convolution hands over (the stem, a block's two and the second block's
    // shortcut: 6), and so does the first block's Add → ReLU → BatchNorm (read by the
    // second block's convolutions), but not the last block's (read by the pooling).
    for (name, plain, handovers) in [("plain_net", true, 4), ("resnet", false, 7)] {
        let config = ResNetConfig {
            input_shape: [3, 16, 16],
            stages: vec![1, 1],
            filters: vec![16, 32],
            pool_size: 4,
            ..ResNetConfig::default()
        };
        let model = match plain {
            true => config.plain_net(),
            false => config.res_net(),
        };
        let model = model.unwrap().build(&Device::Cpu, DType::F32, 3).unwrap();
        vary_batch_norms(&model, 13);
        let x = input(&[4, 3, 16, 16], DType::F32, 8);
        let before = blocked_handoffs();
        let handed = model.forward(std::slice::from_ref(&x), Mode::Eval).unwrap();
        let count = blocked_handoffs() - before;
        let x_var = Var::from_tensor(&x).unwrap().as_tensor().clone();
        let layers = model.forward(&[x_var], Mode::Eval).unwrap();
        assert_outputs_agree(&handed[0], &layers[0], name);
        assert_eq!(count, handovers, "{name}: handovers");
    }
}

/// A training-mode pass uses batch statistics: nothing folds, and the outputs are those of
/// the unfolded layers.
#[test]
fn training_mode_never_folds() {
    let _serial = serial();
    let model = ResNetConfig {
        input_shape: [3, 8, 8],
        stages: vec![1],
        filters: vec![4],
        pool_size: 8,
        ..ResNetConfig::default()
    }
    .plain_net()
    .unwrap()
    .build(&Device::Cpu, DType::F64, 3)
    .unwrap();
    let x = input(&[4, 3, 8, 8], DType::F64, 2);
    let before = folded_batch_norms();
    let y = model
        .forward(std::slice::from_ref(&x), Mode::Train)
        .unwrap()
        .remove(0);
    assert_eq!(folded_batch_norms(), before);
    let x_var = Var::from_tensor(&x).unwrap().as_tensor().clone();
    let y_var = model.forward(&[x_var], Mode::Train).unwrap().remove(0);
    assert_same(
        &y.flatten_all().unwrap(),
        &y_var.flatten_all().unwrap(),
        "train",
    );
}

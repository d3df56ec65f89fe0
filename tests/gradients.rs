//! Finite-difference checks of backpropagation through the graph: a residual block with a
//! strided 'same' convolution, a 1x1 projection, BatchNorm in training mode and the Add skip;
//! and the pooling, merge and padding layers whose backward passes are composed by hand.

// `&[x.clone()]` reads better than `std::slice::from_ref(&x)` in tests.
#![allow(clippy::cloned_ref_to_slice_refs)]

use candle_core::{DType, Device, Tensor, Var};
use candle_functional::models::residual_block;
use candle_functional::prelude::*;

/// Deterministic values in [-1, 1).
fn pseudo_random(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// Scalar loss `sum(output * weights)` so every output element matters differently.
fn loss(model: &Model, x: &Tensor, mix: &Tensor) -> Tensor {
    let out = model.forward(&[x.clone()], Mode::Train).unwrap().remove(0);
    (out * mix).unwrap().sum_all().unwrap()
}

/// Compares autograd with central differences on `probes` coordinates of every trainable
/// weight and of the input.
fn check_gradients(model: &Model, input_shape: &[usize], probes: usize) {
    let n: usize = input_shape.iter().product();
    let x = Var::from_tensor(
        &Tensor::from_vec(pseudo_random(n, 1), input_shape, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let out_shape = model
        .forward(&[x.as_tensor().clone()], Mode::Train)
        .unwrap()[0]
        .dims()
        .to_vec();
    let m: usize = out_shape.iter().product();
    let mix = Tensor::from_vec(pseudo_random(m, 2), out_shape, &Device::Cpu).unwrap();

    let grads = loss(model, x.as_tensor(), &mix).backward().unwrap();
    let mut targets: Vec<(String, Var)> = model
        .weights()
        .unwrap()
        .into_iter()
        .filter(|w| w.trainable())
        .map(|w| (w.name().to_string(), w.var().clone()))
        .collect();
    targets.push(("input".into(), x.clone()));

    let h = 1e-6;
    for (name, var) in targets {
        let analytic = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let original = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = var.dims().to_vec();
        let step = (original.len() / probes).max(1);
        for i in (0..original.len()).step_by(step).take(probes) {
            let eval = |delta: f64| {
                let mut v = original.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(model, x.as_tensor(), &mix).to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(original.clone(), shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            let scale = numeric.abs().max(analytic[i].abs()).max(1e-3);
            assert!(
                (numeric - analytic[i]).abs() / scale < 1e-4,
                "{name}[{i}]: autograd {} vs finite difference {numeric}",
                analytic[i]
            );
        }
    }
}

#[test]
fn residual_block_gradients_match_finite_differences() {
    let x = Input::new([2, 6, 6]);
    let y = residual_block(&x, true, 3, 3).unwrap();
    let y = residual_block(&y, false, 3, 3).unwrap();
    let y = Flatten::new().call(&y).unwrap();
    let y = Dense::new(2)
        .activation(ActivationFn::Softmax)
        .call(&y)
        .unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F64, 5)
        .unwrap();
    check_gradients(&model, &[3, 2, 6, 6], 6);
}

#[test]
fn pooling_merge_and_padding_gradients_match_finite_differences() {
    let x = Input::new([2, 5, 5]);
    let c = Conv2D::new(2, 3).padding(Padding::Same).call(&x).unwrap();
    let max = MaxPooling2D::new(3)
        .strides(2)
        .padding(Padding::Same)
        .call(&c)
        .unwrap();
    let avg = AveragePooling2D::new(3)
        .strides(2)
        .padding(Padding::Same)
        .call(&c)
        .unwrap();
    let crop = MaxPooling2D::new(2).call(&c).unwrap();
    let crop = ZeroPadding2D::asymmetric((0, 1), (1, 0))
        .call(&crop)
        .unwrap();
    let m = Maximum::new()
        .call_many(&[max.clone(), avg.clone()])
        .unwrap();
    let n = Minimum::new()
        .call_many(&[max.clone(), crop.clone()])
        .unwrap();
    let p = Multiply::new().call_many(&[m.clone(), n.clone()]).unwrap();
    let s = Subtract::new().call_many(&[p, avg]).unwrap();
    let a = Average::new().call_many(&[s, m, n]).unwrap();
    let g = GlobalAveragePooling2D::new().call(&a).unwrap();
    let f = Flatten::new().call(&crop).unwrap();
    let joined = Concatenate::new(1).call_many(&[g, f]).unwrap();
    let y = Dense::new(3)
        .activation(ActivationFn::Gelu)
        .call(&joined)
        .unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F64, 11)
        .unwrap();
    check_gradients(&model, &[2, 2, 5, 5], 8);
}

#[test]
fn batch_norm_state_gets_no_gradient() {
    let x = Input::new([2, 4, 4]);
    let y = BatchNorm::new().call(&x).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap();
    let input = Tensor::randn(0f32, 1.0, (4, 2, 4, 4), &Device::Cpu).unwrap();
    let out = model.forward(&[input], Mode::Train).unwrap().remove(0);
    let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for w in model.weights().unwrap() {
        assert_eq!(
            grads.get(w.var().as_tensor()).is_some(),
            w.trainable(),
            "{}",
            w.name()
        );
    }
    assert_eq!(model.trainable_vars().unwrap().len(), 2);
}

#[test]
fn upsampling_gradients_match_finite_differences() {
    for bilinear in [false, true] {
        let x = Input::new([2, 3, 3]);
        let up = UpSampling2D::new(2);
        let up = if bilinear { up.bilinear() } else { up };
        let h = Conv2D::new(2, 3).padding(Padding::Same).call(&x).unwrap();
        // The conv output feeds both the upsampling and a skip: gradients must add up.
        let upsampled = up.call(&h).unwrap();
        let skip = UpSampling2D::new(2).call(&h).unwrap();
        let y = Add::new().call_many(&[upsampled, skip]).unwrap();
        let model = Model::new(&[x], &[y])
            .unwrap()
            .build(&Device::Cpu, DType::F64, 3)
            .unwrap();
        check_gradients(&model, &[2, 2, 3, 3], 6);
    }
}

#[test]
fn new_activations_and_global_max_pooling_gradients_match_finite_differences() {
    for f in [
        ActivationFn::LeakyRelu,
        ActivationFn::Elu,
        ActivationFn::HardSwish,
    ] {
        let x = Input::new([2, 4, 4]);
        let h = Conv2D::new(3, 3).padding(Padding::Same).call(&x).unwrap();
        let h = Activation::new(f).call(&h).unwrap();
        let y = GlobalMaxPooling2D::new().call(&h).unwrap();
        let model = Model::new(&[x], &[y])
            .unwrap()
            .build(&Device::Cpu, DType::F64, 5)
            .unwrap();
        check_gradients(&model, &[2, 2, 4, 4], 6);
    }
}

#[test]
fn cropping_gradients_match_finite_differences() {
    let x = Input::new([2, 5, 6]);
    let h = Conv2D::new(2, 3).padding(Padding::Same).call(&x).unwrap();
    let y = Cropping2D::asymmetric((1, 0), (2, 1)).call(&h).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F64, 6)
        .unwrap();
    check_gradients(&model, &[2, 2, 5, 6], 6);
}

/// A model of `layer` on an input of `shape` (plus a batch of 2), checked in f64.
fn check_layer_gradients(
    shape: &[usize],
    layer: impl Fn(&SymbolicTensor) -> Result<SymbolicTensor>,
) {
    let x = Input::new(shape);
    let y = layer(&x).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F64, 7)
        .unwrap();
    let mut full = vec![2];
    full.extend_from_slice(shape);
    check_gradients(&model, &full, 6);
}

#[test]
fn conv_transpose_gradients_match_finite_differences() {
    for (kernel, strides, padding, dilation) in [
        (3, 2, Padding::Same, 1),
        (3, 2, Padding::Valid, 1),
        (2, 3, Padding::Valid, 1),
        (4, 1, Padding::Same, 1),
        (3, 1, Padding::Same, 2),
    ] {
        check_layer_gradients(&[3, 4, 5], |x| {
            Conv2DTranspose::new(2, kernel)
                .strides(strides)
                .padding(padding)
                .dilation(dilation)
                .call(x)
        });
    }
}

#[test]
fn depthwise_and_separable_gradients_match_finite_differences() {
    check_layer_gradients(&[3, 5, 6], |x| {
        DepthwiseConv2D::new(3)
            .strides(2)
            .padding(Padding::Same)
            .depth_multiplier(2)
            .call(x)
    });
    check_layer_gradients(&[3, 5, 6], |x| {
        SeparableConv2D::new(4, 3)
            .padding(Padding::Same)
            .depth_multiplier(2)
            .activation(ActivationFn::Tanh)
            .call(x)
    });
}

#[test]
fn layer_norm_softmax_reshape_permute_gradients_match_finite_differences() {
    check_layer_gradients(&[3, 4, 4], |x| {
        let h = Conv2D::new(3, 3).padding(Padding::Same).call(x)?;
        LayerNormalization::new().call(&h)
    });
    check_layer_gradients(&[3, 4, 4], |x| {
        let h = Conv2D::new(3, 3).padding(Padding::Same).call(x)?;
        LayerNormalization::new().axes([1, 2, 3]).call(&h)
    });
    check_layer_gradients(&[3, 4, 4], |x| {
        let h = Conv2D::new(2, 3).padding(Padding::Same).call(x)?;
        let h = Permute::new([3, 1, 2]).call(&h)?;
        let h = Reshape::new([4, -1]).call(&h)?;
        Softmax::new().axis(-1).call(&h)
    });
}

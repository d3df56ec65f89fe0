//! The `onednn` build's convolutions: oneDNN really runs them (its primitives are created
//! and cached), and they agree with `ops::reference` in values and in both gradients, with the
//! bias and the ReLU fused, over the geometries a Keras model uses. tests/ops.rs and
//! tests/fused_ops.rs run the same comparisons on whatever kernel the build has; this file
//! pins them to oneDNN. Without the feature it compiles to nothing.
#![cfg(feature = "onednn")]

mod common;

use candle_core::{Device, Tensor, Var};
use candle_functional::fusion::{ElementWise, Fusion};
use candle_functional::ops::{self, Conv2dGeometry, onednn, reference};
use common::{max_abs, max_abs_diff};

fn geometry(
    pad: (usize, usize, usize, usize),
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Conv2dGeometry {
    Conv2dGeometry {
        pad,
        stride,
        dilation,
        groups,
    }
}

/// `fused_conv2d` (oneDNN) against the reference convolution, bias add and ReLU: the output
/// and the gradients of the input, kernel and bias, for the same upstream gradient.
fn compare(
    x_shape: (usize, usize, usize, usize),
    k_shape: (usize, usize, usize, usize),
    g: Conv2dGeometry,
    relu: bool,
) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, x_shape, &dev).unwrap()).unwrap();
    let k = Var::from_tensor(&Tensor::randn(0f32, 0.2, k_shape, &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, k_shape.0, &dev).unwrap()).unwrap();
    let fusion = match relu {
        true => Fusion::new().with_epilogue(ElementWise::Relu),
        false => Fusion::new(),
    };
    let ours =
        ops::fused_conv2d(x.as_tensor(), k.as_tensor(), Some(b.as_tensor()), fusion, g).unwrap();
    let mut theirs = reference::conv2d(x.as_tensor(), k.as_tensor(), g).unwrap();
    theirs = reference::bias_add(&theirs, b.as_tensor()).unwrap();
    if relu {
        theirs = theirs.relu().unwrap();
    }
    assert_eq!(ours.dims(), theirs.dims(), "{g:?}");
    let d = max_abs_diff(&ours, &theirs);
    assert!(
        d <= 1e-5 * max_abs(&theirs).max(1.0),
        "{g:?}: forward differs by {d}"
    );
    let upstream = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
    let go = (ours * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gt = (theirs * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, v) in [("input", &x), ("kernel", &k), ("bias", &b)] {
        let (a, e) = (
            go.get(v.as_tensor()).unwrap(),
            gt.get(v.as_tensor()).unwrap(),
        );
        let d = max_abs_diff(a, e);
        assert!(
            d <= 1e-5 * max_abs(e).max(1.0),
            "{g:?} relu={relu}: {name} gradient differs by {d}"
        );
    }
}

#[test]
fn onednn_runs_the_f32_convolutions_and_caches_one_primitive_a_pass() {
    let (major, _, _) = onednn::version();
    assert!(major >= 2, "oneDNN {major}.x");
    let dev = Device::Cpu;
    // A shape no other test in this process uses: 7 images, 5 -> 11 channels, 13x6.
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 5, 13, 6), &dev).unwrap()).unwrap();
    let k = Tensor::randn(0f32, 1.0, (11, 5, 3, 3), &dev).unwrap();
    let g = geometry((1, 1, 1, 1), 1, 1, 1);
    let before = onednn::cached_primitives();
    let y = ops::conv2d(x.as_tensor(), &k, g).unwrap();
    let after_forward = onednn::cached_primitives();
    assert!(
        after_forward > before,
        "the forward pass created no oneDNN primitive"
    );
    y.sum_all().unwrap().backward().unwrap();
    // Backward-data and backward-weights: two more primitives.
    assert!(onednn::cached_primitives() >= after_forward + 2);
    // Run again: nothing new is compiled.
    let cached = onednn::cached_primitives();
    let y = ops::conv2d(x.as_tensor(), &k, g).unwrap();
    y.sum_all().unwrap().backward().unwrap();
    assert_eq!(onednn::cached_primitives(), cached);
}

#[test]
fn stride_one_and_two_with_keras_same_padding_bias_and_relu() {
    for relu in [false, true] {
        compare(
            (2, 3, 8, 8),
            (4, 3, 3, 3),
            geometry((1, 1, 1, 1), 1, 1, 1),
            relu,
        );
        compare(
            (2, 16, 8, 8),
            (32, 16, 3, 3),
            geometry((0, 1, 0, 1), 2, 1, 1),
            relu,
        );
        compare(
            (2, 3, 9, 8),
            (5, 3, 3, 3),
            geometry((1, 1, 0, 1), 2, 1, 1),
            relu,
        );
        compare(
            (3, 32, 8, 8),
            (64, 32, 1, 1),
            geometry((0, 0, 0, 0), 2, 1, 1),
            relu,
        );
    }
}

#[test]
fn valid_dilated_grouped_rectangular_and_seven_by_seven() {
    compare(
        (3, 4, 9, 7),
        (4, 4, 3, 2),
        geometry((0, 0, 0, 0), 1, 1, 1),
        false,
    );
    compare(
        (2, 2, 9, 9),
        (3, 2, 3, 3),
        geometry((2, 2, 2, 2), 1, 2, 1),
        true,
    );
    compare(
        (2, 6, 7, 7),
        (4, 3, 3, 3),
        geometry((1, 1, 1, 1), 1, 1, 2),
        false,
    );
    compare(
        (2, 4, 7, 7),
        (4, 1, 3, 3),
        geometry((1, 1, 1, 1), 2, 1, 4),
        true,
    );
    compare(
        (2, 3, 20, 20),
        (16, 3, 7, 7),
        geometry((2, 3, 2, 3), 2, 1, 1),
        true,
    );
}

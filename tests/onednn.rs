//! The `onednn` build's convolutions: oneDNN really runs them (its primitives are created
//! and cached), and they agree with `ops::reference` in values and in both gradients, with the
//! bias and the ReLU fused, over the geometries a Keras model uses. tests/ops.rs and
//! tests/fused_ops.rs run the same comparisons on whatever kernel the build has; this file
//! pins them to oneDNN. Without the feature it compiles to nothing.
//!
//! On AVX2 CPUs these small problems run on the calling thread alone, on AVX-512 ones on all
//! of OpenMP's threads; the unit tests of `src/ops/cpu/conv2d.rs` compare the two.
#![cfg(feature = "onednn")]

mod common;

use std::sync::{Mutex, MutexGuard};

use candle_core::{Device, Tensor, Var};
use candle_functional::fusion::{ElementWise, Fusion};
use candle_functional::ops::{self, Conv2dGeometry, onednn, reference};
use common::{assert_same_values_and_gradients, geometry};

/// The tests here run one at a time: the primitive count that one of them checks is the
/// process's, and the others would add to it while it counts.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
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
    let vars = [("input", &x), ("kernel", &k), ("bias", &b)];
    let what = format!("{g:?} relu={relu}");
    assert_same_values_and_gradients(&ours, &theirs, &vars, 1e-5, &what);
}

#[test]
fn onednn_runs_the_f32_convolutions_and_caches_one_primitive_a_pass() {
    let _serial = one_at_a_time();
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

/// `(input, kernel, geometry)` of one case; batches large enough (`n · oh · ow >= 256`) and
/// problems small enough (under 16 MFLOP) that the forward pass runs on oneDNN too, on every
/// CPU (which of its routes a convolution takes is tested in `src/ops/cpu/conv2d.rs`).
type Case = (
    (usize, usize, usize, usize),
    (usize, usize, usize, usize),
    Conv2dGeometry,
);

#[test]
fn stride_one_and_two_with_keras_same_padding_bias_and_relu() {
    let _serial = one_at_a_time();
    let cases: [Case; 4] = [
        ((4, 3, 8, 8), (4, 3, 3, 3), geometry((1, 1, 1, 1), 1, 1, 1)),
        (
            (16, 16, 8, 8),
            (32, 16, 3, 3),
            geometry((0, 1, 0, 1), 2, 1, 1),
        ),
        ((13, 3, 9, 8), (5, 3, 3, 3), geometry((1, 1, 0, 1), 2, 1, 1)),
        (
            (16, 32, 8, 8),
            (64, 32, 1, 1),
            geometry((0, 0, 0, 0), 2, 1, 1),
        ),
    ];
    for relu in [false, true] {
        for (x, k, g) in cases {
            compare(x, k, g, relu);
        }
    }
}

#[test]
fn valid_dilated_grouped_rectangular_and_seven_by_seven() {
    let _serial = one_at_a_time();
    let cases: [(Case, bool); 5] = [
        (
            ((7, 4, 9, 7), (4, 4, 3, 2), geometry((0, 0, 0, 0), 1, 1, 1)),
            false,
        ),
        (
            ((4, 2, 9, 9), (3, 2, 3, 3), geometry((2, 2, 2, 2), 1, 2, 1)),
            true,
        ),
        (
            ((6, 6, 7, 7), (4, 3, 3, 3), geometry((1, 1, 1, 1), 1, 1, 2)),
            false,
        ),
        (
            ((16, 4, 7, 7), (4, 1, 3, 3), geometry((1, 1, 1, 1), 2, 1, 4)),
            true,
        ),
        (
            (
                (3, 3, 20, 20),
                (16, 3, 7, 7),
                geometry((2, 3, 2, 3), 2, 1, 1),
            ),
            true,
        ),
    ];
    for ((x, k, g), relu) in cases {
        compare(x, k, g, relu);
    }
}

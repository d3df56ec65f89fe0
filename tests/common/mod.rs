//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_functional::prelude::*;

/// Builds a one-input, one-output model on CPU in f32 and returns it.
pub fn build(input: &SymbolicTensor, output: &SymbolicTensor) -> Model {
    Model::new(std::slice::from_ref(input), std::slice::from_ref(output))
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap()
}

/// Sets a model's weights from `(name, values)` pairs (all other weights must be given too).
pub fn set(model: &Model, weights: &[(&str, Tensor)]) {
    let map = weights
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    model.set_weights(&map).unwrap();
}

/// A float tensor on CPU from values and a shape.
pub fn t(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
}

/// Flattened f32 values.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts two float slices agree within `eps`.
pub fn assert_close(got: &[f32], want: &[f32], eps: f32) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        approx::assert_abs_diff_eq!(g, w, epsilon = eps);
    }
}

/// Runs a single-output model in eval mode.
pub fn run(model: &Model, x: &Tensor) -> Tensor {
    model
        .forward(std::slice::from_ref(x), Mode::Eval)
        .unwrap()
        .remove(0)
}

/// Largest absolute element-wise difference, in f64 whatever the dtype.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(candle_core::DType::F64).unwrap();
    let b = b.to_dtype(candle_core::DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Largest absolute value (at least 1): a scale for relative comparisons.
pub fn max_abs(t: &Tensor) -> f64 {
    max_abs_diff(t, &t.zeros_like().unwrap()).max(1.0)
}

/// A convolution's geometry: `(top, bottom, left, right)` padding, stride, dilation, groups.
pub fn geometry(
    pad: (usize, usize, usize, usize),
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_functional::ops::Conv2dGeometry {
    candle_functional::ops::Conv2dGeometry {
        pad,
        stride,
        dilation,
        groups,
    }
}

/// Asserts that `ours` and `theirs` (the same function of `vars`, by two kernels) agree to
/// `rel` of their scale ([`max_abs`]), and so do the gradients of every var when the same
/// random upstream gradient is sent back through both; `what` names the case.
pub fn assert_same_values_and_gradients(
    ours: &Tensor,
    theirs: &Tensor,
    vars: &[(&str, &candle_core::Var)],
    rel: f64,
    what: &str,
) {
    assert_eq!(ours.dims(), theirs.dims(), "{what}");
    let d = max_abs_diff(ours, theirs);
    assert!(d <= rel * max_abs(theirs), "{what}: forward differs by {d}");
    let upstream = Tensor::randn(0f32, 1.0, ours.dims(), ours.device()).unwrap();
    let grads = |y: &Tensor| {
        (y * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let (go, gt) = (grads(ours), grads(theirs));
    for (name, v) in vars {
        let (a, b) = (
            go.get(v.as_tensor()).unwrap(),
            gt.get(v.as_tensor()).unwrap(),
        );
        let d = max_abs_diff(a, b);
        assert!(
            d <= rel * max_abs(b),
            "{what}: {name} gradient differs by {d}"
        );
    }
}

/// Values of every kind an optimizer meets: signs, tiny and large magnitudes, zeros.
pub fn varied(n: usize, seed: u64, dtype: DType) -> Tensor {
    let mut s = seed | 1;
    let v: Vec<f64> = (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            match i % 7 {
                0 => 0.0,
                1 => u * 1e-6,
                2 => u * 1e3,
                _ => u,
            }
        })
        .collect();
    Tensor::from_vec(v, n, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Asserts two tensors hold the same values, bit for bit (compared as f64).
pub fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    let (a, b) = (
        a.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
        b.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x == y, "{what}[{i}]: {x} vs {y}");
    }
}

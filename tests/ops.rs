//! The GEMM-based convolution against candle's own (the unfused path): forward outputs and
//! both gradients, over strides, asymmetric padding, dilation, groups, and batches large
//! enough to be split into several im2col chunks.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_functional::ops::{Conv2dGeometry, conv2d, reference};
use common::{max_abs, max_abs_diff};

fn compare(
    x_shape: (usize, usize, usize, usize),
    k_shape: (usize, usize, usize, usize),
    g: Conv2dGeometry,
) {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, x_shape, &dev).unwrap()).unwrap();
    let k = Var::from_tensor(&Tensor::randn(0f32, 0.2, k_shape, &dev).unwrap()).unwrap();
    let ours = conv2d(x.as_tensor(), k.as_tensor(), g).unwrap();
    let theirs = reference::conv2d(x.as_tensor(), k.as_tensor(), g).unwrap();
    assert_eq!(ours.dims(), theirs.dims(), "{g:?}");
    let d = max_abs_diff(&ours, &theirs);
    assert!(
        d <= 1e-4 * max_abs(&theirs),
        "{g:?}: forward differs by {d}"
    );

    // Same upstream gradient through both.
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
    for (name, v) in [("input", &x), ("kernel", &k)] {
        let (a, b) = (
            go.get(v.as_tensor()).unwrap(),
            gt.get(v.as_tensor()).unwrap(),
        );
        let d = max_abs_diff(a, b);
        assert!(
            d <= 1e-4 * max_abs(b),
            "{g:?}: {name} gradient differs by {d}"
        );
    }
}

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

#[test]
fn same_padding_stride_one_and_two() {
    compare((2, 3, 8, 8), (4, 3, 3, 3), geometry((1, 1, 1, 1), 1, 1, 1));
    compare((2, 3, 8, 8), (4, 3, 3, 3), geometry((0, 1, 0, 1), 2, 1, 1));
    compare((2, 3, 9, 8), (5, 3, 3, 3), geometry((1, 1, 0, 1), 2, 1, 1));
    compare((2, 4, 8, 8), (6, 4, 1, 1), geometry((0, 0, 0, 0), 2, 1, 1));
}

#[test]
fn valid_dilated_grouped_and_rectangular() {
    compare((3, 4, 9, 7), (4, 4, 3, 2), geometry((0, 0, 0, 0), 1, 1, 1));
    compare((2, 2, 9, 9), (3, 2, 3, 3), geometry((2, 2, 2, 2), 1, 2, 1));
    compare((2, 6, 7, 7), (4, 3, 3, 3), geometry((1, 1, 1, 1), 1, 1, 2));
    compare((2, 4, 7, 7), (4, 1, 3, 3), geometry((1, 1, 1, 1), 2, 1, 4));
}

#[test]
fn batches_split_into_several_chunks() {
    // 64 channels x 3x3 x 32x32 positions is ~590k elements an image: 16 images make 2 chunks.
    compare(
        (16, 64, 32, 32),
        (8, 64, 3, 3),
        geometry((1, 1, 1, 1), 1, 1, 1),
    );
}

#[test]
fn f64_is_supported() {
    let dev = Device::Cpu;
    let g = geometry((0, 1, 0, 1), 2, 1, 1);
    let x = Tensor::randn(0f64, 1.0, (1, 2, 6, 6), &dev).unwrap();
    let k = Tensor::randn(0f64, 1.0, (3, 2, 3, 3), &dev).unwrap();
    let d = max_abs_diff(
        &conv2d(&x, &k, g).unwrap().to_dtype(DType::F32).unwrap(),
        &reference::conv2d(&x, &k, g)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    );
    assert!(d < 1e-9);
}

//! The crate's convolution against candle's own (the unfused path): forward outputs and
//! both gradients, over strides, asymmetric padding, dilation, groups, batches large enough
//! to be split into several im2col chunks, and shapes large enough for the crate's own SIMD
//! kernels (`ops/cpu/conv_panels.rs`, on CPUs that have AVX-512F or AVX2 + FMA).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_functional::ops::{Conv2dGeometry, conv2d, reference};
use common::{assert_same_values_and_gradients, geometry, max_abs_diff};

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
    let vars = [("input", &x), ("kernel", &k)];
    assert_same_values_and_gradients(&ours, &theirs, &vars, 1e-4, &format!("{g:?}"));
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
fn shapes_for_the_panel_kernels() {
    // With two or more threads, on AVX-512F or AVX2 + FMA: the shifted path (stride 1, wide
    // maps, whole images per thread) for the forward pass and both gradients; on AVX-512F the
    // panel path for a Keras 'same' stride-2 layer (bottom/right padding) and for 4x4 maps with
    // many filters, whose tiles span images. Elsewhere these run on the GEMM path, and must
    // agree all the same. (The kernels' own tests in `ops/cpu` run every instruction set the
    // CPU has on every path.)
    compare(
        (4, 16, 16, 16),
        (32, 16, 3, 3),
        geometry((1, 1, 1, 1), 1, 1, 1),
    );
    compare(
        (8, 16, 16, 16),
        (24, 16, 3, 3),
        geometry((0, 1, 0, 1), 2, 1, 1),
    );
    compare(
        (16, 32, 4, 4),
        (256, 32, 3, 3),
        geometry((1, 1, 1, 1), 1, 1, 1),
    );
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
fn products_split_into_column_blocks_with_a_ragged_last_block() {
    // On two or more threads a product of at most 512 rows and at least 128 columns is cut
    // into one block of columns per thread (rounded to 16): 3 images of 7x9 positions are 189
    // columns, blocks of 96 and 93; the kernel gradient's 5x3x3 = 45 columns stay whole; the
    // input gradient of 64 channels x 3 x 3 = 576 rows goes to the `gemm` crate's threads.
    compare((3, 5, 7, 9), (8, 5, 3, 3), geometry((1, 1, 1, 1), 1, 1, 1));
    compare(
        (3, 5, 14, 18),
        (8, 5, 3, 3),
        geometry((0, 1, 0, 1), 2, 1, 1),
    );
    compare(
        (2, 64, 6, 6),
        (16, 64, 3, 3),
        geometry((1, 1, 1, 1), 1, 1, 1),
    );
}

#[test]
fn f64_is_supported() {
    let dev = Device::Cpu;
    let g = geometry((0, 1, 0, 1), 2, 1, 1);
    // 4 images of 7x7 output positions: 196 columns, cut into column blocks.
    let x = Tensor::randn(0f64, 1.0, (4, 2, 14, 14), &dev).unwrap();
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

/// The argument an `ops` call was refused for.
fn refused_argument(result: candle_functional::Result<Tensor>) -> &'static str {
    match result {
        Err(candle_functional::Error::InvalidOpArgument { argument, .. }) => argument,
        Err(other) => panic!("expected InvalidOpArgument, got {other}"),
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
    }
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn conv2d_refuses_bad_arguments_with_the_argument_named() {
    let one = geometry((0, 0, 0, 0), 1, 1, 1);
    let x = zeros(&[2, 4, 5, 5]);
    let k = zeros(&[6, 4, 3, 3]);
    let cases: Vec<(&str, Tensor, Tensor, Conv2dGeometry, &str)> = vec![
        ("rank-3 input", zeros(&[4, 5, 5]), k.clone(), one, "x"),
        ("rank-3 kernel", x.clone(), zeros(&[6, 4, 3]), one, "kernel"),
        (
            "kernel of another dtype",
            x.clone(),
            k.to_dtype(DType::F64).unwrap(),
            one,
            "kernel",
        ),
        (
            "groups 0",
            x.clone(),
            k.clone(),
            geometry((0, 0, 0, 0), 1, 1, 0),
            "geometry",
        ),
        (
            "stride 0",
            x.clone(),
            k.clone(),
            geometry((0, 0, 0, 0), 0, 1, 1),
            "geometry",
        ),
        (
            "dilation 0",
            x.clone(),
            k.clone(),
            geometry((0, 0, 0, 0), 1, 0, 1),
            "geometry",
        ),
        (
            "filters not a multiple of groups",
            x.clone(),
            zeros(&[3, 2, 3, 3]),
            geometry((0, 0, 0, 0), 1, 1, 2),
            "kernel",
        ),
        (
            "input with more channels than the kernel",
            zeros(&[2, 5, 5, 5]),
            k.clone(),
            one,
            "kernel",
        ),
        (
            "input with fewer channels than the kernel",
            zeros(&[2, 3, 5, 5]),
            k.clone(),
            one,
            "kernel",
        ),
        (
            "input smaller than the kernel",
            zeros(&[2, 4, 2, 5]),
            k.clone(),
            one,
            "x",
        ),
        (
            "zero-sized kernel window",
            x.clone(),
            zeros(&[6, 4, 0, 3]),
            one,
            "geometry",
        ),
    ];
    for (what, x, k, g, argument) in cases {
        assert_eq!(refused_argument(conv2d(&x, &k, g)), argument, "{what}");
        assert_eq!(
            refused_argument(reference::conv2d(&x, &k, g)),
            argument,
            "reference: {what}"
        );
    }
}

#[test]
fn conv2d_on_an_empty_batch_gives_an_empty_batch() {
    let x = Var::from_tensor(&zeros(&[0, 3, 8, 8])).unwrap();
    let k =
        Var::from_tensor(&Tensor::ones((4, 3, 3, 3), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let y = conv2d(
        x.as_tensor(),
        k.as_tensor(),
        geometry((0, 1, 0, 1), 2, 1, 1),
    )
    .unwrap();
    assert_eq!(y.dims(), &[0, 4, 4, 4]);
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), &[0, 3, 8, 8]);
    let dk = grads.get(k.as_tensor()).unwrap();
    assert_eq!(
        dk.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.0; 4 * 27]
    );
}

#[test]
fn batch_norm_and_bias_add_refuse_bad_arguments_with_the_argument_named() {
    use candle_functional::ops::{self, batch_norm_eval, batch_norm_train, bias_add};
    let x = zeros(&[2, 3, 4]);
    let c3 = zeros(&[3]);
    let c2 = zeros(&[2]);
    type Train = fn(
        &Tensor,
        Option<&Tensor>,
        Option<&Tensor>,
        f64,
    ) -> candle_functional::Result<(Tensor, Tensor, Tensor)>;
    for train in [
        batch_norm_train as Train,
        ops::reference::batch_norm_train as Train,
    ] {
        let train = |x: &Tensor, g: Option<&Tensor>, b: Option<&Tensor>, eps: f64| {
            train(x, g, b, eps).map(|(y, _, _)| y)
        };
        assert_eq!(refused_argument(train(&zeros(&[3]), None, None, 1e-3)), "x");
        let ints = Tensor::zeros((2, 3), DType::U32, &Device::Cpu).unwrap();
        assert_eq!(refused_argument(train(&ints, None, None, 1e-3)), "x");
        assert_eq!(refused_argument(train(&x, None, None, 0.0)), "epsilon");
        assert_eq!(refused_argument(train(&x, None, None, f64::NAN)), "epsilon");
        assert_eq!(refused_argument(train(&x, Some(&c2), None, 1e-3)), "gamma");
        assert_eq!(refused_argument(train(&x, None, Some(&c2), 1e-3)), "beta");
        assert_eq!(
            refused_argument(train(&zeros(&[0, 3, 4]), None, None, 1e-3)),
            "x"
        );
    }

    type Eval = fn(
        &Tensor,
        Option<&Tensor>,
        Option<&Tensor>,
        &Tensor,
        &Tensor,
        f64,
    ) -> candle_functional::Result<Tensor>;
    for eval in [
        batch_norm_eval as Eval,
        ops::reference::batch_norm_eval as Eval,
    ] {
        assert_eq!(
            refused_argument(eval(&x, None, None, &c2, &c3, 1e-3)),
            "mean"
        );
        assert_eq!(
            refused_argument(eval(&x, None, None, &c3, &zeros(&[3, 1]), 1e-3)),
            "var"
        );
        assert_eq!(
            refused_argument(eval(&x, Some(&c2), None, &c3, &c3, 1e-3)),
            "gamma"
        );
        // An empty batch needs no statistics in inference.
        let empty = eval(&zeros(&[0, 3, 4]), None, None, &c3, &c3, 1e-3).unwrap();
        assert_eq!(empty.dims(), &[0, 3, 4]);
    }

    type Bias = fn(&Tensor, &Tensor) -> candle_functional::Result<Tensor>;
    for bias_add in [bias_add as Bias, ops::reference::bias_add as Bias] {
        assert_eq!(refused_argument(bias_add(&c3, &c3)), "x");
        assert_eq!(refused_argument(bias_add(&x, &c2)), "bias");
        assert_eq!(
            refused_argument(bias_add(&x, &c3.to_dtype(DType::F64).unwrap())),
            "bias"
        );
    }
}

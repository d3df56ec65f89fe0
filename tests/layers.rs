//! Each layer's forward pass against hand-computed values.

// `&[x.clone()]` reads better than `std::slice::from_ref(&x)` in tests.
#![allow(clippy::cloned_ref_to_slice_refs)]

mod common;

use candle_core::{DType, Device, Tensor};
use candle_functional::prelude::*;
use common::{assert_close, build, run, set, t, values};

fn one_to(n: usize) -> Vec<f32> {
    (1..=n).map(|v| v as f32).collect()
}

#[test]
fn conv2d_same_stride_two_pads_bottom_right_only() {
    let x = Input::new([1, 4, 4]);
    let y = Conv2D::new(1, 3)
        .strides(2)
        .padding(Padding::Same)
        .call(&x)
        .unwrap();
    let model = build(&x, &y);
    set(
        &model,
        &[
            ("conv2d.kernel", t(&[1.0; 9], &[1, 1, 3, 3])),
            ("conv2d.bias", t(&[0.5], &[1])),
        ],
    );
    let out = run(&model, &t(&one_to(16), &[1, 1, 4, 4]));
    // Windows: rows 0-2 x cols 0-2, rows 0-2 x cols 2-3 (+ a zero column), etc.
    assert_close(&values(&out), &[54.5, 45.5, 72.5, 54.5], 1e-5);
}

#[test]
fn conv2d_valid_dilated_and_grouped() {
    let x = Input::new([2, 5, 5]);
    let y = Conv2D::new(2, 3)
        .dilation(2)
        .groups(2)
        .use_bias(false)
        .call(&x)
        .unwrap();
    assert_eq!(y.shape(), &[2, 1, 1]);
    let model = build(&x, &y);
    // Group 0 reads channel 0 with ones; group 1 reads channel 1 with twos.
    let mut k = vec![1.0; 9];
    k.extend([2.0; 9]);
    set(&model, &[("conv2d.kernel", t(&k, &[2, 1, 3, 3]))]);
    let mut input = one_to(25);
    input.extend(vec![1.0; 25]);
    let out = run(&model, &t(&input, &[1, 2, 5, 5]));
    // Dilation 2 picks rows/cols 0, 2, 4 of channel 0: 1+3+5+11+13+15+21+23+25 = 117.
    assert_close(&values(&out), &[117.0, 18.0], 1e-5);
}

#[test]
fn conv2d_relu_activation_is_applied() {
    let x = Input::new([1, 1, 1]);
    let y = Conv2D::new(1, 1)
        .activation(ActivationFn::Relu)
        .call(&x)
        .unwrap();
    let model = build(&x, &y);
    set(
        &model,
        &[
            ("conv2d.kernel", t(&[-2.0], &[1, 1, 1, 1])),
            ("conv2d.bias", t(&[1.0], &[1])),
        ],
    );
    assert_close(
        &values(&run(&model, &t(&[1.0, -1.0], &[2, 1, 1, 1]))),
        &[0.0, 3.0],
        0.0,
    );
}

#[test]
fn dense_is_x_times_kernel_plus_bias() {
    let x = Input::new([2]);
    let y = Dense::new(3).call(&x).unwrap();
    let model = build(&x, &y);
    set(
        &model,
        &[
            ("dense.kernel", t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])),
            ("dense.bias", t(&[1.0, 1.0, 1.0], &[3])),
        ],
    );
    let out = run(&model, &t(&[1.0, 2.0], &[1, 2]));
    assert_close(&values(&out), &[10.0, 13.0, 16.0], 1e-6);
}

#[test]
fn dense_applies_to_the_last_axis_of_higher_rank_inputs() {
    let x = Input::new([2, 2]);
    let y = Dense::new(1).use_bias(false).call(&x).unwrap();
    assert_eq!(y.shape(), &[2, 1]);
    let model = build(&x, &y);
    set(&model, &[("dense.kernel", t(&[1.0, 10.0], &[2, 1]))]);
    let out = run(&model, &t(&[1.0, 2.0, 3.0, 4.0], &[1, 2, 2]));
    assert_close(&values(&out), &[21.0, 43.0], 1e-6);
}

#[test]
fn relu_variants() {
    let x = Input::new([4]);
    let input = t(&[-1.0, 0.0, 0.5, 2.0], &[1, 4]);
    let cases = [
        (ReLU::new(), [0.0, 0.0, 0.5, 2.0]),
        (ReLU::new().negative_slope(0.1), [-0.1, 0.0, 0.5, 2.0]),
        (ReLU::new().max_value(1.0), [0.0, 0.0, 0.5, 1.0]),
    ];
    for (layer, want) in cases {
        let y = layer.call(&x).unwrap();
        assert_close(&values(&run(&build(&x, &y), &input)), &want, 1e-6);
    }
}

#[test]
fn activation_functions_match_reference_values() {
    let x = Input::new([3]);
    let input = t(&[1.0, 2.0, 3.0], &[1, 3]);
    // Reference values: torch.sigmoid, torch.tanh, F.gelu (exact), F.silu, torch.softmax.
    let cases = [
        (ActivationFn::Linear, vec![1.0, 2.0, 3.0]),
        (ActivationFn::Relu, vec![1.0, 2.0, 3.0]),
        (
            ActivationFn::Sigmoid,
            vec![0.731_058_6, 0.880_797_1, 0.952_574_1],
        ),
        (
            ActivationFn::Tanh,
            vec![0.761_594_2, 0.964_027_6, 0.995_054_8],
        ),
        (
            ActivationFn::Gelu,
            vec![0.841_344_7, 1.954_499_7, 2.995_950_4],
        ),
        (
            ActivationFn::Silu,
            vec![0.731_058_6, 1.761_594_2, 2.857_722_3],
        ),
        (
            ActivationFn::Softmax,
            vec![0.090_030_57, 0.244_728_48, 0.665_240_94],
        ),
    ];
    for (f, want) in cases {
        let y = Activation::new(f).call(&x).unwrap();
        assert_close(&values(&run(&build(&x, &y), &input)), &want, 1e-5);
    }
}

#[test]
fn softmax_normalizes_over_channels_of_nchw() {
    let x = Input::new([2, 1, 2]);
    let y = Activation::new(ActivationFn::Softmax).call(&x).unwrap();
    let out = run(&build(&x, &y), &t(&[0.0, 1.0, 0.0, 3.0], &[1, 2, 1, 2]));
    let v = values(&out);
    // Channel pairs (0, 0) and (1, 3) at the two pixels.
    assert_close(&[v[0] + v[2], v[1] + v[3]], &[1.0, 1.0], 1e-6);
    assert_close(&[v[0]], &[0.5], 1e-6);
}

#[test]
fn batch_norm_train_uses_batch_statistics_and_moves_keras_style() {
    let x = Input::new([1, 1, 2]);
    let y = BatchNorm::new().call(&x).unwrap();
    let model = build(&x, &y);
    let input = t(&[1.0, 3.0, 5.0, 7.0], &[2, 1, 1, 2]);
    let out = model
        .forward(&[input.clone()], Mode::Train)
        .unwrap()
        .remove(0);
    // Mean 4, biased variance 5, epsilon 1e-3.
    let s = (5.0f32 + 1e-3).sqrt();
    assert_close(&values(&out), &[-3.0 / s, -1.0 / s, 1.0 / s, 3.0 / s], 1e-6);
    let w = model.weight_map().unwrap();
    assert_close(
        &values(&w["batch_normalization.moving_mean"]),
        &[0.04],
        1e-7,
    );
    assert_close(
        &values(&w["batch_normalization.moving_variance"]),
        &[0.99 + 0.05],
        1e-6,
    );
    // Eval mode uses the moving statistics and leaves them alone.
    let out = run(&model, &input);
    let s = (1.04f32 + 1e-3).sqrt();
    assert_close(
        &values(&out),
        &[0.96 / s, 2.96 / s, 4.96 / s, 6.96 / s],
        1e-5,
    );
    assert_close(
        &values(&model.weight_map().unwrap()["batch_normalization.moving_mean"]),
        &[0.04],
        1e-7,
    );
}

#[test]
fn batch_norm_eval_applies_gamma_and_beta() {
    let x = Input::new([2]);
    let y = BatchNorm::new().call(&x).unwrap();
    let model = build(&x, &y);
    set(
        &model,
        &[
            ("batch_normalization.gamma", t(&[2.0, 1.0], &[2])),
            ("batch_normalization.beta", t(&[0.5, -1.0], &[2])),
            ("batch_normalization.moving_mean", t(&[1.0, 2.0], &[2])),
            ("batch_normalization.moving_variance", t(&[4.0, 0.25], &[2])),
        ],
    );
    let out = run(&model, &t(&[3.0, 2.5], &[1, 2]));
    let want = [
        2.0 * 2.0 / (4.0f32 + 1e-3).sqrt() + 0.5,
        0.5 / (0.25f32 + 1e-3).sqrt() - 1.0,
    ];
    assert_close(&values(&out), &want, 1e-5);
}

#[test]
fn merge_layers_combine_elementwise() {
    let a = Input::new([3]);
    let b = Input::new([3]);
    let va = t(&[1.0, -2.0, 3.0], &[1, 3]);
    let vb = t(&[4.0, 5.0, -6.0], &[1, 3]);
    let cases: Vec<(SymbolicTensor, [f32; 3])> = vec![
        (
            Add::new().call_many(&[a.clone(), b.clone()]).unwrap(),
            [5.0, 3.0, -3.0],
        ),
        (
            Subtract::new().call_many(&[a.clone(), b.clone()]).unwrap(),
            [-3.0, -7.0, 9.0],
        ),
        (
            Multiply::new().call_many(&[a.clone(), b.clone()]).unwrap(),
            [4.0, -10.0, -18.0],
        ),
        (
            Average::new().call_many(&[a.clone(), b.clone()]).unwrap(),
            [2.5, 1.5, -1.5],
        ),
        (
            Maximum::new().call_many(&[a.clone(), b.clone()]).unwrap(),
            [4.0, 5.0, 3.0],
        ),
        (
            Minimum::new().call_many(&[a.clone(), b.clone()]).unwrap(),
            [1.0, -2.0, -6.0],
        ),
    ];
    for (y, want) in cases {
        let model = Model::new(&[a.clone(), b.clone()], &[y]).unwrap();
        let out = model
            .forward(&[va.clone(), vb.clone()], Mode::Eval)
            .unwrap();
        assert_close(&values(&out[0]), &want, 1e-6);
    }
}

#[test]
fn average_of_three_divides_once() {
    let xs: Vec<SymbolicTensor> = (0..3).map(|_| Input::new([1])).collect();
    let y = Average::new().call_many(&xs).unwrap();
    let model = Model::new(&xs, &[y]).unwrap();
    let inputs = [t(&[1.0], &[1, 1]), t(&[2.0], &[1, 1]), t(&[6.0], &[1, 1])];
    let out = model.forward(&inputs, Mode::Eval).unwrap();
    assert_close(&values(&out[0]), &[3.0], 1e-6);
}

#[test]
fn concatenate_along_channels_and_last_axis() {
    let a = Input::new([1, 1, 2]);
    let b = Input::new([2, 1, 2]);
    let y = Concatenate::new(1)
        .call_many(&[a.clone(), b.clone()])
        .unwrap();
    assert_eq!(y.shape(), &[3, 1, 2]);
    let model = Model::new(&[a.clone(), b.clone()], &[y]).unwrap();
    let out = model
        .forward(
            &[
                t(&[1.0, 2.0], &[1, 1, 1, 2]),
                t(&[3.0, 4.0, 5.0, 6.0], &[1, 2, 1, 2]),
            ],
            Mode::Eval,
        )
        .unwrap();
    assert_close(&values(&out[0]), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0.0);

    let c = Input::new([1, 1, 1]);
    let d = Input::new([1, 1, 2]);
    // The width of (C, H, W) maps is axis 3 (a negative axis there is refused: Keras's -1
    // means channels).
    assert!(
        Concatenate::new(-1)
            .call_many(&[c.clone(), d.clone()])
            .is_err()
    );
    let y = Concatenate::new(3)
        .call_many(&[c.clone(), d.clone()])
        .unwrap();
    assert_eq!(y.shape(), &[1, 1, 3]);
    let model = Model::new(&[c, d], &[y]).unwrap();
    let out = model
        .forward(
            &[t(&[1.0], &[1, 1, 1, 1]), t(&[2.0, 3.0], &[1, 1, 1, 2])],
            Mode::Eval,
        )
        .unwrap();
    assert_close(&values(&out[0]), &[1.0, 2.0, 3.0], 0.0);
}

#[test]
fn pooling_valid_windows() {
    let x = Input::new([1, 4, 4]);
    let input = t(&one_to(16), &[1, 1, 4, 4]);
    let max = MaxPooling2D::new(2).call(&x).unwrap();
    assert_close(
        &values(&run(&build(&x, &max), &input)),
        &[6.0, 8.0, 14.0, 16.0],
        0.0,
    );
    let avg = AveragePooling2D::new(2).call(&x).unwrap();
    assert_close(
        &values(&run(&build(&x, &avg), &input)),
        &[3.5, 5.5, 11.5, 13.5],
        1e-6,
    );
    // Overlapping windows: 3x3 stride 1 on 4x4 gives 2x2.
    let max = MaxPooling2D::new(3).strides(1).call(&x).unwrap();
    assert_close(
        &values(&run(&build(&x, &max), &input)),
        &[11.0, 12.0, 15.0, 16.0],
        0.0,
    );
    let avg = AveragePooling2D::new(3).strides(1).call(&x).unwrap();
    assert_close(
        &values(&run(&build(&x, &avg), &input)),
        &[6.0, 7.0, 10.0, 11.0],
        1e-5,
    );
}

#[test]
fn pooling_crops_inputs_that_do_not_divide() {
    let x = Input::new([1, 5, 5]);
    let y = MaxPooling2D::new(2).call(&x).unwrap();
    assert_eq!(y.shape(), &[1, 2, 2]);
    let out = run(&build(&x, &y), &t(&one_to(25), &[1, 1, 5, 5]));
    assert_close(&values(&out), &[7.0, 9.0, 17.0, 19.0], 0.0);
}

#[test]
fn same_pooling_ignores_padding_like_tensorflow() {
    let x = Input::new([1, 3, 3]);
    let input = t(&one_to(9), &[1, 1, 3, 3]);
    let max = MaxPooling2D::new(2)
        .padding(Padding::Same)
        .call(&x)
        .unwrap();
    assert_close(
        &values(&run(&build(&x, &max), &input)),
        &[5.0, 6.0, 8.0, 9.0],
        0.0,
    );
    // Average over real elements only: [1,2,4,5] -> 3, [3,6] -> 4.5, [7,8] -> 7.5, [9] -> 9.
    let avg = AveragePooling2D::new(2)
        .padding(Padding::Same)
        .call(&x)
        .unwrap();
    assert_close(
        &values(&run(&build(&x, &avg), &input)),
        &[3.0, 4.5, 7.5, 9.0],
        1e-6,
    );
    // Negative inputs: a padded zero must not win the max.
    let neg = t(
        &one_to(9).iter().map(|v| -v).collect::<Vec<_>>(),
        &[1, 1, 3, 3],
    );
    assert_close(
        &values(&run(&build(&x, &max), &neg)),
        &[-1.0, -3.0, -7.0, -9.0],
        0.0,
    );
}

#[test]
fn global_average_pooling_flatten_and_zero_padding() {
    let x = Input::new([2, 2, 2]);
    let input = t(&one_to(8), &[1, 2, 2, 2]);
    let gap = GlobalAveragePooling2D::new().call(&x).unwrap();
    assert_close(&values(&run(&build(&x, &gap), &input)), &[2.5, 6.5], 1e-6);
    let flat = Flatten::new().call(&x).unwrap();
    assert_close(&values(&run(&build(&x, &flat), &input)), &one_to(8), 0.0);

    let x = Input::new([1, 1, 2]);
    let pad = ZeroPadding2D::asymmetric((1, 0), (0, 1)).call(&x).unwrap();
    assert_eq!(pad.shape(), &[1, 2, 3]);
    let out = run(&build(&x, &pad), &t(&[1.0, 2.0], &[1, 1, 1, 2]));
    assert_close(&values(&out), &[0.0, 0.0, 0.0, 1.0, 2.0, 0.0], 0.0);
}

#[test]
fn dropout_drops_in_training_only_and_is_seeded() {
    let x = Input::new([1000]);
    let y = Dropout::new(0.25).call(&x).unwrap();
    let model = build(&x, &y);
    let input = t(&vec![1.0; 1000], &[1, 1000]);
    assert_close(&values(&run(&model, &input)), &vec![1.0; 1000], 0.0);

    let calls = model.forward_calls();
    let first = values(&model.forward(&[input.clone()], Mode::Train).unwrap()[0]);
    let kept = first.iter().filter(|&&v| v != 0.0).count();
    assert!((700..800).contains(&kept), "kept {kept} of 1000");
    assert!(
        first
            .iter()
            .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6)
    );
    // A new call draws a new mask; rewinding the call counter repeats it.
    let second = values(&model.forward(&[input.clone()], Mode::Train).unwrap()[0]);
    assert!(first != second, "two calls drew the same mask");
    model.set_forward_calls(calls);
    let again = values(&model.forward(&[input], Mode::Train).unwrap()[0]);
    assert!(
        first == again,
        "rewinding the call counter did not repeat the mask"
    );
}

#[test]
fn upsampling_repeats_or_interpolates_like_keras() {
    // One 1x2x2 image [[1, 2], [3, 4]].
    let x = Input::new([1, 2, 2]);
    let nearest = UpSampling2D::new(2).call(&x).unwrap();
    let bilinear = UpSampling2D::new(2).bilinear().call(&x).unwrap();
    let model = Model::new(&[x], &[nearest, bilinear])
        .unwrap()
        .build(&candle_core::Device::Cpu, candle_core::DType::F32, 0)
        .unwrap();
    let image = t(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2]);
    let out = model.forward(&[image], Mode::Eval).unwrap();
    assert_eq!(out[0].dims(), &[1, 1, 4, 4]);
    assert_close(
        &values(&out[0]),
        &[
            1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 3.0, 3.0, 4.0, 4.0,
        ],
        0.0,
    );
    // TensorFlow's half-pixel bilinear: [1, 2] becomes [1, 1.25, 1.75, 2] along each axis,
    // and the rows blend likewise (tests/keras_parity.rs checks Keras's own outputs).
    let row = |a: f32, b: f32| [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b];
    let (top, bottom) = (row(1.0, 2.0), row(3.0, 4.0));
    let mut want = Vec::new();
    for (wa, wb) in [(1.0, 0.0), (0.75, 0.25), (0.25, 0.75), (0.0, 1.0)] {
        want.extend((0..4).map(|i| wa * top[i] + wb * bottom[i]));
    }
    assert_close(&values(&out[1]), &want, 1e-6);

    // Rectangular factors and shape errors name the layer.
    let y = UpSampling2D::new(2)
        .size(1, 3)
        .call(&Input::new([2, 3, 4]))
        .unwrap();
    assert_eq!(y.shape(), &[2, 3, 12]);
    let err = UpSampling2D::new(2)
        .name("up")
        .call(&Input::new([4]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("up"), "{err}");
    assert!(UpSampling2D::new(0).call(&Input::new([1, 2, 2])).is_err());
}

#[test]
fn new_layers_refuse_wrong_shapes_naming_the_layer() {
    let flat = Input::new([12]);
    let map = Input::new([3, 4, 4]);
    let errors = [
        Conv2DTranspose::new(2, 3)
            .name("up")
            .call(&flat)
            .unwrap_err(),
        DepthwiseConv2D::new(5).name("dw").call(&map).unwrap_err(),
        SeparableConv2D::new(0, 3)
            .name("sep")
            .call(&map)
            .unwrap_err(),
        Reshape::new([5, -1]).name("rs").call(&flat).unwrap_err(),
        Reshape::new([-1, -1]).name("rs2").call(&flat).unwrap_err(),
        Permute::new([1, 3]).name("perm").call(&map).unwrap_err(),
        LayerNormalization::new()
            .axes([0])
            .name("ln")
            .call(&map)
            .unwrap_err(),
        LayerNormalization::new()
            .axes([1, 1])
            .name("ln2")
            .call(&map)
            .unwrap_err(),
        Softmax::new().axis(4).name("sm").call(&map).unwrap_err(),
        Lambda::new(|x| Ok(x.clone()))
            .name("lam")
            .call_many(&[flat.clone(), flat.clone()])
            .unwrap_err(),
    ];
    for (error, name) in errors.iter().zip([
        "up", "dw", "sep", "rs", "rs2", "perm", "ln", "ln2", "sm", "lam",
    ]) {
        assert!(
            error.to_string().contains(&format!("`{name}`")),
            "{name}: {error}"
        );
    }
    // The shapes are in the messages.
    assert!(errors[0].to_string().contains("[12]"), "{}", errors[0]);
    assert!(errors[3].to_string().contains("[5, -1]"), "{}", errors[3]);
}

#[test]
fn lambda_checks_what_its_function_returns() {
    let x = Input::new([4]);
    let y = Lambda::new(|t| Ok(t.narrow(1, 0, 2)?)).call(&x).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap();
    let err = model
        .forward(
            &[Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap()],
            Mode::Eval,
        )
        .unwrap_err();
    assert!(err.to_string().contains("shape rule"), "{err}");
}

#[test]
fn reshape_and_permute_move_elements_in_nchw_order() {
    let x = Input::new([2, 3]);
    let y = Permute::new([2, 1]).call(&x).unwrap();
    let z = Reshape::new([-1]).call(&y).unwrap();
    let model = Model::new(&[x], &[z])
        .unwrap()
        .build(&Device::Cpu, DType::F32, 0)
        .unwrap();
    let input = Tensor::new(&[[[0f32, 1., 2.], [3., 4., 5.]]], &Device::Cpu).unwrap();
    let out = model.forward(&[input], Mode::Eval).unwrap().remove(0);
    assert_eq!(out.to_vec2::<f32>().unwrap(), [[0., 3., 1., 4., 2., 5.]]);
}

#[test]
fn rescaling_scales_then_offsets() {
    let x = Input::new([2, 2]);
    let y = Rescaling::new(1.0 / 127.5).offset(-1.0).call(&x).unwrap();
    let model = build(&x, &y);
    let floats = run(&model, &t(&[0.0, 127.5, 255.0, 63.75], &[1, 2, 2]));
    assert_close(&values(&floats), &[-1.0, 0.0, 1.0, -0.5], 1e-6);

    // A factor that would make every output NaN is refused when the graph is built.
    let err = Rescaling::new(f64::NAN).call(&x).unwrap_err().to_string();
    assert!(err.contains("finite"), "{err}");
}

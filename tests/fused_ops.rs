//! The fused CPU kernels against the composed candle ops they replace: BatchNorm with the
//! channel on axis 1 takes the fused path, the same data laid out with the channel last takes
//! the composed one; outputs, gradients and moving statistics must agree. Likewise the fused
//! per-channel bias add of Conv2D/Dense against a broadcast add.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_functional::prelude::*;
use candle_functional::{ElementWise, Fusion};
use common::{assert_same, max_abs_diff, varied};

/// A one-BatchNorm model over `shape` with channel axis `axis`, weights set to fixed values.
fn bn_model(shape: [usize; 2], axis: isize, gamma: &Tensor, beta: &Tensor) -> Model {
    let x = Input::new(shape);
    let y = BatchNorm::new().axis(axis).momentum(0.9).call(&x).unwrap();
    let model = Model::new(&[x], &[y])
        .unwrap()
        .build(&Device::Cpu, DType::F64, 0)
        .unwrap();
    let mut w = model.weight_map().unwrap();
    w.insert("batch_normalization.gamma".into(), gamma.clone());
    w.insert("batch_normalization.beta".into(), beta.clone());
    w.insert(
        "batch_normalization.moving_mean".into(),
        Tensor::new(&[0.5f64, -1.0, 2.0], &Device::Cpu).unwrap(),
    );
    w.insert(
        "batch_normalization.moving_variance".into(),
        Tensor::new(&[1.5f64, 0.5, 3.0], &Device::Cpu).unwrap(),
    );
    model.set_weights(&w).unwrap();
    model
}

#[test]
fn fused_batch_norm_matches_the_composed_path() {
    let dev = Device::Cpu;
    let gamma = Tensor::new(&[1.5f64, 0.5, -2.0], &dev).unwrap();
    let beta = Tensor::new(&[0.1f64, -0.2, 0.3], &dev).unwrap();
    let x_ncl = (Tensor::randn(0f64, 1.0, (4, 3, 5), &dev).unwrap() * 10.0).unwrap();
    let x_nlc = x_ncl.transpose(1, 2).unwrap().contiguous().unwrap();
    let upstream = Tensor::randn(0f64, 1.0, (4, 3, 5), &dev).unwrap();

    let fused = bn_model([3, 5], 1, &gamma, &beta);
    let composed = bn_model([5, 3], 2, &gamma, &beta);
    for mode in [Mode::Train, Mode::Eval] {
        let xf = Var::from_tensor(&x_ncl).unwrap();
        let xc = Var::from_tensor(&x_nlc).unwrap();
        let yf = fused
            .forward(&[xf.as_tensor().clone()], mode)
            .unwrap()
            .remove(0);
        let yc = composed
            .forward(&[xc.as_tensor().clone()], mode)
            .unwrap()
            .remove(0);
        let yc_as_f = yc.transpose(1, 2).unwrap();
        assert!(max_abs_diff(&yf, &yc_as_f) < 1e-10, "{mode:?} outputs");

        let gf = (yf * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (yc_as_f * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dxf = gf.get(xf.as_tensor()).unwrap();
        let dxc = gc.get(xc.as_tensor()).unwrap().transpose(1, 2).unwrap();
        assert!(max_abs_diff(dxf, &dxc) < 1e-10, "{mode:?} input gradient");
        if mode == Mode::Train {
            let wf = fused.weights().unwrap();
            let wc = composed.weights().unwrap();
            for (a, b) in wf.iter().zip(&wc) {
                assert_eq!(a.name(), b.name());
                // Trainable weights: compare gradients; state: compare the updated values.
                let (ta, tb) = if a.trainable() {
                    (
                        gf.get(a.var().as_tensor()).unwrap().clone(),
                        gc.get(b.var().as_tensor()).unwrap().clone(),
                    )
                } else {
                    (a.var().as_tensor().clone(), b.var().as_tensor().clone())
                };
                assert!(max_abs_diff(&ta, &tb) < 1e-10, "{}", a.name());
            }
        }
    }
}

#[test]
fn fused_bias_add_matches_broadcast_add() {
    let dev = Device::Cpu;
    // Dense on rank 2 takes the fused bias path; on rank 3 the broadcast one.
    let x2 = Input::new([4]);
    let x3 = Input::new([1, 4]);
    let dense = Dense::new(3);
    let y2 = dense.call(&x2).unwrap();
    let y3 = dense.call(&x3).unwrap();
    let model = Model::new(&[x2, x3], &[y2, y3])
        .unwrap()
        .build(&dev, DType::F64, 1)
        .unwrap();
    let mut w = model.weight_map().unwrap();
    w.insert(
        "dense.bias".into(),
        Tensor::new(&[1.0f64, -2.0, 3.0], &dev).unwrap(),
    );
    model.set_weights(&w).unwrap();
    let input = Tensor::randn(0f64, 1.0, (5, 4), &dev).unwrap();
    let outs = model
        .forward(&[input.clone(), input.unsqueeze(1).unwrap()], Mode::Train)
        .unwrap();
    assert!(max_abs_diff(&outs[0], &outs[1].squeeze(1).unwrap()) < 1e-12);
    let bias = model
        .weights()
        .unwrap()
        .into_iter()
        .find(|w| w.name() == "dense.bias")
        .unwrap();
    let g0 = outs[0].sum_all().unwrap().backward().unwrap();
    let g1 = outs[1].sum_all().unwrap().backward().unwrap();
    let (a, b) = (
        g0.get(bias.var().as_tensor()).unwrap(),
        g1.get(bias.var().as_tensor()).unwrap(),
    );
    assert!(max_abs_diff(a, b) < 1e-12);
    assert_eq!(a.to_vec1::<f64>().unwrap(), [5.0, 5.0, 5.0]);
}

/// `(value, gradients of x and of each extra variable)` of `sum(y · upstream)`.
fn with_grads(y: &Tensor, upstream: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
    let grads = (y * upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    vars.iter()
        .map(|v| grads.get(v.as_tensor()).unwrap().clone())
        .collect()
}

fn var(t: Tensor) -> Var {
    Var::from_tensor(&t).unwrap()
}

/// A BatchNorm's `gamma` and `beta` for three channels, as variables of `dtype`.
fn gamma_beta(dtype: DType) -> (Var, Var) {
    let per_channel = |v: &[f64]| {
        var(Tensor::new(v, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap())
    };
    (
        per_channel(&[1.5, 0.5, -2.0]),
        per_channel(&[0.1, -0.2, 0.3]),
    )
}

#[test]
fn batch_norm_kernels_match_the_reference() {
    use candle_functional::ops::{self, reference};
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
        let x = var(Tensor::randn(0f64, 1.0, (4, 3, 5, 2), &dev)
            .unwrap()
            .affine(7.0, 3.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap());
        let (gamma, beta) = gamma_beta(dtype);
        let upstream = Tensor::randn(0f64, 1.0, (4, 3, 5, 2), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let (g, b) = (Some(gamma.as_tensor()), Some(beta.as_tensor()));

        let ours = ops::batch_norm_train(x.as_tensor(), g, b, 1e-3).unwrap();
        let theirs = reference::batch_norm_train(x.as_tensor(), g, b, 1e-3).unwrap();
        for (what, a, r) in [
            ("y", &ours.0, &theirs.0),
            ("mean", &ours.1, &theirs.1),
            ("var", &ours.2, &theirs.2),
        ] {
            assert!(
                max_abs_diff(a, r) < tol * common::max_abs(r),
                "{dtype:?} train {what}"
            );
        }
        let ga = with_grads(&ours.0, &upstream, &[&x, &gamma, &beta]);
        let gr = with_grads(&theirs.0, &upstream, &[&x, &gamma, &beta]);
        for ((what, a), r) in ["x", "gamma", "beta"].iter().zip(&ga).zip(&gr) {
            assert!(
                max_abs_diff(a, r) < tol * common::max_abs(r),
                "{dtype:?} train d{what}"
            );
        }

        let (mean, variance) = (ours.1.clone(), (&ours.2 + 0.5).unwrap());
        let ours = ops::batch_norm_eval(x.as_tensor(), g, b, &mean, &variance, 1e-3).unwrap();
        let theirs =
            reference::batch_norm_eval(x.as_tensor(), g, b, &mean, &variance, 1e-3).unwrap();
        assert!(
            max_abs_diff(&ours, &theirs) < tol * common::max_abs(&theirs),
            "{dtype:?} eval y"
        );
        let ga = with_grads(&ours, &upstream, &[&x, &gamma, &beta]);
        let gr = with_grads(&theirs, &upstream, &[&x, &gamma, &beta]);
        for (a, r) in ga.iter().zip(&gr) {
            assert!(
                max_abs_diff(a, r) < tol * common::max_abs(r),
                "{dtype:?} eval gradients"
            );
        }
    }
}

/// The per-channel sums run in f32 lanes folded into f64 per block, in parallel over blocks of
/// images and channels: rows longer than a block with a ragged end, more images than one task
/// takes, more channels than one task takes (19), and a mean 3,500 times the spread (1000 ±
/// 0.5), where `E[x²] - E[x]²` would cancel. Statistics, values and gradients must match the
/// reference on the same f32 values computed in f64, and not change with the thread count.
#[test]
fn batch_norm_sums_hold_over_long_rows_many_tasks_and_a_large_mean() {
    use candle_functional::ops::{self, reference};
    let dev = Device::Cpu;
    let shape = (11, 19, 41, 37);
    let mut state = 7u64;
    let uniform: Vec<f32> = (0..11 * 19 * 41 * 37)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let x32 = Tensor::from_vec(uniform, shape, &dev)
        .unwrap()
        .affine(1.0, 1000.0)
        .unwrap();
    let upstream = varied(11 * 19 * 41 * 37, 9, DType::F32)
        .reshape(shape)
        .unwrap();
    let run = |dtype: DType| {
        let x = var(x32.to_dtype(dtype).unwrap());
        let (y, mean, variance) = match dtype {
            DType::F32 => ops::batch_norm_train(x.as_tensor(), None, None, 1e-3).unwrap(),
            _ => reference::batch_norm_train(x.as_tensor(), None, None, 1e-3).unwrap(),
        };
        let dx = with_grads(&y, &upstream.to_dtype(dtype).unwrap(), &[&x]).remove(0);
        [y, mean, variance, dx].map(|t| t.to_dtype(DType::F64).unwrap())
    };
    let ours = run(DType::F32);
    let theirs = run(DType::F64);
    for (what, a, r, tol) in [
        ("y", &ours[0], &theirs[0], 1e-3),
        ("mean", &ours[1], &theirs[1], 1e-6),
        ("var", &ours[2], &theirs[2], 1e-4),
        ("dx", &ours[3], &theirs[3], 1e-3),
    ] {
        let err = max_abs_diff(a, r) / common::max_abs(r);
        assert!(err < tol, "{what}: relative error {err:e}");
    }
    let threads = |n: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
            .install(|| run(DType::F32))
    };
    for (one, three) in threads(1).iter().zip(&threads(3)) {
        assert_eq!(
            max_abs_diff(one, three),
            0.0,
            "results depend on the thread count"
        );
    }
}

#[test]
fn half_precision_batch_norm_keeps_its_statistics_in_f32() {
    use candle_functional::ops;
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (8, 2, 3, 3), &dev)
        .unwrap()
        .affine(50.0, 120.0)
        .unwrap();
    let (y32, mean32, var32) = ops::batch_norm_train(&x, None, None, 1e-3).unwrap();
    let half = x.to_dtype(DType::BF16).unwrap();
    let (y, mean, var) = ops::batch_norm_train(&half, None, None, 1e-3).unwrap();
    assert_eq!(
        (y.dtype(), mean.dtype(), var.dtype()),
        (DType::BF16, DType::F32, DType::F32)
    );
    // Only the bf16 rounding of the input and output remains.
    assert!(max_abs_diff(&mean, &mean32) < 0.5, "mean");
    assert!(
        max_abs_diff(&var, &var32) < 0.01 * common::max_abs(&var32),
        "var"
    );
    assert!(max_abs_diff(&y, &y32) < 0.05, "y");
}

#[test]
fn bias_add_kernel_matches_the_reference() {
    use candle_functional::ops::{self, reference};
    let dev = Device::Cpu;
    for shape in [vec![5, 3], vec![2, 3, 4, 4]] {
        let x = var(Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap());
        let bias = var(Tensor::new(&[1f32, -2.0, 3.0], &dev).unwrap());
        let upstream = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
        let ours = ops::bias_add(x.as_tensor(), bias.as_tensor()).unwrap();
        let theirs = reference::bias_add(x.as_tensor(), bias.as_tensor()).unwrap();
        assert!(max_abs_diff(&ours, &theirs) < 1e-6, "{shape:?} y");
        let ga = with_grads(&ours, &upstream, &[&x, &bias]);
        let gr = with_grads(&theirs, &upstream, &[&x, &bias]);
        for (a, r) in ga.iter().zip(&gr) {
            assert!(max_abs_diff(a, r) < 1e-5, "{shape:?} gradients");
        }
    }
}

#[test]
fn fused_adam_is_bit_identical_to_the_reference() {
    use candle_functional::ops::{AdamStep, adam_update, reference};
    // Longer than one parallel chunk, not a multiple of it.
    let n = 40_000 + 17;
    for dtype in [DType::F32, DType::F64] {
        let (w, g) = (varied(n, 1, dtype), varied(n, 2, dtype));
        let m = varied(n, 3, dtype);
        let v = varied(n, 4, dtype).abs().unwrap();
        for decay in [1.0, 1.0 - 1e-3 * 4e-3] {
            let step = AdamStep {
                alpha: 1e-3 * 0.0316 / 0.1,
                beta_1: 0.9,
                beta_2: 0.999,
                epsilon: 1e-7,
                decay,
            };
            let fused = adam_update(&w, &g, &m, &v, step).unwrap();
            let composed = reference::adam_update(&w, &g, &m, &v, step).unwrap();
            assert_same(&fused.0, &composed.0, "w");
            assert_same(&fused.1, &composed.1, "m");
            assert_same(&fused.2, &composed.2, "v");
        }
    }
}

#[test]
fn fused_sgd_is_bit_identical_to_the_reference() {
    use candle_functional::ops::{SgdStep, reference, sgd_update};
    let n = 40_000 + 17;
    for dtype in [DType::F32, DType::F64] {
        let (w, g, u) = (
            varied(n, 5, dtype),
            varied(n, 6, dtype),
            varied(n, 7, dtype),
        );
        for (momentum, nesterov, decay) in [
            (0.0, false, 1.0),
            (0.0, false, 0.999),
            (0.9, false, 1.0),
            (0.9, true, 0.999),
        ] {
            let step = SgdStep {
                learning_rate: 0.01,
                momentum,
                nesterov,
                decay,
            };
            let velocity = (momentum > 0.0).then_some(&u);
            let fused = sgd_update(&w, &g, velocity, step).unwrap();
            let composed = reference::sgd_update(&w, &g, velocity, step).unwrap();
            assert_same(&fused.0, &composed.0, "w");
            assert_eq!(fused.1.is_some(), composed.1.is_some());
            if let (Some(a), Some(b)) = (&fused.1, &composed.1) {
                assert_same(a, b, "velocity");
            }
        }
    }
}

#[test]
fn fused_updates_refuse_mismatched_arguments() {
    use candle_functional::ops::{AdamStep, SgdStep, adam_update, sgd_update};
    let w = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let short = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let f64s = Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap();
    let step = AdamStep {
        alpha: 0.1,
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-7,
        decay: 1.0,
    };
    let err = adam_update(&w, &short, &w, &w, step)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`g`"), "{err}");
    let err = adam_update(&w, &w, &f64s, &w, step)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`m`"), "{err}");
    let sgd = SgdStep {
        learning_rate: 0.1,
        momentum: 0.9,
        nesterov: false,
        decay: 1.0,
    };
    let err = sgd_update(&w, &w, None, sgd).unwrap_err().to_string();
    assert!(err.contains("velocity"), "{err}");
}

#[test]
fn fused_relu_matches_candle_and_passes_no_gradient_at_zero() {
    for dtype in [DType::F32, DType::F64] {
        // Non-zero values: there the two backward rules agree.
        let x = varied(70_001, 8, dtype);
        let x = (&x + (x.ge(0.0).unwrap().to_dtype(dtype).unwrap() * 1e-3).unwrap()).unwrap();
        let x = (&x - 5e-4).unwrap();
        let x = Var::from_tensor(&x).unwrap();
        let mix = varied(70_001, 9, dtype);
        let ours = candle_functional::ops::relu(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().relu().unwrap();
        assert_same(&ours, &theirs, "relu");
        let g_ours = (&ours * &mix)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_theirs = (&theirs * &mix)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_same(
            g_ours.get(x.as_tensor()).unwrap(),
            g_theirs.get(x.as_tensor()).unwrap(),
            "relu gradient",
        );
    }
    // At exactly 0 the gradient is 0 (TensorFlow's and PyTorch's rule).
    let x = Var::new(&[0f32, -0.0, 1.0], &Device::Cpu).unwrap();
    let g = candle_functional::ops::relu(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        [0.0, 0.0, 1.0]
    );
}

#[test]
fn fused_batch_norm_matches_add_relu_batch_norm_relu_composed() {
    use candle_functional::ops::{self, reference};
    let dev = Device::Cpu;
    let shape = (4, 3, 5, 2);
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
        // Values on both sides of zero, some sums exactly zero (no gradient there).
        let a = Tensor::randn(0f64, 1.0, shape, &dev)
            .unwrap()
            .affine(3.0, 0.5)
            .unwrap();
        let keep = a.abs().unwrap().ge(0.3).unwrap();
        let a = var(keep
            .where_cond(&a, &a.zeros_like().unwrap())
            .unwrap()
            .to_dtype(dtype)
            .unwrap());
        let b = Tensor::randn(0f64, 1.0, shape, &dev).unwrap();
        let b = var(keep
            .where_cond(&b, &b.zeros_like().unwrap())
            .unwrap()
            .to_dtype(dtype)
            .unwrap());
        let (gamma, beta) = gamma_beta(dtype);
        let upstream = Tensor::randn(0f64, 1.0, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let (g, bt) = (Some(gamma.as_tensor()), Some(beta.as_tensor()));
        let close = |x: &Tensor, r: &Tensor, what: &str| {
            assert!(
                max_abs_diff(x, r) < tol * common::max_abs(r).max(1.0),
                "{dtype:?} {what}"
            );
        };
        let sum = (a.as_tensor() + b.as_tensor()).unwrap();
        let cases = [
            (1, true, false),
            (2, false, false),
            (2, true, false),
            (1, false, true),
            (2, true, true),
        ];
        for (inputs, relu, after) in cases {
            let case = format!("{inputs} input(s), relu before {relu}, after {after}");
            let prologue = match (inputs, relu) {
                (1, false) => None,
                (1, true) => Some(ElementWise::Relu),
                (_, false) => Some(ElementWise::Add),
                (_, true) => Some(ElementWise::AddRelu),
            };
            let mut relus = Fusion::new();
            if let Some(prologue) = prologue {
                relus = relus.with_prologue(prologue);
            }
            if after {
                relus = relus.with_epilogue(ElementWise::Relu);
            }
            let relu_after = |y: Tensor| if after { ops::relu(&y).unwrap() } else { y };
            let (given, vars, operand): (Vec<&Tensor>, Vec<&Var>, Tensor) = if inputs == 1 {
                (
                    vec![a.as_tensor()],
                    vec![&a, &gamma, &beta],
                    a.as_tensor().clone(),
                )
            } else {
                (
                    vec![a.as_tensor(), b.as_tensor()],
                    vec![&a, &b, &gamma, &beta],
                    sum.clone(),
                )
            };
            let operand = if relu {
                ops::relu(&operand).unwrap()
            } else {
                operand
            };

            let fused = ops::fused_batch_norm_train(&given, relus, g, bt, 1e-3).unwrap();
            let composed = reference::batch_norm_train(&operand, g, bt, 1e-3).unwrap();
            let composed = (relu_after(composed.0), composed.1, composed.2);
            close(&fused.0, &composed.0, &format!("{case}: train y"));
            close(&fused.1, &composed.1, &format!("{case}: train mean"));
            close(&fused.2, &composed.2, &format!("{case}: train var"));
            let gf = with_grads(&fused.0, &upstream, &vars);
            let gc = with_grads(&composed.0, &upstream, &vars);
            for (i, (x, r)) in gf.iter().zip(&gc).enumerate() {
                close(x, r, &format!("{case}: train gradient {i}"));
            }
            if relu && !after {
                // Where the ReLU's argument is ≤ 0 nothing flows back, exactly.
                let argument = if inputs == 1 { a.as_tensor() } else { &sum };
                let blocked = argument.le(0.0).unwrap().to_dtype(dtype).unwrap();
                let leaked = (&gf[0] * &blocked)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert_eq!(leaked, 0.0, "{dtype:?} {case}: gradient where blocked");
            }

            let (mean, variance) = (composed.1.clone(), (&composed.2 + 0.5).unwrap());
            let fused =
                ops::fused_batch_norm_eval(&given, relus, g, bt, &mean, &variance, 1e-3).unwrap();
            let composed = relu_after(
                reference::batch_norm_eval(&operand, g, bt, &mean, &variance, 1e-3).unwrap(),
            );
            close(&fused, &composed, &format!("{case}: eval y"));
            let gf = with_grads(&fused, &upstream, &vars);
            let gc = with_grads(&composed, &upstream, &vars);
            for (i, (x, r)) in gf.iter().zip(&gc).enumerate() {
                close(x, r, &format!("{case}: eval gradient {i}"));
            }
        }
    }
}

#[test]
fn fused_batch_norm_refuses_bad_inputs() {
    use candle_functional::ops;
    let dev = Device::Cpu;
    let a = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
    let other_shape = Tensor::zeros((2, 3, 5), DType::F32, &dev).unwrap();
    let other_dtype = Tensor::zeros((2, 3, 4), DType::F64, &dev).unwrap();
    let add = Fusion::new().with_prologue(ElementWise::Add);
    let add_after = Fusion::new().with_epilogue(ElementWise::Add);
    for (inputs, fusion, wanted) in [
        (vec![], Fusion::new(), "1 tensor(s) expected"),
        (vec![&a, &a, &a], add, "2 tensor(s) expected"),
        (vec![&a], add, "2 tensor(s) expected"),
        (vec![&a, &a], Fusion::new(), "1 tensor(s) expected"),
        (vec![&a], add_after, "only a ReLU can follow"),
        (vec![&a, &other_shape], add, "shapes"),
        (vec![&a, &other_dtype], add, "dtype"),
    ] {
        let err = ops::fused_batch_norm_train(&inputs, fusion, None, None, 1e-3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fused_batch_norm_train") && err.contains(wanted),
            "{err}"
        );
    }
}

/// One training or inference pass of `model` on `inputs` and the backward pass of
/// `sum(y · upstream)` for its first output: `[y, d input…, then per weight (by name): the
/// weight, and its gradient where one was tracked]`. An inference pass tracks no gradient for
/// the weights, and a training pass moves the moving statistics: both show in the list.
fn pass_with_gradients(
    model: &Model,
    inputs: &[&Tensor],
    upstream: &Tensor,
    mode: Mode,
) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let given: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = model.forward(&given, mode).unwrap().remove(0);
    let grads = (&y * upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut got = vec![y];
    got.extend(
        vars.iter()
            .map(|v| grads.get(v.as_tensor()).unwrap().clone()),
    );
    let mut weights: Vec<_> = model.weight_map().unwrap().into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, w) in weights {
        if let Some(g) = grads.get(&w) {
            got.push(g.clone());
        }
        got.push(w);
    }
    got
}

/// Two inputs → Add → ReLU → BatchNorm (the end of a residual block). `keep` 0: only the
/// BatchNorm's output is a model output (the plan folds the Add and the ReLU into it); 1: the
/// Add's output too (only the ReLU is folded); 2: the ReLU's as well (nothing is folded).
fn add_relu_bn_model(keep: usize) -> Model {
    let (a, b) = (Input::new([3, 4, 4]), Input::new([3, 4, 4]));
    let s = Add::new().call_many(&[a.clone(), b.clone()]).unwrap();
    let r = ReLU::new().call(&s).unwrap();
    let y = BatchNorm::new().momentum(0.5).call(&r).unwrap();
    let outputs = [y, s, r];
    let model = Model::new(&[a, b], &outputs[..=keep])
        .unwrap()
        .build(&Device::Cpu, DType::F64, 0)
        .unwrap();
    let mut w = model.weight_map().unwrap();
    w.insert(
        "batch_normalization.gamma".into(),
        Tensor::new(&[1.5f64, 0.5, -2.0], &Device::Cpu).unwrap(),
    );
    w.insert(
        "batch_normalization.beta".into(),
        Tensor::new(&[0.1f64, -0.2, 0.3], &Device::Cpu).unwrap(),
    );
    model.set_weights(&w).unwrap();
    model
}

#[test]
fn folded_layers_give_the_values_gradients_and_statistics_of_the_separate_ones() {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f64, 2.0, (5, 3, 4, 4), &dev).unwrap();
    let b = Tensor::randn(0f64, 1.0, (5, 3, 4, 4), &dev).unwrap();
    let upstream = Tensor::randn(0f64, 1.0, (5, 3, 4, 4), &dev).unwrap();
    for mode in [Mode::Train, Mode::Eval] {
        let run = |model: &Model| pass_with_gradients(model, &[&a, &b], &upstream, mode);
        let separate = run(&add_relu_bn_model(2));
        // y, da, db, then (dbeta,) beta, (dgamma,) gamma and the two moving statistics.
        let expected = if mode == Mode::Train { 9 } else { 7 };
        assert_eq!(separate.len(), expected, "{mode:?}");
        for keep in [0, 1] {
            let folded = run(&add_relu_bn_model(keep));
            assert_eq!(folded.len(), expected, "{mode:?} keep {keep}");
            for (i, (f, s)) in folded.iter().zip(&separate).enumerate() {
                assert!(
                    max_abs_diff(f, s) < 1e-12,
                    "{mode:?} keep {keep}: value {i}"
                );
            }
        }
    }
}

#[test]
fn fused_conv2d_matches_convolution_bias_add_and_relu() {
    use candle_functional::ops::{self, Conv2dGeometry, reference};
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
        let data = |shape: &[usize]| {
            var(Tensor::randn(0f64, 1.0, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap())
        };
        // TensorFlow's 'same' with stride 2 (padding bottom/right only), then two groups.
        for (geometry, kernel_in) in [
            (
                Conv2dGeometry {
                    pad: (0, 1, 0, 1),
                    stride: 2,
                    dilation: 1,
                    groups: 1,
                },
                4,
            ),
            (
                Conv2dGeometry {
                    pad: (1, 1, 1, 1),
                    stride: 1,
                    dilation: 1,
                    groups: 2,
                },
                2,
            ),
        ] {
            // Even sizes: the reference's backward (candle's) miscounts odd ones at stride 2.
            let (x, k, b) = (data(&[3, 4, 8, 6]), data(&[6, kernel_in, 3, 3]), data(&[6]));
            // The bias alone (conv2d_bias), then fused_conv2d with a ReLU, with and without it.
            for (with_bias, relu) in [(true, false), (true, true), (false, true)] {
                let case = format!("{dtype:?} {geometry:?} bias {with_bias} relu {relu}");
                let bias = with_bias.then(|| b.as_tensor());
                let fused = match (bias, relu) {
                    (Some(bias), false) => {
                        ops::conv2d_bias(x.as_tensor(), k.as_tensor(), bias, geometry)
                    }
                    _ => {
                        let fusion = Fusion::new().with_epilogue(ElementWise::Relu);
                        ops::fused_conv2d(x.as_tensor(), k.as_tensor(), bias, fusion, geometry)
                    }
                }
                .unwrap();
                let mut composed =
                    reference::conv2d(x.as_tensor(), k.as_tensor(), geometry).unwrap();
                if let Some(bias) = bias {
                    composed = reference::bias_add(&composed, bias).unwrap();
                }
                if relu {
                    composed = ops::relu(&composed).unwrap();
                }
                let scale = common::max_abs(&composed);
                assert!(max_abs_diff(&fused, &composed) < tol * scale, "{case}");
                let upstream = Tensor::randn(0f64, 1.0, composed.dims(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let vars = if with_bias {
                    vec![&x, &k, &b]
                } else {
                    vec![&x, &k]
                };
                let gf = with_grads(&fused, &upstream, &vars);
                let gc = with_grads(&composed, &upstream, &vars);
                for ((what, f), c) in ["dx", "dkernel", "dbias"].iter().zip(&gf).zip(&gc) {
                    assert!(
                        max_abs_diff(f, c) < tol * common::max_abs(c).max(1.0),
                        "{case} {what}"
                    );
                }
            }
        }
    }
    let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev).unwrap();
    let k = Tensor::zeros((3, 2, 3, 3), DType::F32, &dev).unwrap();
    let geometry = Conv2dGeometry {
        pad: (1, 1, 1, 1),
        stride: 1,
        dilation: 1,
        groups: 1,
    };
    for (bias, wanted) in [
        (Tensor::zeros(2, DType::F32, &dev).unwrap(), "shape [3]"),
        (Tensor::zeros(3, DType::F64, &dev).unwrap(), "dtype"),
    ] {
        let err = ops::conv2d_bias(&x, &k, &bias, geometry)
            .unwrap_err()
            .to_string();
        assert!(err.contains("conv2d_bias") && err.contains(wanted), "{err}");
    }
}

/// Conv → BatchNorm → ReLU (the usual order, and the U-Net example's), with the BatchNorm's
/// output also a model output when `keep_bn` (then the ReLU cannot be folded into it).
fn conv_bn_relu_model(keep_bn: bool) -> Model {
    let x = Input::new([2, 6, 6]);
    let c = Conv2D::new(3, 3).padding(Padding::Same).call(&x).unwrap();
    let n = BatchNorm::new().momentum(0.5).call(&c).unwrap();
    let y = ReLU::new().call(&n).unwrap();
    let outputs = if keep_bn { vec![y, n] } else { vec![y] };
    Model::new(&[x], &outputs)
        .unwrap()
        .build(&Device::Cpu, DType::F64, 7)
        .unwrap()
}

#[test]
fn a_relu_folded_after_a_batch_norm_gives_the_values_and_gradients_of_the_two_layers() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f64, 1.0, (4, 2, 6, 6), &dev).unwrap();
    let upstream = Tensor::randn(0f64, 1.0, (4, 3, 6, 6), &dev).unwrap();
    let (folded, separate) = (conv_bn_relu_model(false), conv_bn_relu_model(true));
    for mode in [Mode::Train, Mode::Eval] {
        let run = |model: &Model| pass_with_gradients(model, &[&x], &upstream, mode);
        let (a, b) = (run(&folded), run(&separate));
        // y, dx, then the kernel, bias, gamma, beta (with their gradients when training) and
        // the two moving statistics.
        let expected = if mode == Mode::Train { 12 } else { 8 };
        assert_eq!((a.len(), b.len()), (expected, expected), "{mode:?}");
        for (i, (f, s)) in a.iter().zip(&b).enumerate() {
            assert!(max_abs_diff(f, s) < 1e-12, "{mode:?} value {i}");
        }
    }
}

/// Conv → ReLU, written three ways: the ReLU a layer of its own and the only reader (folded
/// into the convolution), the same with the convolution's output also a model output (not
/// folded), and Keras's `activation="relu"`.
fn conv_relu_model(way: usize) -> Model {
    let x = Input::new([2, 6, 6]);
    let conv = Conv2D::new(3, 3).padding(Padding::Same).name("conv");
    let outputs = match way {
        0 | 1 => {
            let c = conv.call(&x).unwrap();
            let y = ReLU::new().call(&c).unwrap();
            if way == 0 { vec![y] } else { vec![y, c] }
        }
        _ => vec![conv.activation(ActivationFn::Relu).call(&x).unwrap()],
    };
    Model::new(&[x], &outputs)
        .unwrap()
        .build(&Device::Cpu, DType::F64, 11)
        .unwrap()
}

#[test]
fn a_relu_folded_into_a_convolution_gives_the_values_and_gradients_of_the_two_layers() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f64, 1.0, (4, 2, 6, 6), &dev).unwrap();
    let upstream = Tensor::randn(0f64, 1.0, (4, 3, 6, 6), &dev).unwrap();
    let run = |model: &Model| pass_with_gradients(model, &[&x], &upstream, Mode::Train);
    let separate = run(&conv_relu_model(1));
    // y, dx, then dbias, bias, dkernel, kernel.
    assert_eq!(separate.len(), 6);
    for way in [0, 2] {
        for (i, (f, s)) in run(&conv_relu_model(way)).iter().zip(&separate).enumerate() {
            assert!(max_abs_diff(f, s) < 1e-12, "way {way}: value {i}");
        }
    }
}

#[test]
fn forward_fused_refuses_inputs_that_do_not_fit_the_fusion() {
    use candle_functional::{LayerOp, Params};
    let params = Params::new(&[], &[], Mode::Eval, 0);
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let add = Fusion::new().with_prologue(ElementWise::Add);
    let err = BatchNorm::new()
        .config()
        .forward_fused(add, std::slice::from_ref(&x), &params)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 input(s) expected, got 1"), "{err}");
    let relu_after = Fusion::new().with_epilogue(ElementWise::Relu);
    let err = Conv2D::new(2, 3)
        .config()
        .forward_fused(relu_after, &[], &params)
        .unwrap_err()
        .to_string();
    assert!(err.contains("on 0 input(s)"), "{err}");
    let err = Conv2D::new(2, 3)
        .config()
        .forward_fused(add, &[x], &params)
        .unwrap_err()
        .to_string();
    assert!(err.contains("only a ReLU after it"), "{err}");
}

//! The fused CPU kernels against the composed candle ops they replace: BatchNorm with the
//! channel on axis 1 takes the fused path, the same data laid out with the channel last takes
//! the composed one; outputs, gradients and moving statistics must agree. Likewise the fused
//! per-channel bias add of Conv2D/Dense against a broadcast add.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_functional::prelude::*;
use common::max_abs_diff;

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

//! The multi-tensor end of a training step (`ops::all_finite`, `ops::assign_if` and the
//! in-place optimizer updates) against what they replace: the out-of-place fused updates and
//! the composed reference, bit for bit; and every argument checked before anything is
//! written.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_functional::ops::{
    AdamStep, SgdStep, adam_update, adam_update_in_place, all_finite, assign_if, reference,
    sgd_update, sgd_update_in_place,
};
use common::{assert_same, varied};

const CPU: Device = Device::Cpu;

fn verdict(t: &Tensor) -> u8 {
    assert_eq!(t.dtype(), DType::U8);
    assert!(t.dims().is_empty(), "a scalar verdict, got {:?}", t.dims());
    t.to_scalar::<u8>().unwrap()
}

#[test]
fn all_finite_finds_every_nan_and_infinity() {
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        let good = varied(70_001, 1, dtype);
        let other = varied(5, 2, dtype).reshape((5, 1)).unwrap();
        assert_eq!(
            verdict(&all_finite(&[&good, &other]).unwrap()),
            1,
            "{dtype:?}"
        );
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            // The bad value last, in the second tensor, past the first parallel chunk.
            let mut v = vec![0.5f64; 70_001];
            v[70_000] = bad;
            let t = Tensor::from_vec(v, 70_001, &CPU)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let got = verdict(&all_finite(&[&other, &t]).unwrap());
            assert_eq!(got, 0, "{dtype:?} missed {bad}");
        }
    }
    // A non-contiguous view and an empty tensor.
    let m = Tensor::new(&[[1f32, f32::NAN], [2.0, 3.0]], &CPU).unwrap();
    assert_eq!(verdict(&all_finite(&[&m.t().unwrap()]).unwrap()), 0);
    let empty = Tensor::zeros(0, DType::F32, &CPU).unwrap();
    assert_eq!(verdict(&all_finite(&[&empty]).unwrap()), 1);
}

#[test]
fn all_finite_refuses_what_it_cannot_check() {
    let err = all_finite(&[]).unwrap_err().to_string();
    assert!(err.contains("at least one"), "{err}");
    let labels = Tensor::new(&[1u32], &CPU).unwrap();
    let err = all_finite(&[&labels]).unwrap_err().to_string();
    assert!(err.contains("float"), "{err}");
}

fn adam_step(decay: f64) -> AdamStep {
    AdamStep {
        alpha: 1e-3 * 0.0316 / 0.1,
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-7,
        decay,
    }
}

#[test]
fn adam_in_place_is_bit_identical_to_the_fused_and_reference_updates() {
    let n = 40_000 + 17;
    for dtype in [DType::F32, DType::F64, DType::BF16] {
        let (w0, g) = (varied(n, 1, dtype), varied(n, 2, dtype));
        let m0 = varied(n, 3, dtype);
        let v0 = varied(n, 4, dtype).abs().unwrap();
        for decay in [1.0, 1.0 - 1e-3 * 4e-3] {
            let step = adam_step(decay);
            let want = if dtype == DType::BF16 {
                reference::adam_update(&w0, &g, &m0, &v0, step).unwrap()
            } else {
                adam_update(&w0, &g, &m0, &v0, step).unwrap()
            };
            let (w, m, v) = (
                Var::from_tensor(&w0).unwrap(),
                Var::from_tensor(&m0).unwrap(),
                Var::from_tensor(&v0).unwrap(),
            );
            adam_update_in_place(&[(&w, &g, &m, &v)], step, None).unwrap();
            assert_same(w.as_tensor(), &want.0, "w");
            assert_same(m.as_tensor(), &want.1, "m");
            assert_same(v.as_tensor(), &want.2, "v");
            // Kept from applying: nothing moves.
            let skip = Tensor::new(0u8, &CPU).unwrap();
            adam_update_in_place(&[(&w, &g, &m, &v)], step, Some(&skip)).unwrap();
            assert_same(w.as_tensor(), &want.0, "w after a skipped step");
            assert_same(m.as_tensor(), &want.1, "m after a skipped step");
            assert_same(v.as_tensor(), &want.2, "v after a skipped step");
        }
    }
}

#[test]
fn sgd_in_place_is_bit_identical_to_the_fused_update() {
    let n = 40_000 + 17;
    for dtype in [DType::F32, DType::F64] {
        let (w0, g, u0) = (
            varied(n, 5, dtype),
            varied(n, 6, dtype),
            varied(n, 7, dtype),
        );
        for (momentum, nesterov, decay) in
            [(0.0, false, 0.999), (0.9, false, 1.0), (0.9, true, 0.999)]
        {
            let step = SgdStep {
                learning_rate: 0.01,
                momentum,
                nesterov,
                decay,
            };
            let velocity = (momentum > 0.0).then_some(&u0);
            let want = sgd_update(&w0, &g, velocity, step).unwrap();
            let w = Var::from_tensor(&w0).unwrap();
            let u = Var::from_tensor(&u0).unwrap();
            let u_arg = (momentum > 0.0).then_some(&u);
            sgd_update_in_place(&[(&w, &g, u_arg)], step, None).unwrap();
            assert_same(w.as_tensor(), &want.0, "w");
            if let Some(u1) = &want.1 {
                assert_same(u.as_tensor(), u1, "velocity");
            }
        }
    }
}

#[test]
fn in_place_updates_check_every_weight_before_writing_any() {
    let w1 = Var::new(&[1f32, 2.0], &CPU).unwrap();
    let w2 = Var::new(&[3f32, 4.0], &CPU).unwrap();
    let g = Tensor::new(&[0.5f32, 0.5], &CPU).unwrap();
    let short = Tensor::new(&[0.5f32], &CPU).unwrap();
    let slots = || Var::zeros(2, DType::F32, &CPU).unwrap();
    let (m1, v1, m2, v2) = (slots(), slots(), slots(), slots());
    // The second weight's gradient has the wrong shape: the first must not move.
    let err = adam_update_in_place(
        &[(&w1, &g, &m1, &v1), (&w2, &short, &m2, &v2)],
        adam_step(1.0),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`g`"), "{err}");
    assert_eq!(w1.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
    assert_eq!(m1.to_vec1::<f32>().unwrap(), [0.0, 0.0]);
    // A gradient that is the weight itself, or a slot shared with the weight, would be read
    // while it is written.
    let err = adam_update_in_place(&[(&w1, w1.as_tensor(), &m1, &v1)], adam_step(1.0), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("shares its storage"), "{err}");
    let err = adam_update_in_place(&[(&w1, &g, &m1, &m1)], adam_step(1.0), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`v`") && err.contains("`m`"), "{err}");
    // Across items: one weight twice, or one item's gradient being another's weight.
    let err = adam_update_in_place(
        &[(&w1, &g, &m1, &v1), (&w1, &g, &m2, &v2)],
        adam_step(1.0),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("item 1") && err.contains("item 0"), "{err}");
    let err = adam_update_in_place(
        &[(&w1, &g, &m1, &v1), (&w2, w1.as_tensor(), &m2, &v2)],
        adam_step(1.0),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`g`") && err.contains("`w`"), "{err}");
    let sgd = SgdStep {
        learning_rate: 0.1,
        momentum: 0.9,
        nesterov: false,
        decay: 1.0,
    };
    let err = sgd_update_in_place(&[(&w1, &g, None)], sgd, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("velocity"), "{err}");
    let not_a_flag = Tensor::new(&[1u8, 1], &CPU).unwrap();
    assert!(
        adam_update_in_place(&[(&w1, &g, &m1, &v1)], adam_step(1.0), Some(&not_a_flag)).is_err()
    );
    assert_eq!(w1.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
}

#[test]
fn assign_if_writes_all_or_nothing() {
    let a = Var::new(&[0f32, 0.0], &CPU).unwrap();
    let b = Var::new(&[[0f64]], &CPU).unwrap();
    let (new_a, new_b) = (
        Tensor::new(&[1f32, 2.0], &CPU).unwrap(),
        Tensor::new(&[[3f64]], &CPU).unwrap(),
    );
    let targets = [(&a, &new_a), (&b, &new_b)];
    assign_if(&targets, Some(&Tensor::new(0u8, &CPU).unwrap())).unwrap();
    assert_eq!(a.to_vec1::<f32>().unwrap(), [0.0, 0.0]);
    assign_if(&targets, Some(&Tensor::new(1u8, &CPU).unwrap())).unwrap();
    assert_eq!(a.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
    assert_eq!(b.to_vec2::<f64>().unwrap(), [[3.0]]);
    // A bad second pair: the first stays as it was.
    let c = Var::new(&[5f32, 6.0], &CPU).unwrap();
    let wrong = Tensor::new(&[1f32, 2.0, 3.0], &CPU).unwrap();
    let err = assign_if(
        &[
            (
                &a,
                &new_b
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .repeat(2)
                    .unwrap(),
            ),
            (&c, &wrong),
        ],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`value`"), "{err}");
    assert_eq!(a.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
    // A value that is a view of its own variable.
    let err = assign_if(&[(&c, &c.as_tensor().detach())], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("shares its storage"), "{err}");
    assert_eq!(c.to_vec1::<f32>().unwrap(), [5.0, 6.0]);
}

//! Augmentation inside the model: `RandomFlip` mirrors in training only, each image on its
//! own with probability ½ per axis, reproducibly from the model's seed, differentiably.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_functional::prelude::*;

const CPU: Device = Device::Cpu;

fn model(mode: FlipMode, seed: u64) -> Model {
    let x = Input::new([1, 3, 3]);
    let y = RandomFlip::new(mode).call(&x).unwrap();
    Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, seed)
        .unwrap()
}

/// `n` copies of one 3x3 image with distinct pixels.
fn batch(n: usize) -> Tensor {
    let one: Vec<f32> = (0..9).map(|v| v as f32).collect();
    Tensor::from_vec(one.repeat(n), (n, 1, 3, 3), &CPU).unwrap()
}

/// Which of the four mirror images each sample is: (left-right, top-bottom).
fn flips(out: &Tensor) -> Vec<(bool, bool)> {
    let n = out.dim(0).unwrap();
    let values = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (0..n)
        .map(|i| {
            let image = &values[i * 9..(i + 1) * 9];
            let (row, col) = ((image[0] / 3.0) as usize, (image[0] as usize) % 3);
            let want: Vec<f32> = (0..9)
                .map(|p| {
                    let (r, c) = (p / 3, p % 3);
                    let r = if row == 2 { 2 - r } else { r };
                    let c = if col == 2 { 2 - c } else { c };
                    (r * 3 + c) as f32
                })
                .collect();
            assert_eq!(
                image,
                want.as_slice(),
                "sample {i} is not a mirror of the input"
            );
            (col == 2, row == 2)
        })
        .collect()
}

#[test]
fn random_flip_is_the_identity_at_inference() {
    let x = batch(16);
    let out = model(FlipMode::HorizontalAndVertical, 0)
        .forward(std::slice::from_ref(&x), Mode::Eval)
        .unwrap();
    assert_eq!(common::max_abs_diff(&out[0], &x), 0.0);
}

#[test]
fn random_flip_mirrors_half_the_images_per_axis_and_only_its_axes() {
    let n = 400;
    let both = flips(
        &model(FlipMode::HorizontalAndVertical, 1)
            .forward(&[batch(n)], Mode::Train)
            .unwrap()[0],
    );
    let share =
        |f: &dyn Fn(&(bool, bool)) -> bool| both.iter().filter(|s| f(s)).count() as f64 / n as f64;
    // Binomial(400, ½): a share outside 0.4..0.6 has odds below 1e-4.
    for (what, s) in [
        ("left-right", share(&|s| s.0)),
        ("top-bottom", share(&|s| s.1)),
        ("both", share(&|s| s.0 && s.1) * 2.0),
    ] {
        assert!((0.4..0.6).contains(&s), "{what}: {s}");
    }
    let horizontal = flips(
        &model(FlipMode::Horizontal, 1)
            .forward(&[batch(n)], Mode::Train)
            .unwrap()[0],
    );
    assert!(horizontal.iter().all(|s| !s.1) && horizontal.iter().any(|s| s.0));
    let vertical = flips(
        &model(FlipMode::Vertical, 1)
            .forward(&[batch(n)], Mode::Train)
            .unwrap()[0],
    );
    assert!(vertical.iter().all(|s| !s.0) && vertical.iter().any(|s| s.1));
}

#[test]
fn random_flip_draws_anew_each_call_and_repeats_for_a_seed() {
    let draws = |m: &Model| flips(&m.forward(&[batch(64)], Mode::Train).unwrap()[0]);
    let (a, b) = (
        model(FlipMode::HorizontalAndVertical, 7),
        model(FlipMode::HorizontalAndVertical, 7),
    );
    let first = draws(&a);
    assert_eq!(first, draws(&b), "same seed, same call: same flips");
    assert_ne!(first, draws(&a), "the next call draws again");
}

#[test]
fn gradients_flow_back_through_the_mirror() {
    let x = candle_core::Var::from_tensor(&batch(8)).unwrap();
    let m = model(FlipMode::Horizontal, 3);
    let out = m
        .forward(&[x.as_tensor().clone()], Mode::Train)
        .unwrap()
        .remove(0);
    // d(sum(out · weights))/dx is the weights mirrored back: each sample's gradient is a
    // permutation of the weights, summing to theirs.
    let weights = Tensor::arange(0f32, 72.0, &CPU)
        .unwrap()
        .reshape((8, 1, 3, 3))
        .unwrap();
    let grads = (&out * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads.get(x.as_tensor()).unwrap();
    let per_sample = |t: &Tensor| {
        t.flatten_from(1)
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(per_sample(g), per_sample(&weights));
}

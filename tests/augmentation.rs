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

fn normalization_fixture() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keras_normalization.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(floats).collect(),
        v => vec![v.as_f64().unwrap() as f32],
    }
}

/// Keras 3.15's `Normalization().adapt(x)` and its outputs
/// (`scripts/keras_reference.py normalization`).
#[test]
fn normalization_adapts_and_normalizes_as_keras_does() {
    use candle_functional::data::TensorDataset;
    use candle_functional::layers::Normalization;
    let fixture = normalization_fixture();
    let x = Tensor::from_vec(floats(&fixture["x"]), (20, 3, 5, 5), &CPU).unwrap();
    // Batches of 6: the statistics are summed over batches of unequal sizes.
    let data = TensorDataset::new(vec![x], vec![], 6).unwrap();
    let norm = Normalization::default().adapt(&data, 0).unwrap();
    let close = |got: &[f64], want: &[f32], what: &str| {
        for (g, w) in got.iter().zip(want) {
            let w = *w as f64;
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{what}: {g} vs Keras's {w}"
            );
        }
    };
    close(
        norm.config().mean.as_ref().unwrap(),
        &floats(&fixture["mean"]),
        "mean",
    );
    close(
        norm.config().variance.as_ref().unwrap(),
        &floats(&fixture["variance"]),
        "variance",
    );
    let other = Tensor::from_vec(floats(&fixture["other"]), (4, 3, 5, 5), &CPU).unwrap();
    for (layer, key) in [(norm.clone(), "output"), (norm.invert(true), "inverted")] {
        let input = Input::new([3, 5, 5]);
        let y = layer.call(&input).unwrap();
        let model = Model::new(&[input], &[y])
            .unwrap()
            .build(&CPU, DType::F32, 0)
            .unwrap();
        let out = model
            .forward(std::slice::from_ref(&other), Mode::Train)
            .unwrap();
        let want = Tensor::from_vec(floats(&fixture[key]), (4, 3, 5, 5), &CPU).unwrap();
        assert!(common::max_abs_diff(&out[0], &want) < 1e-4, "{key}");
    }
}

#[test]
fn normalization_without_statistics_or_data_is_refused() {
    use candle_functional::data::TensorDataset;
    use candle_functional::layers::Normalization;
    let err = Normalization::default()
        .call(&Input::new([3, 2, 2]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapt"), "{err}");
    let err = Normalization::new(vec![0.0, 1.0], vec![1.0, 1.0])
        .call(&Input::new([3, 2, 2]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 mean values for an axis of 3"), "{err}");
    let empty = TensorDataset::new(
        vec![Tensor::zeros((0, 3), DType::F32, &CPU).unwrap()],
        vec![],
        2,
    )
    .unwrap();
    assert!(Normalization::default().adapt(&empty, 0).is_err());
}

//! Geometric and contrast augmentation inside the model: `RandomTranslation`,
//! `RandomRotation`, `RandomZoom` and `RandomContrast` act in training only, reproducibly
//! from the model's seed, differentiably. The resampling is checked pixel for pixel against
//! Keras's `affine_transform` (TensorFlow backend) for every fill mode and interpolation, and
//! the layers' matrices against the ones Keras's layers build (fixture from
//! `scripts/keras_reference.py image-transforms`); the random draws by their statistics.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_functional::layers::{AffineTransform, RandomCrop, affine_transform};
use candle_functional::prelude::*;

const CPU: Device = Device::Cpu;

fn fixture() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/keras_image_transforms.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(floats).collect(),
        n => vec![n.as_f64().unwrap() as f32],
    }
}

fn fixture_images(f: &serde_json::Value) -> Tensor {
    Tensor::from_vec(floats(&f["x"]), (2, 3, 5, 7), &CPU).unwrap()
}

fn matrices(f: &serde_json::Value, name: &str) -> Vec<AffineTransform> {
    let values = floats(&f["matrices"][name]);
    values
        .chunks(8)
        .map(|c| AffineTransform::new(c.try_into().unwrap()))
        .collect()
}

#[test]
fn affine_transform_matches_keras_for_every_fill_mode_and_interpolation() {
    let f = fixture();
    let x = fixture_images(&f);
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 32);
    for case in cases {
        let name = case["matrix"].as_str().unwrap();
        let fill: FillMode = case["fill_mode"].as_str().unwrap().parse().unwrap();
        let interpolation = match case["interpolation"].as_str().unwrap() {
            "nearest" => Interpolation::Nearest,
            _ => Interpolation::Bilinear,
        };
        let got = affine_transform(&x, &matrices(&f, name), interpolation, fill, 0.5).unwrap();
        let want = Tensor::from_vec(floats(&case["output"]), (2, 3, 5, 7), &CPU).unwrap();
        let diff = common::max_abs_diff(&got, &want);
        assert!(
            diff < 1e-5,
            "{name} {fill:?} {interpolation:?}: off Keras by {diff}"
        );
    }
}

#[test]
fn layer_matrices_are_the_ones_keras_layers_build() {
    let f = fixture();
    let close = |got: Vec<AffineTransform>, name: &str| {
        let want = floats(&f["matrices"][name]);
        let got: Vec<f32> = got.iter().flat_map(|t| t.values()).collect();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-5,
                "{name}: {got:?} against Keras's {want:?}"
            );
        }
    };
    let shifts = floats(&f["shifts"]);
    close(
        shifts
            .chunks(2)
            .map(|s| AffineTransform::translation(s[0], s[1]))
            .collect(),
        "translation",
    );
    let angles = floats(&f["angles"]);
    close(
        angles
            .iter()
            .map(|&a| AffineTransform::rotation(a, 5, 7))
            .collect(),
        "rotation",
    );
    let zooms = floats(&f["zooms"]);
    close(
        zooms
            .chunks(2)
            .map(|z| AffineTransform::zoom(z[0], z[1], 5, 7))
            .collect(),
        "zoom",
    );
}

/// A one-layer model made on demand (each call a fresh model with the same seed).
type MakeModel = Box<dyn Fn() -> Model>;
/// A layer applied to a symbolic tensor.
type CallLayer = Box<dyn Fn(&SymbolicTensor) -> Result<SymbolicTensor>>;

fn one_layer(layer: impl Layer, shape: [usize; 3], seed: u64) -> Model {
    let x = Input::new(shape);
    let y = layer.call(&x).unwrap();
    Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, seed)
        .unwrap()
}

fn run(model: &Model, x: &Tensor, mode: Mode) -> Tensor {
    model
        .forward(std::slice::from_ref(x), mode)
        .unwrap()
        .remove(0)
}

#[test]
fn every_augmentation_is_the_identity_at_inference_and_seeded_in_training() {
    let x = Tensor::rand(0f32, 1.0, (6, 2, 8, 8), &CPU).unwrap();
    let layers: Vec<(&str, MakeModel)> = vec![
        (
            "translation",
            Box::new(|| one_layer(RandomTranslation::new(0.3, 0.3), [2, 8, 8], 7)),
        ),
        (
            "rotation",
            Box::new(|| one_layer(RandomRotation::new(0.2), [2, 8, 8], 7)),
        ),
        (
            "zoom",
            Box::new(|| one_layer(RandomZoom::new(0.3), [2, 8, 8], 7)),
        ),
        (
            "contrast",
            Box::new(|| one_layer(RandomContrast::new(0.5).value_range(0.0, 1.0), [2, 8, 8], 7)),
        ),
    ];
    for (name, make) in layers {
        let (a, b) = (make(), make());
        let first = run(&a, &x, Mode::Train);
        assert!(
            common::max_abs_diff(&first, &x) > 1e-3,
            "{name} changed nothing"
        );
        // The same seed repeats the same draws; the next call draws anew.
        assert_eq!(
            common::max_abs_diff(&first, &run(&b, &x, Mode::Train)),
            0.0,
            "{name}"
        );
        assert!(
            common::max_abs_diff(&first, &run(&a, &x, Mode::Train)) > 1e-3,
            "{name}"
        );
        assert_eq!(
            common::max_abs_diff(&run(&a, &x, Mode::Eval), &x),
            0.0,
            "{name}"
        );
    }
}

/// Where the one bright pixel of each image went: (row, column).
fn bright_spots(out: &Tensor, size: usize) -> Vec<Option<(usize, usize)>> {
    let values = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values
        .chunks(size * size)
        .map(|image| {
            image
                .iter()
                .position(|&v| v == 1.0)
                .map(|p| (p / size, p % size))
        })
        .collect()
}

#[test]
fn pad_and_crop_translation_shifts_whole_pixels_up_to_four_each_way() {
    // CIFAR-10's pad-and-crop as a layer: an impulse at the centre moves by -4..=4 pixels on
    // each axis, every shift seen, each image on its own. A factor of 4.5/32 draws shifts in
    // (-4.5, 4.5) pixels, uniform once rounded (PyTorch's RandomCrop(32, padding=4)); 0.125
    // draws in [-4, 4), so the two extremes come half as often.
    let n = 2000;
    for (factor, ends, inner) in [
        (4.5 / 32.0, 1.0 / 9.0, 1.0 / 9.0),
        (0.125, 1.0 / 16.0, 1.0 / 8.0),
    ] {
        let layer = RandomTranslation::new(factor, factor)
            .fill_mode(FillMode::Constant)
            .interpolation(Interpolation::Nearest);
        let model = one_layer(layer, [1, 32, 32], 3);
        let mut impulse = vec![0f32; 32 * 32];
        impulse[16 * 32 + 16] = 1.0;
        let x = Tensor::from_vec(impulse.repeat(n), (n, 1, 32, 32), &CPU).unwrap();
        let out = run(&model, &x, Mode::Train);
        let mut seen = [[0usize; 9]; 2];
        for spot in bright_spots(&out, 32) {
            let (row, col) = spot.expect("the impulse stays inside the image");
            let (dy, dx) = (row as i64 - 16, col as i64 - 16);
            assert!(dy.abs() <= 4 && dx.abs() <= 4, "shift ({dy}, {dx})");
            seen[0][(dy + 4) as usize] += 1;
            seen[1][(dx + 4) as usize] += 1;
        }
        for axis in seen {
            for (i, &count) in axis.iter().enumerate() {
                let p = if i == 0 || i == 8 { ends } else { inner };
                let expected = p * n as f64;
                assert!(
                    (count as f64 - expected).abs() < 0.3 * expected,
                    "factor {factor}: shift {} seen {count} times in {n}: {axis:?}",
                    i as i64 - 4
                );
            }
        }
        // The pixel values themselves are untouched: zeros and the one impulse.
        let total = out.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(total, n as f32);
    }
}

#[test]
fn a_fixed_rotation_or_zoom_is_the_keras_matrix_applied() {
    let x = Tensor::rand(0f32, 1.0, (3, 2, 6, 6), &CPU).unwrap();
    let quarter = RandomRotation::new(0.0)
        .range(0.25, 0.25)
        .interpolation(Interpolation::Nearest);
    let out = run(&one_layer(quarter, [2, 6, 6], 0), &x, Mode::Train);
    let want = affine_transform(
        &x,
        &[AffineTransform::rotation(90.0, 6, 6); 3],
        Interpolation::Nearest,
        FillMode::Reflect,
        0.0,
    )
    .unwrap();
    assert_eq!(common::max_abs_diff(&out, &want), 0.0);
    // A quarter turn of a square image moves pixels, loses none.
    let sorted = |t: &Tensor| {
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.sort_by(f32::total_cmp);
        v
    };
    assert_eq!(sorted(&out), sorted(&x));
    assert!(common::max_abs_diff(&out, &x) > 0.1);

    let zoom = RandomZoom::new(0.0)
        .height_range(0.5, 0.5)
        .width_range(-0.25, -0.25);
    let out = run(&one_layer(zoom, [2, 6, 6], 0), &x, Mode::Train);
    let want = affine_transform(
        &x,
        &[AffineTransform::zoom(0.75, 1.5, 6, 6); 3],
        Interpolation::Bilinear,
        FillMode::Reflect,
        0.0,
    )
    .unwrap();
    assert!(common::max_abs_diff(&out, &want) < 1e-6);
}

#[test]
fn contrast_factors_stay_in_keras_range() {
    // Keras 3's RandomContrast(0.5) draws factors in [1, 1.5]: the spread of each image
    // about its mean grows by that factor (no clipping in this value range).
    let n = 400;
    let x = Tensor::rand(-1f32, 1.0, (n, 1, 4, 4), &CPU).unwrap();
    let model = one_layer(
        RandomContrast::new(0.5).value_range(-100.0, 100.0),
        [1, 4, 4],
        5,
    );
    let out = run(&model, &x, Mode::Train);
    let spread = |t: &Tensor| -> Vec<f32> {
        let centred = t
            .broadcast_sub(&t.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap())
            .unwrap();
        centred
            .abs()
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let ratios: Vec<f32> = spread(&out)
        .iter()
        .zip(spread(&x))
        .map(|(o, i)| o / i)
        .collect();
    assert!(
        ratios.iter().all(|&r| (0.9999..=1.5001).contains(&r)),
        "{ratios:?}"
    );
    let mean = ratios.iter().sum::<f32>() / n as f32;
    assert!((mean - 1.25).abs() < 0.03, "mean factor {mean}");
    let low = ratios.iter().filter(|&&r| r < 1.25).count();
    assert!((150..250).contains(&low), "{low} of {n} below the middle");
}

#[test]
fn gradients_flow_back_through_the_resampling() {
    let x = candle_core::Var::from_tensor(&Tensor::rand(0f32, 1.0, (2, 1, 5, 5), &CPU).unwrap())
        .unwrap();
    let out = affine_transform(
        x.as_tensor(),
        &[
            AffineTransform::rotation(30.0, 5, 5),
            AffineTransform::zoom(0.8, 1.2, 5, 5),
        ],
        Interpolation::Bilinear,
        FillMode::Constant,
        0.0,
    )
    .unwrap();
    let grads = out.sum_all().unwrap().backward().unwrap();
    let g = grads.get(x.as_tensor()).expect("a gradient for the images");
    assert_eq!(g.dims(), &[2, 1, 5, 5]);
    // Each output pixel's weights sum to at most 1 (less where the fill value was read), so
    // the gradient's total is the output's inside share, between 0 and the pixel count.
    let total = g.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(total > 10.0 && total <= 50.0 + 1e-4, "{total}");
}

#[test]
fn factors_outside_keras_bounds_fail_when_the_model_is_built() {
    let build = |layer: CallLayer| {
        let x = Input::new([1, 4, 4]);
        let y = layer(&x)?;
        Model::new(&[x], &[y])?
            .build(&CPU, DType::F32, 0)
            .map(|_| ())
    };
    let cases: Vec<(&str, CallLayer)> = vec![
        (
            "height_factor",
            Box::new(|x| RandomTranslation::new(1.5, 0.0).call(x)),
        ),
        (
            "factor",
            Box::new(|x| RandomRotation::new(f64::NAN).call(x)),
        ),
        (
            "zoom factor of -1",
            Box::new(|x| RandomZoom::new(1.0).call(x)),
        ),
        (
            "fill_value",
            Box::new(|x| RandomZoom::new(0.1).fill_value(f64::INFINITY).call(x)),
        ),
        (
            "value_range",
            Box::new(|x| RandomContrast::new(0.1).value_range(1.0, 0.0).call(x)),
        ),
    ];
    for (needle, layer) in cases {
        let err = build(layer).expect_err(needle).to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn resizing_and_center_crop_match_keras() {
    let f = fixture();
    let x = fixture_images(&f);
    for case in f["resized"].as_array().unwrap() {
        let (h, w) = (
            case["height"].as_u64().unwrap() as usize,
            case["width"].as_u64().unwrap() as usize,
        );
        let interpolation = match case["interpolation"].as_str().unwrap() {
            "nearest" => Interpolation::Nearest,
            _ => Interpolation::Bilinear,
        };
        let crop = case["crop_to_aspect_ratio"].as_bool().unwrap();
        let layer = Resizing::new(h, w)
            .interpolation(interpolation)
            .crop_to_aspect_ratio(crop);
        let got = run(&one_layer(layer, [3, 5, 7], 0), &x, Mode::Eval);
        let want = Tensor::from_vec(floats(&case["output"]), (2, 3, h, w), &CPU).unwrap();
        let diff = common::max_abs_diff(&got, &want);
        assert!(
            diff < 1e-5,
            "Resizing({h}, {w}) {interpolation:?} crop {crop}: {diff}"
        );
    }
    for case in f["center_cropped"].as_array().unwrap() {
        let (h, w) = (
            case["height"].as_u64().unwrap() as usize,
            case["width"].as_u64().unwrap() as usize,
        );
        let got = run(
            &one_layer(CenterCrop::new(h, w), [3, 5, 7], 0),
            &x,
            Mode::Train,
        );
        let want = Tensor::from_vec(floats(&case["output"]), (2, 3, h, w), &CPU).unwrap();
        let diff = common::max_abs_diff(&got, &want);
        assert!(diff < 1e-5, "CenterCrop({h}, {w}): {diff}");
    }
}

#[test]
fn random_crop_follows_keras_one_window_per_batch() {
    // Training, input larger than the window: one window for the whole batch, every
    // position drawn over the calls.
    let model = one_layer(RandomCrop::new(4, 5), [1, 6, 8], 9);
    let n = 3;
    let x = Tensor::arange(0f32, 48.0, &CPU)
        .unwrap()
        .reshape((1, 1, 6, 8))
        .unwrap()
        .repeat((n, 1, 1, 1))
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let out = run(&model, &x, Mode::Train);
        let values = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let first = &values[..20];
        assert!(
            values.chunks(20).all(|image| image == first),
            "one window per batch"
        );
        let (top, left) = ((first[0] / 8.0) as usize, (first[0] as usize) % 8);
        // The window is the input's rows top..top+4 and columns left..left+5.
        let want: Vec<f32> = (0..4)
            .flat_map(|r| (0..5).map(move |c| ((top + r) * 8 + left + c) as f32))
            .collect();
        assert_eq!(first, want.as_slice());
        seen.insert((top, left));
    }
    assert_eq!(seen.len(), 3 * 4, "positions seen: {seen:?}");

    // Inference: the centred window of the output's aspect ratio, resized (Keras's
    // documented rule), i.e. Resizing with crop_to_aspect_ratio.
    let inference = run(&model, &x, Mode::Eval);
    let resized = run(
        &one_layer(Resizing::new(4, 5).crop_to_aspect_ratio(true), [1, 6, 8], 0),
        &x,
        Mode::Eval,
    );
    assert_eq!(common::max_abs_diff(&inference, &resized), 0.0);

    // Training on an input not larger than the window: Keras's crop-and-resize, checked
    // against Keras.
    let f = fixture();
    let small = run(
        &one_layer(RandomCrop::new(6, 4), [3, 5, 7], 0),
        &fixture_images(&f),
        Mode::Train,
    );
    let want = Tensor::from_vec(floats(&f["random_crop_small"]), (2, 3, 6, 4), &CPU).unwrap();
    assert!(common::max_abs_diff(&small, &want) < 1e-5);
}

//! Messages that say what went wrong in the user's terms (issue 23, item 6): one test per
//! message a new user met that named the wrong thing, or nothing.

use candle_core::{DType, Device, Tensor};
use candle_functional::data::TensorDataset;
use candle_functional::prelude::*;
use candle_functional::train::{Loss, SgdConfig, Trainer};

const CPU: Device = Device::Cpu;

fn conv_net() -> Model {
    let x = Input::named("image", [3, 6, 6]);
    let y = Conv2D::new(4, 3).call(&x).unwrap();
    let y = GlobalAveragePooling2D::new().call(&y).unwrap();
    let y = Dense::new(3).call(&y).unwrap();
    Model::new(&[x], &[y]).unwrap().named("classifier")
}

#[test]
fn forward_on_an_unbuilt_model_names_the_model() {
    let err = conv_net()
        .forward(
            &[Tensor::zeros((1, 3, 6, 6), DType::F32, &CPU).unwrap()],
            Mode::Eval,
        )
        .unwrap_err();
    assert!(matches!(err, Error::NotBuilt { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("`classifier`") && message.contains("build"),
        "{message}"
    );
    // A layer's own weights, asked for before any build, name the layer as a layer.
    let layer = Dense::new(2);
    let y = layer.call(&Input::new([2])).unwrap();
    let err = y.layer().get_weights().unwrap_err();
    assert!(matches!(err, Error::LayerNotBuilt { .. }), "{err}");
    assert!(err.to_string().starts_with("layer `dense"), "{err}");
}

#[test]
fn f64_and_u8_inputs_take_the_models_dtype() {
    let model = conv_net().build(&CPU, DType::F32, 0).unwrap();
    let pixels: Vec<u8> = (0..2 * 3 * 6 * 6).map(|i| (i * 37 % 256) as u8).collect();
    let u8s = Tensor::from_vec(pixels, (2, 3, 6, 6), &CPU).unwrap();
    let f32s = u8s.to_dtype(DType::F32).unwrap();
    let want = model
        .forward(std::slice::from_ref(&f32s), Mode::Eval)
        .unwrap();
    for input in [u8s.clone(), f32s.to_dtype(DType::F64).unwrap()] {
        let got = model.forward(&[input], Mode::Eval).unwrap();
        assert_eq!(got[0].dtype(), DType::F32);
        let diff = (&got[0] - &want[0])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
    // `fit` takes u8 inputs as it takes floats.
    let labels = Tensor::new(&[0u32, 2], &CPU).unwrap();
    let data = TensorDataset::new(vec![u8s], vec![labels], 2).unwrap();
    let mut trainer = Trainer::new(
        model,
        SgdConfig::default(),
        Loss::SparseCategoricalCrossentropy { from_logits: true },
    )
    .unwrap();
    let history = trainer.fit(&data, None, 1, &mut []).unwrap();
    assert!(history.last().unwrap().loss.is_finite());
}

#[test]
fn out_of_range_unsigned_labels_report_the_range_the_batch_held() {
    let labels = Tensor::new(&[4u8, 7, 10], &CPU).unwrap();
    let loss = Loss::SparseCategoricalCrossentropy { from_logits: false };
    let err = loss
        .check_target(&[3], &labels, 3, "head")
        .unwrap_err()
        .to_string();
    assert!(err.contains("found 4..=10"), "{err}");
}

#[test]
fn a_candle_error_carries_no_backtrace_in_its_message() {
    // What candle builds when RUST_BACKTRACE is set: the backtrace inside its Display.
    let inner = candle_core::Error::Msg("unsupported dtype BF16 for op matmul".into());
    let with_frames = candle_core::Error::WithBacktrace {
        inner: Box::new(inner),
        backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
    };
    assert!(with_frames.to_string().lines().count() > 3);
    let err = Error::from(with_frames);
    assert_eq!(err.to_string(), "unsupported dtype BF16 for op matmul");
    assert!(err.candle_backtrace().is_some());
}

#[test]
fn bf16_compute_on_the_cpu_is_refused_with_a_hint() {
    let model = conv_net().build(&CPU, DType::BF16, 0).unwrap();
    let x = Tensor::zeros((1, 3, 6, 6), DType::BF16, &CPU).unwrap();
    let err = model
        .forward(std::slice::from_ref(&x), Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("BF16") && err.contains("F32") && err.contains("CUDA"),
        "{err}"
    );
    // Mixed precision (f32 weights, BF16 compute) is refused the same way.
    let mixed = conv_net().build(&CPU, DType::F32, 0).unwrap();
    mixed.set_compute_dtype(Some(DType::BF16));
    let err = mixed.forward(&[x], Mode::Eval).unwrap_err().to_string();
    assert!(err.contains("BF16") && err.contains("CUDA"), "{err}");
}

#[test]
fn a_negative_channel_axis_on_image_maps_is_refused_naming_both_readings() {
    let a = Input::new([2, 4, 4]);
    let b = Input::new([2, 4, 4]);
    // Keras's Concatenate(axis=-1) joins channels; NCHW's -1 is the width.
    let err = Concatenate::new(-1)
        .call_many(&[a.clone(), b.clone()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("width") && err.contains("channels") && err.contains("axis 1"),
        "{err}"
    );
    assert_eq!(
        Concatenate::new(1)
            .call_many(&[a.clone(), b])
            .unwrap()
            .shape(),
        &[4, 4, 4]
    );
    let err = BatchNorm::new().axis(-1).call(&a).unwrap_err().to_string();
    assert!(err.contains("width"), "{err}");
    // On (features,) vectors -1 is the features, as in Keras.
    let v = Input::new([3]);
    let w = Input::new([2]);
    assert_eq!(
        Concatenate::new(-1).call_many(&[v, w]).unwrap().shape(),
        &[5]
    );
}

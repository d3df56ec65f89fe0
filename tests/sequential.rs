//! `Sequential`: Keras's stack of layers as a builder of functional models.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_functional::prelude::*;

const CPU: Device = Device::Cpu;

#[test]
fn a_stack_is_the_functional_model_it_spells() {
    let stacked = Sequential::new([3, 8, 8])
        .add(Conv2D::new(4, 3).name("conv"))
        .unwrap()
        .add(ReLU::new().name("relu"))
        .unwrap()
        .add(Flatten::new().name("flat"))
        .unwrap()
        .add(Dense::new(2).name("out"))
        .unwrap()
        .model()
        .unwrap()
        .build(&CPU, DType::F32, 7)
        .unwrap();
    let x = Input::new([3, 8, 8]);
    let y = Conv2D::new(4, 3).name("conv").call(&x).unwrap();
    let y = ReLU::new().name("relu").call(&y).unwrap();
    let y = Flatten::new().name("flat").call(&y).unwrap();
    let y = Dense::new(2).name("out").call(&y).unwrap();
    let functional = Model::new(&[x], &[y])
        .unwrap()
        .build(&CPU, DType::F32, 7)
        .unwrap();
    functional
        .set_weights(&stacked.weight_map().unwrap())
        .unwrap();
    let batch = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &CPU).unwrap();
    let a = stacked
        .forward(std::slice::from_ref(&batch), Mode::Eval)
        .unwrap();
    let b = functional.forward(&[batch], Mode::Eval).unwrap();
    assert_eq!(common::max_abs_diff(&a[0], &b[0]), 0.0);
    assert_eq!(
        stacked.to_json().unwrap().len(),
        functional.to_json().unwrap().len()
    );
}

#[test]
fn a_layer_that_does_not_fit_fails_at_add_naming_it() {
    let err = Sequential::new([3, 8, 8])
        .add(Flatten::new())
        .unwrap()
        .add(Conv2D::new(2, 3).name("late_conv"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("late_conv") && err.contains("192"), "{err}");
}

#[test]
fn a_sequential_model_nests_as_a_layer_and_round_trips() {
    let block = Sequential::new([4])
        .add(Dense::new(8).activation(ActivationFn::Relu))
        .unwrap()
        .add(Dense::new(4))
        .unwrap()
        .named("block")
        .model()
        .unwrap();
    let model = Sequential::new([4])
        .add(block)
        .unwrap()
        .add(Dense::new(1))
        .unwrap()
        .model()
        .unwrap()
        .build(&CPU, DType::F32, 3)
        .unwrap();
    assert!(model.get_layer("block").is_ok());
    let copy = Model::from_json(&model.to_json().unwrap())
        .unwrap()
        .build(&CPU, DType::F32, 0)
        .unwrap();
    copy.set_weights(&model.weight_map().unwrap()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 4), &CPU).unwrap();
    let a = model.forward(std::slice::from_ref(&x), Mode::Eval).unwrap();
    let b = copy.forward(&[x], Mode::Eval).unwrap();
    assert_eq!(common::max_abs_diff(&a[0], &b[0]), 0.0);
}

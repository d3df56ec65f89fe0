//! `Embedding`: ids keep their integer dtype through `forward` and `fit` (and are not
//! rounded by bf16 mixed precision), a model over ids trains, gradients reach only the rows
//! read, and an id outside the table is an error, not a crash. Keras's numbers are checked by
//! the import fixture in `tests/keras_import.rs`.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_functional::data::TensorDataset;
use candle_functional::prelude::*;
use candle_functional::train::{AdamConfig, Loss, Trainer};

const CPU: Device = Device::Cpu;

fn table_model(input_dim: usize, output_dim: usize) -> Model {
    let ids = Input::new([3]);
    let vectors = Embedding::new(input_dim, output_dim)
        .name("embed")
        .call(&ids)
        .unwrap();
    Model::new(&[ids], &[vectors])
        .unwrap()
        .build(&CPU, DType::F32, 1)
        .unwrap()
}

fn table(model: &Model) -> Tensor {
    model
        .get_layer("embed")
        .unwrap()
        .layer()
        .get_weights()
        .unwrap()[0]
        .1
        .clone()
}

#[test]
fn ids_pick_rows_in_any_id_dtype_and_under_bf16() {
    let model = table_model(1000, 4);
    let rows = table(&model);
    let ids = [999u32, 300, 257];
    let want = rows
        .index_select(&Tensor::new(&ids, &CPU).unwrap(), 0)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let as_u32 = Tensor::new(&[ids], &CPU).unwrap();
    for x in [
        as_u32.clone(),
        as_u32.to_dtype(DType::I64).unwrap(),
        as_u32.to_dtype(DType::F32).unwrap(),
        as_u32.to_dtype(DType::F64).unwrap(),
    ] {
        let out = model.forward(std::slice::from_ref(&x), Mode::Eval).unwrap();
        assert_eq!(common::max_abs_diff(&out[0], &want), 0.0, "{:?}", x.dtype());
    }
    // Mixed precision computes in bf16, which holds whole numbers exactly only up to 256:
    // the ids must not pass through it (999 would become 1000, out of the table).
    model.set_compute_dtype(Some(DType::BF16));
    for x in [as_u32.clone(), as_u32.to_dtype(DType::F32).unwrap()] {
        let out = model.forward(&[x], Mode::Eval).unwrap();
        let got = out[0].to_dtype(DType::F32).unwrap();
        assert!(common::max_abs_diff(&got, &want) < 1e-3);
    }
}

#[test]
fn an_id_outside_the_table_is_an_error_naming_the_range() {
    let model = table_model(10, 2);
    for x in [
        Tensor::new(&[[1u32, 10, 2]], &CPU).unwrap(),
        Tensor::new(&[[1i64, -1, 2]], &CPU).unwrap(),
    ] {
        let err = model
            .forward(&[x], Mode::Eval)
            .expect_err("an id out of range")
            .to_string();
        assert!(err.contains("Embedding") && err.contains("0..10"), "{err}");
    }
}

#[test]
fn gradients_reach_only_the_rows_read() {
    let model = table_model(6, 2);
    let x = Tensor::new(&[[1u32, 4, 4]], &CPU).unwrap();
    let out = model.forward(&[x], Mode::Train).unwrap();
    let grads = out[0].sum_all().unwrap().backward().unwrap();
    let var = model.weights().unwrap()[0].var().clone();
    let g = grads.get(var.as_tensor()).unwrap();
    let per_row: Vec<f32> = g.sum(1).unwrap().to_vec1().unwrap();
    // Row 4 read twice, row 1 once, each reading adds 1 per component (2 components).
    assert_eq!(per_row, [0.0, 2.0, 0.0, 0.0, 4.0, 0.0]);
}

#[test]
fn a_model_over_ids_trains_with_fit() {
    // The class of a sample is whether its first id is even: only the Embedding can tell.
    let ids = Input::new([2]);
    let v = Embedding::new(8, 4).call(&ids).unwrap();
    let y = Dense::new(2)
        .call(&Flatten::new().call(&v).unwrap())
        .unwrap();
    let model = Model::new(&[ids], &[y])
        .unwrap()
        .build(&CPU, DType::F32, 3)
        .unwrap();
    let n = 64u32;
    let pairs: Vec<u32> = (0..n).flat_map(|i| [i % 8, (i * 3) % 8]).collect();
    let labels: Vec<u32> = (0..n).map(|i| u32::from(i % 8 % 2 == 0)).collect();
    let x = Tensor::from_vec(pairs, (n as usize, 2), &CPU).unwrap();
    let t = Tensor::from_vec(labels, n as usize, &CPU).unwrap();
    let data = TensorDataset::new(vec![x.clone()], vec![t.clone()], 16).unwrap();
    let mut trainer = Trainer::new(
        model,
        AdamConfig {
            learning_rate: 0.05,
            ..Default::default()
        },
        Loss::SparseCategoricalCrossentropy { from_logits: true },
    )
    .unwrap();
    let history = trainer.fit(&data, None, 15, &mut []).unwrap();
    let first = history.epochs()[0].loss;
    let last = history.last().unwrap().loss;
    assert!(last < first * 0.2, "loss {first} -> {last}");
    let predicted = trainer.model().forward(&[x], Mode::Eval).unwrap()[0]
        .argmax(1)
        .unwrap();
    let right = predicted
        .eq(&t)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(right, n as f32);
}

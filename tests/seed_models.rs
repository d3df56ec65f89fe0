//! The article's networks have the layers and parameter counts Keras reports for the
//! article's code. The per-layer table comes from `scripts/keras_reference.py counts`
//! (Keras 3.15.1, TensorFlow 2.21.0), written to `tests/fixtures/keras_seed_models.json`;
//! the totals are pinned here too.

// `&[x.clone()]` reads better than `std::slice::from_ref(&x)` in tests.
#![allow(clippy::cloned_ref_to_slice_refs)]

use std::collections::BTreeMap;

use candle_functional::ParamCounts;
use candle_functional::models::{ResNetConfig, create_plain_net, create_res_net};
use candle_functional::prelude::*;

fn keras_table(model: &str) -> serde_json::Value {
    let text = include_str!("fixtures/keras_seed_models.json");
    let all: serde_json::Value = serde_json::from_str(text).unwrap();
    all[model].clone()
}

fn class_counts(model: &Model) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for layer in model.layers() {
        *counts
            .entry(layer.op().type_name().to_string())
            .or_insert(0) += 1;
    }
    counts
}

/// Every Keras layer exists here under the same name, with the same class, the same output
/// shape (NHWC there, NCHW here) and the same parameter count.
fn assert_matches_keras(model: &Model, keras: &serde_json::Value) {
    let rows = keras["layers"].as_array().unwrap();
    assert_eq!(model.layers().len(), rows.len());
    for row in rows {
        let name = row[0].as_str().unwrap();
        let class = row[1].as_str().unwrap();
        let nhwc: Vec<usize> = row[2].as_array().unwrap()[1..]
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let nchw = match nhwc.as_slice() {
            [h, w, c] => vec![*c, *h, *w],
            other => other.to_vec(),
        };
        let params = row[3].as_u64().unwrap() as usize;
        let layer = model
            .layer(name)
            .unwrap_or_else(|| panic!("no layer named {name}"));
        assert_eq!(layer.op().type_name(), class, "{name}");
        let count: usize = layer.param_specs().iter().map(|s| s.numel()).sum();
        assert_eq!(count, params, "{name}");
        let summary = model.summary();
        let shape = format!(
            "(None, {})",
            nchw.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let line = summary
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} (")))
            .unwrap();
        assert!(line.contains(&shape), "{name}: {line} lacks {shape}");
    }
}

#[test]
fn res_net_has_keras_parameter_counts() {
    let model = create_res_net().unwrap();
    assert_eq!(
        model.count_params(),
        ParamCounts {
            total: 15_619_990,
            trainable: 15_607_568,
            non_trainable: 12_422,
        }
    );
    let keras = keras_table("res_net");
    assert_eq!(keras["total_params"], 15_619_990);
    assert_eq!(model.layers().len(), 109);
    let expected: BTreeMap<String, usize> =
        serde_json::from_value(keras["layer_class_counts"].clone()).unwrap();
    assert_eq!(class_counts(&model), expected);
    assert_matches_keras(&model, &keras);
}

#[test]
fn plain_net_has_keras_parameter_counts() {
    let model = create_plain_net().unwrap();
    assert_eq!(
        model.count_params(),
        ParamCounts {
            total: 15_447_062,
            trainable: 15_434_640,
            non_trainable: 12_422,
        }
    );
    let keras = keras_table("plain_net");
    assert_eq!(model.layers().len(), 92);
    let expected: BTreeMap<String, usize> =
        serde_json::from_value(keras["layer_class_counts"].clone()).unwrap();
    assert_eq!(class_counts(&model), expected);
    assert_matches_keras(&model, &keras);
}

#[test]
fn projection_convolutions_are_named_after_the_block_convolutions() {
    // The article creates the 1x1 shortcut after the block's two convolutions.
    let model = create_res_net().unwrap();
    let proj = model.layer("conv2d_7").unwrap();
    assert_eq!(proj.param_specs()[0].shape(), &[128, 64, 1, 1]);
}

#[test]
fn shrunken_config_builds_a_smaller_network() {
    let config = ResNetConfig::default()
        .width_divisor(4)
        .stages(vec![1, 1, 1, 1]);
    let res = config.res_net().unwrap();
    let plain = config.plain_net().unwrap();
    assert_eq!(res.outputs()[0].shape(), &[10]);
    // The plain twin lacks exactly the three 1x1 projections (with biases).
    let projections = (16 * 32 + 32) + (32 * 64 + 64) + (64 * 128 + 128);
    assert_eq!(
        res.count_params().total - plain.count_params().total,
        projections
    );
}

//! Keras 3 `.keras` files imported with `Model::from_keras` give Keras's outputs.
//!
//! The fixtures are written by `scripts/keras_reference.py keras-import` (Keras 3.15.1,
//! TensorFlow 2.21.0): small functional models with random weights (biases and BatchNorm
//! statistics included), saved by Keras, and an input batch with Keras's outputs (NCHW).
#![cfg(feature = "keras")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_functional::prelude::*;
use common::max_abs_diff;

const TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("keras_import.safetensors"), &Device::Cpu).unwrap()
}

/// Imports `name`, runs its fixture inputs, and compares every output with Keras's.
fn assert_matches_keras(name: &str, inputs: usize, outputs: usize) -> Model {
    let model =
        Model::from_keras(fixture(&format!("keras_import_{name}.keras")), &Device::Cpu).unwrap();
    let io = io();
    let xs: Vec<Tensor> = (0..inputs)
        .map(|i| io[&format!("{name}.input_{i}")].clone())
        .collect();
    let ys = model.forward(&xs, Mode::Eval).unwrap();
    assert_eq!(ys.len(), outputs);
    for (i, y) in ys.iter().enumerate() {
        let want = &io[&format!("{name}.output_{i}")];
        assert_eq!(y.dims(), want.dims(), "{name} output {i}");
        let diff = max_abs_diff(y, want);
        assert!(diff <= TOLERANCE, "{name} output {i}: max abs diff {diff}");
    }
    model
}

#[test]
fn a_flatten_no_dense_absorbs_is_translated_exactly() {
    // A channels-last Flatten joined by a Concatenate, and one that is a model output
    // (through a Dropout): their features must come out in Keras's (h, w, c) order. The
    // output one once imported silently in (c, h, w) order.
    let model = assert_matches_keras("flatten_concat", 2, 3);
    // Those two read a Permute to (h, w, c); the one a Dense reads directly keeps the free
    // path (the Dense's kernel rows reordered instead).
    assert!(model.get_layer("flat_to_hwc").is_ok());
    assert!(model.get_layer("flat_out_to_hwc").is_ok());
    assert!(model.get_layer("flat_dense_to_hwc").is_err());
}

#[test]
fn augmentation_layers_import_and_pass_through_at_inference() {
    // RandomFlip, RandomTranslation, RandomRotation, RandomZoom and RandomContrast before
    // Rescaling, Normalization and a CNN: the identity at inference, as in Keras; their
    // settings carried over as Keras normalizes them.
    let model = assert_matches_keras("augment", 1, 1);
    assert!(model.get_layer("flip_hv").is_ok());
    let config = |name: &str| {
        model
            .get_layer(name)
            .unwrap()
            .layer()
            .op()
            .to_config()
            .unwrap()
    };
    let shift = config("shift");
    assert_eq!(shift["height_factor"], serde_json::json!([-0.125, 0.125]));
    assert_eq!(shift["width_factor"], serde_json::json!([-0.1, 0.2]));
    assert_eq!(
        (shift["fill_mode"].as_str(), shift["interpolation"].as_str()),
        (Some("constant"), Some("nearest"))
    );
    let turn = config("turn");
    assert_eq!(
        (turn["factor"].clone(), turn["fill_mode"].as_str()),
        (serde_json::json!([-0.1, 0.1]), Some("wrap"))
    );
    let zoom = config("zoom");
    assert_eq!(zoom["height_factor"], serde_json::json!([-0.2, 0.1]));
    assert_eq!(zoom["width_factor"], serde_json::json!([-0.3, 0.3]));
    assert_eq!(
        (zoom["fill_value"].as_f64(), zoom["interpolation"].as_str()),
        (Some(0.5), Some("bilinear"))
    );
    // An adapted Normalization: Keras keeps its statistics as variables, read into the config.
    let adapted = config("adapted");
    assert_eq!(adapted["mean"].as_array().map(Vec::len), Some(3));
    assert_eq!(adapted["variance"].as_array().map(Vec::len), Some(3));
    // Keras 3 keeps RandomContrast(0.2) as (0, 0.2): contrast only ever raised.
    let contrast = config("contrast");
    assert_eq!(contrast["factor"], serde_json::json!([0.0, 0.2]));
    assert_eq!(contrast["value_range"], serde_json::json!([0.0, 255.0]));
}

#[test]
fn embedding_ids_import_and_match_keras_in_integer_or_float_dtype() {
    // Ids through an Embedding, a Dense on each id's vector, Flatten, joined with numeric
    // features; two outputs (the score and the vectors). Ids given as floats (as stored):
    let model = assert_matches_keras("embedding", 2, 2);
    // ... and as u32 and i64, which the model keeps (an index input is not converted).
    let io = io();
    let ids = &io["embedding.input_0"];
    let numeric = io["embedding.input_1"].clone();
    for dtype in [DType::U32, DType::I64] {
        let ys = model
            .forward(&[ids.to_dtype(dtype).unwrap(), numeric.clone()], Mode::Eval)
            .unwrap();
        let diff = max_abs_diff(&ys[0], &io["embedding.output_0"]);
        assert!(diff <= TOLERANCE, "{dtype:?}: {diff}");
    }
    let embed = model.get_layer("embed").unwrap();
    assert_eq!(embed.layer().op().type_name(), "Embedding");
}

#[test]
fn sequential_models_match_keras_top_level_and_nested() {
    // Keras's most common model: a Sequential CNN, Flatten into Dense.
    let model = assert_matches_keras("sequential", 1, 1);
    assert_eq!(model.name(), "seq_cnn");
    assert_eq!(model.inputs()[0].shape(), &[3, 8, 8]);
    // A Sequential block shared by two inputs of a functional model, holding a Sequential
    // that holds another.
    let model = assert_matches_keras("nested_sequential", 2, 1);
    assert!(model.get_layer("block").is_ok());
}

#[test]
fn conv_bn_add_concat_pooling_flatten_dense_match_keras() {
    let model = assert_matches_keras("cnn", 1, 1);
    // Keras's names and the NCHW input shape.
    assert_eq!(model.inputs()[0].shape(), &[3, 9, 8]);
    assert!(model.get_layer("bn_a").is_ok() && model.get_layer("hidden").is_ok());
}

#[test]
fn two_inputs_three_outputs_with_the_new_layers_match_keras() {
    let model = assert_matches_keras("blocks", 2, 3);
    // A Keras Dense on a map is a 1x1 convolution here.
    let layer = model.get_layer("pixel_dense").unwrap();
    assert_eq!(layer.layer().op().type_name(), "Conv2D");
}

#[test]
fn an_imported_model_saves_and_loads_like_any_other() {
    let model = Model::from_keras(fixture("keras_import_cnn.keras"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cnn.safetensors");
    model.save(&path).unwrap();
    let loaded = Model::load(&path, &Device::Cpu).unwrap();
    let x = io()["cnn.input_0"].clone();
    let a = model.forward(std::slice::from_ref(&x), Mode::Eval).unwrap();
    let b = loaded.forward(&[x], Mode::Eval).unwrap();
    assert_eq!(max_abs_diff(&a[0], &b[0]), 0.0);
}

#[test]
fn an_unsupported_layer_is_named() {
    let path = fixture("keras_import_unsupported.keras");
    let err = Model::from_keras(&path, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::KerasImport { .. }));
    let message = err.to_string();
    assert!(
        message.contains("`unit_norm`") && message.contains("UnitNormalization"),
        "{message}"
    );
}

#[test]
fn a_file_that_is_not_a_keras_archive_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.keras");
    std::fs::write(&path, b"not a zip").unwrap();
    let message = Model::from_keras(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("broken.keras") && message.contains("zip"),
        "{message}"
    );

    // A real archive cut short.
    let bytes = std::fs::read(fixture("keras_import_cnn.keras")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(Model::from_keras(&path, &Device::Cpu).is_err());
}

/// The article's full ResNet saved by Keras (about 60 MB, not committed): run
/// `scripts/keras_reference.py keras-resnet DIR`, then
/// `CANDLE_FUNCTIONAL_KERAS_RESNET=DIR cargo test --release --test keras_import -- --ignored`.
#[test]
#[ignore = "needs the article's ResNet saved by Keras: CANDLE_FUNCTIONAL_KERAS_RESNET=DIR"]
fn keras_import_article_resnet() {
    let dir = PathBuf::from(
        std::env::var("CANDLE_FUNCTIONAL_KERAS_RESNET")
            .expect("set CANDLE_FUNCTIONAL_KERAS_RESNET to the keras-resnet output folder"),
    );
    let model = Model::from_keras(dir.join("resnet.keras"), &Device::Cpu).unwrap();
    let io =
        candle_core::safetensors::load(dir.join("resnet_io.safetensors"), &Device::Cpu).unwrap();
    let x = io["input"].clone();
    let y = model.forward(std::slice::from_ref(&x), Mode::Eval).unwrap();
    let diff = max_abs_diff(&y[0], &io["output"]);
    // The features before the classifier, where a wrong conversion cannot hide in a
    // saturated softmax.
    let flatten = model.get_layer("flatten").unwrap().output().unwrap();
    let features = Model::new(model.inputs(), &[flatten]).unwrap();
    let f = features.forward(&[x], Mode::Eval).unwrap();
    let feature_diff = max_abs_diff(&f[0], &io["flatten"]);
    let scale = common::max_abs(&io["flatten"]);
    println!(
        "article ResNet imported from Keras: max abs difference {diff:e} (softmax output), \
         {feature_diff:e} (flatten features, largest |value| {scale:.3})"
    );
    assert!(diff <= TOLERANCE, "max abs diff {diff}");
    assert!(
        feature_diff <= TOLERANCE * scale.max(1.0),
        "features: max abs diff {feature_diff}"
    );
}

/// keras.applications' MobileNetV2 and ResNet50 saved by Keras (10 and 95 MB, not committed):
/// `scripts/keras_reference.py keras-applications DIR`, then
/// `CANDLE_FUNCTIONAL_KERAS_APPS=DIR cargo test --release --test keras_import -- --ignored`.
#[test]
#[ignore = "needs keras.applications models saved by Keras: CANDLE_FUNCTIONAL_KERAS_APPS=DIR"]
fn keras_import_applications() {
    let dir = PathBuf::from(
        std::env::var("CANDLE_FUNCTIONAL_KERAS_APPS")
            .expect("set CANDLE_FUNCTIONAL_KERAS_APPS to the keras-applications output folder"),
    );
    for name in ["mobilenetv2", "resnet50"] {
        let model = Model::from_keras(dir.join(format!("{name}.keras")), &Device::Cpu).unwrap();
        let io = candle_core::safetensors::load(
            dir.join(format!("{name}_io.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let y = model.forward(&[io["input"].clone()], Mode::Eval).unwrap();
        let diff = max_abs_diff(&y[0], &io["output"]);
        let scale = common::max_abs(&io["output"]);
        println!(
            "{name}: {} layers imported, max abs difference {diff:e} (largest |logit| {scale:.3})",
            model.layers().len()
        );
        assert!(
            diff <= TOLERANCE * scale.max(1.0),
            "{name}: max abs diff {diff}"
        );
    }
}

#[test]
fn a_nested_functional_model_called_twice_imports_with_shared_weights() {
    let model = assert_matches_keras("nested", 2, 1);
    let names: Vec<String> = model
        .weights()
        .unwrap()
        .iter()
        .map(|w| w.name().to_string())
        .collect();
    assert!(names.contains(&"base.conv.kernel".to_string()), "{names:?}");
    assert!(
        names.contains(&"base.bn.moving_variance".to_string()),
        "{names:?}"
    );
    assert_eq!(model.get_layer("base").unwrap().calls(), 2);
}

#[test]
fn merges_reshape_permute_and_flattened_maps_merged_match_keras() {
    let model = assert_matches_keras("more", 3, 2);
    // Two channels-last Flatten outputs, merged element-wise and normalized, reach the Dense
    // `mix` in Keras's (h, w, c) order: its kernel rows were reordered on import.
    assert!(model.get_layer("sub_flat").is_ok() && model.get_layer("mix").is_ok());
}

#[test]
fn a_shared_dense_reading_two_feature_orders_matches_keras() {
    // `shared` is a Dense called on a channels-last Flatten's output and on a plain vector:
    // one kernel cannot follow both orders (this was refused), so the Flatten takes the
    // exact translation and the kernel stays as Keras has it.
    let model = assert_matches_keras("mixed_orders", 2, 1);
    assert!(model.get_layer("flat_to_hwc").is_ok());
}

/// The fixtures `assert_matches_keras` compares with Keras's outputs.
const CHECKED_FIXTURES: &[&str] = &[
    "cnn",
    "blocks",
    "nested",
    "more",
    "mixed_orders",
    "flatten_concat",
    "nested_sequential",
    "sequential",
    "augment",
    "embedding",
];

/// Every layer class in a `.keras` file's architecture, nested models included.
fn keras_classes_in(path: &Path) -> std::collections::BTreeSet<String> {
    fn walk(value: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                // A layer: called in a functional graph (`inbound_nodes`), or stacked in a
                // Sequential (its `module` is Keras's layers).
                let is_layer = map.contains_key("inbound_nodes")
                    || map.get("module").and_then(|m| m.as_str()) == Some("keras.layers");
                if let (Some(class), true) =
                    (map.get("class_name").and_then(|c| c.as_str()), is_layer)
                {
                    out.insert(class.to_string());
                }
                map.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let file = std::fs::File::open(path).unwrap();
    let mut archive = zip::ZipArchive::new(file).unwrap();
    let config: serde_json::Value =
        serde_json::from_reader(archive.by_name("config.json").unwrap()).unwrap();
    let mut out = std::collections::BTreeSet::new();
    walk(&config, &mut out);
    out
}

#[test]
fn every_keras_class_the_importer_translates_is_checked_against_keras() {
    let mut checked = std::collections::BTreeSet::new();
    for name in CHECKED_FIXTURES {
        checked.extend(keras_classes_in(&fixture(&format!(
            "keras_import_{name}.keras"
        ))));
    }
    // The scan sees the layers (and only layers: not initializers or dtype policies).
    assert!(checked.contains("Conv2D") && checked.contains("InputLayer"));
    assert!(!checked.contains("GlorotUniform"));
    let translated = Model::keras_classes();
    assert!(translated.len() >= 29, "{translated:?}");
    let unchecked: Vec<_> = translated
        .iter()
        .filter(|class| !checked.contains(**class))
        .collect();
    assert!(
        unchecked.is_empty(),
        "translated but in no fixture compared with Keras: {unchecked:?} (add them to a \
         model in scripts/keras_reference.py keras-import)"
    );
}

//! The one-list rule, checked: every public layer of `src/layers` has a `LayerKind` in
//! `layers::builtin_kinds`, and every kind's example saves, loads and gives the same outputs
//! (weights and statistics made random first, so a weight that is not saved or not loaded
//! shows). Whether each Keras class imports to Keras's outputs is checked against Keras's
//! own fixtures in `tests/keras_import.rs`.

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Device, Tensor};

use crate::graph::symbolic::record_call;
use crate::graph::{Input, LayerRef, Mode};
use crate::layers::builtin_kinds;
use crate::models::{LayerRegistry, Model};

/// Public layers that have no kind, and why.
const NOT_SAVEABLE: &[(&str, &str)] = &[(
    "Lambda",
    "holds a Rust closure; Model::save names it and refuses",
)];

/// The public layer types: each `X` that `layers/mod.rs` re-exports together with `XConfig`.
fn public_layers() -> BTreeSet<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/layers/mod.rs"))
        .expect("src/layers/mod.rs is readable");
    let mut names = BTreeSet::new();
    for statement in text
        .split(';')
        .filter(|s| s.trim_start().starts_with("pub use"))
    {
        let list = statement
            .split_once('{')
            .map_or(statement, |(_, rest)| rest);
        for item in list.split([',', '}', ' ', '\n']) {
            let item = item.rsplit("::").next().unwrap_or(item).trim();
            if !item.is_empty() {
                names.insert(item.to_string());
            }
        }
    }
    names
        .iter()
        .filter(|n| names.contains(&format!("{n}Config")))
        .cloned()
        .collect()
}

#[test]
fn every_public_layer_has_a_kind_in_the_one_list() {
    let layers = public_layers();
    // The scan itself works: it finds layers of several files.
    for known in ["Conv2D", "Dense", "Add", "MaxPooling2D", "Lambda"] {
        assert!(layers.contains(known), "{known} not found in {layers:?}");
    }
    let kinds: Vec<&str> = builtin_kinds().map(|k| k.rust_type()).collect();
    for layer in &layers {
        let has_kind = kinds
            .iter()
            .any(|t| t.rsplit("::").next() == Some(&format!("{layer}Config")));
        let excused = NOT_SAVEABLE.iter().any(|(name, _)| name == layer);
        assert!(
            has_kind != excused,
            "layer {layer}: {}",
            if has_kind {
                "listed as not saveable, but it has a kind"
            } else {
                "no LayerKind lists its config: add one to its file's KINDS (and the file's \
                 KINDS to layers::BUILTIN_KINDS), or Model::load cannot make it"
            }
        );
    }
    // Type names are unique: the registry keys on them.
    let mut names = BTreeSet::new();
    for kind in builtin_kinds() {
        assert!(names.insert(kind.type_name()), "{} twice", kind.type_name());
        assert!(LayerRegistry::new().contains(kind.type_name()));
    }
}

#[test]
fn every_kind_saves_loads_and_gives_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::Cpu;
    for (k, kind) in builtin_kinds().enumerate() {
        let example = kind.example();
        let name = kind.type_name();
        assert_eq!(example.op.type_name(), name, "the example of {name}");
        let inputs: Vec<_> = example
            .inputs
            .iter()
            .map(|s| Input::new(s.clone()))
            .collect();
        let layer = LayerRef::new(example.op.clone(), Some("layer".into()), Vec::new());
        let outputs = record_call(&layer, &inputs).unwrap();
        let model = Model::new(&inputs, &outputs)
            .unwrap()
            .build(&device, DType::F32, k as u64)
            .unwrap();
        // Random weights (positive, for variances), so that none can match by default.
        let random: HashMap<String, Tensor> = model
            .weight_map()
            .unwrap()
            .into_iter()
            .map(|(n, w)| {
                let r = Tensor::rand(0.5f32, 1.5, w.shape(), &device).unwrap();
                (n, r)
            })
            .collect();
        model.set_weights(&random).unwrap();
        let xs: Vec<Tensor> = example
            .inputs
            .iter()
            .map(|s| {
                let mut shape = vec![2];
                shape.extend(s);
                Tensor::randn(0f32, 1.0, shape, &device).unwrap()
            })
            .collect();
        let want = model.forward(&xs, Mode::Eval).unwrap();

        let path = dir.path().join(format!("{name}.safetensors"));
        model.save(&path).unwrap();
        let loaded =
            Model::load(&path, &device).unwrap_or_else(|e| panic!("{name} does not load: {e}"));
        assert_eq!(
            loaded.layer("layer").map(|l| l.op().type_name()),
            Some(name)
        );
        assert_eq!(
            loaded.layer("layer").and_then(|l| l.op().to_config()),
            example.op.to_config(),
            "{name}: the config changed on the way"
        );
        let got = loaded.forward(&xs, Mode::Eval).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(values(g), values(w), "{name}: outputs differ after load");
        }
    }
}

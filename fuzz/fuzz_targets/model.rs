//! Any text as a saved architecture: an error or a model, never a panic.
#![no_main]

use candle_functional::prelude::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(json) = std::str::from_utf8(data) {
        let _ = Model::from_json(json);
    }
});

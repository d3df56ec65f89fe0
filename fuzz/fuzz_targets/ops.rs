//! Any bytes as one call of a public op or layer: every dtype, empty axes, NaN and
//! infinities, geometries up to `usize::MAX`. An error or a result, never a panic, an abort or
//! a crash. The cases are `tests/common/ops_cases.rs`, which `tests/ops_sweep.rs` also runs
//! as a seeded sweep in `cargo test`.
#![no_main]

#[path = "../../tests/common/ops_cases.rs"]
mod ops_cases;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ops_cases::run_case(data);
});

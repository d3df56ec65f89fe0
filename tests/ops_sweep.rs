//! The ops fuzz target's cases, as a deterministic seeded sweep on stable Rust: every public
//! op, every dtype, empty axes, NaN and infinities, geometries up to `usize::MAX`
//! (`tests/common/ops_cases.rs`). Each case may be refused; none may panic, and an abort or
//! a crash would end this test's process. `fuzz/` runs the same cases under libFuzzer.

#[path = "common/ops_cases.rs"]
mod ops_cases;

use ops_cases::{Outcome, run_case};

/// SplitMix64: the cases' bytes, the same on every run.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// The number of cases: `OPS_SWEEP_CASES`, 50,000 by default.
fn case_count() -> u64 {
    std::env::var("OPS_SWEEP_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
}

#[test]
fn fifty_thousand_hostile_op_calls_never_panic() {
    // `OPS_SWEEP_SEED=n` runs case n alone, outside `catch_unwind`, for its backtrace.
    let only: Option<u64> = std::env::var("OPS_SWEEP_SEED")
        .ok()
        .and_then(|v| v.parse().ok());
    let cases = case_count();
    let mut counts = [0usize; 4];
    let mut panics = Vec::new();
    for seed in only.map_or(0..cases, |s| s..s + 1) {
        let data = bytes(seed, 96);
        let result = match only {
            Some(_) => Ok(run_case(&data)),
            None => std::panic::catch_unwind(|| run_case(&data)),
        };
        match result {
            Ok(outcome) => {
                counts[match outcome {
                    Outcome::Ran => 0,
                    Outcome::Refused => 1,
                    Outcome::NotBuilt => 2,
                    Outcome::TooLarge => 3,
                }] += 1
            }
            Err(_) => panics.push(seed),
        }
    }
    eprintln!(
        "{} cases: {} ran, {} refused, {} not built (dtype candle cannot make), {} too large to run",
        counts.iter().sum::<usize>() + panics.len(),
        counts[0],
        counts[1],
        counts[2],
        counts[3]
    );
    assert!(panics.is_empty(), "cases that panicked (seeds): {panics:?}");
    if only.is_none() {
        // The sweep must reach the kernels, not only their checks.
        let floor = (cases / 20) as usize;
        assert!(counts[0] > floor, "only {} cases ran", counts[0]);
        assert!(counts[1] > floor, "only {} cases were refused", counts[1]);
    }
}

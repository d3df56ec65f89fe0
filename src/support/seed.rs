//! Seed mixing: every random draw of the crate (initial weights, dropout masks, shuffling,
//! augmentation) is a function of a user seed and a counter, so runs are reproducible and a
//! checkpoint that stores the counters resumes exactly.

/// SplitMix64 of two words: independent seeds for each call, step, epoch or layer.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a string: a stable key for names (a layer's generator does not change when other
/// layers are added to the model).
pub(crate) fn hash_name(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

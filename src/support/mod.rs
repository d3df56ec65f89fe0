//! Small helpers every floor of the crate uses, kept at the bottom so that none of them has to
//! import from a floor above it: seed mixing for reproducible randomness, and safe file
//! writes (temporary file, fsync, rename) with safetensors (de)serialization, and sizes
//! computed from user input, checked before anything is allocated.

pub(crate) mod dtype;
pub(crate) mod files;
pub(crate) mod seed;
pub(crate) mod sizes;

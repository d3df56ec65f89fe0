//! The one check behind every strict weight load: given tensors against the weights a model
//! expects, by name, shape and dtype, every problem listed at once.

use std::collections::HashSet;

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Checks `given` against the weights `expected` (name, current value): every one given, with
/// its shape, a float tensor for a float weight, and no other name. Changes nothing; the error
/// lists every problem, naming `source`. The one check behind every strict weight load.
pub(crate) fn check_named_weights<'a>(
    expected: impl Iterator<Item = (&'a str, &'a Tensor)>,
    given: &std::collections::HashMap<String, Tensor>,
    source: &str,
) -> Result<()> {
    check_named_shapes(
        expected.map(|(name, t)| (name.to_string(), t.dims().to_vec(), t.dtype().is_float())),
        given,
        source,
    )
}

/// Whether a float weight can take values stored as `dtype`: the float dtypes candle
/// converts from (not integers, and not the packed F4, F6 and F8_E8M0 formats, which candle
/// reads but cannot convert).
pub(crate) fn loadable_float(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::F8E4M3
    )
}

/// [`check_named_weights`] against shapes alone: `(name, shape, is a float weight)`, for
/// checking a file against a model that is not built yet (nothing allocated for a file that
/// does not fit).
pub(crate) fn check_named_shapes(
    expected: impl Iterator<Item = (String, Vec<usize>, bool)>,
    given: &std::collections::HashMap<String, Tensor>,
    source: &str,
) -> Result<()> {
    let (mut missing, mut mis_shaped, mut mis_typed) = (Vec::new(), Vec::new(), Vec::new());
    let mut known = HashSet::new();
    for (name, shape, is_float) in expected {
        match given.get(&name) {
            None => missing.push(name.clone()),
            Some(t) if t.dims() != shape.as_slice() => {
                mis_shaped.push((name.clone(), shape, t.dims().to_vec()))
            }
            // An integer tensor would be cast silently (an I64 bias of 4.3e18), and the
            // packed 4- and 6-bit formats cannot be converted at all.
            Some(t) if is_float && !loadable_float(t.dtype()) => {
                mis_typed.push((name.clone(), format!("{:?}", t.dtype())))
            }
            Some(_) => {}
        }
        known.insert(name);
    }
    let mut unexpected: Vec<String> = given
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    unexpected.sort();
    if missing.is_empty() && unexpected.is_empty() && mis_shaped.is_empty() && mis_typed.is_empty()
    {
        return Ok(());
    }
    Err(Error::WeightsMismatch {
        source_name: source.into(),
        missing,
        unexpected,
        mis_shaped,
        mis_typed,
    })
}

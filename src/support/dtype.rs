//! Dtype conversion that cannot hang: candle 0.11.1's CPU conversion from `F8E4M3` to `F64`
//! calls itself forever (its closure's `v.to_f64()` resolves to the `WithDType` trait method
//! it is implementing, not to the float8 method), so every conversion in the crate goes
//! through [`Cast::cast`], which takes `F8E4M3` to `F64` by way of `F32`. Every `F8E4M3`
//! value is exact in `F32`, so the result is the same as a direct conversion would be.

use candle_core::{DType, Tensor};

/// [`Tensor::to_dtype`] without candle's endless `F8E4M3` to `F64` conversion.
pub(crate) trait Cast {
    /// `self` in `dtype` (differentiable, like [`Tensor::to_dtype`]).
    fn cast(&self, dtype: DType) -> candle_core::Result<Tensor>;
}

impl Cast for Tensor {
    fn cast(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match (self.dtype(), dtype) {
            (DType::F8E4M3, DType::F64) => self.to_dtype(DType::F32)?.to_dtype(DType::F64),
            _ => self.to_dtype(dtype),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn f8e4m3_values_reach_f64_exactly() -> candle_core::Result<()> {
        let values = [0.0f32, 1.0, -0.5, 448.0, 0.001953125];
        let f8 = Tensor::new(&values, &Device::Cpu)?.to_dtype(DType::F8E4M3)?;
        let f64s = f8.cast(DType::F64)?.to_vec1::<f64>()?;
        let expected: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
        assert_eq!(f64s, expected);
        Ok(())
    }
}

//! `Normalization::adapt`: the statistics of a preprocessing layer learnt from any
//! [`Dataset`] (Keras's `layer.adapt(data)`). Here rather than beside the layer because it
//! reads a data set, which lives on a floor above the layers.

use candle_core::Tensor;

use crate::data::Dataset;
use crate::layers::normalization::axis_statistics;
use crate::layers::{Normalization, channel_axis};
use crate::{Error, Result};

impl Normalization {
    /// Keras's `layer.adapt(data)`: the mean and (population) variance of every index of
    /// the layer's axis over all samples of input `input` of `data` (every other axis
    /// reduced; one pass, sums in f64 on the data's device). Returns the layer with them as
    /// its statistics (a new layer: adapt before calling it).
    ///
    /// # Examples
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_functional::data::TensorDataset;
    /// use candle_functional::layers::Normalization;
    /// // Two channels of 1x1 images: channel 0 holds 1, 3; channel 1 holds 10, 10.
    /// let x = Tensor::new(&[[[[1f32]], [[10.0]]], [[[3.0]], [[10.0]]]], &Device::Cpu)?;
    /// let data = TensorDataset::new(vec![x], vec![], 1)?;
    /// let norm = Normalization::default().adapt(&data, 0)?;
    /// assert_eq!(norm.config().mean, Some(vec![2.0, 10.0]));
    /// assert_eq!(norm.config().variance, Some(vec![1.0, 0.0]));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn adapt(self, data: &dyn Dataset, input: usize) -> Result<Self> {
        let mut sums: Option<(Tensor, Tensor)> = None;
        let mut count = 0usize;
        for batch in data.batches(0) {
            let batch = batch?;
            let x = batch.inputs.get(input).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "Normalization::adapt: input {input} of a data set with {} input(s)",
                    batch.inputs.len()
                ))
            })?;
            if x.rank() < 2 {
                return Err(Error::InvalidArgument(
                    "Normalization::adapt: samples need at least one axis besides the batch".into(),
                ));
            }
            let axis = channel_axis("normalization", self.config().axis, x.rank() - 1)?;
            let (sum, squares, n) = axis_statistics(x, axis)?;
            sums = Some(match sums {
                None => (sum, squares),
                Some((s, q)) => ((s + sum)?, (q + squares)?),
            });
            count += n;
        }
        let (sum, squares) = match sums {
            Some(sums) if count > 0 => sums,
            _ => {
                return Err(Error::InvalidArgument(
                    "Normalization::adapt: the data set has no samples".into(),
                ));
            }
        };
        let mean: Vec<f64> = (sum / count as f64)?.to_vec1()?;
        let mean_square: Vec<f64> = (squares / count as f64)?.to_vec1()?;
        let variance: Vec<f64> = mean
            .iter()
            .zip(&mean_square)
            .map(|(m, s)| (s - m * m).max(0.0))
            .collect();
        Ok(self.with_config(|c| {
            c.mean = Some(mean);
            c.variance = Some(variance);
        }))
    }
}

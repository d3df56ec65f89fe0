//! Weights before they exist: a [`ParamSpec`] (name, shape, initializer, trainable) and the
//! [`Initializer`]s, with Keras's definitions and defaults.
//!
//! Values are drawn on the host from a generator seeded per layer, then copied to the device
//! once at build time, so a seed gives the same weights on every device.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, StandardNormal};

use crate::Result;
use crate::support::seed::{hash_name, mix};

/// One weight tensor a layer needs, described before it exists.
///
/// # Examples
/// ```
/// use candle_functional::{Initializer, ParamSpec};
/// let spec = ParamSpec::new("bias", vec![10], Initializer::Zeros);
/// assert!(spec.trainable());
/// assert_eq!(spec.numel(), 10);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    name: String,
    shape: Vec<usize>,
    init: Initializer,
    trainable: bool,
    fans: (usize, usize),
}

impl ParamSpec {
    /// A trainable parameter whose fans (for Glorot/He initializers) are taken from a
    /// `[fan_in, fan_out]`-like shape; use [`ParamSpec::fans`] to set them explicitly.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Initializer, ParamSpec};
    /// let k = ParamSpec::new("kernel", vec![4, 3], Initializer::GlorotUniform);
    /// assert_eq!(k.fan_in_out(), (4, 3));
    /// ```
    pub fn new(name: impl Into<String>, shape: Vec<usize>, init: Initializer) -> Self {
        let fans = match shape.as_slice() {
            [] => (1, 1),
            [n] => (*n, *n),
            [a, b, ..] => (*a, *b),
        };
        Self {
            name: name.into(),
            shape,
            init,
            trainable: true,
            fans,
        }
    }

    /// Marks the tensor as non-trainable state (BatchNorm's moving statistics): it is saved
    /// and loaded with the weights, but never handed to an optimizer.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Initializer, ParamSpec};
    /// let s = ParamSpec::new("moving_mean", vec![8], Initializer::Zeros).non_trainable();
    /// assert!(!s.trainable());
    /// ```
    pub fn non_trainable(mut self) -> Self {
        self.trainable = false;
        self
    }

    /// Sets the fan-in and fan-out used by variance-scaling initializers.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{Initializer, ParamSpec};
    /// let k = ParamSpec::new("kernel", vec![8, 3, 3, 3], Initializer::GlorotUniform).fans(27, 72);
    /// assert_eq!(k.fan_in_out(), (27, 72));
    /// ```
    pub fn fans(mut self, fan_in: usize, fan_out: usize) -> Self {
        self.fans = (fan_in, fan_out);
        self
    }

    /// The parameter's short name (`kernel`, `bias`, `gamma`, ...).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// assert_eq!(ParamSpec::new("bias", vec![2], Initializer::Zeros).name(), "bias");
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor's shape.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// assert_eq!(ParamSpec::new("bias", vec![2], Initializer::Zeros).shape(), &[2]);
    /// ```
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// How the tensor is filled when the model is built.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// let s = ParamSpec::new("bias", vec![2], Initializer::Zeros);
    /// assert_eq!(s.initializer(), &Initializer::Zeros);
    /// ```
    pub fn initializer(&self) -> &Initializer {
        &self.init
    }

    /// Whether an optimizer updates it.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// assert!(ParamSpec::new("bias", vec![2], Initializer::Zeros).trainable());
    /// ```
    pub fn trainable(&self) -> bool {
        self.trainable
    }

    /// `(fan_in, fan_out)` for variance-scaling initializers.
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// assert_eq!(ParamSpec::new("k", vec![5, 7], Initializer::Zeros).fan_in_out(), (5, 7));
    /// ```
    pub fn fan_in_out(&self) -> (usize, usize) {
        self.fans
    }

    /// Number of scalars (`usize::MAX` for a shape too large to count).
    ///
    /// # Examples
    /// ```
    /// # use candle_functional::{Initializer, ParamSpec};
    /// assert_eq!(ParamSpec::new("k", vec![5, 7], Initializer::Zeros).numel(), 35);
    /// ```
    pub fn numel(&self) -> usize {
        // Saturating: a configured shape may be too large to count (it is refused at build).
        self.shape.iter().fold(1usize, |n, &d| n.saturating_mul(d))
    }
}

/// How a weight is filled when a model is built.
///
/// # Examples
/// ```
/// use candle_functional::Initializer;
/// assert_eq!(Initializer::default(), Initializer::GlorotUniform);
/// ```
#[derive(Clone, Debug, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Initializer {
    /// Keras's default kernel initializer: uniform in `±sqrt(6 / (fan_in + fan_out))`.
    #[default]
    GlorotUniform,
    /// Truncated normal (at two standard deviations) with variance `2 / (fan_in + fan_out)`.
    GlorotNormal,
    /// Keras's `he_normal`: truncated normal with variance `2 / fan_in`.
    HeNormal,
    /// Uniform in `±sqrt(6 / fan_in)`.
    HeUniform,
    /// All zeros (Keras's default bias).
    Zeros,
    /// All ones.
    Ones,
    /// Every element the same value.
    Constant(f64),
    /// Normal with this mean and standard deviation.
    RandomNormal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        stddev: f64,
    },
    /// Uniform in `[min, max)`.
    RandomUniform {
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
    },
}

/// Keras's truncated normal is cut at two standard deviations, which shrinks its variance:
/// it divides the wanted standard deviation by this factor to compensate.
const TRUNCATED_NORMAL_STDDEV_FACTOR: f64 = 0.879_625_661_034_239_8;

impl Initializer {
    /// Draws a tensor for `spec` on `device` (as f32; the caller converts the dtype).
    ///
    /// # Examples
    /// ```
    /// use candle_core::Device;
    /// use candle_functional::{Initializer, ParamSpec};
    /// use rand::SeedableRng;
    /// let spec = ParamSpec::new("b", vec![3], Initializer::Ones);
    /// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    /// let t = Initializer::Ones.sample(&spec, &mut rng, &Device::Cpu)?;
    /// assert_eq!(t.to_vec1::<f32>()?, [1.0, 1.0, 1.0]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn sample(&self, spec: &ParamSpec, rng: &mut StdRng, device: &Device) -> Result<Tensor> {
        let n = spec.numel();
        let (fan_in, fan_out) = spec.fan_in_out();
        let (fan_in, fan_out) = (fan_in.max(1) as f64, fan_out.max(1) as f64);
        let values: Vec<f32> = match self {
            Initializer::GlorotUniform => uniform(rng, n, (6.0 / (fan_in + fan_out)).sqrt()),
            Initializer::HeUniform => uniform(rng, n, (6.0 / fan_in).sqrt()),
            Initializer::GlorotNormal => {
                truncated_normal(rng, n, (2.0 / (fan_in + fan_out)).sqrt())
            }
            Initializer::HeNormal => truncated_normal(rng, n, (2.0 / fan_in).sqrt()),
            Initializer::Zeros => vec![0.0; n],
            Initializer::Ones => vec![1.0; n],
            Initializer::Constant(c) => vec![*c as f32; n],
            Initializer::RandomNormal { mean, stddev } => {
                let normal =
                    Normal::new(*mean, *stddev).unwrap_or(Normal::new(0.0, 1.0).expect("valid"));
                (0..n).map(|_| normal.sample(rng) as f32).collect()
            }
            Initializer::RandomUniform { min, max } => (0..n)
                .map(|_| (min + (max - min) * rng.random::<f64>()) as f32)
                .collect(),
        };
        Ok(Tensor::from_vec(values, spec.shape(), device)?)
    }
}

fn uniform(rng: &mut StdRng, n: usize, limit: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (limit * (2.0 * rng.random::<f64>() - 1.0)) as f32)
        .collect()
}

/// Normal samples redrawn until within two standard deviations, scaled so the result has the
/// requested standard deviation (Keras's `VarianceScaling(distribution="truncated_normal")`).
fn truncated_normal(rng: &mut StdRng, n: usize, stddev: f64) -> Vec<f32> {
    let scale = stddev / TRUNCATED_NORMAL_STDDEV_FACTOR;
    (0..n)
        .map(|_| {
            loop {
                let z: f64 = StandardNormal.sample(rng);
                if z.abs() <= 2.0 {
                    break (z * scale) as f32;
                }
            }
        })
        .collect()
}

/// A generator for one layer: keyed by the model seed and the layer's name, so a layer's
/// initial weights do not change when other layers are added to the model.
pub(crate) fn layer_rng(seed: u64, layer_name: &str) -> StdRng {
    StdRng::seed_from_u64(mix(seed, hash_name(layer_name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glorot_uniform_stays_in_its_limit_and_has_its_variance() {
        let spec = ParamSpec::new("k", vec![200, 300], Initializer::GlorotUniform);
        let mut rng = StdRng::seed_from_u64(1);
        let t = Initializer::GlorotUniform
            .sample(&spec, &mut rng, &Device::Cpu)
            .unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let limit = (6.0f32 / 500.0).sqrt();
        assert!(v.iter().all(|x| x.abs() <= limit));
        let var: f32 = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
        // Uniform(-l, l) has variance l^2 / 3 = 2 / (fan_in + fan_out).
        approx::assert_relative_eq!(var, 2.0 / 500.0, max_relative = 0.02);
    }

    #[test]
    fn he_normal_is_truncated_with_the_right_variance() {
        let spec = ParamSpec::new("k", vec![100, 400], Initializer::HeNormal);
        let mut rng = StdRng::seed_from_u64(2);
        let t = Initializer::HeNormal
            .sample(&spec, &mut rng, &Device::Cpu)
            .unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let std = (2.0f64 / 100.0).sqrt();
        let cut = (2.0 * std / TRUNCATED_NORMAL_STDDEV_FACTOR) as f32 + 1e-6;
        assert!(v.iter().all(|x| x.abs() <= cut));
        let var: f64 = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64;
        approx::assert_relative_eq!(var, std * std, max_relative = 0.03);
    }

    #[test]
    fn same_seed_and_name_give_the_same_values() {
        let spec = ParamSpec::new("k", vec![10], Initializer::GlorotUniform);
        let draw = |name: &str| {
            Initializer::GlorotUniform
                .sample(&spec, &mut layer_rng(3, name), &Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(draw("conv2d"), draw("conv2d"));
        assert_ne!(draw("conv2d"), draw("conv2d_1"));
    }
}

//! `RandomFlip`: Keras's augmentation layer that mirrors images at random while training
//! (each image, each allowed axis, with probability ½) and passes them through unchanged
//! otherwise. The draws come from the seed the model gives each node and forward call (as
//! Dropout's do), so a run is reproducible and resumes exactly; the flip itself runs on the
//! device (one index select and one select per axis) and is differentiable.

use std::str::FromStr;

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Result;
use crate::graph::{Configured, LayerOp, Params};
use crate::layers::keras::{KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::{expect_chw, one_input};

/// Which axes [`RandomFlip`] may mirror (Keras's `mode`).
///
/// # Examples
/// ```
/// use candle_functional::layers::FlipMode;
/// assert_eq!(FlipMode::default(), FlipMode::HorizontalAndVertical);
/// assert_eq!("horizontal".parse::<FlipMode>(), Ok(FlipMode::Horizontal));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlipMode {
    /// Left-right (the width axis).
    Horizontal,
    /// Top-bottom (the height axis).
    Vertical,
    /// Both, each drawn on its own (Keras's default).
    #[default]
    HorizontalAndVertical,
}

impl FromStr for FlipMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "horizontal" => Ok(FlipMode::Horizontal),
            "vertical" => Ok(FlipMode::Vertical),
            "horizontal_and_vertical" => Ok(FlipMode::HorizontalAndVertical),
            other => Err(format!("flip mode `{other}`")),
        }
    }
}

/// Config of a [`RandomFlip`] layer.
///
/// # Examples
/// ```
/// use candle_functional::layers::{FlipMode, RandomFlipConfig};
/// assert_eq!(RandomFlipConfig::default().mode, FlipMode::HorizontalAndVertical);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RandomFlipConfig {
    /// The axes it may mirror.
    pub mode: FlipMode,
}

/// Mirrors each image of a batch at random in training (Keras's `RandomFlip`); the identity
/// in inference.
///
/// # Shapes
/// Input and output `(batch, c, h, w)`.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// use candle_functional::layers::{FlipMode, RandomFlip};
/// let x = Input::new([1, 2, 2]);
/// let y = RandomFlip::new(FlipMode::Horizontal).call(&x)?;
/// let model = Model::new(&[x], &[y])?.build(&Device::Cpu, DType::F32, 0)?;
/// let image = Tensor::new(&[[[[1f32, 2.0], [3.0, 4.0]]]], &Device::Cpu)?;
/// // Inference: unchanged. Training: each image as it is or mirrored left-right.
/// assert_eq!(model.forward(&[image.clone()], Mode::Eval)?[0].flatten_all()?.to_vec1::<f32>()?, [1.0, 2.0, 3.0, 4.0]);
/// let out = model.forward(&[image], Mode::Train)?[0].flatten_all()?.to_vec1::<f32>()?;
/// assert!(out == [1.0, 2.0, 3.0, 4.0] || out == [2.0, 1.0, 4.0, 3.0]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type RandomFlip = Configured<RandomFlipConfig>;

impl RandomFlip {
    /// Flips along the axes of `mode`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::{FlipMode, RandomFlip};
    /// assert_eq!(RandomFlip::new(FlipMode::Vertical).config().mode, FlipMode::Vertical);
    /// ```
    pub fn new(mode: FlipMode) -> Self {
        Self::from_config(RandomFlipConfig { mode })
    }
}

impl LayerOp for RandomFlipConfig {
    fn type_name(&self) -> &'static str {
        "RandomFlip"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let shape = one_input(layer, inputs)?;
        expect_chw(layer, shape)?;
        Ok(vec![shape.to_vec()])
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        let mut x = inputs[0].clone();
        if !params.mode().is_train() {
            return Ok(vec![x]);
        }
        let batch = x.dim(0)?;
        let mut rng = StdRng::seed_from_u64(params.seed());
        let axes: &[usize] = match self.mode {
            FlipMode::Horizontal => &[3],
            FlipMode::Vertical => &[2],
            FlipMode::HorizontalAndVertical => &[3, 2],
        };
        for &axis in axes {
            let flips: Vec<u8> = (0..batch).map(|_| u8::from(rng.random::<bool>())).collect();
            if !flips.contains(&1) {
                continue;
            }
            let size = x.dim(axis)?;
            let reversed: Vec<u32> = (0..size as u32).rev().collect();
            let index = Tensor::from_vec(reversed, size, x.device())?;
            let mirrored = x.index_select(&index, axis)?;
            let mask = Tensor::from_vec(flips, (batch, 1, 1, 1), x.device())?
                .to_dtype(DType::U8)?
                .broadcast_as(x.shape())?;
            x = mask.where_cond(&mirrored, &x)?;
        }
        Ok(vec![x])
    }
}

pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<RandomFlipConfig>(|| {
    LayerExample::new(&RandomFlip::new(FlipMode::Horizontal), &[&[3, 4, 4]])
})
.keras(&[KerasClass::new("RandomFlip", random_flip_from_keras)])];

fn random_flip_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    Translated::new(
        "RandomFlip",
        RandomFlipConfig {
            mode: layer.named("mode")?,
        },
    )
}

//! `Embedding`: Keras's lookup table from integer ids to learned vectors, the first layer of
//! models over tokens, categories or any other ids. Its input keeps its integer dtype
//! (`LayerOp::reads_indices`), so ids pass through exactly whatever the model computes in.

use candle_core::{DType, Tensor};

use crate::graph::{Configured, Initializer, LayerOp, ParamSpec, Params};
use crate::layers::keras::{Convert, KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::one_input;
use crate::{Error, Result};

/// Config of an [`Embedding`] layer; defaults are Keras's (`uniform` in ±0.05).
///
/// # Examples
/// ```
/// use candle_functional::layers::{EmbeddingConfig, Initializer};
/// let c = EmbeddingConfig::default();
/// assert_eq!(c.embeddings_initializer, Initializer::RandomUniform { min: -0.05, max: 0.05 });
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EmbeddingConfig {
    /// How many ids there are: ids run over `0..input_dim`.
    pub input_dim: usize,
    /// The length of each id's vector.
    pub output_dim: usize,
    /// How the table starts.
    pub embeddings_initializer: Initializer,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        Self {
            input_dim: 0,
            output_dim: 0,
            embeddings_initializer: Initializer::RandomUniform {
                min: -0.05,
                max: 0.05,
            },
        }
    }
}

/// Each id of the input replaced by its row of a learned `(input_dim, output_dim)` table
/// (Keras's `Embedding`). Ids may come as `u8`, `u32` or `i64` tensors (kept as they are) or
/// as whole floats; an id outside `0..input_dim` is an error (on the CPU).
///
/// # Shapes
/// Input `(batch, ...)` of ids; output `(batch, ..., output_dim)`.
///
/// # Examples
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_functional::prelude::*;
/// let ids = Input::new([4]);                       // four ids per sample
/// let vectors = Embedding::new(100, 8).call(&ids)?; // (4, 8) per sample
/// let score = Dense::new(1).call(&Flatten::new().call(&vectors)?)?;
/// let model = Model::new(&[ids], &[score])?.build(&Device::Cpu, DType::F32, 0)?;
/// let batch = Tensor::new(&[[3u32, 14, 15, 92], [6, 5, 3, 5]], &Device::Cpu)?;
/// assert_eq!(model.forward(&[batch], Mode::Eval)?[0].dims(), &[2, 1]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Embedding = Configured<EmbeddingConfig>;

impl Embedding {
    /// A table of `input_dim` ids to vectors of `output_dim`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Embedding::new(1000, 64).config().output_dim, 64);
    /// ```
    pub fn new(input_dim: usize, output_dim: usize) -> Self {
        Self::from_config(EmbeddingConfig {
            input_dim,
            output_dim,
            ..Default::default()
        })
    }

    /// How the table starts.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let e = Embedding::new(10, 4).embeddings_initializer(Initializer::GlorotUniform);
    /// assert_eq!(e.config().embeddings_initializer, Initializer::GlorotUniform);
    /// ```
    pub fn embeddings_initializer(self, init: Initializer) -> Self {
        self.with_config(|c| c.embeddings_initializer = init)
    }
}

impl LayerOp for EmbeddingConfig {
    fn type_name(&self) -> &'static str {
        "Embedding"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn reads_indices(&self) -> bool {
        true
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        if self.input_dim == 0 || self.output_dim == 0 {
            return Err(Error::InvalidConfig {
                layer: layer.to_string(),
                message: format!(
                    "input_dim and output_dim must be positive, got {} and {}",
                    self.input_dim, self.output_dim
                ),
            });
        }
        let mut shape = one_input(layer, inputs)?.to_vec();
        shape.push(self.output_dim);
        Ok(vec![shape])
    }

    fn param_specs(&self, _inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        vec![ParamSpec::new(
            "embeddings",
            vec![self.input_dim, self.output_dim],
            self.embeddings_initializer.clone(),
        )]
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        let ids = &inputs[0];
        // candle's index_select takes u8, u32 and i64 ids; floats are whole ids (Keras casts
        // them to int32 too).
        let ids = match ids.dtype() {
            DType::U8 | DType::U32 | DType::I64 => ids.clone(),
            _ => ids.to_dtype(DType::U32)?,
        };
        let table = params.get("embeddings")?;
        let mut shape = ids.dims().to_vec();
        shape.push(self.output_dim);
        let rows = table
            .index_select(&ids.flatten_all()?, 0)
            .map_err(|e| Error::InvalidInput {
                layer: "Embedding".to_string(),
                message: format!("ids must lie in 0..{} ({e})", self.input_dim),
            })?;
        Ok(vec![rows.reshape(shape)?])
    }
}

/// `Embedding`, saved and imported from Keras's class of that name (its table as it is).
pub(crate) const KINDS: &[LayerKind] =
    &[
        LayerKind::of::<EmbeddingConfig>(|| LayerExample::new(&Embedding::new(6, 3), &[&[4]]))
            .keras(&[KerasClass::new("Embedding", embedding_from_keras)]),
    ];

fn embedding_from_keras(layer: &KerasLayer) -> Translation {
    if layer.flag("mask_zero", false) {
        return Err("mask_zero=True: masks are not supported (no layer here reads one)".into());
    }
    let config = EmbeddingConfig {
        input_dim: layer.int("input_dim")?,
        output_dim: layer.int("output_dim")?,
        ..Default::default()
    };
    Ok(Translated::new("Embedding", config)?.weight("embeddings", 0, Convert::Same))
}

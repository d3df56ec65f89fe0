//! Shape-only layers: [`Flatten`] and [`ZeroPadding2D`].

use candle_core::Tensor;

use crate::graph::{Configured, LayerOp, Params};
use crate::layers::padding::expect_chw;
use crate::{Error, Result};

/// Config of a [`Flatten`] layer (no options).
///
/// # Examples
/// ```
/// let _ = candle_functional::layers::FlattenConfig::default();
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlattenConfig;

/// Flattens every axis but the batch.
///
/// NCHW tensors flatten in `(C, H, W)` order, while Keras's channels-last tensors flatten in
/// `(H, W, C)` order: a Dense kernel after a spatial Flatten needs its rows permuted to be
/// moved between the two (not needed after a 1x1 map, as in the article's head).
///
/// # Shapes
/// Input `(batch, d1, d2, ...)`; output `(batch, d1 * d2 * ...)`.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// assert_eq!(Flatten::new().call(&Input::new([512, 1, 1]))?.shape(), &[512]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Flatten = Configured<FlattenConfig>;

impl Flatten {
    /// A flatten layer.
    ///
    /// # Examples
    /// ```
    /// let _ = candle_functional::layers::Flatten::new();
    /// ```
    pub fn new() -> Self {
        Self::default()
    }
}

impl LayerOp for FlattenConfig {
    fn type_name(&self) -> &'static str {
        "Flatten"
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        match inputs {
            [x] => Ok(vec![vec![x.iter().product()]]),
            _ => Err(Error::InvalidInput {
                layer: layer.to_string(),
                message: format!("takes one input, got {}", inputs.len()),
            }),
        }
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        Ok(vec![inputs[0].flatten_from(1)?])
    }
}

/// Config of a [`ZeroPadding2D`] layer: `((top, bottom), (left, right))` rows and columns.
///
/// # Examples
/// ```
/// let c = candle_functional::layers::ZeroPadding2DConfig::default();
/// assert_eq!(c.padding, ((1, 1), (1, 1)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroPadding2DConfig {
    /// `((top, bottom), (left, right))`.
    pub padding: ((usize, usize), (usize, usize)),
}

impl Default for ZeroPadding2DConfig {
    fn default() -> Self {
        Self {
            padding: ((1, 1), (1, 1)),
        }
    }
}

/// Pads the spatial axes with zeros.
///
/// # Shapes
/// Input `(batch, c, h, w)`; output `(batch, c, h + top + bottom, w + left + right)`.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let y = ZeroPadding2D::new(1).call(&Input::new([3, 32, 32]))?;
/// assert_eq!(y.shape(), &[3, 34, 34]);
/// let z = ZeroPadding2D::asymmetric((1, 0), (0, 2)).call(&Input::new([3, 4, 4]))?;
/// assert_eq!(z.shape(), &[3, 5, 6]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type ZeroPadding2D = Configured<ZeroPadding2DConfig>;

impl ZeroPadding2D {
    /// The same padding on all four sides.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(ZeroPadding2D::new(2).config().padding, ((2, 2), (2, 2)));
    /// ```
    pub fn new(padding: usize) -> Self {
        Self::asymmetric((padding, padding), (padding, padding))
    }

    /// `(top, bottom)` rows and `(left, right)` columns.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let p = ZeroPadding2D::asymmetric((0, 1), (0, 1));
    /// assert_eq!(p.config().padding, ((0, 1), (0, 1)));
    /// ```
    pub fn asymmetric(rows: (usize, usize), cols: (usize, usize)) -> Self {
        Self::from_config(ZeroPadding2DConfig {
            padding: (rows, cols),
        })
    }
}

impl LayerOp for ZeroPadding2DConfig {
    fn type_name(&self) -> &'static str {
        "ZeroPadding2D"
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let [x] = inputs else {
            return Err(Error::InvalidInput {
                layer: layer.to_string(),
                message: format!("takes one input, got {}", inputs.len()),
            });
        };
        let (c, h, w) = expect_chw(layer, x)?;
        let ((t, b), (l, r)) = self.padding;
        Ok(vec![vec![c, h + t + b, w + l + r]])
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let ((t, b), (l, r)) = self.padding;
        Ok(vec![
            inputs[0].pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?,
        ])
    }
}

//! Shape-only layers: [`Flatten`], [`Reshape`], [`Permute`], [`ZeroPadding2D`] and
//! [`Cropping2D`].

use candle_core::Tensor;

use crate::graph::{Configured, LayerOp, Params};
use crate::layers::keras::{FeatureOrder, KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::native_backward::Native;
use crate::layers::padding::{checked_size, element_count, expect_chw, one_input};
use crate::{Error, Result};

/// Config of a [`Flatten`] layer (no options).
///
/// # Examples
/// ```
/// let _ = candle_functional::layers::FlattenConfig::default();
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
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

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        Ok(vec![vec![element_count(layer, one_input(layer, inputs)?)?]])
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        Ok(vec![inputs[0].flatten_from(1)?])
    }

    /// Lets the plan's own backward pass find the layer (`train/tape.rs`).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl FlattenConfig {
    /// The forward pass for the plan's own backward pass (`train/tape.rs`): the output, and
    /// the input's shape, which is all its gradient (the output's, reshaped) needs.
    pub(crate) fn forward_native(&self, x: &Tensor) -> Result<Option<(Tensor, Native)>> {
        let dims = x.dims().to_vec();
        Ok(Some((x.flatten_from(1)?, Native::Reshape { dims })))
    }
}

/// Config of a [`ZeroPadding2D`] layer: `((top, bottom), (left, right))` rows and columns.
///
/// # Examples
/// ```
/// let c = candle_functional::layers::ZeroPadding2DConfig::default();
/// assert_eq!(c.padding, ((1, 1), (1, 1)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
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

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let x = one_input(layer, inputs)?;
        let (c, h, w) = expect_chw(layer, x)?;
        let ((t, b), (l, r)) = self.padding;
        let what = "the padded size";
        let grow = |len: usize, a: usize, b: usize| len.checked_add(a)?.checked_add(b);
        Ok(vec![vec![
            c,
            checked_size(layer, what, grow(h, t, b))?,
            checked_size(layer, what, grow(w, l, r))?,
        ]])
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let ((t, b), (l, r)) = self.padding;
        Ok(vec![
            inputs[0].pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?,
        ])
    }
}

/// Config of a [`Cropping2D`] layer: `((top, bottom), (left, right))` rows and columns to cut.
///
/// # Examples
/// ```
/// let c = candle_functional::layers::Cropping2DConfig::default();
/// assert_eq!(c.cropping, ((0, 0), (0, 0)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Cropping2DConfig {
    /// `((top, bottom), (left, right))`.
    pub cropping: ((usize, usize), (usize, usize)),
}

/// Cuts rows and columns off the edges of NCHW tensors (Keras's `Cropping2D`): the inverse of
/// [`ZeroPadding2D`], and how a U-Net's encoder map is trimmed to its decoder's size.
///
/// # Shapes
/// Input `(batch, c, h, w)`; output `(batch, c, h - top - bottom, w - left - right)`.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let y = Cropping2D::new(2).call(&Input::new([3, 8, 8]))?;
/// assert_eq!(y.shape(), &[3, 4, 4]);
/// assert!(Cropping2D::new(4).call(&Input::new([3, 8, 8])).is_err());
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Cropping2D = Configured<Cropping2DConfig>;

impl Cropping2D {
    /// The same cut on all four sides.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Cropping2D::new(1).config().cropping, ((1, 1), (1, 1)));
    /// ```
    pub fn new(cropping: usize) -> Self {
        Self::asymmetric((cropping, cropping), (cropping, cropping))
    }

    /// `(top, bottom)` rows and `(left, right)` columns.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let c = Cropping2D::asymmetric((0, 1), (2, 0));
    /// assert_eq!(c.config().cropping, ((0, 1), (2, 0)));
    /// ```
    pub fn asymmetric(rows: (usize, usize), cols: (usize, usize)) -> Self {
        Self::from_config(Cropping2DConfig {
            cropping: (rows, cols),
        })
    }
}

impl LayerOp for Cropping2DConfig {
    fn type_name(&self) -> &'static str {
        "Cropping2D"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let x = one_input(layer, inputs)?;
        let (c, h, w) = expect_chw(layer, x)?;
        let ((t, b), (l, r)) = self.cropping;
        let keeps = |len: usize, a: usize, b: usize| a.checked_add(b).is_some_and(|cut| cut < len);
        if !keeps(h, t, b) || !keeps(w, l, r) {
            return Err(Error::InvalidInput {
                layer: layer.to_string(),
                message: format!(
                    "cropping {:?} leaves nothing of a {h} x {w} input",
                    self.cropping
                ),
            });
        }
        Ok(vec![vec![c, h - t - b, w - l - r]])
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let (_, _, h, w) = inputs[0].dims4()?;
        let ((t, b), (l, r)) = self.cropping;
        Ok(vec![inputs[0].narrow(2, t, h - t - b)?.narrow(
            3,
            l,
            w - l - r,
        )?])
    }
}

/// Config of a [`Reshape`] layer: the per-sample target shape, with at most one `-1` (the
/// size that makes the element count match).
///
/// # Examples
/// ```
/// let c = candle_functional::layers::ReshapeConfig { target_shape: vec![4, -1] };
/// assert_eq!(c.target_shape, [4, -1]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ReshapeConfig {
    /// Per-sample shape; one entry may be `-1`.
    pub target_shape: Vec<i64>,
}

/// Gives every sample a new shape with the same elements in the same (row-major) order.
///
/// The order is NCHW's: reshaping a `(C, H, W)` map regroups channels first, where Keras's
/// channels-last tensors regroup `(H, W, C)`.
///
/// # Shapes
/// Input `(batch, d1, ...)`; output `(batch, target_shape...)`, same element count.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let y = Reshape::new([4, -1]).call(&Input::new([2, 3, 4]))?;
/// assert_eq!(y.shape(), &[4, 6]);
/// assert!(Reshape::new([5, -1]).call(&Input::new([2, 3, 4])).is_err());
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Reshape = Configured<ReshapeConfig>;

impl Reshape {
    /// A reshape to `target_shape` (per sample; one `-1` allowed).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Reshape::new([8, 1, 1]).config().target_shape, [8, 1, 1]);
    /// ```
    pub fn new(target_shape: impl Into<Vec<i64>>) -> Self {
        Self::from_config(ReshapeConfig {
            target_shape: target_shape.into(),
        })
    }
}

impl ReshapeConfig {
    fn resolve(&self, layer: &str, input: &[usize]) -> Result<Vec<usize>> {
        let count = element_count(layer, input)?;
        let bad = |why: &str| Error::InvalidInput {
            layer: layer.to_string(),
            message: format!(
                "cannot reshape {input:?} ({count} elements) to {:?}: {why}",
                self.target_shape
            ),
        };
        let unknown: Vec<usize> = (0..self.target_shape.len())
            .filter(|&i| self.target_shape[i] == -1)
            .collect();
        if unknown.len() > 1 || self.target_shape.iter().any(|&d| d == 0 || d < -1) {
            return Err(bad("sizes must be positive, with at most one -1"));
        }
        let sizes: Vec<usize> = self
            .target_shape
            .iter()
            .filter(|&&d| d > 0)
            .map(|&d| d as usize)
            .collect();
        let known = element_count(layer, &sizes)?;
        let mut shape: Vec<usize> = self
            .target_shape
            .iter()
            .map(|&d| d.max(0) as usize)
            .collect();
        if let [i] = unknown[..] {
            if known == 0 || !count.is_multiple_of(known) {
                return Err(bad(
                    "the element count is not a multiple of the given sizes",
                ));
            }
            shape[i] = count / known;
        } else if known != count {
            return Err(bad("the element counts differ"));
        }
        Ok(shape)
    }
}

impl LayerOp for ReshapeConfig {
    fn type_name(&self) -> &'static str {
        "Reshape"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        Ok(vec![self.resolve(layer, one_input(layer, inputs)?)?])
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        let mut shape = vec![x.dim(0)?];
        shape.extend(self.resolve("reshape", &x.dims()[1..])?);
        Ok(vec![x.reshape(shape)?])
    }
}

/// Config of a [`Permute`] layer: the new order of the non-batch axes, numbered from 1 as in
/// Keras (`(2, 1)` swaps the two axes of a `(batch, a, b)` tensor).
///
/// # Examples
/// ```
/// let c = candle_functional::layers::PermuteConfig { dims: vec![2, 1] };
/// assert_eq!(c.dims, [2, 1]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PermuteConfig {
    /// A permutation of `1..=rank`.
    pub dims: Vec<usize>,
}

/// Reorders the non-batch axes.
///
/// # Shapes
/// Input `(batch, d1, ..., dn)`; output `(batch, d[dims[0]], ..., d[dims[n-1]])`.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// // NCHW to NHWC.
/// let y = Permute::new([2, 3, 1]).call(&Input::new([3, 8, 6]))?;
/// assert_eq!(y.shape(), &[8, 6, 3]);
/// assert!(Permute::new([1, 1, 2]).call(&Input::new([3, 8, 6])).is_err());
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Permute = Configured<PermuteConfig>;

impl Permute {
    /// A permutation of the non-batch axes, numbered from 1.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Permute::new([2, 1]).config().dims, [2, 1]);
    /// ```
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Self::from_config(PermuteConfig { dims: dims.into() })
    }
}

impl LayerOp for PermuteConfig {
    fn type_name(&self) -> &'static str {
        "Permute"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let x = one_input(layer, inputs)?;
        let mut sorted = self.dims.clone();
        sorted.sort_unstable();
        if sorted != (1..=x.len()).collect::<Vec<_>>() {
            return Err(Error::InvalidInput {
                layer: layer.to_string(),
                message: format!(
                    "dims {:?} is not a permutation of 1..={} (the axes of a {x:?} sample)",
                    self.dims,
                    x.len()
                ),
            });
        }
        Ok(vec![self.dims.iter().map(|&d| x[d - 1]).collect()])
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let mut order = vec![0];
        order.extend(self.dims.iter().copied());
        Ok(vec![inputs[0].permute(order)?.contiguous()?])
    }
}

/// The shape-only layers, each saved and imported from Keras's class of the same name.
/// Keras's `Flatten` of a map orders the features `(h, w, c)`: the importer follows that
/// order to the layer that reads it. `Reshape` and `Permute` of maps are refused (the
/// layouts differ).
pub(crate) const KINDS: &[LayerKind] = &[
    LayerKind::of::<FlattenConfig>(|| LayerExample::new(&Flatten::new(), &[&[2, 3, 4]])).keras(&[
        KerasClass::new("Flatten", flatten_from_keras).feature_order(FeatureOrder::Flattens),
    ]),
    LayerKind::of::<ZeroPadding2DConfig>(|| {
        let pad = ZeroPadding2D::asymmetric((1, 0), (0, 2));
        LayerExample::new(&pad, &[&[2, 3, 3]])
    })
    .keras(&[KerasClass::new("ZeroPadding2D", sides_from_keras)]),
    LayerKind::of::<Cropping2DConfig>(|| {
        let crop = Cropping2D::asymmetric((0, 1), (2, 0));
        LayerExample::new(&crop, &[&[2, 4, 5]])
    })
    .keras(&[KerasClass::new("Cropping2D", sides_from_keras)]),
    LayerKind::of::<ReshapeConfig>(|| LayerExample::new(&Reshape::new([3, -1]), &[&[2, 6]]))
        .keras(&[KerasClass::new("Reshape", reshape_from_keras)]),
    LayerKind::of::<PermuteConfig>(|| LayerExample::new(&Permute::new([2, 1]), &[&[3, 5]]))
        .keras(&[KerasClass::new("Permute", permute_from_keras)]),
];

fn flatten_from_keras(_layer: &KerasLayer) -> Translation {
    Translated::new("Flatten", FlattenConfig)
}

/// `ZeroPadding2D`'s `padding` or `Cropping2D`'s `cropping`: `((top, bottom), (left, right))`.
fn sides_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    layer.needs_rank4()?;
    let key = match layer.class() {
        "ZeroPadding2D" => "padding",
        _ => "cropping",
    };
    let sides = |v: &serde_json::Value| -> Option<(usize, usize)> {
        Some((v.get(0)?.as_u64()? as usize, v.get(1)?.as_u64()? as usize))
    };
    let field = layer.field(key);
    let rows_cols = field
        .get(0)
        .and_then(sides)
        .zip(field.get(1).and_then(sides))
        .ok_or_else(|| format!("`{key}` {field} is not ((top, bottom), (left, right))"))?;
    Translated::new(layer.class(), serde_json::json!({ key: rows_cols }))
}

/// Refuses a reshape from or to a `(batch, h, w, c)` map, whose layout differs here.
fn no_maps(layer: &KerasLayer, target_key: &str) -> std::result::Result<(), String> {
    let target_rank = layer.field(target_key).as_array().map_or(0, Vec::len) + 1;
    if layer.rank() == 4 || target_rank == 4 {
        return Err(
            "reshaping or permuting (batch, h, w, c) maps is not supported: the layouts differ"
                .into(),
        );
    }
    Ok(())
}

fn reshape_from_keras(layer: &KerasLayer) -> Translation {
    no_maps(layer, "target_shape")?;
    let target_shape = layer
        .field("target_shape")
        .as_array()
        .map_or_else(Vec::new, |v| {
            v.iter().map(|d| d.as_i64().unwrap_or(-1)).collect()
        });
    Translated::new("Reshape", ReshapeConfig { target_shape })
}

fn permute_from_keras(layer: &KerasLayer) -> Translation {
    no_maps(layer, "dims")?;
    let dims = layer.field("dims").as_array().map_or_else(Vec::new, |v| {
        v.iter().map(|d| d.as_u64().unwrap_or(0) as usize).collect()
    });
    Translated::new("Permute", PermuteConfig { dims })
}

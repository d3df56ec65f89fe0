//! Pooling layers: [`MaxPooling2D`], [`AveragePooling2D`] and [`GlobalAveragePooling2D`].
//!
//! When the window equals the stride and there is no padding (the article's
//! `AveragePooling2D(4)`), the input is cropped to what the windows cover (candle's backward
//! assumes it divides evenly), then average pooling runs candle's native kernel and max
//! pooling a max over a reshaped view. Every other case (overlapping windows, `Same` padding) is computed from
//! strided slices of the input, which candle can differentiate. As in TensorFlow, 'same'
//! average pooling divides by the number of real (unpadded) elements in each window.

use candle_core::{DType, Tensor};

use crate::graph::{Configured, LayerOp, Params};
use crate::layers::Padding;
use crate::layers::keras::{KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::native_backward::Native;
use crate::layers::padding::{
    expect_chw, expect_positive, one_input, same_padding, window_output_len,
};
use crate::ops;
use crate::{Error, Result};

/// Window, stride and padding of a 2-D pooling layer.
///
/// # Examples
/// ```
/// use candle_functional::layers::{Padding, Pool2DConfig};
/// let c = Pool2DConfig::default();
/// assert_eq!((c.pool_size, c.strides, c.padding), ((2, 2), None, Padding::Valid));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Pool2DConfig {
    /// Window height and width.
    pub pool_size: (usize, usize),
    /// Step (height, width); `None` means the window size, as in Keras.
    pub strides: Option<(usize, usize)>,
    /// `Valid` (default) or TensorFlow's `Same`.
    pub padding: Padding,
}

impl Default for Pool2DConfig {
    fn default() -> Self {
        Self {
            pool_size: (2, 2),
            strides: None,
            padding: Padding::Valid,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reduce {
    Max,
    Mean,
}

impl Pool2DConfig {
    /// The window when it equals the strides and there is no padding (the windows tile the
    /// map; rows and columns past the last whole one are left out), on an `h` by `w` map.
    fn tiling_window(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let pads = match self.padding {
            Padding::Same => {
                let (top, bottom) = same_padding(h, self.pool_size.0, self.strides().0, 1);
                let (left, right) = same_padding(w, self.pool_size.1, self.strides().1, 1);
                (top, bottom, left, right)
            }
            Padding::Valid => (0, 0, 0, 0),
        };
        (self.pool_size == self.strides() && pads == (0, 0, 0, 0)).then_some(self.pool_size)
    }

    fn strides(&self) -> (usize, usize) {
        self.strides.unwrap_or(self.pool_size)
    }

    fn output_shape(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let x = one_input(layer, inputs)?;
        let (c, h, w) = expect_chw(layer, x)?;
        let (ph, pw) = self.pool_size;
        let (sh, sw) = self.strides();
        expect_positive(layer, "pool size and strides", &[ph, pw, sh, sw])?;
        let oh = window_output_len(layer, h, ph, sh, 1, self.padding)?;
        let ow = window_output_len(layer, w, pw, sw, 1, self.padding)?;
        Ok(vec![vec![c, oh, ow]])
    }

    fn pool(&self, x: &Tensor, reduce: Reduce) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (ph, pw) = self.pool_size;
        let (sh, sw) = self.strides();
        let oh = window_output_len("", h, ph, sh, 1, self.padding)?;
        let ow = window_output_len("", w, pw, sw, 1, self.padding)?;
        let (top, bottom) = match self.padding {
            Padding::Same => same_padding(h, ph, sh, 1),
            Padding::Valid => (0, 0),
        };
        let (left, right) = match self.padding {
            Padding::Same => same_padding(w, pw, sw, 1),
            Padding::Valid => (0, 0),
        };
        if self.tiling_window(h, w).is_some() {
            let covered = x.narrow(2, 0, oh * sh)?.narrow(3, 0, ow * sw)?;
            return Ok(match reduce {
                // candle 0.11's max_pool2d backward scales the gradient by the share of the
                // window's maxima (1/4 for a 2x2 window) instead of dividing by their count,
                // so max pooling is a reduction over a reshaped view, whose backward is exact.
                Reduce::Max => {
                    let (n, c, _, _) = covered.dims4()?;
                    covered
                        .contiguous()?
                        .reshape((n, c, oh, ph, ow, pw))?
                        .max(5)?
                        .max(3)?
                }
                Reduce::Mean => covered.avg_pool2d((ph, pw))?,
            });
        }
        // 'Same' padding of a huge window is huge even when the output is small.
        crate::ops::check_padded("pooling", x, (top, bottom, left, right))?;
        let padded = x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        let inside = x
            .ones_like()?
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        let window = |t: &Tensor, di: usize, dj: usize| -> Result<Tensor> {
            let rows = strided(t, 2, di, oh, sh)?;
            strided(&rows, 3, dj, ow, sw)
        };
        let mut acc: Option<(Tensor, Tensor)> = None;
        for di in 0..ph {
            for dj in 0..pw {
                let values = window(&padded, di, dj)?;
                let mask = window(&inside, di, dj)?;
                acc = Some(match (acc, reduce) {
                    (None, Reduce::Max) => (masked_for_max(&values, &mask)?, mask),
                    (None, Reduce::Mean) => (values, mask),
                    (Some((a, n)), Reduce::Max) => {
                        (a.maximum(&masked_for_max(&values, &mask)?)?, (n + mask)?)
                    }
                    (Some((a, n)), Reduce::Mean) => ((a + values)?, (n + mask)?),
                });
            }
        }
        let (acc, count) = acc.ok_or_else(|| Error::InvalidArgument("empty pool window".into()))?;
        Ok(match reduce {
            Reduce::Max => acc,
            Reduce::Mean => (acc / count)?,
        })
    }
}

/// Moves padded positions (mask 0) far below any real value, so the max ignores them.
fn masked_for_max(values: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let lowest = match values.dtype() {
        DType::F16 => -65504.0,
        _ => -3.0e38,
    };
    Ok((values + ((mask - 1.0)? * -lowest)?)?)
}

/// Elements `offset, offset + stride, ...` (`count` of them) along `dim`, by reshaping a
/// contiguous run into `(count, stride)` and keeping the first column: differentiable.
fn strided(x: &Tensor, dim: usize, offset: usize, count: usize, stride: usize) -> Result<Tensor> {
    // One element needs no stride (and a stride far past the input would pad it hugely).
    if stride == 1 || count == 1 {
        return Ok(x.narrow(dim, offset, count)?);
    }
    let len = x.dim(dim)?;
    let needed = offset + count * stride;
    let x = if needed > len {
        x.pad_with_zeros(dim, 0, needed - len)?
    } else {
        x.clone()
    };
    let run = x.narrow(dim, offset, count * stride)?;
    let mut shape = run.dims().to_vec();
    shape[dim] = count;
    shape.insert(dim + 1, stride);
    Ok(run
        .contiguous()?
        .reshape(shape)?
        .narrow(dim + 1, 0, 1)?
        .squeeze(dim + 1)?)
}

macro_rules! pool_layer {
    ($(#[$doc:meta])* $alias:ident, $config:ident, $type_name:literal, $reduce:expr) => {
        #[doc = concat!("Config of a [`", stringify!($alias), "`] layer.")]
        ///
        /// # Examples
        /// ```
        #[doc = concat!("let c = candle_functional::layers::", stringify!($config), "::default();")]
        /// assert_eq!(c.0.pool_size, (2, 2));
        /// ```
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
        pub struct $config(pub Pool2DConfig);

        $(#[$doc])*
        pub type $alias = Configured<$config>;

        impl $alias {
            /// Square windows of `pool_size`, moving by `pool_size`, 'valid' padding.
            ///
            /// # Examples
            /// ```
            /// use candle_functional::prelude::*;
            #[doc = concat!("let y = ", stringify!($alias), "::new(2).call(&Input::new([3, 8, 8]))?;")]
            /// assert_eq!(y.shape(), &[3, 4, 4]);
            /// # Ok::<(), candle_functional::Error>(())
            /// ```
            pub fn new(pool_size: usize) -> Self {
                Self::from_config($config(Pool2DConfig {
                    pool_size: (pool_size, pool_size),
                    ..Default::default()
                }))
            }

            /// Step of the window (height and width).
            ///
            /// # Examples
            /// ```
            /// use candle_functional::prelude::*;
            #[doc = concat!("let y = ", stringify!($alias), "::new(3).strides(2).call(&Input::new([1, 7, 7]))?;")]
            /// assert_eq!(y.shape(), &[1, 3, 3]);
            /// # Ok::<(), candle_functional::Error>(())
            /// ```
            pub fn strides(self, strides: usize) -> Self {
                self.with_config(|c| c.0.strides = Some((strides, strides)))
            }

            /// `Padding::Same` or `Padding::Valid`.
            ///
            /// # Examples
            /// ```
            /// use candle_functional::prelude::*;
            #[doc = concat!("let y = ", stringify!($alias), "::new(2).padding(Padding::Same).call(&Input::new([1, 5, 5]))?;")]
            /// assert_eq!(y.shape(), &[1, 3, 3]);
            /// # Ok::<(), candle_functional::Error>(())
            /// ```
            pub fn padding(self, padding: Padding) -> Self {
                self.with_config(|c| c.0.padding = padding)
            }
        }

        impl LayerOp for $config {
            fn type_name(&self) -> &'static str {
                $type_name
            }

            fn to_config(&self) -> Option<serde_json::Value> {
                serde_json::to_value(self).ok()
            }

            fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
                self.0.output_shape(layer, inputs)
            }

            fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
                Ok(vec![self.0.pool(&inputs[0], $reduce)?])
            }

            /// Lets the plan's own backward pass find the layer (`train/tape.rs`).
            fn as_any(&self) -> Option<&dyn std::any::Any> {
                Some(self)
            }
        }
    };
}

pool_layer!(
    /// Max pooling over 2-D windows.
    ///
    /// # Shapes
    /// Input `(batch, c, h, w)`; output `(batch, c, h', w')`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = MaxPooling2D::new(2).call(&Input::new([16, 32, 32]))?;
    /// assert_eq!(y.shape(), &[16, 16, 16]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    MaxPooling2D, MaxPooling2DConfig, "MaxPooling2D", Reduce::Max
);

impl AveragePooling2DConfig {
    /// The forward pass for the plan's own backward pass (`train/tape.rs`): the output and
    /// what its gradient needs, where the windows tile the map exactly (strides equal to the
    /// window, no padding, no rows or columns left over); `None` elsewhere (candle's
    /// autograd). Its gradient is a scaling and a nearest upsampling, on any device.
    pub(crate) fn forward_native(&self, x: &Tensor) -> Result<Option<(Tensor, Native)>> {
        if x.rank() != 4 || !x.dtype().is_float() {
            return Ok(None);
        }
        let (_, _, h, w) = x.dims4()?;
        let Some(window) = self.0.tiling_window(h, w) else {
            return Ok(None);
        };
        if window.0 == 0 || window.1 == 0 || h % window.0 != 0 || w % window.1 != 0 {
            return Ok(None);
        }
        let y = self.0.pool(x, Reduce::Mean)?;
        let native = Native::AvgPool {
            window,
            size: (h, w),
        };
        Ok(Some((y, native)))
    }
}

impl MaxPooling2DConfig {
    /// The forward pass for the plan's own backward pass (`train/tape.rs`): the output and
    /// what its gradient needs, where the windows tile the map (strides equal to the window,
    /// no padding); `None` elsewhere (candle's autograd). The gradient is the CPU's kernel on
    /// an input it takes, unless `composed`; elsewhere three element-wise ops over the
    /// windows, on any device, where no rows or columns are left over.
    pub(crate) fn forward_native(
        &self,
        x: &Tensor,
        composed: bool,
    ) -> Result<Option<(Tensor, Native)>> {
        if x.rank() != 4 || !x.dtype().is_float() {
            return Ok(None);
        }
        let (_, _, h, w) = x.dims4()?;
        let Some(window) = self.0.tiling_window(h, w) else {
            return Ok(None);
        };
        let composed = composed || !ops::takes_cpu_kernels(x);
        if composed && (window.0 == 0 || window.1 == 0 || h % window.0 != 0 || w % window.1 != 0) {
            return Ok(None);
        }
        let y = self.0.pool(x, Reduce::Max)?;
        let native = Native::MaxPool {
            x: x.clone(),
            y: y.clone(),
            window,
            composed,
        };
        Ok(Some((y, native)))
    }
}

pool_layer!(
    /// Average pooling over 2-D windows (the article's `AveragePooling2D(4)` head).
    ///
    /// # Shapes
    /// Input `(batch, c, h, w)`; output `(batch, c, h', w')`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = AveragePooling2D::new(4).call(&Input::new([512, 4, 4]))?;
    /// assert_eq!(y.shape(), &[512, 1, 1]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    AveragePooling2D, AveragePooling2DConfig, "AveragePooling2D", Reduce::Mean
);

/// Config of a [`GlobalAveragePooling2D`] layer.
///
/// # Examples
/// ```
/// assert!(!candle_functional::layers::GlobalAveragePooling2DConfig::default().keepdims);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GlobalAveragePooling2DConfig {
    /// Keep the spatial axes as size 1 (`(c, 1, 1)` instead of `(c,)`).
    pub keepdims: bool,
}

/// Mean over the spatial axes.
///
/// # Shapes
/// Input `(batch, c, h, w)`; output `(batch, c)` (or `(batch, c, 1, 1)` with `keepdims`).
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let y = GlobalAveragePooling2D::new().call(&Input::new([64, 8, 8]))?;
/// assert_eq!(y.shape(), &[64]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type GlobalAveragePooling2D = Configured<GlobalAveragePooling2DConfig>;

impl GlobalAveragePooling2D {
    /// Global average pooling to `(batch, c)`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert!(!GlobalAveragePooling2D::new().config().keepdims);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the spatial axes as size 1.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = GlobalAveragePooling2D::new().keepdims(true).call(&Input::new([4, 3, 3]))?;
    /// assert_eq!(y.shape(), &[4, 1, 1]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn keepdims(self, keepdims: bool) -> Self {
        self.with_config(|c| c.keepdims = keepdims)
    }
}

impl LayerOp for GlobalAveragePooling2DConfig {
    fn type_name(&self) -> &'static str {
        "GlobalAveragePooling2D"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        global_output_shapes(layer, inputs, self.keepdims)
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        Ok(vec![self.pooled(&inputs[0])?])
    }

    /// Lets the plan's own backward pass find the layer (`train/tape.rs`).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl GlobalAveragePooling2DConfig {
    /// The forward pass for the plan's own backward pass (`train/tape.rs`): the output, and
    /// the input's shape, from which its gradient (the output's, spread evenly over each map)
    /// is made on any device; `None` for an input that is not a float NCHW batch, or whose
    /// maps are empty (their mean divides by nothing).
    pub(crate) fn forward_native(&self, x: &Tensor) -> Result<Option<(Tensor, Native)>> {
        if x.rank() != 4 || !x.dtype().is_float() || x.elem_count() == 0 {
            return Ok(None);
        }
        let (n, c, h, w) = x.dims4()?;
        let native = Native::GlobalAvgPool { dims: (n, c, h, w) };
        Ok(Some((self.pooled(x)?, native)))
    }

    /// The mean of each map of `x`.
    fn pooled(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.keepdims {
            true => x.mean_keepdim((2, 3))?,
            false => x.mean((2, 3))?,
        })
    }
}

/// `(c)` or `(c, 1, 1)` from one `(c, h, w)` input: the shape rule of global pooling.
fn global_output_shapes(
    layer: &str,
    inputs: &[Vec<usize>],
    keepdims: bool,
) -> Result<Vec<Vec<usize>>> {
    let x = one_input(layer, inputs)?;
    let (c, _, _) = expect_chw(layer, x)?;
    Ok(vec![if keepdims { vec![c, 1, 1] } else { vec![c] }])
}

/// Configuration of a [`GlobalMaxPooling2D`] layer; defaults are Keras's.
///
/// # Examples
/// ```
/// assert!(!candle_functional::layers::GlobalMaxPooling2DConfig::default().keepdims);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GlobalMaxPooling2DConfig {
    /// Keep the spatial axes as size 1 (default `false`).
    pub keepdims: bool,
}

/// The maximum over each channel's feature map (Keras's `GlobalMaxPooling2D`).
///
/// # Shapes
/// Input `(batch, c, h, w)`; output `(batch, c)`, or `(batch, c, 1, 1)` with `keepdims`.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// assert_eq!(GlobalMaxPooling2D::new().call(&Input::new([8, 4, 4]))?.shape(), &[8]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type GlobalMaxPooling2D = Configured<GlobalMaxPooling2DConfig>;

impl GlobalMaxPooling2D {
    /// Global max pooling to `(batch, c)`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert!(!GlobalMaxPooling2D::new().config().keepdims);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the spatial axes as size 1.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = GlobalMaxPooling2D::new().keepdims(true).call(&Input::new([4, 3, 3]))?;
    /// assert_eq!(y.shape(), &[4, 1, 1]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn keepdims(self, keepdims: bool) -> Self {
        self.with_config(|c| c.keepdims = keepdims)
    }
}

impl LayerOp for GlobalMaxPooling2DConfig {
    fn type_name(&self) -> &'static str {
        "GlobalMaxPooling2D"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        global_output_shapes(layer, inputs, self.keepdims)
    }

    fn forward(&self, inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
        let (n, c, _, _) = inputs[0].dims4()?;
        let max = inputs[0].flatten_from(2)?.max(2)?;
        Ok(vec![if self.keepdims {
            max.reshape((n, c, 1, 1))?
        } else {
            max
        }])
    }
}

/// The pooling layers, each saved and imported from Keras's class of the same name.
pub(crate) const KINDS: &[LayerKind] = &[
    LayerKind::of::<MaxPooling2DConfig>(|| {
        let pool = MaxPooling2D::new(3).strides(2).padding(Padding::Same);
        LayerExample::new(&pool, &[&[2, 5, 6]])
    })
    .keras(&[KerasClass::new("MaxPooling2D", pool_from_keras)]),
    LayerKind::of::<AveragePooling2DConfig>(|| {
        let pool = AveragePooling2D::new(2).padding(Padding::Same);
        LayerExample::new(&pool, &[&[2, 5, 5]])
    })
    .keras(&[KerasClass::new("AveragePooling2D", pool_from_keras)]),
    LayerKind::of::<GlobalAveragePooling2DConfig>(|| {
        let pool = GlobalAveragePooling2D::new().keepdims(true);
        LayerExample::new(&pool, &[&[3, 4, 4]])
    })
    .keras(&[KerasClass::new(
        "GlobalAveragePooling2D",
        global_pool_from_keras,
    )]),
    LayerKind::of::<GlobalMaxPooling2DConfig>(|| {
        LayerExample::new(&GlobalMaxPooling2D::new(), &[&[3, 4, 4]])
    })
    .keras(&[KerasClass::new(
        "GlobalMaxPooling2D",
        global_pool_from_keras,
    )]),
];

fn pool_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    layer.needs_rank4()?;
    let pool = Pool2DConfig {
        pool_size: layer.pair("pool_size")?,
        strides: if layer.field("strides").is_null() {
            None
        } else {
            Some(layer.pair("strides")?)
        },
        padding: layer.padding()?,
    };
    match layer.class() {
        "MaxPooling2D" => Translated::new("MaxPooling2D", MaxPooling2DConfig(pool)),
        _ => Translated::new("AveragePooling2D", AveragePooling2DConfig(pool)),
    }
}

fn global_pool_from_keras(layer: &KerasLayer) -> Translation {
    layer.channels_last()?;
    layer.needs_rank4()?;
    Translated::new(
        layer.class(),
        serde_json::json!({ "keepdims": layer.flag("keepdims", false) }),
    )
}

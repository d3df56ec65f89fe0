//! `Conv2DTranspose`: the transposed ("de-") convolution of decoders, with Keras's output
//! sizes and TensorFlow's placement of the 'same' crop.
//!
//! It computes the full transposed convolution (`(h - 1) * strides + span` rows, where `span`
//! is the dilated window) and then, as TensorFlow does, keeps the rows a forward convolution
//! with the same padding would have read: for `Same`, `h * strides` rows after cutting the
//! smaller half of the excess at the top; for `Valid`, `h * strides + max(span - strides, 0)`
//! rows. When the window is narrower than the stride the missing rows are zeros (plus the
//! bias), which is TensorFlow's result too.
//!
//! The kernel is stored `(in_channels, filters, kh, kw)` (PyTorch's `ConvTranspose2d` layout);
//! Keras's `(kh, kw, filters, in_channels)` kernels convert with `permute((3, 2, 0, 1))`.

use candle_core::Tensor;

use crate::Result;
use crate::graph::{Configured, Initializer, LayerOp, ParamSpec, Params};
use crate::layers::conv::window_from_keras;
use crate::layers::keras::{Convert, KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::{checked_size, expect_chw, expect_positive, one_input};
use crate::layers::window_builders::window_builders;
use crate::layers::{ActivationFn, Padding};
use crate::ops;

/// Configuration of a [`Conv2DTranspose`] layer; defaults are Keras's.
///
/// # Examples
/// ```
/// use candle_functional::layers::{Conv2DTransposeConfig, Padding};
/// let c = Conv2DTransposeConfig::default();
/// assert_eq!((c.kernel_size, c.strides, c.padding), ((3, 3), 1, Padding::Valid));
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Conv2DTransposeConfig {
    /// Number of output channels.
    pub filters: usize,
    /// Window height and width.
    pub kernel_size: (usize, usize),
    /// Upsampling factor along both axes.
    pub strides: usize,
    /// `Valid` (default) or TensorFlow's `Same` (output `h * strides`).
    pub padding: Padding,
    /// Spacing of the window's taps.
    pub dilation: usize,
    /// Adds a bias per filter (default `true`).
    pub use_bias: bool,
    /// Applied to the output (default `Linear`).
    pub activation: ActivationFn,
    /// Default Glorot uniform, with Keras's fans (`kh * kw * filters`, `kh * kw * in`).
    pub kernel_initializer: Initializer,
    /// Default zeros.
    pub bias_initializer: Initializer,
}

impl Default for Conv2DTransposeConfig {
    fn default() -> Self {
        Self {
            filters: 1,
            kernel_size: (3, 3),
            strides: 1,
            padding: Padding::Valid,
            dilation: 1,
            use_bias: true,
            activation: ActivationFn::Linear,
            kernel_initializer: Initializer::GlorotUniform,
            bias_initializer: Initializer::Zeros,
        }
    }
}

/// Transposed 2-D convolution (Keras's `Conv2DTranspose`), the learned upsampling of U-Net
/// decoders.
///
/// Weights: `kernel` `(in_channels, filters, kh, kw)`, `bias` `(filters,)`.
///
/// # Shapes
/// Input `(batch, in, h, w)`; output `(batch, filters, h', w')` with `h' = h * strides` for
/// `Same` and `h * strides + max(span - strides, 0)` for `Valid` (`span = dilation * (kh - 1)
/// + 1`).
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// use candle_functional::layers::Conv2DTranspose;
/// let y = Conv2DTranspose::new(16, 3).strides(2).padding(Padding::Same)
///     .call(&Input::new([32, 8, 8]))?;
/// assert_eq!(y.shape(), &[16, 16, 16]);
/// let z = Conv2DTranspose::new(16, 3).strides(2).call(&Input::new([32, 8, 8]))?;
/// assert_eq!(z.shape(), &[16, 17, 17]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Conv2DTranspose = Configured<Conv2DTransposeConfig>;

window_builders!(Conv2DTranspose, "Conv2DTranspose::new(8, 3)");

impl Conv2DTranspose {
    /// A transposed convolution with `filters` outputs and a square window; Keras's defaults
    /// otherwise.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::Conv2DTranspose;
    /// assert_eq!(Conv2DTranspose::new(8, 2).config().kernel_size, (2, 2));
    /// ```
    pub fn new(filters: usize, kernel_size: usize) -> Self {
        Self::from_config(Conv2DTransposeConfig {
            filters,
            kernel_size: (kernel_size, kernel_size),
            ..Default::default()
        })
    }

    /// Kernel initializer.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::{Conv2DTranspose, Initializer};
    /// let layer = Conv2DTranspose::new(8, 2).kernel_initializer(Initializer::HeNormal);
    /// assert_eq!(layer.config().kernel_initializer, Initializer::HeNormal);
    /// ```
    pub fn kernel_initializer(self, init: Initializer) -> Self {
        self.with_config(|c| c.kernel_initializer = init)
    }
}

impl Conv2DTransposeConfig {
    /// Keras's output length along one axis and the rows cut from the top of the full
    /// transposed convolution.
    /// An error naming `layer` when a configured size makes that length overflow.
    fn output_len(&self, layer: &str, len: usize, kernel: usize) -> Result<(usize, usize)> {
        let span = kernel
            .checked_sub(1)
            .and_then(|k| k.checked_mul(self.dilation))
            .and_then(|s| s.checked_add(1));
        let excess = span.map(|s| s.saturating_sub(self.strides));
        let scaled = len.checked_mul(self.strides);
        let (out, start) = match self.padding {
            Padding::Valid => (
                scaled.zip(excess).and_then(|(a, b)| a.checked_add(b)),
                Some(0),
            ),
            Padding::Same => (scaled.filter(|_| excess.is_some()), excess.map(|e| e / 2)),
        };
        let what = "the output length (input × strides + kernel span)";
        Ok((
            checked_size(layer, what, out)?,
            checked_size(layer, what, start)?,
        ))
    }

    /// Crops (or zero-pads at the end) the full result along `axis` to `len` rows from `start`.
    fn fit(full: Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
        let have = full.dim(axis)?;
        Ok(if have >= start + len {
            full.narrow(axis, start, len)?
        } else {
            full.narrow(axis, start, have - start)?
                .pad_with_zeros(axis, 0, start + len - have)?
        })
    }
}

impl LayerOp for Conv2DTransposeConfig {
    fn type_name(&self) -> &'static str {
        "Conv2DTranspose"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let (_, h, w) = expect_chw(layer, one_input(layer, inputs)?)?;
        let (kh, kw) = self.kernel_size;
        expect_positive(
            layer,
            "filters, kernel size, strides and dilation",
            &[self.filters, kh, kw, self.strides, self.dilation],
        )?;
        Ok(vec![vec![
            self.filters,
            self.output_len(layer, h, kh)?.0,
            self.output_len(layer, w, kw)?.0,
        ]])
    }

    fn param_specs(&self, inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        let in_channels = inputs.first().and_then(|s| s.first()).copied().unwrap_or(1);
        let (kh, kw) = self.kernel_size;
        let mut specs = vec![
            ParamSpec::new(
                "kernel",
                vec![in_channels, self.filters, kh, kw],
                self.kernel_initializer.clone(),
            )
            .fans(
                kh.saturating_mul(kw).saturating_mul(self.filters),
                kh.saturating_mul(kw).saturating_mul(in_channels),
            ),
        ];
        if self.use_bias {
            specs.push(ParamSpec::new(
                "bias",
                vec![self.filters],
                self.bias_initializer.clone(),
            ));
        }
        specs
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        let x = &inputs[0];
        let (_, _, h, w) = x.dims4()?;
        let full = ops::conv_transpose2d(x, &params.get("kernel")?, self.strides, self.dilation)?;
        let (oh, top) = self.output_len("conv2d_transpose", h, self.kernel_size.0)?;
        let (ow, left) = self.output_len("conv2d_transpose", w, self.kernel_size.1)?;
        let mut y = Self::fit(Self::fit(full, 2, top, oh)?, 3, left, ow)?;
        if self.use_bias {
            y = ops::bias_add(&y, &params.get("bias")?)?;
        }
        Ok(vec![self.activation.apply(&y)?])
    }
}

/// `Conv2DTranspose`, saved and imported from Keras's `Conv2DTranspose` (without
/// `output_padding`).
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<Conv2DTransposeConfig>(|| {
    LayerExample::new(
        &Conv2DTranspose::new(3, 3).strides(2).padding(Padding::Same),
        &[&[2, 4, 5]],
    )
})
.keras(&[KerasClass::new(
    "Conv2DTranspose",
    conv2d_transpose_from_keras,
)])];

fn conv2d_transpose_from_keras(layer: &KerasLayer) -> Translation {
    if !layer.field("output_padding").is_null() {
        return Err("output_padding is not supported".into());
    }
    let mut config = window_from_keras(layer)?;
    config["filters"] = layer.int("filters")?.into();
    Ok(Translated::new("Conv2DTranspose", config)?
        .weight("kernel", 0, Convert::Kernel)
        .bias(layer.flag("use_bias", true), 1))
}

//! `DepthwiseConv2D` and `SeparableConv2D`: the MobileNet building blocks.
//!
//! A depthwise convolution filters each input channel on its own (`depth_multiplier` filters
//! per channel): it is a grouped convolution with one group per channel, so it runs on the
//! same kernels as [`Conv2D`](crate::layers::Conv2D) (GEMM on the CPU, cuDNN on CUDA). A
//! separable convolution is a depthwise convolution followed by a 1x1 (pointwise) one.
//!
//! Output channel `c * depth_multiplier + m` is filter `m` of input channel `c`, TensorFlow's
//! order; Keras's `(kh, kw, in, multiplier)` depthwise kernels convert to this crate's
//! `(in * multiplier, 1, kh, kw)` with `reshape((kh, kw, in * multiplier))` then
//! `permute((2, 0, 1))` and `unsqueeze(1)`.

use candle_core::Tensor;

use crate::Result;
use crate::graph::{Configured, Initializer, LayerOp, ParamSpec, Params};
use crate::layers::conv::window_from_keras;
use crate::layers::keras::{Convert, KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::padding::{
    checked_size, expect_chw, expect_positive, one_input, window_output_len,
};
use crate::layers::window_builders::window_builders;
use crate::layers::{ActivationFn, Padding, same_padding};
use crate::ops::{self, Conv2dGeometry};

/// Configuration of a [`DepthwiseConv2D`] layer; defaults are Keras's.
///
/// # Examples
/// ```
/// use candle_functional::layers::DepthwiseConv2DConfig;
/// let c = DepthwiseConv2DConfig::default();
/// assert_eq!((c.kernel_size, c.depth_multiplier, c.use_bias), ((3, 3), 1, true));
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DepthwiseConv2DConfig {
    /// Window height and width.
    pub kernel_size: (usize, usize),
    /// Step of the window along both axes.
    pub strides: usize,
    /// `Valid` (default) or TensorFlow's `Same`.
    pub padding: Padding,
    /// Filters per input channel.
    pub depth_multiplier: usize,
    /// Spacing of the window's taps.
    pub dilation: usize,
    /// Adds a bias per output channel (default `true`).
    pub use_bias: bool,
    /// Applied to the output (default `Linear`).
    pub activation: ActivationFn,
    /// Default Glorot uniform, with Keras's fans (`kh * kw * in`, `kh * kw * multiplier`).
    pub depthwise_initializer: Initializer,
    /// Default zeros.
    pub bias_initializer: Initializer,
}

impl Default for DepthwiseConv2DConfig {
    fn default() -> Self {
        Self {
            kernel_size: (3, 3),
            strides: 1,
            padding: Padding::Valid,
            depth_multiplier: 1,
            dilation: 1,
            use_bias: true,
            activation: ActivationFn::Linear,
            depthwise_initializer: Initializer::GlorotUniform,
            bias_initializer: Initializer::Zeros,
        }
    }
}

/// Depthwise 2-D convolution (Keras's `DepthwiseConv2D`).
///
/// Weights: `kernel` `(in * depth_multiplier, 1, kh, kw)`, `bias` `(in * depth_multiplier,)`.
///
/// # Shapes
/// Input `(batch, in, h, w)`; output `(batch, in * depth_multiplier, h', w')`, with `h'` as for
/// [`Conv2D`](crate::layers::Conv2D).
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// use candle_functional::layers::DepthwiseConv2D;
/// let y = DepthwiseConv2D::new(3).padding(Padding::Same).call(&Input::new([8, 16, 16]))?;
/// assert_eq!(y.shape(), &[8, 16, 16]);
/// assert_eq!(y.layer().param_specs()[0].shape(), &[8, 1, 3, 3]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type DepthwiseConv2D = Configured<DepthwiseConv2DConfig>;

/// Configuration of a [`SeparableConv2D`] layer; defaults are Keras's.
///
/// # Examples
/// ```
/// use candle_functional::layers::SeparableConv2DConfig;
/// let c = SeparableConv2DConfig::default();
/// assert_eq!((c.filters, c.kernel_size, c.depth_multiplier), (1, (3, 3), 1));
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SeparableConv2DConfig {
    /// Output channels of the pointwise convolution.
    pub filters: usize,
    /// The depthwise window's height and width.
    pub kernel_size: (usize, usize),
    /// Step of the depthwise window.
    pub strides: usize,
    /// Padding of the depthwise convolution.
    pub padding: Padding,
    /// Depthwise filters per input channel.
    pub depth_multiplier: usize,
    /// Spacing of the depthwise window's taps.
    pub dilation: usize,
    /// Adds a bias per filter after the pointwise convolution (default `true`).
    pub use_bias: bool,
    /// Applied to the output (default `Linear`).
    pub activation: ActivationFn,
    /// Default Glorot uniform.
    pub depthwise_initializer: Initializer,
    /// Default Glorot uniform.
    pub pointwise_initializer: Initializer,
    /// Default zeros.
    pub bias_initializer: Initializer,
}

impl Default for SeparableConv2DConfig {
    fn default() -> Self {
        Self {
            filters: 1,
            kernel_size: (3, 3),
            strides: 1,
            padding: Padding::Valid,
            depth_multiplier: 1,
            dilation: 1,
            use_bias: true,
            activation: ActivationFn::Linear,
            depthwise_initializer: Initializer::GlorotUniform,
            pointwise_initializer: Initializer::GlorotUniform,
            bias_initializer: Initializer::Zeros,
        }
    }
}

/// Depthwise-separable 2-D convolution (Keras's `SeparableConv2D`): a depthwise convolution,
/// then a 1x1 convolution to `filters` channels, then the bias and activation.
///
/// Weights: `depthwise_kernel` `(in * depth_multiplier, 1, kh, kw)`, `pointwise_kernel`
/// `(filters, in * depth_multiplier, 1, 1)`, `bias` `(filters,)`.
///
/// # Shapes
/// Input `(batch, in, h, w)`; output `(batch, filters, h', w')`.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// use candle_functional::layers::SeparableConv2D;
/// let y = SeparableConv2D::new(16, 3).strides(2).padding(Padding::Same)
///     .call(&Input::new([8, 16, 16]))?;
/// assert_eq!(y.shape(), &[16, 8, 8]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type SeparableConv2D = Configured<SeparableConv2DConfig>;

/// The depthwise part both layers share: geometry checks, shapes, the grouped convolution.
struct Depthwise {
    kernel_size: (usize, usize),
    strides: usize,
    padding: Padding,
    depth_multiplier: usize,
    dilation: usize,
}

impl Depthwise {
    fn output_shape(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<usize>> {
        let (c, h, w) = expect_chw(layer, one_input(layer, inputs)?)?;
        let (kh, kw) = self.kernel_size;
        expect_positive(
            layer,
            "kernel size, strides, depth multiplier and dilation",
            &[kh, kw, self.strides, self.depth_multiplier, self.dilation],
        )?;
        let oh = window_output_len(layer, h, kh, self.strides, self.dilation, self.padding)?;
        let ow = window_output_len(layer, w, kw, self.strides, self.dilation, self.padding)?;
        let channels = c.checked_mul(self.depth_multiplier);
        Ok(vec![
            checked_size(layer, "channels × depth multiplier", channels)?,
            oh,
            ow,
        ])
    }

    fn kernel_spec(&self, name: &str, inputs: &[Vec<usize>], init: &Initializer) -> ParamSpec {
        let in_channels = inputs.first().and_then(|s| s.first()).copied().unwrap_or(1);
        let (kh, kw) = self.kernel_size;
        ParamSpec::new(
            name,
            vec![in_channels.saturating_mul(self.depth_multiplier), 1, kh, kw],
            init.clone(),
        )
        .fans(
            kh.saturating_mul(kw).saturating_mul(in_channels),
            kh.saturating_mul(kw).saturating_mul(self.depth_multiplier),
        )
    }

    fn forward(&self, x: &Tensor, kernel: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let pads = |len, k| match self.padding {
            Padding::Valid => (0, 0),
            Padding::Same => same_padding(len, k, self.strides, self.dilation),
        };
        let (t, b) = pads(h, self.kernel_size.0);
        let (l, r) = pads(w, self.kernel_size.1);
        let geometry = Conv2dGeometry {
            pad: (t, b, l, r),
            stride: self.strides,
            dilation: self.dilation,
            groups: c,
        };
        match bias {
            Some(bias) => ops::conv2d_bias(x, kernel, bias, geometry),
            None => ops::conv2d(x, kernel, geometry),
        }
    }
}

impl DepthwiseConv2DConfig {
    fn depthwise(&self) -> Depthwise {
        Depthwise {
            kernel_size: self.kernel_size,
            strides: self.strides,
            padding: self.padding,
            depth_multiplier: self.depth_multiplier,
            dilation: self.dilation,
        }
    }
}

impl SeparableConv2DConfig {
    fn depthwise(&self) -> Depthwise {
        Depthwise {
            kernel_size: self.kernel_size,
            strides: self.strides,
            padding: self.padding,
            depth_multiplier: self.depth_multiplier,
            dilation: self.dilation,
        }
    }
}

impl LayerOp for DepthwiseConv2DConfig {
    fn type_name(&self) -> &'static str {
        "DepthwiseConv2D"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        Ok(vec![self.depthwise().output_shape(layer, inputs)?])
    }

    fn param_specs(&self, inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        let depthwise = self.depthwise();
        let kernel = depthwise.kernel_spec("kernel", inputs, &self.depthwise_initializer);
        let channels = kernel.shape()[0];
        let mut specs = vec![kernel];
        if self.use_bias {
            specs.push(ParamSpec::new(
                "bias",
                vec![channels],
                self.bias_initializer.clone(),
            ));
        }
        specs
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        let bias = self.use_bias.then(|| params.get("bias")).transpose()?;
        let y = self
            .depthwise()
            .forward(&inputs[0], &params.get("kernel")?, bias.as_ref())?;
        Ok(vec![self.activation.apply(&y)?])
    }
}

impl LayerOp for SeparableConv2DConfig {
    fn type_name(&self) -> &'static str {
        "SeparableConv2D"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        expect_positive(layer, "filters", &[self.filters])?;
        let mut shape = self.depthwise().output_shape(layer, inputs)?;
        shape[0] = self.filters;
        Ok(vec![shape])
    }

    fn param_specs(&self, inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        let depthwise = self.depthwise();
        let kernel = depthwise.kernel_spec("depthwise_kernel", inputs, &self.depthwise_initializer);
        let mid = kernel.shape()[0];
        let mut specs = vec![
            kernel,
            ParamSpec::new(
                "pointwise_kernel",
                vec![self.filters, mid, 1, 1],
                self.pointwise_initializer.clone(),
            )
            .fans(mid, self.filters),
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
        let mid = self
            .depthwise()
            .forward(&inputs[0], &params.get("depthwise_kernel")?, None)?;
        let pointwise = Conv2dGeometry {
            pad: (0, 0, 0, 0),
            stride: 1,
            dilation: 1,
            groups: 1,
        };
        let kernel = params.get("pointwise_kernel")?;
        let y = if self.use_bias {
            ops::conv2d_bias(&mid, &kernel, &params.get("bias")?, pointwise)?
        } else {
            ops::conv2d(&mid, &kernel, pointwise)?
        };
        Ok(vec![self.activation.apply(&y)?])
    }
}

window_builders!(DepthwiseConv2D, "DepthwiseConv2D::new(3)");
window_builders!(SeparableConv2D, "SeparableConv2D::new(8, 3)");

impl DepthwiseConv2D {
    /// A depthwise convolution with a square `kernel_size` window, one filter per channel;
    /// Keras's defaults otherwise.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::DepthwiseConv2D;
    /// assert_eq!(DepthwiseConv2D::new(5).config().kernel_size, (5, 5));
    /// ```
    pub fn new(kernel_size: usize) -> Self {
        Self::from_config(DepthwiseConv2DConfig {
            kernel_size: (kernel_size, kernel_size),
            ..Default::default()
        })
    }

    /// Filters per input channel.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// use candle_functional::layers::DepthwiseConv2D;
    /// let y = DepthwiseConv2D::new(3).depth_multiplier(2).call(&Input::new([4, 5, 5]))?;
    /// assert_eq!(y.shape(), &[8, 3, 3]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn depth_multiplier(self, multiplier: usize) -> Self {
        self.with_config(|c| c.depth_multiplier = multiplier)
    }

    /// Initializer of the depthwise kernel.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::{DepthwiseConv2D, Initializer};
    /// let layer = DepthwiseConv2D::new(3).depthwise_initializer(Initializer::HeNormal);
    /// assert_eq!(layer.config().depthwise_initializer, Initializer::HeNormal);
    /// ```
    pub fn depthwise_initializer(self, init: Initializer) -> Self {
        self.with_config(|c| c.depthwise_initializer = init)
    }
}

impl SeparableConv2D {
    /// A separable convolution to `filters` channels with a square depthwise window; Keras's
    /// defaults otherwise.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::SeparableConv2D;
    /// assert_eq!(SeparableConv2D::new(32, 3).config().filters, 32);
    /// ```
    pub fn new(filters: usize, kernel_size: usize) -> Self {
        Self::from_config(SeparableConv2DConfig {
            filters,
            kernel_size: (kernel_size, kernel_size),
            ..Default::default()
        })
    }

    /// Depthwise filters per input channel.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// use candle_functional::layers::SeparableConv2D;
    /// let y = SeparableConv2D::new(4, 3).depth_multiplier(2).call(&Input::new([3, 5, 5]))?;
    /// assert_eq!(y.layer().param_specs()[1].shape(), &[4, 6, 1, 1]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn depth_multiplier(self, multiplier: usize) -> Self {
        self.with_config(|c| c.depth_multiplier = multiplier)
    }

    /// Initializers of the depthwise and pointwise kernels.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::layers::{Initializer, SeparableConv2D};
    /// let layer = SeparableConv2D::new(4, 3)
    ///     .kernel_initializers(Initializer::HeNormal, Initializer::HeUniform);
    /// assert_eq!(layer.config().pointwise_initializer, Initializer::HeUniform);
    /// ```
    pub fn kernel_initializers(self, depthwise: Initializer, pointwise: Initializer) -> Self {
        self.with_config(|c| {
            c.depthwise_initializer = depthwise;
            c.pointwise_initializer = pointwise;
        })
    }
}

/// `DepthwiseConv2D` and `SeparableConv2D`, saved and imported from Keras's classes of the
/// same names.
pub(crate) const KINDS: &[LayerKind] = &[
    LayerKind::of::<DepthwiseConv2DConfig>(|| {
        LayerExample::new(
            &DepthwiseConv2D::new(3)
                .depth_multiplier(2)
                .padding(Padding::Same),
            &[&[3, 5, 5]],
        )
    })
    .keras(&[KerasClass::new("DepthwiseConv2D", depthwise_from_keras)]),
    LayerKind::of::<SeparableConv2DConfig>(|| {
        LayerExample::new(&SeparableConv2D::new(4, 3).strides(2), &[&[3, 7, 7]])
    })
    .keras(&[KerasClass::new("SeparableConv2D", separable_from_keras)]),
];

fn depthwise_from_keras(layer: &KerasLayer) -> Translation {
    let mut config = window_from_keras(layer)?;
    config["depth_multiplier"] = layer.int("depth_multiplier")?.into();
    Ok(Translated::new("DepthwiseConv2D", config)?
        .weight("kernel", 0, Convert::Depthwise)
        .bias(layer.flag("use_bias", true), 1))
}

fn separable_from_keras(layer: &KerasLayer) -> Translation {
    let mut config = window_from_keras(layer)?;
    config["filters"] = layer.int("filters")?.into();
    config["depth_multiplier"] = layer.int("depth_multiplier")?.into();
    Ok(Translated::new("SeparableConv2D", config)?
        .weight("depthwise_kernel", 0, Convert::Depthwise)
        .weight("pointwise_kernel", 1, Convert::Kernel)
        .bias(layer.flag("use_bias", true), 2))
}

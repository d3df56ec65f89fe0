//! `Conv2D`: 2-D convolution over NCHW tensors, with TensorFlow's exact 'same' padding.
//!
//! The kernel is stored in candle's layout `(filters, in_channels / groups, kh, kw)`, so it is
//! used without a transpose; Keras's `(kh, kw, in, filters)` kernels convert with
//! `permute((3, 2, 0, 1))`.

use candle_core::Tensor;

use crate::fusion::{ElementWise, Fusion};
use crate::graph::{Configured, Initializer, LayerOp, ParamSpec, Params};
use crate::layers::keras::{Convert, KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::native_backward::Native;
use crate::layers::padding::{
    expect_chw, expect_positive, one_input, same_padding, window_output_len,
};
use crate::layers::window_builders::window_builders;
use crate::layers::{ActivationFn, Padding};
use crate::ops::{self, Conv2dGeometry};
use crate::{Error, Result};

/// Configuration of a [`Conv2D`] layer; defaults are Keras's.
///
/// # Examples
/// ```
/// use candle_functional::layers::{Conv2DConfig, Initializer, Padding};
/// let c = Conv2DConfig::default();
/// assert_eq!((c.kernel_size, c.strides, c.padding), ((3, 3), 1, Padding::Valid));
/// assert_eq!(c.kernel_initializer, Initializer::GlorotUniform);
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Conv2DConfig {
    /// Number of output channels.
    pub filters: usize,
    /// Window height and width.
    pub kernel_size: (usize, usize),
    /// Step of the window, the same along both axes (candle's convolution takes one stride).
    pub strides: usize,
    /// `Valid` (default) or TensorFlow's `Same`.
    pub padding: Padding,
    /// Spacing of the window's taps, the same along both axes.
    pub dilation: usize,
    /// Channel groups: `in_channels` and `filters` must both be multiples of it.
    pub groups: usize,
    /// Adds a bias per filter (default `true`).
    pub use_bias: bool,
    /// Applied to the output (default `Linear`).
    pub activation: ActivationFn,
    /// Default Glorot uniform, with Keras's fans: `kh * kw * in / groups` and `kh * kw * filters`.
    pub kernel_initializer: Initializer,
    /// Default zeros.
    pub bias_initializer: Initializer,
}

impl Default for Conv2DConfig {
    fn default() -> Self {
        Self {
            filters: 1,
            kernel_size: (3, 3),
            strides: 1,
            padding: Padding::Valid,
            dilation: 1,
            groups: 1,
            use_bias: true,
            activation: ActivationFn::Linear,
            kernel_initializer: Initializer::GlorotUniform,
            bias_initializer: Initializer::Zeros,
        }
    }
}

/// 2-D convolution layer.
///
/// # Shapes
/// Input `(batch, in_channels, h, w)`; output `(batch, filters, h', w')` with
/// `h' = ceil(h / strides)` for `Same` and `(h - span) / strides + 1` for `Valid`.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let x = Input::new([3, 32, 32]);
/// let y = Conv2D::new(64, 3).strides(2).padding(Padding::Same).call(&x)?;
/// assert_eq!(y.shape(), &[64, 16, 16]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type Conv2D = Configured<Conv2DConfig>;

window_builders!(Conv2D, "Conv2D::new(8, 3)");

impl Conv2D {
    /// A convolution with `filters` outputs and a square `kernel_size` window; Keras's defaults
    /// otherwise (stride 1, 'valid', bias, Glorot uniform).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(Conv2D::new(8, 5).config().kernel_size, (5, 5));
    /// ```
    pub fn new(filters: usize, kernel_size: usize) -> Self {
        Self::from_config(Conv2DConfig {
            filters,
            kernel_size: (kernel_size, kernel_size),
            ..Default::default()
        })
    }

    /// Grouped convolution.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let y = Conv2D::new(4, 3).groups(2).call(&Input::new([4, 5, 5]))?;
    /// assert_eq!(y.layer().param_specs()[0].shape(), &[4, 2, 3, 3]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn groups(self, groups: usize) -> Self {
        self.with_config(|c| c.groups = groups)
    }

    /// Kernel initializer (`Initializer::HeNormal` for ReLU networks, say).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let conv = Conv2D::new(8, 3).kernel_initializer(Initializer::HeNormal);
    /// assert_eq!(conv.config().kernel_initializer, Initializer::HeNormal);
    /// ```
    pub fn kernel_initializer(self, init: Initializer) -> Self {
        self.with_config(|c| c.kernel_initializer = init)
    }
}

impl Conv2DConfig {
    fn check(&self, layer: &str, in_channels: usize) -> Result<()> {
        let (kh, kw) = self.kernel_size;
        expect_positive(
            layer,
            "filters, kernel size, strides, dilation and groups",
            &[
                self.filters,
                kh,
                kw,
                self.strides,
                self.dilation,
                self.groups,
            ],
        )?;
        if !in_channels.is_multiple_of(self.groups) || !self.filters.is_multiple_of(self.groups) {
            return Err(Error::InvalidInput {
                layer: layer.to_string(),
                message: format!(
                    "{in_channels} input channels and {} filters must both be multiples of groups = {}",
                    self.filters, self.groups
                ),
            });
        }
        Ok(())
    }

    /// `(top, bottom, left, right)` zero padding for an `h x w` input.
    pub(crate) fn pads(&self, h: usize, w: usize) -> (usize, usize, usize, usize) {
        match self.padding {
            Padding::Valid => (0, 0, 0, 0),
            Padding::Same => {
                let (t, b) = same_padding(h, self.kernel_size.0, self.strides, self.dilation);
                let (l, r) = same_padding(w, self.kernel_size.1, self.strides, self.dilation);
                (t, b, l, r)
            }
        }
    }
}

impl LayerOp for Conv2DConfig {
    fn type_name(&self) -> &'static str {
        "Conv2D"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let input = one_input(layer, inputs)?;
        let (c, h, w) = expect_chw(layer, input)?;
        self.check(layer, c)?;
        let (kh, kw) = self.kernel_size;
        let oh = window_output_len(layer, h, kh, self.strides, self.dilation, self.padding)?;
        let ow = window_output_len(layer, w, kw, self.strides, self.dilation, self.padding)?;
        Ok(vec![vec![self.filters, oh, ow]])
    }

    fn param_specs(&self, inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        let in_channels = inputs.first().and_then(|s| s.first()).copied().unwrap_or(1);
        let per_group = in_channels / self.groups.max(1);
        let (kh, kw) = self.kernel_size;
        // Saturating: a shape too large to count is refused when the model is built.
        let receptive = kh.saturating_mul(kw);
        let mut specs = vec![
            ParamSpec::new(
                "kernel",
                vec![self.filters, per_group, kh, kw],
                self.kernel_initializer.clone(),
            )
            .fans(
                receptive.saturating_mul(per_group),
                receptive.saturating_mul(self.filters),
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
        self.convolve(&inputs[0], params, Fusion::new())
    }

    /// Lets the plan's own backward pass find the layer (`train/tape.rs`).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    /// A ReLU that is the only reader of this layer's output runs inside the convolution's op
    /// (when the layer has no activation of its own).
    fn accepts_epilogue(&self, function: ElementWise) -> bool {
        function == ElementWise::Relu && self.activation == ActivationFn::Linear
    }

    fn forward_fused(
        &self,
        fusion: Fusion,
        inputs: &[Tensor],
        params: &Params,
    ) -> Result<Vec<Tensor>> {
        let ([x], None, Some(ElementWise::Relu)) = (inputs, fusion.prologue(), fusion.epilogue())
        else {
            return Err(Error::InvalidArgument(format!(
                "Conv2D fuses only a ReLU after it, on one input: not {fusion:?} on {} input(s)",
                inputs.len()
            )));
        };
        self.convolve(x, params, fusion)
    }
}

impl Conv2DConfig {
    /// `fusion` with Keras's `activation="relu"` as its epilogue: it runs inside the
    /// convolution's op too.
    fn with_activation(&self, fusion: Fusion) -> Fusion {
        match self.activation {
            ActivationFn::Relu => fusion.with_epilogue(ElementWise::Relu),
            _ => fusion,
        }
    }

    /// The geometry of the convolution of an `h` by `w` map.
    fn geometry(&self, h: usize, w: usize) -> Conv2dGeometry {
        Conv2dGeometry {
            pad: self.pads(h, w),
            stride: self.strides,
            dilation: self.dilation,
            groups: self.groups,
        }
    }

    /// The forward pass for the plan's own backward pass (`train/tape.rs`), `params` handing
    /// out detached weights: the output and what its gradients need, which are `composed` of
    /// the device's separate kernels where asked (see [`Native`]). `None` where the gradients
    /// go through candle's autograd: an activation other than ReLU, a fused prologue, or an
    /// input without gradient kernels of its own ([`ops::has_native_gradients`]).
    pub(crate) fn forward_native(
        &self,
        x: &Tensor,
        params: &Params,
        fusion: Fusion,
        composed: bool,
    ) -> Result<Option<(Tensor, Native)>> {
        let supported = matches!(self.activation, ActivationFn::Linear | ActivationFn::Relu)
            && fusion.prologue().is_none()
            && x.rank() == 4
            && ops::has_native_gradients(x);
        if !supported {
            return Ok(None);
        }
        let Convolved {
            y,
            kernel,
            geometry,
            fusion,
        } = self.convolved(x, params, fusion)?;
        let native = Native::Conv2d {
            x: x.clone(),
            kernel,
            y: fusion.relu_after().then(|| y.clone()),
            relu: fusion.relu_after(),
            geometry,
            kernel_var: params.trainable_var("kernel")?,
            bias_var: match self.use_bias {
                true => params.trainable_var("bias")?,
                false => None,
            },
            bias: self.use_bias,
            composed,
        };
        Ok(Some((y, native)))
    }

    /// `true` when the layer with `fusion` is one op of the crate's CPU kernels on `x`: an
    /// NCHW input they take, no prologue, no activation other than ReLU (which the op
    /// applies as its epilogue). Where a batch norm after it can be folded in
    /// ([`forward_then_affine`](Self::forward_then_affine); elsewhere the batch norm's
    /// per-channel values would be read back from the device on every call).
    pub(crate) fn runs_cpu_kernel(&self, x: &Tensor, fusion: Fusion) -> bool {
        // Rank 5: an input handed over in oneDNN's blocked layout, in inference
        // (`models/inference.rs`), f32 on the CPU.
        let ranks = if cfg!(feature = "onednn") {
            4..=5
        } else {
            4..=4
        };
        matches!(self.activation, ActivationFn::Linear | ActivationFn::Relu)
            && fusion.prologue().is_none()
            && ranks.contains(&x.rank())
            && ops::takes_cpu_kernels(x)
    }

    /// In inference: the layer's output for `x` (with `fusion`'s epilogue), then a ReLU where
    /// `relu_before`, then `affine` per filter (a BatchNorm that reads only this layer's
    /// output, folded in: `BatchNormConfig::eval_affine`), as the convolution writes it.
    /// Called where [`runs_cpu_kernel`](Self::runs_cpu_kernel) says so.
    pub(crate) fn forward_then_affine(
        &self,
        x: &Tensor,
        params: &Params,
        (fusion, relu_before): (Fusion, bool),
        affine: &ops::ChannelAffine,
    ) -> Result<Tensor> {
        if !self.runs_cpu_kernel(x, fusion) {
            return Err(Error::InvalidArgument(format!(
                "Conv2D with {fusion:?} and activation {:?} cannot apply a folded batch norm",
                self.activation
            )));
        }
        let kernel = params.get("kernel")?;
        let (_, _, h, w) = x.dims4()?;
        let relu = relu_before || self.with_activation(fusion).relu_after();
        let bias = self.use_bias.then(|| params.get("bias")).transpose()?;
        ops::conv2d_affine(
            x,
            &kernel,
            (bias.as_ref(), relu),
            affine,
            self.geometry(h, w),
        )
    }

    /// In inference with the feature `onednn`: [`forward_then_affine`](Self::forward_then_affine)
    /// (the layer alone without `affine`) on oneDNN's layouts: `x` in NCHW or handed over by
    /// the convolution before in oneDNN's blocked layout (rank 5), the output left in that
    /// layout where `blocked_output` (`ops::conv2d_handoff`). `None` where the activation,
    /// the fusion or `x` are not for the crate's f32 CPU kernels: the caller runs the layer
    /// as usual then, on NCHW.
    #[cfg(feature = "onednn")]
    pub(crate) fn forward_handoff(
        &self,
        x: &Tensor,
        params: &Params,
        (fusion, relu_before): (Fusion, bool),
        affine: Option<&ops::ChannelAffine>,
        blocked_output: bool,
    ) -> Result<Option<Tensor>> {
        let kernels_take = matches!(self.activation, ActivationFn::Linear | ActivationFn::Relu);
        let (&([_, _, h, w] | [_, _, h, w, _]), true, None) =
            (x.dims(), kernels_take, fusion.prologue())
        else {
            return Ok(None);
        };
        let kernel = params.get("kernel")?;
        let relu = relu_before || self.with_activation(fusion).relu_after();
        let bias = self.use_bias.then(|| params.get("bias")).transpose()?;
        let geometry = self.geometry(h, w);
        ops::conv2d_handoff(
            x,
            &kernel,
            (bias.as_ref(), relu),
            affine,
            geometry,
            blocked_output,
        )
    }

    /// The convolution's op on `x` with the bias and `fusion` (its activation's ReLU
    /// included), and what went into it.
    fn convolved(&self, x: &Tensor, params: &Params, fusion: Fusion) -> Result<Convolved> {
        let kernel = params.get("kernel")?;
        let (_, _, h, w) = x.dims4()?;
        let geometry = self.geometry(h, w);
        let fusion = self.with_activation(fusion);
        let bias = self.use_bias.then(|| params.get("bias")).transpose()?;
        let y = ops::fused_conv2d(x, &kernel, bias.as_ref(), fusion, geometry)?;
        Ok(Convolved {
            y,
            kernel,
            geometry,
            fusion,
        })
    }

    /// The layer's output for `x`, passed through the epilogue of `fusion` (a folded ReLU).
    fn convolve(&self, x: &Tensor, params: &Params, fusion: Fusion) -> Result<Vec<Tensor>> {
        let Convolved { y, fusion, .. } = self.convolved(x, params, fusion)?;
        Ok(vec![if fusion.relu_after() {
            y
        } else {
            self.activation.apply(&y)?
        }])
    }
}

/// What [`Conv2DConfig::convolved`] ran: the op's output, the kernel and geometry it used,
/// and the fusion with the activation's ReLU.
struct Convolved {
    y: Tensor,
    kernel: Tensor,
    geometry: Conv2dGeometry,
    fusion: Fusion,
}

/// `Conv2D`, saved and imported from Keras's `Conv2D` (`groups` included).
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<Conv2DConfig>(|| {
    LayerExample::new(
        &Conv2D::new(4, 3).padding(Padding::Same).strides(2),
        &[&[2, 5, 6]],
    )
})
.keras(&[KerasClass::new("Conv2D", conv2d_from_keras)])];

/// The window options Keras's convolutions share (`kernel_size`, `strides`, `padding`,
/// `dilation_rate`, `use_bias`, `activation`) in this crate's field names, after refusing a
/// channels-first layer or an input that is not a map; the convolution files add the rest.
pub(crate) fn window_from_keras(
    layer: &KerasLayer,
) -> std::result::Result<serde_json::Value, String> {
    layer.channels_last()?;
    layer.needs_rank4()?;
    Ok(serde_json::json!({
        "kernel_size": layer.pair("kernel_size")?,
        "strides": layer.square("strides")?,
        "padding": layer.padding()?,
        "dilation": layer.square("dilation_rate")?,
        "use_bias": layer.flag("use_bias", true),
        "activation": layer.named::<ActivationFn>("activation")?,
    }))
}

fn conv2d_from_keras(layer: &KerasLayer) -> Translation {
    let mut config = window_from_keras(layer)?;
    config["filters"] = layer.int("filters")?.into();
    config["groups"] = layer.field("groups").as_u64().unwrap_or(1).into();
    Ok(Translated::new("Conv2D", config)?
        .weight("kernel", 0, Convert::Kernel)
        .bias(layer.flag("use_bias", true), 1))
}

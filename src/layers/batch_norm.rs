//! `BatchNorm`: Keras's `BatchNormalization`, with its defaults and its update rule.
//!
//! In training mode it normalizes with the batch's mean and *biased* variance and moves the
//! running statistics towards them (`moving = momentum * moving + (1 - momentum) * batch`,
//! Keras's convention: momentum 0.99 keeps 99% of the old value; candle-nn's `BatchNorm` uses
//! the opposite convention and the unbiased variance). In eval mode it uses the running
//! statistics. The running statistics are non-trainable state: saved with the weights,
//! never handed to an optimizer.

use candle_core::{DType, Tensor, Var};

use crate::fusion::{ElementWise, Fusion};
use crate::graph::{Configured, Initializer, LayerOp, ParamSpec, Params, ReplicaSum};
use crate::layers::keras::{
    Convert, FeatureOrder, KerasClass, KerasLayer, Translated, Translation,
};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::layers::native_backward::Native;
use crate::layers::padding::{channel_axis, one_input};
use crate::ops;
use crate::support::dtype::Cast;
use crate::{Error, Result};

/// A batch norm in inference as a map per channel, `y = max?(scale · v + shift)`
/// ([`BatchNormConfig::eval_map`]), that a convolution before it applies as it writes its
/// output (`models/inference.rs`).
pub(crate) type BatchNormMap = ops::ChannelAffine;

/// Configuration of a [`BatchNorm`] layer; defaults are Keras's.
///
/// # Examples
/// ```
/// use candle_functional::layers::BatchNormConfig;
/// let c = BatchNormConfig::default();
/// assert_eq!((c.axis, c.momentum, c.epsilon), (1, 0.99, 1e-3));
/// ```
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct BatchNormConfig {
    /// The channel axis of the full tensor (batch is axis 0): 1 for NCHW; negative counts
    /// from the end, except on `(C, H, W)` maps, where Keras's `-1` (channels) and NCHW's
    /// `-1` (width) differ: there it is refused, naming both.
    pub axis: isize,
    /// Weight of the old value in the running-statistics update.
    pub momentum: f64,
    /// Added to the variance before the square root.
    pub epsilon: f64,
    /// Learn a shift `beta` (default `true`).
    pub center: bool,
    /// Learn a scale `gamma` (default `true`).
    pub scale: bool,
    /// Default ones.
    pub gamma_initializer: Initializer,
    /// Default zeros.
    pub beta_initializer: Initializer,
    /// Default zeros.
    pub moving_mean_initializer: Initializer,
    /// Default ones.
    pub moving_variance_initializer: Initializer,
    /// Keras's `synchronized`: in a data-parallel training step, the batch statistics are
    /// those of the whole global batch, summed across replicas (PyTorch's `SyncBatchNorm`),
    /// instead of each replica's own rows. Default `false`; no effect in one process.
    pub synchronized: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            axis: 1,
            momentum: 0.99,
            epsilon: 1e-3,
            center: true,
            scale: true,
            gamma_initializer: Initializer::Ones,
            beta_initializer: Initializer::Zeros,
            moving_mean_initializer: Initializer::Zeros,
            moving_variance_initializer: Initializer::Ones,
            synchronized: false,
        }
    }
}

/// Batch normalization over the channel axis (Keras's `BatchNormalization`).
///
/// Weights: `gamma`, `beta` (trainable; absent when `scale` / `center` is off),
/// `moving_mean`, `moving_variance` (state).
///
/// # Shapes
/// Output shape = input shape.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// let y = BatchNorm::new().call(&Input::new([64, 32, 32]))?;
/// let specs = y.layer().param_specs();
/// assert_eq!(specs.iter().filter(|s| s.trainable()).count(), 2);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub type BatchNorm = Configured<BatchNormConfig>;

impl BatchNorm {
    /// Batch normalization with Keras's defaults.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(BatchNorm::new().config().momentum, 0.99);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Momentum of the running statistics (Keras's convention).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(BatchNorm::new().momentum(0.9).config().momentum, 0.9);
    /// ```
    pub fn momentum(self, momentum: f64) -> Self {
        self.with_config(|c| c.momentum = momentum)
    }

    /// Epsilon added to the variance.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(BatchNorm::new().epsilon(1e-5).config().epsilon, 1e-5);
    /// ```
    pub fn epsilon(self, epsilon: f64) -> Self {
        self.with_config(|c| c.epsilon = epsilon)
    }

    /// The channel axis (1 for NCHW).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert_eq!(BatchNorm::new().axis(-1).config().axis, -1);
    /// ```
    pub fn axis(self, axis: isize) -> Self {
        self.with_config(|c| c.axis = axis)
    }

    /// Batch statistics over the whole global batch in data-parallel training (Keras's
    /// `synchronized=True`, PyTorch's `SyncBatchNorm`): the replicas sum their per-channel
    /// sums in the forward pass and the gradients in the backward pass, so a step over
    /// several ranks equals one process's step over the whole batch. Costs two small
    /// all-reduces per layer and step, and the fused kernels (it runs on plain tensor ops).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// assert!(BatchNorm::new().synchronized(true).config().synchronized);
    /// ```
    pub fn synchronized(self, synchronized: bool) -> Self {
        self.with_config(|c| c.synchronized = synchronized)
    }
}

impl BatchNormConfig {
    /// The channel axis in the full tensor (rank = per-sample rank + 1).
    fn full_axis(&self, layer: &str, sample_rank: usize) -> Result<usize> {
        channel_axis(layer, self.axis, sample_rank)
    }
}

impl LayerOp for BatchNormConfig {
    fn type_name(&self) -> &'static str {
        "BatchNormalization"
    }

    fn to_config(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn output_shapes(&self, layer: &str, inputs: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        let x = one_input(layer, inputs)?;
        self.full_axis(layer, x.len())?;
        if !(0.0..=1.0).contains(&self.momentum) || self.epsilon <= 0.0 {
            return Err(Error::InvalidConfig {
                layer: layer.to_string(),
                message: format!(
                    "momentum must be in [0, 1] and epsilon positive, got {} and {}",
                    self.momentum, self.epsilon
                ),
            });
        }
        Ok(vec![x.to_vec()])
    }

    fn param_specs(&self, inputs: &[Vec<usize>]) -> Vec<ParamSpec> {
        let Some(shape) = inputs.first() else {
            return Vec::new();
        };
        let Ok(axis) = self.full_axis("", shape.len()) else {
            return Vec::new();
        };
        let c = vec![shape[axis - 1]];
        let mut specs = Vec::new();
        if self.scale {
            specs.push(ParamSpec::new(
                "gamma",
                c.clone(),
                self.gamma_initializer.clone(),
            ));
        }
        if self.center {
            specs.push(ParamSpec::new(
                "beta",
                c.clone(),
                self.beta_initializer.clone(),
            ));
        }
        specs.push(
            ParamSpec::new(
                "moving_mean",
                c.clone(),
                self.moving_mean_initializer.clone(),
            )
            .non_trainable(),
        );
        specs.push(
            ParamSpec::new(
                "moving_variance",
                c,
                self.moving_variance_initializer.clone(),
            )
            .non_trainable(),
        );
        specs
    }

    fn forward(&self, inputs: &[Tensor], params: &Params) -> Result<Vec<Tensor>> {
        self.normalize(&inputs[..1], params, Fusion::new())
    }

    /// Lets the plan's own backward pass find the layer (`train/tape.rs`).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    /// A ReLU, an Add or both, read only by this layer, run inside its kernels (the article's
    /// `relu_bn`, and the residual block's `Add → relu_bn`).
    fn accepts_prologue(&self, function: ElementWise) -> bool {
        // A synchronized layer runs on plain tensor ops, around its cross-replica sums.
        !self.synchronized
            && matches!(
                function,
                ElementWise::Relu | ElementWise::Add | ElementWise::AddRelu
            )
    }

    /// A ReLU that reads only this layer's output runs inside its kernel too (Conv →
    /// BatchNorm → ReLU).
    fn accepts_epilogue(&self, function: ElementWise) -> bool {
        !self.synchronized && function == ElementWise::Relu
    }

    /// The kernels check the rest of the fusion (`ops::fused_batch_norm_train`).
    fn forward_fused(
        &self,
        fusion: Fusion,
        inputs: &[Tensor],
        params: &Params,
    ) -> Result<Vec<Tensor>> {
        if inputs.len() != fusion.arity() {
            return Err(Error::InvalidArgument(format!(
                "BatchNorm with {fusion:?}: {} input(s) expected, got {}",
                fusion.arity(),
                inputs.len()
            )));
        }
        self.normalize(inputs, params, fusion)
    }
}

impl BatchNormConfig {
    /// In inference on an NCHW input of `dtype` and `channels` channels, the layer with
    /// `fusion` (a ReLU before it, folded into the convolution that feeds it, and/or one
    /// after it) as a per-channel map that a convolution can apply as it writes its output
    /// (`ops::conv2d_affine`). `None` in training mode (a frozen layer there included), with
    /// a channel axis other than 1, an Add folded in, or a dtype other than f32/f64.
    pub(crate) fn eval_affine(
        &self,
        (dtype, channels): (DType, usize),
        params: &Params,
        fusion: Fusion,
    ) -> Result<Option<BatchNormMap>> {
        if fusion.arity() != 1 {
            return Ok(None);
        }
        self.eval_map((dtype, channels), params, fusion.relu_after())
    }

    /// In inference with the feature `onednn`: the layer (with `fusion`'s Add and ReLUs) on
    /// `inputs` that the layers before all handed over in oneDNN's blocked layout (rank 5,
    /// `models/inference.rs`), computed in that layout, the output left in it with
    /// `blocked_output`, else NCHW. `None` where an input is NCHW (where a convolution before
    /// ran on the crate's own kernels, as at batch 1, NCHW stays the cheaper layout from
    /// there on) or the layer or the inputs are not for this path (f32 on the CPU, channels
    /// on axis 1, asking for no gradient): the caller runs the layer as usual, on NCHW.
    #[cfg(feature = "onednn")]
    pub(crate) fn forward_blocked(
        &self,
        inputs: &[Tensor],
        params: &Params,
        fusion: Fusion,
        blocked_output: bool,
    ) -> Result<Option<Tensor>> {
        let Some(channels) = ops::onednn::blocked_channels(inputs) else {
            return Ok(None);
        };
        if inputs.len() != fusion.arity() {
            return Ok(None);
        }
        let Some(map) = self.eval_map((DType::F32, channels), params, fusion.relu_after())? else {
            return Ok(None);
        };
        let map = (&map, fusion.relu_before());
        Ok(Some(ops::onednn::batch_norm_blocked(
            inputs,
            map,
            blocked_output,
        )?))
    }

    /// In inference, the per-channel map `y = max?(scale · v + shift)` (the ReLU with
    /// `relu_after`) the layer applies to its operand `v` (the input, or the sum of its
    /// inputs through a ReLU where an Add and a ReLU are folded in), computed as its CPU
    /// kernel computes it. `None` where [`eval_affine`](Self::eval_affine) says, an Add
    /// folded in aside.
    pub(crate) fn eval_map(
        &self,
        (dtype, channels): (DType, usize),
        params: &Params,
        relu_after: bool,
    ) -> Result<Option<BatchNormMap>> {
        let supported = !params.mode().is_train()
            && self.full_axis("", 3)? == 1
            && matches!(dtype, DType::F32 | DType::F64);
        if !supported {
            return Ok(None);
        }
        let gamma = self.scale.then(|| params.get_stored("gamma")).transpose()?;
        let beta = self.center.then(|| params.get_stored("beta")).transpose()?;
        let affine = ops::batch_norm_eval_affine(
            (dtype, channels),
            (gamma.as_ref(), beta.as_ref()),
            (
                &params.get_stored("moving_mean")?,
                &params.get_stored("moving_variance")?,
            ),
            self.epsilon,
            relu_after,
        )?;
        Ok(Some(affine))
    }

    /// The training-mode forward pass for the plan's own backward pass (`train/tape.rs`),
    /// `params` handing out detached weights: the output and what its gradients need, the
    /// moving statistics updated as [`normalize`](Self::normalize) does. `None` where the
    /// gradients go through candle's autograd: inference mode or a frozen layer, channels
    /// on another axis than 1, statistics summed across replicas, or inputs without gradient
    /// kernels of their own ([`ops::has_native_gradients`]). Where the gradients are
    /// `composed` of the device's separate kernels (see [`Native`]), the prologue's sum and
    /// ReLU run first, as passes of their own, and their result is kept.
    pub(crate) fn forward_native(
        &self,
        inputs: &[Tensor],
        params: &Params,
        fusion: Fusion,
        composed: bool,
    ) -> Result<Option<(Tensor, Native)>> {
        let Some(x) = inputs.first() else {
            return Ok(None);
        };
        let supported = params.updates_state()
            && !(self.synchronized && params.replica_sum().is_some())
            && inputs.len() == fusion.arity()
            && x.rank() >= 2
            && self.full_axis("", x.rank() - 1)? == 1
            && inputs
                .iter()
                .all(|t| ops::has_native_gradients(t) && t.dtype() == x.dtype());
        if !supported {
            return Ok(None);
        }
        let gamma = self.scale.then(|| params.get_stored("gamma")).transpose()?;
        let beta = self.center.then(|| params.get_stored("beta")).transpose()?;
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let (saved, normalized) = match composed {
            false => (inputs.to_vec(), fusion),
            true => {
                let operand = ops::batch_norm_operand(&refs, fusion)?;
                let epilogue = match fusion.epilogue() {
                    Some(e) => Fusion::new().with_epilogue(e),
                    None => Fusion::new(),
                };
                (vec![operand], epilogue)
            }
        };
        let saved_refs: Vec<&Tensor> = saved.iter().collect();
        let (y, mean, var) = ops::fused_batch_norm_train(
            &saved_refs,
            normalized,
            gamma.as_ref(),
            beta.as_ref(),
            self.epsilon,
        )?;
        self.update_moving_statistics(params, &mean, &var)?;
        let channels = x.dim(1)?;
        let trainable = |name: &str, used: bool| -> Result<Option<Var>> {
            Ok(match used {
                true => params.trainable_var(name)?,
                false => None,
            })
        };
        let native = Native::BatchNorm {
            saved,
            arity: inputs.len(),
            gamma: match gamma {
                Some(g) => g.cast(x.dtype())?,
                None => Tensor::ones(channels, x.dtype(), x.device())?,
            },
            beta: match beta {
                Some(b) => b.cast(x.dtype())?,
                None => Tensor::zeros(channels, x.dtype(), x.device())?,
            },
            mean,
            var,
            epsilon: self.epsilon,
            fusion,
            y: fusion.relu_after().then(|| y.clone()),
            gamma_var: trainable("gamma", self.scale)?,
            beta_var: trainable("beta", self.center)?,
            composed,
        };
        Ok(Some((y, native)))
    }

    /// Keras's rule: the old value keeps `momentum`; the variance is the biased one.
    fn update_moving_statistics(&self, params: &Params, mean: &Tensor, var: &Tensor) -> Result<()> {
        for (name, batch) in [("moving_mean", mean), ("moving_variance", var)] {
            let moving = params.state(name)?;
            let batch = batch.cast(moving.dtype())?;
            let kept = (moving * self.momentum)?;
            params.set_state(name, (kept + (batch * (1.0 - self.momentum))?)?)?;
        }
        Ok(())
    }

    /// The layer's output for `inputs` (one, or two of one shape summed by the prologue), with
    /// the element-wise functions of `fusion` before and after.
    fn normalize(&self, inputs: &[Tensor], params: &Params, fusion: Fusion) -> Result<Vec<Tensor>> {
        let axis = self.full_axis("", inputs[0].rank().saturating_sub(1))?;
        // The kernels take channels on axis 1 (NCHW); another channel axis is moved there
        // and back.
        let inputs = inputs
            .iter()
            .map(|x| {
                if axis == 1 {
                    Ok(x.clone())
                } else {
                    x.transpose(1, axis)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let inputs: Vec<&Tensor> = inputs.iter().collect();
        // Weights and statistics in their stored dtype: f32 under bf16 mixed precision.
        let gamma = self.scale.then(|| params.get_stored("gamma")).transpose()?;
        let beta = self.center.then(|| params.get_stored("beta")).transpose()?;
        // A frozen BatchNorm runs in inference mode even in a training step (Keras 3).
        let replicas = params.replica_sum().filter(|_| self.synchronized);
        let y = if let (true, Some(replicas), [x]) = (params.updates_state(), replicas, &inputs[..])
        {
            self.normalize_across_replicas(x, gamma.as_ref(), beta.as_ref(), params, replicas)?
        } else if params.updates_state() {
            let (y, batch_mean, batch_var) = ops::fused_batch_norm_train(
                &inputs,
                fusion,
                gamma.as_ref(),
                beta.as_ref(),
                self.epsilon,
            )?;
            self.update_moving_statistics(params, &batch_mean, &batch_var)?;
            y
        } else {
            ops::fused_batch_norm_eval(
                &inputs,
                fusion,
                gamma.as_ref(),
                beta.as_ref(),
                &params.get_stored("moving_mean")?,
                &params.get_stored("moving_variance")?,
                self.epsilon,
            )?
        };
        Ok(vec![if axis == 1 { y } else { y.transpose(1, axis)? }])
    }

    /// Training mode with the statistics of the whole global batch: per-channel sums (with
    /// the sample count) summed across replicas give the mean, then the centred squares
    /// summed the same way give the biased variance (two passes, as exact as one process's
    /// kernel). In f32 whatever the compute dtype; channels on axis 1.
    fn normalize_across_replicas(
        &self,
        x: &Tensor,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        params: &Params,
        replicas: &dyn ReplicaSum,
    ) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let channels = xf.dim(1)?;
        let reduced: Vec<usize> = (0..xf.rank()).filter(|&d| d != 1).collect();
        let mut per_channel = vec![1; xf.rank()];
        per_channel[1] = channels;
        let count = (xf.elem_count() / channels.max(1)) as f32;
        let sums = Tensor::cat(
            &[
                xf.sum_keepdim(reduced.clone())?.flatten_all()?,
                Tensor::new(&[count], xf.device())?,
            ],
            0,
        )?;
        let sums = replicas.sum(&sums)?;
        let total = sums.narrow(0, channels, 1)?;
        let mean = sums.narrow(0, 0, channels)?.broadcast_div(&total)?;
        let centered = xf.broadcast_sub(&mean.reshape(per_channel.as_slice())?)?;
        let squares = centered.sqr()?.sum_keepdim(reduced)?.flatten_all()?;
        let variance = replicas.sum(&squares)?.broadcast_div(&total)?;
        let inverse = (&variance + self.epsilon)?.sqrt()?.recip()?;
        let mut y = centered.broadcast_mul(&inverse.reshape(per_channel.as_slice())?)?;
        if let Some(gamma) = gamma {
            y = y.broadcast_mul(
                &gamma
                    .to_dtype(DType::F32)?
                    .reshape(per_channel.as_slice())?,
            )?;
        }
        if let Some(beta) = beta {
            y = y.broadcast_add(&beta.to_dtype(DType::F32)?.reshape(per_channel.as_slice())?)?;
        }
        for (name, batch) in [("moving_mean", mean), ("moving_variance", variance)] {
            let moving = params.state(name)?;
            let batch = batch.detach().cast(moving.dtype())?;
            let kept = (moving * self.momentum)?;
            params.set_state(name, (kept + (batch * (1.0 - self.momentum))?)?)?;
        }
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// `BatchNormalization`, saved and imported from Keras's class of that name over the channel
/// axis (after a channels-last Flatten too: its vectors are then reordered).
pub(crate) const KINDS: &[LayerKind] = &[LayerKind::of::<BatchNormConfig>(|| {
    LayerExample::new(&BatchNorm::new().momentum(0.9), &[&[3, 4, 4]])
})
.keras(
    &[KerasClass::new("BatchNormalization", batch_norm_from_keras)
        .feature_order(FeatureOrder::PassesOn)],
)];

fn batch_norm_from_keras(layer: &KerasLayer) -> Translation {
    let axis = layer.one_axis()?;
    if axis != 1 {
        return Err(format!(
            "normalizing over axis {axis} (this crate's layout) is not supported: only the channel axis"
        ));
    }
    if layer.flag("renorm", false) {
        return Err("renorm is not supported".into());
    }
    let (scale, center) = (layer.flag("scale", true), layer.flag("center", true));
    let convert = match layer.order() {
        Some((h, w, c)) => Convert::FeaturesFromHwc(h, w, c),
        None => Convert::Same,
    };
    let config = BatchNormConfig {
        axis: 1,
        momentum: layer.float("momentum")?,
        epsilon: layer.float("epsilon")?,
        center,
        scale,
        synchronized: layer.flag("synchronized", false),
        ..Default::default()
    };
    Ok(
        Translated::new("BatchNormalization", config)?.optional_weights(
            &[
                (scale, "gamma"),
                (center, "beta"),
                (true, "moving_mean"),
                (true, "moving_variance"),
            ],
            &convert,
        ),
    )
}

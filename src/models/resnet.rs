//! The networks of "Building a ResNet in Keras": [`relu_bn`], [`residual_block`],
//! [`create_res_net`] and its shortcut-free twin [`create_plain_net`], plus [`ResNetConfig`]
//! to build variants (fewer stages, narrower layers, other inputs).
//!
//! Layer order follows the article exactly: a BatchNorm on the raw input, Conv(64, 3, same),
//! ReLU then BatchNorm (`relu_bn`), stages of 2, 5, 5, 2 blocks with 64, 128, 256, 512
//! filters where the first block of every stage but the first halves the resolution, and an
//! `AveragePooling2D(4)`, `Flatten`, `Dense(10, softmax)` head.

use crate::graph::{Input, Layer, SymbolicTensor};
use crate::layers::{
    ActivationFn, Add, AveragePooling2D, BatchNorm, Conv2D, Dense, Flatten, Padding, ReLU,
};
use crate::models::Model;
use crate::{Error, Result};

/// ReLU followed by BatchNorm, the article's `relu_bn`.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// use candle_functional::models::relu_bn;
/// let y = relu_bn(&Input::new([64, 32, 32]))?;
/// assert_eq!(y.layer().op().type_name(), "BatchNormalization");
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn relu_bn(inputs: &SymbolicTensor) -> Result<SymbolicTensor> {
    let relu = ReLU::new().call(inputs)?;
    BatchNorm::new().call(&relu)
}

/// The article's residual block: Conv(k, stride 1 or 2, same) → relu_bn → Conv(k, same),
/// a 1×1 stride-2 projection of the shortcut when downsampling, Add, relu_bn.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// use candle_functional::models::residual_block;
/// let x = Input::new([64, 32, 32]);
/// let y = residual_block(&x, true, 128, 3)?;
/// assert_eq!(y.shape(), &[128, 16, 16]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn residual_block(
    x: &SymbolicTensor,
    downsample: bool,
    filters: usize,
    kernel_size: usize,
) -> Result<SymbolicTensor> {
    let y = block_convolutions(x, downsample, filters, kernel_size)?;
    // Created after the block's convolutions, as in the article, so names match Keras's.
    let shortcut = if downsample {
        Conv2D::new(filters, 1)
            .strides(2)
            .padding(Padding::Same)
            .call(x)?
    } else {
        x.clone()
    };
    let out = Add::new().call_many(&[shortcut, y])?;
    relu_bn(&out)
}

/// He et al.'s residual block ("Deep Residual Learning", 2015, for CIFAR-10): Conv(3,
/// stride 2 when downsampling) → BatchNorm → ReLU → Conv(3) → BatchNorm, added to the
/// shortcut (the input, or a 1×1 stride-2 convolution and BatchNorm when downsampling: their
/// option B), then ReLU. Unlike the article's block, the BatchNorms come before the
/// addition, so the identity path carries the input unchanged. The convolutions have no
/// bias (each BatchNorm's offset plays that part).
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// use candle_functional::models::he_residual_block;
/// let y = he_residual_block(&Input::new([16, 32, 32]), true, 32)?;
/// assert_eq!(y.shape(), &[32, 16, 16]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn he_residual_block(
    x: &SymbolicTensor,
    downsample: bool,
    filters: usize,
) -> Result<SymbolicTensor> {
    let stride = if downsample { 2 } else { 1 };
    let conv = |filters: usize, kernel: usize, stride: usize| {
        Conv2D::new(filters, kernel)
            .strides(stride)
            .padding(Padding::Same)
            .use_bias(false)
    };
    let y = BatchNorm::new().call(&conv(filters, 3, stride).call(x)?)?;
    let y = ReLU::new().call(&y)?;
    let y = BatchNorm::new().call(&conv(filters, 3, 1).call(&y)?)?;
    let shortcut = if downsample {
        BatchNorm::new().call(&conv(filters, 1, 2).call(x)?)?
    } else {
        x.clone()
    };
    ReLU::new().call(&Add::new().call_many(&[shortcut, y])?)
}

/// What both block kinds share: Conv(k, stride 2 when downsampling, same) → relu_bn →
/// Conv(k, same).
fn block_convolutions(
    x: &SymbolicTensor,
    downsample: bool,
    filters: usize,
    kernel_size: usize,
) -> Result<SymbolicTensor> {
    let stride = if downsample { 2 } else { 1 };
    let y = Conv2D::new(filters, kernel_size)
        .strides(stride)
        .padding(Padding::Same)
        .call(x)?;
    let y = relu_bn(&y)?;
    Conv2D::new(filters, kernel_size)
        .padding(Padding::Same)
        .call(&y)
}

/// The plain twin of [`residual_block`]: the same two convolutions, each followed by
/// `relu_bn`, with no shortcut.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// use candle_functional::models::plain_block;
/// let y = plain_block(&Input::new([64, 32, 32]), true, 128, 3)?;
/// assert_eq!(y.shape(), &[128, 16, 16]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn plain_block(
    x: &SymbolicTensor,
    downsample: bool,
    filters: usize,
    kernel_size: usize,
) -> Result<SymbolicTensor> {
    relu_bn(&block_convolutions(x, downsample, filters, kernel_size)?)
}

/// The shape of an article-style network; [`ResNetConfig::default`] is the article's.
///
/// # Examples
/// ```
/// use candle_functional::models::ResNetConfig;
/// let small = ResNetConfig::default().width_divisor(4).stages(vec![1, 1, 1, 1]);
/// assert_eq!(small.filters, [16, 32, 64, 128]);
/// let model = small.res_net()?;
/// assert_eq!(model.outputs()[0].shape(), &[10]);
/// # Ok::<(), candle_functional::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResNetConfig {
    /// Per-sample input shape (channels, height, width).
    pub input_shape: [usize; 3],
    /// Blocks per stage.
    pub stages: Vec<usize>,
    /// Filters per stage (the stem uses the first).
    pub filters: Vec<usize>,
    /// Convolution window.
    pub kernel_size: usize,
    /// Window of the final average pooling.
    pub pool_size: usize,
    /// Output classes.
    pub num_classes: usize,
    /// Output activation (the article's softmax; `Linear` gives logits).
    pub output_activation: ActivationFn,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self {
            input_shape: [3, 32, 32],
            stages: vec![2, 5, 5, 2],
            filters: vec![64, 128, 256, 512],
            kernel_size: 3,
            pool_size: 4,
            num_classes: 10,
            output_activation: ActivationFn::Softmax,
        }
    }
}

impl ResNetConfig {
    /// Divides every stage's filters by `divisor` (at least 1 filter), for quick CPU runs.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::models::ResNetConfig;
    /// assert_eq!(ResNetConfig::default().width_divisor(2).filters, [32, 64, 128, 256]);
    /// ```
    pub fn width_divisor(mut self, divisor: usize) -> Self {
        let divisor = divisor.max(1);
        self.filters = self.filters.iter().map(|f| (f / divisor).max(1)).collect();
        self
    }

    /// Sets the blocks per stage; filters keep doubling from the first stage's.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::models::ResNetConfig;
    /// let c = ResNetConfig::default().stages(vec![1, 1]);
    /// assert_eq!(c.filters, [64, 128]);
    /// ```
    pub fn stages(mut self, stages: Vec<usize>) -> Self {
        let first = self.filters.first().copied().unwrap_or(64);
        self.filters = (0..stages.len()).map(|i| first << i).collect();
        self.stages = stages;
        self
    }

    fn check(&self) -> Result<()> {
        if self.stages.is_empty() || self.stages.len() != self.filters.len() {
            return Err(Error::InvalidArgument(format!(
                "ResNetConfig needs one filter count per stage, got stages {:?} and filters {:?}",
                self.stages, self.filters
            )));
        }
        Ok(())
    }

    fn build(&self, block: BlockFn, name: &str) -> Result<Model> {
        self.check()?;
        let inputs = Input::new(self.input_shape);
        let t = BatchNorm::new().call(&inputs)?;
        let t = Conv2D::new(self.filters[0], self.kernel_size)
            .padding(Padding::Same)
            .call(&t)?;
        let mut t = relu_bn(&t)?;
        for (i, (&blocks, &filters)) in self.stages.iter().zip(&self.filters).enumerate() {
            for j in 0..blocks {
                t = block(&t, j == 0 && i != 0, filters, self.kernel_size)?;
            }
        }
        let t = AveragePooling2D::new(self.pool_size).call(&t)?;
        let t = Flatten::new().call(&t)?;
        let outputs = Dense::new(self.num_classes)
            .activation(self.output_activation)
            .call(&t)?;
        Ok(Model::new(&[inputs], &[outputs])?.named(name))
    }

    /// The residual network.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::models::ResNetConfig;
    /// let m = ResNetConfig::default().stages(vec![1]).res_net()?;
    /// assert_eq!(m.name(), "resnet");
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn res_net(&self) -> Result<Model> {
        self.build(residual_block, "resnet")
    }

    /// The plain twin (same stem, head and convolutions, no shortcuts).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::models::ResNetConfig;
    /// let m = ResNetConfig::default().stages(vec![1]).plain_net()?;
    /// assert_eq!(m.name(), "plain_net");
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn plain_net(&self) -> Result<Model> {
        self.build(plain_block, "plain_net")
    }
}

type BlockFn = fn(&SymbolicTensor, bool, usize, usize) -> Result<SymbolicTensor>;

/// The article's ResNet (15,619,990 parameters, as Keras reports). Not built yet: call
/// [`Model::build`] to create its weights on a device.
///
/// # Examples
/// ```
/// use candle_functional::models::create_res_net;
/// let model = create_res_net()?;
/// assert_eq!(model.count_params().total, 15_619_990);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn create_res_net() -> Result<Model> {
    ResNetConfig::default().res_net()
}

/// The article's plain network, the ResNet without shortcuts.
///
/// # Examples
/// ```
/// use candle_functional::models::create_plain_net;
/// let model = create_plain_net()?;
/// assert_eq!(model.count_params().total, 15_447_062);
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn create_plain_net() -> Result<Model> {
    ResNetConfig::default().plain_net()
}

//! Padding modes, the arithmetic of sliding windows (convolutions and pooling), and the
//! shape checks the layers share.

use crate::{Error, Result};

/// How a sliding window treats the borders, as in Keras.
///
/// # Examples
/// ```
/// use candle_functional::layers::{same_padding, Padding};
/// assert_eq!(Padding::default(), Padding::Valid);
/// // TensorFlow's 'same': a 3x3 stride-2 window on 32 pixels pads 0 before and 1 after.
/// assert_eq!(same_padding(32, 3, 2, 1), (0, 1));
/// ```
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// No padding: the window stays inside the input.
    #[default]
    Valid,
    /// TensorFlow's `"same"`: the output has `ceil(input / stride)` positions; the padding
    /// needed for that is split with the smaller half before (top/left) and the larger after
    /// (bottom/right). With stride 2 on an even input this pads only bottom/right, which is
    /// not PyTorch's symmetric `padding=1`.
    Same,
}

/// TensorFlow's 'same' padding along one axis: `(before, after)` for an input of `len`
/// positions, a window of `kernel` taps spaced `dilation` apart, moving by `stride`.
///
/// # Examples
/// ```
/// use candle_functional::layers::same_padding;
/// assert_eq!(same_padding(9, 3, 2, 1), (1, 1));
/// assert_eq!(same_padding(8, 3, 1, 1), (1, 1));
/// assert_eq!(same_padding(8, 1, 2, 1), (0, 0));
/// ```
pub fn same_padding(len: usize, kernel: usize, stride: usize, dilation: usize) -> (usize, usize) {
    let span = (kernel - 1) * dilation + 1;
    let out = len.div_ceil(stride);
    let total = ((out - 1) * stride + span).saturating_sub(len);
    (total / 2, total - total / 2)
}

/// Output length of a window along one axis, or an error naming the layer when the window
/// does not fit.
pub(crate) fn window_output_len(
    layer: &str,
    len: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    padding: Padding,
) -> Result<usize> {
    let span = (kernel - 1) * dilation + 1;
    match padding {
        Padding::Same => Ok(len.div_ceil(stride)),
        Padding::Valid if len >= span => Ok((len - span) / stride + 1),
        Padding::Valid => Err(Error::InvalidInput {
            layer: layer.to_string(),
            message: format!(
                "a window spanning {span} positions does not fit in an input of {len} with padding 'valid'"
            ),
        }),
    }
}

/// The per-sample shape of a layer's one input; an error naming the layer for any other count.
pub(crate) fn one_input<'a>(layer: &str, inputs: &'a [Vec<usize>]) -> Result<&'a [usize]> {
    match inputs {
        [x] => Ok(x),
        _ => Err(Error::InvalidInput {
            layer: layer.to_string(),
            message: format!("takes one input, got {}", inputs.len()),
        }),
    }
}

/// Checks that an input is `(C, H, W)` and returns it as such.
pub(crate) fn expect_chw(layer: &str, shape: &[usize]) -> Result<(usize, usize, usize)> {
    match shape {
        [c, h, w] => Ok((*c, *h, *w)),
        _ => Err(Error::InvalidInput {
            layer: layer.to_string(),
            message: format!("expects a (channels, height, width) input, got shape {shape:?}"),
        }),
    }
}

/// Resolves `axis` of a full tensor (batch first, negative from the end) whose samples have
/// rank `sample_rank`; the batch axis is refused.
pub(crate) fn non_batch_axis(layer: &str, axis: isize, sample_rank: usize) -> Result<usize> {
    let rank = sample_rank as isize + 1;
    let resolved = if axis < 0 { axis + rank } else { axis };
    if resolved < 1 || resolved >= rank {
        return Err(Error::InvalidInput {
            layer: layer.to_string(),
            message: format!(
                "axis {axis} is not a non-batch axis of a rank-{rank} tensor (axis 0 is the batch)"
            ),
        });
    }
    Ok(resolved as usize)
}

/// Checks that a window parameter is positive.
pub(crate) fn expect_positive(layer: &str, what: &str, values: &[usize]) -> Result<()> {
    if values.contains(&0) {
        return Err(Error::InvalidConfig {
            layer: layer.to_string(),
            message: format!("{what} must be positive, got {values:?}"),
        });
    }
    Ok(())
}

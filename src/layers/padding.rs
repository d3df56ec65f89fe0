//! Padding modes, the arithmetic of sliding windows (convolutions and pooling), and the
//! shape checks the layers share: public, for the shape rules of custom layers.

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
    // Saturating, not wrapping: a span too large to count pads by `usize::MAX`, which the
    // convolution's own size check then refuses.
    let span = window_span(kernel, dilation);
    let out = len.div_ceil(stride.max(1));
    let total = out
        .saturating_sub(1)
        .saturating_mul(stride)
        .saturating_add(span)
        .saturating_sub(len);
    (total / 2, total - total / 2)
}

/// Output length of a window along one axis (`kernel` taps spaced `dilation` apart, moving
/// by `stride`), or an error naming `layer` when the window does not fit: the shape rule of
/// every convolution and pooling, for custom layers too.
///
/// # Examples
/// ```
/// use candle_functional::layers::{window_output_len, Padding};
/// assert_eq!(window_output_len("conv", 32, 3, 2, 1, Padding::Same)?, 16);
/// assert_eq!(window_output_len("conv", 32, 3, 2, 1, Padding::Valid)?, 15);
/// assert!(window_output_len("conv", 2, 3, 1, 1, Padding::Valid).is_err());
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn window_output_len(
    layer: &str,
    len: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    padding: Padding,
) -> Result<usize> {
    let span = window_span(kernel, dilation);
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

/// The per-sample shape of a layer's one input; an error naming `layer` for any other count.
/// For the `output_shapes` of custom layers.
///
/// # Examples
/// ```
/// use candle_functional::layers::one_input;
/// assert_eq!(one_input("scale", &[vec![3, 4]])?, &[3, 4]);
/// let err = one_input("scale", &[vec![3], vec![3]]).unwrap_err();
/// assert!(err.to_string().contains("`scale`"));
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn one_input<'a>(layer: &str, inputs: &'a [Vec<usize>]) -> Result<&'a [usize]> {
    match inputs {
        [x] => Ok(x),
        _ => Err(Error::InvalidInput {
            layer: layer.to_string(),
            message: format!("takes one input, got {}", inputs.len()),
        }),
    }
}

/// Checks that a per-sample shape is `(channels, height, width)` and returns it as such; an
/// error naming `layer` and the shape otherwise.
///
/// # Examples
/// ```
/// use candle_functional::layers::expect_chw;
/// assert_eq!(expect_chw("pool", &[3, 8, 8])?, (3, 8, 8));
/// assert!(expect_chw("pool", &[3, 8]).unwrap_err().to_string().contains("[3, 8]"));
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn expect_chw(layer: &str, shape: &[usize]) -> Result<(usize, usize, usize)> {
    match shape {
        [c, h, w] => Ok((*c, *h, *w)),
        _ => Err(Error::InvalidInput {
            layer: layer.to_string(),
            message: format!("expects a (channels, height, width) input, got shape {shape:?}"),
        }),
    }
}

/// Resolves `axis` of a full tensor (batch first, negative from the end) whose samples have
/// rank `sample_rank`; the batch axis and axes out of range are refused, naming `layer`.
///
/// # Examples
/// ```
/// use candle_functional::layers::non_batch_axis;
/// assert_eq!(non_batch_axis("softmax", -1, 3)?, 3);
/// assert_eq!(non_batch_axis("softmax", 1, 3)?, 1);
/// assert!(non_batch_axis("softmax", 0, 3).is_err());
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn non_batch_axis(layer: &str, axis: isize, sample_rank: usize) -> Result<usize> {
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

/// [`non_batch_axis`] for layers that Keras code ports with `axis=-1` meaning channels
/// (`Concatenate`, `BatchNormalization`): on a `(C, H, W)` map a negative axis counts from
/// the width in candle's NCHW layout, so it is refused with both readings spelt out instead
/// of silently joining or normalizing along the width.
///
/// # Examples
/// ```
/// use candle_functional::layers::channel_axis;
/// assert_eq!(channel_axis("concatenate", 1, 3)?, 1);
/// assert_eq!(channel_axis("concatenate", 3, 3)?, 3);
/// assert_eq!(channel_axis("concatenate", -1, 1)?, 1); // (features,) vectors: no doubt
/// let err = channel_axis("concatenate", -1, 3).unwrap_err().to_string();
/// assert!(err.contains("width") && err.contains("axis 1"), "{err}");
/// # Ok::<(), candle_functional::Error>(())
/// ```
pub fn channel_axis(layer: &str, axis: isize, sample_rank: usize) -> Result<usize> {
    let resolved = non_batch_axis(layer, axis, sample_rank)?;
    if axis < 0 && sample_rank == 3 {
        let name = ["channels", "height", "width"][resolved - 1];
        return Err(Error::InvalidInput {
            layer: layer.to_string(),
            message: format!(
                "axis {axis} of a (channels, height, width) map is its {name} in candle's NCHW layout, while in Keras's channels-last code it means the channels: write axis 1 for the channels (or {resolved} for the {name})"
            ),
        });
    }
    Ok(resolved)
}

/// Checks that every value is positive (filters, window sizes, strides); an
/// [`Error::InvalidConfig`] naming `layer` and `what` otherwise.
///
/// # Examples
/// ```
/// use candle_functional::layers::expect_positive;
/// assert!(expect_positive("conv", "strides", &[1, 2]).is_ok());
/// assert!(expect_positive("conv", "strides", &[0, 2]).is_err());
/// ```
pub fn expect_positive(layer: &str, what: &str, values: &[usize]) -> Result<()> {
    if values.contains(&0) {
        return Err(Error::InvalidConfig {
            layer: layer.to_string(),
            message: format!("{what} must be positive, got {values:?}"),
        });
    }
    Ok(())
}

/// The number of elements of a per-sample shape; an error naming `layer` when it does not
/// fit in a `usize` (a corrupt or hostile saved config).
pub(crate) fn element_count(layer: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::InvalidInput {
            layer: layer.to_string(),
            message: format!("shape {shape:?} has more elements than a usize can count"),
        })
}

/// Positions covered by `kernel` taps spaced `dilation` apart, `usize::MAX` when that
/// overflows (no input is that long, so such a window never fits).
fn window_span(kernel: usize, dilation: usize) -> usize {
    kernel
        .saturating_sub(1)
        .saturating_mul(dilation)
        .saturating_add(1)
}

/// `value`, or an error naming `layer` and `what` when the arithmetic that made it overflowed:
/// the shape rules' sums and products of configured sizes.
pub(crate) fn checked_size(layer: &str, what: &str, value: Option<usize>) -> Result<usize> {
    value.ok_or_else(|| Error::InvalidInput {
        layer: layer.to_string(),
        message: format!("{what} is larger than a usize can count"),
    })
}

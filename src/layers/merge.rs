//! Element-wise merge layers: [`Add`], [`Subtract`], [`Multiply`], [`Average`], [`Maximum`],
//! [`Minimum`].
//!
//! All take inputs of one shape (checked when the graph is built, naming both shapes) and
//! combine them element by element. `Subtract` takes exactly two inputs; the others two or
//! more. `Average` sums then divides once, as Keras does.

use candle_core::Tensor;

use crate::fusion::ElementWise;
use crate::graph::{Configured, LayerOp, Params};
use crate::layers::keras::{FeatureOrder, KerasClass, KerasLayer, Translated, Translation};
use crate::layers::kind::{LayerExample, LayerKind};
use crate::{Error, Result};

/// Shape rule shared by the merge layers: at least `min` inputs (exactly `exact` if set),
/// all of one shape.
fn merge_shapes(
    layer: &str,
    inputs: &[Vec<usize>],
    exact: Option<usize>,
) -> Result<Vec<Vec<usize>>> {
    let count_ok = match exact {
        Some(n) => inputs.len() == n,
        None => inputs.len() >= 2,
    };
    if !count_ok {
        let wanted = exact.map_or("at least 2".to_string(), |n| format!("exactly {n}"));
        return Err(Error::InvalidInput {
            layer: layer.to_string(),
            message: format!("takes {wanted} inputs, got {}", inputs.len()),
        });
    }
    let first = &inputs[0];
    for (i, other) in inputs.iter().enumerate().skip(1) {
        if other != first {
            return Err(Error::ShapeMismatch {
                layer: layer.to_string(),
                what: format!("input {i} does not have the shape of input 0"),
                expected: first.clone(),
                got: other.clone(),
            });
        }
    }
    Ok(vec![first.clone()])
}

/// Folds the inputs pairwise with `op`.
fn fold(
    inputs: &[Tensor],
    op: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let mut acc = inputs[0].clone();
    for x in &inputs[1..] {
        acc = op(&acc, x)?;
    }
    Ok(acc)
}

macro_rules! merge_layer {
    (
        $(#[$doc:meta])*
        $alias:ident, $config:ident, $type_name:literal, exact = $exact:expr,
        $(element_wise = $element_wise:expr,)?
        |$inputs:ident| $body:expr
    ) => {
        #[doc = concat!("Config of a [`", stringify!($alias), "`] layer (it has no options).")]
        ///
        /// # Examples
        /// ```
        #[doc = concat!("let _ = candle_functional::layers::", stringify!($config), "::default();")]
        /// ```
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
        pub struct $config;

        $(#[$doc])*
        pub type $alias = Configured<$config>;

        impl $alias {
            #[doc = concat!("A new `", stringify!($alias), "` layer.")]
            ///
            /// # Examples
            /// ```
            /// use candle_functional::prelude::*;
            #[doc = concat!("let layer = ", stringify!($alias), "::new();")]
            #[doc = concat!("assert_eq!(layer.layer_ref().op().type_name(), \"", $type_name, "\");")]
            /// ```
            pub fn new() -> Self {
                Self::default()
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
                merge_shapes(layer, inputs, $exact)
            }

            fn forward(&self, $inputs: &[Tensor], _params: &Params) -> Result<Vec<Tensor>> {
                Ok(vec![$body])
            }

            $(
                fn as_element_wise(&self) -> Option<ElementWise> {
                    $element_wise
                }
            )?
        }
    };
}

merge_layer!(
    /// Sums its inputs: the join of a residual connection.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([8, 4, 4]);
    /// let y = Conv2D::new(8, 3).padding(Padding::Same).call(&x)?;
    /// assert_eq!(Add::new().call_many(&[x, y])?.shape(), &[8, 4, 4]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    Add, AddConfig, "Add", exact = None,
    // Of two inputs, it can run inside a BatchNorm that reads it (the residual block's end).
    element_wise = Some(ElementWise::Add),
    |inputs| fold(inputs, |a, b| a + b)?
);

merge_layer!(
    /// Subtracts its second input from its first.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let (a, b) = (Input::new([3]), Input::new([3]));
    /// assert_eq!(Subtract::new().call_many(&[a, b])?.shape(), &[3]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    Subtract, SubtractConfig, "Subtract", exact = Some(2),
    |inputs| (&inputs[0] - &inputs[1])?
);

merge_layer!(
    /// Multiplies its inputs element-wise (gating).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let (a, b) = (Input::new([3]), Input::new([3]));
    /// assert_eq!(Multiply::new().call_many(&[a, b])?.shape(), &[3]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    Multiply, MultiplyConfig, "Multiply", exact = None,
    |inputs| fold(inputs, |a, b| a * b)?
);

merge_layer!(
    /// Averages its inputs element-wise.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let (a, b, c) = (Input::new([3]), Input::new([3]), Input::new([3]));
    /// assert_eq!(Average::new().call_many(&[a, b, c])?.shape(), &[3]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    Average, AverageConfig, "Average", exact = None,
    |inputs| (fold(inputs, |a, b| a + b)? / inputs.len() as f64)?
);

merge_layer!(
    /// Element-wise maximum of its inputs.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let (a, b) = (Input::new([3]), Input::new([3]));
    /// assert_eq!(Maximum::new().call_many(&[a, b])?.shape(), &[3]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    Maximum, MaximumConfig, "Maximum", exact = None,
    |inputs| fold(inputs, |a, b| a.maximum(b))?
);

merge_layer!(
    /// Element-wise minimum of its inputs.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let (a, b) = (Input::new([3]), Input::new([3]));
    /// assert_eq!(Minimum::new().call_many(&[a, b])?.shape(), &[3]);
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    Minimum, MinimumConfig, "Minimum", exact = None,
    |inputs| fold(inputs, |a, b| a.minimum(b))?
);

/// The merges, each saved and imported from Keras's class of the same name. They act
/// element by element, so they pass a channels-last Flatten's order on when every input
/// has the same one.
pub(crate) const KINDS: &[LayerKind] = &[
    merge_kind!(AddConfig, "Add"),
    merge_kind!(SubtractConfig, "Subtract"),
    merge_kind!(MultiplyConfig, "Multiply"),
    merge_kind!(AverageConfig, "Average"),
    merge_kind!(MaximumConfig, "Maximum"),
    merge_kind!(MinimumConfig, "Minimum"),
];

/// The kind of merge `$config`, Keras's class `$class`; its example merges two `(3, 2, 2)`
/// maps.
macro_rules! merge_kind {
    ($config:ident, $class:literal) => {
        LayerKind::of::<$config>(|| {
            LayerExample::new(&Configured::from_config($config), &[&[3, 2, 2], &[3, 2, 2]])
        })
        .keras(&[KerasClass::new($class, merge_from_keras).feature_order(FeatureOrder::PassesOn)])
    };
}
use merge_kind;

fn merge_from_keras(layer: &KerasLayer) -> Translation {
    let first = layer.order();
    if layer.inputs().iter().any(|t| t.order != first) {
        return Err(
            "it merges a channels-last Flatten's output with another tensor: not supported".into(),
        );
    }
    Translated::new(layer.class(), serde_json::Value::Null)
}

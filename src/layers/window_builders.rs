//! The builder methods every sliding-window layer shares (window size, strides, padding,
//! dilation, bias, activation), written once for the layers whose configs have those fields.

/// Implements `kernel_size`, `strides`, `padding`, `dilation`, `use_bias`, `activation` and
/// `bias_initializer` for `$layer` (a [`Configured`](crate::Configured) alias whose config has
/// those fields); `$make` is an expression making one, for the doc examples.
macro_rules! window_builders {
    ($layer:ident, $make:literal) => {
        impl $layer {
            #[doc = concat!(
                "A rectangular window `(height, width)`.\n\n# Examples\n```\n",
                "use candle_functional::layers::", stringify!($layer), ";\n",
                "assert_eq!(", $make, ".kernel_size(1, 3).config().kernel_size, (1, 3));\n```"
            )]
            pub fn kernel_size(self, height: usize, width: usize) -> Self {
                self.with_config(|c| c.kernel_size = (height, width))
            }

            #[doc = concat!(
                "Window step along both axes.\n\n# Examples\n```\n",
                "use candle_functional::layers::", stringify!($layer), ";\n",
                "assert_eq!(", $make, ".strides(2).config().strides, 2);\n```"
            )]
            pub fn strides(self, strides: usize) -> Self {
                self.with_config(|c| c.strides = strides)
            }

            #[doc = concat!(
                "`Padding::Same` or `Padding::Valid`.\n\n# Examples\n```\n",
                "use candle_functional::layers::{", stringify!($layer), ", Padding};\n",
                "assert_eq!(", $make, ".padding(Padding::Same).config().padding, Padding::Same);\n```"
            )]
            pub fn padding(self, padding: $crate::layers::Padding) -> Self {
                self.with_config(|c| c.padding = padding)
            }

            #[doc = concat!(
                "Dilation rate along both axes.\n\n# Examples\n```\n",
                "use candle_functional::layers::", stringify!($layer), ";\n",
                "assert_eq!(", $make, ".dilation(2).config().dilation, 2);\n```"
            )]
            pub fn dilation(self, dilation: usize) -> Self {
                self.with_config(|c| c.dilation = dilation)
            }

            #[doc = concat!(
                "With or without a bias.\n\n# Examples\n```\n",
                "use candle_functional::layers::", stringify!($layer), ";\n",
                "assert!(!", $make, ".use_bias(false).config().use_bias);\n```"
            )]
            pub fn use_bias(self, use_bias: bool) -> Self {
                self.with_config(|c| c.use_bias = use_bias)
            }

            #[doc = concat!(
                "Activation applied to the output.\n\n# Examples\n```\n",
                "use candle_functional::layers::{", stringify!($layer), ", ActivationFn};\n",
                "let layer = ", $make, ".activation(ActivationFn::Relu);\n",
                "assert_eq!(layer.config().activation, ActivationFn::Relu);\n```"
            )]
            pub fn activation(self, activation: $crate::layers::ActivationFn) -> Self {
                self.with_config(|c| c.activation = activation)
            }

            #[doc = concat!(
                "Bias initializer.\n\n# Examples\n```\n",
                "use candle_functional::layers::{", stringify!($layer), ", Initializer};\n",
                "let layer = ", $make, ".bias_initializer(Initializer::Ones);\n",
                "assert_eq!(layer.config().bias_initializer, Initializer::Ones);\n```"
            )]
            pub fn bias_initializer(self, init: $crate::graph::Initializer) -> Self {
                self.with_config(|c| c.bias_initializer = init)
            }
        }
    };
}

pub(crate) use window_builders;

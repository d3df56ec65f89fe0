//! The one vocabulary of fusion, from a model's plan down to the kernels.
//!
//! An [`ElementWise`] function (a ReLU, an Add, an Add then a ReLU) can run inside a
//! neighbouring layer's kernel instead of as a layer of its own: before the kernel's own op, on
//! its inputs (a *prologue*), or after it, on its output (an *epilogue*). A [`Fusion`] holds the
//! two. The plan folds layers into their neighbours by asking
//! [`LayerOp::as_element_wise`](crate::LayerOp::as_element_wise),
//! [`accepts_prologue`](crate::LayerOp::accepts_prologue) and
//! [`accepts_epilogue`](crate::LayerOp::accepts_epilogue); the layer hands the step's
//! [`Fusion`] to [`LayerOp::forward_fused`](crate::LayerOp::forward_fused), and from there to
//! the fused kernels ([`ops::fused_batch_norm_train`](crate::ops::fused_batch_norm_train),
//! [`ops::fused_conv2d`](crate::ops::fused_conv2d)), which apply it as they read and write.
//! Each way saves one pass over memory, and the intermediate tensor is never kept for the
//! backward pass.

/// An element-wise function that a layer can apply inside its own kernel, in place of the
/// separate layer that computes it.
///
/// # Examples
/// ```
/// use candle_functional::prelude::*;
/// use candle_functional::{ElementWise, LayerOp};
/// assert_eq!(ReLU::new().config().as_element_wise(), Some(ElementWise::Relu));
/// assert!(BatchNorm::new().config().accepts_prologue(ElementWise::Relu));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ElementWise {
    /// `max(x, 0)` of one input, with no gradient where `x ≤ 0`.
    Relu,
    /// `a + b` of two inputs of one shape.
    Add,
    /// `max(a + b, 0)` of two inputs: an Add read only by a ReLU.
    AddRelu,
}

impl ElementWise {
    /// How many inputs the function takes.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::ElementWise;
    /// assert_eq!((ElementWise::Relu.arity(), ElementWise::AddRelu.arity()), (1, 2));
    /// ```
    pub fn arity(self) -> usize {
        match self {
            ElementWise::Relu => 1,
            ElementWise::Add | ElementWise::AddRelu => 2,
        }
    }

    /// `self` applied first, then `next` (`None`: nothing), as one function where one exists:
    /// an Add then a ReLU is [`ElementWise::AddRelu`].
    ///
    /// # Examples
    /// ```
    /// use candle_functional::ElementWise;
    /// assert_eq!(ElementWise::Add.then(Some(ElementWise::Relu)), Some(ElementWise::AddRelu));
    /// assert_eq!(ElementWise::Relu.then(Some(ElementWise::Add)), None);
    /// ```
    pub fn then(self, next: Option<ElementWise>) -> Option<ElementWise> {
        match (self, next) {
            (first, None) => Some(first),
            // A ReLU of a ReLU is the ReLU.
            (ElementWise::Relu, Some(ElementWise::Relu)) => Some(ElementWise::Relu),
            (ElementWise::Add, Some(ElementWise::Relu)) => Some(ElementWise::AddRelu),
            _ => None,
        }
    }

    /// `true` when the function ends in a ReLU ([`ElementWise::Relu`],
    /// [`ElementWise::AddRelu`]).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::ElementWise;
    /// assert!(ElementWise::AddRelu.ends_in_relu() && !ElementWise::Add.ends_in_relu());
    /// ```
    pub fn ends_in_relu(self) -> bool {
        matches!(self, ElementWise::Relu | ElementWise::AddRelu)
    }
}

/// What a fused kernel applies around its own op: an element-wise function of its inputs
/// before it (the prologue) and of its output after it (the epilogue). The default is neither.
///
/// # Examples
/// ```
/// use candle_functional::{ElementWise, Fusion};
/// // The residual block's Add → ReLU → BatchNorm, as the batch norm's kernel runs it.
/// let fusion = Fusion::new().with_prologue(ElementWise::AddRelu);
/// assert_eq!((fusion.arity(), fusion.relu_before(), fusion.relu_after()), (2, true, false));
/// assert!(Fusion::default().is_none());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Fusion {
    prologue: Option<ElementWise>,
    epilogue: Option<ElementWise>,
}

impl Fusion {
    /// No function before or after.
    ///
    /// # Examples
    /// ```
    /// assert!(candle_functional::Fusion::new().is_none());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// With `function` applied to the inputs first.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{ElementWise, Fusion};
    /// assert_eq!(Fusion::new().with_prologue(ElementWise::Add).prologue(), Some(ElementWise::Add));
    /// ```
    pub fn with_prologue(mut self, function: ElementWise) -> Self {
        self.prologue = Some(function);
        self
    }

    /// With `function` applied to the output after.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{ElementWise, Fusion};
    /// assert!(Fusion::new().with_epilogue(ElementWise::Relu).relu_after());
    /// ```
    pub fn with_epilogue(mut self, function: ElementWise) -> Self {
        self.epilogue = Some(function);
        self
    }

    /// The function applied to the inputs first, if any.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::Fusion::new().prologue(), None);
    /// ```
    pub fn prologue(self) -> Option<ElementWise> {
        self.prologue
    }

    /// The function applied to the output after, if any.
    ///
    /// # Examples
    /// ```
    /// assert_eq!(candle_functional::Fusion::new().epilogue(), None);
    /// ```
    pub fn epilogue(self) -> Option<ElementWise> {
        self.epilogue
    }

    /// `true` when nothing is fused.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{ElementWise, Fusion};
    /// assert!(!Fusion::new().with_epilogue(ElementWise::Relu).is_none());
    /// ```
    pub fn is_none(self) -> bool {
        self.prologue.is_none() && self.epilogue.is_none()
    }

    /// How many inputs the fused op reads: the prologue's arity, 1 without one.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{ElementWise, Fusion};
    /// assert_eq!(Fusion::new().with_prologue(ElementWise::Add).arity(), 2);
    /// ```
    pub fn arity(self) -> usize {
        self.prologue.map_or(1, ElementWise::arity)
    }

    /// `true` when the inputs pass through a ReLU before the op (after their sum, for two).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{ElementWise, Fusion};
    /// assert!(Fusion::new().with_prologue(ElementWise::Relu).relu_before());
    /// ```
    pub fn relu_before(self) -> bool {
        self.prologue.is_some_and(ElementWise::ends_in_relu)
    }

    /// `true` when the output passes through a ReLU after the op.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::{ElementWise, Fusion};
    /// assert!(!Fusion::new().with_prologue(ElementWise::Relu).relu_after());
    /// ```
    pub fn relu_after(self) -> bool {
        self.epilogue.is_some_and(ElementWise::ends_in_relu)
    }
}

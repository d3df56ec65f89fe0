//! A picture of the graph without Graphviz: [`Model::to_svg`] lays the layers out top to
//! bottom with the pure-Rust `layout-rs` crate and writes SVG, like Keras's
//! `plot_model(show_shapes=True)`: one box per layer (name and type), one arrow per tensor,
//! labelled with its shape; nested models drawn as one box or expanded into their layers.

use std::collections::HashMap;

use layout::adt::dag::NodeHandle;
use layout::backends::svg::SVGWriter;
use layout::core::base::Orientation;
use layout::core::style::StyleAttr;
use layout::std_shapes::render::get_shape_size;
use layout::std_shapes::shapes::{Arrow, Element, ShapeKind};
use layout::topo::layout::VisualGraph;

use crate::graph::plan::Plan;
use crate::graph::symbolic::{SymbolicTensor, format_batch_shape};
use crate::models::Model;
use crate::{Error, Result};

/// What [`Model::to_svg_with`] draws.
///
/// # Examples
/// ```
/// use candle_functional::models::PlotOptions;
/// let o = PlotOptions::default();
/// assert!(o.show_shapes && !o.expand_nested);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlotOptions {
    /// Label every arrow with its tensor's shape, `(None, 64, 32, 32)` (default `true`).
    pub show_shapes: bool,
    /// Draw nested models as their layers (inside-names `model/layer`) instead of one box
    /// (default `false`, as Keras).
    pub expand_nested: bool,
}

impl Default for PlotOptions {
    fn default() -> Self {
        Self {
            show_shapes: true,
            expand_nested: false,
        }
    }
}

/// The nested model behind a layer, when it is one.
fn nested_model(layer: &crate::LayerRef) -> Option<&Model> {
    layer.op().as_any()?.downcast_ref::<Model>()
}

struct Drawing {
    graph: VisualGraph,
    boxes: HashMap<String, NodeHandle>,
    options: PlotOptions,
    /// The model's outputs by the path of the box that makes them: no arrow leaves them, so
    /// their shapes go in the box.
    output_shapes: HashMap<String, Vec<String>>,
}

impl Drawing {
    fn add_box(&mut self, path: &str, type_name: &str) -> NodeHandle {
        if let Some(&handle) = self.boxes.get(path) {
            return handle;
        }
        let mut label = format!("{path}\n{type_name}");
        if self.options.show_shapes
            && let Some(shapes) = self.output_shapes.get(path)
        {
            label.push_str(&format!("\noutput {}", shapes.join(", ")));
        }
        let shape = ShapeKind::new_box(&label);
        let look = StyleAttr::simple();
        let size = get_shape_size(Orientation::TopToBottom, &shape, look.font_size, false);
        let handle =
            self.graph
                .add_node(Element::create(shape, look, Orientation::TopToBottom, size));
        self.boxes.insert(path.to_string(), handle);
        handle
    }

    fn add_edge(&mut self, from: NodeHandle, to: NodeHandle, tensor: &SymbolicTensor) {
        let label = if self.options.show_shapes {
            format_batch_shape(tensor.shape())
        } else {
            String::new()
        };
        self.graph.add_edge(Arrow::simple(&label), from, to);
    }

    /// Draws `plan`'s layers with names under `prefix`.
    fn add_plan(&mut self, plan: &Plan, prefix: &str) {
        for (layer, nodes) in plan.layers.iter().zip(&plan.layer_nodes) {
            let path = format!("{prefix}{}", layer.display_name());
            match nested_model(layer).filter(|_| self.options.expand_nested) {
                Some(inner) => self.add_plan(inner.plan(), &format!("{path}/")),
                None => {
                    self.add_box(&path, layer.op().type_name());
                }
            }
            for node in nodes {
                for (i, t) in node.inputs().iter().enumerate() {
                    let from = self.producer(t, plan, prefix);
                    let to = match nested_model(layer).filter(|_| self.options.expand_nested) {
                        Some(inner) => {
                            let input = &inner.plan().inputs[i];
                            self.producer(input, inner.plan(), &format!("{path}/"))
                        }
                        None => self.boxes[&path],
                    };
                    self.add_edge(from, to, t);
                }
            }
        }
    }

    /// The box that makes `t` in the graph of `plan` drawn under `prefix` (inside an expanded
    /// nested model: the box of the inner tensor).
    fn producer(&mut self, t: &SymbolicTensor, plan: &Plan, prefix: &str) -> NodeHandle {
        let layer = t.layer();
        let path = format!("{prefix}{}", layer.display_name());
        if let Some(inner) = nested_model(&layer).filter(|_| self.options.expand_nested) {
            let output = inner.plan().outputs[t.output_index()].clone();
            return self.producer(&output, inner.plan(), &format!("{path}/"));
        }
        // A model that starts at an inner tensor of a bigger graph: its producer is drawn
        // as where the model starts.
        if !plan.layers.iter().any(|l| l.same_layer(&layer)) {
            return self.add_box(&path, "input");
        }
        self.add_box(&path, layer.op().type_name())
    }
}

impl Model {
    /// The graph as an SVG picture (Keras's `plot_model(show_shapes=True)`), drawn without
    /// Graphviz: layers top to bottom, arrows labelled with tensor shapes, nested models as
    /// one box. See [`Model::to_svg_with`] to expand them.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3, 8, 8]);
    /// let y = Conv2D::new(4, 3).name("conv").call(&x)?;
    /// let svg = Model::new(&[x], &[y])?.to_svg()?;
    /// assert!(svg.contains("<svg") && svg.contains("conv") && svg.contains("(None, 4, 6, 6)"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn to_svg(&self) -> Result<String> {
        self.to_svg_with(PlotOptions::default())
    }

    /// The graph as SVG, with shapes on the arrows or not, nested models expanded or not.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::models::PlotOptions;
    /// use candle_functional::prelude::*;
    /// let p = Input::new([4]);
    /// let inner = Model::new(&[p.clone()], &[Dense::new(2).name("proj").call(&p)?])?.named("enc");
    /// let x = Input::new([4]);
    /// let outer = Model::new(&[x.clone()], &[inner.call(&x)?])?;
    /// let options = PlotOptions { expand_nested: true, ..Default::default() };
    /// assert!(outer.to_svg_with(options)?.contains("enc/proj"));
    /// assert!(!outer.to_svg()?.contains("enc/proj"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn to_svg_with(&self, options: PlotOptions) -> Result<String> {
        let mut drawing = Drawing {
            graph: VisualGraph::new(Orientation::TopToBottom),
            boxes: HashMap::new(),
            options,
            output_shapes: HashMap::new(),
        };
        for t in &self.plan().outputs {
            drawing
                .output_shapes
                .entry(t.layer().display_name())
                .or_default()
                .push(format_batch_shape(t.shape()));
        }
        drawing.add_plan(self.plan(), "");
        let mut svg = SVGWriter::new();
        // The layout crate asserts on its own invariants; a failure there is reported as an
        // error, not a panic of the caller's program.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drawing.graph.do_it(false, false, false, &mut svg);
        }))
        .map_err(|_| {
            Error::InvalidArgument(format!(
                "the graph layout of model `{}` failed (layout-rs)",
                self.name()
            ))
        })?;
        Ok(svg.finalize())
    }
}

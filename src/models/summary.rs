//! Human-readable views of a model: a Keras-style [`Model::summary`] table and a Graphviz
//! [`Model::to_dot`] graph.

use std::collections::HashMap;
use std::fmt::Write;

use crate::graph::op::weight_holders;
use crate::graph::symbolic::format_batch_shape;
use crate::models::Model;

/// `1234567` -> `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Keras's `readable_memory_size`: powers of 1024, two decimals.
fn readable_bytes(bytes: usize) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut size = bytes as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < units.len() {
        size /= 1024.0;
        unit += 1;
    }
    format!("{size:.2} {}", units[unit])
}

struct Row {
    layer: String,
    shape: String,
    params: String,
    connected: String,
}

impl Model {
    /// A table in the style of Keras's `model.summary()`: one row per call of each layer
    /// (name and type, output shape, parameter count, inputs as `layer[node][tensor]`), then
    /// total, trainable and non-trainable counts with their size in f32.
    ///
    /// Layers are listed in creation order. Works before `build`.
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([3, 8, 8]);
    /// let y = Conv2D::new(4, 3).padding(Padding::Same).call(&x)?;
    /// let text = Model::new(&[x], &[y])?.named("tiny").summary();
    /// assert!(text.contains("Model: \"tiny\""));
    /// assert!(text.contains("conv2d (Conv2D)"));
    /// assert!(text.contains("(None, 4, 8, 8)"));
    /// assert!(text.contains("Total params: 112"));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn summary(&self) -> String {
        let plan = self.plan();
        // Index of each node among its layer's nodes: Keras's `layer[node_index][tensor]`.
        let mut node_index: HashMap<u64, usize> = HashMap::new();
        for nodes in &plan.layer_nodes {
            for (i, node) in nodes.iter().enumerate() {
                node_index.insert(node.id(), i);
            }
        }
        let mut rows = Vec::new();
        for (layer, nodes) in plan.layers.iter().zip(&plan.layer_nodes) {
            let params: usize = weight_holders(std::slice::from_ref(layer))
                .iter()
                .flat_map(|(_, l)| l.param_specs())
                .map(|s| s.numel())
                .sum();
            for (i, node) in nodes.iter().enumerate() {
                let connected: Vec<String> = node
                    .inputs()
                    .iter()
                    .map(|t| {
                        let at = node_index.get(&t.node().id()).copied().unwrap_or(0);
                        format!("{}[{at}][{}]", t.layer().display_name(), t.output_index())
                    })
                    .collect();
                let shapes: Vec<String> = node
                    .output_shapes()
                    .iter()
                    .map(|s| format_batch_shape(s))
                    .collect();
                rows.push(Row {
                    layer: if i == 0 {
                        format!("{} ({})", layer.display_name(), layer.op().type_name())
                    } else {
                        String::new()
                    },
                    shape: shapes.join(", "),
                    params: if i == 0 {
                        thousands(params)
                    } else {
                        String::new()
                    },
                    connected: connected.join(", "),
                });
            }
        }
        let header = Row {
            layer: "Layer (type)".into(),
            shape: "Output Shape".into(),
            params: "Param #".into(),
            connected: "Connected to".into(),
        };
        let width = |f: fn(&Row) -> &str| {
            rows.iter()
                .chain([&header])
                .map(|r| f(r).chars().count())
                .max()
                .unwrap_or(0)
        };
        let (w1, w2, w3) = (
            width(|r| &r.layer),
            width(|r| &r.shape),
            width(|r| &r.params),
        );
        let w4 = width(|r| &r.connected);
        let total_width = w1 + w2 + w3 + w4 + 9;
        let line = |c: char| c.to_string().repeat(total_width);
        let fmt_row = |r: &Row| {
            format!(
                " {:<w1$}  {:<w2$}  {:>w3$}  {}",
                r.layer, r.shape, r.params, r.connected
            )
            .trim_end()
            .to_string()
        };

        let mut out = String::new();
        let _ = writeln!(out, "Model: \"{}\"", self.name());
        let _ = writeln!(out, "{}", line('_'));
        let _ = writeln!(out, "{}", fmt_row(&header));
        let _ = writeln!(out, "{}", line('='));
        for (i, row) in rows.iter().enumerate() {
            if i > 0 && !row.layer.is_empty() {
                let _ = writeln!(out);
            }
            let _ = writeln!(out, "{}", fmt_row(row));
        }
        let _ = writeln!(out, "{}", line('='));
        let counts = self.count_params();
        for (label, n) in [
            ("Total params", counts.total),
            ("Trainable params", counts.trainable),
            ("Non-trainable params", counts.non_trainable),
        ] {
            let _ = writeln!(out, "{label}: {} ({})", thousands(n), readable_bytes(n * 4));
        }
        let _ = writeln!(out, "{}", line('_'));
        out
    }

    /// The graph in Graphviz's DOT language, one box per layer with its type and input and
    /// output shapes (`dot -Tpng model.dot -o model.png` draws it).
    ///
    /// # Examples
    /// ```
    /// use candle_functional::prelude::*;
    /// let x = Input::new([4]);
    /// let y = Dense::new(2).call(&x)?;
    /// let dot = Model::new(&[x], &[y])?.to_dot();
    /// assert!(dot.starts_with("digraph"));
    /// assert!(dot.contains("\"input_layer\" -> \"dense\""));
    /// # Ok::<(), candle_functional::Error>(())
    /// ```
    pub fn to_dot(&self) -> String {
        let plan = self.plan();
        let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut out = String::new();
        let _ = writeln!(out, "digraph \"{}\" {{", quote(self.name()));
        let _ = writeln!(out, "  rankdir=TB;");
        let _ = writeln!(out, "  node [shape=box, fontname=\"Helvetica\"];");
        for (layer, nodes) in plan.layers.iter().zip(&plan.layer_nodes) {
            let name = layer.display_name();
            let inputs: Vec<String> = nodes
                .iter()
                .flat_map(|n| n.inputs().iter().map(|t| format_batch_shape(t.shape())))
                .collect();
            let outputs: Vec<String> = nodes
                .iter()
                .flat_map(|n| n.output_shapes().iter().map(|s| format_batch_shape(s)))
                .collect();
            let mut label = format!("{}: {}", quote(&name), layer.op().type_name());
            if !inputs.is_empty() {
                let _ = write!(label, "\\ninput: {}", inputs.join(", "));
            }
            let _ = write!(label, "\\noutput: {}", outputs.join(", "));
            let _ = writeln!(out, "  \"{}\" [label=\"{label}\"];", quote(&name));
        }
        for nodes in &plan.layer_nodes {
            for node in nodes {
                for t in node.inputs() {
                    let _ = writeln!(
                        out,
                        "  \"{}\" -> \"{}\";",
                        quote(&t.layer().display_name()),
                        quote(&node.layer().display_name())
                    );
                }
            }
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_like_keras() {
        assert_eq!(thousands(15_619_990), "15,619,990");
        assert_eq!(thousands(999), "999");
        assert_eq!(readable_bytes(12_422 * 4), "48.52 KB");
        assert_eq!(readable_bytes(15_619_990 * 4), "59.59 MB");
    }
}

//! Prints the summaries of the article's ResNet and PlainNet and writes their graphs: an SVG
//! picture drawn in pure Rust (no Graphviz needed, like Keras's
//! `plot_model(show_shapes=True)`) and a Graphviz DOT file.
//!
//! ```text
//! cargo run --release --example summary -- [OUT_DIR]
//! # OUT_DIR/resnet.svg, OUT_DIR/plainnet.svg (open in a browser)
//! # optional, with Graphviz: dot -Tpng OUT_DIR/resnet.dot -o resnet.png
//! ```

use std::path::PathBuf;

use candle_functional::models::{create_plain_net, create_res_net};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/summary".into()),
    );
    std::fs::create_dir_all(&out_dir)?;
    for model in [create_res_net()?, create_plain_net()?] {
        println!("{}", model.summary());
        let svg = out_dir.join(format!("{}.svg", model.name()));
        std::fs::write(&svg, model.to_svg()?)?;
        let dot = out_dir.join(format!("{}.dot", model.name()));
        std::fs::write(&dot, model.to_dot())?;
        println!("wrote {} and {}\n", svg.display(), dot.display());
    }
    Ok(())
}

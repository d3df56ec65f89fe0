//! Prints the summaries of the article's ResNet and PlainNet and writes their Graphviz graphs.
//!
//! ```text
//! cargo run --release --example summary -- [OUT_DIR]
//! dot -Tpng OUT_DIR/resnet.dot -o resnet.png
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
        let path = out_dir.join(format!("{}.dot", model.name()));
        std::fs::write(&path, model.to_dot())?;
        println!("wrote {}\n", path.display());
    }
    Ok(())
}

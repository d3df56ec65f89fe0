//! Compiles the crate's own CUDA kernels (`src/ops/cuda/*.cu`) to PTX with `nvcc` when the
//! `cuda` feature is on; a CPU build does nothing here. The `cuda` feature already needs nvcc
//! (candle's kernels are compiled the same way), so no new tool is required; the PTX is loaded
//! by the driver at run time (JIT-compiled once per machine).
//!
//! Environment: `NVCC` (default `nvcc` on the PATH), `CUDA_COMPUTE_CAP` (default 80; the PTX
//! targets `compute_<cap>` and runs on that architecture and newer).

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The kernel files of `src/ops/cuda/`, each compiled to `<name>.ptx` in `OUT_DIR`.
const KERNELS: [&str; 2] = ["optimizer", "multi_tensor"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for kernel in KERNELS {
        println!("cargo:rerun-if-changed=src/ops/cuda/{kernel}.cu");
    }
    println!("cargo:rerun-if-changed=src/ops/cuda/pointer_table.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for kernel in KERNELS {
        let source = format!("src/ops/cuda/{kernel}.cu");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "--fmad=false"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(&source)
            .arg("-o")
            .arg(out.join(format!("{kernel}.ptx")))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{nvcc} failed on {source} ({s})"),
            Err(e) => panic!(
                "the `cuda` feature needs nvcc to compile {source}: {e} (set NVCC or put nvcc on the PATH)"
            ),
        }
    }
}

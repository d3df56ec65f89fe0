//! Native parts of two optional features; the default build does nothing here.
//!
//! - `cuda`: compiles the crate's own CUDA kernels (`src/ops/cuda/*.cu`) to PTX with `nvcc`.
//!   The feature already needs nvcc (candle's kernels are compiled the same way), so no new
//!   tool is required; the PTX is loaded by the driver at run time (JIT-compiled once per
//!   machine). Environment: `NVCC` (default `nvcc` on the PATH), `CUDA_COMPUTE_CAP` (default
//!   80; the PTX targets `compute_<cap>` and runs on that architecture and newer).
//! - `onednn`: compiles the C shim over oneDNN's convolutions (`src/ops/onednn/shim.c`) with
//!   the `cc` crate and links `libdnnl`, found under `ONEDNN_DIR` (a oneDNN install prefix,
//!   2.x or 3.x) or in the system's include path (Debian/Ubuntu: `libdnnl-dev`). Without it the
//!   build stops here, naming the package to install.

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
    if env::var_os("CARGO_FEATURE_ONEDNN").is_some() {
        build_onednn_shim();
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_cuda_kernels();
    }
}

fn build_cuda_kernels() {
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

#[cfg(feature = "onednn")]
fn build_onednn_shim() {
    const SHIM: &str = "src/ops/onednn/shim.c";
    // Where the system's compilers look for headers when no `ONEDNN_DIR` is given.
    const SYSTEM_INCLUDES: [&str; 2] = ["/usr/include", "/usr/local/include"];
    println!("cargo:rerun-if-changed={SHIM}");
    println!("cargo:rerun-if-env-changed=ONEDNN_DIR");
    let prefix = env::var_os("ONEDNN_DIR").map(PathBuf::from);
    let has_header =
        |dir: &PathBuf| dir.join("oneapi/dnnl/dnnl.h").is_file() || dir.join("dnnl.h").is_file();
    let include = match &prefix {
        Some(p) if has_header(&p.join("include")) => p.join("include"),
        Some(p) => panic!(
            "ONEDNN_DIR={} has no include/oneapi/dnnl/dnnl.h: point it at a oneDNN install \
             prefix, or unset it to use the system's (Debian/Ubuntu: `apt-get install libdnnl-dev`)",
            p.display()
        ),
        None => SYSTEM_INCLUDES
            .iter()
            .map(PathBuf::from)
            .find(has_header)
            .unwrap_or_else(|| {
                panic!(
                    "the `onednn` feature needs oneDNN's headers and library, and found no dnnl.h \
                     in {SYSTEM_INCLUDES:?}: install them (Debian/Ubuntu: `apt-get install \
                     libdnnl-dev`), or set ONEDNN_DIR to a oneDNN install prefix (include/, lib/)"
                )
            }),
    };
    let mut build = cc::Build::new();
    build
        .file(SHIM)
        .include(&include)
        .opt_level(2)
        .warnings(true);
    if let Err(e) = build.try_compile("candle_functional_onednn") {
        panic!(
            "the `onednn` feature could not compile {SHIM} against oneDNN's headers in {}: {e} \
             (Debian/Ubuntu: `apt-get install libdnnl-dev`; or set ONEDNN_DIR)",
            include.display()
        );
    }
    if let Some(p) = &prefix {
        for lib in ["lib", "lib64"] {
            println!("cargo:rustc-link-search=native={}", p.join(lib).display());
        }
    }
    println!("cargo:rustc-link-lib=dylib=dnnl");
}

#[cfg(not(feature = "onednn"))]
fn build_onednn_shim() {}

//! The convolution's three matrix products at the article's stage shapes, timed three ways
//! with the `gemm` crate: as the crate once called them (the `gemm` crate's own threads),
//! the same product read transposed (`Cᵀ = Bᵀ·Aᵀ` over the same buffers), and one block of
//! columns per thread, each a single-threaded product (what `src/ops/cpu/conv2d.rs` does
//! now). Prints one JSON line per product with the median GFLOP/s of each.
//!
//! ```text
//! cargo run --release --example gemm_blocks -- --reps 10
//! ```
//!
//! The products, for `og` filters, `ckk` = channels × 3 × 3 and `cols` positions of an
//! im2col chunk: forward `Y = W · col` (og × cols × ckk), input gradient `dcol = Wᵀ · dY`
//! (ckk × cols × og), kernel gradient `dW = dY · colᵀ` (og × ckk × cols).

use std::time::Instant;

use clap::Parser;
use rayon::prelude::*;

/// GEMM timings at the convolution's shapes.
#[derive(Parser, Debug)]
struct Args {
    /// Timed repetitions of each way (the median is reported); the three alternate.
    #[arg(long, default_value_t = 10)]
    reps: usize,
}

/// A row-major or strided matrix operand: (data, row stride, column stride).
type Operand<'a> = (&'a [f32], usize, usize);

/// How a product is run.
#[derive(Clone, Copy)]
enum Way {
    GemmThreads,
    Transposed,
    ColumnBlocks,
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]`, `dst` row-major with row stride `n`.
fn product(way: Way, m: usize, n: usize, k: usize, dst: &mut [f32], lhs: Operand, rhs: Operand) {
    assert!(dst.len() >= m * n);
    let threads = rayon::current_num_threads();
    let call = |m,
                n,
                dst: *mut f32,
                (d_rs, d_cs),
                (l, l_rs, l_cs): (*const f32, usize, usize),
                (r, r_rs, r_cs): (*const f32, usize, usize),
                par| {
        // SAFETY: every caller passes operands sized for the shapes and strides given, and
        // blocks of `dst` that no other call writes.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                d_cs as isize,
                d_rs as isize,
                false,
                l,
                l_cs as isize,
                l_rs as isize,
                r,
                r_cs as isize,
                r_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    };
    let par = gemm::Parallelism::Rayon(threads);
    let (l, r) = (
        (lhs.0.as_ptr(), lhs.1, lhs.2),
        (rhs.0.as_ptr(), rhs.1, rhs.2),
    );
    match way {
        Way::GemmThreads => call(m, n, dst.as_mut_ptr(), (n, 1), l, r, par),
        Way::Transposed => call(
            n,
            m,
            dst.as_mut_ptr(),
            (1, n),
            (r.0, r.2, r.1),
            (l.0, l.2, l.1),
            par,
        ),
        Way::ColumnBlocks => {
            let per = n.div_ceil(threads).next_multiple_of(16);
            let (d, lp, rp) = (dst.as_mut_ptr() as usize, l.0 as usize, r.0 as usize);
            (0..n.div_ceil(per)).into_par_iter().for_each(|b| {
                let j0 = b * per;
                let (dst, rhs) = (
                    (d as *mut f32).wrapping_add(j0),
                    (rp as *const f32).wrapping_add(j0 * r.2),
                );
                call(
                    m,
                    per.min(n - j0),
                    dst,
                    (n, 1),
                    (lp as *const f32, l.1, l.2),
                    (rhs, r.1, r.2),
                    gemm::Parallelism::None,
                );
            });
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    // (stage, filters, channels × 3 × 3): the chunk of positions is what the kernel's
    // 8M-element im2col buffer holds, at most the batch of 128 images.
    for (stage, og, ckk, positions) in [
        ("64@32x32", 64, 576, 1024),
        ("128@16x16", 128, 1152, 256),
        ("256@8x8", 256, 2304, 64),
        ("512@4x4", 512, 4608, 16),
    ] {
        let cols = ((8usize << 20) / ckk / positions).clamp(1, 128) * positions;
        let w = vec![0.5f32; og * ckk];
        let col = vec![0.25f32; ckk * cols];
        let dy = vec![0.1f32; og * cols];
        let mut out = vec![0f32; ckk.max(og) * cols.max(ckk)];
        let flops = 2.0 * (og * ckk * cols) as f64;
        let products: [(&str, usize, usize, usize, Operand, Operand); 3] = [
            ("forward", og, cols, ckk, (&w, ckk, 1), (&col, cols, 1)),
            ("input_grad", ckk, cols, og, (&w, 1, ckk), (&dy, cols, 1)),
            (
                "kernel_grad",
                og,
                ckk,
                cols,
                (&dy, cols, 1),
                (&col, 1, cols),
            ),
        ];
        for (name, m, n, k, lhs, rhs) in products {
            let ways = [Way::GemmThreads, Way::Transposed, Way::ColumnBlocks];
            let mut gflops = [vec![], vec![], vec![]];
            for rep in 0..args.reps + 1 {
                for (i, &way) in ways.iter().enumerate() {
                    let t = Instant::now();
                    product(way, m, n, k, &mut out, lhs, rhs);
                    if rep > 0 {
                        gflops[i].push(flops / t.elapsed().as_secs_f64() / 1e9);
                    }
                }
            }
            let [a, b, c] = gflops.map(median);
            println!(
                "{{\"stage\": \"{stage}\", \"product\": \"{name}\", \"m\": {m}, \"n\": {n}, \"k\": {k}, \"gemm_threads_gflops\": {a:.1}, \"transposed_gflops\": {b:.1}, \"column_blocks_gflops\": {c:.1}, \"threads\": {}}}",
                rayon::current_num_threads()
            );
        }
    }
}

//! The machine's f32 FMA peak: independent fused multiply-add chains in the widest vector
//! registers the CPU has (AVX-512, else AVX2 + FMA, else scalar `mul_add`, picked at run
//! time), on each of `--threads` threads. The yardstick for the GFLOP/s of the convolution
//! kernels (scripts/compare-layers.sh prints both). One JSON line.
//!
//! ```text
//! cargo run --release --example fma_peak -- --threads 2
//! ```

use std::time::Instant;

use clap::Parser;

/// FMA peak.
#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Iterations of the 12 chains per thread (each iteration is 12 vector FMAs).
    #[arg(long, default_value_t = 100_000_000)]
    iterations: u64,
}

/// 12 independent chains hide the FMA latency (4 cycles) on two FMA ports.
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chains_avx512(iterations: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..iterations {
        for r in acc.iter_mut() {
            *r = _mm512_fmadd_ps(*r, a, b);
        }
    }
    acc.iter().map(|r| _mm512_reduce_add_ps(*r)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn chains_avx2(iterations: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    for _ in 0..iterations {
        for r in acc.iter_mut() {
            *r = _mm256_fmadd_ps(*r, a, b);
        }
    }
    let mut lanes = [0f32; 8];
    let mut total = 0.0;
    for r in acc {
        // SAFETY: `lanes` holds 8 f32, the width of one register.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), r) };
        total += lanes.iter().sum::<f32>();
    }
    total
}

fn chains_scalar(iterations: u64) -> f32 {
    let mut acc = [1.0f32; CHAINS];
    for _ in 0..iterations {
        for r in acc.iter_mut() {
            *r = r.mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

/// The widest kernel this CPU runs: (name, f32 lanes, the function).
fn kernel() -> (&'static str, usize, fn(u64) -> f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return ("avx512", 16, |n| unsafe { chains_avx512(n) });
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return ("avx2+fma", 8, |n| unsafe { chains_avx2(n) });
        }
    }
    ("scalar", 1, chains_scalar)
}

fn main() {
    let args = Args::parse();
    let (isa, lanes, run) = kernel();
    let start = Instant::now();
    let sums: Vec<f32> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.threads)
            .map(|_| s.spawn(|| run(args.iterations)))
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let flops = 2.0 * (CHAINS * lanes) as f64 * args.iterations as f64 * args.threads as f64;
    let gflops = flops / seconds / 1e9;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!(
        "{{\"kind\": \"fma_peak\", \"isa\": \"{isa}\", \"threads\": {}, \"gflops\": {gflops:.1}, \"gflops_per_thread\": {:.1}, \"seconds\": {seconds:.2}, \"checksum\": {}, \"cpu\": \"{cpu}\"}}",
        args.threads,
        gflops / args.threads as f64,
        sums.iter().sum::<f32>()
    );
}

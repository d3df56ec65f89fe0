//! Per-layer timing at the article's ResNet shapes: each layer type's forward and backward
//! pass (training mode) on its own, and the Adam update of all 15.6M parameters, printed as
//! one JSON line per case. `scripts/torch_reference.py layers` times the same cases in
//! PyTorch; `scripts/compare-layers.sh` runs both alternately and prints the table of
//! docs/PERFORMANCE.md.
//!
//! ```text
//! cargo run --release --example layer_profile -- --batch-size 128 --reps 3
//! ```
//!
//! Backward is timed as (forward + backward) minus forward minus the harness's own backward
//! (the scalar loss `sum(y · mix)` differentiated back to `y`, timed alone on a tensor of the
//! output's shape), the gradient reaching the input and every weight, as inside a network. GFLOP/s is given for convolutions and Dense, at 2
//! FLOPs per multiply-add; backward does twice the forward's (input and kernel gradients).

#[path = "common/allocator.rs"]
mod allocator;
#[path = "common/openmp.rs"]
mod openmp;

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_functional::models::create_res_net;
use candle_functional::prelude::*;
use candle_functional::train::{Adam, AdamConfig, Optimizer};
use clap::Parser;

/// Per-layer timings.
#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Only the cases whose name contains this.
    #[arg(long, default_value = "")]
    only: String,
}

/// Builds the layer of a case on its input.
type BuildLayer = Box<dyn Fn(&SymbolicTensor) -> Result<SymbolicTensor>>;

/// One case: a name, the layer on an input of per-sample shape `input`, its FLOPs per
/// sample (forward; backward is twice that for convolutions and Dense).
struct Case {
    name: String,
    input: Vec<usize>,
    build: BuildLayer,
    flops: f64,
}

fn conv(name: String, cin: usize, cout: usize, h: usize, k: usize, stride: usize) -> Case {
    let out = h.div_ceil(stride);
    Case {
        name,
        input: vec![cin, h, h],
        build: Box::new(move |x| {
            Conv2D::new(cout, k)
                .strides(stride)
                .padding(Padding::Same)
                .call(x)
        }),
        flops: 2.0 * (cin * cout * k * k * out * out) as f64,
    }
}

fn cases() -> Vec<Case> {
    let mut cases = vec![conv("conv3x3_stem_3_64_32".into(), 3, 64, 32, 3, 1)];
    for (f, h) in [(64, 32), (128, 16), (256, 8), (512, 4)] {
        cases.push(conv(format!("conv3x3_s1_{f}_{h}"), f, f, h, 3, 1));
        if f > 64 {
            cases.push(conv(format!("conv3x3_s2_{f}_{h}"), f / 2, f, 2 * h, 3, 2));
            cases.push(conv(format!("conv1x1_s2_{f}_{h}"), f / 2, f, 2 * h, 1, 2));
        }
        cases.push(Case {
            name: format!("batchnorm_{f}_{h}"),
            input: vec![f, h, h],
            build: Box::new(|x| BatchNorm::new().call(x)),
            flops: 0.0,
        });
        cases.push(Case {
            name: format!("relu_{f}_{h}"),
            input: vec![f, h, h],
            build: Box::new(|x| ReLU::new().call(x)),
            flops: 0.0,
        });
        cases.push(Case {
            name: format!("add_{f}_{h}"),
            input: vec![f, h, h],
            build: Box::new(|x| Add::new().call_many(&[x.clone(), x.clone()])),
            flops: 0.0,
        });
    }
    cases.push(Case {
        name: "avgpool4_512_4".into(),
        input: vec![512, 4, 4],
        build: Box::new(|x| AveragePooling2D::new(4).call(x)),
        flops: 0.0,
    });
    cases.push(Case {
        name: "dense_512_10".into(),
        input: vec![512],
        build: Box::new(|x| Dense::new(10).call(x)),
        flops: 2.0 * 512.0 * 10.0,
    });
    cases
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn time_case(case: &Case, args: &Args, device: &Device) -> Result<(f64, f64)> {
    // Add is called on one input twice: the same work as two inputs of that shape.
    let x = Input::new(case.input.clone());
    let y = (case.build)(&x)?;
    let model = Model::new(&[x], std::slice::from_ref(&y))?.build(device, DType::F32, 0)?;
    let mut shape = vec![args.batch_size];
    shape.extend(&case.input);
    let input = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, device)?)?;
    let mut out_shape = vec![args.batch_size];
    out_shape.extend(y.shape());
    let mix = Tensor::randn(0f32, 1.0, out_shape, device)?;
    // The harness's own backward (the scalar loss's gradient broadcast back to the output and
    // multiplied by `mix`), measured on a variable of the output's shape and subtracted: in
    // candle it is a slow broadcast that would otherwise dominate the element-wise layers.
    let probe = Var::from_tensor(&mix.randn_like(0.0, 1.0)?)?;
    let mut harness = Vec::new();
    let mut forward = Vec::new();
    let mut both = Vec::new();
    for rep in 0..args.warmup + args.reps {
        let t = Instant::now();
        let grads = (probe.as_tensor() * &mix)?.sum_all()?.backward()?;
        if let Some(g) = grads.get(probe.as_tensor()) {
            let _ = g.flatten_all()?.get(0)?.to_scalar::<f32>()?;
        }
        if rep >= args.warmup {
            harness.push(t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        let out = model
            .forward(&[input.as_tensor().clone()], Mode::Train)?
            .remove(0);
        let _ = out.sum_all()?.to_scalar::<f32>()?;
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let out = model
            .forward(&[input.as_tensor().clone()], Mode::Train)?
            .remove(0);
        let grads = (out * &mix)?.sum_all()?.backward()?;
        // Wait for every gradient (lazy backends): read one value of each.
        for w in model.weights()?.iter().filter(|w| w.trainable()) {
            if let Some(g) = grads.get(w.var().as_tensor()) {
                let _ = g.flatten_all()?.get(0)?.to_scalar::<f32>()?;
            }
        }
        let b = t.elapsed().as_secs_f64();
        if rep >= args.warmup {
            forward.push(f);
            both.push(b);
        }
    }
    let f = median(forward);
    Ok((f, (median(both) - f - median(harness)).max(0.0)))
}

fn time_adam(args: &Args, device: &Device) -> Result<(f64, usize)> {
    let model = create_res_net()?.build(device, DType::F32, 0)?;
    let vars = model.trainable_weights()?;
    let mut grads = GradStore::default();
    let mut count = 0;
    for (_, var) in &vars {
        grads.insert(var.as_tensor(), var.as_tensor().randn_like(0.0, 1e-3)?);
        count += var.elem_count();
    }
    let mut adam = Adam::new(AdamConfig::default())?;
    let mut times = Vec::new();
    for rep in 0..args.warmup + args.reps {
        let t = Instant::now();
        adam.step(&vars, &grads, 1e-3)?;
        let _ = vars[0]
            .1
            .as_tensor()
            .flatten_all()?
            .get(0)?
            .to_scalar::<f32>()?;
        if rep >= args.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok((median(times), count))
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    openmp::wait_passively();
    allocator::keep_freed_memory();
    let args = Args::parse();
    let device = Device::Cpu;
    let cpu = cpu_model();
    let threads = rayon::current_num_threads();
    for case in cases().iter().filter(|c| c.name.contains(&args.only)) {
        let (f, b) = time_case(case, &args, &device)?;
        let gflops = |seconds: f64, factor: f64| {
            if case.flops > 0.0 && seconds > 0.0 {
                format!(
                    "{:.1}",
                    factor * case.flops * args.batch_size as f64 / seconds / 1e9
                )
            } else {
                "null".into()
            }
        };
        println!(
            "{{\"framework\": \"candle-functional\", \"layer\": \"{}\", \"batch_size\": {}, \"forward_ms\": {:.3}, \"backward_ms\": {:.3}, \"forward_gflops\": {}, \"backward_gflops\": {}, \"threads\": {threads}, \"cpu\": \"{cpu}\"}}",
            case.name,
            args.batch_size,
            f * 1e3,
            b * 1e3,
            gflops(f, 1.0),
            gflops(b, 2.0),
        );
    }
    if "adam_all_params".contains(&args.only) {
        let (t, count) = time_adam(&args, &device)?;
        println!(
            "{{\"framework\": \"candle-functional\", \"layer\": \"adam_all_params\", \"parameters\": {count}, \"step_ms\": {:.3}, \"threads\": {threads}, \"cpu\": \"{cpu}\"}}",
            t * 1e3
        );
    }
    Ok(())
}

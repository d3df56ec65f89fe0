//! One call of a public op (or a layer's shape rule and forward pass) built from a string of
//! bytes: the op, every dtype candle can make, shapes with empty axes, hostile values (NaN,
//! infinities, huge numbers) and geometries from 0 to `usize::MAX`. Shared by the seeded
//! sweep in `tests/ops_sweep.rs` (`cargo test`) and the `ops` fuzz target
//! (`fuzz/fuzz_targets/ops.rs`), so both run the same cases. A case may return an error; it
//! must never panic, abort or crash.
//!
//! Tensors stay tiny (each axis 0 to 4) and the large geometry values are at least 2^40, so
//! most sizes a call asks for are small or refused by the overflow checks or the allocation
//! probe (past this machine's memory). The few that come out large but makeable (a padding
//! of 2^40 + 1 against a dilation of 2^40) are legitimate requests: those cases are counted
//! as [`Outcome::TooLarge`] and not run, so that every case stays fast and small.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use candle_functional::ops::{self, AdamStep, Conv2dGeometry, SgdStep};
use candle_functional::prelude::*;
use candle_functional::{ElementWise, Fusion};

/// Reads the case's bytes one at a time; past the end, zeros.
pub struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }

    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.byte() as usize % from.len()]
    }

    fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// A tensor axis: 0 to 4.
    fn axis(&mut self) -> usize {
        self.byte() as usize % 5
    }

    /// A geometry value: small (0 to 4) three times in four, else from 2^40 up to
    /// `usize::MAX`, so that most calls reach a kernel and every check still meets extremes.
    fn size(&mut self) -> usize {
        if !self.byte().is_multiple_of(4) {
            return self.axis();
        }
        self.pick(&[
            1 << 40,
            (1 << 40) + 1,
            1 << 62,
            usize::MAX / 2,
            usize::MAX - 1,
            usize::MAX,
        ])
    }

    /// A float from the values that break arithmetic.
    fn value(&mut self) -> f32 {
        self.pick(&[
            0.0,
            1.0,
            -1.0,
            0.5,
            3.0,
            1e30,
            -1e30,
            f32::MAX,
            f32::MIN_POSITIVE / 4.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ])
    }

    /// A hyper-parameter: `usual` three times in four, else a value that breaks arithmetic.
    fn f64_or(&mut self, usual: f64) -> f64 {
        if !self.byte().is_multiple_of(4) {
            return usual;
        }
        self.f64_value()
    }

    fn f64_value(&mut self) -> f64 {
        self.pick(&[
            0.0,
            1e-3,
            0.9,
            1.0,
            -1.0,
            1e300,
            f64::NAN,
            f64::INFINITY,
            f64::MIN_POSITIVE,
        ])
    }

    /// Every dtype candle can hold values of on the CPU.
    fn dtype(&mut self) -> DType {
        self.pick(&[
            DType::F32,
            DType::F32,
            DType::F64,
            DType::F16,
            DType::BF16,
            DType::U8,
            DType::U32,
            DType::I64,
            DType::I16,
            DType::I32,
            DType::F8E4M3,
        ])
    }

    fn dims(&mut self, rank: usize) -> Vec<usize> {
        (0..rank).map(|_| self.axis()).collect()
    }

    /// A tensor of `dims` filled from the case, cast to `dtype` (`None` if candle cannot).
    fn tensor(&mut self, dims: &[usize], dtype: DType) -> Option<Tensor> {
        let count: usize = dims.iter().product();
        let values: Vec<f32> = (0..count).map(|_| self.value()).collect();
        let t = Tensor::from_vec(values, dims, &Device::Cpu).ok()?;
        t.to_dtype(dtype).ok()
    }

    fn geometry(&mut self) -> Conv2dGeometry {
        Conv2dGeometry {
            pad: (self.size(), self.size(), self.size(), self.size()),
            stride: self.size(),
            dilation: self.size(),
            groups: self.size(),
        }
    }
}

/// What a case did: ran and returned, refused its arguments, or could not be built (a dtype
/// candle cannot convert to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ran,
    Refused,
    NotBuilt,
    /// A call that asks for a buffer this machine can make but that is large (past 2^16
    /// elements): a legitimate request, not run so that a case stays fast and small.
    TooLarge,
}

/// Whether a buffer of `dims` is large but makeable: more than 2^16 elements, at most 2^36
/// (past that the size probe refuses it on any machine this runs on, which is worth testing).
fn large(dims: &[usize]) -> bool {
    let count = dims.iter().fold(1usize, |n, &d| n.saturating_mul(d));
    count > 1 << 16 && count <= 1 << 36
}

/// The sum's gradient of a float result, when there is one: the backward passes run too.
fn backward(y: &Tensor) {
    if y.dtype().is_float()
        && y.elem_count() <= 4096
        && let Ok(sum) = y.to_dtype(DType::F32).and_then(|t| t.sum_all())
    {
        let _ = sum.backward();
    }
}

fn outcome<T>(result: candle_functional::Result<T>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ran,
        Err(_) => Outcome::Refused,
    }
}

/// Runs the case that `data` describes.
pub fn run_case(data: &[u8]) -> Outcome {
    let mut b = Bytes::new(data);
    let op = b.byte() % 14;
    let dtype = b.dtype();
    match op {
        0..=3 => {
            let g = b.geometry();
            let xd = b.dims(4);
            // A kernel that fits x three times in four; any shape otherwise.
            let kd = match (b.byte() % 4, g.groups) {
                (1..=3, 1..=4) => {
                    let side = 1 + b.byte() as usize % 3;
                    let filters = g.groups * (1 + b.byte() as usize % 2);
                    vec![filters, xd[1] / g.groups, side, side]
                }
                _ => b.dims(4),
            };
            let (Some(x), Some(k)) = (b.tensor(&xd, dtype), b.tensor(&kd, dtype)) else {
                return Outcome::NotBuilt;
            };
            let (x, k) = (Var::from_tensor(&x), Var::from_tensor(&k));
            let (Ok(x), Ok(k)) = (x, k) else {
                return Outcome::NotBuilt;
            };
            let bias_dims = [if b.flag() { kd[0] } else { b.axis() }];
            let (t, bo, l, r) = g.pad;
            let padded = [
                xd[0],
                xd[1],
                xd[2].saturating_add(t).saturating_add(bo),
                xd[3].saturating_add(l).saturating_add(r),
            ];
            let output = g.output_size(xd[2], xd[3], kd[2], kd[3]);
            // The output, and the CPU kernel's patches of one image (up to 64 per output).
            let big = output.is_ok_and(|(oh, ow)| {
                large(&[xd[0], kd[0], oh, ow]) || large(&[kd[1], kd[2], kd[3], oh, ow])
            });
            if large(&padded) || big {
                return Outcome::TooLarge;
            }
            let bias = b.tensor(&bias_dims, dtype);
            let relu = b.flag();
            let y = match op {
                0 => ops::conv2d(x.as_tensor(), k.as_tensor(), g),
                1 => match &bias {
                    Some(bias) => ops::conv2d_bias(x.as_tensor(), k.as_tensor(), bias, g),
                    None => return Outcome::NotBuilt,
                },
                2 => {
                    let fusion = if relu {
                        Fusion::new().with_epilogue(ElementWise::Relu)
                    } else {
                        Fusion::new()
                    };
                    ops::fused_conv2d(x.as_tensor(), k.as_tensor(), bias.as_ref(), fusion, g)
                }
                _ => ops::reference::conv2d(x.as_tensor(), k.as_tensor(), g),
            };
            if let Ok(y) = &y {
                backward(y);
            }
            let _ = g.output_size(b.size(), b.size(), b.size(), b.size());
            outcome(y)
        }
        4 => {
            let (xd, kd) = (b.dims(4), b.dims(4));
            let (Some(x), Some(k)) = (b.tensor(&xd, dtype), b.tensor(&kd, dtype)) else {
                return Outcome::NotBuilt;
            };
            let (stride, dilation) = (b.size(), b.size());
            let full = |len: usize, k: usize| {
                len.saturating_sub(1)
                    .saturating_mul(stride)
                    .saturating_add(k.saturating_sub(1).saturating_mul(dilation))
                    .saturating_add(1)
            };
            if large(&[xd[0], kd[1], full(xd[2], kd[2]), full(xd[3], kd[3])]) {
                return Outcome::TooLarge;
            }
            let y = ops::conv_transpose2d(&x, &k, stride, dilation);
            if let Ok(y) = &y {
                backward(y);
            }
            outcome(y)
        }
        5..=8 => {
            let rank = 2 + b.byte() as usize % 3;
            let xd = b.dims(rank);
            let Some(x) = b.tensor(&xd, dtype) else {
                return Outcome::NotBuilt;
            };
            let c = [xd.get(1).copied().unwrap_or(0) + usize::from(b.byte().is_multiple_of(4))];
            let per_channel = |b: &mut Bytes| {
                let dtype = b.dtype();
                b.flag().then(|| b.tensor(&c, dtype)).flatten()
            };
            let (gamma, beta) = (per_channel(&mut b), per_channel(&mut b));
            let (mean, var) = (per_channel(&mut b), per_channel(&mut b));
            let epsilon = b.f64_or(1e-3);
            // Any fusion, fitting the inputs or not: the op must refuse what does not fit.
            let element_wise = |b: &mut Bytes| match b.byte() % 4 {
                0 => None,
                1 => Some(ElementWise::Relu),
                2 => Some(ElementWise::Add),
                _ => Some(ElementWise::AddRelu),
            };
            let mut relus = Fusion::new();
            if let Some(f) = element_wise(&mut b) {
                relus = relus.with_prologue(f);
            }
            if let Some(f) = element_wise(&mut b) {
                relus = relus.with_epilogue(f);
            }
            let other = b.flag().then(|| b.tensor(&xd, dtype)).flatten();
            let mut inputs = vec![&x];
            inputs.extend(other.as_ref());
            let (Some(mean), Some(var)) = (mean.or_else(|| x.zeros_like().ok()), var) else {
                let r = ops::batch_norm_train(&x, gamma.as_ref(), beta.as_ref(), epsilon);
                return outcome(r);
            };
            let result = match op {
                5 => ops::batch_norm_train(&x, gamma.as_ref(), beta.as_ref(), epsilon).map(|r| r.0),
                6 => ops::batch_norm_eval(&x, gamma.as_ref(), beta.as_ref(), &mean, &var, epsilon),
                7 => ops::fused_batch_norm_train(
                    &inputs,
                    relus,
                    gamma.as_ref(),
                    beta.as_ref(),
                    epsilon,
                )
                .map(|r| r.0),
                _ => ops::fused_batch_norm_eval(
                    &inputs,
                    relus,
                    gamma.as_ref(),
                    beta.as_ref(),
                    &mean,
                    &var,
                    epsilon,
                ),
            };
            if let Ok(y) = &result {
                backward(y);
            }
            outcome(result)
        }
        9 => {
            let rank = 1 + b.byte() as usize % 4;
            let xd = b.dims(rank);
            let bd = [match b.byte() % 4 {
                0 => b.axis(),
                _ => xd.get(1).copied().unwrap_or(0),
            }];
            let bias_dtype = if b.byte().is_multiple_of(4) {
                b.dtype()
            } else {
                dtype
            };
            let (Some(x), Some(bias)) = (b.tensor(&xd, dtype), b.tensor(&bd, bias_dtype)) else {
                return Outcome::NotBuilt;
            };
            let result = ops::bias_add(&x, &bias).and_then(|y| ops::relu(&y));
            outcome(result)
        }
        10 => {
            let count = 1 + b.byte() as usize % 3;
            let mut tensors = Vec::new();
            for _ in 0..count {
                let (rank, dtype) = (b.byte() as usize % 4, b.dtype());
                let dims = b.dims(rank);
                match b.tensor(&dims, dtype) {
                    Some(t) => tensors.push(t),
                    None => return Outcome::NotBuilt,
                }
            }
            outcome(ops::all_finite(&tensors.iter().collect::<Vec<_>>()))
        }
        11 | 12 => {
            let rank = 1 + b.byte() as usize % 2;
            let dims = b.dims(rank);
            let make = |b: &mut Bytes| {
                let d = if b.byte().is_multiple_of(8) {
                    b.dims(dims.len())
                } else {
                    dims.clone()
                };
                let dtype = if b.byte().is_multiple_of(8) {
                    b.dtype()
                } else {
                    dtype
                };
                b.tensor(&d, dtype).and_then(|t| Var::from_tensor(&t).ok())
            };
            let (Some(w), Some(g), Some(m), Some(v)) =
                (make(&mut b), make(&mut b), make(&mut b), make(&mut b))
            else {
                return Outcome::NotBuilt;
            };
            let in_place = b.flag();
            let keep = match b.flag() {
                true => Tensor::new(b.byte() % 2, &Device::Cpu).ok(),
                false => None,
            };
            if op == 11 {
                let step = AdamStep {
                    alpha: b.f64_or(1e-3),
                    beta_1: b.f64_or(0.9),
                    beta_2: b.f64_or(0.999),
                    epsilon: b.f64_or(1e-7),
                    decay: b.f64_or(0.0),
                };
                let item = (&w, g.as_tensor(), &m, &v);
                let checked = ops::adam_update_is_finite(&[item], step);
                if in_place {
                    return outcome(
                        ops::adam_update_in_place(&[item], step, keep.as_ref()).and(checked),
                    );
                }
                outcome(ops::adam_update(&w, g.as_tensor(), &m, &v, step).and(checked))
            } else {
                let momentum = b.f64_or(0.9);
                let step = SgdStep {
                    learning_rate: b.f64_or(0.01),
                    momentum,
                    nesterov: b.flag(),
                    decay: b.f64_or(0.0),
                };
                let u = (momentum != 0.0 || b.flag()).then_some(&m);
                let item = (&w, g.as_tensor(), u);
                let checked = ops::sgd_update_is_finite(&[item], step);
                if in_place {
                    return outcome(
                        ops::sgd_update_in_place(&[item], step, keep.as_ref()).and(checked),
                    );
                }
                let u = u.map(|u| u.as_tensor());
                outcome(ops::sgd_update(&w, g.as_tensor(), u, step).and(checked))
            }
        }
        _ => layer_case(&mut b, dtype),
    }
}

/// A layer called on an input of hostile per-sample shape, built and run when that succeeds.
fn layer_case(b: &mut Bytes, dtype: DType) -> Outcome {
    let rank = 1 + b.byte() as usize % 3;
    let shape: Vec<usize> = (0..rank)
        .map(|_| {
            if b.byte().is_multiple_of(4) {
                b.size()
            } else {
                b.axis()
            }
        })
        .collect();
    let x = Input::new(shape.clone());
    let (k, s) = (b.size(), b.size());
    let padding = if b.flag() {
        Padding::Same
    } else {
        Padding::Valid
    };
    let called = match b.byte() % 12 {
        0 => Conv2D::new(b.axis(), k)
            .strides(s)
            .padding(padding)
            .call(&x),
        1 => MaxPooling2D::new(k).strides(s).padding(padding).call(&x),
        2 => AveragePooling2D::new(k)
            .strides(s)
            .padding(padding)
            .call(&x),
        3 => UpSampling2D::new(k).call(&x),
        4 => ZeroPadding2D::asymmetric((k, s), (b.size(), b.size())).call(&x),
        5 => Cropping2D::asymmetric((k, s), (b.size(), b.size())).call(&x),
        6 => Conv2DTranspose::new(b.axis(), k)
            .strides(s)
            .padding(padding)
            .call(&x),
        7 => DepthwiseConv2D::new(k)
            .depth_multiplier(s)
            .padding(padding)
            .call(&x),
        8 => Dense::new(k).call(&x),
        9 => Flatten::new().call(&x),
        10 => Concatenate::new(1).call_many(&[x.clone(), x.clone()]),
        _ => BatchNorm::new().call(&x),
    };
    let Ok(y) = called else {
        return Outcome::Refused;
    };
    let built = Model::new(std::slice::from_ref(&x), std::slice::from_ref(&y))
        .and_then(|m| m.build(&Device::Cpu, DType::F32, 0));
    let Ok(model) = built else {
        return Outcome::Refused;
    };
    // Run only what is small: the point is the checks, not a large product.
    let mut dims = vec![1 + b.byte() as usize % 2];
    dims.extend(&shape);
    let small = |d: &[usize]| {
        d.iter()
            .try_fold(1usize, |n, &v| n.checked_mul(v))
            .is_some_and(|n| n <= 4096)
    };
    if !small(&dims) || !small(y.shape()) {
        return Outcome::Ran;
    }
    let Some(input) = b.tensor(&dims, dtype) else {
        return Outcome::NotBuilt;
    };
    let mode = if b.flag() { Mode::Train } else { Mode::Eval };
    outcome(model.forward(&[input], mode))
}

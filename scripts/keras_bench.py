#!/usr/bin/env python3
"""Step-time benchmark of the article's networks in Keras (TensorFlow backend).

The Keras counterpart of `scripts/torch_reference.py bench`: same options,
same one-line JSON result (with "framework": "keras"), so the candle, PyTorch
and Keras numbers can be put side by side.

Pinned versions (what the commands below were run with):

    python3 -m venv <somewhere outside the repo>
    <venv>/bin/pip install tensorflow-cpu==2.21.0 numpy
    # Keras 3.15.1 comes with it; Python 3.11.

Commands (run from the repository root):

    <venv>/bin/python scripts/keras_bench.py --model resnet --mode train \\
        --batch-size 128 --steps 5 --warmup 2 --threads 2
    <venv>/bin/python scripts/keras_bench.py --model resnet --mode infer \\
        --batch-size 128 --steps 5 --warmup 2 --threads 2

    (`bench` may be given as a first argument, for symmetry with
    torch_reference.py: `keras_bench.py bench --model resnet ...`.)

What is timed, and why:

  * train: `model.train_on_batch(x, y)` on a model built and compiled exactly
    as the article does (Adam with Keras's defaults, sparse categorical
    cross-entropy, the accuracy metric).  That is the compiled train
    function `fit()` runs each step (a tf.function: forward, loss, gradients,
    Adam update, metric update), minus fit()'s input pipeline and callbacks.
    It returns NumPy values, so the step has finished when it returns.
  * infer: `model.predict_on_batch(x)`: the compiled predict function,
    i.e. model(x, training=False) inside a tf.function (BatchNorm uses its
    moving statistics), with the output copied to NumPy.  Calling the model
    eagerly instead runs layer by layer from Python and is slower; timing
    that would measure Python, not Keras.
  * XLA: --jit-compile auto (the default) is Keras's own default, which
    turns XLA *off* on machines without a GPU; "true" forces it on.
  * The inputs are TensorFlow tensors made once (NHWC, raw 0..255 values),
    so no NumPy-to-tensor conversion is timed.
  * Threads: intra-op = --threads, inter-op = 1, set before TensorFlow
    starts its thread pools.
  * --channels-last is accepted for interface parity only: Keras here is
    always channels_last (TensorFlow's CPU convolutions are NHWC-only).
  * --amp bf16 sets Keras's "mixed_bfloat16" policy (bf16 compute, f32
    variables) before the model is built.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
from keras import layers  # noqa: E402


# ---------------------------------------------------------------------------
# The article's networks, as the article writes them (parametrised by stages,
# width divisor and kernel size, like torch_reference.py).
# ---------------------------------------------------------------------------

def relu_bn(inputs):
    # ReLU *then* BatchNormalization, as in the article.
    relu = layers.ReLU()(inputs)
    bn = layers.BatchNormalization()(relu)
    return bn


def residual_block(x, downsample, filters, kernel_size=3):
    y = layers.Conv2D(kernel_size=kernel_size,
                      strides=(1 if not downsample else 2),
                      filters=filters, padding="same")(x)
    y = relu_bn(y)
    y = layers.Conv2D(kernel_size=kernel_size, strides=1,
                      filters=filters, padding="same")(y)
    if downsample:
        x = layers.Conv2D(kernel_size=1, strides=2,
                          filters=filters, padding="same")(x)
    out = layers.Add()([x, y])
    out = relu_bn(out)
    return out


def plain_block(x, downsample, filters, kernel_size=3):
    y = layers.Conv2D(kernel_size=kernel_size,
                      strides=(1 if not downsample else 2),
                      filters=filters, padding="same")(x)
    y = relu_bn(y)
    y = layers.Conv2D(kernel_size=kernel_size, strides=1,
                      filters=filters, padding="same")(y)
    y = relu_bn(y)
    return y


def create_net(model, stages=(2, 5, 5, 2), width_divisor=1, kernel_size=3,
               jit_compile="auto"):
    block = {"resnet": residual_block, "plain": plain_block}[model]
    inputs = layers.Input(shape=(32, 32, 3))
    num_filters = 64 // width_divisor

    # BatchNormalization on the raw 0-255 pixels does the input scaling.
    t = layers.BatchNormalization()(inputs)
    t = layers.Conv2D(kernel_size=3, strides=1, filters=num_filters,
                      padding="same")(t)
    t = relu_bn(t)

    for i, num_blocks in enumerate(stages):
        for j in range(num_blocks):
            t = block(t, downsample=(j == 0 and i != 0),
                      filters=num_filters, kernel_size=kernel_size)
        num_filters *= 2

    t = layers.AveragePooling2D(4)(t)
    t = layers.Flatten()(t)
    outputs = layers.Dense(10, activation="softmax")(t)

    net = keras.Model(inputs, outputs)
    net.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                metrics=["accuracy"], jit_compile=jit_compile)
    return net


def parse_stages(text):
    stages = tuple(int(s) for s in text.split(",") if s.strip())
    if not stages or any(n < 1 for n in stages):
        raise argparse.ArgumentTypeError("stages: comma-separated counts >= 1")
    return stages


def parse_jit(text):
    return {"auto": "auto", "true": True, "false": False}[text]


def main():
    argv = sys.argv[1:]
    if argv[:1] == ["bench"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["resnet", "plain"], default="resnet")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps (the first one traces the function)")
    p.add_argument("--threads", type=int, default=2,
                   help="TensorFlow intra-op threads (inter-op: 1)")
    p.add_argument("--device", default="cpu",
                   help="cpu, or gpu when TensorFlow can see one")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--channels-last", action="store_true",
                   help="accepted for parity; Keras is channels_last anyway")
    p.add_argument("--tf32", action="store_true",
                   help="GPU only: allow TF32 (TensorFlow's default is on; "
                   "this script turns it off unless asked)")
    p.add_argument("--jit-compile", type=parse_jit, default="auto",
                   help="auto (Keras default: no XLA without a GPU), true, "
                   "false")
    p.add_argument("--stages", type=parse_stages, default=(2, 5, 5, 2))
    p.add_argument("--width-divisor", type=int, default=1)
    p.add_argument("--kernel-size", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    # Must happen before TensorFlow creates its thread pools (first op).
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if args.device == "cpu":
        # Keep any visible GPU out of a CPU measurement.
        tf.config.set_visible_devices([], "GPU")
    elif not tf.config.list_physical_devices("GPU"):
        sys.exit(f"--device {args.device}: TensorFlow sees no GPU "
                 "(tensorflow-cpu has none)")
    # TensorFlow enables TF32 by default on Ampere and newer: plain f32
    # unless asked, as in the PyTorch bench.
    tf.config.experimental.enable_tensor_float_32_execution(args.tf32)
    if args.amp == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")

    keras.utils.set_random_seed(args.seed)
    model = create_net(args.model, args.stages, args.width_divisor,
                       args.kernel_size, args.jit_compile)
    print(f"{args.model}: {model.count_params():,} parameters (trainable "
          f"{sum(int(np.prod(w.shape)) for w in model.trainable_weights):,})",
          file=sys.stderr)

    rng = np.random.default_rng(args.seed)
    x = tf.constant(rng.integers(0, 256, (args.batch_size, 32, 32, 3))
                    .astype(np.float32))
    y = tf.constant(rng.integers(0, 10, (args.batch_size,)).astype(np.int32))

    if args.mode == "train":
        def step():
            model.train_on_batch(x, y)
    else:
        def step():
            model.predict_on_batch(x)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()  # returns NumPy: the step is complete
        times.append(time.perf_counter() - t0)

    median = statistics.median(times)
    gpu = args.device != "cpu"
    result = {
        "framework": "keras", "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "device": args.device,
        "model": args.model, "mode": args.mode,
        "batch_size": args.batch_size, "steps": args.steps,
        "median_ms": median * 1e3, "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "images_per_sec": args.batch_size / median,
        "threads": args.threads, "amp": args.amp,
        "channels_last": True,
        "tf32": args.tf32 if gpu else None,
        "jit_compile": model.jit_compile,
        "call": ("train_on_batch" if args.mode == "train"
                 else "predict_on_batch"),
        "stages": list(args.stages), "width_divisor": args.width_divisor,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

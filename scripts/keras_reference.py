#!/usr/bin/env python3
"""Keras reference data for the candle-functional test suite.

The Rust crate clones the Keras functional API on candle.  This script is the
"other side" of its parity tests: it builds networks in real Keras and writes
fixtures the Rust tests compare against.

Pinned versions (the fixtures were produced with exactly these):

    python3 -m venv <somewhere outside the repo>
    <venv>/bin/pip install tensorflow-cpu==2.21.0 safetensors numpy
    # Keras 3 (3.15.x) comes with tensorflow-cpu 2.21.0.

Run from the repository root:

    <venv>/bin/python scripts/keras_reference.py counts
        Builds the article's ("Building a ResNet in Keras") create_res_net()
        and create_plain_net() exactly as the article's code does, prints
        parameter and layer counts as JSON and writes them to
        tests/fixtures/keras_seed_models.json.

    <venv>/bin/python scripts/keras_reference.py parity
        Builds a small multi-branch network that uses every layer kind the
        crate supports, fills it with deterministic random weights, runs it in
        inference and in training mode, and writes
        tests/fixtures/keras_parity.safetensors (weights already converted to
        the Rust side's NCHW / OIHW layouts).  It then re-reads the file and
        checks it against an independent NumPy NCHW reimplementation, including
        TensorFlow's asymmetric 'same' padding.

    <venv>/bin/python scripts/keras_reference.py layers
        Runs single Keras layers on a fixed random input and writes their
        outputs, converted to NCHW, to tests/fixtures/keras_layers.safetensors
        (UpSampling2D nearest and bilinear, square and rectangular factors,
        GlobalMaxPooling2D, Cropping2D, the leaky_relu, elu and hard_swish
        activations, Softmax over another axis), and, with random weights written
        beside them as `<case>.<weight>` in the crate's layouts, Conv2DTranspose
        ('same'/'valid', window narrower than the stride, even window; TensorFlow's CPU
        kernel has no dilated transposed convolution),
        DepthwiseConv2D, SeparableConv2D and LayerNormalization.

    <venv>/bin/python scripts/keras_reference.py keras-import
        Saves small functional models with random weights as Keras 3 .keras
        files (tests/fixtures/keras_import_{cnn,blocks,nested,unsupported,more,
        mixed_orders,sequential,nested_sequential,flatten_concat,augment}.keras)
        and writes an input batch and Keras's outputs, NCHW, to
        tests/fixtures/keras_import.safetensors, for Model::from_keras. Given fixture
        names (`keras-import more`), writes only those and keeps the others.

    <venv>/bin/python scripts/keras_reference.py weighted-losses
        Keras's losses reduced with sample weights (per sample and per pixel), and one
        full-batch SGD step of fit with class_weight and with sample_weight, to
        tests/fixtures/keras_weighted_losses.json.

    <venv>/bin/python scripts/keras_reference.py callbacks
        ReduceLROnPlateau and EarlyStopping(restore_best_weights=True) fed scripted
        monitor values: the learning rate after every epoch, the stopping epoch and
        the restored epoch, to tests/fixtures/keras_callbacks.json.

    <venv>/bin/python scripts/keras_reference.py clipping
        One full-batch SGD step of fit with clipnorm, global_clipnorm and clipvalue
        (and none), to tests/fixtures/keras_clipping.json.

    <venv>/bin/python scripts/keras_reference.py regularizers
        A small model with L1/L2/L1L2 weight penalties and a frozen penalized layer, as
        tests/fixtures/keras_regularized.keras, and one SGD step of fit with it (loss
        with the penalties, new weights) in tests/fixtures/keras_regularizers.json.

    <venv>/bin/python scripts/keras_reference.py normalization
        Normalization adapted to a data set (mean, variance) and its outputs, and the
        inverted layer's, to tests/fixtures/keras_normalization.json.

    <venv>/bin/python scripts/keras_reference.py keras-resnet OUT_DIR
        Saves the article's ResNet (random weights) as OUT_DIR/resnet.keras
        (about 60 MB: not committed) with an input batch and Keras's output in
        OUT_DIR/resnet_io.safetensors, for the ignored test
        keras_import_article_resnet (CANDLE_FUNCTIONAL_KERAS_RESNET=OUT_DIR).

    <venv>/bin/python scripts/keras_reference.py keras-applications OUT_DIR
        Saves keras.applications' MobileNetV2 and ResNet50 (64x64 input, 10
        logits, random weights and BatchNorm statistics) as OUT_DIR/*.keras with
        inputs and Keras's outputs, for the ignored test keras_import_applications
        (CANDLE_FUNCTIONAL_KERAS_APPS=OUT_DIR).

All subcommands are deterministic: re-running them rewrites identical files (the
.keras archives differ only in the save date Keras writes into them).
"""

import argparse
import collections
import json
import os
import sys

# Quiet TensorFlow's start-up banner and pin it to deterministic CPU kernels.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
from keras import layers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")
COUNTS_PATH = os.path.join(FIXTURES, "keras_seed_models.json")
PARITY_PATH = os.path.join(FIXTURES, "keras_parity.safetensors")

# Keras BatchNormalization defaults (the parity net uses them unchanged).
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99


# ---------------------------------------------------------------------------
# `counts`: the article's two networks, written as the article writes them.
# ---------------------------------------------------------------------------

def relu_bn(inputs):
    # The article applies ReLU *before* BatchNormalization.
    relu = layers.ReLU()(inputs)
    bn = layers.BatchNormalization()(relu)
    return bn


def residual_block(x, downsample, filters, kernel_size=3):
    y = layers.Conv2D(kernel_size=kernel_size,
                      strides=(1 if not downsample else 2),
                      filters=filters,
                      padding="same")(x)
    y = relu_bn(y)
    y = layers.Conv2D(kernel_size=kernel_size,
                      strides=1,
                      filters=filters,
                      padding="same")(y)
    # The shortcut projection is created after the two block convolutions,
    # which decides the auto-generated layer names (conv2d_N) below.
    if downsample:
        x = layers.Conv2D(kernel_size=1,
                          strides=2,
                          filters=filters,
                          padding="same")(x)
    out = layers.Add()([x, y])
    out = relu_bn(out)
    return out


def plain_block(x, downsample, filters, kernel_size=3):
    y = layers.Conv2D(kernel_size=kernel_size,
                      strides=(1 if not downsample else 2),
                      filters=filters,
                      padding="same")(x)
    y = relu_bn(y)
    y = layers.Conv2D(kernel_size=kernel_size,
                      strides=1,
                      filters=filters,
                      padding="same")(y)
    y = relu_bn(y)
    return y


def _create_net(block):
    inputs = layers.Input(shape=(32, 32, 3))
    num_filters = 64

    # BatchNormalization on the raw 0-255 pixels does the input scaling.
    t = layers.BatchNormalization()(inputs)
    t = layers.Conv2D(kernel_size=3,
                      strides=1,
                      filters=num_filters,
                      padding="same")(t)
    t = relu_bn(t)

    num_blocks_list = [2, 5, 5, 2]
    for i in range(len(num_blocks_list)):
        num_blocks = num_blocks_list[i]
        for j in range(num_blocks):
            t = block(t, downsample=(j == 0 and i != 0), filters=num_filters)
        num_filters *= 2

    t = layers.AveragePooling2D(4)(t)
    t = layers.Flatten()(t)
    outputs = layers.Dense(10, activation="softmax")(t)

    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam",
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def create_res_net():
    return _create_net(residual_block)


def create_plain_net():
    return _create_net(plain_block)


def _param_count(weights):
    return int(sum(int(np.prod(w.shape)) for w in weights))


def describe_model(model):
    layer_rows = []
    for layer in model.layers:
        shape = [None if d is None else int(d) for d in layer.output.shape]
        layer_rows.append([layer.name, type(layer).__name__, shape,
                           int(layer.count_params())])
    class_counts = collections.Counter(type(l).__name__ for l in model.layers)
    return {
        "total_params": int(model.count_params()),
        "trainable_params": _param_count(model.trainable_weights),
        "non_trainable_params": _param_count(model.non_trainable_weights),
        "num_layers": len(model.layers),
        "layer_class_counts": dict(sorted(class_counts.items())),
        # [name, class, output shape (None = batch), parameter count]
        "layers": layer_rows,
    }


def cmd_counts(_args):
    result = {
        "generator": "scripts/keras_reference.py counts",
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
    }
    # clear_session() resets Keras's name counters, so each model gets the
    # names it would get as the first model built in a fresh process.
    keras.backend.clear_session()
    result["res_net"] = describe_model(create_res_net())
    keras.backend.clear_session()
    result["plain_net"] = describe_model(create_plain_net())

    text = json.dumps(result, indent=1)
    # One layer row per line keeps the fixture readable and diffable.
    text = _compact_layer_rows(text)
    print(text)
    os.makedirs(FIXTURES, exist_ok=True)
    with open(COUNTS_PATH, "w") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.relpath(COUNTS_PATH, REPO_ROOT)}", file=sys.stderr)


def _compact_layer_rows(text):
    data = json.loads(text)
    out = ["{"]
    keys = list(data)
    for i, key in enumerate(keys):
        comma = "," if i + 1 < len(keys) else ""
        value = data[key]
        if not isinstance(value, dict):
            out.append(f" {json.dumps(key)}: {json.dumps(value)}{comma}")
            continue
        out.append(f" {json.dumps(key)}: {{")
        sub = list(value)
        for j, sk in enumerate(sub):
            scomma = "," if j + 1 < len(sub) else ""
            sv = value[sk]
            if sk == "layers":
                out.append(f"  {json.dumps(sk)}: [")
                for r, row in enumerate(sv):
                    rcomma = "," if r + 1 < len(sv) else ""
                    out.append(f"   {json.dumps(row)}{rcomma}")
                out.append(f"  ]{scomma}")
            else:
                out.append(f"  {json.dumps(sk)}: {json.dumps(sv)}{scomma}")
        out.append(f" }}{comma}")
    out.append("}")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# `parity`: a small network exercising every supported layer kind.
# ---------------------------------------------------------------------------

# Per-sample input shape in NCHW terms.  H = 9 is odd and W = 8 even, so a
# Keras 'same' stride-2 3x3 convolution pads 1/1 on H but 0/1 on W: a
# symmetric padding of 1 gives the same output shape but a different result.
IN_C, IN_H, IN_W = 3, 9, 8
BATCH = 4

BN_LAYERS = ["bn_in", "bn_a", "bn_b"]
CONV_LAYERS = ["conv_a", "conv_b", "conv_c", "proj", "conv_d"]
DENSE_LAYERS = ["dense", "dense_2"]


def build_parity_model():
    inp = keras.Input(shape=(IN_H, IN_W, IN_C), name="input")
    x = layers.BatchNormalization(name="bn_in")(inp)
    x = layers.Conv2D(8, 3, padding="same", name="conv_a")(x)
    x = layers.ReLU(name="relu_a")(x)
    x = layers.BatchNormalization(name="bn_a")(x)
    y = layers.Conv2D(8, 3, strides=2, padding="same", name="conv_b")(x)
    y = layers.ReLU(name="relu_b")(y)
    y = layers.BatchNormalization(name="bn_b")(y)
    y = layers.Conv2D(8, 3, padding="same", name="conv_c")(y)
    s = layers.Conv2D(8, 1, strides=2, padding="same", name="proj")(x)
    add = layers.Add(name="add")([s, y])
    sub = layers.Subtract(name="sub")([s, y])
    mul = layers.Multiply(name="mul")([add, sub])
    avg = layers.Average(name="avg")([add, sub, mul])
    mx = layers.Maximum(name="max")([add, avg])
    mn = layers.Minimum(name="min")([sub, avg])
    cat = layers.Concatenate(axis=-1, name="concat")([mx, mn])
    z = layers.Conv2D(6, 3, strides=2, padding="same", use_bias=False,
                      name="conv_d")(cat)
    z = layers.Activation("tanh", name="tanh")(z)
    p = layers.ZeroPadding2D(((1, 0), (0, 1)), name="zpad")(z)
    p = layers.MaxPooling2D(2, name="maxpool")(p)
    f = layers.Flatten(name="flatten")(p)
    out0 = layers.Dense(10, activation="softmax", name="dense")(f)
    g = layers.GlobalAveragePooling2D(name="gap")(cat)
    g2 = layers.AveragePooling2D(2, name="avgpool")(cat)
    f2 = layers.Flatten(name="flatten_2")(g2)
    h = layers.Concatenate(axis=-1, name="concat_2")([g, f2])
    out1 = layers.Dense(4, name="dense_2")(h)
    return keras.Model(inp, [out0, out1], name="parity")


def random_weights(model):
    """Deterministic weights for every variable, in Keras layout.

    Returns {layer name: {variable name: array}}.  The draws happen in a fixed
    order (layer order, then the order written below), so the values only
    depend on the seed.
    """
    rng = np.random.default_rng(0)
    out = {}
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, layers.Dense)):
            # conv_d sums 3*3*16 inputs of the wide-ranging merge outputs;
            # with a 0.3 scale ~85% of its tanh outputs would be saturated
            # (|tanh| > 0.99), which would hide errors upstream of it.
            scale = 0.03 if layer.name == "conv_d" else 0.3
            w = {"kernel": rng.normal(size=layer.kernel.shape) * scale}
            if layer.use_bias:
                w["bias"] = rng.normal(size=layer.bias.shape) * 0.1
        elif isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape
            w = {
                "gamma": rng.uniform(0.5, 1.5, size=n),
                "beta": rng.normal(size=n) * 0.1,
            }
            if layer.name == "bn_in":
                # bn_in sees raw 0-255 pixels: statistics of that scale.
                w["moving_mean"] = rng.uniform(80.0, 150.0, size=n)
                w["moving_variance"] = rng.uniform(2000.0, 5000.0, size=n)
            else:
                # bn_a / bn_b follow a ReLU of an O(1) activation: a small
                # non-negative mean, a variance of order one.
                w["moving_mean"] = np.abs(rng.normal(size=n)) * 0.5
                w["moving_variance"] = rng.uniform(0.5, 2.0, size=n)
        else:
            assert not layer.weights, f"unexpected weights in {layer.name}"
            continue
        out[layer.name] = {k: v.astype(np.float32) for k, v in w.items()}
    return out


def load_weights(model, weights):
    for name, ws in weights.items():
        layer = model.get_layer(name)
        for var in layer.weights:
            var.assign(ws[var.path.split("/")[-1]])


def nhwc_to_nchw(a):
    return np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2)))


def keras_flatten_rows_to_nchw(kernel, h, w, c):
    """Reorder a Dense kernel's input rows from NHWC- to NCHW-flatten order.

    Keras flattens an NHWC tensor in (h, w, c) order, so row (i*w + j)*c + k
    of the following Dense kernel multiplies feature (i, j, k).  The Rust
    Flatten flattens NCHW in (c, h, w) order: the same feature sits at index
    k*h*w + i*w + j.  Putting each row at its NCHW index makes the Rust net
    compute exactly the Keras function with channel-first activations.
    """
    out_features = kernel.shape[1]
    assert kernel.shape[0] == h * w * c
    k = kernel.reshape(h, w, c, out_features)
    return np.ascontiguousarray(
        np.transpose(k, (2, 0, 1, 3)).reshape(h * w * c, out_features))


def to_fixture_layout(weights):
    """Keras-layout weights -> the tensors the Rust side loads."""
    t = {}
    for name, ws in weights.items():
        for var, value in ws.items():
            if var == "kernel" and name in CONV_LAYERS:
                # Keras HWIO -> candle OIHW.
                value = np.transpose(value, (3, 2, 0, 1))
            elif var == "kernel" and name == "dense":
                # Input is flatten(maxpool): NHWC (2, 1, 6).
                value = keras_flatten_rows_to_nchw(value, 2, 1, 6)
            elif var == "kernel" and name == "dense_2":
                # Input is concat(gap [16], flatten_2(avgpool) [2x2x16]):
                # only the flattened part's 64 rows are reordered.
                flat = keras_flatten_rows_to_nchw(value[16:], 2, 2, 16)
                value = np.concatenate([value[:16], flat])
            t[f"{name}.{var}"] = np.ascontiguousarray(value, dtype=np.float32)
    return t


def write_safetensors(tensors, path, metadata):
    """Write float32 tensors in the safetensors format, byte-reproducibly.

    safetensors.numpy.save_file serialises the metadata through a hash map,
    so its key order (and thus the file's bytes) changes from run to run.
    This writer sorts everything: header = 8-byte little-endian length, then
    JSON padded with spaces to a multiple of 8, then the raw data.
    """
    header = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for key in sorted(tensors):
        data = np.ascontiguousarray(tensors[key], dtype="<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensors[key].shape),
                       "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for data in chunks:
            f.write(data)


def cmd_parity(_args):
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()

    rng = np.random.default_rng(1)
    x_nchw = rng.uniform(0.0, 255.0,
                         size=(BATCH, IN_C, IN_H, IN_W)).astype(np.float32)
    x_nhwc = np.ascontiguousarray(np.transpose(x_nchw, (0, 2, 3, 1)))

    keras.backend.clear_session()
    model = build_parity_model()
    weights = random_weights(model)
    load_weights(model, weights)

    tensors = to_fixture_layout(weights)
    tensors["input"] = x_nchw

    # Inference mode: the moving statistics normalise.
    out0, out1 = model(x_nhwc, training=False)
    tensors["eval.out0"] = np.asarray(out0, dtype=np.float32)
    tensors["eval.out1"] = np.asarray(out1, dtype=np.float32)
    concat_model = keras.Model(model.input, model.get_layer("concat").output)
    tensors["eval.concat"] = nhwc_to_nchw(
        np.asarray(concat_model(x_nhwc, training=False), dtype=np.float32))
    conv_b_model = keras.Model(model.input, model.get_layer("conv_b").output)
    conv_b_keras = nhwc_to_nchw(
        np.asarray(conv_b_model(x_nhwc, training=False)))

    # Training mode on a fresh copy of the weights: batch statistics
    # normalise, and each BN's moving statistics take one momentum step.
    keras.backend.clear_session()
    train_model = build_parity_model()
    load_weights(train_model, weights)
    out0, out1 = train_model(x_nhwc, training=True)
    tensors["train.out0"] = np.asarray(out0, dtype=np.float32)
    tensors["train.out1"] = np.asarray(out1, dtype=np.float32)
    for name in BN_LAYERS:
        bn = train_model.get_layer(name)
        tensors[f"train_state.{name}.moving_mean"] = np.asarray(
            bn.moving_mean, dtype=np.float32)
        tensors[f"train_state.{name}.moving_variance"] = np.asarray(
            bn.moving_variance, dtype=np.float32)

    metadata = {
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "script": "scripts/keras_reference.py parity",
    }
    os.makedirs(FIXTURES, exist_ok=True)
    write_safetensors(tensors, PARITY_PATH, metadata)

    print(f"wrote {os.path.relpath(PARITY_PATH, REPO_ROOT)} "
          f"({os.path.getsize(PARITY_PATH)} bytes)")
    for key in sorted(tensors):
        print(f"  {key:40s} {list(tensors[key].shape)}")

    verify_fixture(conv_b_keras)


# ---------------------------------------------------------------------------
# Independent NumPy (NCHW, float64) reimplementation used as a self-check.
# It reads only the written fixture, in the Rust side's layouts, so it also
# checks the layout conversions (OIHW kernels, permuted Dense rows).
# ---------------------------------------------------------------------------

def tf_same_pads(size, k, s):
    """TensorFlow 'same' padding (before, after) of one spatial axis.

    Total max((ceil(n/s)-1)*s + k - n, 0); the smaller half goes first.
    """
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def np_conv2d(x, w, b, stride, pads):
    """x: NCHW, w: OIHW, pads: ((top, bottom), (left, right))."""
    x = np.pad(x, ((0, 0), (0, 0), pads[0], pads[1]))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh = (h - kh) // stride + 1
    ow = (wd - kw) // stride + 1
    y = np.zeros((n, o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride * (oh - 1) + 1:stride,
                      j:j + stride * (ow - 1) + 1:stride]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    if b is not None:
        y += b[None, :, None, None]
    return y


def np_conv_same(x, w, b, stride):
    k = w.shape[2]
    pads = (tf_same_pads(x.shape[2], k, stride),
            tf_same_pads(x.shape[3], k, stride))
    return np_conv2d(x, w, b, stride, pads)


def np_bn(x, p, name, training, state):
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    if training:
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)  # biased, as Keras uses
        state[f"{name}.moving_mean"] = (
            p[f"{name}.moving_mean"] * BN_MOMENTUM + mean * (1 - BN_MOMENTUM))
        state[f"{name}.moving_variance"] = (
            p[f"{name}.moving_variance"] * BN_MOMENTUM
            + var * (1 - BN_MOMENTUM))
    else:
        mean = p[f"{name}.moving_mean"]
        var = p[f"{name}.moving_variance"]
    std = np.sqrt(var.reshape(shape) + BN_EPSILON)
    x_hat = (x - mean.reshape(shape)) / std
    return (x_hat * p[f"{name}.gamma"].reshape(shape)
            + p[f"{name}.beta"].reshape(shape))


def np_pool(x, k, reduce):
    n, c, h, w = x.shape
    oh, ow = h // k, w // k  # 'valid', stride == pool size
    x = x[:, :, :oh * k, :ow * k].reshape(n, c, oh, k, ow, k)
    return reduce(x, axis=(3, 5))


def np_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_forward(p, x, training):
    p = {k: v.astype(np.float64) for k, v in p.items()}
    x = x.astype(np.float64)
    state = {}
    x = np_bn(x, p, "bn_in", training, state)
    x = np_conv_same(x, p["conv_a.kernel"], p["conv_a.bias"], 1)
    x = np_bn(np.maximum(x, 0), p, "bn_a", training, state)
    y = np_conv_same(x, p["conv_b.kernel"], p["conv_b.bias"], 2)
    y = np_bn(np.maximum(y, 0), p, "bn_b", training, state)
    y = np_conv_same(y, p["conv_c.kernel"], p["conv_c.bias"], 1)
    s = np_conv_same(x, p["proj.kernel"], p["proj.bias"], 2)
    add, sub = s + y, s - y
    mul = add * sub
    avg = (add + sub + mul) / 3
    cat = np.concatenate([np.maximum(add, avg), np.minimum(sub, avg)], axis=1)
    z = np.tanh(np_conv_same(cat, p["conv_d.kernel"], None, 2))
    z = np.pad(z, ((0, 0), (0, 0), (1, 0), (0, 1)))
    f = np_pool(z, 2, np.max).reshape(z.shape[0], -1)  # (c, h, w) order
    out0 = np_softmax(f @ p["dense.kernel"] + p["dense.bias"])
    g = cat.mean(axis=(2, 3))
    f2 = np_pool(cat, 2, np.mean).reshape(cat.shape[0], -1)
    h = np.concatenate([g, f2], axis=1)
    out1 = h @ p["dense_2.kernel"] + p["dense_2.bias"]
    return {"out0": out0, "out1": out1, "concat": cat}, state


def _check(label, got, want, rtol=1e-4, atol=1e-4):
    err = float(np.max(np.abs(got - want)))
    ok = np.allclose(got, want, rtol=rtol, atol=atol)
    print(f"  {'ok ' if ok else 'BAD'} {label:42s} max|diff| = {err:.3e}")
    return ok


def verify_fixture(conv_b_keras):
    print("numpy NCHW self-check against the written fixture:")
    t = load_file(PARITY_PATH)
    params = {k: v for k, v in t.items()
              if "." in k and k.split(".")[0] in
              BN_LAYERS + CONV_LAYERS + DENSE_LAYERS}
    x = t["input"]
    ok = True

    # TensorFlow 'same' padding: conv_b (3x3, stride 2) on a 9x8 map must pad
    # 1/1 on H and 0/1 on W.  Recompute its input with NumPy and compare the
    # Keras conv_b output against both explicit paddings.
    assert tf_same_pads(IN_H, 3, 2) == (1, 1)
    assert tf_same_pads(IN_W, 3, 2) == (0, 1)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    a = np_bn(x.astype(np.float64), p64, "bn_in", False, {})
    a = np_conv_same(a, p64["conv_a.kernel"], p64["conv_a.bias"], 1)
    a = np_bn(np.maximum(a, 0), p64, "bn_a", False, {})
    tf_pad = np_conv2d(a, p64["conv_b.kernel"], p64["conv_b.bias"], 2,
                       ((1, 1), (0, 1)))
    sym_pad = np_conv2d(a, p64["conv_b.kernel"], p64["conv_b.bias"], 2,
                        ((1, 1), (1, 1)))
    assert conv_b_keras.shape == tf_pad.shape == sym_pad.shape == (4, 8, 5, 4)
    ok &= _check("conv_b == pad H 1/1, W 0/1", conv_b_keras, tf_pad)
    sym_err = float(np.max(np.abs(conv_b_keras - sym_pad)))
    print(f"  {'ok ' if sym_err > 0.1 else 'BAD'} "
          f"{'conv_b != symmetric pad 1 (as expected)':42s} "
          f"max|diff| = {sym_err:.3e}")
    ok &= sym_err > 0.1

    for mode, training in (("eval", False), ("train", True)):
        got, state = np_forward(params, x, training)
        ok &= _check(f"{mode}.out0", got["out0"], t[f"{mode}.out0"])
        ok &= _check(f"{mode}.out1", got["out1"], t[f"{mode}.out1"])
        if mode == "eval":
            ok &= _check("eval.concat", got["concat"], t["eval.concat"])
        for key, value in sorted(state.items()):
            ok &= _check(f"train_state.{key}", value, t[f"train_state.{key}"])

    # Make sure the outputs are informative (no saturated softmax / tanh).
    print(f"  eval.out0 max prob {t['eval.out0'].max():.3f}, "
          f"train.out0 max prob {t['train.out0'].max():.3f}")
    pre = np_conv_same(got["concat"], p64["conv_d.kernel"], None, 2)
    print(f"  conv_d (train mode): {np.mean(np.abs(np.tanh(pre)) > 0.99):.0%} "
          f"of tanh outputs saturated (|tanh| > 0.99)")
    if not ok:
        sys.exit("self-check FAILED")
    print("self-check passed")


def cmd_layers(_args):
    """Single layers on one input: Keras's outputs, NCHW, for the Rust layer tests."""
    rng = np.random.default_rng(7)
    x_nhwc = rng.standard_normal((2, 3, 4, 5)).astype("float32")  # (n, h, w, c)
    tensors = {"input": nhwc_to_nchw(x_nhwc)}
    layers = {
        "up_nearest_2x2": keras.layers.UpSampling2D(size=(2, 2)),
        "up_nearest_1x3": keras.layers.UpSampling2D(size=(1, 3)),
        "up_bilinear_2x2": keras.layers.UpSampling2D(size=(2, 2), interpolation="bilinear"),
        "up_bilinear_3x2": keras.layers.UpSampling2D(size=(3, 2), interpolation="bilinear"),
        "global_max_pooling": keras.layers.GlobalMaxPooling2D(),
        "cropping": keras.layers.Cropping2D(cropping=((1, 0), (2, 1))),
        "leaky_relu": keras.layers.Activation("leaky_relu"),
        "elu": keras.layers.Activation("elu"),
        "hard_swish": keras.layers.Activation("hard_swish"),
    }
    for name, layer in layers.items():
        out = np.asarray(layer(x_nhwc))
        tensors[name] = nhwc_to_nchw(out) if out.ndim == 4 else out

    # Layers with weights: random weights (bias included), written beside the output as
    # `<case>.<weight>` in the crate's layouts.
    def depthwise_to_oihw(k):  # (kh, kw, in, mult) -> (in * mult, 1, kh, kw)
        kh, kw, cin, mult = k.shape
        return k.reshape(kh, kw, cin * mult).transpose(2, 0, 1)[:, None]

    def transpose_kernel(k):  # (kh, kw, filters, in) -> (in, filters, kh, kw)
        return k.transpose(3, 2, 0, 1)

    def conv_kernel(k):  # (kh, kw, in, filters) -> (filters, in, kh, kw)
        return k.transpose(3, 2, 0, 1)

    def chw(v):  # (h, w, c) -> (c, h, w)
        return v.transpose(2, 0, 1)

    weighted = {
        "conv_transpose_s2_same": (
            keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same"),
            [("kernel", transpose_kernel), ("bias", None)]),
        "conv_transpose_s2_valid": (
            keras.layers.Conv2DTranspose(4, 3, strides=2, padding="valid"),
            [("kernel", transpose_kernel), ("bias", None)]),
        "conv_transpose_k2_s3_valid": (
            keras.layers.Conv2DTranspose(2, 2, strides=3, padding="valid"),
            [("kernel", transpose_kernel), ("bias", None)]),
        "conv_transpose_k4_s1_same": (
            keras.layers.Conv2DTranspose(3, 4, strides=1, padding="same"),
            [("kernel", transpose_kernel), ("bias", None)]),
        "depthwise_s2_same_m2": (
            keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2),
            [("kernel", depthwise_to_oihw), ("bias", None)]),
        "depthwise_valid": (
            keras.layers.DepthwiseConv2D(2),
            [("kernel", depthwise_to_oihw), ("bias", None)]),
        "separable_same_m2": (
            keras.layers.SeparableConv2D(6, 3, padding="same", depth_multiplier=2),
            [("depthwise_kernel", depthwise_to_oihw), ("pointwise_kernel", conv_kernel),
             ("bias", None)]),
        "layer_norm_channels": (
            keras.layers.LayerNormalization(),
            [("gamma", None), ("beta", None)]),
        "layer_norm_sample": (
            keras.layers.LayerNormalization(axis=[1, 2, 3]),
            [("gamma", chw), ("beta", chw)]),
    }
    for name, (layer, converts) in weighted.items():
        layer.build(x_nhwc.shape)
        values = [rng.uniform(-0.5, 0.5, w.shape).astype("float32") for w in layer.weights]
        if isinstance(layer, keras.layers.LayerNormalization):
            values[0] = values[0] + 1.0  # gamma around one
        layer.set_weights(values)
        tensors[name] = nhwc_to_nchw(np.asarray(layer(x_nhwc)))
        for (param, convert), value in zip(converts, values):
            tensors[f"{name}.{param}"] = np.ascontiguousarray(
                convert(value) if convert else value)
    # Reshape and Permute of a (batch, 3, 4) sequence, where both layouts agree (on maps
    # they differ: the crate's element order is NCHW's).
    seq = rng.standard_normal((2, 3, 4)).astype("float32")
    tensors["seq_input"] = seq
    tensors["reshape_6x2"] = np.asarray(keras.layers.Reshape((6, -1))(seq))
    tensors["permute_21"] = np.asarray(keras.layers.Permute((2, 1))(seq))
    # Softmax over Keras's axis 1 (height in NHWC) is axis 2 of NCHW.
    tensors["softmax_height"] = nhwc_to_nchw(
        np.asarray(keras.layers.Softmax(axis=1)(x_nhwc)))
    path = os.path.join(FIXTURES, "keras_layers.safetensors")
    write_safetensors(tensors, path, {"keras": keras.__version__})
    print(f"wrote {path}: {sorted(tensors)}")

# ---------------------------------------------------------------------------
# `keras-import`: small .keras files for Model::from_keras, with Keras's outputs.
# ---------------------------------------------------------------------------

def randomize(model, seed):
    """Every weight random (biases and BatchNorm statistics too), deterministically."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for w in layer.weights:
            v = rng.uniform(-0.5, 0.5, w.shape).astype("float32")
            if "variance" in w.path or "gamma" in w.path:
                v = np.abs(v) + 0.5
            values.append(v)
        if values:
            layer.set_weights(values)
            if isinstance(layer, layers.Normalization):
                # An adapted Normalization computes from copies made when adapting ends
                # (as a loaded one does from its variables): refresh them.
                layer.finalize_state()


def import_cnn():
    """conv + BN + Add + Concatenate + pooling + Flatten + Dense, one input."""
    x_in = keras.Input((9, 8, 3), name="image")
    a = layers.Conv2D(4, 3, padding="same", name="conv_a")(x_in)
    a = layers.BatchNormalization(name="bn_a")(a)
    a = layers.ReLU(name="relu_a")(a)
    b = layers.Conv2D(4, 1, name="conv_b")(x_in)
    s = layers.Add(name="add")([a, b])
    c = layers.Concatenate(name="concat")([s, a])
    c = layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv_s2")(c)
    c = layers.MaxPooling2D(2, padding="same", name="pool")(c)
    f = layers.Flatten(name="flat")(c)
    f = layers.Dense(7, activation="tanh", name="hidden")(f)
    out = layers.Dense(5, activation="softmax", name="out")(f)
    return keras.Model(x_in, out, name="cnn")


def import_blocks():
    """Two inputs, two outputs: the depthwise/separable/transposed/normalization layers."""
    img = keras.Input((8, 8, 3), name="img")
    meta = keras.Input((6,), name="meta")
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(img)
    x = layers.LayerNormalization(name="ln")(x)
    x = layers.SeparableConv2D(8, 3, strides=2, padding="same", name="sep")(x)
    x = layers.LeakyReLU(name="leaky")(x)
    x = layers.BatchNormalization(name="bn_map")(x)
    u = layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="up_t")(x)
    u = layers.UpSampling2D(2, interpolation="bilinear", name="up_b")(u)
    u = layers.ZeroPadding2D(((1, 0), (0, 2)), name="pad")(u)
    u = layers.Cropping2D(((0, 1), (2, 0)), name="crop")(u)
    u = layers.Dense(3, name="pixel_dense")(u)              # Dense on a map: a 1x1 conv
    seg = layers.Softmax(name="seg")(u)                       # per-pixel softmax (channels)
    g = layers.GlobalAveragePooling2D(name="gap")(x)
    m = layers.Dense(8, name="meta_dense")(meta)
    m = layers.BatchNormalization(name="bn_vec")(m)
    m = layers.Dropout(0.3, name="drop")(m)
    h = layers.Concatenate(name="join")([g, m])
    h = layers.Activation("gelu", name="gelu")(h)
    cls = layers.Dense(4, name="cls")(h)
    ln_all = layers.LayerNormalization(axis=[1, 2, 3], name="ln_all")(x)
    avg = layers.AveragePooling2D(2, name="avg")(ln_all)
    gmax = layers.GlobalMaxPooling2D(name="gmax")(avg)
    score = layers.Dense(1, name="score")(layers.Multiply(name="gate")([gmax, layers.Dense(8, activation="sigmoid", name="gate_w")(m)]))
    return keras.Model([img, meta], [seg, cls, score], name="blocks")


def import_nested():
    """A functional base model nested in a functional model and called on two inputs
    (shared weights), as a keras.applications base is used for transfer learning."""
    x_in = keras.Input((8, 8, 3), name="patch")
    h = layers.Conv2D(6, 3, padding="same", name="conv")(x_in)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.ReLU(max_value=6.0, name="relu6")(h)
    h = layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    base = keras.Model(x_in, h, name="base")
    left = keras.Input((8, 8, 3), name="left")
    right = keras.Input((8, 8, 3), name="right")
    joined = layers.Concatenate(name="join")([base(left), base(right)])
    out = layers.Dense(3, name="head")(joined)
    return keras.Model([left, right], out, name="siamese")


def import_more():
    """The merges, Reshape, Permute and Rescaling the other fixtures leave out, and
    channels-last Flatten outputs merged element-wise before a Dense reads them."""
    a = keras.Input((6,), name="a")
    b = keras.Input((6,), name="b")
    img = keras.Input((3, 2, 2), name="img")
    d = layers.Subtract(name="sub")([a, b])
    m = layers.Average(name="avg")([a, b, d])
    hi = layers.Maximum(name="max")([a, d])
    lo = layers.Minimum(name="min")([b, m])
    r = layers.Reshape((2, 3), name="reshape")(layers.Multiply(name="mul")([hi, lo]))
    p = layers.Permute((2, 1), name="permute")(r)             # (3, 2)
    flat = layers.Reshape((6,), name="back")(p)
    f1 = layers.Flatten(name="flat_a")(img)                    # (h, w, c) feature order
    f1 = layers.Rescaling(0.5, offset=-0.25, name="rescale")(f1)
    f2 = layers.Flatten(name="flat_b")(layers.Activation("tanh", name="tanh")(img))
    f = layers.Subtract(name="sub_flat")([f1, layers.Dropout(0.5, name="drop")(f2)])
    f = layers.BatchNormalization(name="bn_flat")(f)
    out = layers.Dense(3, name="out")(layers.Concatenate(name="join")([flat, layers.Dense(4, name="mix")(f)]))
    return keras.Model([a, b, img], [out, p], name="more")


def import_flatten_concat():
    """Channels-last Flatten outputs that no Dense absorbs: one joined by a Concatenate
    before the Dense, one a model output through a Dropout; and one read by a Dense directly
    (the kernel-row path) for contrast."""
    img = keras.Input((4, 4, 3), name="img")
    meta = keras.Input((5,), name="meta")
    x = layers.Conv2D(2, 3, padding="same", name="conv")(img)
    flat = layers.Flatten(name="flat")(x)
    joined = layers.Concatenate(name="join")([flat, meta])
    out = layers.Dense(3, name="head")(joined)
    features = layers.Dropout(0.5, name="drop")(layers.Flatten(name="flat_out")(x))
    direct = layers.Dense(2, name="direct")(layers.Flatten(name="flat_dense")(img))
    return keras.Model([img, meta], [out, features, direct], name="flatten_concat")


def import_augment():
    """Augmentation layers inside the model (the identity at inference), then a CNN; one
    Normalization given its statistics, one adapted (Keras keeps those as variables)."""
    adapted = layers.Normalization(name="adapted")
    adapted.adapt(np.random.default_rng(5).standard_normal((16, 6, 7, 3)).astype("float32")
                  * [0.01, 0.02, 0.03] + [0.5, 0.4, 0.3])
    return keras.Sequential([
        keras.Input((6, 6, 3), name="image"),
        layers.RandomFlip("horizontal", name="flip_h"),
        layers.RandomFlip(name="flip_hv"),
        layers.RandomTranslation(0.125, (-0.1, 0.2), fill_mode="constant",
                                 interpolation="nearest", name="shift"),
        layers.RandomRotation(0.1, fill_mode="wrap", name="turn"),
        layers.RandomZoom((-0.2, 0.1), width_factor=0.3, fill_value=0.5, name="zoom"),
        layers.RandomContrast(0.2, name="contrast"),
        layers.Resizing(8, 10, name="resize"),
        layers.CenterCrop(6, 7, name="crop"),
        layers.RandomCrop(6, 7, name="random_crop"),
        layers.Rescaling(1 / 255.0, name="scale"),
        layers.Normalization(mean=[0.5, 0.4, 0.3], variance=[0.04, 0.09, 0.01], name="norm"),
        adapted,
        layers.Conv2D(2, 3, name="conv"),
        layers.GlobalAveragePooling2D(name="gap"),
        layers.Dense(2, name="out"),
    ], name="augment")


def import_sequential():
    """A top-level Sequential CNN (Keras's most common model), Flatten into Dense."""
    return keras.Sequential([
        keras.Input((8, 8, 3), name="image"),
        layers.Conv2D(4, 3, padding="same", name="conv"),
        layers.BatchNormalization(name="bn"),
        layers.ReLU(name="relu"),
        layers.MaxPooling2D(2, name="pool"),
        layers.Flatten(name="flat"),
        layers.Dense(5, activation="relu", name="hidden"),
        layers.Dense(3, name="logits"),
    ], name="seq_cnn")


def import_nested_sequential():
    """Sequential blocks nested in a functional model (one shared by two inputs) and a
    Sequential nested in that Sequential."""
    inner = keras.Sequential([keras.Input((6,)), layers.Dense(6, activation="tanh", name="inner_dense")],
                             name="inner")
    block = keras.Sequential([
        keras.Input((6,)),
        layers.Dense(8, activation="relu", name="d1"),
        layers.BatchNormalization(name="bn"),
        inner_wrap(inner),
        layers.Dense(4, name="d2"),
    ], name="block")
    a = keras.Input((6,), name="a")
    b = keras.Input((6,), name="b")
    joined = layers.Concatenate(name="join")([block(a), block(b)])
    return keras.Model([a, b], layers.Dense(2, name="out")(joined), name="outer")


def inner_wrap(inner):
    """A Sequential whose input is 8 wide around `inner` (6 wide): Dense(6) then inner."""
    return keras.Sequential([keras.Input((8,)), layers.Dense(6, name="to6"), inner], name="mid")


def import_mixed_orders():
    """One Dense called on a channels-last Flatten's output and on a plain vector: its
    kernel rows cannot follow both feature orders, so the Flatten needs the exact
    translation."""
    img = keras.Input((2, 2, 3), name="img")
    vec = keras.Input((12,), name="vec")
    shared = layers.Dense(4, name="shared")
    out = layers.Add(name="sum")([shared(layers.Flatten(name="flat")(img)), shared(vec)])
    return keras.Model([img, vec], out, name="mixed_orders")


def import_unsupported():
    x_in = keras.Input((6,), name="x")
    h = layers.Dense(4, name="dense")(x_in)
    out = layers.UnitNormalization(name="unit_norm")(h)
    return keras.Model(x_in, out, name="unsupported")


def import_embedding():
    """Ids through an Embedding, a Dense on each id's vector (rank 3), Flatten, joined with
    numeric features: a recommender's shape."""
    ids = keras.Input((6,), dtype="int32", name="ids")
    numeric = keras.Input((3,), name="numeric")
    vectors = layers.Embedding(20, 4, name="embed")(ids)
    per_id = layers.Dense(5, activation="relu", name="per_id")(vectors)
    joined = layers.Concatenate(name="join")([layers.Flatten(name="flat")(per_id), numeric])
    return keras.Model([ids, numeric], [layers.Dense(2, name="score")(joined), vectors],
                       name="embedding")


def keras_outputs(model, inputs):
    outs = model(inputs, training=False)
    if not isinstance(outs, (list, tuple)):
        outs = [outs]
    return [np.asarray(o) for o in outs]


def to_nchw(a):
    return nhwc_to_nchw(a) if a.ndim == 4 else np.ascontiguousarray(a)


def cmd_keras_import(args):
    """Writes tests/fixtures/keras_import_*.keras and their inputs and Keras outputs; with
    names, only those fixtures (the others' files and tensors are kept as they are)."""
    keras.utils.set_random_seed(11)
    rng = np.random.default_rng(12)
    out = os.path.join(FIXTURES, "keras_import.safetensors")
    tensors = {}
    if args.names:
        from safetensors.numpy import load_file
        tensors = {k: v for k, v in load_file(out).items()
                   if k.split(".")[0] not in args.names}
    for name, make, shapes in [
        ("cnn", import_cnn, [(2, 9, 8, 3)]),
        ("blocks", import_blocks, [(2, 8, 8, 3), (2, 6)]),
        ("nested", import_nested, [(2, 8, 8, 3), (2, 8, 8, 3)]),
        ("unsupported", import_unsupported, [(2, 6)]),
        ("more", import_more, [(2, 6), (2, 6), (2, 3, 2, 2)]),
        ("mixed_orders", import_mixed_orders, [(2, 2, 2, 3), (2, 12)]),
        ("sequential", import_sequential, [(2, 8, 8, 3)]),
        ("nested_sequential", import_nested_sequential, [(2, 6), (2, 6)]),
        ("flatten_concat", import_flatten_concat, [(2, 4, 4, 3), (2, 5)]),
        ("augment", import_augment, [(2, 6, 6, 3)]),
        # ("ids", n): integer ids below n.
        ("embedding", import_embedding, [("ids", (2, 6), 20), (2, 3)]),
    ]:
        def draw(s):
            if s[0] == "ids":
                return rng.integers(0, s[2], s[1]).astype("int64")
            return rng.standard_normal(s).astype("float32")
        if args.names and name not in args.names:
            for s in shapes:  # the same inputs for the others, whichever are written
                draw(s)
            continue
        model = make()
        randomize(model, seed=len(name))
        path = os.path.join(FIXTURES, f"keras_import_{name}.keras")
        model.save(path)
        inputs = [draw(s) for s in shapes]
        if name != "unsupported":
            for i, x in enumerate(inputs):
                tensors[f"{name}.input_{i}"] = to_nchw(x)
            for i, y in enumerate(keras_outputs(model, inputs)):
                tensors[f"{name}.output_{i}"] = to_nchw(y)
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    write_safetensors(tensors, out, {"keras": keras.__version__})
    print(f"wrote {out}: {sorted(tensors)}")


def cmd_weighted_losses(_args):
    """Keras's losses reduced with sample weights, and one SGD step of fit with class_weight
    and sample_weight, written as JSON (channels-first where a tensor has positions)."""
    rng = np.random.default_rng(5)
    f32 = lambda *shape: rng.standard_normal(shape).astype("float32")
    cases = []

    def case(name, loss, output, target, weight, channels_last_output=False):
        value = float(loss(target, output, sample_weight=weight))
        out = np.moveaxis(output, -1, 1) if channels_last_output else output
        cases.append({"name": name, "output": out.tolist(), "output_shape": list(out.shape),
                      "target": np.asarray(target).tolist(), "target_shape": list(np.shape(target)),
                      "weight": np.asarray(weight).tolist(), "weight_shape": list(np.shape(weight)),
                      "loss": value})

    losses = keras.losses
    case("sparse_logits", losses.SparseCategoricalCrossentropy(from_logits=True),
         f32(4, 3), np.array([0, 2, 1, 2]), np.array([1.0, 0.0, 2.5, 0.5], "float32"))
    case("sparse_per_pixel", losses.SparseCategoricalCrossentropy(from_logits=True),
         f32(2, 2, 2, 3), rng.integers(0, 3, (2, 2, 2)), rng.uniform(0, 2, (2, 2, 2)).astype("float32"),
         channels_last_output=True)
    probs = np.abs(f32(3, 4)) + 0.1
    probs /= probs.sum(-1, keepdims=True)
    case("categorical_probs", losses.CategoricalCrossentropy(), probs,
         np.eye(4, dtype="float32")[[1, 3, 0]], np.array([2.0, 1.0, 0.0], "float32"))
    case("binary_logits", losses.BinaryCrossentropy(from_logits=True), f32(4, 1),
         np.array([[1.0], [0.0], [1.0], [0.0]], "float32"), np.array([1.0, 3.0, 0.5, 1.0], "float32"))
    case("mse", losses.MeanSquaredError(), f32(3, 2), f32(3, 2), np.array([0.0, 1.0, 4.0], "float32"))
    case("huber", losses.Huber(delta=0.5), f32(3, 2), f32(3, 2), np.array([1.0, 2.0, 3.0], "float32"))

    # One full-batch SGD step of fit with class_weight, and one with sample_weight.
    steps = []
    x, y = f32(6, 4), np.array([0, 1, 0, 0, 1, 0])
    kernel, bias = f32(4, 2) * 0.5, f32(2) * 0.1
    for name, extra in [("class_weight", {"class_weight": {0: 1.0, 1: 9.0}}),
                        ("sample_weight", {"sample_weight": np.array([1, 0, 2, 1, 3, 0.5], "float32")})]:
        inp = keras.Input((4,))
        model = keras.Model(inp, layers.Dense(2, name="dense")(inp))
        model.get_layer("dense").set_weights([kernel, bias])
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], weighted_metrics=["accuracy"])
        fitted = model.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0, **extra)
        new_kernel, new_bias = model.get_layer("dense").get_weights()
        # Metrics of the step (on the outputs before the update), and an evaluation of the
        # updated model with the same sample weights (class weights apply in fit only).
        evaluated = model.evaluate(x, y, batch_size=6, verbose=0, return_dict=True,
                                   sample_weight=extra.get("sample_weight"))
        steps.append({"name": name, "x": x.tolist(), "y": y.tolist(), "kernel": kernel.tolist(),
                      "bias": bias.tolist(), "new_kernel": new_kernel.tolist(),
                      "new_bias": new_bias.tolist(),
                      "class_weight": [[k, v] for k, v in extra.get("class_weight", {}).items()],
                      "sample_weight": extra.get("sample_weight", np.ones(6)).tolist(),
                      "history": {k: float(v[0]) for k, v in fitted.history.items()},
                      "evaluation": {k: float(v) for k, v in evaluated.items()}})
    out = os.path.join(FIXTURES, "keras_weighted_losses.json")
    with open(out, "w") as f:
        json.dump({"keras": keras.__version__, "cases": cases, "steps": steps}, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")


def cmd_callbacks(_args):
    """ReduceLROnPlateau and EarlyStopping driven by scripted monitor values: the learning
    rate after every epoch, the epoch training stops at and the epoch whose weights
    restore_best_weights brings back, written as JSON."""
    def tiny_model():
        inp = keras.Input((1,))
        model = keras.Model(inp, layers.Dense(1, use_bias=False, name="dense")(inp))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        return model

    def drive(callback, monitor, values, model):
        callback.set_model(model)
        callback.on_train_begin()
        rates, stopped = [], None
        for epoch, value in enumerate(values):
            callback.on_epoch_begin(epoch)
            # The model's one weight is the epoch's number: what restore_best_weights brings
            # back says which epoch it kept.
            model.get_layer("dense").set_weights([np.array([[float(epoch)]], "float32")])
            callback.on_epoch_end(epoch, {monitor: value})
            rates.append(float(np.array(model.optimizer.learning_rate)))
            if model.stop_training:
                stopped = epoch
                break
        callback.on_train_end()
        restored = float(model.get_layer("dense").get_weights()[0][0, 0])
        return rates, stopped, restored

    rng = np.random.default_rng(11)
    noisy_down = (1.0 / np.arange(1, 31) + rng.uniform(0, 0.05, 30)).tolist()
    bumpy_up = np.minimum(0.99, np.cumsum(rng.uniform(-0.02, 0.05, 30)) + 0.3).tolist()
    plateau = [1.0, 0.9, 0.9, 0.9, 0.89995, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    sequences = {"noisy_down": ("val_loss", noisy_down), "bumpy_up": ("val_accuracy", bumpy_up),
                 "plateau": ("val_loss", plateau)}
    reduce_cases = []
    for seq, (monitor, values) in sequences.items():
        mode = "max" if "acc" in monitor else "min"
        for settings in [dict(patience=2), dict(patience=1, factor=0.5, cooldown=2),
                         dict(patience=0, factor=0.2, min_lr=1e-3, min_delta=0.01),
                         dict(patience=3, factor=0.5, min_delta=0.0)]:
            model = tiny_model()
            cb = keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, **settings)
            rates, _, _ = drive(cb, monitor, values, model)
            reduce_cases.append({"sequence": seq, "monitor": monitor, "values": values,
                                 "settings": settings, "initial_lr": 0.1, "rates": rates})
    stop_cases = []
    for seq, (monitor, values) in sequences.items():
        mode = "max" if "acc" in monitor else "min"
        for settings in [dict(patience=2), dict(patience=3, min_delta=0.01),
                         dict(patience=0), dict(patience=4, baseline=0.5),
                         dict(patience=2, start_from_epoch=3)]:
            model = tiny_model()
            cb = keras.callbacks.EarlyStopping(monitor=monitor, mode=mode,
                                               restore_best_weights=True, **settings)
            _, stopped, restored = drive(cb, monitor, values, model)
            stop_cases.append({"sequence": seq, "monitor": monitor, "values": values,
                               "settings": settings, "stopped_epoch": stopped,
                               "restored_epoch": restored})
    out = os.path.join(FIXTURES, "keras_callbacks.json")
    with open(out, "w") as f:
        json.dump({"keras": keras.__version__, "reduce_lr_on_plateau": reduce_cases,
                   "early_stopping": stop_cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")


def cmd_clipping(_args):
    """One full-batch SGD step of fit with each of Keras's gradient clippings (clipnorm,
    global_clipnorm, clipvalue) set tight enough to act, written as JSON."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 4)).astype("float32") * 3.0
    y = np.array([0, 1, 0, 0, 1, 1])
    kernel = (rng.standard_normal((4, 2)) * 0.5).astype("float32")
    bias = (rng.standard_normal(2) * 0.1).astype("float32")
    steps = []
    for name, value in [("clipnorm", 0.05), ("global_clipnorm", 0.05), ("clipvalue", 0.01),
                        ("none", None)]:
        inp = keras.Input((4,))
        model = keras.Model(inp, layers.Dense(2, name="dense")(inp))
        model.get_layer("dense").set_weights([kernel, bias])
        extra = {} if value is None else {name: value}
        model.compile(optimizer=keras.optimizers.SGD(0.1, **extra),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0)
        new_kernel, new_bias = model.get_layer("dense").get_weights()
        steps.append({"name": name, "value": value, "x": x.tolist(), "y": y.tolist(),
                      "kernel": kernel.tolist(), "bias": bias.tolist(),
                      "new_kernel": new_kernel.tolist(), "new_bias": new_bias.tolist()})
    out = os.path.join(FIXTURES, "keras_clipping.json")
    with open(out, "w") as f:
        json.dump({"keras": keras.__version__, "steps": steps}, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")


def cmd_regularizers(_args):
    """A small model with Keras's L1, L2 and L1L2 weight penalties (and a frozen penalized
    layer), saved as tests/fixtures/keras_regularized.keras, and one full-batch SGD step of
    fit with it: the reported loss, the penalties and the new weights, as JSON."""
    keras.utils.set_random_seed(21)
    rng = np.random.default_rng(22)
    regs = keras.regularizers
    inp = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", name="conv",
                      kernel_regularizer=regs.L2(0.01))(inp)
    x = layers.BatchNormalization(name="bn", gamma_regularizer=regs.L1(0.005))(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    frozen = layers.Dense(5, name="frozen", kernel_regularizer=regs.L2(0.5))
    x = frozen(x)
    frozen.trainable = False
    x = layers.Dense(3, name="head", kernel_regularizer=regs.L1L2(0.001, 0.003),
                     bias_regularizer=regs.L1(0.02))(x)
    model = keras.Model(inp, x)
    randomize(model, seed=3)
    path = os.path.join(FIXTURES, "keras_regularized.keras")
    model.save(path)
    x_data = rng.standard_normal((6, 8, 8, 3)).astype("float32")
    y_data = np.array([0, 1, 2, 0, 1, 2])
    penalty = float(sum(float(l) for l in model.losses))
    before = {w.path: np.asarray(w) for w in model.weights}
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x_data, y_data, batch_size=6, epochs=1, shuffle=False, verbose=0)
    after = {}
    for w in model.weights:
        a = np.asarray(w)
        if a.ndim == 4:  # HWIO -> OIHW, as the importer stores conv kernels
            a = a.transpose(3, 2, 0, 1)
        after[w.path] = a.tolist()
    out = os.path.join(FIXTURES, "keras_regularizers.json")
    with open(out, "w") as f:
        json.dump({"keras": keras.__version__, "x_nchw": nhwc_to_nchw(x_data).tolist(),
                   "y": y_data.tolist(), "penalty_before": penalty,
                   "loss": history.history["loss"][0], "weights_after": after,
                   "changed": sorted(k for k in before
                                     if not np.allclose(before[k], np.asarray(
                                         model.get_layer(k.split("/")[0]).weights[
                                             [w.path for w in model.get_layer(
                                                 k.split("/")[0]).weights].index(k)])))},
                  f, indent=1)
        f.write("\n")
    print(f"wrote {path} and {out}")


def cmd_normalization(_args):
    """Keras's Normalization adapted to a data set: its mean and variance, and its outputs
    (and the inverted layer's) on other inputs, channels first, as JSON."""
    rng = np.random.default_rng(31)
    x = (rng.standard_normal((20, 5, 5, 3)) * [1.0, 4.0, 0.5] + [0.0, 10.0, -3.0]).astype("float32")
    other = (rng.standard_normal((4, 5, 5, 3)) * 3.0).astype("float32")
    norm = layers.Normalization()
    norm.adapt(x)
    mean = np.asarray(norm.mean).reshape(-1)
    variance = np.asarray(norm.variance).reshape(-1)
    out = np.asarray(norm(other))
    inverted = np.asarray(layers.Normalization(mean=mean, variance=variance, invert=True)(other))
    path = os.path.join(FIXTURES, "keras_normalization.json")
    with open(path, "w") as f:
        json.dump({"keras": keras.__version__, "x": nhwc_to_nchw(x).tolist(),
                   "other": nhwc_to_nchw(other).tolist(), "mean": mean.tolist(),
                   "variance": variance.tolist(), "output": nhwc_to_nchw(out).tolist(),
                   "inverted": nhwc_to_nchw(inverted).tolist()}, f)
        f.write("\n")
    print(f"wrote {path}")


def cmd_image_transforms(_args):
    """keras.ops.image.affine_transform (TensorFlow's ImageProjectiveTransformV3) on a small
    batch for translation, rotation, zoom and projective matrices, every fill mode and both
    interpolations; the matrices Keras's RandomTranslation, RandomRotation and RandomZoom build
    from their draws; RandomContrast's output for given factors; Resizing and CenterCrop.
    Channels first, as JSON."""
    rng = np.random.default_rng(41)
    x = rng.standard_normal((2, 5, 7, 3)).astype("float32")
    h, w = x.shape[1], x.shape[2]
    translate = layers.RandomTranslation(0.5, 0.5)
    shifts = np.array([[1.6, -0.7], [-2.0, 3.0]], "float32")  # (dx, dy) per image
    rotate = layers.RandomRotation(0.2)
    angles = np.array([30.0, -75.0], "float32")
    rotation = np.asarray(rotate._compute_affine_matrix(
        center_x=0.5, center_y=0.5, angle=keras.ops.convert_to_tensor(angles),
        translate_x=np.zeros(2, "float32"), translate_y=np.zeros(2, "float32"),
        scale=np.ones(2, "float32"), shear_x=np.zeros(2, "float32"),
        shear_y=np.zeros(2, "float32"), height=h, width=w))
    zoom = layers.RandomZoom(0.5)
    zooms = np.array([[0.7, 1.3], [1.4, 0.8]], "float32")  # (zx, zy) per image
    matrices = {
        "translation": np.asarray(translate._get_translation_matrix(shifts)),
        "rotation": rotation,
        "zoom": np.asarray(zoom._get_zoom_matrix(zooms, h, w)),
        "projective": np.array([[1.1, 0.2, -0.5, -0.1, 0.9, 0.8, 0.01, -0.02],
                                [0.8, -0.3, 1.5, 0.25, 1.2, -1.0, -0.03, 0.02]], "float32"),
    }
    cases = []
    for name, m in matrices.items():
        for fill_mode in ["reflect", "wrap", "constant", "nearest"]:
            for interpolation in ["nearest", "bilinear"]:
                out = keras.ops.image.affine_transform(
                    x, m, interpolation=interpolation, fill_mode=fill_mode, fill_value=0.5)
                cases.append({"matrix": name, "fill_mode": fill_mode,
                              "interpolation": interpolation,
                              "output": nhwc_to_nchw(np.asarray(out)).tolist()})
    contrast = layers.RandomContrast(0.4, value_range=(-1.5, 1.5))
    factors = np.array([0.6, 1.35], "float32").reshape(2, 1, 1, 1)
    contrasted = np.asarray(contrast.transform_images(
        x, {"contrast_factor": factors}, training=True))
    resized = []
    for (th, tw), interpolation, crop in [((3, 4), "bilinear", False), ((8, 11), "bilinear", False),
                                          ((3, 4), "nearest", False), ((8, 11), "nearest", False),
                                          ((4, 4), "bilinear", True), ((6, 3), "nearest", True)]:
        out = layers.Resizing(th, tw, interpolation=interpolation, crop_to_aspect_ratio=crop)(x)
        resized.append({"height": th, "width": tw, "interpolation": interpolation,
                        "crop_to_aspect_ratio": crop,
                        "output": nhwc_to_nchw(np.asarray(out)).tolist()})
    center_cropped = []
    for th, tw in [(3, 4), (5, 7), (6, 4), (2, 9)]:
        out = layers.CenterCrop(th, tw)(x)
        center_cropped.append({"height": th, "width": tw,
                               "output": nhwc_to_nchw(np.asarray(out)).tolist()})
    # RandomCrop on an input not larger than its window, in training: Keras crops the centred
    # window of the output's aspect ratio and resizes (no random draw).
    random_crop_small = np.asarray(layers.RandomCrop(6, 4)(x, training=True))
    path = os.path.join(FIXTURES, "keras_image_transforms.json")
    with open(path, "w") as f:
        json.dump({"keras": keras.__version__, "x": nhwc_to_nchw(x).tolist(),
                   "resized": resized, "center_cropped": center_cropped,
                   "random_crop_small": nhwc_to_nchw(random_crop_small).tolist(),
                   "shifts": shifts.tolist(), "angles": angles.tolist(),
                   "zooms": zooms.tolist(),
                   "matrices": {k: v.tolist() for k, v in matrices.items()},
                   "cases": cases, "contrast_factors": factors.reshape(-1).tolist(),
                   "contrasted": nhwc_to_nchw(contrasted).tolist()}, f)
        f.write("\n")
    print(f"wrote {path}")


def cmd_keras_resnet(args):
    """The article's ResNet saved by Keras (too big to commit), with an input batch and its
    outputs, for the ignored test `keras_import_article_resnet`."""
    keras.utils.set_random_seed(21)
    model = create_res_net()
    # Keras's own initial kernels; random biases and BatchNorm parameters and statistics,
    # so that every conversion matters (uniform weights would saturate the softmax).
    rng = np.random.default_rng(21)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32")
                               if i in (0, 3) else
                               rng.uniform(-0.2, 0.2, w.shape).astype("float32")
                               for i, w in enumerate(layer.get_weights())])
        elif layer.get_weights():
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.uniform(-0.1, 0.1, bias.shape).astype("float32")])
    os.makedirs(args.out_dir, exist_ok=True)
    model.save(os.path.join(args.out_dir, "resnet.keras"))
    x = np.random.default_rng(22).standard_normal((4, 32, 32, 3)).astype("float32")
    features = keras.Model(model.inputs, model.get_layer("flatten").output)
    tensors = {"input": to_nchw(x), "output": keras_outputs(model, [x])[0],
               "flatten": keras_outputs(features, [x])[0]}
    write_safetensors(tensors, os.path.join(args.out_dir, "resnet_io.safetensors"),
                      {"keras": keras.__version__})
    print(f"wrote {args.out_dir}/resnet.keras and resnet_io.safetensors")


def cmd_keras_applications(args):
    """keras.applications' MobileNetV2 and ResNet50 (Keras's random initial weights, random
    BatchNorm statistics, logits out) saved as .keras with an input batch and Keras's outputs,
    for the ignored test keras_import_applications (too big to commit)."""
    keras.utils.set_random_seed(31)
    os.makedirs(args.out_dir, exist_ok=True)
    rng = np.random.default_rng(32)
    for name, make in [("mobilenetv2", keras.applications.MobileNetV2),
                       ("resnet50", keras.applications.ResNet50)]:
        model = make(weights=None, input_shape=(64, 64, 3), classes=10,
                     classifier_activation=None)
        for layer in model.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32")
                                   if i in (0, 3) else
                                   rng.uniform(-0.2, 0.2, w.shape).astype("float32")
                                   for i, w in enumerate(layer.get_weights())])
        model.save(os.path.join(args.out_dir, f"{name}.keras"))
        x = rng.standard_normal((2, 64, 64, 3)).astype("float32")
        y = keras_outputs(model, [x])[0]
        write_safetensors({"input": to_nchw(x), "output": y},
                          os.path.join(args.out_dir, f"{name}_io.safetensors"),
                          {"keras": keras.__version__})
        print(f"wrote {args.out_dir}/{name}.keras ({len(model.layers)} layers)")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("counts", help="article model parameter/layer counts")
    sub.add_parser("parity",
                   help="write tests/fixtures/keras_parity.safetensors")
    sub.add_parser("layers",
                   help="write tests/fixtures/keras_layers.safetensors")
    keras_import = sub.add_parser(
        "keras-import", help="write tests/fixtures/keras_import_*.keras and their outputs")
    keras_import.add_argument("names", nargs="*",
                              help="only these fixtures (cnn, blocks, nested, unsupported, more, mixed_orders, sequential, nested_sequential, flatten_concat, augment, embedding)")
    sub.add_parser("weighted-losses",
                   help="write tests/fixtures/keras_weighted_losses.json")
    sub.add_parser("clipping",
                   help="write tests/fixtures/keras_clipping.json")
    sub.add_parser("regularizers",
                   help="write tests/fixtures/keras_regularized.keras and keras_regularizers.json")
    sub.add_parser("normalization",
                   help="write tests/fixtures/keras_normalization.json")
    sub.add_parser("image-transforms",
                   help="write tests/fixtures/keras_image_transforms.json")
    sub.add_parser("callbacks",
                   help="write tests/fixtures/keras_callbacks.json")
    resnet = sub.add_parser("keras-resnet",
                            help="save the article's ResNet as .keras with outputs")
    resnet.add_argument("out_dir")
    apps = sub.add_parser("keras-applications",
                          help="save keras.applications MobileNetV2 and ResNet50 as .keras")
    apps.add_argument("out_dir")
    args = parser.parse_args()
    {"counts": cmd_counts, "parity": cmd_parity, "layers": cmd_layers,
     "keras-import": cmd_keras_import,
     "weighted-losses": cmd_weighted_losses,
     "callbacks": cmd_callbacks,
     "clipping": cmd_clipping,
     "regularizers": cmd_regularizers,
     "normalization": cmd_normalization,
     "image-transforms": cmd_image_transforms,
     "keras-resnet": cmd_keras_resnet,
     "keras-applications": cmd_keras_applications}[args.command](args)

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch twin of the article's networks, for training and speed references.

The crate reimplements the Keras functional API on candle and ships the
ResNet (and its plain twin) of "Building a ResNet in Keras".  This script
builds the *same functions* in PyTorch, NCHW, the way Keras builds them, so
that the Rust side's training curves and step times have a second, fast
reference besides Keras itself (scripts/keras_reference.py,
scripts/keras_bench.py):

  * TensorFlow 'same' padding, asymmetric where TensorFlow is (a 3x3
    stride-2 conv on an even input pads 0 top/left and 1 bottom/right;
    PyTorch's symmetric padding=1 would compute a different function);
  * Keras initialisers (glorot_uniform kernels, zero biases) and Keras
    BatchNormalization (momentum 0.99, epsilon 1e-3);
  * Adam with Keras's defaults (lr 1e-3, betas 0.9/0.999, epsilon 1e-7);
  * raw 0-255 pixels by default: the input BatchNorm does the scaling.

Pinned versions (what the commands below were run with):

    python3 -m venv <somewhere outside the repo>
    <venv>/bin/pip install torch numpy
    # torch 2.15.0 (PyPI wheel, +cu132 build, run on CPU), numpy 2.4.6,
    # Python 3.11.  The bench also runs on torch 2.11 + CUDA, Python 3.12.

Commands (run from the repository root; DATA = the folder holding
data_batch_1.bin ... data_batch_5.bin and test_batch.bin):

    # The article's recipe: both nets, 20 epochs, batch 128, raw pixels.
    <venv>/bin/python scripts/torch_reference.py train --data-dir DATA \\
        --model both --epochs 20 --batch-size 128 --threads 2 --out runs/torch

    # Smoke test (a few seconds): tiny nets on a few hundred images.
    <venv>/bin/python scripts/torch_reference.py train --data-dir DATA \\
        --model both --epochs 1 --subset 256 --width-divisor 8 \\
        --stages 1,1 --threads 1 --out /tmp/torch_smoke

    # --device cuda trains on a GPU instead (the data stays on the host
    # and is copied per batch).

    # Step time of the full ResNet (one JSON line on stdout).
    <venv>/bin/python scripts/torch_reference.py bench --model resnet \\
        --mode train --batch-size 128 --steps 5 --warmup 2 --threads 2
    <venv>/bin/python scripts/torch_reference.py bench --model resnet \\
        --mode train --device cuda --batch-size 128 --steps 20 --warmup 5

    # He et al.'s ResNet-20 recipe, the twin of examples/resnet20.rs (docs/RESULTS.md).
    <venv>/bin/python scripts/torch_reference.py resnet20 --data-dir DATA \\
        --epochs 30 --threads 2 --out runs/torch-resnet20

    # Per-layer forward/backward times at the article's shapes, the cases of
    # examples/layer_profile.rs (one JSON line per case; scripts/compare-layers.sh).
    <venv>/bin/python scripts/torch_reference.py layers --batch-size 128 --reps 3

The parameter count is printed to stderr at start, counted as Keras counts it
(BatchNorm moving mean/variance included): 15,619,990 for the default ResNet,
15,447,062 for the plain net.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Keras defaults (see the module docstring).
BN_MOMENTUM_KERAS = 0.99
BN_EPSILON = 1e-3
ADAM_EPSILON = 1e-7
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)  # CHW: the CIFAR-10 binary records are planar.
BASE_FILTERS = 64


# ---------------------------------------------------------------------------
# Layers, as Keras defines them.
# ---------------------------------------------------------------------------

def tf_same_pads(size, k, s):
    """TensorFlow 'same' padding (before, after) of one spatial axis.

    total = max((ceil(size/s) - 1)*s + k - size, 0); the smaller half goes
    before (top/left), the rest after (bottom/right).
    """
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2D(padding='same') with TensorFlow's padding rule.

    The symmetric part of the padding goes to the convolution itself (no
    copy); only the asymmetric remainder, when there is one, is added with an
    explicit F.pad on the bottom/right.  The padding is computed from the
    actual input size at each call, as TensorFlow does.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1):
        super().__init__(in_channels, out_channels, kernel_size,
                         stride=stride, padding=0, bias=True)
        # Keras Conv2D defaults: glorot_uniform kernel, zero bias.
        # xavier_uniform_ uses fan_in = in*k*k, fan_out = out*k*k: the same
        # fans as Keras's glorot_uniform on an HWIO kernel.
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        k, s = self.kernel_size[0], self.stride[0]
        top, bottom = tf_same_pads(x.shape[-2], k, s)
        left, right = tf_same_pads(x.shape[-1], k, s)
        if bottom != top or right != left:
            # The "before" pad is never larger than the "after" pad.
            x = F.pad(x, (0, right - left, 0, bottom - top))
        return F.conv2d(x, self.weight, self.bias, self.stride, (top, left))


def keras_batch_norm(channels):
    # Keras momentum is the weight of the *old* running statistic; PyTorch's
    # is the weight of the new batch statistic: 0.99 <-> 0.01.
    #
    # One known difference: PyTorch updates running_var with the unbiased
    # batch variance (n/(n-1) correction), Keras with the biased one.  With
    # n = batch*H*W >= 128 values per channel the factor is <= 1.008 and it
    # only enters the running statistic with weight 0.01: negligible.
    # Training-mode normalisation itself uses the biased variance in both.
    return nn.BatchNorm2d(channels, eps=BN_EPSILON,
                          momentum=1.0 - BN_MOMENTUM_KERAS)


class ReluBn(nn.Module):
    """The article's relu_bn(): ReLU *then* BatchNormalization."""

    def __init__(self, channels):
        super().__init__()
        self.bn = keras_batch_norm(channels)

    def forward(self, x):
        return self.bn(F.relu(x))


class ResidualBlock(nn.Module):
    """Conv(k, s) -> relu_bn -> Conv(k) ; [1x1 stride-2 conv shortcut] ; Add ;
    relu_bn.  No BatchNorm on the shortcut, as in the article."""

    def __init__(self, in_ch, filters, downsample, kernel_size):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = SameConv2d(in_ch, filters, kernel_size, stride)
        self.relu_bn1 = ReluBn(filters)
        self.conv2 = SameConv2d(filters, filters, kernel_size, 1)
        # Created after the two block convs, as the article's code creates
        # its Keras layers: the modules then enumerate in the order of
        # Keras's auto-generated names (conv2d, conv2d_1, ...), which makes
        # copying weights between the two frameworks a zip of two lists.
        self.shortcut = (SameConv2d(in_ch, filters, 1, 2) if downsample
                         else None)
        self.relu_bn2 = ReluBn(filters)

    def forward(self, x):
        y = self.conv2(self.relu_bn1(self.conv1(x)))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return self.relu_bn2(x + y)


class PlainBlock(nn.Module):
    """Conv(k, s) -> relu_bn -> Conv(k) -> relu_bn, no shortcut."""

    def __init__(self, in_ch, filters, downsample, kernel_size):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = SameConv2d(in_ch, filters, kernel_size, stride)
        self.relu_bn1 = ReluBn(filters)
        self.conv2 = SameConv2d(filters, filters, kernel_size, 1)
        self.relu_bn2 = ReluBn(filters)

    def forward(self, x):
        return self.relu_bn2(self.conv2(self.relu_bn1(self.conv1(x))))


class ArticleNet(nn.Module):
    """create_res_net() / create_plain_net() of the article, NCHW.

    Returns logits: the article's Dense(10, softmax) + sparse categorical
    cross-entropy is the same loss as logits + F.cross_entropy (Keras 3's
    TensorFlow backend even reuses the softmax's logits for the loss).
    """

    def __init__(self, block, stages=(2, 5, 5, 2), width_divisor=1,
                 kernel_size=3):
        super().__init__()
        if len(stages) < 1:
            raise ValueError("need at least one stage")
        filters = BASE_FILTERS // width_divisor
        if filters < 1:
            raise ValueError("--width-divisor leaves no filters")
        # BatchNormalization on the raw input: it does the pixel scaling.
        self.input_bn = keras_batch_norm(IMAGE_SHAPE[0])
        # The stem conv is 3x3 whatever --kernel-size says (as the article).
        self.stem = SameConv2d(IMAGE_SHAPE[0], filters, 3, 1)
        self.stem_relu_bn = ReluBn(filters)
        blocks, in_ch, size = [], filters, IMAGE_SHAPE[1]
        for i, n in enumerate(stages):
            for j in range(n):
                downsample = j == 0 and i != 0
                blocks.append(block(in_ch, filters, downsample, kernel_size))
                in_ch = filters
                if downsample:
                    size = -(-size // 2)
            filters *= 2
        self.blocks = nn.Sequential(*blocks)
        # AveragePooling2D(4): pool 4, stride 4, 'valid'.
        pooled = size // 4
        if pooled < 1:
            raise ValueError(
                f"{len(stages)} stages leave a {size}x{size} map: "
                "AveragePooling2D(4) would be empty (Keras fails too)")
        # Flatten order: Keras flattens NHWC as (h, w, c), this net NCHW as
        # (c, h, w).  With 4 stages the map is 1x1 and the orders agree;
        # otherwise the Dense rows are a permutation of Keras's, the same
        # model up to relabelling (and the same glorot fans).
        self.fc = nn.Linear(in_ch * pooled * pooled, NUM_CLASSES)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = self.stem_relu_bn(self.stem(self.input_bn(x)))
        x = self.blocks(x)
        x = F.avg_pool2d(x, 4)
        return self.fc(torch.flatten(x, 1))


BLOCKS = {"resnet": ResidualBlock, "plain": PlainBlock}


def build_model(name, args):
    return ArticleNet(BLOCKS[name], stages=args.stages,
                      width_divisor=args.width_divisor,
                      kernel_size=args.kernel_size)


def keras_param_counts(model):
    """(total, trainable, non_trainable) as Keras's model.summary() counts.

    Keras counts BatchNorm's moving mean and variance as (non-trainable)
    parameters; PyTorch keeps them as buffers.  num_batches_tracked has no
    Keras counterpart.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    non_trainable = sum(b.numel() for name, b in model.named_buffers()
                        if name.endswith(("running_mean", "running_var")))
    return trainable + non_trainable, trainable, non_trainable


def report_params(name, model):
    total, trainable, non_trainable = keras_param_counts(model)
    print(f"{name}: {total:,} parameters (Keras count; trainable "
          f"{trainable:,}, non-trainable {non_trainable:,})", file=sys.stderr)
    return total


def keras_adam(params, lr):
    # Keras's Adam: epsilon 1e-7 (PyTorch's default is 1e-8), no weight
    # decay, no amsgrad.  Both add epsilon to sqrt(v_hat) after bias
    # correction, so the updates match.
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999),
                            eps=ADAM_EPSILON, weight_decay=0.0)


def setup_threads(threads):
    # Intra-op threads as asked; a single inter-op thread, as the Keras bench
    # does.  set_num_interop_threads must run before any parallel work.
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already started (only when imported into another program)


def parse_stages(text):
    stages = tuple(int(s) for s in text.split(",") if s.strip())
    if not stages or any(n < 1 for n in stages):
        raise argparse.ArgumentTypeError("stages: comma-separated counts >= 1")
    return stages


# ---------------------------------------------------------------------------
# CIFAR-10 binary files.
# ---------------------------------------------------------------------------

RECORD_BYTES = 1 + 3 * 32 * 32
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"


def read_cifar_bin(paths, limit=0):
    """Read CIFAR-10 binary records: (uint8 images N x 3 x 32 x 32, int64
    labels).  Each 3073-byte record is a label byte then the R, G and B
    planes of the 32x32 image, row-major: already CHW, so a reshape is the
    whole decode.  limit > 0 keeps the first `limit` records, in file order.
    """
    chunks, have = [], 0
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size % RECORD_BYTES:
            sys.exit(f"{path}: size {raw.size} is not a multiple of "
                     f"{RECORD_BYTES}")
        chunks.append(raw.reshape(-1, RECORD_BYTES))
        have += chunks[-1].shape[0]
        if limit and have >= limit:
            break
    records = np.concatenate(chunks)
    if limit:
        records = records[:limit]
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= NUM_CLASSES:
        sys.exit("label byte out of range: not a CIFAR-10 binary file?")
    images = records[:, 1:].reshape(-1, *IMAGE_SHAPE)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def augment(x, gen):
    """Random crop with 4-pixel zero padding + random horizontal flip, per
    image.  Applied to raw pixels (before any standardisation), so the
    padding is black in both --normalize modes."""
    n, _, h, w = x.shape
    p = 4
    padded = F.pad(x, (p, p, p, p))
    oy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    out = padded[torch.arange(n)[:, None, None, None], chans, rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


# ---------------------------------------------------------------------------
# `train`
# ---------------------------------------------------------------------------

def evaluate(model, images, labels, batch_size, prep, device):
    """Loss and accuracy over a whole set in eval mode (moving statistics),
    as Keras's validation does."""
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch_size):
            x = prep(images[i:i + batch_size]).to(device)
            y = labels[i:i + batch_size].to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    n = images.shape[0]
    return loss_sum / n, correct / n


def train_one(name, args, data, device):
    train_x, train_y, test_x, test_y, prep = data
    torch.manual_seed(args.seed)
    model = build_model(name, args).to(device)
    n_params = report_params(name, model)
    opt = keras_adam(model.parameters(), args.lr)
    # A generator of its own: the shuffle (and augmentation) order depends
    # only on --seed, not on how many draws the initialisation made.
    gen = torch.Generator().manual_seed(args.seed + 1)

    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["stages"] = list(args.stages)
    history = {"framework": "pytorch", "torch": torch.__version__,
               "model": name, "parameters": n_params, "config": config,
               "epochs": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}_history.json")

    n = train_x.shape[0]
    for epoch in range(1, args.epochs + 1):
        model.train()
        # Keras's fit(shuffle=True) reshuffles every epoch and keeps the last
        # partial batch.
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        start = time.perf_counter()
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            x = train_x[idx]
            if args.augment:
                x = augment(x, gen)
            x, y = prep(x).to(device), train_y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            # Keras's "loss"/"accuracy" are running means over the epoch's
            # samples, with the weights changing underneath: same here.
            loss_sum += loss.item() * y.shape[0]
            correct += (logits.argmax(1) == y).sum().item()
        seconds = time.perf_counter() - start
        val_loss, val_acc = evaluate(model, test_x, test_y, args.batch_size,
                                     prep, device)
        eval_seconds = time.perf_counter() - start - seconds
        row = {"epoch": epoch, "loss": loss_sum / n, "accuracy": correct / n,
               "val_loss": val_loss, "val_accuracy": val_acc,
               # Training pass only; the evaluation is timed separately.
               "seconds": seconds, "images_per_sec": n / seconds,
               "eval_seconds": eval_seconds}
        history["epochs"].append(row)
        print(f"{name} epoch {epoch}/{args.epochs}: loss {row['loss']:.4f} "
              f"accuracy {row['accuracy']:.4f} val_loss {val_loss:.4f} "
              f"val_accuracy {val_acc:.4f} ({seconds:.1f} s, "
              f"{row['images_per_sec']:.1f} img/s; eval {eval_seconds:.1f} s)",
              flush=True)
        # Rewritten every epoch, so an interrupted run keeps its history.
        with open(path, "w") as f:
            json.dump(history, f, indent=1)
            f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


def cmd_train(args):
    setup_threads(args.threads)
    device = torch.device(args.device)
    d = args.data_dir
    train_x, train_y = read_cifar_bin([os.path.join(d, f) for f in TRAIN_FILES],
                                      args.subset)
    test_x, test_y = read_cifar_bin([os.path.join(d, TEST_FILE)])
    print(f"data: {train_x.shape[0]} training, {test_x.shape[0]} test images",
          file=sys.stderr)

    if args.normalize == "raw":
        # The article's recipe: float pixels 0..255, the input BN scales.
        def prep(x):
            return x.float()
    else:
        # Per-channel standardisation with the training images' statistics.
        xf = train_x.double()
        mean = xf.mean(dim=(0, 2, 3)).float()[None, :, None, None]
        std = xf.std(dim=(0, 2, 3)).float()[None, :, None, None]

        def prep(x):
            return (x.float() - mean) / std

    data = (train_x, train_y, test_x, test_y, prep)
    names = ["resnet", "plain"] if args.model == "both" else [args.model]
    for name in names:
        train_one(name, args, data, device)


# ---------------------------------------------------------------------------
# `resnet20`: the twin of examples/resnet20.rs
# ---------------------------------------------------------------------------

# CIFAR-10's per-channel pixel means and standard deviations (0-255 scale), the constants
# of examples/resnet20.rs.
CIFAR_MEAN = torch.tensor([125.307, 122.950, 113.865])[None, :, None, None]
CIFAR_STD = torch.tensor([62.993, 62.089, 66.705])[None, :, None, None]


class HeBlock(nn.Module):
    """He et al.'s block, as models::he_residual_block builds it: Conv(3, s, no bias) ->
    BN -> ReLU -> Conv(3, no bias) -> BN, plus the input or a 1x1 stride-2 conv (no bias)
    and BN, then ReLU."""

    def __init__(self, in_ch, filters, downsample):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = bias_free(SameConv2d(in_ch, filters, 3, stride))
        self.bn1 = keras_batch_norm(filters)
        self.conv2 = bias_free(SameConv2d(filters, filters, 3, 1))
        self.bn2 = keras_batch_norm(filters)
        self.shortcut = (nn.Sequential(bias_free(SameConv2d(in_ch, filters, 1, 2)),
                                       keras_batch_norm(filters)) if downsample else None)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return F.relu(x + y)


def bias_free(conv):
    """Keras's Conv2D(use_bias=False): no bias parameter at all."""
    conv.bias = None
    return conv


class ResNetCifar(nn.Module):
    """He et al.'s ResNet-(6n+2) for CIFAR-10 from the article's blocks, as
    examples/resnet20.rs builds it: standardize, Conv(16) -> relu_bn, three
    stages of n residual blocks (16, 32, 64 filters; the first block of
    stages 2 and 3 halves the size, 1x1 stride-2 projection), global average
    pooling, Dense(10) logits with Keras's glorot_uniform init."""

    def __init__(self, blocks, kind="he"):
        super().__init__()
        if kind == "he":
            self.stem = bias_free(SameConv2d(3, 16, 3))
            bn = keras_batch_norm(16)
            self.stem_bn = nn.Sequential(bn, nn.ReLU())
        else:
            self.stem = SameConv2d(3, 16, 3)
            self.stem_bn = ReluBn(16)
        layers, ch = [], 16
        for stage, filters in enumerate([16, 32, 64]):
            for block in range(blocks):
                down = block == 0 and stage > 0
                layers.append(HeBlock(ch, filters, down) if kind == "he"
                              else ResidualBlock(ch, filters, down, 3))
                ch = filters
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(64, NUM_CLASSES)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        x = (x - CIFAR_MEAN.to(x.device)) / CIFAR_STD.to(x.device)
        x = self.blocks(self.stem_bn(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def cmd_resnet20(args):
    """The recipe of examples/resnet20.rs: SGD + momentum with *decoupled* weight decay
    (w -= lr * wd * w before each step, Keras's rule and the crate's), one-cycle (PyTorch's
    OneCycleLR, momentum not cycled, as the crate) or cosine with a one-epoch warm-up,
    stepped per batch; flips and pad-4 random crops per image (uniform over the 9 x 9
    offsets, which the crate's RandomTranslation(4.5/32, nearest, constant) draws too)."""
    setup_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    d = args.data_dir
    train_x, train_y = read_cifar_bin([os.path.join(d, f) for f in TRAIN_FILES], args.subset)
    test_x, test_y = read_cifar_bin([os.path.join(d, TEST_FILE)])
    model = ResNetCifar(args.blocks, args.block).to(device)
    n_params = report_params(f"resnet{6 * args.blocks + 2}", model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    n = train_x.shape[0]
    steps = -(-n // args.batch_size)
    if args.schedule == "one-cycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=args.lr, total_steps=args.epochs * steps, cycle_momentum=False)
    else:
        warm = steps
        total = args.epochs * steps

        def factor(step):
            if step < warm:
                return step / warm
            return 0.5 * (1 + np.cos(np.pi * (step - warm) / max(total - warm, 1)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(args.seed + 1)
    history = {"framework": "pytorch", "torch": torch.__version__, "parameters": n_params,
               "config": {k: v for k, v in vars(args).items() if k != "func"}, "epochs": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "history.json")
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        start = time.perf_counter()
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            x = augment(train_x[idx], gen).float().to(device)
            y = train_y[idx].to(device)
            lr = opt.param_groups[0]["lr"]
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.0 - lr * args.weight_decay)
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * y.shape[0]
            correct += (logits.argmax(1) == y).sum().item()
        seconds = time.perf_counter() - start
        val_loss, val_acc = evaluate(model, test_x, test_y, 500, lambda t: t.float(), device)
        row = {"epoch": epoch, "loss": loss_sum / n, "accuracy": correct / n,
               "val_loss": val_loss, "val_accuracy": val_acc, "seconds": seconds,
               "images_per_sec": n / seconds, "learning_rate": lr}
        history["epochs"].append(row)
        print(f"epoch {epoch}/{args.epochs}: loss {row['loss']:.4f} accuracy "
              f"{row['accuracy']:.4f} val_loss {val_loss:.4f} val_accuracy {val_acc:.4f} "
              f"({seconds:.1f} s, {row['images_per_sec']:.0f} img/s)", flush=True)
        with open(path, "w") as f:
            json.dump(history, f, indent=1)
            f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------------------
# `bench`
# ---------------------------------------------------------------------------

# Operations that only describe memory (views, metadata, fresh uninitialised tensors):
# no kernel runs for them on a GPU.
VIEW_OPS = {
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::t", "aten::transpose",
    "aten::expand", "aten::reshape", "aten::permute", "aten::unsqueeze", "aten::squeeze",
    "aten::select", "aten::slice", "aten::alias", "aten::detach", "aten::detach_",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_",
    "aten::lift_fresh", "aten::result_type", "aten::flatten", "aten::contiguous",
    "aten::to", "aten::_reshape_alias", "aten::expand_as", "aten::view_as",
    "aten::set_", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
}


def count_step(phases, sync, cuda):
    """What one step launches, from PyTorch's profiler (after the warm-up).

    `phases` is a list of (name, function), run in order, the device
    synchronised after each.  On CUDA: the kernels the GPU ran, the copies and
    fills, and the caching allocator's allocation requests and bytes.  On the
    CPU: the aten operations that do work (leaves of the call tree, views and
    fresh empty tensors left out: each would be a kernel on a GPU), per phase.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        before = torch.cuda.memory_stats()
    with profile(activities=activities) as prof:
        for name, run in phases:
            with record_function("phase:" + name):
                run()
                sync()
    events = prof.events()
    ranges = {e.name[len("phase:"):]: e.time_range for e in events
              if e.name.startswith("phase:")}

    def per_phase(selected):
        out = {name: 0 for name in ranges}
        for e in selected:
            for name, r in ranges.items():
                if r.start <= e.time_range.start <= r.end:
                    out[name] += 1
        return out

    if cuda:
        after = torch.cuda.memory_stats()
        device = [e for e in events if e.device_type == DeviceType.CUDA]
        copies = [e for e in device if e.name.startswith(("Memcpy", "Memset"))]
        kernels = [e for e in device if not e.name.startswith(("Memcpy", "Memset"))]
        # No split by phase here: the kernels' device timestamps and the phases' host
        # ranges are different clocks (one H200 run put 414 of 707 kernels in no phase).
        return {
            "cuda_kernels": len(kernels),
            "memcpy_memset": len(copies),
            "allocations": after["allocation.all.allocated"] - before["allocation.all.allocated"],
            "allocated_bytes": after["allocated_bytes.all.allocated"]
            - before["allocated_bytes.all.allocated"],
            "source": "torch.profiler CUDA activity; torch.cuda.memory_stats",
        }
    aten = [e for e in events if e.name.startswith("aten::")]
    leaves = [e for e in aten
              if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    work = [e for e in leaves if e.name not in VIEW_OPS]
    return {
        "aten_ops_doing_work": len(work), "aten_ops_doing_work_per_phase": per_phase(work),
        "source": "torch.profiler CPU activity: leaf aten ops without views "
                  "(each would be a kernel on a GPU)",
    }


def ddp_setup(args):
    """Under torchrun with WORLD_SIZE > 1: a gloo process group (CPU) and this rank's
    share of the global batch, as the crate's data-parallel bench does.  Returns
    (rank, world, local_batch)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, args.batch_size
    import torch.distributed as dist
    if args.mode != "train" or args.device != "cpu":
        sys.exit("under torchrun only --mode train on --device cpu is measured")
    if args.batch_size % world:
        sys.exit(f"--batch-size {args.batch_size} (global) must divide by {world} ranks")
    dist.init_process_group("gloo")
    return dist.get_rank(), world, args.batch_size // world


def ddp_allreduce_ms(model, reps=5):
    """The median time of one all-reduce of every gradient at once (a flat f32 buffer
    of the parameter count), outside any step: what a step's communication costs before
    DDP hides part of it behind the backward pass."""
    import torch.distributed as dist
    flat = torch.zeros(sum(p.numel() for p in model.parameters()))
    times = []
    for _ in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def cmd_bench(args):
    setup_threads(args.threads)
    rank, world, local_batch = ddp_setup(args)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device visible to PyTorch")
        # Plain f32 unless --tf32: PyTorch enables TF32 for cuDNN
        # convolutions by default (not for matmuls), which would compare a
        # 10-bit-mantissa conv against candle's f32 one.
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = args.cudnn_benchmark

    torch.manual_seed(args.seed)
    model = build_model(args.model, args).to(device)
    if rank == 0:
        report_params(args.model, model)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    plain_model = model
    if world > 1:
        # DistributedDataParallel: rank 0's weights broadcast, gradients averaged by
        # all-reduce in 25 MB buckets overlapped with the backward pass.
        model = torch.nn.parallel.DistributedDataParallel(model)
    if args.compile:
        model = torch.compile(model)

    # Synthetic CIFAR-shaped data in the raw 0..255 pixel range (the input
    # BN sees what it sees in training), random labels.  One batch, reused:
    # the bench times the network, not the input pipeline.
    g = torch.Generator().manual_seed(args.seed)
    x = (torch.randint(0, 256, (args.batch_size, *IMAGE_SHAPE), generator=g)
         .float().to(device).contiguous(memory_format=fmt))
    y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g).to(device)
    # Data-parallel: this rank's share of the global batch.
    x = x[rank * local_batch:(rank + 1) * local_batch]
    y = y[rank * local_batch:(rank + 1) * local_batch]

    amp = args.amp == "bf16"
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=amp)

    if args.mode == "train":
        model.train()
        opt = keras_adam(model.parameters(), 1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(x)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()  # CUDA kernels run asynchronously: wait before reading time
        times.append(time.perf_counter() - t0)

    counts = None
    if args.count and args.mode == "train":
        state = {}

        def forward():
            opt.zero_grad(set_to_none=True)
            with autocast:
                state["loss"] = F.cross_entropy(model(x), y)

        phases = [("forward", forward), ("backward", lambda: state["loss"].backward()),
                  ("optimizer", opt.step)]
        counts = count_step(phases, sync, cuda)

    allreduce_ms = ddp_allreduce_ms(plain_model) if world > 1 else 0.0
    if world > 1:
        # Without an orderly teardown gloo's threads can abort the process at exit.
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return
    median = statistics.median(times)
    result = {
        "framework": "pytorch", "torch": torch.__version__,
        "ranks": world, "allreduce_ms_standalone": allreduce_ms,
        "device": (torch.cuda.get_device_name(device) if cuda else "cpu"),
        "model": args.model, "mode": args.mode,
        "batch_size": args.batch_size, "steps": args.steps,
        "median_ms": median * 1e3, "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "images_per_sec": args.batch_size / median,
        "threads": args.threads, "amp": args.amp,
        "channels_last": args.channels_last,
        "tf32": args.tf32 if cuda else None,
        "cudnn_benchmark": args.cudnn_benchmark if cuda else None,
        "compile": args.compile,
        "stages": list(args.stages), "width_divisor": args.width_divisor,
    }
    if counts is not None:
        result["counts_per_step"] = counts
    print(json.dumps(result), flush=True)


def layer_cases():
    """The cases of examples/layer_profile.rs, same names, shapes and layers."""
    cases = [("conv3x3_stem_3_64_32", (3, 32, 32), lambda: SameConv2d(3, 64, 3), 2 * 3 * 64 * 9 * 32 * 32)]
    for f, h in [(64, 32), (128, 16), (256, 8), (512, 4)]:
        cases.append((f"conv3x3_s1_{f}_{h}", (f, h, h),
                      lambda f=f: SameConv2d(f, f, 3), 2 * f * f * 9 * h * h))
        if f > 64:
            cases.append((f"conv3x3_s2_{f}_{h}", (f // 2, 2 * h, 2 * h),
                          lambda f=f: SameConv2d(f // 2, f, 3, stride=2), 2 * (f // 2) * f * 9 * h * h))
            cases.append((f"conv1x1_s2_{f}_{h}", (f // 2, 2 * h, 2 * h),
                          lambda f=f: SameConv2d(f // 2, f, 1, stride=2), 2 * (f // 2) * f * h * h))
        cases.append((f"batchnorm_{f}_{h}", (f, h, h), lambda f=f: keras_batch_norm(f), 0))
        cases.append((f"relu_{f}_{h}", (f, h, h), lambda: nn.ReLU(), 0))
        cases.append((f"add_{f}_{h}", (f, h, h), lambda: AddSelf(), 0))
    cases.append(("avgpool4_512_4", (512, 4, 4), lambda: nn.AvgPool2d(4), 0))
    cases.append(("dense_512_10", (512,), lambda: nn.Linear(512, 10), 2 * 512 * 10))
    return cases


class AddSelf(nn.Module):
    """x + x: the crate's profile calls Add on one input twice."""

    def forward(self, x):
        return torch.add(x, x)


def cmd_layers(args):
    """Per-layer forward and backward times, one JSON line per case (examples/layer_profile.rs
    is the crate's side)."""
    setup_threads(args.threads)
    torch.manual_seed(0)
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    b = args.batch_size
    for name, shape, make, flops in layer_cases():
        if args.only not in name:
            continue
        layer = make().train()
        x = torch.randn(b, *shape, requires_grad=True)
        with torch.no_grad():
            out_shape = layer(x).shape
        mix = torch.randn(out_shape)
        # The harness's own backward (the scalar loss back to the output), subtracted as on
        # the crate's side.
        probe = torch.randn(out_shape, requires_grad=True)
        fwd, both, harness = [], [], []
        for rep in range(args.warmup + args.reps):
            t0 = time.perf_counter()
            probe.grad = None
            (probe * mix).sum().backward()
            if rep >= args.warmup:
                harness.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            y = layer(x)
            float(y.detach().sum())
            t1 = time.perf_counter()
            x.grad = None
            layer.zero_grad(set_to_none=True)
            y = layer(x)
            (y * mix).sum().backward()
            t2 = time.perf_counter()
            if rep >= args.warmup:
                fwd.append(t1 - t0)
                both.append(t2 - t1)
        f = statistics.median(fwd)
        bwd = max(statistics.median(both) - f - statistics.median(harness), 0.0)
        gf = lambda sec, k: round(k * flops * b / sec / 1e9, 1) if flops and sec > 0 else None
        print(json.dumps({
            "framework": "pytorch", "torch": torch.__version__, "layer": name,
            "batch_size": b, "forward_ms": round(f * 1e3, 3), "backward_ms": round(bwd * 1e3, 3),
            "forward_gflops": gf(f, 1), "backward_gflops": gf(bwd, 2),
            "threads": args.threads, "cpu": cpu}), flush=True)
    if args.only in "adam_all_params":
        args.stages, args.width_divisor, args.kernel_size = (2, 5, 5, 2), 1, 3
        model = build_model("resnet", args)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = keras_adam(params, 1e-3)
        times = []
        for rep in range(args.warmup + args.reps):
            t0 = time.perf_counter()
            opt.step()
            if rep >= args.warmup:
                times.append(time.perf_counter() - t0)
        print(json.dumps({
            "framework": "pytorch", "torch": torch.__version__, "layer": "adam_all_params",
            "parameters": sum(p.numel() for p in params),
            "step_ms": round(statistics.median(times) * 1e3, 3),
            "threads": args.threads, "cpu": cpu}), flush=True)


# ---------------------------------------------------------------------------

def add_model_args(p):
    p.add_argument("--stages", type=parse_stages, default=(2, 5, 5, 2),
                   help="blocks per stage, comma-separated (default 2,5,5,2)")
    p.add_argument("--width-divisor", type=int, default=1,
                   help="divide every filter count by D (default 1)")
    p.add_argument("--kernel-size", type=int, default=3,
                   help="kernel size of the block convs (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="PyTorch intra-op threads (inter-op: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train on CIFAR-10 binary files, write "
                       "<out>/<model>_history.json")
    t.add_argument("--data-dir", required=True,
                   help="folder with data_batch_{1..5}.bin and test_batch.bin")
    t.add_argument("--model", choices=["resnet", "plain", "both"],
                   default="both")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--subset", type=int, default=0,
                   help="use the first N training records (0 = all)")
    t.add_argument("--normalize", choices=["raw", "standard"], default="raw",
                   help="raw 0..255 pixels (the article) or per-channel "
                   "standardised")
    t.add_argument("--augment", action="store_true",
                   help="random 4-pixel-padded crop + horizontal flip")
    t.add_argument("--out", required=True, help="folder for the histories")
    add_model_args(t)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("resnet20", help="the ResNet-20 recipe of examples/resnet20.rs, "
                       "write <out>/history.json")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--epochs", type=int, default=30)
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--lr", type=float, default=0.1)
    r.add_argument("--momentum", type=float, default=0.9)
    r.add_argument("--weight-decay", type=float, default=5e-3,
                   help="decoupled: w -= lr * wd * w each step")
    r.add_argument("--schedule", choices=["one-cycle", "cosine"], default="one-cycle")
    r.add_argument("--blocks", type=int, default=3, help="n of ResNet-(6n+2)")
    r.add_argument("--block", choices=["he", "article"], default="he",
                   help="He et al.'s block (BN before the addition) or the article's")
    r.add_argument("--subset", type=int, default=0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--device", default="cpu")
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_resnet20)

    lp = sub.add_parser("layers", help="per-layer forward/backward times (examples/layer_profile.rs's cases)")
    lp.add_argument("--batch-size", type=int, default=128)
    lp.add_argument("--reps", type=int, default=3)
    lp.add_argument("--warmup", type=int, default=1)
    lp.add_argument("--only", default="")
    lp.add_argument("--threads", type=int, default=2)
    lp.add_argument("--seed", type=int, default=0)
    lp.set_defaults(func=cmd_layers)

    b = sub.add_parser("bench", help="time train or inference steps on "
                       "synthetic data; prints one JSON line")
    b.add_argument("--model", choices=["resnet", "plain"], default="resnet")
    b.add_argument("--mode", choices=["train", "infer"], default="train")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--steps", type=int, default=5, help="timed steps")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps")
    b.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="bf16 autocast (weights and optimizer stay f32)")
    b.add_argument("--channels-last", action="store_true",
                   help="NHWC memory format for the model and input")
    b.add_argument("--tf32", action="store_true",
                   help="CUDA only: allow TF32 in cuDNN convs and matmuls "
                   "(off by default: plain f32)")
    b.add_argument("--cudnn-benchmark", action="store_true",
                   help="CUDA only: let cuDNN autotune conv algorithms")
    b.add_argument("--count", action="store_true",
                   help="also profile one step: kernels (CUDA) or aten ops doing work "
                   "(CPU) and allocations per step, as counts_per_step")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile the model (a second, faster reference; the "
                   "warm-up steps include the compilation)")
    add_model_args(b)
    b.set_defaults(func=cmd_bench)

    args = parser.parse_args()
    if getattr(args, "width_divisor", 1) < 1:
        parser.error("--width-divisor must be >= 1")
    args.func(args)


if __name__ == "__main__":
    main()

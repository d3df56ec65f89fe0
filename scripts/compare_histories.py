#!/usr/bin/env python3
"""Side-by-side learning curves of the crate and the PyTorch reference.

Reads the histories written by `cargo run --example train_cifar10 -- --out DIR/crate ...`
(`DIR/crate/<model>/history.json`) and by `scripts/torch_reference.py train --out DIR/torch`
(`DIR/torch/<model>_history.json`), prints a Markdown table per epoch (training and
validation accuracy and loss, epoch seconds, images/s) and, when matplotlib is installed,
writes `DIR/crate_vs_torch.png` with both frameworks' curves on the same axes.

    python3 scripts/compare_histories.py runs/evidence
"""

import json
import os
import sys

MODELS = {"resnet": ("resnet", "resnet"), "plain": ("plain_net", "plain")}


def load(root):
    runs = {}
    for model, (crate_name, torch_name) in MODELS.items():
        crate = os.path.join(root, "crate", crate_name, "history.json")
        torch = os.path.join(root, "torch", f"{torch_name}_history.json")
        if os.path.exists(crate):
            runs[(model, "crate")] = json.load(open(crate))["epochs"]
        if os.path.exists(torch):
            runs[(model, "pytorch")] = json.load(open(torch))["epochs"]
    return runs


def table(runs):
    print("| model | framework | epoch | loss | accuracy | val_loss | val_accuracy | epoch s | img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (model, fw), epochs in sorted(runs.items()):
        for e in epochs:
            print(
                f"| {model} | {fw} | {e['epoch']} | {e['loss']:.4f} | {e['accuracy']:.4f} | "
                f"{e['val_loss']:.4f} | {e['val_accuracy']:.4f} | {e['seconds']:.0f} | {e['images_per_sec']:.0f} |"
            )
    print()
    for model in MODELS:
        a, b = runs.get((model, "crate")), runs.get((model, "pytorch"))
        if a and b:
            gap = 100 * (a[-1]["val_accuracy"] - b[-1]["val_accuracy"])
            print(f"{model}: final validation accuracy crate - PyTorch = {gap:+.2f} points")


def plot(runs, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for (model, fw), epochs in sorted(runs.items()):
        x = [e["epoch"] for e in epochs]
        style = "-" if fw == "crate" else "--"
        for ax, key in zip(axes, ["accuracy", "loss"]):
            ax.plot(x, [e[f"val_{key}"] for e in epochs], style, marker="o", label=f"{model} {fw} val")
            ax.plot(x, [e[key] for e in epochs], style, alpha=0.4, label=f"{model} {fw} train")
    for ax, key in zip(axes, ["accuracy", "loss"]):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("candle-functional (solid) vs PyTorch (dashed), same recipe")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "runs/evidence"
    runs = load(root)
    table(runs)
    plot(runs, os.path.join(root, "crate_vs_torch.png"))

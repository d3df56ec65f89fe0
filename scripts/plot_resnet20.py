#!/usr/bin/env python3
"""ResNet-20 on CIFAR-10: the crate's run (examples/resnet20.rs) and the PyTorch twin's
(scripts/torch_reference.py resnet20) on the same axes, training and test accuracy per epoch,
and a Markdown table of both.

    python3 scripts/plot_resnet20.py "crate=runs/resnet20/history.json" \
        "PyTorch twin=runs/torch-resnet20/history.json" --out docs/results/resnet20_curves.png

Each argument is LABEL=PATH of a history.json: the crate's ({"epochs": [{epoch, accuracy,
val_accuracy, seconds, ...}]}) or the twin's (the same keys under "epochs"). Needs
matplotlib for the picture; the table prints without it.
"""

import argparse
import json
import os


def load(path):
    epochs = json.load(open(path))["epochs"]
    return [(e["epoch"], e["accuracy"], e["val_accuracy"], e["seconds"]) for e in epochs]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("histories", nargs="+", help="label=path/to/history.json")
    p.add_argument("--out", help="PNG to write")
    args = p.parse_args()
    runs = []
    for item in args.histories:
        label, _, path = item.partition("=")
        runs.append((label, load(path)))
    print("| run | epochs | final train acc | final test acc | best test acc | mean epoch s |")
    print("|---|---|---|---|---|---|")
    for label, rows in runs:
        best = max(r[2] for r in rows)
        mean_s = sum(r[3] for r in rows) / len(rows)
        print(f"| {label} | {len(rows)} | {rows[-1][1]:.4f} | {rows[-1][2]:.4f} | {best:.4f} | {mean_s:.0f} |")
    if not args.out:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, rows in runs:
        epochs = [r[0] for r in rows]
        line, = ax.plot(epochs, [r[2] for r in rows], label=f"{label}: test")
        ax.plot(epochs, [r[1] for r in rows], "--", color=line.get_color(), alpha=0.6,
                label=f"{label}: train")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("ResNet-20 on CIFAR-10, 18 epochs, one-cycle SGD")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()

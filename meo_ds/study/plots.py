"""The study's PNG plots (matplotlib, Agg backend: no display needed).

    loss_vs_step.png, loss_vs_time.png, loss_vs_flops.png   validation loss, one line per variant
    expert_load_<variant>.png      per MoE variant: each layer's expert load (share of the
                                   interval's assignments) over training, a heatmap per layer
    xmoe_experts_per_token.png     XMoE: tokens by number of experts, per layer (when run)
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AXES = {"step": ("step", "loss_vs_step.png", "optimizer step"),
        "time_s": ("time", "loss_vs_time.png", "training time (s)"),
        "flops": ("flops", "loss_vs_flops.png", "cumulative executed FLOPs")}


def loss_curves(variants: dict[str, dict], out: Path) -> list[str]:
    names = []
    for axis, (_, file, label) in AXES.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, v in variants.items():
            pts = [(p[axis], p["val_loss"]) for p in v["curve"] if p.get(axis) is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
        if axis == "flops":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / file, dpi=100)
        plt.close(fig)
        names.append(file)
    return names


def expert_load(name: str, v: dict, out: Path) -> list[str]:
    records = [r for r in v.get("expert_load") or [] if r["layers"]]
    if not records:
        return []
    layers = len(records[0]["layers"])
    fig, axes = plt.subplots(layers, 1, figsize=(6, 1.2 + 1.6 * layers), squeeze=False)
    steps = [r["step"] for r in records]
    for i, ax in enumerate(axes[:, 0]):
        share = [[x / max(sum(r["layers"][i]), 1e-12) for x in r["layers"][i]] for r in records]
        grid = list(map(list, zip(*share)))  # experts x intervals
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(grid) - 0.5))
        ax.set_ylabel(f"layer {i}\nexpert")
        fig.colorbar(im, ax=ax, label="load share")
    axes[-1, 0].set_xlabel("step (end of log interval)")
    axes[0, 0].set_title(f"{name}: expert load per layer")
    fig.tight_layout()
    file = f"expert_load_{name}.png"
    fig.savefig(out / file, dpi=100)
    plt.close(fig)
    return [file]


def experts_histogram(v: dict, out: Path) -> list[str]:
    hist = v.get("experts_hist")
    if not hist:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(hist)
    for i, layer in enumerate(hist):
        total = max(sum(layer), 1e-12)
        last = max((j for j, n in enumerate(layer) if n > 0), default=0)
        ax.bar([j + i * width for j in range(last + 1)], [n / total for n in layer[: last + 1]], width, label=f"layer {i}")
    ax.set_xlabel("experts per token")
    ax.set_ylabel("share of tokens")
    ax.set_title("XMoE: experts per token over training")
    ax.legend()
    fig.tight_layout()
    file = "xmoe_experts_per_token.png"
    fig.savefig(out / file, dpi=100)
    plt.close(fig)
    return [file]


def plot_all(variants: dict[str, dict], out: Path) -> list[str]:
    """Every plot into `out`; returns the file names."""
    files = loss_curves(variants, out)
    for name, v in variants.items():
        files += expert_load(name, v, out)
    if "xmoe" in variants:
        files += experts_histogram(variants["xmoe"], out)
    return files

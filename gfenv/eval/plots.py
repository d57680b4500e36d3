"""PNG figures of a benchmark (matplotlib, Agg backend): anytime accuracy vs MACs, budgeted batch classification
curves, and a grid of test images with each agent's focus patches drawn in order.

Each function takes the JSON-ready results of ``gfenv.eval.evaluation.benchmark`` and writes one file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from gfenv.eval.leaderboard import STATIC_LABEL


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _axes(count: int) -> tuple[Any, Any]:
    """A figure whose colour cycle gives each of ``count`` agents its own colour (tab10, tab20 beyond ten)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if count > 10:
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    return fig, ax


def _static_point(ax: Any, static: dict | None) -> None:
    if static:
        ax.plot([static["macs"] / 1e6], [static["accuracy"]], marker="*", markersize=14, color="black",
                linestyle="none", label=STATIC_LABEL)


def _finish(fig: Any, ax: Any, path: str | os.PathLike, static: dict | None, xlabel: str, title: str) -> Path:
    """The static model's star, labels, grid and legend; the figure saved to ``path``."""
    _static_point(ax, static)
    ax.set(xlabel=xlabel, ylabel="top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_anytime(results: dict[str, dict], path: str | os.PathLike, static: dict | None = None,
                 title: str = "") -> Path:
    """Accuracy after each step 1..T against the cumulative MACs per image, one line per agent (error bars: std
    over seeds), with the static full-image model as a star."""
    fig, ax = _axes(len(results))
    for label, r in results.items():
        macs = np.asarray(r["macs"]) / 1e6
        ax.errorbar(macs, r["accuracy"], yerr=r.get("accuracy_std"), marker="o", markersize=4, capsize=2,
                    label=label)
    return _finish(fig, ax, path, static, "multiply-adds per image (M)",
                   title or "Anytime prediction: accuracy after each glimpse")


def plot_budgeted(results: dict[str, dict], path: str | os.PathLike, static: dict | None = None,
                  title: str = "") -> Path:
    """Budgeted batch classification: (mean MACs, accuracy) for the 39 exit distributions of each agent that has a
    ``budgeted`` curve; agents with a stop action add their own point (a diamond); the static model a star."""
    fig, ax = _axes(len(results))
    for label, r in results.items():
        if r.get("budgeted"):
            pts = sorted(r["budgeted"], key=lambda p: p["macs"])
            line = ax.plot([p["macs"] / 1e6 for p in pts], [p["accuracy"] for p in pts], marker=".", label=label)[0]
            if r.get("learned_stop"):
                stop = r["learned_stop"]
                ax.plot([stop["macs"] / 1e6], [stop["accuracy"]], marker="D", color=line.get_color(),
                        linestyle="none", label=f"{label} (own stop)")
    return _finish(fig, ax, path, static, "average multiply-adds per image (M)",
                   title or "Budgeted batch classification (thresholds fitted on train images)")


def plot_patches(pictures: dict[str, dict], path: str | os.PathLike, title: str = "") -> Path:
    """A grid of test images (rows) x agents (columns): each cell is ``render_episodes``' frame with the agent's
    patches numbered in order, captioned with its prediction (and the true class) and the glimpses taken."""
    if not pictures:
        raise ValueError("No agents to draw.")
    labels = list(pictures)
    rows = len(next(iter(pictures.values()))["frames"])
    fig, axes = plt.subplots(rows, len(labels), figsize=(1.9 * len(labels), 2.0 * rows), squeeze=False)
    for c, label in enumerate(labels):
        shot = pictures[label]
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(shot["frames"][r], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            pred, true = shot["predictions"][r], shot["labels"][r]
            ax.set_xlabel(f"pred {pred} ({'right' if pred == true else 'wrong'}), {shot['glimpses'][r]} glimpses",
                          fontsize=7, color="black" if pred == true else "red")
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"image {r} (class {true})", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)

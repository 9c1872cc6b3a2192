"""The two figures a run writes beside its map: ``fsc.png`` and ``loss.png``, each also as ``.svg``
for slides (matplotlib's object API, no pyplot state, so it is safe from the engine's thread)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryospin_lab.engine.events import Phase, ResolutionEvent
from cryospin_lab.io.atomic import atomic_path

__all__ = ["plot_fsc", "plot_loss", "save_figure"]


def plot_fsc(path: Path, curves: dict[str, ResolutionEvent]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    f_max = 0.0
    for branch, event in curves.items():
        versus = "half 1 vs half 2" if event.kind == "half_maps" else f"{branch} vs truth"
        label = f"{versus}, epoch {event.epoch}: {event.resolution_angstrom:.1f} Å at {event.threshold:g}"
        # Shell 0 (DC, one voxel) is left out: its "correlation" is only the sign of the two means.
        ax.plot(event.frequencies_per_angstrom[1:], event.fsc[1:], label=label)
        f_max = max(f_max, float(event.frequencies_per_angstrom[-1]))
    for threshold in sorted({event.threshold for event in curves.values()}, reverse=True):
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"FSC = {threshold:g}")
    ax.set_xlim(0, f_max)
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")

    def inverse(x):
        x = np.asarray(x, dtype=float)
        return 1.0 / np.where(np.abs(x) < 1e-9, 1e-9, x)

    top = ax.secondary_xaxis("top", functions=(inverse, inverse))
    # Round resolutions inside the plotted range, none crowded against 1/Å = 0.
    ticks = [a for a in (100, 50, 30, 20, 15, 10, 8, 6, 5, 4, 3, 2.5, 2) if 0.08 <= 1 / (a * f_max) <= 1]
    top.set_xticks(ticks, [f"{a:g}" for a in ticks])
    top.set_xlabel("resolution (Å)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_loss(path: Path, rows: list[dict[str, str]]) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    losses = []
    for branch in dict.fromkeys(r["branch"] for r in rows):
        mine = [r for r in rows if r["branch"] == branch and r["mean_loss"]]
        line = ax.plot([int(r["epoch"]) for r in mine], [float(r["mean_loss"]) for r in mine], "o-")[0]
        line.set_label(branch)
        losses += [float(r["mean_loss"]) for r in mine]
        direct = [int(r["epoch"]) for r in mine if r["phase"] == Phase.DIRECT.value]
        if direct and mine[0]["phase"] != Phase.DIRECT.value:
            ax.axvline(direct[0] - 0.5, color=line.get_color(), linestyle=":", label=f"{branch}: switch")
    if losses and min(losses) > 0 and max(losses) > 10 * min(losses):
        ax.set_yscale("log")  # the loss falls by orders of magnitude early on
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """``path`` (PNG) and the same figure as SVG beside it (scales without blur on a slide)."""
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    with atomic_path(path.with_suffix(".svg"), ".svg") as tmp:
        fig.savefig(tmp, format="svg")

"""PNG plots of a run and of a sweep table.

* reconstruction loss curves per unit;
* mask AP per row of a sweep table (one bar per recipe / ablation, FP first).

Uses matplotlib's object API with the Agg canvas (no pyplot), so no global figure state is left behind
and no display is needed. The PCC plots (saq.ptq.pcc_plots) use the same figure helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


DPI = 100
CURVE_COLOR = (0.12, 0.47, 0.71)
CHOSEN_COLOR = (0.84, 0.15, 0.16)
RANGE_COLORS = {"initial": (0.6, 0.6, 0.6), "minmax": (0.12, 0.47, 0.71), "mse": (0.17, 0.63, 0.17),
                "chosen": (0.84, 0.15, 0.16)}


def new_figure(width: float, height: float) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)  # attaches itself to fig; savefig renders through it
    return fig, fig.add_subplot()


def save_figure(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # keeps legends placed outside the axes
    return path


def plot_recon_curves(units: list[dict], path: Path) -> Path:
    """Reconstruction loss against the global step, one line per unit (log scale), from the per-unit
    statistics of :func:`saq.ptq.reconstruct.reconstruct_`."""
    fig, ax = new_figure(9, 4.5)
    for unit in units:
        curve = unit.get("curve") or []
        if curve:
            steps, losses = zip(*curve)
            label = unit["unit"].replace("image_encoder.", "enc.").replace("mask_decoder.", "dec.")
            ax.plot(steps, losses, marker="o" if len(steps) < 30 else None, markersize=2.5,
                    label=label + (" (PAR)" if unit.get("par") else ""))
    ax.set_yscale("log")
    ax.set_xlabel("global step")
    ax.set_ylabel("reconstruction loss (window mean)")
    ax.set_title("reconstruction loss per unit")
    if ax.lines:  # outside the axes: with tens of units an inside legend hides the curves
        ax.legend(fontsize=6, ncol=1 if len(ax.lines) <= 20 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def plot_ap_per_row(rows: Sequence[dict], path: Path, metric: str = "mask_AP") -> Path:
    """Horizontal bars of ``metric`` per table row (rows without it, e.g. failed runs, are skipped);
    FP rows in grey, labelled 'model quant recipe variant'."""
    rows = [r for r in rows if isinstance(r.get(metric), (int, float))]
    if not rows:
        raise ValueError(f"no row has {metric!r} to plot")
    labels = [" ".join(str(r[k]) for k in ("model", "quant", "recipe", "variant") if r.get(k)) for r in rows]
    values = [float(r[metric]) for r in rows]
    colors = [RANGE_COLORS["initial"] if r.get("recipe") == "fp" else CURVE_COLOR for r in rows]
    fig, ax = new_figure(8, 0.8 + 0.32 * len(rows))
    positions = list(range(len(rows)))[::-1]  # first row on top
    ax.barh(positions, values, color=colors)
    for y, v in zip(positions, values):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=7)
    ax.set_yticks(positions, labels, fontsize=7)
    ax.set_xlabel(metric)
    ax.set_xlim(0, max(values) * 1.12 or 1.0)
    return save_figure(fig, path)

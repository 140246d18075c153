"""PNG plots of a PCC search: the attention-overlap curve of each searched quantizer (overlap loss
against the clip percentile, chosen point starred) and the ranges of every searched quantizer
(calibration, min-max, MSE and the chosen PCC range)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

from saq.eval.plots import CHOSEN_COLOR, CURVE_COLOR, RANGE_COLORS, new_figure, save_figure
from saq.ptq.pcc import PCCRecord, PCCResult, last_pass_records


def short_name(module: str, point: str) -> str:
    """Compact label: 'L0.cross_attn_token_to_image q_proj.in' for a decoder attention quantizer."""
    module = module.replace("mask_decoder.transformer.", "").replace("layers.", "L")
    point = point.replace(".input_quantizer", ".in").replace("_quantizer", "")
    return f"{module} {point}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _clip_axis(percentiles: Sequence[float]) -> tuple[list[float], float]:
    """x positions 1 - p for a log axis; p = 1 (1 - p = 0) goes one decade left of the smallest positive."""
    gaps = [1.0 - p for p in percentiles]
    positive = [g for g in gaps if g > 0]
    no_clip_x = (min(positive) if positive else 1e-5) / 10.0
    return [g if g > 0 else no_clip_x for g in gaps], no_clip_x


def plot_overlap_curve(record: PCCRecord, path: Path) -> Path:
    """Overlap loss (1 - IoU of attention focus) against the clip percentile p, chosen point marked.

    The x axis is 1 - p on a reversed log scale, so clipping decreases to the right and every "nine"
    of p gets the same room; p = 1 (no clipping) sits one decade past the last candidate.
    """
    xs, no_clip_x = _clip_axis(record.percentiles)
    order = sorted(range(len(xs)), key=lambda i: -xs[i])
    fig, ax = new_figure(7.0, 4.0)
    ax.plot([xs[i] for i in order], [record.losses[i] for i in order], "o-", color=CURVE_COLOR, markersize=3.5,
            linewidth=1.2, label="candidates")
    ax.axhline(record.loss_no_clip, color="0.5", linestyle="--", linewidth=0.8, label="no clipping")
    chosen_x = no_clip_x if record.chosen_p >= 1.0 else 1.0 - record.chosen_p
    lo, hi = record.chosen_range
    ax.plot([chosen_x], [record.loss_chosen], marker="*", markersize=14, color=CHOSEN_COLOR, linestyle="none",
            label=f"chosen p={record.chosen_p:g}  [{lo:.3g}, {hi:.3g}]")
    ax.set_xscale("log")
    ax.invert_xaxis()
    # Tick the decades that lie among the candidates (1 - p = 0.1 -> "0.9", 0.01 -> "0.99", ...).
    smallest = no_clip_x * 10.0
    decades = [10.0 ** -k for k in range(1, 9) if 10.0 ** -k >= smallest * 0.999]
    ticks = decades + [no_clip_x]
    labels = [f"{1.0 - d:.{k}f}" for k, d in enumerate(decades, start=1)] + ["1 (none)"]
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    ax.set_xlabel("clip percentile p  (bounds = quantiles 1-p, p; log scale of 1 - p)")
    ax.set_ylabel("overlap loss  (1 - IoU of attention focus)")
    ax.set_title(f"{record.module} {record.point}", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, title=f"pass {record.pass_index + 1}", title_fontsize=7, loc="best")
    return save_figure(fig, path)


RANGE_SERIES = (("initial", "calibration range (before PCC)"), ("minmax", "min-max range"), ("mse", "MSE range"),
                ("chosen", "PCC range"))  # in the order of _ranges


def _ranges(record: PCCRecord) -> tuple[tuple[float, float], ...]:
    return record.initial_range, record.minmax_range, record.mse_range, record.chosen_range


def _linthresh(records: Sequence[PCCRecord]) -> float:
    """Linear zone of the symlog axis: the decade of the smallest non-zero bound, within [1e-3, 1]."""
    bounds = [abs(v) for r in records for rng in _ranges(r) for v in rng if v]
    if not bounds:
        return 1.0
    return min(1.0, max(1e-3, 10.0 ** math.floor(math.log10(min(bounds)))))


def plot_chosen_ranges(records: Sequence[PCCRecord], path: Path) -> Path:
    """Horizontal bars per searched quantizer (last pass): calibration, min-max, MSE and chosen PCC range."""
    last = last_pass_records(records)
    if not last:
        raise ValueError("no PCC records to plot")
    fig, ax = new_figure(9.0, 1.6 + 0.42 * len(last))
    height = 0.2
    for k, (key, label) in enumerate(RANGE_SERIES):
        offset = (k - (len(RANGE_SERIES) - 1) / 2) * height
        ys = [i + offset for i in range(len(last))]
        ranges = [_ranges(r)[k] for r in last]
        ax.barh(ys, [hi - lo for lo, hi in ranges], left=[lo for lo, _ in ranges], height=height,
                color=RANGE_COLORS[key], label=label)
    ax.set_xscale("symlog", linthresh=_linthresh(last))
    lows = [min(*(lo for lo, _ in _ranges(r)), 0.0) for r in last]
    highs = [max(*(hi for _, hi in _ranges(r)), 0.0) for r in last]
    if min(lows) < max(highs):  # autoscale can cut bars on a symlog axis
        ax.set_xlim(1.15 * min(lows), 1.15 * max(highs))
    ax.axvline(0.0, color="k", linewidth=0.6)
    ax.set_yticks(range(len(last)), [f"{short_name(r.module, r.point)}  p={r.chosen_p:g}" for r in last], fontsize=7)
    ax.invert_yaxis()  # search order top to bottom
    ax.set_xlabel("range (lo .. hi), symlog")
    ax.set_title(f"PCC ranges (pass {last[0].pass_index + 1})", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    # Under the figure's bottom edge (the tight bounding box grows to hold it), so it never hides a bar.
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=len(RANGE_SERIES))
    return save_figure(fig, path)


def save_pcc_plots(result: PCCResult, out_dir: Path) -> list[Path]:
    """One overlap-curve PNG per quantizer of the last pass, plus the ranges PNG; returns their paths."""
    out_dir = Path(out_dir)
    last = result.last_pass()
    if not last:
        raise ValueError("the PCC result has no records to plot")
    paths = [plot_overlap_curve(r, out_dir / f"pcc_overlap_{i:02d}_{_slug(short_name(r.module, r.point))}.png")
             for i, r in enumerate(last)]
    paths.append(plot_chosen_ranges(last, out_dir / "pcc_ranges.png"))
    return paths

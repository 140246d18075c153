"""The benchmark table: runs grouped by (model, bits, recipe, variant, reconstruction iterations), mask
AP and mIoU as mean +- std over seeds, and each group's AP difference to a baseline recipe at the same
bits with a paired bootstrap interval.

Pairing: a group is compared with the baseline group on the seeds both have (same seed = same
calibration draw); for each seed the two runs must have evaluated the same images with the same prompts
(checked by fingerprint). The interval resamples evaluation images (the same resampled sets for every
run) and averages the difference over the paired seeds; it measures how much the difference depends on
which images were evaluated, not the seed-to-seed spread (that is the +- std column). A difference is a
win or a loss only when its interval excludes 0.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from saq.eval.bootstrap import ap_samples, bootstrap_weights, interval_summary, match_table_from_json
from saq.eval.predictions import load_predictions
from saq.eval.run_index import RunInfo

log = logging.getLogger(__name__)

RECIPE_ORDER = ("fp", "minmax", "percentile", "mse", "omse", "ptq4sam_s", "saq_star", "brecq", "qdrop", "ptq4sam_l",
                "saq_base", "saq_par", "saq_pcc", "saq_sam")
QUANT_ORDER = ("w8a8", "w6a6", "w4a8", "w4a16", "w4a4")


@dataclass(frozen=True)
class EvalSamples:
    """One run's evaluation as the bootstrap sees it."""

    identity: tuple  # (ground truth digest, prompts digest, image pool): what must match for pairing
    full: float  # AP on the whole evaluation set
    samples: np.ndarray  # AP on each resampled image multiset


class BootstrapCache:
    """Resample weights per image pool and per-run AP samples, each computed once per table."""

    def __init__(self, num_samples: int = 1000, seed: int = 0, metric: str = "mask_AP"):
        self.num_samples, self.seed, self.metric = num_samples, seed, metric
        self._weights: dict[tuple, np.ndarray] = {}
        self._runs: dict[tuple[Path, str], EvalSamples | None] = {}

    def weights(self, pool: tuple[int, ...]) -> np.ndarray:
        if pool not in self._weights:
            self._weights[pool] = bootstrap_weights(len(pool), self.num_samples, self.seed)
        return self._weights[pool]

    def of(self, run: RunInfo, which: str = "quantized") -> EvalSamples | None:
        """AP samples of the run's ``quantized`` or ``fp`` evaluation; None without predictions."""
        key = (run.run_dir, which)
        if key not in self._runs:
            self._runs[key] = self._compute(run, which)
        return self._runs[key]

    def _compute(self, run: RunInfo, which: str) -> EvalSamples | None:
        if run.predictions is None:
            return None
        payload = load_predictions(run.predictions)
        pool = tuple(payload["image_ids"])
        table = match_table_from_json(payload["evals"][which]["coco"], pool)
        samples = ap_samples(table, np.vstack([np.ones((1, len(pool))), self.weights(pool)]), self.metric)
        identity = (payload["digest"]["gt"], payload["digest"]["prompts"], pool)
        return EvalSamples(identity, float(samples[0]), samples[1:])


def _order(run: RunInfo) -> tuple:
    def rank(value: str, order: Sequence[str]) -> tuple:
        return (order.index(value), "") if value in order else (len(order), value)

    return (run.model, rank(run.quant, QUANT_ORDER), rank(run.recipe, RECIPE_ORDER), run.variant,
            -1 if run.iters is None else run.iters)


def group_runs(runs: Sequence[RunInfo]) -> dict[tuple, dict[int | None, RunInfo]]:
    """{(model, quant, recipe, variant, iters): {seed: run}} in table order; a second run with the same
    key and seed is left out (logged)."""
    groups: dict[tuple, dict[int | None, RunInfo]] = {}
    for run in sorted((r for r in runs if r.recipe != "fp"), key=_order):
        by_seed = groups.setdefault(run.key, {})
        if run.seed in by_seed:
            log.warning("%s: same settings and seed as %s, left out", run.run_dir, by_seed[run.seed].run_dir)
            continue
        by_seed[run.seed] = run
    return groups


def pick_baseline(groups: dict[tuple, dict], model: str, quant: str, recipe: str,
                  iters: int | None = None) -> tuple | None:
    """The baseline group at these bits: the recipe with no variant and the most iterations (or exactly
    ``iters``); among variants only when no plain group exists."""
    keys = [k for k in groups if k[:3] == (model, quant, recipe) and (iters is None or k[4] == iters)]
    if not keys:
        return None
    return max(keys, key=lambda k: (k[3] == "", -1 if k[4] is None else k[4]))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def paired_comparison(runs: dict[Any, RunInfo], baseline: dict[Any, RunInfo], cache: BootstrapCache,
                      level: float = 0.95) -> dict[str, Any]:
    """Difference of AP to the baseline, paired on the seeds both have, with its bootstrap interval;
    a ``note`` instead when no pair can be formed."""
    seeds = sorted(set(runs) & set(baseline), key=lambda s: (s is None, s))
    if not seeds:
        return {"note": "no seed in common with the baseline"}
    pairs = [(cache.of(runs[s]), cache.of(baseline[s])) for s in seeds]
    if any(a is None or b is None for a, b in pairs):
        return {"note": "a run has no predictions.json.gz"}
    if any(a.identity != b.identity for a, b in pairs):
        return {"note": "other images or prompts than the baseline"}
    point = float(np.mean([a.full - b.full for a, b in pairs]))
    samples = np.mean([a.samples - b.samples for a, b in pairs], axis=0)
    return {**interval_summary(point, samples, level), "pairs": len(seeds), "paired_seeds": seeds}


def verdict(comparison: dict[str, Any]) -> str:
    if "ci_low" not in comparison:
        return ""
    if comparison["ci_low"] > 0:
        return "win"
    if comparison["ci_high"] < 0:
        return "loss"
    return "n.s."


def _group_row(key: tuple, runs: dict[Any, RunInfo]) -> dict[str, Any]:
    model, quant, recipe, variant, iters = key
    block = [r.metrics["quantized"] for r in runs.values()]
    ap, ap_std = _mean_std([m.get("mask_AP") for m in block])
    miou, miou_std = _mean_std([m.get("mIoU") for m in block])
    fidelity, _ = _mean_std([m.get("fidelity_mIoU") for m in block])
    return {"model": model, "quant": quant, "recipe": recipe, "iters": iters, "variant": variant, "n": len(runs),
            "seeds": sorted(runs, key=lambda s: (s is None, s)), "mask_AP": ap, "mask_AP_std": ap_std,
            "mIoU": miou, "mIoU_std": miou_std, "fidelity_mIoU": fidelity,
            "run_dirs": [_shown(r.run_dir) for r in runs.values()]}


def _shown(path: Path) -> str:
    """A run dir relative to the working dir when under it (tables committed to git carry no machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _fp_rows(runs: Sequence[RunInfo]) -> list[dict[str, Any]]:
    rows = []
    for model in sorted({r.model for r in runs}):
        # FP results are shared between runs (FP cache): each distinct one counts once
        distinct = {json.dumps(r.metrics["fp"], sort_keys=True) for r in runs if r.model == model}
        blocks = [json.loads(b) for b in sorted(distinct)]
        ap, ap_std = _mean_std([b.get("mask_AP") for b in blocks])
        miou, miou_std = _mean_std([b.get("mIoU") for b in blocks])
        rows.append({"model": model, "quant": "fp32", "recipe": "fp", "iters": None, "variant": "", "n": len(blocks),
                     "seeds": [], "mask_AP": ap, "mask_AP_std": ap_std, "mIoU": miou, "mIoU_std": miou_std,
                     "fidelity_mIoU": 1.0, "run_dirs": []})
    return rows


def _calibration_notes(runs: Sequence[RunInfo]) -> list[str]:
    notes = []
    for run in runs:
        if run.predictions is None:
            continue
        in_eval = load_predictions(run.predictions).get("calibration", {}).get("in_eval", 0)
        if in_eval:
            notes.append(f"{_shown(run.run_dir)}: {in_eval} calibration images are evaluation images")
    return notes


def compare_table(runs: Sequence[RunInfo], baseline: str, baseline_iters: int | None = None,
                  num_samples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Rows (FP first, then one per group) with mean +- std over seeds and the paired comparison to
    ``baseline``; ``meta`` says how the intervals were made and lists anything that weakens them."""
    cache = BootstrapCache(num_samples, seed)
    groups = group_runs(runs)
    rows = _fp_rows(runs)
    notes = _calibration_notes(runs)
    for key, members in groups.items():
        row = _group_row(key, members)
        base_key = pick_baseline(groups, key[0], key[1], baseline, baseline_iters)
        if base_key is None:
            row["note"] = f"no {baseline} run at {key[1]}"
        else:
            row["baseline"] = _label(base_key)
            comparison = paired_comparison(members, groups[base_key], cache, level)
            row.update({k: v for k, v in comparison.items() if k not in ("level", "samples")})
            row["verdict"] = "baseline" if key == base_key else verdict(comparison)
        rows.append(row)
    meta = {"baseline": baseline, "baseline_iters": baseline_iters, "metric": "mask_AP", "level": level,
            "bootstrap_samples": num_samples, "bootstrap_seed": seed, "runs": len(runs),
            "pairing": "on the seeds both groups have; evaluation images resampled with replacement, the "
                       "same resampled sets for every run; difference averaged over the paired seeds",
            "notes": notes}
    return {"meta": meta, "rows": rows}


def _label(key: tuple) -> str:
    model, quant, recipe, variant, iters = key
    return " ".join(str(p) for p in (quant, recipe, f"iters={iters}" if iters is not None else "", variant) if p)


def _num(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(mean: Any, std: Any, digits: int) -> str:
    return _num(mean, digits) + (f" ± {std:.{digits}f}" if std is not None else "")


def _delta(row: dict[str, Any]) -> str:
    if "ci_low" not in row:
        return row.get("note", "")
    return f"{row['delta']:+.1f} [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}]"


def to_markdown(table: dict[str, Any]) -> str:
    """The table as markdown (iters / variant columns only when some row has one)."""
    rows, meta = table["rows"], table["meta"]
    columns = ["model", "bits", "recipe"]
    if any(r.get("iters") is not None for r in rows):
        columns.append("iters")
    if any(r.get("variant") for r in rows):
        columns.append("variant")
    pct = round(meta["level"] * 100)
    columns += ["n", "mask AP", "mIoU", f"ΔAP vs {meta['baseline']} [{pct}% CI]", "pairs", ""]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = {"model": r["model"], "bits": r["quant"], "recipe": r["recipe"],
                 "iters": "" if r.get("iters") is None else str(r["iters"]), "variant": r.get("variant", ""),
                 "n": str(r["n"]), "mask AP": _pm(r["mask_AP"], r["mask_AP_std"], 1),
                 "mIoU": _pm(r["mIoU"], r["mIoU_std"], 3), columns[-3]: _delta(r) if r["recipe"] != "fp" else "",
                 "pairs": str(r.get("pairs", "")), "": r.get("verdict", "")}
        lines.append("| " + " | ".join(cells[c] for c in columns) + " |")
    return "\n".join(lines)


def footnote(table: dict[str, Any]) -> str:
    meta = table["meta"]
    text = (f"mean ± std over seeds (n runs). ΔAP: mask AP minus {meta['baseline']} at the same bits "
            f"(its plain group with the most iterations unless --baseline-iters), paired {meta['pairing']}; "
            f"{meta['level']:.0%} percentile interval of {meta['bootstrap_samples']} resamples "
            f"(seed {meta['bootstrap_seed']}). win / loss only where the interval excludes 0, n.s. otherwise.")
    return "\n".join([text, *(f"- {n}" for n in meta["notes"])])


def iteration_series(rows: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """{(model, quant, recipe, variant): rows by iterations} for groups run at two or more iteration counts."""
    series: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("iters") is not None and r.get("mask_AP") is not None:
            series.setdefault((r["model"], r["quant"], r["recipe"], r["variant"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["iters"]) for k, v in series.items() if len({r["iters"] for r in v}) > 1}


def plot_ap_vs_iters(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """PNG of mask AP (mean, std bars) against ptq.recon.iters, one line per recipe and bit setting, FP
    dashed; None when no recipe has two iteration counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = iteration_series(rows)
    if not series:
        return None
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (model, quant, recipe, variant), points in series.items():
        ax.errorbar([p["iters"] for p in points], [p["mask_AP"] for p in points],
                    yerr=[p["mask_AP_std"] or 0.0 for p in points], marker="o", capsize=3,
                    label=" ".join(x for x in (quant, recipe, variant) if x))
    for r in rows:
        if r["recipe"] == "fp" and r.get("mask_AP") is not None:
            ax.axhline(r["mask_AP"], color="0.5", linestyle="--", linewidth=1, label=f"{r['model']} FP")
    if max(p["iters"] for points in series.values() for p in points) > 500:
        ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("ptq.recon.iters (per unit)")
    ax.set_ylabel("mask AP")
    ax.set_title("mask AP against reconstruction iterations (iters=0: calibration alone)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path

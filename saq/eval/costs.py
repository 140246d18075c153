"""What each benchmark row cost: wall time per stage and milliseconds per reconstruction iteration per
unit type, read from the runs' metrics.json (the committed results/ copies included).

Rows group runs as the comparison table does (model, bits, recipe, variant, iterations); times are the
median over the group's seeds. Evaluation is the wall time the stages do not account for (the FP
evaluation, when it came from the cache, costs nothing here).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Sequence

from saq.eval.compare import QUANT_ORDER, RECIPE_ORDER
from saq.eval.run_index import RunInfo

STAGE_ORDER = ("bimodal", "pcc", "calibrate", "reconstruct")


def _unit_kind(unit: dict[str, Any]) -> str:
    """A unit's type: recorded by the run, or (older runs) read from its name."""
    if unit.get("kind"):
        return str(unit["kind"])
    name = str(unit["unit"])
    if name.endswith("neck"):
        return "neck"
    if "final_attn" in name:
        return "final_attn"
    return "decoder_layer" if name.startswith("mask_decoder") else "encoder_unit"


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def cost_rows(runs: Sequence[RunInfo]) -> list[dict[str, Any]]:
    """One row per (model, bits, recipe, variant, iterations): seeds, median wall time and stage seconds,
    the evaluation's share, and ms/iteration per unit type (where the runs recorded it)."""
    groups: dict[tuple, list[RunInfo]] = defaultdict(list)
    for run in runs:
        groups[run.key].append(run)
    rows = []
    for key, members in groups.items():
        model, quant, recipe, variant, iters = key
        row: dict[str, Any] = {"model": model, "quant": quant, "recipe": recipe, "variant": variant, "iters": iters,
                               "seeds": sorted(r.seed for r in members if r.seed is not None)}
        walls = [float(r.metrics["wall_time_s"]) for r in members if r.metrics.get("wall_time_s") is not None]
        row["wall_s"] = _median(walls)
        stage_sums = []
        for stage in STAGE_ORDER:
            seconds = [float(r.metrics["stages"]["seconds"][stage]) for r in members
                       if stage in (r.metrics.get("stages") or {}).get("seconds", {})]
            row[f"{stage}_s"] = _median(seconds)
        for r in members:
            seconds = (r.metrics.get("stages") or {}).get("seconds")
            if seconds is not None and r.metrics.get("wall_time_s") is not None:
                stage_sums.append(float(r.metrics["wall_time_s"]) - sum(float(v) for v in seconds.values()))
        row["eval_and_rest_s"] = _median(stage_sums)
        per_kind: dict[str, list[float]] = defaultdict(list)
        for r in members:
            for unit in (r.metrics.get("stages") or {}).get("reconstruct") or []:
                if unit.get("ms_per_iter") is not None:
                    per_kind[_unit_kind(unit)].append(float(unit["ms_per_iter"]))
        row["ms_per_iter"] = {kind: _median(values) for kind, values in sorted(per_kind.items())}
        rows.append(row)

    def order(row: dict[str, Any]) -> tuple:
        quant = QUANT_ORDER.index(row["quant"]) if row["quant"] in QUANT_ORDER else len(QUANT_ORDER)
        recipe = RECIPE_ORDER.index(row["recipe"]) if row["recipe"] in RECIPE_ORDER else len(RECIPE_ORDER)
        return (row["model"], quant, recipe, row["variant"], row["iters"] if row["iters"] is not None else -1)

    return sorted(rows, key=order)


def _minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 60:.1f}"


def cost_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table: minutes per stage, then ms/iteration per unit type."""
    kinds = sorted({kind for row in rows for kind in row["ms_per_iter"]})
    head = (["bits", "recipe", "iters", "seeds", "total min"] + [f"{s} min" for s in STAGE_ORDER]
            + ["eval + rest min"] + [f"{k} ms/iter" for k in kinds])
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for row in rows:
        recipe = row["recipe"] + (f" {row['variant']}" if row["variant"] else "")
        cells = [row["quant"], recipe, "" if row["iters"] is None else str(row["iters"]),
                 ",".join(map(str, row["seeds"])), _minutes(row["wall_s"])]
        cells += [_minutes(row[f"{s}_s"]) for s in STAGE_ORDER] + [_minutes(row["eval_and_rest_s"])]
        cells += ["" if row["ms_per_iter"].get(k) is None else f"{row['ms_per_iter'][k]:.0f}" for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

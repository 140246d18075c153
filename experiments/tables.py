"""Turn the run dirs of a sweep into a paper-style table (markdown + CSV), FP row first.

    python experiments/tables.py outputs/ptq/multiruns/<timestamp> [more sweep dirs ...] [--out table]

Each row is one run (quant, recipe, the overrides that distinguish it), with mask AP and mean IoU of
the honest quantized model, the reference-protocol numbers where a run computed them, and wall time.
Also writes <out>.png: mask AP per row as bars.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from saq.eval.plots import plot_ap_per_row
from saq.utils.run_files import job_overrides, status_files_in_job_order

COLUMNS = ["model", "quant", "recipe", "variant", "mask_AP", "mask_AP50", "mask_AP75", "mIoU", "fidelity_mIoU",
           "ref_mask_AP", "ref_mIoU", "wall_time_s", "state", "run_dir"]


def collect_rows(sweep_dirs: list[Path]) -> list[dict]:
    rows, fp_rows = [], {}
    for sweep_dir in sweep_dirs:
        _collect(sweep_dir, rows, fp_rows)
    return list(fp_rows.values()) + rows


def _collect(sweep_dir: Path, rows: list[dict], fp_rows: dict) -> None:
    for status_path in status_files_in_job_order(sweep_dir):
        run_dir = status_path.parent
        state = json.loads(status_path.read_text()).get("state")
        variant = " ".join(job_overrides(run_dir))
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.is_file():
            rows.append({"state": state, "run_dir": str(run_dir), "variant": variant})
            continue
        m = json.loads(metrics_path.read_text())
        fp_rows.setdefault(m["model"], {"model": m["model"], "quant": "fp32", "recipe": "fp", **m["fp"],
                                        "fidelity_mIoU": 1.0, "state": "completed", "run_dir": ""})
        if m["recipe"] == "fp":
            continue
        ref = m.get("reference_protocol") or {}
        rows.append({"model": m["model"], "quant": m["quant"], "recipe": m["recipe"], "variant": variant,
                     **m["quantized"], "ref_mask_AP": ref.get("mask_AP"), "ref_mIoU": ref.get("mIoU"),
                     "wall_time_s": m.get("wall_time_s"), "state": state, "run_dir": str(run_dir)})


def _fmt(key: str, value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if "IoU" in key else f"{value:.1f}"
    return str(value)


def to_markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None, help="basename for .md and .csv (default: <first sweep>/table)")
    args = parser.parse_args(argv)
    missing = [d for d in args.sweep_dirs if not d.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    rows = collect_rows(args.sweep_dirs)
    if not rows:
        print(f"error: no run dirs (status.json) under {', '.join(map(str, args.sweep_dirs))}", file=sys.stderr)
        return 2
    columns = [c for c in COLUMNS if c != "run_dir" and any(r.get(c) not in (None, "") for r in rows)]
    out = args.out or args.sweep_dirs[0] / "table"
    out.with_suffix(".md").write_text(to_markdown(rows, columns) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    written = [out.with_suffix(".md"), out.with_suffix(".csv")]
    if any(isinstance(r.get("mask_AP"), float) for r in rows):
        written.append(plot_ap_per_row(rows, out.with_suffix(".png")))
    print(to_markdown(rows, columns))
    print(f"\nwrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

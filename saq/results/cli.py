"""Turn the run dirs of a sweep into a paper-style table (markdown + CSV), FP row first.

    python -m saq.results outputs/ptq/multiruns/<timestamp> [more sweep dirs ...] [--out table]

Each row is one run (quant, recipe, the overrides that distinguish it), with mask AP and mean IoU of
the honest quantized model, the reference-protocol numbers where a run computed them, and wall time.
Also writes <out>.png: mask AP per row as bars.

    python -m saq.results compare results/vit_t_coco [run or sweep dirs ...] --baseline ptq4sam_l
    python -m saq.results collect outputs/vit_t_coco/* [--results results] [--experiment vit_t_coco]

``compare``: one row per (bits, recipe, variant, reconstruction iterations), mask AP and mIoU as mean +-
std over seeds, and the AP difference to the baseline recipe at the same bits with a paired bootstrap
95% interval over the evaluation images (win / loss only where it excludes 0); writes <out>.md, .csv,
.json and <out>_iters.png (AP against ptq.recon.iters). ``collect``: copies the small files of finished
runs (metrics.json, predictions.json.gz, status.json, .hydra/*.yaml) into
results/<experiment>/<quant>/<recipe>[-iters<N>]/seed<k>/ (see results/README.md).

    python -m saq.results cost results/vit_t_coco

``cost``: per row, minutes per stage (median over seeds) and ms per reconstruction iteration per unit type.
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


COMPARE_CSV_COLUMNS = ["model", "quant", "recipe", "iters", "variant", "n", "seeds", "mask_AP", "mask_AP_std", "mIoU",
                       "mIoU_std", "fidelity_mIoU", "baseline", "delta", "ci_low", "ci_high", "p_le_0", "pairs",
                       "paired_seeds", "verdict", "note"]


def _all_dirs(paths: list[Path]) -> bool:
    """True when every path is a directory; otherwise says which are not."""
    missing = [d for d in paths if not d.is_dir()]
    if missing:
        print(f"error: not a directory: {', '.join(map(str, missing))}", file=sys.stderr)
    return not missing


def _finished_runs(dirs: list[Path]) -> list | None:
    """The finished runs under ``dirs``, or None after printing why there are none (a missing dir, no run)."""
    from saq.eval.run_index import find_runs

    if not _all_dirs(dirs):
        return None
    runs = find_runs(dirs)
    if not runs:
        print(f"error: no finished run (metrics.json) under {', '.join(map(str, dirs))}", file=sys.stderr)
        return None
    return runs


def compare_main(argv: list[str]) -> int:
    """compare: the benchmark table with paired bootstrap intervals against a baseline recipe."""
    from saq.eval.compare import compare_table, footnote, plot_ap_vs_iters, to_markdown

    parser = argparse.ArgumentParser(prog="python -m saq.results compare", description=compare_main.__doc__)
    parser.add_argument("dirs", type=Path, nargs="+", help="results/<experiment> trees, sweep dirs or run dirs")
    parser.add_argument("--baseline", required=True, help="recipe every row is compared with (e.g. ptq4sam_l)")
    parser.add_argument("--baseline-iters", type=int, default=None,
                        help="the baseline's ptq.recon.iters (default: its run with the most iterations)")
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="basename of the outputs (default: <first dir>/compare)")
    args = parser.parse_args(argv)
    runs = _finished_runs(args.dirs)
    if runs is None:
        return 2
    try:
        table = compare_table(runs, args.baseline, args.baseline_iters, args.samples, args.seed)
    except ValueError as exc:  # e.g. an unreadable predictions.json.gz: the message names the file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or args.dirs[0] / "compare"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = to_markdown(table) + "\n\n" + footnote(table) + "\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(table, indent=2, default=str) + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARE_CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "seeds": " ".join(map(str, r.get("seeds", []))),
                          "paired_seeds": " ".join(map(str, r.get("paired_seeds", [])))} for r in table["rows"])
    written = [out.with_suffix(s) for s in (".md", ".csv", ".json")]
    plot = plot_ap_vs_iters(table["rows"], out.with_name(out.name + "_iters.png"))
    written += [plot] if plot else []
    print(text)
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def collect_main(argv: list[str]) -> int:
    """collect: copy the small files of finished runs into results/<experiment>/<quant>/<recipe>/seed<k>."""
    from saq.eval.run_index import collect_run, find_runs

    parser = argparse.ArgumentParser(prog="python -m saq.results collect", description=collect_main.__doc__)
    parser.add_argument("dirs", type=Path, nargs="+", help="run dirs or sweep dirs")
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="results root (default: results/ in the current directory)")
    parser.add_argument("--experiment", default=None,
                        help="experiment dir name (default: the run's experiment= override or logger.group)")
    parser.add_argument("--force", action="store_true", help="replace files that differ")
    args = parser.parse_args(argv)
    runs = find_runs(args.dirs)
    if not runs:
        print(f"error: no finished run (metrics.json) under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    for run in runs:
        try:
            dest = collect_run(run, args.results, args.experiment, args.force)
        except (FileExistsError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{run.run_dir} -> {dest}")
    return 0


def cost_main(argv: list[str]) -> int:
    """cost: minutes per stage and ms per reconstruction iteration per unit type, per benchmark row."""
    from saq.eval.costs import cost_markdown, cost_rows

    parser = argparse.ArgumentParser(prog="python -m saq.results cost", description=cost_main.__doc__)
    parser.add_argument("dirs", type=Path, nargs="+", help="results/<experiment> trees, sweep dirs or run dirs")
    parser.add_argument("--out", type=Path, default=None, help="basename of the outputs (default: <first dir>/cost)")
    args = parser.parse_args(argv)
    runs = _finished_runs(args.dirs)
    if runs is None:
        return 2
    rows = cost_rows(runs)
    out = args.out or args.dirs[0] / "cost"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = cost_markdown(rows)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    print(f"\nwrote {out.with_suffix('.md')}, {out.with_suffix('.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    subcommands = {"compare": compare_main, "collect": collect_main, "cost": cost_main}
    if argv and argv[0] in subcommands:
        return subcommands[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="python -m saq.results", description=__doc__.splitlines()[0],
                                     epilog="other commands: compare, collect, cost "
                                            "(python -m saq.results compare -h)")
    parser.add_argument("sweep_dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None, help="basename for .md and .csv (default: <first sweep>/table)")
    args = parser.parse_args(argv)
    if not _all_dirs(args.sweep_dirs):
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

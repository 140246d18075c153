"""Hydra callbacks: a results table at the end of every sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from saq.utils.run_files import status_files_in_job_order


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """metrics.json and status.json of every job under a sweep dir, in job order."""
    jobs = []
    for status_path in status_files_in_job_order(sweep_dir):
        job_dir = status_path.parent
        status = json.loads(status_path.read_text())
        metrics_path = job_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        jobs.append({"dir": str(job_dir), "status": status, "metrics": metrics})
    return jobs


def sweep_table(jobs: list[dict[str, Any]]) -> str:
    from saq.utils.run_files import format_table, result_rows, varying_overrides

    variants = varying_overrides(Path(job["dir"]) for job in jobs)
    rows, fp_seen = [], set()
    for job in jobs:
        m = job["metrics"]
        if m is None or "fp" not in m:
            continue
        fp_id = (m["model"], json.dumps(m["fp"], sort_keys=True))
        # one FP row per distinct FP result
        rows.extend(result_rows(m, include_fp=fp_id not in fp_seen, variant=variants[job["dir"]]))
        fp_seen.add(fp_id)
    return format_table(rows)


class SweepSummary(Callback):
    """Prints and writes (summary.md) the table of a multirun when it ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = collect_sweep(sweep_dir)
        failed = [j for j in jobs if j["status"].get("state") != "completed"]
        lines = [f"  not completed: {j['dir']} ({j['status'].get('state')}): {first_line(j['status'].get('error'))}"
                 for j in failed]
        table = sweep_table(jobs)
        (sweep_dir / "summary.md").write_text(table + "\n" + "".join(f"\n{line}" for line in lines) + "\n")
        print(f"\nsweep {sweep_dir}: {len(jobs) - len(failed)}/{len(jobs)} jobs completed\n{table}")
        for line in lines:
            print(line)
        if failed:  # the sweep's exit code says that not every job gave a number
            raise SystemExit(f"{len(failed)} of {len(jobs)} jobs failed (listed above and in {sweep_dir / 'summary.md'})")


def first_line(error: str | None) -> str:
    return (error or "no error recorded").strip().splitlines()[0][:300]

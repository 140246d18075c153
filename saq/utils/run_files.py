"""Files every run directory gets: status.json, metrics.json, and the printed results table."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import yaml


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only when the block ends without error: written to a
    temporary file of its own in the same dir, then os.replace. Readers see the old or the new file,
    never a half-written one, and concurrent writers never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from the rest of a group
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def write_status(run_dir: Path, state: str, error: str | None = None, **extra: Any) -> None:
    write_json(run_dir / "status.json", {"state": state, "error": error, "time": time.time(), **extra})


def status_files_in_job_order(sweep_dir: Path) -> list[Path]:
    """status.json of every run under a sweep dir, job dirs in numeric order (2 before 10)."""
    sweep_dir = Path(sweep_dir)

    def job_order(path: Path) -> list:
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.relative_to(sweep_dir).parts]

    return sorted(sweep_dir.glob("**/status.json"), key=job_order)


# Overrides with a column of their own (quant, recipe) or no effect on the numbers.
_NOT_A_VARIANT = ("quant=", "ptq=", "hydra.", "logger", "runtime.", "experiment=")


def job_overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides (from .hydra/overrides.yaml) that change its result, besides
    quant and recipe."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [o for o in (yaml.safe_load(path.read_text()) or []) if not o.startswith(_NOT_A_VARIANT)]


def varying_overrides(run_dirs: Iterable[Path]) -> dict[str, str]:
    """{run dir: the overrides that differ between the given runs}, so a sweep over, say, theta shows
    the theta of each row but not the settings every row shares."""
    per_run = {str(d): job_overrides(d) for d in run_dirs}
    shared = set.intersection(*map(set, per_run.values())) if per_run else set()
    return {d: " ".join(o for o in overrides if o not in shared) for d, overrides in per_run.items()}


def format_error(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}\n" + "".join(traceback.format_tb(exc.__traceback__)[-3:])


TABLE_COLUMNS = (("model", "model"), ("quant", "quant"), ("recipe", "recipe"), ("variant", "variant"),
                 ("mask_AP", "AP"), ("mask_AP50", "AP50"), ("mask_AP75", "AP75"), ("mIoU", "mIoU"),
                 ("fidelity_mIoU", "IoU vs FP"), ("wall_time_s", "time s"))


def result_rows(metrics: dict[str, Any], include_fp: bool = True, variant: str = "") -> list[dict[str, Any]]:
    """Table rows of one metrics.json: the FP row (optional) and the quantized row."""
    base = {"model": metrics.get("model"), "wall_time_s": metrics.get("wall_time_s"), "variant": variant}
    rows = []
    if include_fp:
        rows.append({**base, "quant": "fp32", "recipe": "fp", **metrics["fp"], "fidelity_mIoU": 1.0,
                     "wall_time_s": None, "variant": ""})
    if metrics.get("recipe") != "fp":
        rows.append({**base, "quant": metrics.get("quant"), "recipe": metrics.get("recipe"), **metrics["quantized"]})
    if metrics.get("reference_protocol"):
        rows.append({**base, "quant": metrics.get("quant"), "recipe": f"{metrics.get('recipe')} (ref. protocol)",
                     **metrics["reference_protocol"]})
    return rows


def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if "IoU" in key else f"{value:.1f}"  # IoU in 0-1, AP in percent, seconds
    return str(value)


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    """A markdown table of result rows (the variant column only when some row has one)."""
    rows = list(rows)
    columns = [(k, t) for k, t in TABLE_COLUMNS if k != "variant" or any(r.get("variant") for r in rows)]
    header = [title for _, title in columns]
    body = [[_cell(key, row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])

"""Finished runs on disk: what each one is (model, bits, recipe, variant, seed) and where its results
go under ``results/`` so tables can be rebuilt from committed files.

A run dir is any dir with a ``metrics.json``: a Hydra run dir (``.hydra/config.yaml``,
``.hydra/overrides.yaml``, ``status.json``) or its copy under
``results/<experiment>/<quant>/<recipe>[-iters<N>][-<variant>]/seed<k>/`` made by :func:`collect_run`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from saq.eval.predictions import FILE_NAME as PREDICTIONS_FILE
from saq.utils.run_files import job_overrides

log = logging.getLogger(__name__)

# The small files of a run that a table needs (quantized.pt, W&B and logs stay behind).
SMALL_FILES = ("metrics.json", PREDICTIONS_FILE, "status.json", ".hydra/config.yaml", ".hydra/overrides.yaml")
# Not part of the variant: overrides with a field of their own here (seed, iterations) and eval.*
# settings, which leave the honest quantized numbers unchanged (checkpoint, pictures, extra rows).
_OWN_FIELDS = ("seed=", "+seed=", "++seed=", "ptq.recon.iters=", "eval.")


@dataclass(frozen=True)
class RunInfo:
    """One finished run, as a table groups it."""

    run_dir: Path
    metrics: dict[str, Any] = field(repr=False)
    model: str
    quant: str
    recipe: str
    variant: str  # overrides that change the result besides bits, recipe, seed and iterations
    seed: int | None
    iters: int | None  # ptq.recon.iters of a reconstruction recipe, None for the others
    state: str
    experiment: str | None

    @property
    def predictions(self) -> Path | None:
        path = self.run_dir / PREDICTIONS_FILE
        return path if path.is_file() else None

    @property
    def key(self) -> tuple:
        return (self.model, self.quant, self.recipe, self.variant, self.iters)


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _override_value(overrides: list[str], name: str) -> str | None:
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key == name:
            return value
    return None


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _experiment(overrides: list[str], config: dict[str, Any]) -> str | None:
    return _override_value(overrides, "experiment") or (config.get("logger") or {}).get("group")


def load_run(run_dir: Path) -> RunInfo | None:
    """The run in ``run_dir``, or None when it has no metrics.json (not finished, or failed)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    config = _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
    ptq = config.get("ptq") or {}
    reconstructs = "reconstruct" in (ptq.get("stages") or [])
    iters = (ptq.get("recon") or {}).get("iters", _override_value(overrides, "ptq.recon.iters"))
    seed = config.get("seed", _override_value(overrides, "seed"))
    variant = " ".join(o for o in job_overrides(run_dir) if not o.startswith(_OWN_FIELDS))
    return RunInfo(run_dir, metrics, str(metrics["model"]), str(metrics["quant"]), str(metrics["recipe"]), variant,
                   _int_or_none(seed), _int_or_none(iters) if reconstructs else None,
                   str(status.get("state", "completed")), _experiment(overrides, config))


def find_runs(dirs: Iterable[Path]) -> list[RunInfo]:
    """Every completed run under ``dirs`` (each a run dir, a sweep dir or a results/ tree), in path order."""
    runs, seen = [], set()
    for root in dirs:
        for metrics_path in sorted(Path(root).glob("**/metrics.json")):
            run_dir = metrics_path.parent.resolve()
            if run_dir in seen:
                continue
            seen.add(run_dir)
            run = load_run(run_dir)
            if run is None or run.state != "completed" or not run.metrics.get("quantized"):
                log.info("skipped %s: not a completed run with quantized metrics", run_dir)
                continue
            runs.append(run)
    return runs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")


def results_dir_of(run: RunInfo, results_root: Path, experiment: str | None = None) -> Path:
    """``results/<experiment>/<quant>/<recipe>[-iters<N>][-<variant>]/seed<k>``."""
    experiment = experiment or run.experiment
    if not experiment:
        raise ValueError(f"{run.run_dir}: no experiment= override or logger.group; pass an experiment name")
    name = run.recipe + (f"-iters{run.iters}" if run.iters is not None else "")
    if run.variant:
        name += "-" + _slug(run.variant)
    seed = f"seed{run.seed}" if run.seed is not None else "seed_unknown"
    return Path(results_root) / _slug(experiment) / run.quant / name / seed


def collect_run(run: RunInfo, results_root: Path, experiment: str | None = None, force: bool = False) -> Path:
    """Copy the small files of a finished run into its results/ dir; refuses to replace different
    files unless ``force`` (a rerun should not silently overwrite a committed result)."""
    dest = results_dir_of(run, results_root, experiment)
    pending = []
    for name in SMALL_FILES:
        src = run.run_dir / name
        if not src.is_file():
            continue
        target = dest / name
        if target.is_file() and target.read_bytes() != src.read_bytes() and not force:
            raise FileExistsError(f"{target} exists with other content (another run with the same seed?); "
                                  "use --force to replace it")
        pending.append((src, target))
    for src, target in pending:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return dest

"""Experiment loggers: W&B (offline by default) and a JSON-lines file that is always written."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)


class RunLogger:
    """Writes every logged dict to ``log.jsonl`` in the run dir (the fallback when W&B is off)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}, default=str) + "\n")

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self.log_metrics({"summary": dict(summary)})

    def log_table(self, key: str, rows: list[Mapping[str, Any]]) -> None:
        self.log_metrics({key: list(rows)})

    def log_image(self, key: str, path: Path) -> None:
        self.log_metrics({key: str(path)})

    def finish(self, failed: bool = False) -> None:
        pass


class WandbRunLogger(RunLogger):
    """Also sends everything to Weights & Biases (mode from config: offline, online or disabled)."""

    def __init__(self, run_dir: Path, cfg: Mapping[str, Any], config: Mapping[str, Any], name: str) -> None:
        super().__init__(run_dir)
        import wandb

        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE") or cfg.get("mode", "offline")
        quiet = bool(cfg.get("quiet", True))  # W&B's own console output buries the results table
        self.run = wandb.init(project=cfg.get("project", "saq"), entity=cfg.get("entity"), group=cfg.get("group"),
                              tags=list(cfg.get("tags") or []), name=name, mode=mode, dir=str(run_dir),
                              config=dict(config), reinit="finish_previous",
                              settings=wandb.Settings(silent=quiet, quiet=quiet))
        self._announce = quiet and mode == "offline"

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, step)
        self.run.log(dict(metrics), step=step)

    def log_summary(self, summary):
        super().log_summary(summary)
        self.run.summary.update(dict(summary))

    def log_table(self, key, rows):
        super().log_table(key, rows)
        if rows:
            columns = list(rows[0])
            self.run.log({key: self._wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def log_image(self, key, path):
        super().log_image(key, path)
        self.run.log({key: self._wandb.Image(str(path))})

    def finish(self, failed=False):
        run_path = Path(self.run.dir).parent  # .../wandb/offline-run-*/files -> the offline run
        self.run.finish(exit_code=1 if failed else 0)
        if self._announce:
            log.info("W&B (offline): %s  (upload with: wandb sync %s)", run_path, run_path)


def build_logger(cfg: Mapping[str, Any], run_dir: Path, config: Mapping[str, Any], name: str) -> RunLogger:
    if cfg.get("name", "none") == "wandb":
        return WandbRunLogger(run_dir, cfg, config, name)
    return RunLogger(run_dir)

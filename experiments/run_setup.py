"""What the experiment scripts share: a run's config, its inputs and its calibrated model, built as
``python -m saq.ptq`` builds them (``saq.ptq.pipeline.load_inputs``), on the CPU and without progress bars."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from saq.cli.task import config_dir, register_resolvers
from saq.data.calibration import CalibrationItem, cap_prompts
from saq.ptq.pipeline import RunInputs, load_inputs
from saq.ptq.stages import StageContext, run_stages
from saq.utils.cpu_runtime import apply_cpu_runtime
from saq.utils.loggers import RunLogger


def compose_run(overrides: list[str]) -> tuple[DictConfig, dict[str, Any]]:
    """conf/ptq.yaml with ``overrides`` (no logging service), the CPU runtime applied and the seed set."""
    register_resolvers()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("ptq", overrides=[*overrides, "logger=none"])
    apply_cpu_runtime(cfg.runtime)
    torch.manual_seed(int(cfg.seed))
    return cfg, OmegaConf.to_container(cfg, resolve=True)


def run_inputs(cfg: DictConfig, config: dict[str, Any]) -> RunInputs:
    """The FP model, the evaluation set and prompts, and the calibration draw of the run."""
    return load_inputs(cfg, config, torch.device("cpu"), progress=False)


def run_recipe_stages(inputs: RunInputs, cfg: DictConfig, config: dict[str, Any],
                      recon_items: list[CalibrationItem] | None = None, progress: bool = False) -> dict[str, Any]:
    """The recipe's ``ptq.stages`` on the (already quantized) model; their own files are not kept.
    ``recon_items``: default the calibration items capped at ``calib.max_prompts_per_image``, as saq.ptq."""
    if recon_items is None:
        recon_items = cap_prompts(inputs.calib_items, cfg.calib.max_prompts_per_image, int(cfg.calib.seed))
    with tempfile.TemporaryDirectory() as stage_dir:
        return run_stages(StageContext(inputs.model, inputs.calib_items, recon_items, config, Path(stage_dir),
                                       RunLogger(Path(stage_dir)), progress))

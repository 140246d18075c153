"""``python -m saq.ptq``: quantize a SAM with a recipe and evaluate FP vs quantized."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from saq.cli.task import config_dir, register_resolvers, run_task

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="ptq")
def main(cfg: DictConfig) -> float:
    from saq.ptq.pipeline import run_ptq  # heavy imports after Hydra has parsed the command line

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    name = f"{cfg.model.name}-{cfg.quant.name}-{cfg.ptq.name}"
    metrics = run_task(cfg, run_dir, run_ptq, name)
    return metrics["quantized"]["mask_AP"]  # the sweep objective


if __name__ == "__main__":
    main()

"""``python -m saq.ptq``: quantize a SAM with a recipe and evaluate FP vs quantized."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from saq.cli.task import (config_dir, device_or_exit, end_at_once_when_interrupted, expand_resume, job_of_a_sweep,
                          register_resolvers, run_task)

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="ptq")
def main(cfg: DictConfig) -> float:
    from saq.config import ConfigError, validate_ptq_config

    def body() -> float:
        try:
            validate_ptq_config(cfg)  # before the run dir is claimed or anything is computed
        except ConfigError as exc:
            raise SystemExit(f"config error: {exc}") from None
        from saq.ptq.pipeline import run_ptq  # torch and the models: seconds, after the config is known good

        device_or_exit(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        name = f"{cfg.model.name}-{cfg.quant.name}-{cfg.ptq.name}"
        metrics = run_task(cfg, run_dir, run_ptq, name)
        print_run_summary(metrics, run_dir)
        return metrics["quantized"]["mask_AP"]  # the sweep objective

    return job_of_a_sweep(body)()


def print_run_summary(metrics: dict, run_dir: Path) -> None:
    """The results table and where the run's files are (the library logs; the command line prints)."""
    from saq.utils.run_files import format_table, result_rows

    print("\n" + format_table(result_rows(metrics)))
    if (run_dir / "side_by_side.png").is_file():
        print(f"  side-by-side masks: {run_dir / 'side_by_side.png'}")
    checkpoint = metrics.get("checkpoint")
    print(f"\nrun dir: {run_dir}\n  metrics: {run_dir / 'metrics.json'}" +
          (f"\n  quantized checkpoint: {checkpoint}" if checkpoint else ""))


def demo_or_main() -> None:
    """``python -m saq.ptq`` with no arguments runs the offline demo sweep (experiment=demo);
    ``python -m saq.ptq resume=<run dir>`` continues an interrupted run in its own dir."""
    sys.argv = expand_resume(sys.argv)
    if len(sys.argv) == 1:
        print("[saq] no arguments: running the offline demo (python -m saq.ptq -m experiment=demo)")
        sys.argv += ["-m", "experiment=demo"]
    end_at_once_when_interrupted(main)


if __name__ == "__main__":
    demo_or_main()

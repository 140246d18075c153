"""``python -m saq.eval ckpt_path=...``: evaluate a saved quantized checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from saq.cli.task import config_dir, register_resolvers, run_task
from saq.utils.loggers import RunLogger

register_resolvers()


def run_eval(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict[str, Any]:
    from saq.data import dataset_from_config, prompts_from_config
    from saq.eval import evaluate, per_set_metrics
    from saq.export import load_quantized
    from saq.nn import assert_deployable
    from saq.ptq.pipeline import METRIC_KEYS, resolve_device
    from saq.utils.run_files import format_table, write_json

    start = time.perf_counter()
    model, payload = load_quantized(cfg.ckpt_path)
    trained = payload["config"]
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True, enum_to_str=True) if cfg.get("data") else trained["data"]
    prompts_cfg = OmegaConf.to_container(cfg.prompts, resolve=True, enum_to_str=True) if cfg.get("prompts") else trained["prompts"]
    assert_deployable(model, require_quantizers=bool(payload["layout"]))
    model = model.to(resolve_device(str(cfg.runtime.device)))
    dataset = dataset_from_config(data_cfg)
    if trained["calib"].get("exclude_from_eval") and not cfg.get("data"):
        used = set(trained["calib"].get("selected", []))  # the images the run held out of evaluation
        dataset = dataset.subset(i.id for i in dataset.images if str(i.path) not in used)
    result = evaluate(model, dataset, prompts_from_config(prompts_cfg, dataset), "eval", int(cfg.eval.prompt_batch),
                      bool(cfg.runtime.progress))
    recipe = trained["ptq"]["name"]
    metrics = {"checkpoint": str(cfg.ckpt_path), "recipe": recipe, "model": trained["model"]["name"],
               "quant": trained["quant"]["name"] if trained["ptq"]["quantize"] else "fp32",
               "quantized": {k: float(result.metrics[k]) for k in METRIC_KEYS},
               "per_set": per_set_metrics(dataset, result), "deployable": bool(payload["layout"]),
               "wall_time_s": time.perf_counter() - start, "timing": result.timing}
    write_json(run_dir / "metrics.json", metrics)
    logger.log_metrics({f"eval/{k}": v for k, v in metrics["quantized"].items()})
    print("\n" + format_table([{**metrics, **metrics["quantized"]}]))
    print(f"\nmetrics: {run_dir / 'metrics.json'}")
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> float:
    metrics = run_task(cfg, Path(HydraConfig.get().runtime.output_dir), run_eval, f"eval-{Path(cfg.ckpt_path).parent.name}")
    return metrics["quantized"]["mask_AP"]


if __name__ == "__main__":
    main()

"""One PTQ run, in named steps: load_inputs -> evaluate_fp -> quantize_and_evaluate (quantize_ -> stages
-> harden -> assert_deployable -> evaluate) -> run_metrics -> write_results.

Every input is explicit: the resolved config and the run directory. Nothing is global.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from saq.data import select_calibration
from saq.data.calibration import CalibrationItem, cap_prompts
from saq.data.coco import CocoInstances
from saq.data.prompts import Prompt
from saq.data.sources import dataset_from_config, prompts_from_config
from saq.eval import EvalResult, add_fidelity, evaluate, per_set_metrics
from saq.eval.evaluate import detections, save_examples
from saq.eval.metrics import check_metric_ranges, coco_mask_ap, fidelity
from saq.eval.predictions import save_predictions  # per-image results for paired comparisons
from saq.eval.pseudo_gt import pseudo_ground_truth
from saq.eval.cache import cached_evaluation, fp_cache_key
from saq.export import save_quantized
from saq.models import build_model
from saq.nn import QuantLinear, assert_deployable, harden_weights_, quantize_
from saq.nn.deploy import deployment_check
from saq.ptq.preflight import preflight
from saq.ptq.recipe import rules_for_model
from saq.ptq.stages import StageContext, run_stages
from saq.quant import QuantMode, set_quant_mode
from saq.quant.fused import use_fused_kernels_
from saq.utils.cpu_runtime import apply_cpu_runtime
from saq.utils.loggers import RunLogger
from saq.utils.run_files import result_rows, write_json

METRIC_KEYS = ("mask_AP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm", "mask_APl", "mIoU")


def resolve_device(name: str) -> torch.device:
    """The torch device of ``runtime.device``; a CUDA device that is not there fails here, before any work."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RuntimeError(f"runtime.device={name}: {exc}; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device={name}: no CUDA device is visible (torch.cuda.is_available() is False); "
                           "use runtime.device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"runtime.device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


@contextlib.contextmanager
def reference_protocol(model, drop_prob: float):
    """Reproduce the reference code's evaluation defect: QDrop stays on for every Linear input."""
    quantizers = [m.input_quantizer for m in model.modules()
                  if isinstance(m, QuantLinear) and m.input_quantizer is not None]
    try:
        for q in quantizers:
            q.drop_prob = drop_prob
            q.train()
        yield
    finally:
        for q in quantizers:
            q.drop_prob = 0.0
            q.eval()


def _metric_block(result_metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(result_metrics[k]) for k in METRIC_KEYS}


def refuse_undeployable(model: torch.nn.Module, run_dir: Path, config: dict[str, Any], fp: EvalResult) -> None:
    """Record a failed deployability check in metrics.json (FP numbers only), then raise."""
    _, problems = deployment_check(model)
    if problems:
        write_json(run_dir / "metrics.json", {
            "recipe": config["ptq"]["name"], "quant": config["quant"]["name"], "model": config["model"]["name"],
            "fp": _metric_block(fp.metrics), "quantized": {}, "deployable": False, "deployment_problems": problems})
        assert_deployable(model)


@dataclass
class RunInputs:
    """What a run calibrates and evaluates on. Without labels, ``evaluate_fp`` replaces the evaluation
    set's annotations and prompts by the FP model's own masks."""
    model: nn.Module
    eval_set: CocoInstances
    eval_prompts: dict[int, list[Prompt]]
    calib_items: list[CalibrationItem]
    labelled: bool = True


@dataclass
class QuantizedRun:
    result: EvalResult
    layout: dict[str, Any] = field(default_factory=dict)
    stage_info: dict[str, Any] = field(default_factory=dict)
    reference: EvalResult | None = None  # the published evaluation defect, when asked for


def load_inputs(cfg: DictConfig, config: dict[str, Any], device: torch.device, progress: bool) -> RunInputs:
    """The sets (checked before any long work), the FP model, prompts and the calibration draw."""
    eval_set = dataset_from_config(config["data"])
    calib_set = dataset_from_config(config["calib"]["data"])
    preflight(config, eval_set, calib_set)  # bit widths and image files, before any long work
    model = build_model(config["model"]).to(device)
    eval_prompts = prompts_from_config(config["prompts"], eval_set, model, progress)
    calib_prompts = prompts_from_config(config["calib"]["prompts"], calib_set, model, progress)
    calib_items = select_calibration(calib_set, calib_prompts, int(cfg.calib.num_images), str(cfg.calib.strategy),
                                     int(cfg.calib.seed))  # every prompt: the prompt cap is reconstruction's
    if cfg.calib.exclude_from_eval:  # hold the calibration images out of evaluation (by file)
        used = {item.image.path for item in calib_items}
        eval_set = eval_set.subset(img.id for img in eval_set.images if img.path not in used)
    return RunInputs(model, eval_set, eval_prompts, calib_items)


def evaluate_fp(cfg: DictConfig, config: dict[str, Any], inputs: RunInputs, device: torch.device, progress: bool,
                workers: int) -> tuple[EvalResult, bool]:
    """The FP model's evaluation (from the FP cache when it holds it); returns (result, was cached)."""
    fp_key = fp_cache_key(config["model"], config["data"], config["prompts"], [i.id for i in inputs.eval_set.images],
                          device.type)
    cache_dir = Path(cfg.eval.fp_cache_dir) if cfg.eval.cache_fp else None
    fp, fp_cached = cached_evaluation(cache_dir, fp_key, lambda: evaluate(
        inputs.model, inputs.eval_set, inputs.eval_prompts, "eval fp", int(cfg.eval.prompt_batch), progress, workers))
    inputs.labelled = bool(inputs.eval_set.annotations)
    if not inputs.labelled:  # no labels: the FP masks are the ground truth (fidelity evaluation)
        inputs.eval_set, inputs.eval_prompts = pseudo_ground_truth(inputs.eval_set, inputs.eval_prompts, fp)
        fp.metrics.update(coco_mask_ap(inputs.eval_set.to_coco_dict(), detections(fp)),
                          mIoU=fidelity(fp.masks(), fp.masks()))
    return fp, fp_cached


def quantize_and_evaluate(cfg: DictConfig, config: dict[str, Any], inputs: RunInputs, fp: EvalResult, run_dir: Path,
                          logger: RunLogger, progress: bool, workers: int) -> QuantizedRun:
    """quantize_ -> the recipe's stages -> harden -> the deployability check -> evaluation (and the
    reference protocol's, when asked for). A recipe that does not quantize reports the FP result."""
    if not cfg.ptq.quantize:
        return QuantizedRun(fp)
    model = inputs.model
    layout = quantize_(model, rules_for_model(model, config["quant"], config["ptq"]))
    if cfg.runtime.get("compile"):
        use_fused_kernels_(model)  # compiled fake quantization: the same values, fewer passes
    recon_items = cap_prompts(inputs.calib_items, cfg.calib.max_prompts_per_image, int(cfg.calib.seed))
    stage_info = run_stages(StageContext(model, inputs.calib_items, recon_items, config, run_dir, logger, progress))
    harden_weights_(model)
    set_quant_mode(model, QuantMode.QUANTIZE)
    model.eval()
    refuse_undeployable(model, run_dir, config, fp)  # no number is reported for a model not really quantized
    batch = int(cfg.eval.prompt_batch)
    result = evaluate(model, inputs.eval_set, inputs.eval_prompts, "eval quantized", batch, progress, workers)
    reference = None
    if cfg.eval.reference_protocol:
        with reference_protocol(model, float(cfg.eval.reference_drop_prob)):
            reference = evaluate(model, inputs.eval_set, inputs.eval_prompts, "eval reference protocol", batch,
                                 progress, workers)
        add_fidelity(reference, fp)
        assert_deployable(model)  # the switch is undone before saving
    return QuantizedRun(result, layout, stage_info, reference)


def run_metrics(cfg: DictConfig, inputs: RunInputs, fp: EvalResult, fp_cached: bool, quantized: QuantizedRun,
                start: float) -> dict[str, Any]:
    """metrics.json: both evaluations, the deployability check of the state to be saved, costs."""
    model, eval_set, result = inputs.model, inputs.eval_set, quantized.result
    num_checked, problems = deployment_check(model, require_quantizers=bool(cfg.ptq.quantize))  # the saved state
    metrics = {
        "recipe": str(cfg.ptq.name),
        "quant": str(cfg.quant.name) if cfg.ptq.quantize else "fp32",
        "model": str(cfg.model.name),
        "fp": _metric_block(fp.metrics),
        "quantized": {**_metric_block(result.metrics), "fidelity_mIoU": result.metrics["fidelity_mIoU"]},
        "deployable": not problems,
        "deployment_problems": problems,
        "quantizers_checked": num_checked,
        "wall_time_s": time.perf_counter() - start,
        "fp_from_cache": fp_cached,
        "ground_truth": "labels" if inputs.labelled else "fp_masks",
        "per_set": {"fp": per_set_metrics(eval_set, fp), "quantized": per_set_metrics(eval_set, result)},
        "eval_images": len(eval_set.images),
        "eval_annotations_left_out": eval_set.orphan_annotations,  # their image_id names no listed image
        "eval_prompts": result.metrics["num_prompts"],
        "calibration": {"images": [str(i.image.path.name) for i in inputs.calib_items]},
        "stages": quantized.stage_info,
        "num_quantized_modules": len(quantized.layout),
        "timing": {"fp": fp.timing, "quantized": result.timing},
        "checkpoint": None,  # set once quantized.pt is written
    }
    if quantized.reference is not None:
        metrics["reference_protocol"] = {**_metric_block(quantized.reference.metrics),
                                         "fidelity_mIoU": quantized.reference.metrics["fidelity_mIoU"],
                                         "note": "published evaluation defect: QDrop left on Linear inputs"}
    for block in ("fp", "quantized"):
        check_metric_ranges(metrics[block], block)
    return metrics


def write_results(cfg: DictConfig, config: dict[str, Any], run_dir: Path, inputs: RunInputs, fp: EvalResult,
                  quantized: QuantizedRun, metrics: dict[str, Any]) -> None:
    """The small files first: a full disk while the checkpoint is written still keeps the numbers."""
    save_predictions(run_dir, inputs.eval_set, fp, quantized.result, inputs.calib_items)
    write_json(run_dir / "metrics.json", metrics)
    if cfg.eval.save_checkpoint:
        metrics["checkpoint"] = str(save_quantized(run_dir / "quantized.pt", inputs.model.cpu(), quantized.layout,
                                                   config))
        write_json(run_dir / "metrics.json", metrics)


def run_ptq(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict[str, Any]:
    """Run the recipe of ``cfg``; returns the metrics written to ``run_dir/metrics.json``."""
    start = time.perf_counter()
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.manual_seed(int(cfg.seed))
    apply_cpu_runtime(cfg.runtime)
    device = resolve_device(str(cfg.runtime.device))
    progress, workers = bool(cfg.runtime.progress), int(cfg.eval.num_workers)

    inputs = load_inputs(cfg, config, device, progress)
    fp, fp_cached = evaluate_fp(cfg, config, inputs, device, progress, workers)
    logger.log_metrics({f"eval/fp/{k}": v for k, v in fp.metrics.items()})
    quantized = quantize_and_evaluate(cfg, config, inputs, fp, run_dir, logger, progress, workers)
    add_fidelity(quantized.result, fp)
    logger.log_metrics({f"eval/quantized/{k}": v for k, v in quantized.result.metrics.items()})

    config["calib"]["selected"] = [str(item.image.path) for item in inputs.calib_items]  # saq.eval rebuilds the split
    if cfg.eval.side_by_side and cfg.ptq.quantize:
        path = save_examples(run_dir / "side_by_side.png", inputs.eval_set, fp, quantized.result,
                             f"{cfg.quant.name} {cfg.ptq.name}", int(cfg.eval.side_by_side))
        logger.log_image("eval/side_by_side", path)
    metrics = run_metrics(cfg, inputs, fp, fp_cached, quantized, start)
    write_results(cfg, config, run_dir, inputs, fp, quantized, metrics)
    logger.log_table("results", result_rows(metrics))
    logger.log_summary({"fp/mask_AP": metrics["fp"]["mask_AP"], "quantized/mask_AP": metrics["quantized"]["mask_AP"],
                        "quantized/mIoU": metrics["quantized"]["mIoU"], "wall_time_s": metrics["wall_time_s"]})
    return metrics

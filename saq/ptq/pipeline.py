"""One PTQ run: FP model -> quantize_ -> stages -> harden -> assert_deployable -> evaluate -> save.

Every input is explicit: the resolved config and the run directory. Nothing is global.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from saq.data import select_calibration
from saq.data.calibration import cap_prompts
from saq.data.sources import dataset_from_config, prompts_from_config
from saq.eval import EvalResult, add_fidelity, evaluate, per_set_metrics
from saq.eval.evaluate import detections, save_examples
from saq.eval.metrics import coco_mask_ap, fidelity
from saq.eval.pseudo_gt import pseudo_ground_truth
from saq.eval.cache import cached_evaluation, fp_cache_key
from saq.export import save_quantized
from saq.models import build_model
from saq.nn import QuantLinear, assert_deployable, harden_weights_, quantize_
from saq.nn.deploy import deployment_check
from saq.ptq.preflight import preflight
from saq.ptq.recipe import rules_from_config
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


def run_ptq(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict[str, Any]:
    """Run the recipe of ``cfg``; returns the metrics written to ``run_dir/metrics.json``."""
    start = time.perf_counter()
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.manual_seed(int(cfg.seed))
    apply_cpu_runtime(cfg.runtime)
    device = resolve_device(str(cfg.runtime.device))
    progress = bool(cfg.runtime.progress)
    workers = int(cfg.eval.num_workers)

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

    fp_key = fp_cache_key(config["model"], config["data"], config["prompts"], [i.id for i in eval_set.images],
                          device.type)
    cache_dir = Path(cfg.eval.fp_cache_dir) if cfg.eval.cache_fp else None
    fp, fp_cached = cached_evaluation(cache_dir, fp_key, lambda: evaluate(
        model, eval_set, eval_prompts, "eval fp", int(cfg.eval.prompt_batch), progress, workers))
    labelled = bool(eval_set.annotations)
    if not labelled:  # no labels: the FP masks are the ground truth (fidelity evaluation)
        eval_set, eval_prompts = pseudo_ground_truth(eval_set, eval_prompts, fp)
        fp.metrics.update(coco_mask_ap(eval_set.to_coco_dict(), detections(fp)),
                          mIoU=fidelity(fp.masks(), fp.masks()))
    logger.log_metrics({f"eval/fp/{k}": v for k, v in fp.metrics.items()})

    recipe = str(cfg.ptq.name)
    layout: dict[str, Any] = {}
    stage_info: dict[str, Any] = {}
    reference = None
    if cfg.ptq.quantize:
        layout = quantize_(model, rules_from_config(config["quant"], config["ptq"]))
        if cfg.runtime.get("compile"):
            use_fused_kernels_(model)  # compiled fake quantization: the same values, fewer passes
        recon_items = cap_prompts(calib_items, cfg.calib.max_prompts_per_image, int(cfg.calib.seed))
        stage_info = run_stages(StageContext(model, calib_items, recon_items, config, run_dir, logger, progress))
        harden_weights_(model)
        set_quant_mode(model, QuantMode.QUANTIZE)
        model.eval()
        refuse_undeployable(model, run_dir, config, fp)  # no number is reported for a model not really quantized
        quantized = evaluate(model, eval_set, eval_prompts, "eval quantized", int(cfg.eval.prompt_batch), progress, workers)
        if cfg.eval.reference_protocol:
            with reference_protocol(model, float(cfg.eval.reference_drop_prob)):
                reference = evaluate(model, eval_set, eval_prompts, "eval reference protocol",
                                     int(cfg.eval.prompt_batch), progress, workers)
            add_fidelity(reference, fp)
            assert_deployable(model)  # the switch is undone before saving
    else:
        quantized = fp
    add_fidelity(quantized, fp)
    logger.log_metrics({f"eval/quantized/{k}": v for k, v in quantized.metrics.items()})

    config["calib"]["selected"] = [str(item.image.path) for item in calib_items]  # lets saq.eval rebuild the split
    if cfg.eval.side_by_side and cfg.ptq.quantize:
        path = save_examples(run_dir / "side_by_side.png", eval_set, fp, quantized, f"{cfg.quant.name} {recipe}",
                             int(cfg.eval.side_by_side))
        logger.log_image("eval/side_by_side", path)
    num_checked, problems = deployment_check(model, require_quantizers=bool(cfg.ptq.quantize))  # the saved state
    metrics = {
        "recipe": recipe,
        "quant": str(cfg.quant.name) if cfg.ptq.quantize else "fp32",
        "model": str(cfg.model.name),
        "fp": _metric_block(fp.metrics),
        "quantized": {**_metric_block(quantized.metrics), "fidelity_mIoU": quantized.metrics["fidelity_mIoU"]},
        "deployable": not problems,
        "deployment_problems": problems,
        "quantizers_checked": num_checked,
        "wall_time_s": time.perf_counter() - start,
        "fp_from_cache": fp_cached,
        "ground_truth": "labels" if labelled else "fp_masks",
        "per_set": {"fp": per_set_metrics(eval_set, fp), "quantized": per_set_metrics(eval_set, quantized)},
        "eval_images": len(eval_set.images),
        "eval_annotations_left_out": eval_set.orphan_annotations,  # their image_id names no listed image
        "eval_prompts": quantized.metrics["num_prompts"],
        "calibration": {"images": [str(i.image.path.name) for i in calib_items]},
        "stages": stage_info,
        "num_quantized_modules": len(layout),
        "timing": {"fp": fp.timing, "quantized": quantized.timing},
        "checkpoint": None,  # set once quantized.pt is written
    }
    if reference is not None:
        metrics["reference_protocol"] = {**_metric_block(reference.metrics),
                                         "fidelity_mIoU": reference.metrics["fidelity_mIoU"],
                                         "note": "published evaluation defect: QDrop left on Linear inputs"}
    from saq.eval.metrics import check_metric_ranges
    from saq.eval.predictions import save_predictions  # per-image results for paired comparisons

    for block in ("fp", "quantized"):
        check_metric_ranges(metrics[block], block)

    # The small files first: a full disk while the checkpoint is written still keeps the numbers.
    save_predictions(run_dir, eval_set, fp, quantized, calib_items)
    write_json(run_dir / "metrics.json", metrics)
    if cfg.eval.save_checkpoint:
        metrics["checkpoint"] = str(save_quantized(run_dir / "quantized.pt", model.cpu(), layout, config))
        write_json(run_dir / "metrics.json", metrics)
    rows = result_rows(metrics)
    logger.log_table("results", rows)
    logger.log_summary({"fp/mask_AP": metrics["fp"]["mask_AP"], "quantized/mask_AP": metrics["quantized"]["mask_AP"],
                        "quantized/mIoU": metrics["quantized"]["mIoU"], "wall_time_s": metrics["wall_time_s"]})
    return metrics

"""``python -m saq.eval ckpt_path=...``: evaluate a saved quantized checkpoint."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from saq.cli.task import (config_dir, device_or_exit, end_at_once_when_interrupted, expand_resume, job_of_a_sweep,
                          register_resolvers, run_task)
from saq.utils.cpu_runtime import apply_cpu_runtime
from saq.utils.loggers import RunLogger

register_resolvers()


def _labels_or_fp_masks(cfg: DictConfig, trained: dict[str, Any], data_cfg: dict[str, Any],
                        prompts_cfg: dict[str, Any], device: Any):
    """The evaluation set and prompts exactly as ``saq.ptq`` built them: the same images (calibration
    split held out), prompts (``auto``: from the FP model) and, without labels, the FP masks as ground
    truth (the FP evaluation comes from the run's FP cache entry when it is still there)."""
    from saq.data import verify_images
    from saq.data.sources import prompts_from_config, run_evaluation_dataset
    from saq.eval import evaluate
    from saq.eval.cache import cached_evaluation, fp_cache_key
    from saq.eval.pseudo_gt import pseudo_ground_truth
    from saq.models import build_model

    progress = bool(cfg.runtime.progress)
    dataset = run_evaluation_dataset(trained, data_cfg if cfg.get("data") else None)
    verify_images(dataset, "data.images")
    labelled = bool(dataset.annotations)
    fp_model = None if labelled and prompts_cfg["source"] != "auto" else build_model(trained["model"]).to(device)
    prompts = prompts_from_config(prompts_cfg, dataset, fp_model, progress)
    if labelled:
        return dataset, prompts, None
    key = fp_cache_key(trained["model"], data_cfg, prompts_cfg, [i.id for i in dataset.images], device.type)
    cache_dir = Path(cfg.eval.fp_cache_dir) if cfg.eval.cache_fp else None
    fp, _ = cached_evaluation(cache_dir, key, lambda: evaluate(fp_model, dataset, prompts, "eval fp",
                                                               int(cfg.eval.prompt_batch), progress,
                                                               int(cfg.eval.num_workers)))
    dataset, prompts = pseudo_ground_truth(dataset, prompts, fp)
    return dataset, prompts, fp


def _shard(dataset, prompts, fp, shard: int, num_shards: int):
    """Images shard, shard + num_shards, ... of the evaluation set, their prompts and FP records."""
    from saq.eval.evaluate import EvalResult
    from saq.eval.shards import shard_images

    ids = [img.id for img in shard_images(dataset.images, shard, num_shards)]
    keep = set(ids)
    if fp is not None:
        fp = EvalResult([r for r in fp.records if r["image_id"] in keep], {})
    return dataset.subset(ids), {i: prompts.get(i, []) for i in ids}, fp


def _fp_reference(cfg: DictConfig, trained: dict[str, Any], data_cfg: dict[str, Any], prompts_cfg: dict[str, Any],
                  dataset, prompts, device: Any):
    """The FP model's evaluation on these prompts (from the FP cache when it is there)."""
    from saq.eval import evaluate
    from saq.eval.cache import cached_evaluation, fp_cache_key
    from saq.models import build_model

    key = fp_cache_key(trained["model"], data_cfg, prompts_cfg, [i.id for i in dataset.images], device.type)
    cache_dir = Path(cfg.eval.fp_cache_dir) if cfg.eval.cache_fp else None
    fp, _ = cached_evaluation(cache_dir, key, lambda: evaluate(
        build_model(trained["model"]).to(device), dataset, prompts, "eval fp", int(cfg.eval.prompt_batch),
        bool(cfg.runtime.progress), int(cfg.eval.num_workers)))
    return fp


def _agreement_references(cfg: DictConfig, model, predictor, dataset, prompts, fake) -> dict[str, float]:
    """What the deployed-vs-fake-quant mask IoU is read against (saq.deploy.agreement): the fake-quant
    model against itself with a one-ulp input change, and the runtime's decoder on fake-quant embeddings."""
    from saq.deploy.agreement import FakeQuantEmbeddings, one_ulp_input
    from saq.eval import evaluate, evaluate_runtime
    from saq.eval.metrics import fidelity

    batch, progress, workers = int(cfg.eval.prompt_batch), bool(cfg.runtime.progress), int(cfg.eval.num_workers)
    with one_ulp_input(model):
        moved = evaluate(model, dataset, prompts, "eval fake-quant, input one ulp up", batch, progress, workers)
    decoder = evaluate_runtime(FakeQuantEmbeddings(predictor, model), dataset, prompts,
                               "eval runtime decoder on fake-quant embeddings", batch, progress, workers)
    return {"fake_quant_float_order_mIoU": fidelity(fake.masks(), moved.masks()),
            "deployed_decoder_vs_fake_quant_mIoU": fidelity(fake.masks(), decoder.masks())}


def run_eval_deployed(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict[str, Any]:
    """``eval.backend=onnxruntime|openvino``: the exported files of ``ckpt_path`` (an export dir) on that
    runtime, on the data and prompts of the run that wrote the checkpoint; IoU against the FP masks, and
    (``eval.compare_fake_quant``) against the fake-quantized PyTorch model of the same checkpoint, with the
    two references that agreement is read against (:func:`_agreement_references`)."""
    import torch

    from saq.deploy import Predictor
    from saq.eval import add_fidelity, evaluate, evaluate_runtime, per_set_metrics
    from saq.eval.metrics import fidelity
    from saq.export import load_quantized
    from saq.export.onnx import read_manifest
    from saq.ptq.pipeline import METRIC_KEYS
    from saq.utils.run_files import format_table, write_json

    start = time.perf_counter()
    apply_cpu_runtime(cfg.runtime)  # the torch parts (the FP reference); the runtime gets the threads below
    backend, precision = str(cfg.eval.backend), str(cfg.eval.runtime_precision)
    manifest = read_manifest(cfg.ckpt_path)
    trained = manifest["run_config"]
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True, enum_to_str=True) if cfg.get("data") else trained["data"]
    prompts_cfg = OmegaConf.to_container(cfg.prompts, resolve=True, enum_to_str=True) if cfg.get("prompts") else trained["prompts"]
    threads = cfg.runtime.num_threads
    predictor = Predictor(cfg.ckpt_path, backend, num_threads=int(threads) if threads else None, precision=precision)
    device = torch.device("cpu")
    dataset, prompts, fp = _labels_or_fp_masks(cfg, trained, data_cfg, prompts_cfg, device)
    result = evaluate_runtime(predictor, dataset, prompts, f"eval {backend}", int(cfg.eval.prompt_batch),
                              bool(cfg.runtime.progress), int(cfg.eval.num_workers))
    deployed = {k: float(result.metrics[k]) for k in METRIC_KEYS}
    add_fidelity(result, fp if fp is not None else _fp_reference(cfg, trained, data_cfg, prompts_cfg, dataset, prompts, device))
    deployed["fidelity_mIoU"] = result.metrics["fidelity_mIoU"]
    metrics = {"checkpoint": str(cfg.ckpt_path), "backend": backend, "runtime_precision": precision,
               "export_format": manifest["export_format"], "recipe": manifest["recipe"], "model": manifest["model"],
               "quant": manifest["quant"], "quantized": deployed, "per_set": per_set_metrics(dataset, result),
               "ground_truth": "labels" if fp is None else "fp_masks",
               "export": {"files": manifest["files"], "quantization_points": manifest["quantization_points_summary"],
                          "kept_fp": [p["name"] for p in manifest["quantization_points"] if p["exported_as"] == "fp"]},
               "wall_time_s": time.perf_counter() - start, "timing": result.timing,
               # False: this CPU's int8 kernels may saturate on this export (the numbers are the runtime's, not the model's)
               "int8_exact_on_this_cpu": predictor.int8_warning is None}
    if predictor.int8_warning:
        metrics["int8_warning"] = predictor.int8_warning
    if predictor.precision_warning:
        metrics["precision_warning"] = predictor.precision_warning
    if cfg.eval.compare_fake_quant and manifest["export_format"] == "onnx":
        model, _ = load_quantized(manifest["checkpoint"])
        fake = evaluate(model, dataset, prompts, "eval fake-quant", int(cfg.eval.prompt_batch),
                        bool(cfg.runtime.progress), int(cfg.eval.num_workers))
        metrics["fake_quant"] = {k: float(fake.metrics[k]) for k in METRIC_KEYS}
        metrics["deployed_vs_fake_quant_mIoU"] = fidelity(fake.masks(), result.masks())
        metrics["mask_AP_deployed_minus_fake_quant"] = deployed["mask_AP"] - metrics["fake_quant"]["mask_AP"]
        metrics.update(_agreement_references(cfg, model, predictor, dataset, prompts, fake))
    write_json(run_dir / "metrics.json", metrics)
    logger.log_metrics({f"eval/{k}": v for k, v in metrics["quantized"].items()})
    print("\n" + format_table([{**metrics, **metrics["quantized"]}]))
    if "fake_quant" in metrics:
        print(f"fake-quant mask AP {metrics['fake_quant']['mask_AP']:.2f}, deployed {deployed['mask_AP']:.2f}; "
              f"mask IoU deployed vs fake-quant {metrics['deployed_vs_fake_quant_mIoU']:.4f} (float order alone: "
              f"{metrics['fake_quant_float_order_mIoU']:.4f}; the runtime's decoder on fake-quant embeddings: "
              f"{metrics['deployed_decoder_vs_fake_quant_mIoU']:.4f})")
    if predictor.int8_warning:
        print(f"warning: {predictor.int8_warning}")
    if predictor.precision_warning:
        print(f"warning: {predictor.precision_warning}")
    print(f"\nmetrics: {run_dir / 'metrics.json'}")
    return metrics


def run_eval(cfg: DictConfig, run_dir: Path, logger: RunLogger) -> dict[str, Any]:
    if str(cfg.eval.get("backend", "torch")) != "torch":
        return run_eval_deployed(cfg, run_dir, logger)
    from saq.eval import add_fidelity, evaluate, per_set_metrics
    from saq.export import load_quantized
    from saq.nn.deploy import assert_deployable, deployment_check
    from saq.ptq.pipeline import METRIC_KEYS, resolve_device
    from saq.utils.run_files import format_table, write_json

    from saq.config.validate import validate_shard

    start = time.perf_counter()
    apply_cpu_runtime(cfg.runtime)
    num_shards, shard = cfg.eval.get("num_shards", 1), cfg.eval.get("shard", 0)
    validate_shard(num_shards, shard)  # before the checkpoint is read
    model, payload = load_quantized(cfg.ckpt_path)
    trained = payload["config"]
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True, enum_to_str=True) if cfg.get("data") else trained["data"]
    prompts_cfg = OmegaConf.to_container(cfg.prompts, resolve=True, enum_to_str=True) if cfg.get("prompts") else trained["prompts"]
    checked, problems = deployment_check(model, require_quantizers=bool(payload["layout"]))
    assert_deployable(model, require_quantizers=bool(payload["layout"]))  # refuses: no numbers for such a model
    device = resolve_device(str(cfg.runtime.device))
    model = model.to(device)
    if cfg.runtime.get("compile"):
        from saq.quant.fused import use_fused_kernels_

        use_fused_kernels_(model)  # compiled fake quantization: the same values, fewer passes
    dataset, prompts, fp = _labels_or_fp_masks(cfg, trained, data_cfg, prompts_cfg, device)
    set_image_ids = [img.id for img in dataset.images]
    if num_shards > 1:
        dataset, prompts, fp = _shard(dataset, prompts, fp, shard, num_shards)
    result = evaluate(model, dataset, prompts, "eval", int(cfg.eval.prompt_batch), bool(cfg.runtime.progress),
                      int(cfg.eval.num_workers))
    quantized = {k: float(result.metrics[k]) for k in METRIC_KEYS}
    if fp is not None:
        add_fidelity(result, fp)
        quantized["fidelity_mIoU"] = result.metrics["fidelity_mIoU"]
    recipe = trained["ptq"]["name"]
    metrics = {"checkpoint": str(cfg.ckpt_path), "recipe": recipe, "model": trained["model"]["name"],
               "quant": trained["quant"]["name"] if trained["ptq"]["quantize"] else "fp32",
               "quantized": quantized, "per_set": per_set_metrics(dataset, result),
               "ground_truth": "labels" if fp is None else "fp_masks",
               "deployable": not problems, "deployment_problems": problems, "quantizers_checked": checked,
               "wall_time_s": time.perf_counter() - start, "timing": result.timing}
    if num_shards > 1:
        from saq.eval.shards import save_shard

        metrics["shard"] = {"index": shard, "of": num_shards, "note": "one shard only: merge all shards with "
                             "python -m saq.eval.merge OUT_DIR SHARD_RUN_DIR..."}
        from saq.utils.hashing import file_hexdigest, json_hexdigest

        # What the merge checks the shards agree on: the same weights, data, prompts and image set.
        header = {k: metrics[k] for k in ("recipe", "model", "quant", "ground_truth")}
        header.update(checkpoint_sha256=file_hexdigest(Path(cfg.ckpt_path)), set_image_ids=set_image_ids,
                      inputs_sha256=json_hexdigest({"data": data_cfg, "prompts": prompts_cfg}))
        save_shard(run_dir, shard, num_shards, str(cfg.ckpt_path), dataset.to_coco_dict(), result, fp, header)
    write_json(run_dir / "metrics.json", metrics)
    logger.log_metrics({f"eval/{k}": v for k, v in metrics["quantized"].items()})
    print("\n" + format_table([{**metrics, **metrics["quantized"]}]))
    print(f"\nmetrics: {run_dir / 'metrics.json'}")
    return metrics


def _inputs_or_exit(cfg: DictConfig) -> None:
    """One line (no traceback, no run dir) for a backend that is not installed or a ckpt_path of the wrong kind."""
    backend = str(cfg.eval.get("backend", "torch"))
    if backend == "torch":
        if Path(cfg.ckpt_path).is_dir():
            raise SystemExit(f"config error: ckpt_path={cfg.ckpt_path} is a directory; the PyTorch backend evaluates "
                             "a quantized.pt (an export dir needs eval.backend=onnxruntime or openvino)")
        return
    from saq.deploy.runtime import MissingBackendError, require_backend
    from saq.export.onnx import read_manifest
    from saq.export.qdq import ExportError

    try:
        require_backend(backend)
        read_manifest(cfg.ckpt_path)
    except (MissingBackendError, ExportError, ValueError) as exc:
        raise SystemExit(f"config error: {exc}") from None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _main(cfg: DictConfig) -> float:
    def body() -> float:
        device_or_exit(cfg)  # before the run dir is claimed or the checkpoint is read
        _inputs_or_exit(cfg)
        metrics = run_task(cfg, Path(HydraConfig.get().runtime.output_dir), run_eval,
                           f"eval-{Path(cfg.ckpt_path).parent.name}")
        return metrics["quantized"]["mask_AP"]

    return job_of_a_sweep(body)()


def main() -> None:
    """``python -m saq.eval``; ``resume=<run dir>`` reruns an interrupted evaluation in its own dir."""
    sys.argv = expand_resume(sys.argv)
    end_at_once_when_interrupted(_main)


if __name__ == "__main__":
    main()

"""The stages a recipe lists (``ptq.stages``), one function each, in one typed registry.

Reference order (docs/method.md sections 3-5): bimodal fold -> PCC -> observers of everything else ->
reconstruction. PCC after the observers also runs (its searched points then start from their
calibrated range): the order is the recipe's.

A resumed run whose reconstruction had begun does not run the stages before it again: the per-unit
checkpoint holds the whole model state they produced (folded weights, ranges, PCC's clipping), and
``stages.json`` what they reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from saq.config.schema import Stage
from saq.data.calibration import CalibrationItem
from saq.ptq.image_source import ImageSource
from saq.utils.loggers import RunLogger
from saq.utils.run_files import write_json

if TYPE_CHECKING:
    from saq.ptq.capture import KeptInputs

STAGES_FILE = "stages.json"  # the stages finished so far, with what each reported and its wall time

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    model: nn.Module
    calib_items: list[CalibrationItem]  # every prompt of each image: BIG, PCC and the observers
    recon_items: list[CalibrationItem]  # at most calib.max_prompts_per_image prompts each: reconstruction
    config: dict[str, Any]
    run_dir: Path
    logger: RunLogger
    progress: bool
    done: list[Stage] = field(default_factory=list)
    images: ImageSource | None = None  # shared by the stages: each image decoded once, FP-encoded once
    # FP encoder inputs that reconstruction reads, kept from calibration's FP passes (one encoder pass
    # over the calibration set less); handed over when reconstruction starts
    kept_inputs: KeptInputs | None = None

    def __post_init__(self) -> None:
        if self.images is None:
            self.images = ImageSource(self.model)


def bimodal_stage(ctx: StageContext) -> Any:
    from saq.ptq.bimodal import bimodal_fold_

    return bimodal_fold_(ctx.model, ctx.calib_items[0], images=ctx.images)


def pcc_stage(ctx: StageContext) -> Any:
    from saq.ptq.pcc import DEFAULT_PERCENTILES, pcc_search_
    from saq.ptq.pcc_plots import save_pcc_plots

    pcc_cfg = ctx.config["ptq"]["pcc"]
    result = pcc_search_(ctx.model, ctx.calib_items[: int(pcc_cfg["num_images"])], theta=float(pcc_cfg["theta"]),
                         percentiles=tuple(pcc_cfg.get("percentiles") or DEFAULT_PERCENTILES),
                         passes=int(pcc_cfg["passes"]), show_progress=ctx.progress, images=ctx.images,
                         precision=ctx.config["runtime"]["precision"])  # as the reconstruction Trainer
    ctx.logger.log_table("pcc/records", result.table_rows())
    write_json(ctx.run_dir / "pcc" / "search.json", result.to_json())
    for path in save_pcc_plots(result, ctx.run_dir / "pcc"):
        ctx.logger.log_image(f"pcc/{path.stem}", path)
    return {"records": len(result.records), "dir": str(ctx.run_dir / "pcc")}


def _first(items: list[CalibrationItem], count: int | None) -> list[CalibrationItem]:
    """The first ``count`` items (a ``num_images`` setting; null: all)."""
    return items[: int(count)] if count else items


def reparam_stage(ctx: StageContext) -> Any:
    from saq.ptq.reparam import reparam_

    cfg = ctx.config["ptq"]["reparam"]
    return reparam_(ctx.model, _first(ctx.calib_items, cfg.get("num_images")), strength=float(cfg["strength"]),
                    shift=bool(cfg["shift"]), images=ctx.images,
                    attention=bool(cfg.get("attention", False)), values=bool(cfg.get("values", False)))


def compensate_stage(ctx: StageContext) -> Any:
    from saq.ptq.compensate import compensate_

    cfg = ctx.config["ptq"]["compensate"]
    # recon_items: at most calib.max_prompts_per_image boxes per image
    return compensate_(ctx.model, _first(ctx.recon_items, cfg.get("num_images")), ridge=float(cfg["ridge"]),
                       gptq=bool(cfg["gptq"]),
                       parts=tuple(str(p) for p in cfg["parts"]), images=ctx.images, show_progress=ctx.progress,
                       refit=bool(cfg.get("refit", False)), inputs=str(cfg.get("inputs", "own")))


def calibrate_stage(ctx: StageContext) -> Any:
    from saq.ptq.calibrate import calibrate_

    # ranges PCC already chose are kept; every other quantizer gets its observer's range
    cache_dir = ctx.config["calib"].get("weight_range_cache")
    ctx.kept_inputs = _inputs_reconstruction_reads(ctx)
    return calibrate_(ctx.model, ctx.calib_items, ctx.progress, keep_calibrated=Stage.pcc in ctx.done,
                      images=ctx.images, weight_range_cache=Path(cache_dir) if cache_dir else None,
                      kept_inputs=ctx.kept_inputs)


def _inputs_reconstruction_reads(ctx: StageContext) -> KeptInputs | None:
    """What calibration should keep for the reconstruction right after it: the FP inputs of the encoder
    units it trains, cached as it caches them; None when no reconstruction follows it directly (a stage
    between them could change what the FP encoder computes)."""
    stages = [Stage(name) for name in ctx.config["ptq"]["stages"]]
    if Stage.reconstruct not in stages or stages.index(Stage.reconstruct) != stages.index(Stage.calibrate) + 1:
        return None
    # Imported here: the reconstruction engine loads Lightning (seconds), which recipes without it skip.
    from saq.engine.reconstruction import recon_settings
    from saq.ptq.capture import KeptInputs
    from saq.ptq.reconstruct import cache_placement, encoder_fp_entries, planned_units, training_units

    cfg = ctx.config["ptq"]["recon"]
    entries = encoder_fp_entries(training_units(planned_units(ctx.model, cfg), recon_settings(cfg)))
    if not entries:
        return None
    return KeptInputs(entries, *cache_placement(cfg))


def reconstruct_stage(ctx: StageContext) -> Any:
    from saq.eval.plots import plot_recon_curves
    from saq.ptq.reconstruct import reconstruct_

    kept, ctx.kept_inputs = ctx.kept_inputs, None  # reconstruction owns them now (and frees them)
    units = reconstruct_(ctx.model, ctx.recon_items, ctx.config["ptq"]["recon"], ctx.run_dir, ctx.logger,
                         int(ctx.config["seed"]), ctx.progress, precision=ctx.config["runtime"]["precision"],
                         images=ctx.images, fingerprint=_fingerprint(ctx.config, with_recon=True), kept=kept)
    ctx.logger.log_image("recon/curves", plot_recon_curves(units, ctx.run_dir / "recon_curves.png"))
    return [{k: v for k, v in u.items() if k != "curve"} for u in units]


STAGES: dict[Stage, Callable[[StageContext], Any]] = {
    Stage.bimodal: bimodal_stage,
    Stage.reparam: reparam_stage,
    Stage.pcc: pcc_stage,
    Stage.calibrate: calibrate_stage,
    Stage.reconstruct: reconstruct_stage,
    Stage.compensate: compensate_stage,
}


def _fingerprint(config: dict[str, Any], with_recon: bool = False) -> str:
    """What the stages before reconstruction depend on: model, quantization, calibration set, the recipe
    but for its reconstruction settings (``with_recon``: with them), the seed and the engine's precision
    (PCC's forwards). A record or checkpoint made under other settings is not reused."""
    def without(section: dict[str, Any], *where: str) -> dict[str, Any]:  # keys that say where, not what
        return {k: v for k, v in section.items() if k not in where}

    ptq = without(config["ptq"], "recon")
    if with_recon and "recon" in config["ptq"]:
        ptq["recon"] = without(config["ptq"]["recon"], "cache_device")
    relevant = {"model": without(config["model"], "cache_dir"), "quant": config["quant"],
                "calib": without(config["calib"], "weight_range_cache"), "seed": config["seed"],
                "precision": config.get("runtime", {}).get("precision"), "ptq": ptq}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resume_before_reconstruction(ctx: StageContext, stages: list[Stage]) -> dict[str, Any] | None:
    """What the stages before reconstruction reported, with their model state loaded, when this run dir
    holds a reconstruction checkpoint made after them; None when they have to run."""
    if Stage.reconstruct not in stages:
        return None
    from saq.ptq.reconstruct import ReconState

    if ReconState.exists(ctx.run_dir):  # refuse another run's checkpoint now, not after the stages
        ReconState(ctx.run_dir, [], _fingerprint(ctx.config, with_recon=True)).check_fingerprint(
            ReconState.stored_fingerprint(ctx.run_dir))
    before = [s.value for s in stages[: stages.index(Stage.reconstruct)]]
    record_path = ctx.run_dir / STAGES_FILE
    if not (record_path.is_file() and ReconState.exists(ctx.run_dir)):
        return None
    record = json.loads(record_path.read_text())
    if record.get("done", [])[: len(before)] != before or record.get("fingerprint") != _fingerprint(ctx.config):
        log.info("%s was written under other settings: the stages run again", record_path)
        return None
    ReconState.load_model_state(ctx.run_dir, ctx.model)
    log.info("resuming after %s: their state comes from the reconstruction checkpoint", ", ".join(before) or "no stage")
    return {"done": before, "info": {k: record["info"][k] for k in before},
            "seconds": {k: record["seconds"][k] for k in before}}


def run_stages(ctx: StageContext) -> dict[str, Any]:
    """The recipe's stages in its order; returns what each reported, by stage name."""
    stages = [Stage(name) for name in ctx.config["ptq"]["stages"]]
    record = _resume_before_reconstruction(ctx, stages) or {"done": [], "info": {}, "seconds": {}}
    info: dict[str, Any] = dict(record["info"])
    seconds: dict[str, float] = dict(record["seconds"])
    ctx.done.extend(Stage(name) for name in record["done"])
    for stage in stages:
        if stage in ctx.done:
            continue
        start = time.perf_counter()
        info[stage.value] = STAGES[stage](ctx)
        seconds[stage.value] = round(time.perf_counter() - start, 3)
        ctx.done.append(stage)
        write_json(ctx.run_dir / STAGES_FILE, {"done": [s.value for s in ctx.done], "info": info, "seconds": seconds,
                                               "fingerprint": _fingerprint(ctx.config)})
    info["seconds"] = seconds  # wall time of each stage (a resumed run: the process that ran it)
    info["image_source"] = {"images_decoded": ctx.images.decoded, "fp_encoder_passes": ctx.images.fp_encoded}
    ctx.images.forget_embeddings()  # hardening follows: FP embeddings would no longer be the FP model's
    return info

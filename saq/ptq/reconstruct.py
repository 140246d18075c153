"""Reconstruction stage: the units in order, each trained by its own Lightning Trainer
(saq.engine), checkpointed when final, resumed after a kill.

This module prepares what a unit learns from (cached quantized and FP inputs, FP targets, the PAR head)
and chains the units; the loop itself (device placement of batches, precision, optimiser and scheduler
steps, logging, the per-unit checkpoint) belongs to the Trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from saq.data.calibration import CalibrationItem
from saq.config.schema import CacheDtype, EncoderLoss
from saq.engine.callbacks import LossWindows, UnitCheckpoint
from saq.engine.reconstruction import ReconSettings, UnitBatches, UnitReconstruction, unit_quantizers
from saq.engine.trainer import fit_quietly, unit_trainer
from saq.models.units import ReconUnit, reconstruction_units
from saq.models.image_source import ImageSource
from saq.ptq.capture import _detach, capture_inputs, encode_items, to_device
from saq.quant.quantizer import QuantMode, quant_mode, set_quant_mode
from saq.utils.loggers import RunLogger
from saq.utils.run_files import atomic_file

STATE_FILE = "recon_state.pt"
CACHE_DTYPES = {CacheDtype.float32: None, CacheDtype.float16: torch.float16, CacheDtype.bfloat16: torch.bfloat16}

log = logging.getLogger(__name__)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


class ReconState:
    """Per-unit checkpoint in the run dir: model state after the last finished unit."""

    def __init__(self, run_dir: Path, unit_names: list[str]) -> None:
        self.path = Path(run_dir) / STATE_FILE
        self.unit_names = unit_names

    def load(self, model: nn.Module) -> dict[str, Any]:
        if not self.path.is_file():
            return {"done": [], "global_step": 0, "units": []}
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["unit_names"] != self.unit_names:
            raise RuntimeError(f"{self.path} belongs to another unit list; delete it to start over")
        model.load_state_dict(state["model"], strict=True)
        log.info("resuming reconstruction after %d finished units (%s)", len(state["done"]), self.path)
        return state

    def save(self, model: nn.Module, done: list[str], global_step: int, units: list[dict]) -> None:
        with atomic_file(self.path) as f:
            torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "done": done,
                        "global_step": global_step, "units": units, "unit_names": self.unit_names}, f)


def _targets(model: nn.Module, unit: ReconUnit, inputs: list, device, cache_device, cache_dtype) -> list:
    with torch.no_grad(), quant_mode(model, QuantMode.OFF):
        return [_detach(unit.run(model, *to_device(inp, device)), cache_device, cache_dtype) for inp in inputs]


def _chained_fp_targets(unit: ReconUnit, next_unit: ReconUnit | None, fp_inputs: Mapping[str, list]) -> list | None:
    """A unit's FP targets when they were already captured: the all-FP model's output of a unit that
    feeds the next one is that unit's captured FP input (no second FP pass over the calibration set)."""
    if unit.target_inputs != "fp" or next_unit is None or unit.feeds != next_unit.entry \
            or next_unit.entry not in fp_inputs:
        return None
    return [args[0] for args, _ in fp_inputs[next_unit.entry]]


def _fp_inputs_of(model: nn.Module, unit: ReconUnit, items: list[CalibrationItem], fp_inputs: Mapping[str, list],
                  images: ImageSource, cache_device, cache_dtype) -> list:
    """The FP model's inputs of ``unit``: from the encoder capture, or for a decoder unit captured now from
    the FP image embeddings (the encoder does not run again)."""
    if unit.entry in fp_inputs:
        return fp_inputs[unit.entry]
    with torch.no_grad(), quant_mode(model, QuantMode.OFF):
        embeddings = [images.fp_embedding(item.image.path) for item in items]
        return capture_inputs(model, [unit.entry], items, cache_device, cache_dtype, embeddings, images)[unit.entry]


def _unit_settings(settings: ReconSettings, unit: ReconUnit) -> ReconSettings:
    """The decoder's final attention has its own iteration count (``final_attn_iters``, null = ``iters``)."""
    if unit.kind == "final_attn" and settings.final_attn_iters is not None:
        return dataclasses.replace(settings, iters=int(settings.final_attn_iters))
    return settings


def _unit_loader(batches: UnitBatches, iters: int, seed: int) -> DataLoader:
    """``iters`` items drawn with replacement (one image and its prompts per step), seeded per unit."""
    sampler = RandomSampler(batches, replacement=True, num_samples=iters,
                            generator=torch.Generator().manual_seed(seed))
    return DataLoader(batches, batch_size=None, sampler=sampler)


def reconstruct_(model: nn.Module, items: list[CalibrationItem], cfg: Mapping[str, Any], run_dir: Path,
                 logger: RunLogger, seed: int = 0, show_progress: bool = True,
                 units: list[ReconUnit] | None = None, stop_after: int | None = None,
                 precision: str = "32-true", images: ImageSource | None = None) -> list[dict[str, Any]]:
    """Reconstruct every unit in order; returns per-unit statistics (loss, time, memory). ``precision``
    is the Trainer's (runtime.precision)."""
    settings = ReconSettings.from_config(cfg)
    images = images or ImageSource(model)
    device = next(model.parameters()).device
    cache_device = torch.device(cfg.get("cache_device", "cpu"))
    cache_dtype = CACHE_DTYPES[CacheDtype(cfg.get("cache_dtype", "float32"))]
    units = units if units is not None else reconstruction_units(
        model, cfg.get("granularity", "block"), tuple(cfg.get("parts", ("encoder", "decoder"))), settings.decoder_loss)
    head = None
    if settings.encoder_loss is EncoderLoss.par:
        from saq.ptq.par import PromptAwareHead

        head = PromptAwareHead(model, items)
    units = [u for u in units if unit_quantizers(model, u)]  # nothing to learn in an all-FP unit
    state = ReconState(run_dir, [u.name for u in units])
    saved = state.load(model)
    done, global_step, stats = list(saved["done"]), int(saved["global_step"]), list(saved["units"])
    todo = [u for u in units if u.name not in done]
    if not todo:
        return stats
    set_quant_mode(model, QuantMode.QUANTIZE)
    # A unit with no iterations (ptq.recon.iters=0: the recipe's calibration alone) is only frozen: none of
    # its inputs or targets are captured.
    training = [u for u in todo if _unit_settings(settings, u).iters > 0]
    with quant_mode(model, QuantMode.OFF):
        # Encoder entries at once (QDrop mixes a unit's input with these; a unit's FP targets are the next
        # unit's inputs). A decoder unit's FP inputs are taken when it comes and only if its loss needs
        # them: per prompt they are large, and CLM units never use them.
        fp_inputs = capture_inputs(model, sorted({u.entry for u in training if u.part == "encoder"}), items,
                                   cache_device, cache_dtype, images=images)
    q_cache: dict[str, list] = {}  # quantized inputs known without a forward pass (chained units)
    encoded = None  # quantized image embeddings, once the encoder is final
    for position, unit in enumerate(todo):
        index = [u.name for u in units].index(unit.name)
        unit_seed = seed * 100003 + index  # per-unit seed: a resumed run repeats the same draws
        torch.manual_seed(unit_seed)
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        unit_settings = _unit_settings(settings, unit)
        q_inputs = targets = head_targets = unit_head = None
        if unit_settings.iters > 0:
            if unit.entry in q_cache:
                q_inputs = q_cache[unit.entry]
            else:
                if unit.part == "decoder" and encoded is None:
                    with torch.no_grad():
                        encoded = encode_items(model, items, images)  # every encoder unit comes before the decoder
                q_inputs = capture_inputs(model, [unit.entry], items, cache_device, cache_dtype,
                                          encoded if unit.part == "decoder" else None, images)[unit.entry]
                q_cache = {unit.entry: q_inputs}
            targets = _chained_fp_targets(unit, todo[position + 1] if position + 1 < len(todo) else None, fp_inputs)
            if targets is None:
                target_inputs = q_inputs if unit.target_inputs == "quantized" else _fp_inputs_of(
                    model, unit, items, fp_inputs, images, cache_device, cache_dtype)
                targets = _targets(model, unit, target_inputs, device, cache_device, cache_dtype)
                del target_inputs
            unit_head = head if (head is not None and unit.kind == "stage") else None
            if unit_head is not None and not unit_head.accepts(targets[0]):
                log.info("PAR: the output of %s %s cannot feed the neck (layer skipping undefined); this stage "
                         "uses the plain stage-output MSE", unit.name, tuple(targets[0].shape))
                unit_head = None
            if unit_head is not None:
                with torch.no_grad(), quant_mode(model, QuantMode.OFF):
                    head_targets = [_detach(unit_head(to_device(t, device), i), cache_device, cache_dtype)
                                    for i, t in enumerate(targets)]
        module = UnitReconstruction(model, unit, unit_settings, unit_head)
        iters = unit_settings.iters if module.has_parameters else 0
        windows = LossWindows(unit_settings, iters, global_step)
        unit_stats: dict[str, Any] = {"unit": unit.name, "kind": unit.kind, "iters": iters,
                                      "par": unit_head is not None}
        fit_start = time.perf_counter()  # moved to the start of training below: setup_s is the captures

        def save_unit(unit_stats=unit_stats, windows=windows) -> None:
            now = time.perf_counter()
            unit_stats.update(first_loss=windows.first_loss, best_loss=windows.best_loss,
                              time_s=now - start, setup_s=fit_start - start,
                              ms_per_iter=1000 * (now - fit_start) / iters if iters else None,
                              peak_memory_mb=_peak_memory_mb(device), curve=windows.curve)
            done.append(unit_stats["unit"])
            stats.append(unit_stats)
            logger.log_metrics({f"recon/{unit_stats['unit']}/time_s": unit_stats["time_s"],
                                f"recon/{unit_stats['unit']}/peak_memory_mb": unit_stats["peak_memory_mb"]},
                               step=global_step + iters)
            state.save(model, done, global_step + iters, stats)

        if iters > 0:
            batches = UnitBatches(q_inputs, _fp_inputs_of(model, unit, items, fp_inputs, images, cache_device,
                                                          cache_dtype) if module.mixes_input else None, targets,
                                  head_targets)
            fit_start = time.perf_counter()
            trainer = unit_trainer(unit.name, device, precision, run_dir, logger, global_step, iters,
                                   [windows, UnitCheckpoint(save_unit)], show_progress)
            fit_quietly(trainer, module, _unit_loader(batches, iters, unit_seed))
        else:  # nothing to optimise (no parameters or iters=0): the calibrated values, frozen
            module.finalize()
            save_unit()
        global_step += iters
        if all(u.entry != unit.entry for u in todo[position + 1:]):  # sub-blocks share their block's input
            fp_inputs.pop(unit.entry, None)  # no later unit reads them (the previous unit took its targets)
        if q_inputs is not None and position + 1 < len(todo) and unit.feeds == todo[position + 1].entry:
            with torch.no_grad():  # the next unit's quantized input is this unit's (now frozen) output
                q_cache[todo[position + 1].entry] = [
                    ((_detach(unit.run(model, *to_device(inp, device)), cache_device, cache_dtype),), {})
                    for inp in q_inputs]
        if stop_after is not None and len(done) >= stop_after:
            break  # used by tests to simulate a killed job
    return stats

"""Reconstruction stage: optimise units in order, checkpoint after each, resume after a kill.

Each unit's problem is a pure function of (unit, cached quantized inputs, cached FP inputs, FP
targets); caching, devices, checkpoints and logging live here, outside it.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.fabric import Fabric
from torch import nn
from tqdm.auto import tqdm

from saq.data.calibration import CalibrationItem
from saq.engine.reconstruction import ReconSettings, UnitReconstruction, unit_quantizers
from saq.models.units import ReconUnit, reconstruction_units
from saq.ptq.capture import _detach, capture_inputs, encode_items, to_device
from saq.quant.quantizer import QuantMode, quant_mode, set_quant_mode
from saq.utils.loggers import RunLogger

STATE_FILE = "recon_state.pt"


def settings_from_config(cfg: Mapping[str, Any]) -> ReconSettings:
    fields = ReconSettings.__dataclass_fields__
    return ReconSettings(**{k: v for k, v in cfg.items() if k in fields})


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
        print(f"[saq] resuming reconstruction after {len(state['done'])} finished units ({self.path})")
        return state

    def save(self, model: nn.Module, done: list[str], global_step: int, units: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "done": done,
                    "global_step": global_step, "units": units, "unit_names": self.unit_names}, tmp)
        tmp.replace(self.path)


def _targets(model: nn.Module, unit: ReconUnit, inputs: list, device, cache_device, cache_dtype) -> list:
    with torch.no_grad(), quant_mode(model, QuantMode.OFF):
        return [_detach(unit.run(model, *to_device(inp, device)), cache_device, cache_dtype) for inp in inputs]


def reconstruct_(model: nn.Module, items: list[CalibrationItem], cfg: Mapping[str, Any], run_dir: Path,
                 logger: RunLogger, seed: int = 0, show_progress: bool = True,
                 units: list[ReconUnit] | None = None, stop_after: int | None = None) -> list[dict[str, Any]]:
    """Reconstruct every unit in order; returns per-unit statistics (loss, time, memory)."""
    settings = settings_from_config(cfg)
    device = next(model.parameters()).device
    cache_device = torch.device(cfg.get("cache_device", "cpu"))
    cache_dtype = torch.float16 if cfg.get("cache_dtype") == "float16" else None
    units = units if units is not None else reconstruction_units(
        model, cfg.get("granularity", "block"), tuple(cfg.get("parts", ("encoder", "decoder"))), settings.decoder_loss)
    head = None
    if settings.encoder_loss == "par":
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
    with quant_mode(model, QuantMode.OFF):
        fp_inputs = capture_inputs(model, sorted({u.entry for u in todo}), items, cache_device, cache_dtype)
    fabric = Fabric(accelerator=device.type, devices=1, precision=cfg.get("precision", "32-true"))
    q_cache: dict[str, list] = {}  # quantized inputs known without a forward pass (chained units)
    encoded = None  # quantized image embeddings, once the encoder is final
    for position, unit in enumerate(todo):
        index = [u.name for u in units].index(unit.name)
        torch.manual_seed(seed * 100003 + index)  # per-unit seed: a resumed run repeats the same draws
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if unit.entry in q_cache:
            q_inputs = q_cache[unit.entry]
        else:
            if unit.part == "decoder" and encoded is None:
                with torch.no_grad():
                    encoded = encode_items(model, items)  # every encoder unit comes before the decoder
            q_inputs = capture_inputs(model, [unit.entry], items, cache_device, cache_dtype,
                                      encoded if unit.part == "decoder" else None)[unit.entry]
            q_cache = {unit.entry: q_inputs}
        target_inputs = q_inputs if unit.target_inputs == "quantized" else fp_inputs[unit.entry]
        targets = _targets(model, unit, target_inputs, device, cache_device, cache_dtype)
        unit_head = head if (head is not None and unit.kind == "stage") else None
        if unit_head is not None and not unit_head.accepts(targets[0]):
            print(f"[saq] PAR: the output of {unit.name} {tuple(targets[0].shape)} cannot feed the neck "
                  "(layer skipping undefined); this stage uses the plain stage-output MSE")
            unit_head = None
        head_targets = None
        if unit_head is not None:
            with torch.no_grad(), quant_mode(model, QuantMode.OFF):
                head_targets = [_detach(unit_head(to_device(t, device), i), cache_device, cache_dtype)
                                for i, t in enumerate(targets)]
        unit_settings = settings
        if unit.kind == "final_attn" and settings.final_attn_iters is not None:
            unit_settings = dataclasses.replace(settings, iters=int(settings.final_attn_iters))
        module = UnitReconstruction(model, unit, fp_inputs[unit.entry], q_inputs, targets, unit_settings,
                                    unit_head, head_targets)
        optimizers = module.make_optimizers()
        if optimizers:
            optimizers = list(fabric.setup(module, *optimizers, move_to_device=False)[1:])
        # cosine decay applies to the activation-step optimizer (the last one when it exists)
        schedulers = [module.make_scheduler(optimizers[-1])] if len(module.scales) else []
        iters = unit_settings.iters if optimizers else 0
        best, best_loss, window, curve = module.snapshot(), float("inf"), [], []
        # the plotted curve has its own, finer window: about 50 points per unit even for short runs
        plot_every, plot_window = max(1, min(settings.best_window, iters // 50)), []
        first_loss = None
        bar = tqdm(range(iters), desc=f"recon {unit.name}", disable=not show_progress, leave=False)
        for step in bar:
            out = module.training_step(step)
            for scheduler in schedulers:
                scheduler.step()
            first_loss = out["rec"] if first_loss is None else first_loss
            window.append(out["rec"])
            plot_window.append(out["rec"])
            global_step += 1
            if len(plot_window) >= plot_every or step == iters - 1:
                curve.append([global_step, sum(plot_window) / len(plot_window)])
                plot_window = []
            if len(window) >= settings.best_window or step == iters - 1:
                mean = sum(window) / len(window)
                if settings.keep_best and mean < best_loss:
                    best_loss, best = mean, module.snapshot()
                lr = schedulers[0].get_last_lr()[0] if schedulers else None
                logger.log_metrics({f"recon/{unit.name}/loss": mean, f"recon/{unit.name}/reg": out["reg"],
                                    f"recon/{unit.name}/beta": out["beta"], f"recon/{unit.name}/lr_act": lr,
                                    "recon/loss": mean}, step=global_step)
                bar.set_postfix(loss=f"{mean:.4g}")
                window = []
        if settings.keep_best and iters > 0:
            module.restore(best)
        module.finalize(model)
        if position + 1 < len(todo) and unit.feeds == todo[position + 1].entry:
            with torch.no_grad():  # the next unit's quantized input is this unit's (now frozen) output
                q_cache[todo[position + 1].entry] = [
                    ((_detach(unit.run(model, *to_device(inp, device)), cache_device, cache_dtype),), {})
                    for inp in q_inputs]
        done.append(unit.name)
        stats.append({"unit": unit.name, "iters": iters, "first_loss": first_loss, "best_loss": best_loss,
                      "par": unit_head is not None,
                      "time_s": time.perf_counter() - start, "peak_memory_mb": _peak_memory_mb(device),
                      "curve": curve})
        logger.log_metrics({f"recon/{unit.name}/time_s": stats[-1]["time_s"],
                            f"recon/{unit.name}/peak_memory_mb": stats[-1]["peak_memory_mb"]}, step=global_step)
        state.save(model, done, global_step, stats)
        if stop_after is not None and len(done) >= stop_after:
            break  # used by tests to simulate a killed job
    return stats

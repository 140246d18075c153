"""Reconstruction stage: the units in order, each trained by its own Lightning Trainer
(saq.engine), checkpointed when final, resumed after a kill.

This module prepares what a unit learns from (cached quantized and FP inputs, FP targets, the PAR head)
and chains the units; the loop itself (device placement of batches, precision, optimiser and scheduler
steps, logging, the per-unit checkpoint) belongs to the Trainer.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import resource
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from saq.config.validate import RunDirHoldsOtherSettingsError
from saq.data.calibration import CalibrationItem
from saq.config.schema import CacheDtype, EncoderLoss, ReconConfig
from saq.engine.callbacks import LossWindows, UnitCheckpoint
from saq.engine.reconstruction import UnitBatches, UnitReconstruction, recon_settings, unit_quantizers
from saq.engine.trainer import fit_quietly, unit_trainer
from saq.models.units import ReconUnit, Run, reconstruction_units
from saq.ptq.image_source import ImageSource
from saq.models.predictor import encoded_image
from saq.ptq.capture import KeptInputs, _detach, capture_inputs, encode_items, to_device
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
    """Per-unit checkpoint in the run dir: model state after the last finished unit, and the fingerprint
    of the settings it was made under (a rerun with other settings in the same dir must not resume it)."""

    def __init__(self, run_dir: Path, unit_names: list[str], fingerprint: str | None = None) -> None:
        self.path = Path(run_dir) / STATE_FILE
        self.unit_names = unit_names
        self.fingerprint = fingerprint

    @staticmethod
    def exists(run_dir: Path) -> bool:
        return (Path(run_dir) / STATE_FILE).is_file()

    def check_fingerprint(self, stored: str | None) -> None:
        """Refuse a checkpoint made under other settings (None on either side: nothing to compare)."""
        if self.fingerprint is not None and stored is not None and stored != self.fingerprint:
            raise RunDirHoldsOtherSettingsError(
                f"{self.path} was written by a run with other settings (model, quantization, "
                "calibration or recipe); resume with the run's own settings, or give this run a "
                "fresh hydra.run.dir, or delete the file to start over")

    @staticmethod
    def stored_fingerprint(run_dir: Path) -> str | None:
        """The settings fingerprint of the checkpoint in ``run_dir`` (memory-mapped: no weights are read)."""
        state = torch.load(Path(run_dir) / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        return state.get("fingerprint")

    @staticmethod
    def load_model_state(run_dir: Path, model: nn.Module) -> None:
        """The checkpointed model state alone (a resumed run skipping the stages before reconstruction)."""
        state = torch.load(Path(run_dir) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"], strict=True)

    def load(self, model: nn.Module) -> dict[str, Any]:
        if not self.path.is_file():
            return {"done": [], "global_step": 0, "units": []}
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["unit_names"] != self.unit_names:
            raise RuntimeError(f"{self.path} belongs to another unit list; delete it to start over")
        self.check_fingerprint(state.get("fingerprint"))
        model.load_state_dict(state["model"], strict=True)
        log.info("resuming reconstruction after %d finished units (%s)", len(state["done"]), self.path)
        return state

    def save(self, model: nn.Module, done: list[str], global_step: int, units: list[dict]) -> None:
        with atomic_file(self.path) as f:
            torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "done": done,
                        "global_step": global_step, "units": units, "unit_names": self.unit_names,
                        "fingerprint": self.fingerprint}, f)


class _ChainInputs:
    """The inputs the units of one reconstruction share, each kept only while a later unit needs it:
    the FP model's inputs of every training encoder unit (captured at once: QDrop mixes a unit's input
    with them, and a unit's FP targets are the next unit's FP inputs), the quantized input a finished
    unit hands to the next one, and the quantized image embeddings once the encoder is final."""

    def __init__(self, model: nn.Module, items: list[CalibrationItem], images: ImageSource, training: list[ReconUnit],
                 device: torch.device, cache_device: torch.device, cache_dtype: torch.dtype | None,
                 kept: KeptInputs | None = None) -> None:
        self.model, self.items, self.images = model, items, images
        self.device, self.cache_device, self.cache_dtype = device, cache_device, cache_dtype
        # A decoder unit's FP inputs are taken when it comes and only if its loss needs them: per prompt they
        # are large, and CLM units never use them.
        entries = encoder_fp_entries(training)
        self.fp_inputs = kept.take(entries, [item.image.path for item in items]) if kept is not None else None
        if self.fp_inputs is None:
            with quant_mode(model, QuantMode.OFF):
                self.fp_inputs = capture_inputs(model, entries, items, cache_device, cache_dtype, images=images)
        self.q_cache: dict[str, list] = {}  # quantized inputs known without a forward pass (chained units)
        self.encoded = None  # quantized image embeddings, once the encoder is final
        self.kept_for_targets: dict[str, list] = {}  # quantized inputs that later units' targets start from

    def quantized(self, unit: ReconUnit) -> list:
        """The quantized model's inputs of ``unit`` (every unit before it final)."""
        if unit.entry in self.q_cache:
            return self.q_cache[unit.entry]
        q_inputs = self._capture(unit.entry, unit.part)
        self.q_cache = {unit.entry: q_inputs}
        return q_inputs

    def _capture(self, entry: str, part: str) -> list:
        """The quantized model's inputs of ``entry``, from a pass over the calibration items."""
        if part == "decoder" and self.encoded is None:
            with torch.no_grad():
                self.encoded = encode_items(self.model, self.items, self.images)  # the encoder units came first
        return capture_inputs(self.model, [entry], self.items, self.cache_device, self.cache_dtype,
                              self.encoded if part == "decoder" else None, self.images)[entry]

    def target_sources(self, unit: ReconUnit) -> list:
        """The quantized inputs of ``unit.target_entry``: kept from the unit that started there, or captured
        (a run resumed after that unit)."""
        if unit.target_entry not in self.kept_for_targets:
            self.kept_for_targets[unit.target_entry] = self._capture(unit.target_entry, unit.part)
        return self.kept_for_targets[unit.target_entry]

    def fp(self, unit: ReconUnit) -> list:
        """The FP model's inputs of ``unit``: from the encoder capture, or for a decoder unit captured now
        from the FP image embeddings (the encoder does not run again)."""
        if unit.entry in self.fp_inputs:
            return self.fp_inputs[unit.entry]
        if unit.part != "decoder":
            raise RuntimeError(f"the FP inputs of encoder unit {unit.name} were not captured with the others")
        with torch.no_grad(), quant_mode(self.model, QuantMode.OFF):
            embeddings = [self.images.fp_embedding(item.image.path) for item in self.items]
            return capture_inputs(self.model, [unit.entry], self.items, self.cache_device, self.cache_dtype,
                                  embeddings, self.images)[unit.entry]

    def chained_fp_targets(self, unit: ReconUnit, next_unit: ReconUnit | None) -> list | None:
        """A unit's FP targets when they were already captured: the all-FP model's output of a unit that
        feeds the next one as it is (no reshape between them) is that unit's captured FP input (no second
        FP pass over the calibration set)."""
        if unit.target_inputs != "fp" or next_unit is None or unit.feeds != next_unit.entry \
                or unit.to_next is not None or unit.next_input is not None or next_unit.entry not in self.fp_inputs:
            return None
        return [args[0] for args, _ in self.fp_inputs[next_unit.entry]]

    def outputs(self, unit: ReconUnit, inputs: list, run: Run | None = None) -> list:
        """``unit``'s outputs (or ``run``'s) on each cached input, the quantizers as they are."""
        run = run or unit.run
        with torch.no_grad():
            return [_detach(run(self.model, *to_device(inp, self.device)), self.cache_device, self.cache_dtype)
                    for inp in inputs]

    def _next_input(self, unit: ReconUnit, inputs: tuple) -> tuple:
        """The next unit's cached input from ``unit``'s input (computed on the model's device, stored like
        a capture)."""
        return _detach(unit.next_input(self.model, *to_device(inputs, self.device)), self.cache_device,
                       self.cache_dtype)

    def finished(self, unit: ReconUnit, q_inputs: list | None, later: list[ReconUnit]) -> None:
        """``unit`` is final: drop what no later unit reads, and hand its quantized output to the next unit
        (the last encoder unit's, reshaped as the encoder does, to the neck; the neck's, as the quantized
        image embeddings, to the decoder units): no quantized encoder pass over the calibration set."""
        if all(u.entry != unit.entry for u in later):  # sub-blocks share their block's input
            self.fp_inputs.pop(unit.entry, None)  # the previous unit took its targets already
        if q_inputs is not None and any(u.target_entry == unit.entry for u in later):
            self.kept_for_targets[unit.entry] = q_inputs
        self.kept_for_targets = {e: v for e, v in self.kept_for_targets.items() if any(u.target_entry == e for u in later)}
        if q_inputs is None or not later:
            return
        if unit.feeds == later[0].entry and unit.next_input is not None:
            with torch.no_grad():
                self.q_cache = {later[0].entry: [self._next_input(unit, inp) for inp in q_inputs]}
        elif unit.feeds == later[0].entry:
            outputs = self.outputs(unit, q_inputs)
            if unit.to_next is not None:
                outputs = [unit.to_next(self.model, out) for out in outputs]
            if all(out is not None for out in outputs):  # the only quantized inputs kept: the next unit's
                self.q_cache = {later[0].entry: [((out,), {}) for out in outputs]}
        elif unit.kind == "neck" and later[0].part == "decoder" and self.encoded is None \
                and self.cache_dtype is None:
            # Only from a float32 cache: a 16-bit one rounds every unit's output, and the decoder must learn
            # on the embeddings evaluation will see (encode_items then runs the quantized encoder instead).
            with torch.no_grad():
                self.encoded = [encoded_image(self.model, unit.run(self.model, *to_device(inp, self.device)),
                                              self.images.image(item.image.path).shape[:2])
                                for inp, item in zip(q_inputs, self.items)]


@dataclasses.dataclass
class UnitData:
    """What one unit learns from, per calibration item: quantized inputs, targets, and with PAR the head
    (layer skipping) and its targets."""

    q_inputs: list
    targets: list
    head: Any = None
    head_targets: list | None = None


def _unit_data(unit: ReconUnit, next_unit: ReconUnit | None, chain: _ChainInputs, head: Any,
               draws: list[int]) -> UnitData:
    """The quantized inputs and targets of a training unit; the PAR head only for a stage whose output
    the neck accepts. Targets are computed for the items in ``draws`` alone (the others stay None): at a
    short schedule a unit never sees about half of the calibration items."""
    q_inputs = chain.quantized(unit)
    drawn = sorted(set(draws))
    targets = chain.chained_fp_targets(unit, next_unit)
    if targets is None:
        if unit.target_entry is not None:
            target_inputs = chain.target_sources(unit)
        else:
            target_inputs = q_inputs if unit.target_inputs == "quantized" else chain.fp(unit)
        with quant_mode(chain.model, QuantMode.OFF):
            targets = _scatter(drawn, chain.outputs(unit, [target_inputs[i] for i in drawn], unit.target_run),
                               len(q_inputs))
    if head is None or unit.kind != "stage":
        return UnitData(q_inputs, targets)
    if not head.accepts(targets[drawn[0]]):
        log.info("PAR: the output of %s %s cannot feed the neck (layer skipping undefined); this stage uses the "
                 "plain stage-output MSE", unit.name, tuple(targets[drawn[0]].shape))
        return UnitData(q_inputs, targets)
    with torch.no_grad(), quant_mode(chain.model, QuantMode.OFF):
        head_targets = _scatter(drawn, [_detach(head(to_device(targets[i], chain.device), i), chain.cache_device,
                                                chain.cache_dtype) for i in drawn], len(q_inputs))
    return UnitData(q_inputs, targets, head, head_targets)


def _scatter(indices: list[int], values: list, length: int) -> list:
    """A list of ``length`` with ``values`` at ``indices`` and None elsewhere."""
    out: list = [None] * length
    for i, v in zip(indices, values):
        out[i] = v
    return out


def cache_placement(cfg: Mapping[str, Any]) -> tuple[torch.device, torch.dtype | None]:
    """Where and in which dtype reconstruction caches inputs and targets (None: as computed)."""
    return torch.device(cfg.get("cache_device", "cpu")), CACHE_DTYPES[CacheDtype(cfg.get("cache_dtype", "float32"))]


def encoder_fp_entries(training: list[ReconUnit]) -> list[str]:
    """The encoder entries whose FP inputs the training units read (captured together, at the start)."""
    return sorted({u.entry for u in training if u.part == "encoder"})


def planned_units(model: nn.Module, cfg: Mapping[str, Any]) -> list[ReconUnit]:
    """The units of a reconstruction with settings ``cfg``, in order, but those with nothing to learn (all FP)."""
    units = reconstruction_units(model, cfg.get("granularity", "block"), tuple(cfg.get("parts", ("encoder", "decoder"))),
                                 recon_settings(cfg).decoder_loss)
    return [u for u in units if unit_quantizers(model, u)]


def training_units(units: list[ReconUnit], settings: ReconConfig) -> list[ReconUnit]:
    """The units that train (a unit with no iterations, ptq.recon.iters=0, is only frozen)."""
    return [u for u in units if _unit_settings(settings, u).iters > 0]


def _unit_settings(settings: ReconConfig, unit: ReconUnit) -> ReconConfig:
    """The decoder's units may have their own iteration count (``decoder_iters``) and its final attention
    its own again (``final_attn_iters``); null = ``iters``."""
    if unit.kind == "final_attn" and settings.final_attn_iters is not None:
        return dataclasses.replace(settings, iters=int(settings.final_attn_iters))
    if unit.part == "decoder" and settings.decoder_iters is not None:
        return dataclasses.replace(settings, iters=int(settings.decoder_iters))
    return settings


def unit_draws(num_items: int, iters: int, seed: int) -> list[int]:
    """The items a unit trains on, in order: ``iters`` draws with replacement (one image and its prompts
    per step), seeded per unit. Known before the unit starts, so only drawn items get targets."""
    sampler = RandomSampler(range(num_items), replacement=True, num_samples=iters,
                            generator=torch.Generator().manual_seed(seed))
    return list(sampler)


def _fit(trainer: Any, module: UnitReconstruction, data: UnitData, fp_inputs: list | None, draws: list[int]) -> None:
    """The unit's optimisation loop over ``draws``; the batches and the trainer live only as long as it."""
    batches = UnitBatches(data.q_inputs, fp_inputs, data.targets, data.head_targets)
    fit_quietly(trainer, module, DataLoader(batches, batch_size=None, sampler=draws))


def reconstruct_(model: nn.Module, items: list[CalibrationItem], cfg: Mapping[str, Any], run_dir: Path,
                 logger: RunLogger, seed: int = 0, show_progress: bool = True,
                 units: list[ReconUnit] | None = None, stop_after: int | None = None,
                 precision: str = "32-true", images: ImageSource | None = None,
                 fingerprint: str | None = None, kept: KeptInputs | None = None) -> list[dict[str, Any]]:
    """Reconstruct every unit in order; returns per-unit statistics (loss, time, memory). ``precision``
    is the Trainer's (runtime.precision); ``fingerprint``: the run's settings, stored with the per-unit
    checkpoint so that a run with other settings does not resume it; ``kept``: FP encoder inputs kept
    from calibration's passes, used instead of a capture when they are the ones needed."""
    settings = recon_settings(cfg)
    images = images or ImageSource(model)
    device = next(model.parameters()).device
    cache_device, cache_dtype = cache_placement(cfg)
    units = planned_units(model, cfg) if units is None else [u for u in units if unit_quantizers(model, u)]
    head = None
    if settings.encoder_loss is EncoderLoss.par:
        from saq.ptq.par import PromptAwareHead

        head = PromptAwareHead(model, items)
    state = ReconState(run_dir, [u.name for u in units], fingerprint)
    saved = state.load(model)
    done, global_step, stats = list(saved["done"]), int(saved["global_step"]), list(saved["units"])
    todo = [u for u in units if u.name not in done]
    if not todo:
        return stats
    set_quant_mode(model, QuantMode.QUANTIZE)
    # A unit with no iterations (ptq.recon.iters=0: the recipe's calibration alone) is only frozen: none of
    # its inputs or targets are captured.
    training = training_units(todo, settings)
    chain = _ChainInputs(model, items, images, training, device, cache_device, cache_dtype, kept)
    for position, unit in enumerate(todo):
        index = [u.name for u in units].index(unit.name)
        unit_seed = seed * 100003 + index  # per-unit seed: a resumed run repeats the same draws
        torch.manual_seed(unit_seed)
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        unit_settings = _unit_settings(settings, unit)
        later = todo[position + 1:]
        draws = unit_draws(len(items), unit_settings.iters, unit_seed) if unit_settings.iters > 0 else []
        data = _unit_data(unit, later[0] if later else None, chain, head, draws) if draws else None
        module = UnitReconstruction(model, unit, unit_settings, data.head if data else None)
        iters = unit_settings.iters if module.has_parameters else 0
        windows = LossWindows(unit_settings, iters, global_step)
        unit_stats: dict[str, Any] = {"unit": unit.name, "kind": unit.kind, "iters": iters,
                                      "par": data is not None and data.head is not None}
        fit_start = time.perf_counter()  # reset when training starts: setup_s is the captures

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
            fit_start = time.perf_counter()
            _fit(unit_trainer(unit.name, device, precision, run_dir, logger, global_step, iters,
                              [windows, UnitCheckpoint(save_unit)], show_progress),
                 module, data, chain.fp(unit) if module.mixes_input else None, draws)
        else:  # nothing to optimise (no parameters or iters=0): the calibrated values, frozen
            module.finalize()
            save_unit()
        global_step += iters
        q_inputs = data.q_inputs if data is not None else None
        # This unit's targets and its trainer (whose Lightning objects hold each other in cycles) are freed
        # before the next unit captures its own: two units' caches never coexist.
        del data, module
        gc.collect()
        chain.finished(unit, q_inputs, later)
        if stop_after is not None and len(done) >= stop_after:
            break  # used by tests to simulate a killed job
    return stats

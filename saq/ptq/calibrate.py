"""Calibration stage: observers turn statistics into quantization ranges."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from saq.data.calibration import CalibrationItem
from saq.ptq.image_source import ImageSource
from saq.models.predictor import decode_boxes, encode_image
from saq.ptq.capture import KeptInputs
from saq.ptq.weight_ranges import WeightRangeCache, weight_range_key
from saq.nn.modules import QuantizedModule
from saq.quant.quantizer import QuantMode, Role, iter_quantizers, quant_mode, set_quant_mode

log = logging.getLogger(__name__)


def is_activation(_name: str, q) -> bool:
    return q.role is Role.ACTIVATION


def is_uncalibrated_activation(_name: str, q) -> bool:
    return q.role is Role.ACTIVATION and not q.is_calibrated


@torch.no_grad()
def calibrate_weights_(model: nn.Module, cache: WeightRangeCache | None = None) -> int:
    """Weight ranges straight from the parameters (no data needed); ``cache``: ranges an earlier run
    computed for the same tensor and spec are read instead of searched."""
    count = 0
    for module in model.modules():
        q = getattr(module, "weight_quantizer", None)
        if isinstance(module, QuantizedModule) and q is not None:
            key, cached = None, None
            if cache is not None:
                key = weight_range_key(module.weight, q.spec)
                cached = cache.get(key, q.granularity.param_shape(tuple(module.weight.shape)))
            if cached is not None:
                q.set_range(*cached)
            else:
                q.set_mode(QuantMode.OBSERVE)
                q.observer.update(module.weight)
                if cache is not None:
                    cache.put(key, *q.observer.compute_range())
                q.finalize_observer()
            count += 1
    return count


@torch.no_grad()
def calibrate_activations_(model: nn.Module, items: list[CalibrationItem], show_progress: bool = True,
                           keep_calibrated: bool = False, images: ImageSource | None = None,
                           kept_inputs: KeptInputs | None = None) -> int:
    """Run the FP model on the calibration images and their boxes with activation observers on
    (``keep_calibrated``: only for quantizers without a range yet, e.g. those PCC did not set; ``kept_inputs``:
    the encoder inputs a later stage asked for, kept from these FP passes)."""
    images = images or ImageSource(model)
    with quant_mode(model, QuantMode.OFF):
        set_quant_mode(model, QuantMode.OBSERVE, where=is_uncalibrated_activation if keep_calibrated else is_activation)
        for name, q in iter_quantizers(model):
            if q.observer is not None:
                q.observer.name = name  # error messages name the module
        for item in tqdm(items, desc="calibrate", disable=not show_progress, leave=False):
            with kept_inputs.recording(model, item.image.path) if kept_inputs is not None else contextlib.nullcontext():
                encoded = encode_image(model, images.image(item.image.path))  # observers see the encoder run
            decode_boxes(model, encoded, torch.tensor([p.box_xyxy for p in item.prompts]), return_masks=False)
        observed = [(n, q) for n, q in iter_quantizers(model) if q.mode is QuantMode.OBSERVE]
        unreached = [n for n, q in observed if q.observer.num_updates == 0]
        if unreached:
            raise RuntimeError(f"{len(unreached)} activation quantizers never ran during calibration "
                               f"(e.g. {unreached[:4]}); keep those modules FP with a quant.rules entry")
        for _, q in observed:
            q.finalize_observer()
    return len(observed)


def calibrate_(model: nn.Module, items: list[CalibrationItem], show_progress: bool = True,
               keep_calibrated: bool = False, images: ImageSource | None = None,
               weight_range_cache: Path | None = None, kept_inputs: KeptInputs | None = None) -> dict[str, int]:
    """Calibrate every quantizer (``keep_calibrated``: every activation quantizer without a range) and
    switch them all to QUANTIZE. ``weight_range_cache``: a directory of weight ranges shared by runs;
    ``kept_inputs``: encoder inputs to keep from the FP calibration passes (for reconstruction)."""
    cache = WeightRangeCache(weight_range_cache) if weight_range_cache is not None else None
    weights = calibrate_weights_(model, cache)
    activations = calibrate_activations_(model, items, show_progress, keep_calibrated, images, kept_inputs)
    set_quant_mode(model, QuantMode.QUANTIZE)
    if cache is not None:  # logged, not reported: a run's results never depend on the cache's state
        log.info("weight ranges: %d read from %s, %d searched", cache.hits, cache.dir, cache.misses)
    return {"weight_quantizers": weights, "activation_quantizers": activations}

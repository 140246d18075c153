"""Closed-form error compensation (docs/method.md, "Closed-form compensation"): no gradient steps.

For every quantized Linear (and 1x1 convolution), in forward order:

1. Activation error: with X the layer's input in the FP model and X^ its (fake-quantized) input in the
   quantized model, whose earlier layers are already compensated, the weight and bias are re-fitted by
   ridge regression so that the layer maps X^ to what the FP layer makes of X:
       [W' b'] = argmin ||[X 1] [W b]^T - [X^ 1] [W' b']^T||^2 + lam ||[W' b'] - [W b]||^2,
   lam = ``ridge`` x the mean diagonal of [X^ 1]^T [X^ 1] (ERQ's activation-error step).
2. Weight error: the weight quantizer's range is searched again on W' and W' is rounded onto that grid
   column by column, each column's rounding error spread over the columns not yet rounded in proportion
   to the inverse of H = X^T X (GPTQ's optimal-brain-compensation order), so that W_q X^ stays close to W' X^.

The weights end on their integer grid (the deployability check holds them to it), biases and ranges are
ordinary tensors: the export is unchanged. The FP model the layer is fitted to is the one before this
stage (its weights are kept aside for the FP passes); reconstruction cannot follow this stage, whose
FP targets would then come from the compensated weights.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from saq.data.calibration import CalibrationItem
from saq.ptq.image_source import ImageSource
from saq.nn.modules import QuantConv2d, QuantLinear
from saq.ptq.capture import DECODER_PREFIX, ENCODER_PREFIX, capture_inputs, encode_items, to_device
from saq.quant.functional import fake_quantize
from saq.quant.quantizer import QuantMode, iter_quantizers, quant_mode, set_quant_mode

log = logging.getLogger(__name__)


def compensable(module: nn.Module) -> bool:
    """A Linear or a dense 1x1 convolution with a calibrated per-channel weight quantizer."""
    q = getattr(module, "weight_quantizer", None)
    if q is None or not q.is_calibrated or q.scale.numel() != module.weight.shape[0]:
        return False
    if isinstance(module, QuantLinear):
        return True
    return (isinstance(module, QuantConv2d) and module.kernel_size == (1, 1) and module.groups == 1
            and module.stride == (1, 1) and module.padding in ((0, 0), 0))


def forward_order(model: nn.Module, names: list[str], item: CalibrationItem, images: ImageSource) -> list[str]:
    """``names`` in the order their modules first run on one calibration item."""
    from saq.ptq.capture import run_items

    order: list[str] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, _a, n=n: order.append(n) if n not in order else None) for n in names]
    try:
        with torch.no_grad(), quant_mode(model, QuantMode.OFF):
            run_items(model, [item], images=images)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in names if n not in order]  # never run: kept, last (nothing to fit them on)


class _Reached(Exception):
    """Ends a segment run once the layer of interest has received its input."""


def encoder_segments(model: nn.Module) -> list[str]:
    """Encoder modules that run once per image, in order, whose inputs are cached so that a layer's input
    costs one segment run, not an encoder pass: TinyViT's stages, SAM ViT's blocks, the neck."""
    encoder = model.image_encoder
    names = []
    for list_name in ("layers", "blocks"):
        blocks = getattr(encoder, list_name, None)
        if isinstance(blocks, nn.ModuleList):
            names += [f"image_encoder.{list_name}.{i}" for i in range(len(blocks))]
    if isinstance(getattr(encoder, "neck", None), nn.Module):
        names.append("image_encoder.neck")
    return names


@torch.no_grad()
def _inputs_within(segment: nn.Module, layer: nn.Module, calls: list[tuple], device: torch.device) -> list[tuple]:
    """The layer's (args, kwargs) on each cached call of its segment (the segment stops at the layer)."""
    seen: list[tuple] = []

    def hook(_module, args, kwargs):
        seen.append(((args[0].detach().cpu(),), {}))
        raise _Reached

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for args, kwargs in calls:
            try:
                segment(*to_device(args, device), **to_device(kwargs, device))
            except _Reached:
                pass
    finally:
        handle.remove()
    return seen


def _rows(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """Inputs as (samples, in_features)."""
    if conv:  # N x C x H x W -> (N H W) x C
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1]).double()


@contextlib.contextmanager
def _original_weights(modules: dict[str, nn.Module], original: dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
    """The weights and biases the stage started from, for the FP passes."""
    current = {n: (m.weight.data, m.bias.data if m.bias is not None else None) for n, m in modules.items()}
    try:
        for n, m in modules.items():
            m.weight.data = original[n][0]
            if m.bias is not None:  # a bias compensation added to a layer that had none was zero before
                m.bias.data = original[n][1] if original[n][1] is not None else torch.zeros_like(m.bias)
        yield
    finally:
        for n, m in modules.items():
            m.weight.data = current[n][0]
            if m.bias is not None:
                m.bias.data = current[n][1]


def ridge_refit(weight: torch.Tensor, bias: torch.Tensor, xtx: torch.Tensor, xtx_fp: torch.Tensor, ridge: float,
                with_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ridge solution of step 1 from the augmented moments xtx = [X^ 1]^T [X^ 1] and
    xtx_fp = [X^ 1]^T [X 1] (float64); ``with_bias=False``: plain moments X^T X^, X^T X and no bias."""
    wb = torch.cat([weight.double(), bias.double()[:, None]], dim=1) if with_bias else weight.double()
    lam = ridge * xtx.diagonal().mean()
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    solved = torch.linalg.solve(xtx + lam * eye, (xtx_fp + lam * eye) @ wb.T).T  # (X^T X + lam) W'^T = (X^T X_fp + lam) W^T
    return (solved[:, :-1], solved[:, -1]) if with_bias else (solved, bias.double())


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               qmin: int, qmax: int, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Step 2: ``weight`` (out x in, float64) rounded column by column onto the per-row grid (scale,
    zero_point: out values), the error of each column compensated on the later ones through the upper
    Cholesky factor of H^-1.

    The updates are applied lazily in blocks of ``block`` columns: inside a block column by column, to the
    columns after it once per block as one matrix product. In exact arithmetic this is the column-by-column
    update; it replaces ``in`` rank-one updates of the whole matrix by ``in / block`` products."""
    if block < 1:
        raise ValueError(f"gptq_round: block={block}, use a positive number of columns")
    w = weight.clone()
    h = hessian.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s, z = scale.reshape(-1).double(), zero_point.reshape(-1).double()
    out = torch.empty_like(w)
    columns = w.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        errors = torch.empty(w.shape[0], end - start, dtype=w.dtype, device=w.device)
        for i in range(start, end):
            column = w[:, i]
            q = fake_quantize(column, s, z, qmin, qmax)
            out[:, i] = q
            err = (column - q) / hinv[i, i]
            errors[:, i - start] = err
            w[:, i + 1:end] -= err[:, None] * hinv[i, i + 1:end][None, :]
        w[:, end:] -= errors @ hinv[start:end, end:]
    return out


def _moments(fp_calls: list[tuple], q_calls: list[tuple], module: nn.Module, conv: bool, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augmented moments [X^ 1]^T [X^ 1], [X^ 1]^T [X 1] and [X 1]^T [X 1] of the layer input."""
    quantizer = module.input_quantizer
    xtx = xtx_fp = fp_fp = None
    for fp_call, q_call in zip(fp_calls, q_calls, strict=True):
        x_fp = _rows(to_device(fp_call[0][0], device), conv)
        x_q = to_device(q_call[0][0], device)
        if quantizer is not None:
            x_q = quantizer(x_q)
        x_q = _rows(x_q, conv)
        ones = torch.ones(x_q.shape[0], 1, dtype=x_q.dtype, device=x_q.device)
        a_q, a_fp = torch.cat([x_q, ones], 1), torch.cat([x_fp, ones], 1)
        xtx = a_q.T @ a_q if xtx is None else xtx + a_q.T @ a_q
        xtx_fp = a_q.T @ a_fp if xtx_fp is None else xtx_fp + a_q.T @ a_fp
        fp_fp = a_fp.T @ a_fp if fp_fp is None else fp_fp + a_fp.T @ a_fp
    return xtx, xtx_fp, fp_fp


@torch.no_grad()
def compensate_(model: nn.Module, items: list[CalibrationItem], ridge: float = 1e-2, gptq: bool = True,
                parts: tuple[str, ...] = ("encoder", "decoder"), images: ImageSource | None = None,
                show_progress: bool = True, refit: bool = False, inputs: str = "own") -> dict:
    """Compensate every compensable quantized layer of ``parts``; returns counts and the mean relative
    output error of the layers before and after (on the calibration items)."""
    if ridge < 0:
        raise ValueError(f"ptq.compensate.ridge={ridge}: use a value >= 0")
    if inputs not in ("own", "chain"):
        raise ValueError(f"ptq.compensate.inputs={inputs}: use own or chain")
    images = images or ImageSource(model)
    prefixes = tuple({"encoder": ENCODER_PREFIX, "decoder": DECODER_PREFIX}[p] for p in parts)
    modules = {n: m for n, m in model.named_modules() if n.startswith(prefixes) and compensable(m)}
    if not modules or not items:
        return {"layers": 0}
    for m in modules.values():  # learned rounding, if any, is replaced by the re-fit and its rounding
        m.weight_quantizer.rounding = None
    original = {n: (m.weight.detach().clone(), m.bias.detach().clone() if m.bias is not None else None)
                for n, m in modules.items()}
    order = forward_order(model, list(modules), items[0], images)
    device = next(model.parameters()).device
    previous_modes = {name: q.mode for name, q in iter_quantizers(model)}
    set_quant_mode(model, QuantMode.QUANTIZE)
    before, after, start = [], [], time.perf_counter()
    encoded_fp = encoded_q = None
    segments = encoder_segments(model)
    cached: dict[str, tuple[list, list]] = {}  # the current segment's FP and quantized inputs
    cpu = torch.device("cpu")
    try:
        for name in tqdm(order, desc="compensate", disable=not show_progress, leave=False):
            module = modules[name]
            on_decoder = name.startswith(DECODER_PREFIX)
            segment = next((seg for seg in segments if name.startswith(seg + ".")), None)
            if on_decoder and encoded_fp is None:  # the encoder is done: its embeddings are fixed from here on
                cached.clear()
                with _original_weights(modules, original), quant_mode(model, QuantMode.OFF):
                    encoded_fp = encode_items(model, items, images)
                encoded_q = encode_items(model, items, images) if inputs == "chain" else None
            if segment is not None:
                if segment not in cached:  # the earlier segments are final now
                    cached.clear()
                    with _original_weights(modules, original), quant_mode(model, QuantMode.OFF):
                        fp_in = capture_inputs(model, [segment], items, cpu, images=images)[segment]
                    cached[segment] = (fp_in, capture_inputs(model, [segment], items, cpu, images=images)[segment]
                                       if inputs == "chain" else None)
                block = model.get_submodule(segment)
                with _original_weights(modules, original), quant_mode(model, QuantMode.OFF):
                    fp_calls = _inputs_within(block, module, cached[segment][0], device)
                q_calls = _inputs_within(block, module, cached[segment][1], device) if inputs == "chain" else fp_calls
            else:
                with _original_weights(modules, original), quant_mode(model, QuantMode.OFF):
                    fp_calls = capture_inputs(model, [name], items, cpu,
                                              encoded=encoded_fp if on_decoder else None, images=images)[name]
                q_calls = capture_inputs(model, [name], items, cpu, encoded=encoded_q if on_decoder else None,
                                         images=images)[name] if inputs == "chain" else fp_calls
            conv = isinstance(module, QuantConv2d)
            moments = _moments(fp_calls, fp_calls if inputs == "own" else q_calls, module, conv, device)
            del fp_calls, q_calls
            xtx, xtx_fp, _ = moments
            w0, b0 = original[name]
            shape = module.weight.shape
            w_fp = w0.reshape(shape[0], -1)
            b_fp = b0 if b0 is not None else torch.zeros(shape[0], dtype=w0.dtype, device=w0.device)
            quantizer = module.weight_quantizer
            nearest = fake_quantize(w_fp.double(), quantizer.scale.reshape(-1, 1).double(),
                                    quantizer.zero_point.reshape(-1, 1).double(), quantizer.qmin, quantizer.qmax)
            before.append(relative_output_error(w_fp, b_fp, nearest, b_fp, moments))
            if not refit:
                w_new, b_new = w_fp.double(), b_fp.double()
            elif b0 is not None:
                w_new, b_new = ridge_refit(w_fp, b_fp, xtx, xtx_fp, ridge)
            else:  # a layer without a bias keeps none (checkpoints and exports keep their keys): no bias column
                w_new, _ = ridge_refit(w_fp, b_fp, xtx[:-1, :-1], xtx_fp[:-1, :-1], ridge, with_bias=False)
                b_new = b_fp
            quantizer.set_mode(QuantMode.OBSERVE)  # the range of the re-fitted weight
            quantizer.observer.update(w_new.to(module.weight.dtype).reshape(shape))
            quantizer.finalize_observer()
            quantizer.set_mode(QuantMode.QUANTIZE)
            if gptq:
                w_q = gptq_round(w_new, xtx[:-1, :-1], quantizer.scale, quantizer.zero_point, quantizer.qmin, quantizer.qmax)
            else:
                w_q = fake_quantize(w_new, quantizer.scale.reshape(-1, 1).double(),
                                    quantizer.zero_point.reshape(-1, 1).double(), quantizer.qmin, quantizer.qmax)
            module.weight.copy_(w_q.reshape(shape).to(module.weight.dtype))
            if module.bias is not None:
                module.bias.copy_(b_new.to(module.bias.dtype))
            after.append(relative_output_error(w_fp, b_fp, w_q, b_new, moments))
    finally:
        for qname, q in iter_quantizers(model):
            q.mode = previous_modes.get(qname, q.mode)
    images.forget_embeddings()
    return {"layers": len(order), "ridge": ridge, "gptq": gptq, "refit": refit, "inputs": inputs, "parts": list(parts), "images": len(items),
            "mean_relative_output_error_before": float(sum(before) / len(before)),
            "mean_relative_output_error_after": float(sum(after) / len(after)),
            "seconds": round(time.perf_counter() - start, 1)}


def relative_output_error(w_fp: torch.Tensor, b_fp: torch.Tensor, w_q: torch.Tensor, b_q: torch.Tensor,
                          moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    """||[X^ 1] [Wq bq]^T - [X 1] [W b]^T||^2 / ||[X 1] [W b]^T||^2, from the moments alone."""
    xtx, xtx_fp, fp_fp = moments
    u = torch.cat([w_q.double(), b_q.double()[:, None]], 1)
    v = torch.cat([w_fp.double(), b_fp.double()[:, None]], 1)
    reference = (v @ fp_fp @ v.T).trace().clamp_min(1e-30)
    error = (u @ xtx @ u.T).trace() - 2 * (u @ xtx_fp @ v.T).trace() + reference
    return float(error / reference)

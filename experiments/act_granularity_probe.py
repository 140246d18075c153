"""Upper bound of finer activation granularity in the decoder: per-channel or channel-group scales for
chosen quantizer groups, on one calibrated model and a fixed evaluation subset.

The model is calibrated once (the given overrides, stages up to ``calibrate``). For every quantizer of
the chosen sensitivity groups, a sample of its FP inputs on the calibration set is kept; each variant
replaces those quantizers by a fake quantizer with one range per channel (``channel``), per channel
group (``groupG``: channels sorted by their range, G groups of equal size, one clipped range each), with
dynamic per-token ranges (``token``: the min/max of each row of the last axis, shrunk by one searched
factor), or keeps them (``tensor``). Ranges are searched per channel / group for the least squared error.
``search`` is one range per tensor searched the same way; ``hadamard`` rotates the quantizer's input by a
block-diagonal random Hadamard matrix R (one block per attention head for q, k, v and the output projection's
input, where the rotation folds into the projection weights offline; one block over all channels for a
projection's input, where it would be an extra op), quantizes with one searched range and rotates back:
q(x R) R^T, the exact arithmetic of the rotated model. The replaced quantizers are a measurement device, not
a deployable model: nothing here is exported.

    python experiments/act_granularity_probe.py --out /tmp/probe.json --groups dec_attn_in,dec_qkv_out \
        --variants tensor,channel,group4,group8 \
        experiment=vit_t_coco quant=w4a4 ptq=saq_rc seed=0 data.max_images=32 'ptq.stages=[bimodal,reparam,calibrate]'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from saq.data.calibration import cap_prompts
from saq.eval import evaluate
from saq.eval.sensitivity import check_partition
from saq.nn import quantize_
from saq.ptq.capture import run_items
from saq.ptq.recipe import rules_for_model
from saq.quant import QuantMode, set_quant_mode
from saq.quant.quantizer import Role

from run_setup import compose_run, run_inputs, run_recipe_stages

ROWS_PER_CALL = 1024


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(rows, channels): heads and head dims together for (B, H, N, d) tensors."""
    if x.dim() == 4:
        return x.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * x.shape[3])
    return x.reshape(-1, x.shape[-1])


def fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero) * scale


def search_ranges(rows: torch.Tensor, groups: torch.Tensor, count: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (lo, hi), equal within each group, clipped by the shrink factor of least squared error."""
    lo_c, hi_c = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
    lo_g = torch.full((count,), float("inf")).scatter_reduce(0, groups, lo_c, "amin")
    hi_g = torch.full((count,), float("-inf")).scatter_reduce(0, groups, hi_c, "amax")
    best_err = torch.full((count,), float("inf"))
    best = torch.ones(count)
    for alpha in torch.linspace(0.2, 1.0, 41):
        err_c = ((rows - fake_quant(rows, lo_g[groups] * alpha, hi_g[groups] * alpha, bits)) ** 2).sum(0)
        err_g = torch.zeros(count).scatter_add(0, groups, err_c)
        better = err_g < best_err
        best_err, best = torch.where(better, err_g, best_err), torch.where(better, alpha, best)
    return lo_g[groups] * best[groups], hi_g[groups] * best[groups]


def channel_groups(rows: torch.Tensor, count: int) -> torch.Tensor:
    """Group index of each channel: channels sorted by their max |x|, ``count`` groups of equal size."""
    order = rows.abs().amax(0).argsort()
    groups = torch.empty_like(order)
    groups[order] = torch.arange(order.numel()) * count // order.numel()
    return groups


def search_token_shrink(rows: torch.Tensor, bits: int) -> float:
    """One shrink factor of per-token (per-row) min/max ranges, of least squared error on the sample."""
    lo, hi = rows.min(1, keepdim=True).values.clamp(max=0), rows.max(1, keepdim=True).values.clamp(min=0)
    errors = {float(a): float(((rows - fake_quant(rows, lo * a, hi * a, bits)) ** 2).sum())
              for a in torch.linspace(0.3, 1.0, 36)}
    return min(errors, key=errors.get)


class TokenQuantizer(nn.Module):
    """Dynamic per-token ranges (each row of the last axis its own min/max, shrunk by one searched factor):
    what an int8 runtime's dynamic quantization computes at run time."""

    def __init__(self, shrink: float, bits: int) -> None:
        super().__init__()
        self.shrink, self.bits = shrink, bits

    def forward(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        lo = x.amin(-1, keepdim=True).clamp(max=0) * self.shrink
        hi = x.amax(-1, keepdim=True).clamp(min=0) * self.shrink
        return fake_quant(x, lo, hi, self.bits)


def random_hadamard(size: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal size x size matrix: random signs times the normalised Sylvester Hadamard matrix."""
    if size & (size - 1):
        raise ValueError(f"hadamard: {size} channels is not a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return signs[:, None].float() * h / size ** 0.5


def head_rotation(model: nn.Module, name: str, channels: int) -> torch.Tensor:
    """Block-diagonal rotation of a quantizer's channels: per head for an attention's q/k/v quantizers and
    its output projection's input, one block otherwise."""
    parent = model.get_submodule(name.rsplit(".", 1)[0])
    if name.endswith(".out_proj.input_quantizer"):
        parent = model.get_submodule(name.rsplit(".", 2)[0])
    heads = getattr(parent, "num_heads", 1)
    block = random_hadamard(channels // heads)
    return torch.block_diag(*[block] * heads)


class RotatedQuantizer(nn.Module):
    """q(x R) R^T: quantization in a rotated basis, returned in the original one."""

    def __init__(self, inner: nn.Module, rotation: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.rotation = inner, rotation

    def forward(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(x @ self.rotation) @ self.rotation.T


class ProbeQuantizer(nn.Module):
    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.lo, self.hi, self.bits = lo, hi, bits

    def forward(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 4:  # (B, H, N, d): channel = (head, dim)
            shape = (1, x.shape[1], 1, x.shape[3])
        else:
            shape = (1,) * (x.dim() - 1) + (x.shape[-1],)
        return fake_quant(x, self.lo.view(shape), self.hi.view(shape), self.bits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    # comma-separated, so that the Hydra overrides after them stay positional
    parser.add_argument("--groups", required=True, help="sensitivity group names, comma-separated")
    parser.add_argument("--variants", default="tensor,channel,group4,group8", help="comma-separated")
    parser.add_argument("--sample-items", type=int, default=8)
    parser.add_argument("--check-first", action="store_true", help="evaluate the calibrated model first")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.groups, args.variants = args.groups.split(","), args.variants.split(",")

    cfg, config = compose_run(args.overrides)
    inputs = run_inputs(cfg, config)
    model, eval_set, eval_prompts, items = inputs.model, inputs.eval_set, inputs.eval_prompts, inputs.calib_items
    recon_items = cap_prompts(items, cfg.calib.max_prompts_per_image, int(cfg.calib.seed))
    quantize_(model, rules_for_model(model, config["quant"], config["ptq"]))
    run_recipe_stages(inputs, cfg, config, recon_items)
    model.eval()

    if args.check_first:
        set_quant_mode(model, QuantMode.QUANTIZE)
        first = evaluate(model, eval_set, eval_prompts, "calibrated", int(cfg.eval.prompt_batch), False, 0)
        print(f"calibrated, before the probe: AP {first.metrics['mask_AP']:.2f}", flush=True)
    members = check_partition(model)
    # activation quantizers only: the groups of the sensitivity study also hold weight quantizers
    names = [n for g in args.groups for n in members[g] if model.get_submodule(n).role is Role.ACTIVATION]
    originals = {n: model.get_submodule(n) for n in names}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    token_samples: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    gen = torch.Generator().manual_seed(0)

    def keep(name):
        def hook(_module, inputs):
            x = inputs[0].detach().float()
            rows = channels_last(x)
            pick = torch.randint(rows.shape[0], (min(ROWS_PER_CALL, rows.shape[0]),), generator=gen)
            samples[name].append(rows[pick])
            tokens = x.reshape(-1, x.shape[-1])  # rows of the last axis: what a per-token range covers
            pick = torch.randint(tokens.shape[0], (min(ROWS_PER_CALL, tokens.shape[0]),), generator=gen)
            token_samples[name].append(tokens[pick])
        return hook

    handles = [originals[n].register_forward_pre_hook(keep(n)) for n in names]
    set_quant_mode(model, QuantMode.OFF)
    with torch.no_grad():
        run_items(model, recon_items[:args.sample_items])
    for h in handles:
        h.remove()
    rows = {n: torch.cat(samples[n]) for n in names}
    token_rows = {n: torch.cat(token_samples[n]) for n in names}

    record = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = record.setdefault("rows", {})
    for variant in args.variants:
        for n in names:
            parent, attr = n.rsplit(".", 1)
            if variant == "tensor":
                replacement = originals[n]
            elif variant in ("search", "hadamard"):
                channels, bits = rows[n].shape[1], originals[n].spec.bits
                rotation = head_rotation(model, n, channels) if variant == "hadamard" else None
                sample = rows[n] if rotation is None else rows[n] @ rotation
                replacement = ProbeQuantizer(*search_ranges(sample, torch.zeros(channels, dtype=torch.long), 1, bits),
                                             bits)
                if rotation is not None:
                    replacement = RotatedQuantizer(replacement, rotation)
            elif variant == "token":
                bits = originals[n].spec.bits
                replacement = TokenQuantizer(search_token_shrink(token_rows[n], bits), bits)
            else:
                channels = rows[n].shape[1]
                count = channels if variant == "channel" else int(variant.removeprefix("group"))
                groups = torch.arange(channels) if variant == "channel" else channel_groups(rows[n], count)
                lo, hi = search_ranges(rows[n], groups, count, originals[n].spec.bits)
                replacement = ProbeQuantizer(lo, hi, originals[n].spec.bits)
            setattr(model.get_submodule(parent), attr, replacement)
        set_quant_mode(model, QuantMode.QUANTIZE)
        result = evaluate(model, eval_set, eval_prompts, variant, int(cfg.eval.prompt_batch), False, 0)
        key = f"{'+'.join(args.groups)} {variant}"
        results[key] = {"overrides": args.overrides, "mask_AP": result.metrics["mask_AP"], "mIoU": result.metrics["mIoU"]}
        args.out.write_text(json.dumps(record, indent=1))
        print(f"{key:40s} AP {result.metrics['mask_AP']:.2f}", flush=True)


if __name__ == "__main__":
    main()

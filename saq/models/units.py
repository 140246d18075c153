"""Reconstruction units: ordered pieces of a SAM that are optimised one after another.

A unit names the module whose *input* it starts from (``entry``, captured with a forward-pre hook),
the modules whose quantizers it trains (``trains``), and a ``run`` callable that maps the captured
(args, kwargs) to the unit's output using the model's own submodules. Targets are the same ``run`` with
quantizers off (or ``target_run`` from ``target_entry``'s input, where the target starts earlier than the
unit), so no unit needs an output hook and the FP model is never copied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from segment_anything.modeling.image_encoder import Block, ImageEncoderViT, window_partition, window_unpartition
from torch import nn

Run = Callable[[nn.Module, tuple, dict], Any]
GRANULARITIES = ("layer", "subblock", "block", "stage")


@dataclass(frozen=True)
class ReconUnit:
    name: str
    entry: str  # module whose input is the unit's input
    trains: tuple[str, ...]  # module-name prefixes whose quantizers this unit learns
    run: Run
    part: str  # "encoder" or "decoder"
    # Targets come from the FP model on FP inputs ("fp") or on the quantized inputs ("quantized": the
    # decoder CLM loss compares with the FP decoder fed the quantized image embedding).
    target_inputs: str = "fp"
    loss_weights: tuple[float, ...] | None = None  # per element of a tuple output
    kind: str = "block"  # layer | block | stage | decoder_layer | final_attn | neck
    feeds: str | None = None  # entry whose input is exactly this unit's output (lets runners chain units)
    # QDrop mixes the unit's input with the FP chain's (encoder units). A decoder unit's input is built
    # from the quantized image embedding and is never mixed: dropping acts inside its quantizers only.
    qdrop_input: bool = True
    # Elements of a tuple output whose loss term comes from a second forward pass with QDrop off
    # (SAQ-SAM's final-token term of a decoder layer).
    undropped_outputs: tuple[int, ...] = ()
    # What the model does between this unit's output and the input of ``feeds`` when they differ in shape
    # (the last encoder stage's tokens -> the neck's B x C x H x W input); None: the output is the input.
    to_next: Callable[[nn.Module, torch.Tensor], torch.Tensor | None] | None = None
    # The call of ``feeds`` from this unit's call (args, kwargs), the unit final, where it needs more than
    # the output (a two-way layer's new tokens with the positional encodings it was given).
    next_input: Callable[[nn.Module, tuple, dict], tuple[tuple, dict]] | None = None
    # Targets from another entry's quantized input with another run (``target_run``, quantizers off): a CLM
    # layer trains from its own input, but its target is the FP transformer from the first layer on.
    target_entry: str | None = None
    target_run: Run | None = None


def as_neck_input(model: nn.Module, stage_output: torch.Tensor) -> torch.Tensor | None:
    """``stage_output`` as the neck's B x C x H x W input (the view the encoder's own forward makes), or
    None if its shape cannot feed the neck. ViT stages give B x H x W x C, TinyViT layers B x (H*W) x C."""
    channels = model.image_encoder.neck[0].in_channels
    grid = tuple(model.prompt_encoder.image_embedding_size)
    if stage_output.shape[-1] != channels:
        return None
    if stage_output.dim() == 4 and tuple(stage_output.shape[1:3]) == grid:
        return stage_output.permute(0, 3, 1, 2)
    if stage_output.dim() == 3 and stage_output.shape[1] == grid[0] * grid[1]:
        return stage_output.reshape(stage_output.shape[0], *grid, channels).permute(0, 3, 1, 2)
    return None


def _chain(names: list[str]) -> Run:
    def run(model, args, kwargs):
        x = args[0]
        for name in names:
            x = model.get_submodule(name)(x)
        return x
    return run


def _vit_attention_part(block: Block, x: torch.Tensor) -> torch.Tensor:
    """First half of segment-anything's Block.forward: x + attn(norm1(x)) with windowing."""
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        H, W = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, block.window_size)
    x = block.attn(x)
    if block.window_size > 0:
        x = window_unpartition(x, block.window_size, pad_hw, (H, W))
    return shortcut + x


def _vit_subblock_units(prefix: str, index: int) -> list[ReconUnit]:
    name = f"{prefix}.blocks.{index}"

    def attention(model, args, kwargs):
        return _vit_attention_part(model.get_submodule(name), args[0])

    def mlp(model, args, kwargs):  # starts at the block input; the attention part is already frozen
        block = model.get_submodule(name)
        x = _vit_attention_part(block, args[0])
        return x + block.mlp(block.norm2(x))

    return [ReconUnit(f"{name}.attn", name, (f"{name}.attn",), attention, "encoder"),
            ReconUnit(f"{name}.mlp", name, (f"{name}.mlp",), mlp, "encoder")]


def vit_stages(encoder: ImageEncoderViT) -> list[list[int]]:
    """Runs of blocks that end with a global-attention block (SAM-B: [0,1,2], [3,4,5], ...)."""
    stages, current = [], []
    for i, block in enumerate(encoder.blocks):
        current.append(i)
        if block.window_size == 0:
            stages.append(current)
            current = []
    if current:
        stages.append(current)
    return stages


def _weighted_layers_in_forward_order(module: nn.Module, prefix: str) -> list[str]:
    """Names of every Linear / Conv2d under ``module`` in the order a forward pass reaches them.

    Registration order is forward order in SAM's ViT blocks and TinyViT's MBConv / PatchMerging; a
    TinyViT block registers ``mlp`` before ``local_conv`` but runs attn -> local_conv -> mlp."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return [prefix]
    children = dict(module.named_children())
    if "local_conv" in children and "mlp" in children:
        order = [n for n in children if n != "local_conv"]
        order.insert(order.index("mlp"), "local_conv")
        children = {n: children[n] for n in order}
    return [name for child, sub in children.items()
            for name in _weighted_layers_in_forward_order(sub, f"{prefix}.{child}")]


def _layer_units(encoder: nn.Module, prefix: str) -> list[ReconUnit]:
    """Layer-wise (AdaRound-style) units: one Linear / Conv2d each, learning its weight rounding and
    input step; attention-internal quantizers (q, k, v, softmax) keep their calibrated ranges."""
    return [ReconUnit(name, name, (name,), _chain([name]), "encoder", kind="layer")
            for name in _weighted_layers_in_forward_order(encoder, prefix)]


def encoder_units(model: nn.Module, granularity: str) -> list[ReconUnit]:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown reconstruction granularity {granularity!r}; choose one of {GRANULARITIES}")
    encoder = model.image_encoder
    prefix = "image_encoder"
    units: list[ReconUnit] = []
    if granularity == "layer":
        # a layer's output is not the next layer's input (norms, activations, residuals lie between)
        return _layer_units(encoder, prefix)
    if isinstance(encoder, ImageEncoderViT):
        if granularity == "subblock":
            for i in range(len(encoder.blocks)):
                units += _vit_subblock_units(prefix, i)
        else:
            groups = vit_stages(encoder) if granularity == "stage" else [[i] for i in range(len(encoder.blocks))]
            for group in groups:
                names = [f"{prefix}.blocks.{i}" for i in group]
                label = names[0] if len(names) == 1 else f"{prefix}.blocks.{group[0]}-{group[-1]}"
                units.append(ReconUnit(label, names[0], tuple(names), _chain(names), "encoder", kind=granularity))
    else:  # TinyViT: layers of blocks, each layer optionally ending in a downsample
        for li, layer in enumerate(encoder.layers):
            lname = f"{prefix}.layers.{li}"
            if granularity == "stage":
                units.append(ReconUnit(lname, lname, (lname,), _chain([lname]), "encoder", kind="stage"))
                continue
            children = [f"{lname}.blocks.{bi}" for bi in range(len(layer.blocks))]
            if getattr(layer, "downsample", None) is not None:
                children.append(f"{lname}.downsample")
            for child in children:
                units.append(ReconUnit(child, child, (child,), _chain([child]), "encoder"))
    # Consecutive encoder units chain (an attention sub-block shares its input with its MLP sub-block
    # instead); the last one feeds the neck through the encoder's reshape.
    neck = f"{prefix}.neck"
    units = [dataclasses.replace(u, feeds=None if u.name.endswith(".attn") else nxt.entry)
             for u, nxt in zip(units[:-1], units[1:])] + \
        [dataclasses.replace(u, feeds=neck, to_next=as_neck_input) for u in units[-1:]]
    units.append(ReconUnit(neck, neck, (neck,), _chain([neck]), "encoder", kind="neck"))
    return units


def decoder_units(model: nn.Module) -> list[ReconUnit]:
    """Each two-way layer, then the final token-to-image attention."""
    units = []
    transformer = "mask_decoder.transformer"
    for i in range(len(model.mask_decoder.transformer.layers)):
        name = f"{transformer}.layers.{i}"

        def run(model, args, kwargs, name=name):
            return model.get_submodule(name)(*args, **kwargs)

        units.append(ReconUnit(name, name, (name,), run, "decoder", kind="decoder_layer", qdrop_input=False))
    return units + [_final_attention_unit()]


def _module_unit(name: str, kind: str, target_inputs: str = "fp") -> ReconUnit:
    """A decoder module learned on its own captured call (input -> output)."""
    def run(model, args, kwargs):
        return model.get_submodule(name)(*args, **kwargs)

    return ReconUnit(name, name, (name,), run, "decoder", kind=kind, target_inputs=target_inputs, qdrop_input=False)


def _final_attention_unit(target_inputs: str = "fp") -> ReconUnit:
    return _module_unit("mask_decoder.transformer.final_attn_token_to_image", "final_attn", target_inputs)


DECODER_SUBBLOCKS = ("self_attn", "cross_attn_token_to_image", "mlp", "cross_attn_image_to_token")


def decoder_subblock_units(model: nn.Module) -> list[ReconUnit]:
    """PTQ4SAM-L's decoder granularity: every attention module and every MLP of each two-way layer (in
    forward order), then the final token-to-image attention."""
    transformer = "mask_decoder.transformer"
    units = [_module_unit(f"{transformer}.layers.{i}.{part}", "subblock")
             for i in range(len(model.mask_decoder.transformer.layers)) for part in DECODER_SUBBLOCKS]
    return units + [_final_attention_unit()]


def _two_way_tail(model: nn.Module, first: int, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                  key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TwoWayTransformer's forward from layer ``first`` on, given that layer's inputs: the remaining layers,
    then the final token-to-image attention and norm, in segment-anything's order of operations."""
    transformer = model.mask_decoder.transformer
    for layer in transformer.layers[first:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=query_pe, key_pe=key_pe)
    attn_out = transformer.final_attn_token_to_image(q=queries + query_pe, k=keys + key_pe, v=keys)
    return transformer.norm_final_attn(queries + attn_out), keys


def _next_layer_input(i: int) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict]]:
    """Two-way layer i's call -> layer i + 1's: its new queries and keys, the same positional encodings."""
    def next_input(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        queries, keys = model.mask_decoder.transformer.layers[i](*args, **kwargs)
        return (), {"queries": queries, "keys": keys, "query_pe": kwargs["query_pe"], "key_pe": kwargs["key_pe"]}

    return next_input


def _final_attention_input(i: int) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict]]:
    """The last two-way layer's call -> the final token-to-image attention's (as TwoWayTransformer builds it)."""
    def next_input(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        queries, keys = model.mask_decoder.transformer.layers[i](*args, **kwargs)
        return (), {"q": queries + kwargs["query_pe"], "k": keys + kwargs["key_pe"], "v": keys}

    return next_input


def decoder_clm_units(model: nn.Module, local_q: float = 0.01, local_k: float = 1.0, final: float = 1.0
                      ) -> list[ReconUnit]:
    """SAQ-SAM's decoder units: each two-way layer is learned against (its own queries and keys, and the
    whole transformer's final tokens), with earlier layers quantized and later ones FP; both paths see
    the quantized image embedding. Then the final token-to-image attention with plain MSE.

    Unit i starts at layer i's own input: the quantized, frozen layers before it are not run again at every
    step; the unit before hands over its output (``next_input``)."""
    from saq.quant.quantizer import QuantMode, quant_mode

    transformer = "mask_decoder.transformer"
    n_layers = len(model.mask_decoder.transformer.layers)
    final_attn = f"{transformer}.final_attn_token_to_image"
    units = []
    for i in range(n_layers):
        name = f"{transformer}.layers.{i}"
        later = tuple(f"{transformer}.layers.{j}." for j in range(i + 1, n_layers)) + (f"{transformer}.final_attn",)

        def run(model, args, kwargs, i=i, later=later):
            layer = model.mask_decoder.transformer.layers[i]
            queries, keys = layer(*args, **kwargs)
            with quant_mode(model, QuantMode.OFF, where=lambda qname, q: qname.startswith(later)):
                final_queries, _ = _two_way_tail(model, i + 1, queries, keys, kwargs["query_pe"], kwargs["key_pe"])
            return queries, keys, final_queries

        def from_first_layer(model, args, kwargs, i=i):
            """The same outputs from the first layer's input (the targets: run with quantizers off)."""
            queries, keys = kwargs["queries"], kwargs["keys"]
            for layer in model.mask_decoder.transformer.layers[:i + 1]:
                queries, keys = layer(queries=queries, keys=keys, query_pe=kwargs["query_pe"], key_pe=kwargs["key_pe"])
            final_queries, _ = _two_way_tail(model, i + 1, queries, keys, kwargs["query_pe"], kwargs["key_pe"])
            return queries, keys, final_queries

        last = i == n_layers - 1
        units.append(ReconUnit(name, name, (name,), run, "decoder", target_inputs="quantized",
                               loss_weights=(local_q, local_k, final), kind="decoder_layer", qdrop_input=False,
                               undropped_outputs=(2,), feeds=final_attn if last else f"{transformer}.layers.{i + 1}",
                               next_input=(_final_attention_input if last else _next_layer_input)(i),
                               target_entry=f"{transformer}.layers.0" if i else None,
                               target_run=from_first_layer if i else None))
    # the final attention too learns on, and against, the quantized image embedding's path
    return units + [_final_attention_unit(target_inputs="quantized")]


def reconstruction_units(model: nn.Module, granularity: str = "block", parts: tuple[str, ...] = ("encoder", "decoder"),
                         decoder_loss: str = "mse") -> list[ReconUnit]:
    units = []
    if "encoder" in parts:
        units += encoder_units(model, granularity)
    if "decoder" in parts:
        if decoder_loss == "clm":
            units += decoder_clm_units(model)
        elif granularity == "subblock":
            units += decoder_subblock_units(model)
        else:
            units += decoder_units(model)
    return units

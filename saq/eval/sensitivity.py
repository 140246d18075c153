"""Where a quantized model loses its accuracy: quantizer groups switched on one at a time (the rest FP)
or off one at a time (the rest quantized), on a model calibrated once.

A group is a named set of glob patterns over quantizer names (``iter_quantizers``). The groups of
:data:`SAM_GROUPS` partition every quantizer a SAM (ViT or TinyViT encoder) can have, so each
quantizer belongs to exactly one group and :func:`check_partition` can prove it on a given model.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable

from torch import nn

from saq.quant.quantizer import FakeQuantizer, QuantMode, iter_quantizers, set_quant_mode


@dataclass(frozen=True)
class QuantizerGroup:
    name: str
    patterns: tuple[str, ...]
    description: str

    def matches(self, quantizer_name: str) -> bool:
        return any(fnmatch.fnmatchcase(quantizer_name, p) for p in self.patterns)


_ENC = "image_encoder"
_DEC = "mask_decoder"
# Order matters only for reading: membership is checked by check_partition (no quantizer in two groups).
SAM_GROUPS: tuple[QuantizerGroup, ...] = (
    QuantizerGroup("enc_patch_embed", (f"{_ENC}.patch_embed.*",), "patch embedding (FP under the paper rules)"),
    QuantizerGroup("enc_conv_stage_w", (f"{_ENC}.layers.0.blocks.*.weight_quantizer",),
                   "TinyViT conv stage (MBConv) weights"),
    QuantizerGroup("enc_conv_stage_a", (f"{_ENC}.layers.0.blocks.*.input_quantizer",),
                   "TinyViT conv stage (MBConv) activations"),
    QuantizerGroup("enc_downsample", (f"{_ENC}.layers.*.downsample.*",), "TinyViT patch merging convs (w + a)"),
    QuantizerGroup("enc_local_conv", (f"{_ENC}.layers.*.blocks.*.local_conv.*",), "TinyViT depthwise local convs"),
    QuantizerGroup("enc_attn_w", (f"{_ENC}.*attn.qkv.weight_quantizer", f"{_ENC}.*attn.proj.weight_quantizer"),
                   "encoder qkv and proj weights"),
    QuantizerGroup("enc_mlp_w", (f"{_ENC}.*mlp.*.weight_quantizer",), "encoder MLP weights"),
    QuantizerGroup("enc_qkv_in", (f"{_ENC}.*attn.qkv.input_quantizer",), "encoder qkv inputs (post-LayerNorm)"),
    QuantizerGroup("enc_qkv_out", (f"{_ENC}.*attn.[qkv]_quantizer",), "encoder q, k, v"),
    QuantizerGroup("enc_softmax", (f"{_ENC}.*attn.softmax_quantizer",), "encoder attention softmax"),
    QuantizerGroup("enc_proj_in", (f"{_ENC}.*attn.proj.input_quantizer",), "encoder attention output projection inputs"),
    QuantizerGroup("enc_fc1_in", (f"{_ENC}.*mlp.fc1.input_quantizer", f"{_ENC}.*mlp.lin1.input_quantizer"),
                   "encoder MLP first inputs (post-LayerNorm)"),
    QuantizerGroup("enc_fc2_in", (f"{_ENC}.*mlp.fc2.input_quantizer", f"{_ENC}.*mlp.lin2.input_quantizer"),
                   "encoder MLP second inputs (post-GELU)"),
    QuantizerGroup("neck", (f"{_ENC}.neck.*",), "encoder neck convs (w + a)"),
    QuantizerGroup("dec_attn_in", (f"{_DEC}.transformer.*.[qkv]_proj.input_quantizer",),
                   "decoder attention inputs (PCC's points)"),
    QuantizerGroup("dec_qkv_out", (f"{_DEC}.transformer.*attn*.[qkv]_quantizer",), "decoder q, k, v"),
    QuantizerGroup("dec_softmax", (f"{_DEC}.transformer.*attn*.softmax_quantizer",), "decoder attention softmax"),
    QuantizerGroup("dec_out_proj_in", (f"{_DEC}.transformer.*.out_proj.input_quantizer",),
                   "decoder attention output projection inputs"),
    QuantizerGroup("dec_attn_w", (f"{_DEC}.transformer.*_proj.weight_quantizer",), "decoder attention weights"),
    QuantizerGroup("dec_mlp", (f"{_DEC}.transformer.*mlp.*",), "decoder MLP (w + a)"),
    QuantizerGroup("dec_heads", (f"{_DEC}.output_hypernetworks_mlps.*", f"{_DEC}.iou_prediction_head.*"),
                   "hypernetwork MLPs and IoU head (FP under the paper rules)"),
    QuantizerGroup("other", ("*",), "anything no group above names"),
)


def group_of(quantizer_name: str, groups: Iterable[QuantizerGroup] = SAM_GROUPS) -> str:
    """The first group naming this quantizer."""
    for group in groups:
        if group.matches(quantizer_name):
            return group.name
    raise KeyError(f"no group matches quantizer {quantizer_name!r}")


def check_partition(model: nn.Module, groups: Iterable[QuantizerGroup] = SAM_GROUPS) -> dict[str, list[str]]:
    """Group name -> quantizer names of ``model``; raises if a quantizer matches two groups (``other``
    aside, which takes what no other group names)."""
    groups = list(groups)
    members: dict[str, list[str]] = {g.name: [] for g in groups}
    for name, _ in iter_quantizers(model):
        hits = [g.name for g in groups if g.name != "other" and g.matches(name)]
        if len(hits) > 1:
            raise ValueError(f"quantizer {name!r} is in several groups: {hits}")
        members[hits[0] if hits else "other"].append(name)
    return members


def set_groups_quantized(model: nn.Module, quantized: set[str], groups: Iterable[QuantizerGroup] = SAM_GROUPS) -> int:
    """Quantize exactly the quantizers of the named groups (the rest OFF, i.e. FP); returns how many are on."""
    groups = list(groups)
    names = {g.name for g in groups}
    unknown = quantized - names
    if unknown:
        raise KeyError(f"unknown quantizer groups {sorted(unknown)}; known: {sorted(names)}")
    set_quant_mode(model, QuantMode.OFF)

    def chosen(name: str, _q: FakeQuantizer) -> bool:
        return group_of(name, groups) in quantized

    return set_quant_mode(model, QuantMode.QUANTIZE, where=chosen)

"""Quantized subclasses of the attention modules of segment-anything (TinyViT's: saq.nn.tinyvit_attention).

Each keeps its parent's parameters and signature and adds four named quantization points: q, k and
v after projection, and the softmax output. Attention logits (QK^T) and the relative-position term
stay in floating point. With the quantizers OFF each forward performs exactly the parent's
operations, so outputs are bit-identical to upstream.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling import image_encoder as sam_encoder
from segment_anything.modeling import transformer as sam_transformer

from saq.nn.modules import QuantizedModule, _adopt
from saq.quant.factory import make_quantizer
from saq.quant.quantizer import QuantSpec, Role

ATTENTION_POINTS = ("q_quantizer", "k_quantizer", "v_quantizer", "softmax_quantizer")


class _QuantAttention(QuantizedModule):
    @classmethod
    def from_float(cls, module, weight: QuantSpec | None, act: QuantSpec | None, softmax: QuantSpec | None = None):
        """``softmax`` overrides the spec of the post-softmax point (e.g. a log quantizer)."""
        if act is None:
            raise ValueError("attention quantization points need an activation spec")
        new = _adopt(cls, module)
        like = next(module.parameters(), None)  # quantizers live on the module's device, in its dtype
        for point in ATTENTION_POINTS:
            spec = softmax if point == "softmax_quantizer" and softmax is not None else act
            setattr(new, point, make_quantizer(spec, Role.ACTIVATION, like))
        return new


class QuantViTAttention(_QuantAttention, sam_encoder.Attention):
    """segment-anything image-encoder attention (windowed or global, decomposed rel-pos)."""

    float_cls = sam_encoder.Attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        q, k, v = self.q_quantizer(q), self.k_quantizer(k), self.v_quantizer(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = sam_encoder.add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        attn = self.softmax_quantizer(attn.softmax(dim=-1), v)
        x = (attn @ v).view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


class QuantTwoWayAttention(_QuantAttention, sam_transformer.Attention):
    """segment-anything mask-decoder attention (self, token-to-image, image-to-token)."""

    float_cls = sam_transformer.Attention

    # The forward in three public pieces, so that a search over the q or k quantizers (PCC) can hold
    # the other side fixed and compute the attention map alone.
    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """Projected, quantized queries with heads separated: (B, heads, Nq, c)."""
        return self._separate_heads(self.q_quantizer(self.q_proj(q)), self.num_heads)

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        """Projected, quantized keys with heads separated: (B, heads, Nk, c)."""
        return self._separate_heads(self.k_quantizer(self.k_proj(k)), self.num_heads)

    @staticmethod
    def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(c)) of head-separated queries and keys: the map before its quantizer."""
        _, _, _, c_per_head = q.shape
        attn = q @ k.permute(0, 1, 3, 2)
        attn = attn / math.sqrt(c_per_head)
        return torch.softmax(attn, dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k = self.queries(q), self.keys(k)
        v = self._separate_heads(self.v_quantizer(self.v_proj(v)), self.num_heads)
        attn = self.softmax_quantizer(self.attention_probs(q, k), v)
        out = self._recombine_heads(attn @ v)
        return self.out_proj(out)

"""Quantized TinyViT attention (the vit_t image encoder). Its own module because importing mobile_sam
costs about a second: saq.nn.quantize imports it only once mobile_sam is loaded, which any model with
a TinyViT inside has done."""

from __future__ import annotations

import warnings

import torch

with warnings.catch_warnings():  # mobile_sam re-registers timm models and uses deprecated paths
    warnings.simplefilter("ignore")
    from mobile_sam.modeling import tiny_vit_sam

from saq.nn.attention import _QuantAttention  # noqa: E402  (after mobile_sam, whose warnings are silenced)


class QuantTinyViTAttention(_QuantAttention, tiny_vit_sam.Attention):
    """TinyViT attention (pre-norm, learned attention-bias table)."""

    float_cls = tiny_vit_sam.Attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        x = self.norm(x)
        qkv = self.qkv(x)
        q, k, v = qkv.view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q = self.q_quantizer(q.permute(0, 2, 1, 3))
        k = self.k_quantizer(k.permute(0, 2, 1, 3))
        v = self.v_quantizer(v.permute(0, 2, 1, 3))
        bias = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        attn = self.softmax_quantizer(attn.softmax(dim=-1), v)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.dh)
        return self.proj(x)

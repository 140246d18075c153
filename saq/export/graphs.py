"""The two graphs a deployment runs: the image encoder, and prompt encoder + mask decoder.

The decoder graph takes one image embedding and a batch of prompts, each given as points with SAM's
labels (1 foreground, 0 background, 2 / 3 box corners, -1 padding), in the encoder's input frame
(after the resize to the longest side). A box is its two corners labelled 2 and 3, which embeds
exactly as SAM's box path. It returns the low-resolution logits and predicted IoU of all mask tokens;
selecting single / multi mask and upscaling happen outside, as in SAM's predictor.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam
from torch import nn

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embeddings",)
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")


class EncoderGraph(nn.Module):
    """SAM-normalised, padded image (1 x 3 x S x S) -> image embedding."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class DecoderGraph(nn.Module):
    """(image embedding, N x P x 2 point coords, N x P labels) -> (N x M x 4h x 4w logits, N x M IoU)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        prompt, decoder = sam.prompt_encoder, sam.mask_decoder
        self.pe_layer = prompt.pe_layer
        self.point_embeddings = prompt.point_embeddings
        self.not_a_point_embed = prompt.not_a_point_embed
        h_in, w_in = prompt.input_image_size
        self.register_buffer("input_wh", torch.tensor([float(w_in), float(h_in)]), persistent=False)
        # No mask input: every prompt gets the same dense embedding (broadcast over the grid) and
        # positional grid (constants).
        self.register_buffer("dense", prompt.no_mask_embed.weight.detach().reshape(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("image_pe", prompt.get_dense_pe().detach().clone(), persistent=False)
        self.output_tokens = nn.Parameter(torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]).detach(),
                                          requires_grad=False)
        self.transformer = decoder.transformer
        self.output_upscaling = decoder.output_upscaling
        self.output_hypernetworks_mlps = decoder.output_hypernetworks_mlps
        self.iou_prediction_head = decoder.iou_prediction_head

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """SAM's point embedding, written with masks instead of in-place indexing (exportable)."""
        pe = self.pe_layer._pe_encoding((coords + 0.5) / self.input_wh)  # +0.5: pixel centres
        labels = labels.unsqueeze(-1)
        pe = pe * (labels != -1).to(pe.dtype) + self.not_a_point_embed.weight * (labels == -1).to(pe.dtype)
        for i, embedding in enumerate(self.point_embeddings):
            pe = pe + embedding.weight * (labels == i).to(pe.dtype)
        return pe

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
                point_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self.embed_points(point_coords, point_labels)
        n = sparse.shape[0]
        tokens = torch.cat([self.output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        src = image_embeddings.expand(n, -1, -1, -1) + self.dense  # one image, n prompts
        pos = self.image_pe.expand(n, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, self.iou_prediction_head(hs[:, 0, :])

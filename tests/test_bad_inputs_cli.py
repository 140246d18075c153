"""A standing table of bad inputs given to ``python -m saq.ptq`` (tiny model, a small COCO set written
here, no shared assets): each must end with a non-zero exit code, no traceback, a last line that names
the problem, a status.json that says failed (when the run dir exists), and no half-written result."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGE = {"width": 64, "height": 48}
BOX_ANN = {"category_id": 1, "segmentation": [[4, 4, 40, 4, 40, 30, 4, 30]], "area": 972.0, "bbox": [4, 4, 36, 26],
           "iscrowd": 0}


def _coco_set(root: Path, images=None, annotations=None, raw: str | None = None) -> list[str]:
    """Two PNGs and an annotation file (``raw`` text replaces the json); the data overrides for it."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / name)
    images = images if images is not None else [{**IMAGE, "id": 1, "file_name": "a.png"},
                                                {**IMAGE, "id": 2, "file_name": "b.png"}]
    annotations = annotations if annotations is not None else [{**BOX_ANN, "id": 1, "image_id": 1},
                                                                {**BOX_ANN, "id": 2, "image_id": 2}]
    path = root / "annotations.json"
    path.write_text(raw if raw is not None else json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}))
    return ["data=coco8_seg", f"data.images={folder}", f"data.annotations={path}"]


def _wrong_architecture_checkpoint(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "not_sam.pt"
    torch.save({"layer.weight": torch.zeros(3, 3)}, path)
    return ["model=vit_t", f"model.checkpoint={path}"]


def _nan_checkpoint(root: Path) -> list[str]:
    from saq.models import build_tiny_sam

    root.mkdir(parents=True, exist_ok=True)
    model = build_tiny_sam(seed=0)
    with torch.no_grad():
        model.mask_decoder.transformer.layers[0].mlp.lin1.weight[0, 0] = float("nan")
    path = root / "nan.pt"
    torch.save(model.state_dict(), path)
    return [f"model.checkpoint={path}"]


# name -> (builds the overrides in a fresh dir, text the last line of stderr must hold)
CASES = {
    "missing checkpoint": (lambda d: ["model=vit_t", f"model.checkpoint={d}/gone.pt"], "gone.pt"),
    "checkpoint of another architecture": (_wrong_architecture_checkpoint, "not_sam.pt"),
    "NaN in the weights": (_nan_checkpoint, "mask_decoder.transformer.layers.0.mlp.lin1"),
    "missing image folder": (lambda d: [*_coco_set(d), f"data.images={d}/nowhere"], "nowhere"),
    "corrupt annotation json": (lambda d: _coco_set(d, raw='{"images": [1, 2'), "annotations.json"),
    "missing image file": (lambda d: _coco_set(d, images=[{**IMAGE, "id": 1, "file_name": "a.png"},
                                                          {**IMAGE, "id": 2, "file_name": "gone.png"}]), "gone.png"),
    "path traversal": (lambda d: _coco_set(d, images=[{**IMAGE, "id": 1, "file_name": "../../etc/passwd"}]),
                       "points outside data.images"),
    "duplicate image ids": (lambda d: _coco_set(d, images=[{**IMAGE, "id": 1, "file_name": "a.png"},
                                                           {**IMAGE, "id": 1, "file_name": "b.png"}]),
                            "duplicate image ids"),
    "zero-size box": (lambda d: _coco_set(d, annotations=[{**BOX_ANN, "id": 5, "image_id": 1, "bbox": [4, 4, 0, 9]},
                                                          {**BOX_ANN, "id": 6, "image_id": 2}]), "annotation 5"),
    "no image has a prompt": (lambda d: _coco_set(d, annotations=[]), "no calibration image has a prompt"),
    "image size differs from its annotation": (
        lambda d: _coco_set(d, images=[{"width": 65, "height": 48, "id": 1, "file_name": "a.png"}]), "65x48"),
    "misspelt key": (lambda d: ["ptq.recon.iterz=3"], "iterz"),
    "bits out of range": (lambda d: ["quant.encoder.w_bits=0"], "quant.encoder.w_bits=0"),
    "data.max_images=0": (lambda d: ["data.max_images=0"], "data.max_images=0"),
    "quant.name against the bits": (lambda d: ["quant=w4a4", "quant.name=w8a8"], "quant.name=w8a8"),
    "no such device": (lambda d: ["runtime.device=cuda:99"], "cuda:99"),
}


# Refused by Hydra while it composes the config, before saq runs: its own message names the key, and its
# last line is a hint about HYDRA_FULL_ERROR.
REFUSED_BY_HYDRA = {"misspelt key"}


def _command(case: str, root: Path) -> tuple[list[str], Path]:
    overrides = CASES[case][0](root / "inputs")
    run_dir = root / "run"
    return [sys.executable, "-m", "saq.ptq", "debug=fast", "ptq=minmax", "runtime.progress=false", *overrides,
            f"hydra.run.dir={run_dir}"], run_dir


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every case run once, three at a time: they are independent processes that spend most of their
    time starting Python and importing torch, so running them side by side keeps the table cheap."""
    commands = {case: _command(case, tmp_path_factory.mktemp("case")) for case in CASES}
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

    def run(case: str) -> tuple[subprocess.CompletedProcess, Path]:
        command, run_dir = commands[case]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env), run_dir

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_fails_in_one_line_and_leaves_no_result(case, outcomes):
    named = CASES[case][1]
    proc, run_dir = outcomes[case]
    assert proc.returncode != 0, proc.stdout[-1500:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    if case in REFUSED_BY_HYDRA:
        assert named in proc.stderr and "HYDRA_FULL_ERROR" in last
    else:
        assert named in last, f"last line {last!r} does not name {named!r}"
    if (run_dir / "status.json").is_file():
        assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    assert not (run_dir / "quantized.pt").exists() and not (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob("**/*.tmp")), "a half-written file was left"


def test_the_readme_counts_these_cases():
    """The development section of the README gives the number of bad inputs this table covers."""
    readme = (ROOT / "README.md").read_text()
    assert f"{len(CASES)} bad inputs" in readme

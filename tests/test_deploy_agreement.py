"""The references a deployed model's agreement is read against (saq.deploy.agreement), on the tiny model,
and through ``python -m saq.eval eval.backend=onnxruntime eval.compare_fake_quant=true`` on a tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from saq.models.predictor import decode_boxes, encode_image

pytest.importorskip("onnxruntime", reason='the deploy extra: pip install -e ".[deploy]"')
from saq.deploy import Predictor  # noqa: E402  (after the importorskip of its runtime)
from saq.deploy.agreement import FakeQuantEmbeddings, one_ulp_input  # noqa: E402
from saq.export import load_quantized  # noqa: E402
from saq.export.onnx import export_checkpoint  # noqa: E402

from helpers.tiny_quantized import BOXES, mask_iou, photos, quantized_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    ckpt = quantized_tiny(tmp_path_factory.mktemp("agreement") / "quantized.pt")
    return ckpt, export_checkpoint(ckpt, "onnx", weight_layout="uint8").out_dir


def test_one_ulp_input_moves_the_encoder_input_by_one_ulp_and_is_undone(exported):
    model, _ = load_quantized(exported[0])
    seen = []

    def observe(module, args):  # registered after one_ulp_input's hook, it sees what the encoder gets
        seen.append(args[0].clone())

    image = photos()[0]
    handle = model.image_encoder.register_forward_pre_hook(observe)
    before = encode_image(model, image).embedding
    handle.remove()
    with one_ulp_input(model):
        handle = model.image_encoder.register_forward_pre_hook(observe)
        encode_image(model, image)
        handle.remove()
    after = encode_image(model, image).embedding
    plain, moved = seen
    assert torch.equal(moved, torch.nextafter(plain, torch.full_like(plain, float("inf"))))
    assert bool((moved > plain).all()) and float((moved - plain).abs().max()) < 1e-5
    assert torch.equal(before, after) and not model.image_encoder._forward_pre_hooks  # and the hook is gone


def test_runtime_decoder_on_fake_quant_embeddings(exported):
    ckpt, onnx_dir = exported
    model, _ = load_quantized(ckpt)
    hybrid = FakeQuantEmbeddings(Predictor(onnx_dir, "onnxruntime", num_threads=1), model)
    for image in photos():
        reference = encode_image(model, image)
        encoding = hybrid.encode(image)
        assert np.array_equal(encoding.embedding, reference.embedding.numpy())
        assert encoding.input_size == reference.input_size and encoding.original_size == image.shape[:2]
        masks_ref, iou_ref = decode_boxes(model, reference, BOXES)
        masks, iou = hybrid.decode_boxes(encoding, BOXES)
        assert masks.shape == masks_ref.shape and float(mask_iou(masks_ref, masks).mean()) >= 0.99
        assert float((iou - iou_ref).abs().max()) <= 1e-2


def _run(*args):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_eval_compare_fake_quant_reports_the_agreement_references(tmp_path):
    run_dir = tmp_path / "run"
    _run("saq.ptq", "debug=fast", "quant=w8a8", "ptq=minmax", "logger=none", "runtime.progress=false", f"hydra.run.dir={run_dir}")
    _run("saq.export", f"ckpt_path={run_dir / 'quantized.pt'}", "weight_layout=uint8")
    proc = _run("saq.eval", f"ckpt_path={run_dir / 'onnx'}", "eval.backend=onnxruntime", "eval.compare_fake_quant=true",
                "logger=none", "runtime.progress=false", f"hydra.run.dir={tmp_path / 'eval'}")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    deployed, floor = metrics["deployed_vs_fake_quant_mIoU"], metrics["fake_quant_float_order_mIoU"]
    decoder = metrics["deployed_decoder_vs_fake_quant_mIoU"]
    assert 0.0 <= floor <= 1.0 and decoder >= 0.99 and deployed >= 0.99
    assert "float order alone" in proc.stdout and "fake-quant embeddings" in proc.stdout

"""python -m saq.bench recipe on the tiny model (CPU, a few seconds) and model.checkpoint=random."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from saq.models import build_model
from saq.models.build import RANDOM_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


def test_random_checkpoint_builds_the_architecture_without_weights():
    model = build_model({"name": "tiny", "checkpoint": RANDOM_WEIGHTS, "init_seed": 3})
    assert not model.training and sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_bench_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "saq.bench", "recipe", "model=tiny", "model.checkpoint=random", "debug=fast",
                           "quant=w4a8", "ptq=qdrop", "ptq.recon.iters=2", "data.max_images=2", "runtime.progress=false",
                           f"out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["model"] == "tiny" and result["recipe"] == "qdrop" and result["random_weights"] is True
    assert result["times_s"]["calibration_s"] > 0 and result["times_s"]["reconstruction_measured_s"] > 0
    assert result["recon_units"] and all(r["ms_per_iter"] > 0 and r["measured_iters"] > 0 for r in result["recon_units"])
    assert {r["full_iters_per_unit"] for r in result["recon_units"]} == {result["full_schedule"]["iters"]} != {2}
    assert result["full_schedule"]["total_s"] > result["times_s"]["reconstruction_measured_s"]
    for block in result["eval"].values():
        assert block["s_per_image"] > 0 and block["forward_s_per_image"] > 0
        assert block["note"] == "random weights, not for accuracy"
    assert "random weights, not for accuracy" in (out / "bench.md").read_text()


@pytest.fixture(scope="module")
def tiny_w4a4_checkpoint(tmp_path_factory):
    """A tiny W4A4 checkpoint (weights hardened, activations calibrated on one box) for the benchmarks."""
    import numpy as np
    import torch

    from saq.export import save_quantized
    from saq.models import build_tiny_sam
    from saq.models.predictor import decode_boxes, encode_image
    from saq.nn import QuantRule, harden_weights_, quantize_
    from saq.ptq.calibrate import calibrate_weights_, is_activation
    from saq.quant import QuantMode, QuantSpec, iter_quantizers, quant_mode, set_quant_mode

    model = build_tiny_sam(seed=0).eval()
    layout = quantize_(model, [QuantRule("prompt_encoder*"),
                               QuantRule("*", QuantSpec(4, granularity="channel"), QuantSpec(4))])
    calibrate_weights_(model)
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    with torch.no_grad(), quant_mode(model, QuantMode.OFF):
        set_quant_mode(model, QuantMode.OBSERVE, where=is_activation)
        decode_boxes(model, encode_image(model, image), torch.tensor([[10.0, 10.0, 60.0, 80.0]]), return_masks=False)
        for _, q in iter_quantizers(model):
            if q.mode is QuantMode.OBSERVE:
                q.finalize_observer()
    set_quant_mode(model, QuantMode.QUANTIZE)
    harden_weights_(model)
    return save_quantized(tmp_path_factory.mktemp("tiny_w4a4") / "quantized.pt", model, layout, {
        "model": {"name": "tiny", "init_seed": 0, "checkpoint": None}, "quant": {"name": "w4a4"},
        "ptq": {"name": "minmax"}})


@pytest.mark.slow
def test_bench_recon_step_times_every_unit_type_eager_and_compiled(tiny_w4a4_checkpoint):
    """python -m saq.bench recon-step on a tiny quantized checkpoint: the CLM decoder layer and every
    encoder stage timed in both modes, the quantizers left final (no QDrop, no soft rounding)."""
    import torch

    from saq.nn.deploy import deployment_check

    ckpt = tiny_w4a4_checkpoint

    import saq.bench.recon_step as bench
    loaded, _ = bench.load_quantized(ckpt)
    batches = bench.unit_batches(loaded, prompts=3, generator=torch.Generator().manual_seed(0))
    [(first_stage, first_batch)] = bench.unit_batches(loaded, prompts=3, generator=torch.Generator().manual_seed(0),
                                                      decoder=False, stages=1)
    assert first_stage.name == batches[1][0].name  # the same draws, fewer batches built
    assert torch.equal(first_batch["q"][0][0], batches[1][1]["q"][0][0])
    rows = [bench.time_unit(loaded, unit, batch, rounds=1, steps=1) for unit, batch in batches]
    for unit, batch in batches:  # the compiled steps learn what the eager ones learn, bit for bit
        agreement = bench.steps_agree(loaded, unit, batch, steps=2)
        assert agreement["losses_equal"] and agreement["parameters"] > 0
        assert agreement["gradients_equal"] == agreement["gradients"] == 2 * agreement["parameters"]
        assert agreement["parameters_equal"] == agreement["parameters"]
    assert [r["kind"] for r in rows][0] == "decoder_layer" and {r["kind"] for r in rows[1:]} == {"stage"}
    assert all(len(r["ms_per_step"]["eager"]) == len(r["ms_per_step"]["compiled"]) == 1 and r["speedup"] > 0
               for r in rows)
    assert deployment_check(loaded)[1] == []  # every unit finalised: nothing dropping, nothing soft


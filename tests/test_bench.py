"""experiments/bench.py on the tiny model (CPU, a few seconds) and model.checkpoint=random."""

import json
import subprocess
import sys
from pathlib import Path

from saq.models import build_model
from saq.models.build import RANDOM_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


def test_random_checkpoint_builds_the_architecture_without_weights():
    model = build_model({"name": "tiny", "checkpoint": RANDOM_WEIGHTS, "init_seed": 3})
    assert not model.training and sum(p.numel() for p in model.parameters()) > 0


def test_bench_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "experiments/bench.py", "model=tiny", "model.checkpoint=random", "debug=fast",
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

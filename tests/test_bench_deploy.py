"""python -m saq.bench deploy on a tiny W8A8 run (CPU, under a minute): every row timed and scored."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason='the deploy extra: pip install -e ".[deploy]"')
pytest.importorskip("openvino", reason='the deploy extra: pip install -e ".[deploy]"')

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_deploy_writes_every_configuration(tmp_path, coco8):
    run = tmp_path / "run"
    data = [f"data.images={coco8['images']}", f"data.annotations={coco8['annotations']}"]
    subprocess.run([sys.executable, "-m", "saq.ptq", "model=tiny", "debug=fast", "data.max_images=3", "quant=w8a8",
                    "ptq=minmax", "runtime.progress=false", "runtime.num_threads=1", f"hydra.run.dir={run}", *data],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "saq.bench", "deploy", "--run", str(run), "--rounds", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run / "bench_deploy" / "bench_deploy.json").read_text())
    assert set(result["configs"]) == {"pytorch_fp", "pytorch_fake_quant", "onnxruntime_fp32", "onnxruntime_int8",
                                      "openvino_fp32", "openvino_int8", "openvino_int8_bf16", "openvino_bf16"}
    for name, row in result["configs"].items():
        assert len(row["raw_s"]["encoder"]) == 2 and 0 < row["encoder"]["min_s"] <= row["encoder"]["median_s"]
        assert row["decoder"]["min_s"] > 0
        assert 0.0 <= row["accuracy"]["fidelity_mIoU"] <= 1.0
    assert result["configs"]["onnxruntime_fp32"]["encoder_speedup"] == 1.0
    assert result["configs"]["pytorch_fp"]["accuracy"]["fidelity_mIoU"] == 1.0
    assert result["configs"]["onnxruntime_int8"]["files_bytes"]["encoder"] > 0
    assert result["kept_fp"] == [] and (run / "onnx" / "encoder.onnx").is_file()
    assert "| onnxruntime_int8 |" in (run / "bench_deploy" / "bench_deploy.md").read_text()

    # the runtime's own int8 layout (onnxruntime's static quantizer on the FP file), for comparison
    proc = subprocess.run([sys.executable, "-m", "saq.bench", "deploy", "--run", str(run), "--rounds", "1",
                           "--no-accuracy", "--configs", "onnxruntime_fp32", "onnxruntime_own_int8", "openvino_own_int8",
                           "--out", str(tmp_path / "own")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import onnx

    own = onnx.load(str(run / "onnx_own_int8" / "encoder.onnx"))
    assert sum(node.op_type == "QuantizeLinear" for node in own.graph.node) > 0
    assert "quantize_static" in json.loads((run / "onnx_own_int8" / "export.json").read_text())["note"]
    rows = json.loads((tmp_path / "own" / "bench_deploy.json").read_text())["configs"]
    assert set(rows) == {"onnxruntime_fp32", "onnxruntime_own_int8", "openvino_own_int8"}
    assert all(row["encoder"]["min_s"] > 0 for row in rows.values())


def test_bench_deploy_refuses_a_dir_without_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "saq.bench", "deploy", "--run", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "has no quantized.pt" in proc.stderr

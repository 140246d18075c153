"""End-to-end runs through the real entry points (subprocesses, as a user runs them)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saq.export import load_quantized
from saq.nn.deploy import deployment_check

from helpers.cli import read, run


@pytest.mark.slow
def test_tiny_run_writes_outputs_and_eval_reproduces(tmp_path):
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    proc = run("saq.ptq", "debug=fast", "quant=w6a6", "ptq=percentile", f"hydra.run.dir={run_dir}")
    assert "| tiny  | w6a6  | percentile |" in proc.stdout  # the results table is printed
    metrics = read(run_dir / "metrics.json")
    assert read(run_dir / "status.json") == {**read(run_dir / "status.json"), "state": "completed", "error": None}
    for block in ("fp", "quantized"):
        assert set(metrics[block]) >= {"mask_AP", "mask_AP50", "mask_AP75", "mIoU"}
    assert metrics["recipe"] == "percentile" and metrics["quant"] == "w6a6" and metrics["model"] == "tiny"
    assert metrics["wall_time_s"] > 0
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "log.jsonl").is_file()

    # deployable is the check's result on the saved model, not a copy of the config
    model, payload = load_quantized(run_dir / "quantized.pt")
    assert (metrics["deployable"], metrics["deployment_problems"]) == (True, [])
    assert deployment_check(model) == (metrics["quantizers_checked"], []) and metrics["quantizers_checked"] > 0
    assert payload["config"]["quant"]["name"] == "w6a6" and torch.__version__.startswith(payload["versions"]["torch"])

    run("saq.eval", f"ckpt_path={run_dir / 'quantized.pt'}", "logger=none", f"hydra.run.dir={eval_dir}")
    again = read(eval_dir / "metrics.json")
    assert again["quantized"] == {k: v for k, v in metrics["quantized"].items() if k != "fidelity_mIoU"}
    assert (again["deployable"], again["deployment_problems"], again["quantizers_checked"]) == \
        (True, [], metrics["quantizers_checked"])


@pytest.mark.slow
def test_wandb_offline_by_default(tmp_path):
    run_dir = tmp_path / "run"
    run("saq.ptq", "debug=fast", "logger=wandb", f"hydra.run.dir={run_dir}", wandb_mode="offline")
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_failed_run_reports_status(tmp_path):
    run_dir = tmp_path / "run"
    proc = run("saq.ptq", "model=vit_t", f"model.checkpoint={tmp_path}/missing.pt", "model.npm_fallback=false", "logger=none",
               f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode != 0
    status = read(run_dir / "status.json")
    assert status["state"] == "failed" and "checkpoint not found" in status["error"]


@pytest.mark.slow
def test_sweep_prints_and_writes_summary(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run("saq.ptq", "-m", "debug=fast", "quant=w8a8,w4a4", f"hydra.sweep.dir={sweep}")
    assert "2/2 jobs completed" in proc.stdout
    summary = (sweep / "summary.md").read_text()
    assert "| w8a8" in summary and "| w4a4" in summary and summary.count("| fp32") == 1
    assert {p.parent.name for p in sweep.glob("*/metrics.json")} == {"0", "1"}

    table = subprocess.run([sys.executable, "-m", "saq.results", str(sweep)], capture_output=True,
                           text=True, check=True).stdout
    lines = [line for line in table.splitlines() if line.startswith("| tiny")]
    assert [line.split("|")[2].strip() for line in lines] == ["fp32", "w8a8", "w4a4"]  # FP row first
    assert (sweep / "table.md").is_file() and (sweep / "table.csv").is_file()
    assert (sweep / "table.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_vit_t_coco8_fp_reproduced_and_w8a8_close(tmp_path, vit_t_checkpoint, coco8):
    fp_dir, eval_dir, q_dir = tmp_path / "fp", tmp_path / "eval", tmp_path / "w8a8"
    common = ["model=vit_t", "data=coco8_seg", "prompts=gt", "logger=none"]
    run("saq.ptq", *common, "ptq=fp", f"hydra.run.dir={fp_dir}")
    fp = read(fp_dir / "metrics.json")
    assert fp["fp"]["mask_AP"] > 50  # the real weights segment (reference: 60.4 AP, mIoU 0.688)
    assert fp["fp"]["mIoU"] == pytest.approx(0.688, abs=0.005)

    run("saq.eval", f"ckpt_path={fp_dir / 'quantized.pt'}", "logger=none", f"hydra.run.dir={eval_dir}")
    assert read(eval_dir / "metrics.json")["quantized"]["mask_AP"] == pytest.approx(fp["fp"]["mask_AP"], abs=1e-6)

    run("saq.ptq", *common, "quant=w8a8", "ptq=minmax", f"hydra.run.dir={q_dir}")
    q = read(q_dir / "metrics.json")
    assert q["fp_from_cache"] is True and q["fp"] == fp["fp"]
    model, _ = load_quantized(q_dir / "quantized.pt")
    assert (q["deployable"], q["deployment_problems"]) == (True, [])
    assert deployment_check(model) == (q["quantizers_checked"], []) and q["quantizers_checked"] > 0
    # 30 instances: one mask crossing an IoU threshold moves AP by about 1-3 points (measured drop: 2.07)
    assert abs(q["quantized"]["mask_AP"] - q["fp"]["mask_AP"]) <= 3.0
    assert q["quantized"]["fidelity_mIoU"] > 0.9


def test_sweep_jobs_are_collected_in_numeric_order(tmp_path):
    from saq.cli.callbacks import collect_sweep

    for job in range(12):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "status.json").write_text(json.dumps({"state": "completed"}))
    assert [Path(j["dir"]).name for j in collect_sweep(tmp_path)] == [str(i) for i in range(12)]


def test_sweep_table_names_what_differs_between_jobs(tmp_path):
    """A sweep over theta gets a variant column with each job's theta, without the shared overrides."""
    from saq.cli.callbacks import sweep_table

    metrics = {"model": "vit_t", "quant": "w4a4", "recipe": "saq_star", "wall_time_s": 1.0,
               "fp": {"mask_AP": 63.4, "mIoU": 0.84}, "quantized": {"mask_AP": 37.9, "mIoU": 0.75}}
    jobs = []
    for job, theta in enumerate([0.3, 0.7]):
        run_dir = tmp_path / str(job)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(
            f"- quant=w4a4\n- ptq=saq_star\n- ptq.pcc.passes=1\n- ptq.pcc.theta={theta}\n- logger=none\n")
        jobs.append({"dir": str(run_dir), "status": {"state": "completed"}, "metrics": metrics})
    lines = sweep_table(jobs).splitlines()
    assert "variant" in lines[0] and "passes" not in "".join(lines)
    assert ["ptq.pcc.theta=0.3" in lines[3], "ptq.pcc.theta=0.7" in lines[4]] == [True, True]
    assert "variant" not in sweep_table(jobs[:1]).splitlines()[0]  # one job: nothing varies

"""Every recipe runs end to end through the CLI on the tiny model and deploys honestly."""

import pytest
import torch

from helpers.cli import read, run

FAST_RECON = ["ptq.recon.iters=4", "ptq.recon.best_window=2"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra", [
    ("ptq4sam_s", ["runtime.compile=true"]),  # compiled fake quantization through the CLI
    ("brecq", FAST_RECON),
    ("brecq", FAST_RECON + ["ptq.recon.granularity=layer"]),  # AdaRound layer by layer
    ("qdrop", FAST_RECON + ["eval.reference_protocol=true"]),
    ("ptq4sam_l", FAST_RECON),
    ("saq_star", ["ptq.pcc.passes=1", "ptq.pcc.percentiles=[0.9,0.99,1.0]"]),
    ("saq_sam", FAST_RECON + ["ptq.recon.final_attn_iters=4", "ptq.pcc.passes=1", "ptq.pcc.percentiles=[0.9,1.0]"]),
    ("saq_rc", ["ptq.recon.iters=0", "ptq.recon.final_attn_iters=0"]),  # calibration and closed-form steps only
    # with the post-GELU level tables: learned steps and the refit both see them
    ("saq_rc", FAST_RECON + ["ptq.recon.final_attn_iters=4", "ptq.compensate.num_images=1",
                             "+ptq/parts@ptq=post_gelu"]),
])
def test_recipe_runs_and_deploys(recipe, extra, tmp_path):
    run_dir = tmp_path / recipe
    run("saq.ptq", "debug=fast", "quant=w4a4", f"ptq={recipe}", *extra, f"hydra.run.dir={run_dir}")
    metrics = read(run_dir / "metrics.json")
    assert metrics["recipe"] == recipe and metrics["deployable"] is True
    stages = metrics["stages"]
    ran = [k for k in stages if k not in ("seconds", "image_source")]
    assert ran and list(stages["seconds"]) == ran and all(t >= 0 for t in stages["seconds"].values())
    if "reconstruct" in stages:
        steps = 0 if "ptq.recon.iters=0" in extra else 1  # iters=0: the recipe's calibration alone
        assert stages["reconstruct"] and all(u["iters"] >= steps for u in stages["reconstruct"])
        assert (run_dir / "recon_state.pt").is_file() and (run_dir / "recon_curves.png").is_file()
    if "pcc" in stages:
        assert (run_dir / "pcc" / "search.json").is_file() and list((run_dir / "pcc").glob("*.png"))
    if "compensate" in stages:  # the refitted layers track the FP model better than nearest rounding
        comp = stages["compensate"]
        assert comp["layers"] > 0
        assert comp["mean_relative_output_error_after"] < comp["mean_relative_output_error_before"]
        assert stages["reparam"]["pairs"] == 4 and stages["reparam"]["fp_embedding_relative_error"] < 1e-4
    if "+ptq/parts@ptq=post_gelu" in extra:
        layout = torch.load(run_dir / "quantized.pt", weights_only=False)["layout"]
        tables = sorted(n for n, e in layout.items() if e["act"] and e["act"]["quantizer"] == "table")
        assert tables == ["image_encoder.blocks.0.mlp.lin2", "image_encoder.blocks.1.mlp.lin2"]
    if recipe == "qdrop":
        ref = metrics["reference_protocol"]
        assert set(ref) >= {"mask_AP", "mIoU"} and "QDrop" in ref["note"]


@pytest.mark.slow
def test_unlabeled_folder_with_auto_prompts(tmp_path):
    from PIL import Image
    import numpy as np

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8)).convert(mode).save(photos / f"{i}.png")
    run_dir = tmp_path / "run"
    run("saq.ptq", "debug=fast", "data=folder", f"data.images={photos}", "prompts=auto", "prompts.pred_iou_thresh=-1e9",
        "prompts.stability_thresh=-1e9", "prompts.max_prompts=3", "prompts.points_per_side=2", f"hydra.run.dir={run_dir}")
    metrics = read(run_dir / "metrics.json")
    assert metrics["ground_truth"] == "fp_masks"
    assert metrics["fp"]["mIoU"] == 1.0 and metrics["fp"]["mask_AP"] == pytest.approx(100.0)
    assert metrics["quantized"]["mIoU"] == pytest.approx(metrics["quantized"]["fidelity_mIoU"])
    assert (run_dir / "side_by_side.png").is_file()


@pytest.mark.slow
def test_default_demo_job_end_to_end(tmp_path, vit_t_checkpoint):
    sweep = tmp_path / "demo"
    proc = run("saq.ptq", "-m", "experiment=demo", "quant=w8a8", "data.photos=[coffee]", "calib.data.photos=[chelsea]",
               "calib.num_images=1", "prompts.points_per_side=4", f"hydra.sweep.dir={sweep}")
    assert "1/1 jobs completed" in proc.stdout and "| fp32" in proc.stdout
    metrics = read(sweep / "0" / "metrics.json")
    assert metrics["model"] == "vit_t" and metrics["ground_truth"] == "fp_masks"
    assert 0.5 < metrics["quantized"]["fidelity_mIoU"] <= 1.0
    assert (sweep / "0" / "side_by_side.png").is_file()


@pytest.mark.slow
def test_a_resumed_saq_sam_run_skips_the_stages_before_reconstruction(tmp_path):
    """Run again in its dir, a saq_sam run whose reconstruction had begun takes the bimodal fold, PCC's
    clipping and the observers' ranges from the reconstruction checkpoint instead of recomputing them,
    and reports what the first process did."""
    from recon_cli import _without_volatile

    run_dir = tmp_path / "saq_sam"
    command = ("saq.ptq", "debug=fast", "quant=w4a4", "ptq=saq_sam", "ptq.recon.iters=2", "ptq.recon.best_window=1",
               "ptq.recon.final_attn_iters=2", "ptq.pcc.passes=1", "ptq.pcc.percentiles=[0.9,1.0]",
               "eval.cache_fp=false", "eval.side_by_side=0", f"hydra.run.dir={run_dir}")
    run(*command)
    first = read(run_dir / "metrics.json")
    assert read(run_dir / "stages.json")["done"] == ["bimodal", "pcc", "calibrate", "reconstruct"]
    proc = run(*command)
    logs = proc.stdout + proc.stderr + "".join(p.read_text() for p in run_dir.glob("*.log"))
    assert "resuming after bimodal, pcc, calibrate" in logs
    again = read(run_dir / "metrics.json")
    assert _without_volatile(again) == _without_volatile(first)
    before = ("bimodal", "pcc", "calibrate")  # their times are the first process's
    assert [again["stages"]["seconds"][k] for k in before] == [first["stages"]["seconds"][k] for k in before]


@pytest.mark.slow
def test_a_run_dir_resumed_with_other_settings_is_refused(tmp_path):
    """A reconstruction checkpoint made under one recipe setting is not resumed under another: the
    second command stops with a message naming the file and the way out, and reports no numbers."""
    run_dir = tmp_path / "run"
    common = ("saq.ptq", "debug=fast", "quant=w4a4", "ptq=qdrop", "ptq.recon.iters=2", "ptq.recon.best_window=1",
              "eval.cache_fp=false", "eval.side_by_side=0", f"hydra.run.dir={run_dir}")
    run(*common)
    first = read(run_dir / "metrics.json")
    proc = run(*common, "ptq.recon.qdrop_prob=0.25", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr  # one line naming the file and the fix
    assert "recon_state.pt was written by a run with other settings" in proc.stderr
    assert read(run_dir / "stages.json")["seconds"] == first["stages"]["seconds"]  # refused before any stage ran
    assert read(run_dir / "metrics.json") == first
    # the dir's record of its settings is the first run's: resume=<dir> replays them
    assert "ptq.recon.qdrop_prob=0.25" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "ptq.recon.iters=2" in (run_dir / ".hydra" / "overrides.yaml").read_text()

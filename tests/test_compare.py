"""predictions.json.gz, the compare table over fabricated run dirs, collect into results/, and the
vit_t_coco experiment's held-out calibration."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from helpers.coco_synth import synthetic_coco
from saq.eval.bootstrap import coco_ap, match_table_from_json
from saq.eval.compare import compare_table, iteration_series, to_markdown
from saq.eval.evaluate import EvalResult
from saq.eval.metrics import coco_mask_ap, encode_mask
from saq.eval.predictions import load_predictions, save_predictions
from saq.eval.run_index import collect_run, find_runs

ROOT = Path(__file__).resolve().parents[1]


def _records(dets):
    return [{**d, "box": [1.0, 2.0, 30.0, 40.0], "iou_pred": d["score"], "iou_gt": 0.5} for d in dets]


def _degraded(dets, every: int):
    """The same prompts, every n-th mask lost (a stray 4x4 square in the corner)."""
    stray = encode_mask(np.pad(np.ones((4, 4), dtype=bool), ((0, 176), (0, 216))))
    return [{**d, "segmentation": stray} if i % every == 0 else d for i, d in enumerate(dets)]


def _eval_set(gt, calib_names=()):
    images = [SimpleNamespace(id=i["id"], path=Path("val") / i["file_name"]) for i in gt["images"]]
    return SimpleNamespace(images=images, to_coco_dict=lambda: gt), [
        SimpleNamespace(image=SimpleNamespace(path=Path("val") / n)) for n in calib_names]


def make_run(run_dir: Path, gt, dets, fp_dets, recipe: str, seed: int, quant: str = "w4a4", iters=None):
    """A run dir as saq.ptq writes it: metrics, status, Hydra config and overrides, predictions."""
    quantized = EvalResult(_records(dets), {**coco_mask_ap(gt, dets), "mIoU": 0.5 + seed / 100})
    fp = EvalResult(_records(fp_dets), {**coco_mask_ap(gt, fp_dets), "mIoU": 0.8})
    eval_set, calib = _eval_set(gt)
    save_predictions(run_dir, eval_set, fp, quantized, calib)
    metrics = {"recipe": recipe, "quant": quant, "model": "vit_t", "fp": fp.metrics,
               "quantized": {**quantized.metrics, "fidelity_mIoU": 0.7}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "status.json").write_text(json.dumps({"state": "completed"}))
    stages = ["calibrate", "reconstruct"] if iters is not None else ["calibrate"]
    recon = {"iters": 20000 if iters is None else iters}
    config = {"seed": seed, "ptq": {"name": recipe, "stages": stages, "recon": recon},
              "logger": {"group": "vit_t_coco"}}
    overrides = ["experiment=vit_t_coco", f"quant={quant}", f"ptq={recipe}", f"seed={seed}", "logger=none"]
    if iters is not None:
        overrides.append(f"ptq.recon.iters={iters}")
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return run_dir


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Baseline ptq4sam_l (seeds 0, 1; 20 and 100 iterations), minmax = the baseline's predictions,
    saq_sam clearly better, saq_base on a seed the baseline lacks."""
    root = tmp_path_factory.mktemp("sweep")
    gt, dets = synthetic_coco(2, n_images=40, tie_scores=False)
    worse, worst = _degraded(dets, 3), _degraded(dets, 2)
    job = iter(range(100))
    for seed in (0, 1):
        make_run(root / str(next(job)), gt, worse, dets, "ptq4sam_l", seed, iters=100)
        make_run(root / str(next(job)), gt, worst, dets, "ptq4sam_l", seed, iters=20)
        make_run(root / str(next(job)), gt, worse, dets, "minmax", seed)
        make_run(root / str(next(job)), gt, dets, dets, "saq_sam", seed, iters=100)
    make_run(root / str(next(job)), gt, dets, dets, "saq_base", 5, iters=100)
    return root, gt, dets


def test_predictions_file_reproduces_ap_and_is_small(tmp_path):
    gt, dets = synthetic_coco(0)
    eval_set, calib = _eval_set(gt, calib_names=[gt["images"][0]["file_name"], "other.jpg"])
    quantized = EvalResult(_records(dets), {})
    path = save_predictions(tmp_path, eval_set, quantized, quantized, calib)
    payload = load_predictions(tmp_path)
    assert path.name == "predictions.json.gz" and payload["calibration"]["in_eval"] == 1
    table = match_table_from_json(payload["evals"]["quantized"]["coco"], payload["image_ids"])
    assert coco_ap(table) == pytest.approx(coco_mask_ap(gt, dets)["mask_AP"], abs=1e-9)
    assert payload["prompts"]["image_id"] == [d["image_id"] for d in dets] and "masks" not in payload
    assert path.stat().st_size < 60 * len(dets) + 4000  # bytes: packed matches, no masks
    again = save_predictions(tmp_path / "again", eval_set, quantized, quantized, calib)
    assert again.read_bytes() == path.read_bytes()  # deterministic bytes
    with_masks = load_predictions(save_predictions(tmp_path / "masks", eval_set, quantized, quantized, masks=True))
    assert with_masks["masks"]["quantized"]["counts"] == [d["segmentation"]["counts"] for d in dets]


def test_compare_groups_pairs_and_marks_wins(sweep):
    root, gt, dets = sweep
    table = compare_table(find_runs([root]), "ptq4sam_l", num_samples=300)
    rows = {(r["recipe"], r["iters"]): r for r in table["rows"]}
    assert [(r["recipe"], r["iters"]) for r in table["rows"]] == [
        ("fp", None), ("minmax", None), ("ptq4sam_l", 20), ("ptq4sam_l", 100), ("saq_base", 100), ("saq_sam", 100)]
    assert rows[("ptq4sam_l", 100)]["verdict"] == "baseline"
    assert rows[("ptq4sam_l", 100)]["ci_low"] == rows[("ptq4sam_l", 100)]["ci_high"] == 0.0
    same = rows[("minmax", None)]  # the baseline's own predictions: a difference of exactly 0
    assert (same["delta"], same["ci_low"], same["ci_high"], same["verdict"]) == (0.0, 0.0, 0.0, "n.s.")
    better = rows[("saq_sam", 100)]
    assert better["verdict"] == "win" and better["ci_low"] > 0 and better["pairs"] == 2
    assert better["paired_seeds"] == [0, 1] and better["n"] == 2
    assert better["delta"] == pytest.approx(coco_mask_ap(gt, dets)["mask_AP"] - rows[("ptq4sam_l", 100)]["mask_AP"])
    assert rows[("saq_base", 100)]["note"] == "no seed in common with the baseline"
    assert rows[("minmax", None)]["mIoU"] == pytest.approx(0.505) and rows[("minmax", None)]["mIoU_std"] > 0
    assert set(iteration_series(table["rows"])) == {("vit_t", "w4a4", "ptq4sam_l", "")}
    markdown = to_markdown(table)
    assert "ΔAP vs ptq4sam_l" in markdown and "| win |" in markdown


@pytest.mark.slow
def test_compare_and_collect_commands(sweep, tmp_path):
    root, _, _ = sweep
    results = tmp_path / "results"
    subprocess.run([sys.executable, "-m", "saq.results", "collect", str(root), "--results", str(results)], check=True,
                   capture_output=True, text=True)
    seed_dir = results / "vit_t_coco" / "w4a4" / "ptq4sam_l-iters20" / "seed1"
    assert {p.name for p in seed_dir.rglob("*") if p.is_file()} == {
        "metrics.json", "predictions.json.gz", "status.json", "config.yaml", "overrides.yaml"}
    assert (results / "vit_t_coco" / "w4a4" / "minmax" / "seed0" / "metrics.json").is_file()

    out = subprocess.run([sys.executable, "-m", "saq.results", "compare", str(results / "vit_t_coco"), "--baseline", "ptq4sam_l",
                          "--samples", "200"], check=True, capture_output=True, text=True).stdout
    assert "| vit_t | w4a4 | saq_sam | 100 |" in out and "win" in out
    base = results / "vit_t_coco" / "compare"
    rows = list(csv.DictReader(open(base.with_suffix(".csv"))))
    assert [r["recipe"] for r in rows] == ["fp", "minmax", "ptq4sam_l", "ptq4sam_l", "saq_base", "saq_sam"]
    assert json.loads(base.with_suffix(".json").read_text())["meta"]["baseline"] == "ptq4sam_l"
    assert (results / "vit_t_coco" / "compare_iters.png").read_bytes()[:4] == b"\x89PNG"


def test_collect_refuses_to_overwrite_a_different_result(sweep, tmp_path):
    root, _, _ = sweep
    runs = [r for r in find_runs([root]) if r.recipe == "minmax" and r.seed == 0]
    collect_run(runs[0], tmp_path)
    dest = collect_run(runs[0], tmp_path)  # the same files again: fine
    (dest / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError):
        collect_run(runs[0], tmp_path)


def test_vit_t_coco_calibrates_on_train_and_evaluates_on_val():
    from conftest import require_asset
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from saq.cli.task import config_dir, register_resolvers
    from saq.data import select_calibration
    from saq.data.prompts import gt_prompts
    from saq.data.sources import dataset_from_config

    require_asset("coco_subset/instances_val2017.json")
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="ptq", overrides=["experiment=vit_t_coco"]), resolve=True)
    assert cfg["model"]["name"] == "vit_t" and cfg["prompts"]["source"] == "gt"
    assert cfg["calib"]["num_images"] == 32 and cfg["calib"]["max_prompts_per_image"] == 16
    eval_set, calib_set = dataset_from_config(cfg["data"]), dataset_from_config(cfg["calib"]["data"])
    assert len(eval_set.images) == 128 and len(calib_set.images) == 130
    assert sum(len(v) for v in gt_prompts(eval_set).values()) == 977
    # never an evaluation image in calibration: other folder, other files, other COCO images
    assert {i.path.parent for i in eval_set.images}.isdisjoint({i.path.parent for i in calib_set.images})
    assert {i.path.name for i in eval_set.images}.isdisjoint({i.path.name for i in calib_set.images})
    assert {i.source_id for i in eval_set.images}.isdisjoint({i.source_id for i in calib_set.images})
    items = select_calibration(calib_set, gt_prompts(calib_set), 32, "random", 0, 16)
    assert len({i.image.path for i in items}) == 32 and max(len(i.prompts) for i in items) == 16


@pytest.mark.slow
def test_a_run_writes_predictions_that_reproduce_its_ap(tmp_path):
    """Through the real entry point (tiny model): predictions.json.gz next to metrics.json."""
    from test_pipeline import read, run

    run("saq.ptq", "debug=fast", "quant=w6a6", "ptq=minmax", f"hydra.run.dir={tmp_path}")
    metrics, payload = read(tmp_path / "metrics.json"), load_predictions(tmp_path)
    for which in ("quantized", "fp"):
        table = match_table_from_json(payload["evals"][which]["coco"], payload["image_ids"])
        assert coco_ap(table) == pytest.approx(metrics[which]["mask_AP"], abs=1e-6)
    assert len(payload["evals"]["quantized"]["iou_gt"]) == len(payload["prompts"]["box"]) == metrics["eval_prompts"]
    assert payload["calibration"]["images"] == metrics["calibration"]["images"]


def test_cost_rows_take_the_median_over_seeds_and_split_units_by_kind(tmp_path):
    from saq.eval.costs import cost_markdown, cost_rows
    from saq.eval.run_index import RunInfo

    def run(seed, wall, calibrate, recon, ms):
        metrics = {"wall_time_s": wall, "stages": {
            "seconds": {"calibrate": calibrate, "reconstruct": recon},
            "reconstruct": [{"unit": "image_encoder.layers.2", "kind": "stage", "iters": 20, "ms_per_iter": ms},
                            {"unit": "mask_decoder.transformer.layers.0", "iters": 20, "ms_per_iter": 2 * ms}]}}
        return RunInfo(tmp_path / f"s{seed}", metrics, "vit_t", "w4a4", "saq_sam", "", seed, 20, "completed", None)

    fast = RunInfo(tmp_path / "m", {"wall_time_s": 60.0, "stages": {"seconds": {"calibrate": 30.0}}}, "vit_t",
                   "w4a4", "minmax", "", 0, None, "completed", None)
    rows = cost_rows([run(0, 600.0, 100.0, 300.0, 1000.0), run(1, 900.0, 200.0, 500.0, 3000.0), fast])
    assert [r["recipe"] for r in rows] == ["minmax", "saq_sam"]  # the table's recipe order
    saq = rows[1]
    assert saq["seeds"] == [0, 1] and saq["wall_s"] == 750.0 and saq["calibrate_s"] == 150.0
    assert saq["eval_and_rest_s"] == 200.0  # wall minus the stages, per run, then the median
    assert saq["ms_per_iter"] == {"decoder_layer": 4000.0, "stage": 2000.0}  # kind recorded, or read from the name
    assert rows[0]["ms_per_iter"] == {} and rows[0]["reconstruct_s"] is None
    table = cost_markdown(rows)
    assert "| w4a4 | saq_sam | 20 | 0,1 | 12.5 |" in table and "stage ms/iter" in table


def test_compare_names_a_corrupt_predictions_file(sweep, tmp_path):
    import shutil

    root, _, _ = sweep
    copy = tmp_path / "sweep"
    shutil.copytree(root, copy)
    victim = sorted(copy.glob("*/predictions.json.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated
    proc = subprocess.run([sys.executable, "-m", "saq.results", "compare", str(copy),
                           "--baseline", "ptq4sam_l", "--samples", "20", "--out", str(tmp_path / "c")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(victim) in proc.stderr.strip().splitlines()[-1]

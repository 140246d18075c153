"""Sharded evaluation: N shards merged give the unsharded metrics to the last digit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNLABELLED = ["data=skimage", "data.photos=[coffee,rocket,camera]", "prompts=auto", "prompts.pred_iou_thresh=-100",
              "prompts.stability_thresh=0", "prompts.points_per_side=2"]


def run(*args, check=True):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, coco8):
    run_dir = tmp_path_factory.mktemp("ptq") / "run"
    run("-m", "saq.ptq", "debug=fast", "quant=w4a8", "ptq=minmax", "data=coco8_seg", "runtime.progress=false",
        f"hydra.run.dir={run_dir}")
    return run_dir / "quantized.pt"


def _eval(checkpoint, out, *overrides):
    run("-m", "saq.eval", f"ckpt_path={checkpoint}", "logger=none", "runtime.progress=false", f"hydra.run.dir={out}",
        *overrides)
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("data", [[], UNLABELLED], ids=["labels", "fp_masks"])
def test_merged_shards_equal_the_unsharded_evaluation(checkpoint, tmp_path, data):
    whole = _eval(checkpoint, tmp_path / "whole", *data)["quantized"]
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, out in enumerate(shards):
        part = _eval(checkpoint, out, *data, "eval.num_shards=2", f"eval.shard={i}")
        assert part["shard"]["index"] == i and part["shard"]["of"] == 2
    run("-m", "saq.eval.merge", str(tmp_path / "merged"), *map(str, reversed(shards)))
    merged = json.loads((tmp_path / "merged" / "metrics.json").read_text())["quantized"]
    for key, value in whole.items():
        assert merged[key] == value, key  # exactly: same sequences in the same order
    assert ("fidelity_mIoU" in whole) == bool(data)


@pytest.mark.slow
def test_incomplete_or_bad_shards_are_refused(checkpoint, tmp_path):
    _eval(checkpoint, tmp_path / "s0", "eval.num_shards=2", "eval.shard=0")
    proc = run("-m", "saq.eval.merge", str(tmp_path / "m"), str(tmp_path / "s0"), check=False)
    assert proc.returncode == 2 and "missing [1]" in proc.stderr
    proc = run("-m", "saq.eval", f"ckpt_path={checkpoint}", "logger=none", "eval.num_shards=2", "eval.shard=2",
               f"hydra.run.dir={tmp_path / 'bad'}", check=False)
    assert proc.returncode != 0 and "eval.shard=2" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_shards_of_different_evaluations_are_refused(checkpoint, tmp_path):
    """Shards over other image sets, other weights under the same path, or holding images twice."""
    import copy

    from saq.eval.shards import ShardError, load_shard, merge_shards

    _eval(checkpoint, tmp_path / "s0", "eval.num_shards=2", "eval.shard=0")
    _eval(checkpoint, tmp_path / "s1_fewer", "eval.num_shards=2", "eval.shard=1", "data=coco8_seg",
          "data.max_images=6")
    proc = run("-m", "saq.eval.merge", str(tmp_path / "m"), str(tmp_path / "s0"), str(tmp_path / "s1_fewer"),
               check=False)
    assert proc.returncode == 2 and "evaluation image set" in proc.stderr and "8 images" in proc.stderr
    assert not (tmp_path / "m" / "metrics.json").exists()

    first = load_shard(tmp_path / "s0")
    other_weights = {**copy.deepcopy(first), "shard": 1, "checkpoint_sha256": "0" * 64}
    with pytest.raises(ShardError, match=r"checkpoint contents \(sha256\)"):
        merge_shards([first, other_weights])
    other_prompts = {**copy.deepcopy(first), "shard": 1, "inputs_sha256": "0" * 64}
    with pytest.raises(ShardError, match="data and prompt settings"):
        merge_shards([first, other_prompts])
    twice = {**copy.deepcopy(first), "shard": 1}  # shard 0's images again, labelled shard 1
    with pytest.raises(ShardError, match="shard 1 of 2 holds images"):
        merge_shards([first, twice])

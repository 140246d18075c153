"""The stages of a run share one image source: each calibration image is read once and FP-encoded once."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import saq.ptq.image_source as image_source
from saq.cli.task import config_dir, register_resolvers
from saq.data import dataset_from_config, gt_prompts, select_calibration
from saq.data.calibration import cap_prompts
from saq.models import build_tiny_sam
from saq.models.predictor import encode_image
from saq.nn import quantize_
from saq.ptq.recipe import rules_from_config
from saq.ptq.stages import StageContext, run_stages
from saq.quant import QuantMode, quant_mode
from saq.utils.loggers import RunLogger


@pytest.mark.slow
def test_every_stage_reads_each_image_once(coco8, tmp_path, monkeypatch):
    register_resolvers()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("ptq", overrides=["debug=fast", "ptq=saq_sam", "quant=w4a8", "ptq.recon.iters=2",
                                        "ptq.recon.final_attn_iters=2",
                                        "ptq.pcc.num_images=2", "ptq.pcc.passes=1", "ptq.pcc.percentiles=[0.99,0.999]"])
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    ds = dataset_from_config(coco8)
    items = select_calibration(ds, gt_prompts(ds), 3, "first")
    reads = []
    real_load = image_source.load_image
    monkeypatch.setattr(image_source, "load_image", lambda path: reads.append(path) or real_load(path))
    model = build_tiny_sam(seed=2).eval()
    quantize_(model, rules_from_config(config["quant"], config["ptq"]))
    ctx = StageContext(model, items, cap_prompts(items, 2), config, tmp_path, RunLogger(tmp_path), False)
    info = run_stages(ctx)
    assert [s for s in info if s not in ("image_source", "seconds")] == ["bimodal", "pcc", "calibrate", "reconstruct"]
    assert list(info["seconds"]) == ["bimodal", "pcc", "calibrate", "reconstruct"]
    # bimodal, PCC, the observers and reconstruction's captures: 3 files read once each
    assert sorted(reads) == sorted(i.image.path for i in items)
    # BIG's image is one of PCC's two: two FP encoder passes in all
    assert info["image_source"] == {"images_decoded": 3, "fp_encoder_passes": 2}


def test_fp_embedding_is_the_fp_models_own(coco8):
    ds = dataset_from_config(coco8)
    item = select_calibration(ds, gt_prompts(ds), 1, "first")[0]
    model = build_tiny_sam(seed=2).eval()
    source = image_source.ImageSource(model)
    with quant_mode(model, QuantMode.OFF):
        expected = encode_image(model, image_source.load_image(item.image.path)).embedding
    assert torch.equal(source.fp_embedding(item.image.path).embedding, expected)
    assert source.fp_embedding(item.image.path) is source.fp_embedding(item.image.path)


@pytest.mark.slow
def test_saq_sam_at_zero_iterations_is_saq_star(coco8, tmp_path):
    """At ptq.recon.iters=0 a reconstruction recipe is its calibration alone, frozen: saq_sam's stages
    give saq_star's model tensor for tensor (and so saq_base/saq_par give ptq4sam_s's: the same stages
    without PCC). The benchmark's iters=0 controls rest on this."""
    from saq.nn import harden_weights_

    register_resolvers()
    ds = dataset_from_config(coco8)
    items = select_calibration(ds, gt_prompts(ds), 3, "first")
    states = []
    for recipe in ("saq_sam", "saq_star"):
        with initialize_config_dir(config_dir(), version_base="1.3"):
            cfg = compose("ptq", overrides=["debug=fast", f"ptq={recipe}", "quant=w4a4", "ptq.recon.iters=0",
                                            "ptq.recon.final_attn_iters=0", "ptq.pcc.num_images=2",
                                            "ptq.pcc.passes=1", "ptq.pcc.percentiles=[0.9,1.0]"])
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        model = build_tiny_sam(seed=2).eval()
        quantize_(model, rules_from_config(config["quant"], config["ptq"]))
        info = run_stages(StageContext(model, items, cap_prompts(items, 2), config, tmp_path / recipe,
                                       RunLogger(tmp_path / recipe), False))
        assert ("reconstruct" in info) == (recipe == "saq_sam")
        harden_weights_(model)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert [k for k in states[0] if not torch.equal(states[0][k], states[1][k])] == []

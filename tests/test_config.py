"""Every config of every group composes, and experiment files resolve."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saq.cli.task import config_dir, register_resolvers
from saq.nn import QuantRule
from saq.ptq.recipe import rules_from_config

CONF = Path(config_dir())
GROUPS = ["model", "quant", "ptq", "data", "prompts", "calib", "eval", "runtime", "logger", "cluster", "debug",
          "experiment"]


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides, config_name="ptq", hydra_cfg=False):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_composes_and_resolves(group, option):
    overrides = [f"{group}={option}"]
    if option == "detector":
        overrides.append("prompts.path=/data/dets.json")
    if option == "coco":
        overrides += ["data.images=/data/coco/val2017", "data.annotations=/data/coco/instances_val2017.json"]
    cfg = _compose(overrides, hydra_cfg=group == "cluster")
    if group == "cluster":
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["model"]["name"] and container["quant"]["name"]
    assert rules_from_config(container["quant"], container["ptq"])


def test_eval_config_composes():
    cfg = _compose(["ckpt_path=/x/quantized.pt"], config_name="eval")
    assert cfg.ckpt_path == "/x/quantized.pt" and cfg.get("data") is None


def test_assets_path_is_a_setting(monkeypatch):
    monkeypatch.delenv("SAQ_ASSETS", raising=False)
    cfg = _compose(["paths.assets=/elsewhere"])
    assert OmegaConf.to_container(cfg, resolve=True)["data"]["images"] == "/elsewhere/data/coco8_seg/images"
    default = OmegaConf.to_container(_compose([]), resolve=True)["paths"]["assets"]
    assert Path(default) == CONF.parent / ".." / "shared" / "assets"


def test_w4a16_is_weight_only_and_component_overrides():
    c = OmegaConf.to_container(_compose(["quant=w4a16"]), resolve=True)
    rules = rules_from_config(c["quant"], c["ptq"])
    enc = next(r for r in rules if r.pattern == "image_encoder*")
    assert enc.weight.bits == 4 and enc.act is None
    c = OmegaConf.to_container(_compose(["quant=w4a4", "quant.decoder.a_bits=8", "ptq=percentile"]), resolve=True)
    rules = {r.pattern: r for r in rules_from_config(c["quant"], c["ptq"])}
    assert rules["image_encoder*"].act.bits == 4 and rules["mask_decoder*"].act.bits == 8
    assert rules["mask_decoder*"].act.observer == "percentile"
    assert rules["prompt_encoder*"] == QuantRule("prompt_encoder*")


def test_slurm_cluster_uses_submitit():
    cfg = _compose(["cluster=slurm", "cluster.partition=gpu", "cluster.timeout_min=60"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert launcher.partition == "gpu" and launcher.timeout_min == 60 and launcher.gpus_per_node == 1
    assert launcher.max_num_timeout == 3 and launcher.signal_delay_s == 120  # requeued on preemption / time limit


def test_submitit_local_cluster_uses_the_local_executor():
    cfg = _compose(["cluster=submitit_local", "cluster.timeout_min=5"], hydra_cfg=True)
    assert "LocalLauncher" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.timeout_min == 5


def test_sweep_summary_callback_registered():
    cfg = _compose([], hydra_cfg=True)
    assert cfg.hydra.callbacks.sweep_summary._target_ == "saq.cli.callbacks.SweepSummary"


def test_a_misspelt_option_lists_only_selectable_options():
    """Shared partials live in parts/ so Hydra's 'Available options' shows only real choices."""
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        _compose(["quant=w5a5"])
    assert sorted(err.value.options) == _options("quant") == ["w4a16", "w4a4", "w4a8", "w6a6", "w8a8"]

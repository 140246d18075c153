"""The typed config schema: bad choices and unknown keys fail before anything runs, naming the key."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from saq.cli.task import config_dir, register_resolvers
from saq.config import ConfigError, validate_ptq_config
from saq.config.schema import DecoderLoss, quant_label
from saq.engine.reconstruction import recon_settings


def _compose(overrides, config="ptq"):
    register_resolvers()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose(config, overrides=overrides)


@pytest.mark.parametrize("key,bad,valid", [
    ("ptq.recon.decoder_loss", "clmm", "[mse, clm]"),
    ("ptq.recon.weights", "adarond", "[adaround, nearest]"),
    ("ptq.recon.activations", "lsqq", "[lsq, fixed]"),
    ("ptq.recon.encoder_loss", "pra", "[mse, par]"),
    ("ptq.recon.cache_dtype", "fp16", "[float32, float16, bfloat16]"),
    ("ptq.recon.granularity", "row", "[layer, subblock, block, stage]"),
    ("ptq.act_observer.name", "mmse", "minmax"),
    ("calib.strategy", "best", "[random, first]"),
])
def test_a_bad_choice_fails_at_composition_with_the_choices(key, bad, valid):
    with pytest.raises(ConfigCompositionException) as err:
        _compose([f"{key}={bad}"])
    message = str(err.value.__cause__ or err.value)
    assert f"Invalid value '{bad}'" in message and valid in message


@pytest.mark.parametrize("config,key,bad,valid", [
    ("eval", "eval.backend", "onnx", "[torch, onnxruntime, openvino]"),
    ("eval", "eval.runtime_precision", "fp16", "[fp32, bf16]"),
    ("eval", "runtime.num_threads", "two", "num_threads"),
    ("export", "format", "onnxx", "[onnx, onnx_fp]"),
    ("export", "weight_layout", "int9", "[auto, symmetric, int8, uint8]"),
    ("export", "opset", "seventeen", "opset"),
])
def test_eval_and_export_have_schemas_too(config, key, bad, valid):
    with pytest.raises(ConfigCompositionException) as err:
        _compose(["ckpt_path=run/quantized.pt", f"{key}={bad}"], config)
    message = str(err.value.__cause__ or err.value)
    assert bad in message and valid in message
    with pytest.raises(ConfigCompositionException):  # a misspelt key
        _compose(["ckpt_path=run/quantized.pt", f"{key}x={bad}"], config)
    cfg = _compose(["ckpt_path=run/quantized.pt"], config)
    assert cfg.ckpt_path == "run/quantized.pt"


def test_a_misspelt_key_fails():
    with pytest.raises(ConfigCompositionException):
        _compose(["ptq.recon.weigths=nearest"])
    cfg = _compose(["+ptq.recon.weigths=nearest"])  # `+` adds past the schema: the validation catches it
    with pytest.raises(ConfigError, match="weigths"):
        validate_ptq_config(cfg)


@pytest.mark.parametrize("override,key", [
    ("quant.encoder.w_bits=0", "quant.encoder.w_bits=0"),
    ("quant.decoder.a_bits=17", "quant.decoder.a_bits=17"),
    ("ptq.recon.qdrop_prob=1.5", "ptq.recon.qdrop_prob=1.5"),
    ("ptq.pcc.theta=0", "ptq.pcc.theta=0"),
    ("ptq.recon.iters=-1", "ptq.recon.iters=-1"),
    ("calib.num_images=0", "calib.num_images=0"),
    ("data.max_images=0", "data.max_images=0"),
    ("quant.name=w8a8", "quant.name=w8a8: the bits used are w4a4"),
])
def test_values_out_of_range_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_ptq_config(_compose(["quant=w4a4", override]))


def test_a_quant_name_of_ones_own_keeps_the_bits_label():
    validate_ptq_config(_compose(["quant=w4a4", "quant.name=w4a4-mine"]))


def test_every_shipped_recipe_and_experiment_validates():
    conf = Path(config_dir())
    for group in ("ptq", "quant", "experiment"):
        for option in sorted(p.stem for p in (conf / group).glob("*.yaml")):
            validate_ptq_config(_compose([f"{group}={option}"]))


def test_the_quant_label_follows_the_bits_used():
    assert _compose(["quant=w8a8", "quant.encoder.w_bits=3"]).quant.name == "w3a8"
    assert _compose(["quant=w4a16"]).quant.name == "w4a16"
    assert _compose(["quant=w4a4", "quant.decoder.a_bits=8"]).quant.name == "w4a4-dec-w4a8"
    assert quant_label(None, None, None, None) == "w16a16"


def test_engine_settings_are_typed_and_reject_strings_outside_the_choices():
    settings = recon_settings({"decoder_loss": "clm", "iters": 3})
    assert settings.decoder_loss is DecoderLoss.clm and settings.iters == 3
    with pytest.raises(ValueError, match="decoder_loss='clmm'.*mse"):
        recon_settings({"decoder_loss": "clmm"})


def test_the_cli_refuses_a_bad_value_before_creating_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "saq.ptq", "debug=fast", "quant.encoder.w_bits=0",
                           f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True,
                          cwd=Path(config_dir()).parent)
    assert proc.returncode != 0
    assert "config error: quant.encoder.w_bits=0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
    # Hydra made the dir before the check: it says why it holds no results
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "quant.encoder.w_bits=0" in status["error"]

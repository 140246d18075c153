"""Checks the schema's types cannot express: value ranges and keys added with ``+key=value``.

Run on the composed config before any work starts; every message names the config key.
"""

from __future__ import annotations

from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from saq.config.schema import PRECISIONS, PTQRunConfig, quant_label
from saq.utils.errors import SaqUserError

MIN_BITS, MAX_BITS = 2, 16


class ConfigError(SaqUserError, ValueError):
    """A config value that cannot be run; the message names the key and what is valid."""


class RunDirHoldsOtherSettingsError(ConfigError):
    """The run dir holds resumable work made under other settings: this run must leave it as it was."""


def _bits_entries(quant: DictConfig) -> Iterator[tuple[str, Any]]:
    for part in ("encoder", "decoder"):
        for kind in ("w_bits", "a_bits"):
            yield f"quant.{part}.{kind}", quant[part][kind]
    for i, rule in enumerate(quant.rules):
        for kind in ("w_bits", "a_bits"):
            yield f"quant.rules[{i}].{kind}", rule.get(kind)


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: {rule}")


def _check_range(cfg: DictConfig, key: str, low: float, high: float, *, low_open: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    inside = (low < value if low_open else low <= value) and value <= high
    bracket = "(" if low_open else "["
    _check(inside, key, value, f"must lie in {bracket}{low}, {high}]")


def check_no_unknown_keys(cfg: DictConfig) -> None:
    """Keys added with ``+key=value`` bypass the schema at composition: merge into it again."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    try:
        OmegaConf.merge(OmegaConf.structured(PTQRunConfig), plain)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{exc.full_key or 'config'}: {str(exc).splitlines()[0]}") from None


def _check_quant_name(quant: DictConfig) -> None:
    """A hand-typed quant.name must not contradict the bits (a 4-bit run labelled w8a8 in every table):
    it must be the label the bits give, optionally followed by a suffix of one's own (w4a4-mine)."""
    derived = quant_label(quant.encoder.w_bits, quant.encoder.a_bits, quant.decoder.w_bits, quant.decoder.a_bits)
    name = str(quant.name)
    _check(name == derived or name.startswith(derived + "-"), "quant.name", name,
           f"the bits used are {derived}; leave quant.name unset (it follows the bits) or start it with {derived}-")


def validate_ptq_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first value outside its valid range."""
    check_no_unknown_keys(cfg)
    for key, bits in _bits_entries(cfg.quant):
        _check(bits is None or (isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS), key, bits,
               f"bit widths must be integers in [{MIN_BITS}, {MAX_BITS}] (or null for floating point)")
    _check_quant_name(cfg.quant)
    for key in ("ptq.recon.qdrop_prob", "ptq.recon.warmup", "eval.reference_drop_prob"):
        _check_range(cfg, key, 0.0, 1.0)
    _check_range(cfg, "ptq.pcc.theta", 0.0, 1.0, low_open=True)
    for key in ("ptq.recon.w_lr", "ptq.recon.a_lr", "ptq.recon.p"):
        _check_range(cfg, key, 0.0, float("inf"), low_open=True)
    for key in ("ptq.recon.iters", "ptq.recon.final_attn_iters", "ptq.recon.decoder_iters", "ptq.recon.reg_weight", "ptq.recon.par_mse_weight",
                "eval.side_by_side", "eval.num_workers"):
        _check_range(cfg, key, 0, float("inf"))
    for key in ("ptq.recon.best_window", "ptq.agq_max_maps", "ptq.pcc.passes", "ptq.pcc.num_images", "calib.num_images",
                "calib.max_prompts_per_image", "eval.prompt_batch"):
        _check_range(cfg, key, 1, float("inf"))
    for i, p in enumerate(cfg.ptq.pcc.percentiles or []):
        _check(0.5 < p <= 1.0, f"ptq.pcc.percentiles[{i}]", p, "clip percentiles must lie in (0.5, 1]")
    _check(cfg.runtime.precision in PRECISIONS, "runtime.precision", cfg.runtime.precision,
           f"choose one of {list(PRECISIONS)}")
    _check(str(cfg.eval.backend) == "torch", "eval.backend", cfg.eval.backend,
           "saq.ptq evaluates the fake-quantized PyTorch model; runtimes evaluate exported files: "
           "python -m saq.export, then python -m saq.eval ckpt_path=<run>/onnx eval.backend=...")
    if cfg.ptq.quantize:
        _check(len(cfg.ptq.stages) > 0, "ptq.stages", list(cfg.ptq.stages), "a quantizing recipe needs stages")
        _check_stage_order([str(s) for s in cfg.ptq.stages])
    _check_range(cfg, "ptq.reparam.strength", 0.0, 1.0)
    _check_range(cfg, "ptq.compensate.ridge", 0.0, float("inf"))
    for key in ("ptq.reparam.num_images", "ptq.compensate.num_images", "data.max_images", "calib.data.max_images"):
        _check_range(cfg, key, 1, float("inf"))  # null: all
    _check(cfg.eval.num_shards == 1, "eval.num_shards", cfg.eval.num_shards,
           "python -m saq.ptq evaluates every image; shard the evaluation of its quantized.pt with "
           "python -m saq.eval ckpt_path=<run>/quantized.pt eval.num_shards=N eval.shard=i")


def _check_stage_order(stages: list[str]) -> None:
    """reparam changes the FP weights every range is measured on: before pcc and calibrate. compensate
    replaces weights (and the FP targets reconstruction would compute from them): after calibrate and
    after reconstruct."""
    def before(a: str, b: str, why: str) -> None:
        if a in stages and b in stages:
            _check(stages.index(a) < stages.index(b), "ptq.stages", stages, f"{a} must come before {b}: {why}")

    _check(len(set(stages)) == len(stages), "ptq.stages", stages, "a stage may appear once")
    before("reparam", "pcc", "it rescales the weights PCC's ranges are searched on")
    before("reparam", "calibrate", "it rescales the weights and activations the observers measure")
    before("calibrate", "compensate", "compensation needs the calibrated activation ranges")
    before("reconstruct", "compensate", "reconstruction's FP targets come from the weights compensation replaces")
    if "compensate" in stages:
        _check("calibrate" in stages, "ptq.stages", stages, "compensate needs calibrate before it")


def validate_shard(num_shards: Any, shard: Any) -> None:
    """``eval.num_shards`` >= 1 and ``eval.shard`` one of 0 .. num_shards - 1."""
    _check(isinstance(num_shards, int) and num_shards >= 1, "eval.num_shards", num_shards, "an integer >= 1")
    _check(isinstance(shard, int) and 0 <= shard < num_shards, "eval.shard", shard,
           f"an integer in [0, {num_shards - 1}] (eval.num_shards={num_shards})")

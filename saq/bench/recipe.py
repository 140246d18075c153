"""Benchmark a PTQ recipe: where its time and memory go, and what its full schedule would cost.

    python -m saq.bench recipe model=tiny debug=fast ptq=saq_sam ptq.recon.iters=3 --out outputs/bench/tiny
    python -m saq.bench recipe model=vit_b model.checkpoint=random ptq=saq_sam ptq.recon.iters=3 \
        runtime.device=cuda data=skimage prompts=auto out=outputs/bench/vit_b

Takes the same Hydra overrides as ``python -m saq.ptq`` (the config is composed the same way) and
measures, with synchronised timers on CUDA: calibration, BIG and PCC time (when the recipe has them),
reconstruction ms/iteration and peak memory per unit type (a few iterations per unit, from
``ptq.recon.iters``), evaluation seconds/image FP vs fake-quantized, and the recipe's total time at
its full schedule (the composed config without the ``ptq.recon.*iters`` overrides), extrapolated from
the measured ms/iteration. ``model.checkpoint=random`` times an architecture without its weights: every
output is then marked "random weights, not for accuracy". Writes bench.json and bench.md to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from saq.cli.task import config_dir, register_resolvers

RANDOM_NOTE = "random weights, not for accuracy"


def measured_overrides(overrides: list[str], cfg) -> list[str]:
    """A shortened ``ptq.recon.iters`` also shortens the decoder units that have their own count."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if "ptq.recon.iters" not in keys:
        return overrides
    own_counts = [k for k in ("final_attn_iters", "decoder_iters")
                  if f"ptq.recon.{k}" not in keys and cfg.ptq.recon.get(k) is not None]
    return [*overrides, *(f"ptq.recon.{k}={cfg.ptq.recon.iters}" for k in own_counts)]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="ptq", overrides=overrides)


def full_schedule_overrides(overrides: list[str]) -> list[str]:
    """The overrides without those that shorten reconstruction: what the recipe runs at full length."""
    return [o for o in overrides if not o.lstrip("+~").startswith("ptq.recon.") or "iters" not in o.split("=")[0]]


class Clock:
    """Wall time of a block, synchronised with the device so queued CUDA work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, record: dict[str, float], key: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            record[key] = record.get(key, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def step_timer(clock: Clock) -> Iterator[dict[str, list[float]]]:
    """Seconds of every reconstruction training step, by unit name (the loop itself, no setup)."""
    from saq.engine.reconstruction import UnitReconstruction

    steps: dict[str, list[float]] = defaultdict(list)
    original = UnitReconstruction.training_step

    def timed(self, *args, **kwargs):
        clock.sync()
        start = time.perf_counter()
        out = original(self, *args, **kwargs)
        clock.sync()
        steps[self.unit.name].append(time.perf_counter() - start)
        return out

    UnitReconstruction.training_step = timed
    try:
        yield steps
    finally:
        UnitReconstruction.training_step = original


def forward_seconds(model, eval_set, prompts, clock: Clock, limit: int = 4) -> float:
    """Median synchronised encoder + decoder time of one image (no image decoding, no metrics)."""
    from saq.data.coco import load_image
    from saq.models.predictor import decode_boxes, encode_image

    times = []
    for img in [i for i in eval_set.images if prompts.get(i.id)][:limit]:
        image, boxes = load_image(img.path), torch.tensor([p.box_xyxy for p in prompts[img.id]])
        record: dict[str, float] = {}
        with torch.no_grad(), clock(record, "t"):
            decode_boxes(model, encode_image(model, image), boxes)
        times.append(record["t"])
    return statistics.median(times) if times else float("nan")


def evaluation(model, eval_set, prompts, cfg, clock: Clock, label: str) -> dict[str, Any]:
    from saq.eval import evaluate

    record: dict[str, float] = {}
    forward_seconds(model, eval_set, prompts, clock, limit=1)  # warm-up (allocator, kernels)
    with clock(record, "eval_s"):
        result = evaluate(model, eval_set, prompts, f"bench {label}", int(cfg.eval.prompt_batch), False)
    n = max(int(result.metrics["num_images"]), 1)
    return {"images": n, "s_per_image": record["eval_s"] / n,
            "forward_s_per_image": forward_seconds(model, eval_set, prompts, clock),
            "mIoU": float(result.metrics["mIoU"])}


def unit_table(stats: list[dict[str, Any]], steps: dict[str, list[float]], kinds: dict[str, str],
               full_iters: Callable[[str], int]) -> tuple[list[dict[str, Any]], float]:
    """Per unit type: ms/iteration, peak memory, and the full schedule's time (setup + full iterations)."""
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for unit in stats:
        by_kind[kinds.get(unit["unit"], "unit")].append(unit)
    rows, total = [], 0.0
    for kind, units in by_kind.items():
        step_times = [t for u in units for t in steps.get(u["unit"], [])]
        ms = 1000 * statistics.median(step_times) if step_times else 0.0
        full_s = 0.0
        for u in units:
            loop_s = sum(steps.get(u["unit"], []))
            setup_s = max(float(u.get("time_s", 0.0)) - loop_s, 0.0)  # input capture, targets, Trainer
            full_s += setup_s + ms / 1000 * (full_iters(u["unit"]) if u["iters"] else 0)
        total += full_s
        rows.append({"unit_type": kind, "units": len(units), "measured_iters": sum(int(u["iters"]) for u in units),
                     "ms_per_iter": ms, "peak_memory_mb": max(float(u.get("peak_memory_mb", 0.0)) for u in units),
                     "full_iters_per_unit": max(full_iters(u["unit"]) for u in units), "full_schedule_s": full_s})
    return rows, total


def run_bench(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """Measure the recipe of ``overrides``; ``run_dir`` (empty: reconstruction resumes from its files)
    receives the stages' own files."""
    from saq.config import validate_ptq_config
    from saq.data import select_calibration
    from saq.data.calibration import cap_prompts
    from saq.data.sources import dataset_from_config, prompts_from_config
    from saq.models import build_model
    from saq.models.build import RANDOM_WEIGHTS
    from saq.engine.reconstruction import recon_settings
    from saq.models.units import reconstruction_units
    from saq.nn import harden_weights_, quantize_
    from saq.ptq.pipeline import resolve_device
    from saq.ptq.recipe import rules_for_model
    from saq.ptq.stages import STAGES, StageContext
    from saq.config.schema import Stage
    from saq.quant import QuantMode, set_quant_mode
    from saq.utils.cpu_runtime import apply_cpu_runtime
    from saq.utils.loggers import RunLogger

    register_resolvers()
    cfg = compose_config(overrides)
    cfg = compose_config(measured_overrides(overrides, cfg))
    validate_ptq_config(cfg)
    full = OmegaConf.to_container(compose_config(full_schedule_overrides(overrides)).ptq.recon, resolve=True)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.manual_seed(int(cfg.seed))
    apply_cpu_runtime(cfg.runtime)
    device = resolve_device(str(cfg.runtime.device))
    clock = Clock(device)
    random_weights = str(cfg.model.checkpoint) == RANDOM_WEIGHTS
    times: dict[str, float] = {}

    with clock(times, "build_model_s"):
        model = build_model(config["model"]).to(device)
    eval_set = dataset_from_config(config["data"])
    calib_set = dataset_from_config(config["calib"]["data"])
    eval_prompts = prompts_from_config(config["prompts"], eval_set, model, False)
    calib_prompts = prompts_from_config(config["calib"]["prompts"], calib_set, model, False)
    calib_items = select_calibration(calib_set, calib_prompts, int(cfg.calib.num_images), str(cfg.calib.strategy),
                                     int(cfg.calib.seed))
    recon_items = cap_prompts(calib_items, cfg.calib.max_prompts_per_image, int(cfg.calib.seed))
    fp = evaluation(model, eval_set, eval_prompts, cfg, clock, "fp")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    quantize_(model, rules_for_model(model, config["quant"], config["ptq"]))
    ctx = StageContext(model, calib_items, recon_items, config, run_dir, RunLogger(run_dir), False)
    stage_names = {Stage.bimodal: "big_s", Stage.pcc: "pcc_s", Stage.calibrate: "calibration_s",
                   Stage.reconstruct: "reconstruction_measured_s"}
    recon_stats: list[dict[str, Any]] = []
    with step_timer(clock) as steps:
        for name in config["ptq"]["stages"]:
            stage = Stage(name)
            with clock(times, stage_names[stage]):
                info = STAGES[stage](ctx)
            ctx.done.append(stage)
            if stage is Stage.reconstruct:
                recon_stats = info
    with clock(times, "harden_s"):
        harden_weights_(model)
    set_quant_mode(model, QuantMode.QUANTIZE)
    model.eval()
    quantized = evaluation(model, eval_set, eval_prompts, cfg, clock, "quantized") if cfg.ptq.quantize else fp

    recon = config["ptq"]["recon"]
    units = reconstruction_units(model, recon.get("granularity", "block"), tuple(recon.get("parts", ())),
                                 recon_settings(recon).decoder_loss)
    kinds = {u.name: f"{u.part}/{u.kind}" for u in units}
    final_kind = {u.name for u in units if u.kind == "final_attn"}

    def full_iters(unit: str) -> int:
        if unit in final_kind and full.get("final_attn_iters") is not None:
            return int(full["final_attn_iters"])
        if kinds.get(unit, "").startswith("decoder/") and full.get("decoder_iters") is not None:
            return int(full["decoder_iters"])
        return int(full["iters"])

    unit_rows, recon_full_s = unit_table(recon_stats, steps, kinds, full_iters)
    other_s = sum(times.get(k, 0.0) for k in ("big_s", "pcc_s", "calibration_s", "harden_s"))
    result = {
        "model": str(cfg.model.name), "quant": str(cfg.quant.name), "recipe": str(cfg.ptq.name),
        "stages": list(config["ptq"]["stages"]), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "weights": RANDOM_NOTE if random_weights else str(cfg.model.checkpoint),
        "random_weights": random_weights, "overrides": overrides,
        "calib_images": len(calib_items), "eval_images": fp["images"],
        "times_s": times,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "recon_units": unit_rows,
        "eval": {"fp": fp, "quantized": quantized},
        "full_schedule": {"iters": full.get("iters"), "final_attn_iters": full.get("final_attn_iters"),
                          "decoder_iters": full.get("decoder_iters"),
                          "reconstruction_s": recon_full_s, "total_s": other_s + recon_full_s,
                          "note": "BIG + PCC + calibration + hardening as measured, reconstruction extrapolated "
                                  "from ms/iteration at the full iteration count (evaluation not included)"},
    }
    if random_weights:
        for block in (result["eval"]["fp"], result["eval"]["quantized"]):
            block["note"] = RANDOM_NOTE
    return result


def markdown(result: dict[str, Any]) -> str:
    t = result["times_s"]
    head = f"# bench: {result['model']} {result['quant']} {result['recipe']} on {result['device']}"
    if result["random_weights"]:
        head += f" ({RANDOM_NOTE})"
    lines = [head, "", f"device {result['device_name']}, torch {result['torch']}, {result['threads']} threads; "
             f"{result['calib_images']} calibration images, {result['eval_images']} evaluation images", "",
             "| stage | seconds |", "| --- | --- |"]
    for key in ("big_s", "pcc_s", "calibration_s", "reconstruction_measured_s", "harden_s"):
        if key in t:
            lines.append(f"| {key[:-2].replace('_', ' ')} | {t[key]:.2f} |")
    peak = "peak MB (CUDA: allocated)" if result["device"].startswith("cuda") else "peak MB (process RSS)"
    lines += ["", f"| unit type | units | measured iters | ms/iter | {peak} | full iters/unit | full schedule s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["recon_units"]:
        lines.append(f"| {r['unit_type']} | {r['units']} | {r['measured_iters']} | {r['ms_per_iter']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} | {r['full_iters_per_unit']} | {r['full_schedule_s']:.1f} |")
    note = f" ({RANDOM_NOTE})" if result["random_weights"] else ""
    lines += ["", "| evaluation | s/image (end to end) | forward s/image | mIoU |", "| --- | --- | --- | --- |"]
    for name, e in result["eval"].items():
        lines.append(f"| {name} | {e['s_per_image']:.3f} | {e['forward_s_per_image']:.3f} | {e['mIoU']:.3f}{note} |")
    full = result["full_schedule"]
    lines += ["", f"Full schedule ({full['iters']} iterations per unit"
              + (f", final attention {full['final_attn_iters']}" if full["final_attn_iters"] else "")
              + f"): reconstruction {full['reconstruction_s'] / 60:.1f} min, recipe total {full['total_s'] / 60:.1f} min"
              " (" + full["note"] + ").", ""]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[list[str], Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output dir (or an out=DIR override)")
    args, overrides = parser.parse_known_args(argv)
    out = args.out
    rest = []
    for o in overrides:
        if o.startswith("out="):
            out = o.split("=", 1)[1]
        else:
            rest.append(o)
    return rest, Path(out or "outputs/bench")


def main(argv: list[str] | None = None) -> int:
    overrides, out_dir = parse_args(sys.argv[1:] if argv is None else argv)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="saq-bench-") as run_dir:
        result = run_bench(overrides, Path(run_dir))
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / "bench.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

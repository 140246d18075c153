"""Encoder time of a quantized checkpoint: FP (quantizers off) against fake-quantized, interleaved round
by round in one process, so a busy machine slows both alike. Writes JSON.

    python experiments/bench_fake_quant_overhead.py outputs/vit_t_coco/w4a4_ptq4sam_s_s0b/quantized.pt \
        --rounds 3 --out results/bench/fake_quant_overhead.json

``--with-autograd-log-quantizer`` adds a third configuration: the log softmax quantizer through its
differentiable path (what evaluation ran before the in-place inference path), for a before/after.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from saq.data.coco import load_image
from saq.export.checkpoint import load_quantized
from saq.models.predictor import encode_image
from saq.quant import QuantMode, set_quant_mode
from saq.quant.log_quantizer import LogSoftmaxQuantizer
from saq.quant.fused import use_fused_kernels_


def _use_inference_path(model: torch.nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, LogSoftmaxQuantizer):
            module.inference_path = enabled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--image", default=None, help="an RGB image (default: the first benchmark image)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--with-autograd-log-quantizer", action="store_true")
    parser.add_argument("--with-compiled", action="store_true",
                        help="also time runtime.compile=true (compiled uniform fake quantization)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_quantized(args.checkpoint)
    model.eval()
    image_path = Path(args.image) if args.image else \
        sorted((Path(__file__).resolve().parents[1] / ".." / "shared" / "assets" / "coco_subset" / "val2017").glob("*.jpg"))[0]
    image = load_image(image_path)
    configs = {"fp": (QuantMode.OFF, True, False), "fake_quant": (QuantMode.QUANTIZE, True, False)}
    if args.with_autograd_log_quantizer:
        configs["fake_quant_autograd_log_quantizer"] = (QuantMode.QUANTIZE, False, False)
    if args.with_compiled:
        configs["fake_quant_compiled"] = (QuantMode.QUANTIZE, True, True)
        use_fused_kernels_(model)
        set_quant_mode(model, QuantMode.QUANTIZE)
        encode_image(model, image)  # compiles every tensor layout once, outside the timing
    kernels = {id(q): q.fused for q in model.modules() if hasattr(q, "fused")}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (mode, inference_path, compiled) in configs.items():
            set_quant_mode(model, mode)
            _use_inference_path(model, inference_path)
            for q in model.modules():
                if id(q) in kernels:
                    q.fused = kernels[id(q)] if compiled else None
            start = time.perf_counter()
            encode_image(model, image)
            seconds[name].append(time.perf_counter() - start)
    result = {"checkpoint": str(args.checkpoint), "image": str(image_path), "threads": args.threads,
              "rounds": args.rounds, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "encoder_s": {k: {"min": min(v), "median": statistics.median(v), "all": v} for k, v in seconds.items()}}
    fp = min(seconds["fp"])
    result["ratio_to_fp_min"] = {k: min(v) / fp for k, v in seconds.items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

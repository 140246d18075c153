"""Quantized convolutions fed channels-last against the caller's layout, interleaved in one process.
Writes JSON.

    python experiments/bench_conv_layout.py outputs/vit_t_coco/w4a4_saq_base_i20_s0/quantized.pt \
        --threads 2 --rounds 4 --out results/bench/conv_layout_vit_t_w4a4_saq_base_2threads_epyc.json

Times (a) the fake-quantized encoder on the first benchmark image and (b) one reconstruction step of
TinyViT's first stage (MBConv blocks: depthwise and 1x1 convolutions; QDrop 0.5, random image: cost only),
each with every ``QuantConv2d`` input made channels-last first and as it comes; the quantizers run their
compiled kernels unless ``--eager``. The kernels of oneDNN's depthwise and 1x1 convolutions differ between
the two layouts; this says whether that pays for a whole forward and a training step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_recon_step import train_step, unit_batches  # noqa: E402

from saq.data.coco import load_image  # noqa: E402
from saq.engine.reconstruction import ReconSettings, UnitReconstruction  # noqa: E402
from saq.export.checkpoint import load_quantized  # noqa: E402
from saq.models.predictor import encode_image  # noqa: E402
from saq.nn import QuantConv2d  # noqa: E402
from saq.quant.fused import use_fused_kernels_  # noqa: E402
from saq.utils.run_files import write_json  # noqa: E402


def _channels_last_hooks(model: torch.nn.Module) -> list:
    def to_channels_last(_module, args):
        return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    return [m.register_forward_pre_hook(to_channels_last) for m in model.modules() if isinstance(m, QuantConv2d)]


def interleaved(model: torch.nn.Module, work: Callable[[], None], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"as_given": [], "channels_last": []}

    def timed(layout: str) -> float:
        hooks = _channels_last_hooks(model) if layout == "channels_last" else []
        try:
            start = time.perf_counter()
            work()
            return time.perf_counter() - start
        finally:
            for hook in hooks:
                hook.remove()

    for layout in times:  # warm-up: compiled kernels, allocator
        timed(layout)
    for index in range(rounds):
        for layout in (("as_given", "channels_last") if index % 2 == 0 else ("channels_last", "as_given")):
            times[layout].append(timed(layout))
    return times


def summary(times: dict[str, list[float]]) -> dict[str, object]:
    given, last = statistics.median(times["as_given"]), statistics.median(times["channels_last"])
    return {"s": times, "as_given_median_s": given, "channels_last_median_s": last, "speedup": given / last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--image", type=Path, default=Path("../shared/assets/coco_subset/val2017"),
                        help="an RGB image, or a folder whose first .jpg is used")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--eager", action="store_true", help="eager quantizers (default: the compiled kernels, "
                        "as runs with runtime.compile=true)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, payload = load_quantized(args.checkpoint)
    use_fused_kernels_(model, not args.eager)
    image_path = args.image if args.image.is_file() else sorted(args.image.glob("*.jpg"))[0]
    image = load_image(image_path)

    def encode() -> None:
        with torch.inference_mode():
            encode_image(model, image)

    result = {"checkpoint": str(args.checkpoint), "model": payload["model_name"], "image": image_path.name,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "compiled": not args.eager,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "encoder": summary(interleaved(model, encode, args.rounds))}
    [(unit, batch)] = unit_batches(model, 16, torch.Generator().manual_seed(0), decoder=False, stages=1)
    module = UnitReconstruction(model, unit, ReconSettings(iters=4 * args.rounds + 4, qdrop_prob=0.5,
                                                           reg_weight=0.0, a_lr=2e-3))
    optimizers, _ = module.configure_optimizers()
    try:
        result[f"{unit.name} step"] = summary(interleaved(model, lambda: train_step(module, optimizers, batch),
                                                          args.rounds))
    finally:
        module.finalize()
    for part in ("encoder", f"{unit.name} step"):
        r = result[part]
        print(f"{part}: as given {r['as_given_median_s']:.3f} s, channels-last {r['channels_last_median_s']:.3f} s, "
              f"speedup {r['speedup']:.2f}x")
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

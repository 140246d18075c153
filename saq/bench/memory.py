"""Encoder and decoder time of a quantized checkpoint with and without ``runtime.keep_freed_memory``.

    python -m saq.bench memory outputs/vit_t_coco/w4a4_saq_base_i20_s0/quantized.pt \
        --rounds 4 --threads 1 --out outputs/bench/cpu_memory_vit_t.json

The allocator setting is process-wide and cannot be undone, so each side runs in its own interpreter,
alternating (default, kept, default, kept, ...) so that both see the same machine load. Each process
times FP (quantizers off) and fake-quantized forwards of one image and its boxes, best of ``--rounds``,
and reports its peak resident memory. Writes JSON and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BOXES = [[10.0, 20.0, 300.0, 400.0], [50.0, 60.0, 200.0, 240.0], [0.0, 0.0, 600.0, 420.0], [100.0, 80.0, 140.0, 160.0],
         [320.0, 40.0, 630.0, 300.0], [5.0, 200.0, 250.0, 420.0], [400.0, 300.0, 620.0, 420.0], [30.0, 30.0, 90.0, 90.0]]


def measure(checkpoint: str, image: str, rounds: int, threads: int, keep: bool) -> dict:
    """One process's timings (run by ``--child``)."""
    from saq.utils.cpu_runtime import keep_freed_memory

    kept = keep_freed_memory() if keep else False
    import torch

    from saq.data.coco import load_image
    from saq.export.checkpoint import load_quantized
    from saq.models.predictor import decode_boxes, encode_image
    from saq.quant import QuantMode, set_quant_mode
    from saq.quant.fused import use_fused_kernels_

    torch.set_num_threads(threads)
    model, _ = load_quantized(checkpoint)
    model.eval()
    use_fused_kernels_(model)  # as runtime.compile=true
    pixels = load_image(image)
    boxes = torch.tensor(BOXES)
    times: dict[str, dict[str, list[float]]] = {}
    with torch.no_grad():
        for rnd in range(rounds + 1):  # round 0 warms up (compiles)
            for mode in (QuantMode.OFF, QuantMode.QUANTIZE):
                set_quant_mode(model, mode)
                start = time.perf_counter()
                encoded = encode_image(model, pixels)
                middle = time.perf_counter()
                decode_boxes(model, encoded, boxes)
                end = time.perf_counter()
                if rnd:
                    row = times.setdefault("fp" if mode is QuantMode.OFF else "fake_quant", {"encoder": [], "decoder": []})
                    row["encoder"].append(middle - start)
                    row["decoder"].append(end - middle)
    return {"keep_freed_memory": kept, "times_s": times,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--image", default=str(Path("../shared/assets/coco_subset/val2017/000000000139.jpg")))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--processes", type=int, default=2, help="processes per side, alternating")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=("default", "keep"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.checkpoint, args.image, args.rounds, args.threads, args.child == "keep")))
        return
    runs: dict[str, list[dict]] = {"default": [], "keep": []}
    for _ in range(args.processes):
        for side in runs:
            done = subprocess.run([sys.executable, __file__, args.checkpoint, "--image", args.image, "--rounds",
                                   str(args.rounds), "--threads", str(args.threads), "--child", side],
                                  capture_output=True, text=True, check=True)
            runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = {}
    for side, results in runs.items():
        for mode in ("fp", "fake_quant"):
            for part in ("encoder", "decoder"):
                values = [t for r in results for t in r["times_s"][mode][part]]
                table[(side, mode, part)] = {"min": min(values), "median": statistics.median(values)}
    result = {"checkpoint": args.checkpoint, "image": args.image, "boxes": len(BOXES), "threads": args.threads,
              "rounds": args.rounds, "processes_per_side": args.processes, "machine": platform.processor() or platform.machine(),
              "runs": runs,
              "summary": {f"{side}/{mode}/{part}": v for (side, mode, part), v in table.items()},
              "peak_rss_mb": {side: max(r["peak_rss_mb"] for r in results) for side, results in runs.items()}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print("| part | mode | default min s | kept min s | speedup |\n| --- | --- | --- | --- | --- |")
    for mode in ("fp", "fake_quant"):
        for part in ("encoder", "decoder"):
            a, b = table[("default", mode, part)]["min"], table[("keep", mode, part)]["min"]
            print(f"| {part} | {mode} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    print(f"peak RSS MB: default {result['peak_rss_mb']['default']:.0f}, kept {result['peak_rss_mb']['keep']:.0f}")


if __name__ == "__main__":
    main()

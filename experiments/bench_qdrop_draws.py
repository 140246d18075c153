"""Reconstruction step time with QDrop's bit draws against its uniform draws, interleaved round by round.

    python experiments/bench_qdrop_draws.py outputs/vit_t_coco/w4a4_saq_base_i20_s0/quantized.pt \
        --rounds 4 --threads 1 --out results/bench/qdrop_draws_vit_t_w4a4_saq_base_1thread.json

The batches of ``experiments/bench_recon_step.py`` (random image, ``--prompts`` boxes: step cost only):
one training step of the first CLM decoder layer and of every encoder stage, QDrop probability 0.5,
compiled kernels (``runtime.compile=true``), with ``ptq.recon.qdrop_draws`` = bits and = uniform in
alternating order. Writes JSON (per unit: ms per step of each, median) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bench_recon_step import train_step, unit_batches
from saq.config.schema import QDropDraws
from saq.engine.reconstruction import ReconSettings, UnitReconstruction
from saq.export.checkpoint import load_quantized
from saq.quant.fused import use_fused_kernels_

DRAWS = ("bits", "uniform")


def time_unit(model: torch.nn.Module, unit, batch: dict, rounds: int) -> dict[str, list[float]]:
    module = UnitReconstruction(model, unit, ReconSettings(iters=2 * rounds + 2, qdrop_prob=0.5, reg_weight=0.0,
                                                           a_lr=2e-3))
    optimizers, _ = module.configure_optimizers()

    def use(draws: str) -> None:
        module.settings = dataclasses.replace(module.settings, qdrop_draws=QDropDraws(draws))  # input mixing
        for _, q in module.quantizers:
            q.drop_draws = draws  # the quantizers' own dropping

    def step() -> None:
        train_step(module, optimizers, batch)

    times: dict[str, list[float]] = {d: [] for d in DRAWS}
    use_fused_kernels_(model, True)
    try:
        for draws in DRAWS:  # warm-up (compiles)
            use(draws)
            step()
        for round_index in range(rounds):
            for draws in (DRAWS if round_index % 2 == 0 else DRAWS[::-1]):
                use(draws)
                start = time.perf_counter()
                step()
                times[draws].append(1000 * (time.perf_counter() - start))
    finally:
        use_fused_kernels_(model, False)
        module.finalize()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run's quantized.pt")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, payload = load_quantized(args.checkpoint)
    rows = []
    for unit, batch in unit_batches(model, args.prompts, torch.Generator().manual_seed(0)):
        times = time_unit(model, unit, batch, args.rounds)
        rows.append({"unit": unit.name, "kind": unit.kind, "ms_per_step": times,
                     "median_ms": {d: statistics.median(t) for d, t in times.items()}})
    print("| unit | bits ms/step | uniform ms/step | saved |\n| --- | --- | --- | --- |")
    for r in rows:
        m = r["median_ms"]
        print(f"| {r['unit']} | {m['bits']:.0f} | {m['uniform']:.0f} | {1 - m['bits'] / m['uniform']:.1%} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "model": payload["model_name"],
                                        "threads": torch.get_num_threads(), "rounds": args.rounds,
                                        "prompts": args.prompts, "machine": platform.processor() or platform.machine(),
                                        "torch": torch.__version__, "units": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

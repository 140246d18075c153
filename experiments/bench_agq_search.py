"""Cost of the AGQ scale search (the log softmax quantizer's calibration) per observed forward.

    python experiments/bench_agq_search.py --threads 2 --rounds 3 --out results/bench/agq_search_vit_t_2threads.json

For each attention-map shape that vit_t's log quantizers observe at 1024 px (16 sampled maps per forward,
as ``experiment=vit_t_coco`` sets ``ptq.agq_max_maps``): the 3 taus x 50 candidate scales of one forward,
timed three ways, interleaved round by round so that all see the same machine load:

* ``general``: the candidate error in 12 element-wise passes (the path for any tau), |.|^p by ``pow``;
* ``pow2``: the 7-pass candidate error for power-of-two taus (the default 1, 2, 4), |.|^p by ``pow``;
* ``pow2_exp2``: that error and |.|^p as exp2(p log2|.|) (what the observer runs).

The maps are random softmax maps of the real shapes (cost only). Also reports, per shape, whether the
three ways choose the same scale for every tau, and the largest relative difference of their errors.
Writes JSON and prints a markdown table with the per-image total (the shapes times their count per image).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from saq.quant.log_quantizer import DEFAULT_TAUS, _candidate_error_, _candidate_error_pow2_, _lp_sum_, _safe_log2
from saq.utils.cpu_runtime import keep_freed_memory

# (name, maps, rows, cols, value channels, observed forwards per image): TinyViT's 7x7 and 14x14 windows,
# the mask decoder's token self-attention and both cross-attentions (8 boxes x 8 heads, 16 sampled)
SHAPES = [("encoder 7x7 windows", 16, 49, 49, 32, 4), ("encoder 14x14 windows", 16, 196, 196, 32, 6),
          ("decoder token-to-image", 16, 7, 4096, 16, 3), ("decoder image-to-token", 16, 4096, 7, 16, 2),
          ("decoder token self-attention", 16, 7, 7, 32, 2)]
GRID, P, BITS = 50, 2.4, 4


def search(a: torch.Tensor, v: torch.Tensor, way: str) -> torch.Tensor:
    """(taus, grid) error sums of one forward, computed ``way``."""
    log2_a, is_zero = _safe_log2(a)
    amax = a.max()
    lo = torch.minimum(0.01 * amax, torch.full_like(amax, 0.1))
    log2_cands = torch.log2(lo + (amax - lo) * torch.linspace(0.0, 1.0, GRID))
    buf, scratch = torch.empty_like(a), torch.empty_like(a)
    out = a.new_empty(a.shape[:-1] + (v.shape[-1],))
    sums = torch.zeros(len(DEFAULT_TAUS), GRID)
    for ti, tau in enumerate(DEFAULT_TAUS):
        if way == "general":
            neg_log2_a = (-log2_a).masked_fill_(is_zero, math.inf)
            errors = (_candidate_error_(buf, scratch, neg_log2_a, a, ls, tau, 2**BITS) for ls in log2_cands)
        else:
            tau_log2_a = torch.mul(log2_a, tau, out=scratch).masked_fill_(is_zero, -math.inf)
            errors = (_candidate_error_pow2_(buf, tau_log2_a, a, ls, tau, 2**BITS) for ls in log2_cands)
        lp = _lp_sum_ if way == "pow2_exp2" else (lambda x, p: x.abs_().pow_(p).sum())
        sums[ti] = torch.stack([lp(torch.bmm(e, v, out=out), P) for e in errors])
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    keep_freed_memory()  # as runs do (runtime.keep_freed_memory)
    torch.set_num_threads(args.threads)
    ways = ("general", "pow2", "pow2_exp2")
    rows = []
    for name, maps, n_q, n_k, channels, per_image in SHAPES:
        g = torch.Generator().manual_seed(0)
        a = (torch.randn(maps, n_q, n_k, generator=g) * 4).softmax(dim=-1)
        v = torch.randn(maps, n_k, channels, generator=g)
        times: dict[str, list[float]] = {w: [] for w in ways}
        sums = {w: search(a, v, w) for w in ways}  # warm-up, and the values compared below
        for _ in range(args.rounds):
            for w in ways:
                start = time.perf_counter()
                search(a, v, w)
                times[w].append(time.perf_counter() - start)
        best = {w: min(times[w]) for w in ways}
        rows.append({"shape": name, "maps": [maps, n_q, n_k], "value_channels": channels, "per_image": per_image,
                     "seconds_per_forward": best, "all_times_s": times,
                     "same_choice": all(torch.equal(sums[w].argmin(dim=1), sums["general"].argmin(dim=1)) for w in ways),
                     "pow2_equals_general": torch.equal(sums["pow2"], sums["general"]),
                     "max_relative_difference_exp2": float(((sums["pow2_exp2"] - sums["pow2"]).abs() / sums["pow2"]).max())})
    per_image = {w: sum(r["seconds_per_forward"][w] * r["per_image"] for r in rows) for w in ways}
    result = {"threads": args.threads, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "grid": GRID, "taus": list(DEFAULT_TAUS), "p": P, "bits": BITS,
              "shapes": rows, "seconds_per_image": per_image}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print("| maps (16 sampled) | per image | general + pow ms | 7-pass + pow ms | 7-pass + exp2 ms | same choice |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        s = r["seconds_per_forward"]
        print(f"| {r['shape']} {r['maps'][1]}x{r['maps'][2]} | {r['per_image']} | {s['general'] * 1e3:.0f} | "
              f"{s['pow2'] * 1e3:.0f} | {s['pow2_exp2'] * 1e3:.0f} | {r['same_choice']} |")
    print(f"| per image | | {per_image['general']:.2f} s | {per_image['pow2']:.2f} s | {per_image['pow2_exp2']:.2f} s | |")


if __name__ == "__main__":
    main()

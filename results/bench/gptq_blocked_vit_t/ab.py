"""A/B of the blocked GPTQ update against the column-by-column one on the real layers of a run.

Runs ``python -m saq.ptq`` with the given overrides; every call of ``gptq_round`` in the compensate stage
is made twice (block=1: one rank-one update per column; the default block) and the two roundings are
compared. Writes ab.json next to this file (or to $AB_OUT): per layer, its shape, the weights rounded
differently and the seconds of each form. Usage (from the repository root):

    python results/bench/gptq_blocked_vit_t/ab.py experiment=vit_t_coco quant=w4a4 ptq=saq_rc_gelu \
        ptq.recon.iters=0 seed=0 data.max_images=8 runtime.num_threads=1 logger=none
"""

import json
import os
import sys
import time
from pathlib import Path

import saq.ptq.compensate as compensate
from saq.cli.ptq import demo_or_main

blocked_round = compensate.gptq_round
layers = []


def both_forms(weight, hessian, scale, zero_point, qmin, qmax, **kwargs):
    start = time.perf_counter()
    column = blocked_round(weight, hessian, scale, zero_point, qmin, qmax, block=1, **kwargs)
    middle = time.perf_counter()
    blocked = blocked_round(weight, hessian, scale, zero_point, qmin, qmax, **kwargs)
    end = time.perf_counter()
    step = scale.reshape(-1, 1).double()
    layers.append({"shape": list(weight.shape), "codes_differ": int(((blocked - column).abs() > 0.5 * step).sum()),
                   "max_abs_diff": float((blocked - column).abs().max()),
                   "column_s": round(middle - start, 3), "blocked_s": round(end - middle, 3)})
    return blocked


compensate.gptq_round = both_forms
try:
    sys.argv = [sys.argv[0], *sys.argv[1:]]
    demo_or_main()
finally:
    out = Path(os.environ.get("AB_OUT", Path(__file__).with_name("ab.json")))
    summary = {"command": "python results/bench/gptq_blocked_vit_t/ab.py " + " ".join(sys.argv[1:]),
               "layers": len(layers), "weights": sum(a * b for a, b in (l["shape"] for l in layers)),
               "codes_differ": sum(l["codes_differ"] for l in layers),
               "column_s": round(sum(l["column_s"] for l in layers), 2),
               "blocked_s": round(sum(l["blocked_s"] for l in layers), 2), "per_layer": layers}
    out.write_text(json.dumps(summary, indent=1))
    print(f"gptq A/B: {summary['layers']} layers, {summary['codes_differ']} of {summary['weights']} weights "
          f"rounded differently; {summary['column_s']} s column by column, {summary['blocked_s']} s blocked")

"""Mask AP of finished runs on a fixed development split: the first N evaluation images by image id.

Hyperparameters are chosen here, on the split that ``data.max_images=N`` evaluates, and the winner is
then run on more seeds and reported on the whole benchmark: choosing by the full 128-image AP would
select on the numbers being reported. The split's AP is recomputed from each run's stored per-image
COCO matches (``predictions.json.gz``), so a run evaluated on all images needs no second evaluation.

    python experiments/dev_split.py results/vit_t_coco/w4a4/saq_rc_gelu-iters20/seed0 outputs/vit_t_coco/<run> \
        --first 32 [--baseline <run dir>]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from saq.eval.bootstrap import ap_samples, bootstrap_weights, match_table_from_json, percentile_interval
from saq.eval.predictions import load_predictions


def run_table(run_dir: Path, first: int, which: str = "quantized"):
    """The run's match table over its evaluation images, sorted by id (the split is their first N)."""
    path = run_dir / "predictions.json.gz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the run did not finish its evaluation (or was run elsewhere)")
    payload = load_predictions(path)
    pool = sorted(int(i) for i in payload["image_ids"])
    if len(pool) < first:
        raise SystemExit(f"{run_dir} evaluated {len(pool)} images, fewer than --first {first}")
    return match_table_from_json(payload["evals"][which]["coco"], tuple(pool))


def split_weights(table, first: int, samples: int) -> np.ndarray:
    """Row 0: each split image once; rows 1..: bootstrap resamples of the split; 0 for other images."""
    order = np.argsort(np.asarray(table.image_ids))
    split = np.vstack([np.ones((1, first)), bootstrap_weights(first, samples, seed=0)])
    weights = np.zeros((split.shape[0], table.num_images))
    weights[:, order[:first]] = split
    return weights


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with predictions.json.gz")
    parser.add_argument("--first", type=int, default=32, help="images in the split (smallest ids)")
    parser.add_argument("--baseline", type=Path, default=None, help="run dir for a paired interval")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args(argv)

    def split_ap(run: Path) -> np.ndarray:
        table = run_table(run, args.first)
        return ap_samples(table, split_weights(table, args.first, args.samples))

    base = None if args.baseline is None else split_ap(args.baseline)
    report = {}
    for run in args.runs:
        ap = split_ap(run)
        entry = {"mask_AP": float(ap[0])}
        if base is not None:
            diff = ap - base
            low, high = percentile_interval(diff[1:])
            entry["delta_vs_baseline"] = {"point": float(diff[0]), "ci95": [float(low), float(high)]}
        report[str(run)] = entry
        print(f"{entry['mask_AP']:6.2f}  {run}" + ("" if base is None else
              f"   Δ {diff[0]:+.2f} [{low:+.2f}, {high:+.2f}]"))
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))

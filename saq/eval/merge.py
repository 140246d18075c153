"""``python -m saq.eval.merge OUT_DIR SHARD_RUN_DIR...``: the metrics of a sharded evaluation.

Reads the ``shard.json.gz`` of every shard (``python -m saq.eval ... eval.num_shards=N eval.shard=i``),
checks that they are the N shards of one evaluation, and writes ``OUT_DIR/metrics.json`` with the same
AP, mIoU and fidelity as an unsharded evaluation of the same checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from saq.eval.shards import ShardError, load_shard, merge_shards
from saq.utils.run_files import format_table, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saq.eval.merge", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="where metrics.json is written")
    parser.add_argument("shard_dirs", type=Path, nargs="+", help="run dirs (or shard.json.gz files) of the shards")
    args = parser.parse_args(argv)
    try:
        shards = [load_shard(p) for p in args.shard_dirs]
        quantized = merge_shards(shards)
    except ShardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    first = shards[0]
    metrics = {"checkpoint": first["checkpoint"], "recipe": first["recipe"], "model": first["model"],
               "quant": first["quant"], "ground_truth": first["ground_truth"], "quantized": quantized,
               "merged_from": [str(p) for p in args.shard_dirs], "num_shards": first["num_shards"]}
    write_json(args.out_dir / "metrics.json", metrics)
    print(format_table([{**metrics, **quantized}]))
    print(f"\nmetrics: {args.out_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where an exported graph spends its time under OpenVINO: per-node times from OpenVINO's own
performance counters, summed by (node type, kernel). The kernel name says whether a layer ran in int8
(``..._I8``), bf16 or f32, so this shows which parts of a QDQ export the runtime turns into integer
kernels and what the rest costs.

    python -m saq.bench profile outputs/vit_t_w8a8_minmax_sym/onnx/encoder.onnx --precision fp32 \
        --out outputs/bench/profile_openvino_encoder_fp32.json

Input: random data of the graph's input shape (the encoder's 1 x 3 x 1024 x 1024 image); timing does not
depend on the values. Writes JSON (totals per kernel, the slowest nodes) and prints a table.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from saq.deploy.runtime import PRECISIONS, openvino_config, require_backend


def profile(path: Path, precision: str, threads: int, runs: int, top: int) -> dict:
    require_backend("openvino")
    import openvino as ov

    config = {**openvino_config(threads, precision), "PERF_COUNT": "YES"}  # as saq runs it, plus the counters
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    inputs = {}
    for port in compiled.inputs:
        shape = port.get_partial_shape()
        if not shape.is_static:
            raise SystemExit(f"{path}: input {port.get_any_name()} has a dynamic shape ({shape}); profile a graph "
                             "with static input shapes (the exported encoder)")
        inputs[port.get_any_name()] = np.random.default_rng(0).standard_normal(shape.to_shape()).astype(np.float32)
    request.infer(inputs)  # warm-up: first-inference allocations are not the steady state
    per_kernel: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "nodes": 0})
    per_node: dict[str, dict] = {}
    for _ in range(runs):  # the counters hold the last inference only: accumulate
        request.infer(inputs)
        for info in request.profiling_info:
            ms = info.real_time.total_seconds() * 1e3
            key = f"{info.node_type} / {info.exec_type}"
            per_kernel[key]["ms"] += ms / runs
            per_kernel[key]["nodes"] += 1 / runs
            node = per_node.setdefault(info.node_name, {"node_type": info.node_type, "kernel": info.exec_type, "ms": 0.0})
            node["ms"] += ms / runs
    total = sum(v["ms"] for v in per_kernel.values())
    kernels = sorted(({"kernel": k, "ms": v["ms"], "share": v["ms"] / total, "nodes": round(v["nodes"])}
                      for k, v in per_kernel.items() if v["ms"] > 0), key=lambda r: -r["ms"])
    slowest = sorted(({"name": n, **v} for n, v in per_node.items()), key=lambda r: -r["ms"])[:top]
    return {"graph": str(path), "precision": precision, "threads": threads, "runs": runs, "total_ms": total,
            "kernels": kernels, "slowest_nodes": slowest}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graph", type=Path, help="an ONNX file (e.g. <run>/onnx/encoder.onnx)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="OpenVINO's inference precision for what is not int8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="profiled inferences (after one warm-up)")
    parser.add_argument("--top", type=int, default=15, help="slowest nodes to list")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if not args.graph.is_file():
        raise SystemExit(f"ONNX file not found: {args.graph} (export a run first: python -m saq.export ckpt_path=<run>/quantized.pt)")
    result = profile(args.graph, args.precision, args.threads, args.runs, args.top)
    print(f"{result['graph']}: {result['total_ms']:.1f} ms per inference ({args.precision}, {args.threads} thread(s))")
    for row in result["kernels"][:20]:
        print(f"{row['ms']:8.1f} ms {100 * row['share']:5.1f}%  {row['nodes']:4d} nodes  {row['kernel']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"written: {args.out}")
    return result


if __name__ == "__main__":
    main()

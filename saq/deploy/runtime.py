"""One exported graph on one inference runtime, behind the same call: ``graph(inputs) -> outputs``.

The runtimes are optional dependencies (``pip install -e ".[deploy]"``), imported only when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

BACKENDS = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")  # bf16: OpenVINO's inference precision hint (onnxruntime: fp32 only)
INSTALL_HINT = 'pip install -e ".[deploy]"'

Graph = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


class MissingBackendError(ImportError):
    """The requested runtime is not installed."""


def _import(backend: str):
    try:
        if backend == "onnxruntime":
            import onnxruntime as module
        else:
            import openvino as module
    except ImportError as exc:
        raise MissingBackendError(f"backend {backend!r} is not installed: {INSTALL_HINT}") from exc
    return module


def require_backend(backend: str) -> None:
    """ValueError for an unknown backend, MissingBackendError (naming the install command) for an absent one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    _import(backend)


def _onnxruntime_graph(path: Path, num_threads: int | None, precision: str) -> Graph:
    ort = _import("onnxruntime")
    if precision != "fp32":
        raise ValueError(f"onnxruntime runs the graph as exported (fp32 / its QDQ int8); precision={precision!r} "
                         "is an OpenVINO option")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # 4-bit weights run as MatMulNBits; accuracy level 1 keeps its activations in fp32 (the default, 4,
    # quantizes them to int8 on the fly: faster, but then the numbers are no longer the exported model's).
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if num_threads:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(None, inputs)


def openvino_config(num_threads: int | None, precision: str) -> dict[str, Any]:
    """OpenVINO CPU settings of every saq run: latency, ``precision`` for what is not int8."""
    # No dynamic int8 quantization of activations in front of compressed (4-bit) weights: the numbers
    # stay the exported model's.
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
                              "INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16"}
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = num_threads
    return config


def _openvino_graph(path: Path, num_threads: int | None, precision: str) -> Graph:
    ov = _import("openvino")
    compiled = ov.Core().compile_model(str(path), "CPU", openvino_config(num_threads, precision))
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = request.infer(inputs)
        return [np.array(result[o]) for o in outputs]  # copies: the request reuses its buffers

    return run


def load_graph(path: str | Path, backend: str = "onnxruntime", num_threads: int | None = None,
               precision: str = "fp32") -> Graph:
    """A callable running the ONNX file ``path`` on ``backend`` (CPU)."""
    require_backend(backend)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    build = _onnxruntime_graph if backend == "onnxruntime" else _openvino_graph
    return build(path, num_threads, precision)

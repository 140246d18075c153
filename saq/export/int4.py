"""4-bit weight storage: the DequantizeLinear nodes of weights marked by the QDQ stand-ins
(``*.codes_4bit``) become opset-21 block-wise DequantizeLinear on UINT4 / INT4 initializers.

The checkpoint's per-output-channel scale and zero point are repeated for every block along K, so
the dequantized weights are unchanged; runtimes fuse such nodes into 4-bit MatMul kernels
(onnxruntime: MatMulNBits), and the file holds half a byte per weight.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from saq.export.qdq import BLOCK_SIZES, PACKED_4BIT_SUFFIX

OPSET_4BIT = 21  # first opset with INT4 / UINT4 and blocked DequantizeLinear


def _int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    kind = TensorProto.UINT4 if values.dtype == np.uint8 else TensorProto.INT4
    return helper.make_tensor(name, kind, values.shape, values.astype(np.int32).flatten().tolist())


def _constant_sources(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers by name, also under the names the exporter gives them through Identity nodes."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def pack_4bit_weights(model: onnx.ModelProto) -> int:
    """Rewrite the marked weight DequantizeLinear nodes in place; returns how many were packed."""
    values = _constant_sources(model)
    packed = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith(PACKED_4BIT_SUFFIX):
            continue
        codes, scale, zero_point = (values[name] for name in node.input[:3])  # K x N codes, scales on axis 1
        k, n = codes.shape
        block = next(b for b in BLOCK_SIZES if k % b == 0)
        per_block = lambda v: np.repeat(np.broadcast_to(v.reshape(1, -1), (1, n)), k // block, axis=0)
        prefix = node.input[0][: -len(PACKED_4BIT_SUFFIX)]
        tensors = [_int4_tensor(prefix + "codes_int4", codes),
                   numpy_helper.from_array(per_block(scale).astype(np.float32), prefix + "block_scale"),
                   _int4_tensor(prefix + "block_zero_point", per_block(zero_point).astype(zero_point.dtype))]
        model.graph.initializer.extend(tensors)
        node.input[:] = [t.name for t in tensors]
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)])
        packed += 1
    if packed:
        _drop_unused_initializers(model)
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, OPSET_4BIT)
        model.ir_version = max(model.ir_version, 10)
    return packed

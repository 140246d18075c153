"""ONNX export of a quantized checkpoint (QDQ with its own scales) or of its FP model.

Writes ``encoder.onnx``, ``decoder.onnx`` and ``export.json`` (what each quantization point became,
the preprocessing constants a runtime needs, the run's config so evaluation can rebuild its data
and prompts, file sizes). Uses torch's TorchScript exporter (``dynamo=False``): it turns the fused
fake-quant op into QuantizeLinear / DequantizeLinear and keeps custom DequantizeLinear symbolics.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from segment_anything.modeling import Sam

from saq.export.checkpoint import load_quantized, package_versions
from saq.export.graphs import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS, DecoderGraph, EncoderGraph
from saq.export.int4 import pack_4bit_weights
from saq.export import int8_exactness
from saq.export.qdq import PACKED_4BIT_SUFFIX, WEIGHT_LAYOUTS, ExportError, PointReport, strip_quantizers_, to_qdq_
from saq.nn.deploy import assert_deployable
from saq.utils.hashing import file_hexdigest

FORMATS = ("onnx", "onnx_fp")
MANIFEST = "export.json"
MANIFEST_FORMAT = "saq.onnx/1"
DEFAULT_OPSET = 17  # per-axis DequantizeLinear needs >= 13; 17 has LayerNormalization
OPSET_BEFORE_4BIT = 20
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit: larger models keep weights beside the graph


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]

    @property
    def kept_fp(self) -> list[dict[str, Any]]:
        return [p for p in self.manifest["quantization_points"] if p["exported_as"] == "fp"]


def _export_graph(module: torch.nn.Module, args: tuple, path: Path, inputs, outputs, dynamic_axes, opset: int) -> None:
    with warnings.catch_warnings():  # the TorchScript exporter warns that it is deprecated, and about tracing
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes=dynamic_axes, do_constant_folding=True)
    graph = onnx.load(str(path))
    packed = pack_4bit_weights(graph)
    if graph.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(graph, str(path), save_as_external_data=True, location=path.name + ".data")
    elif packed:
        onnx.save_model(graph, str(path))
    onnx.checker.check_model(str(path))


def export_graphs(sam: Sam, out_dir: Path, opset: int = DEFAULT_OPSET) -> dict[str, Path]:
    """encoder.onnx and decoder.onnx of ``sam`` (whatever modules it holds) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(name.endswith(PACKED_4BIT_SUFFIX) for name, _ in sam.named_buffers()):
        # 4-bit storage needs opset 21; from 20 on, raising the opset changes no operator's meaning
        # (the TorchScript exporter writes at most 20).
        opset = max(opset, OPSET_BEFORE_4BIT)
    size = sam.image_encoder.img_size
    embed = sam.prompt_encoder.embed_dim
    h, w = sam.prompt_encoder.image_embedding_size
    example = (torch.zeros(1, embed, h, w), torch.full((2, 3, 2), size / 2.0), torch.tensor([[2.0, 3.0, -1.0]] * 2))
    dynamic = {"point_coords": {0: "num_prompts", 1: "num_points"}, "point_labels": {0: "num_prompts", 1: "num_points"},
               "low_res_masks": {0: "num_prompts"}, "iou_predictions": {0: "num_prompts"}}
    # Written in a temporary dir beside out_dir, then moved file by file: a full disk or a crash leaves
    # the previous files or none, never a truncated graph under the final name.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp, torch.no_grad():
        _export_graph(EncoderGraph(sam).eval(), (torch.zeros(1, 3, size, size),), Path(tmp) / "encoder.onnx",
                      ENCODER_INPUTS, ENCODER_OUTPUTS, None, opset)
        _export_graph(DecoderGraph(sam).eval(), example, Path(tmp) / "decoder.onnx", DECODER_INPUTS, DECODER_OUTPUTS,
                      dynamic, opset)
        for file in sorted(Path(tmp).iterdir(), key=lambda f: f.suffix != ".data"):  # external data first
            os.replace(file, out_dir / file.name)
    return {"encoder": out_dir / "encoder.onnx", "decoder": out_dir / "decoder.onnx"}


def _preprocessing(sam: Sam) -> dict[str, Any]:
    """What a runtime needs around the graphs: SAM's resize / normalise / pad and mask threshold."""
    return {"image_size": int(sam.image_encoder.img_size),
            "pixel_mean": [float(v) for v in sam.pixel_mean.reshape(-1)],
            "pixel_std": [float(v) for v in sam.pixel_std.reshape(-1)],
            "mask_threshold": float(sam.mask_threshold),
            "embedding_shape": [1, int(sam.prompt_encoder.embed_dim), *map(int, sam.prompt_encoder.image_embedding_size)],
            "num_mask_tokens": int(sam.mask_decoder.num_mask_tokens)}


def _fp_model(payload: dict[str, Any]) -> Sam:
    from saq.models import build_model

    return build_model(payload["config"]["model"])


def default_out_dir(ckpt_path: Path, fmt: str) -> Path:
    return ckpt_path.parent / fmt


def qdq_with_exact_layout_(model: torch.nn.Module, weight_layout: str, exact_cpu: bool | None = None
                           ) -> tuple[torch.nn.Module, list[PointReport], str]:
    """``to_qdq_`` with ``weight_layout``, where ``auto`` means: ``symmetric`` (zero-point-free int8 weights,
    OpenVINO's fast path) unless this CPU's int8 kernels would saturate on some of its layers (x86 without
    VNNI, e.g. 8-bit weights times 8-bit activations), then ``uint8`` (exact on every CPU).
    Returns (the converted model, its reports, the layout used)."""
    if weight_layout != "auto":
        return model, to_qdq_(model, weight_layout=weight_layout), weight_layout

    exact = int8_exactness.cpu_has_exact_int8_dot_product() if exact_cpu is None else exact_cpu
    candidate = model if exact else copy.deepcopy(model)
    reports = to_qdq_(candidate, weight_layout="symmetric")
    if exact or not int8_exactness.saturating_layers({"quantization_points": [r.to_dict() for r in reports]}):
        return candidate, reports, "symmetric"
    return model, to_qdq_(model, weight_layout="uint8"), "uint8"


def export_checkpoint(ckpt_path: str | Path, fmt: str = "onnx", out_dir: str | Path | None = None,
                      opset: int = DEFAULT_OPSET, weight_layout: str = "auto") -> ExportResult:
    """Export a saq.ptq checkpoint: ``onnx`` = QDQ with its own qparams, ``onnx_fp`` = the FP model it came from.
    ``weight_layout``: see :func:`qdq_with_exact_layout_` and ``saq.export.qdq``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if weight_layout not in (*WEIGHT_LAYOUTS, "auto"):
        raise ValueError(f"unknown weight_layout {weight_layout!r}: choose one of auto, {', '.join(WEIGHT_LAYOUTS)}")
    requested_layout = weight_layout
    ckpt_path = Path(ckpt_path).expanduser()
    model, payload = load_quantized(ckpt_path)
    reports: list[PointReport] = []
    if fmt == "onnx":
        assert_deployable(model, require_quantizers=bool(payload["layout"]))
        model, reports, weight_layout = qdq_with_exact_layout_(model, weight_layout)
    else:
        model = strip_quantizers_(_fp_model(payload))
    out = Path(out_dir).expanduser() if out_dir else default_out_dir(ckpt_path, fmt)
    files = export_graphs(model, out, opset)
    counts = Counter(r.exported_as for r in reports)
    manifest = {
        "format": MANIFEST_FORMAT, "export_format": fmt, "checkpoint": str(ckpt_path), "opset": opset,
        "model": payload["model_name"],
        "quant": payload["config"]["quant"].get("name") if fmt == "onnx" else "fp32",
        "recipe": payload["config"]["ptq"].get("name") if fmt == "onnx" else "fp",
        "weight_layout": weight_layout if fmt == "onnx" else "fp32",
        "weight_layout_requested": requested_layout if fmt == "onnx" else "fp32",
        "preprocessing": _preprocessing(model),
        "files": {k: {"path": p.name, "bytes": p.stat().st_size, "sha256": file_hexdigest(p)} for k, p in files.items()},
        "quantization_points_summary": dict(counts),
        "quantization_points": [r.to_dict() for r in reports],
        "run_config": payload["config"],
        "versions": {**package_versions(), "onnx": onnx.__version__},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return ExportResult(out, manifest)


def read_manifest(onnx_dir: str | Path) -> dict[str, Any]:
    """export.json of an export dir, or an ExportError saying what the dir lacks."""
    onnx_dir = Path(onnx_dir).expanduser()
    if not onnx_dir.is_dir():
        raise ExportError(f"{onnx_dir} is not a directory: pass the dir written by python -m saq.export "
                          "(e.g. <run>/onnx)")
    manifest_path = onnx_dir / MANIFEST
    missing = [n for n in (MANIFEST, "encoder.onnx", "decoder.onnx") if not (onnx_dir / n).is_file()]
    if missing:
        raise ExportError(f"{onnx_dir} lacks {', '.join(missing)}: write it with "
                          "python -m saq.export ckpt_path=<run>/quantized.pt format=onnx")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{manifest_path} is not a saq ONNX export manifest (expected format {MANIFEST_FORMAT!r})")
    return manifest


"""Whether this CPU's int8 kernels compute an exported model's integer products exactly.

On x86 CPUs without a VNNI dot product (AVX2-only machines, AMD before Zen 4) onnxruntime's and
OpenVINO's int8 GEMMs multiply uint8 activations by int8 weights with an instruction that adds each pair
of products into a 16-bit integer, which saturates at 32767. A layer whose activation codes reach 255
and whose signed weight codes reach 128 can therefore be computed wrongly (the exported file is right,
the runtime's arithmetic is not). With VNNI (or AMX) the products accumulate in 32 bits; weights stored
as uint8 run through kernels that widen to 16 bits before multiplying, exact everywhere.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

INT16_MAX = 32767
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_has_exact_int8_dot_product(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """True where signed-weight int8 products accumulate without 16-bit saturation: any non-x86 CPU, and
    x86 with a VNNI or AMX int8 instruction. ``cpuinfo`` (Linux ``/proc/cpuinfo`` text) and ``machine``
    default to this machine's; an x86 machine whose flags cannot be read counts as exact (no false alarm)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags = set(cpuinfo.split())
    return any(flag in flags for flag in VNNI_FLAGS)


def _max_activation_code(point: dict[str, Any]) -> int:
    """The largest uint8 code the runtime multiplies for this input: a b-bit unsigned grid stays below
    2^b (the export clips it); a signed one may use the whole byte once shifted to uint8."""
    if point["exported_as"] == "qdq_uint8":
        return 2 ** int(point["bits"]) - 1
    return 255


def _max_weight_code(point: dict[str, Any]) -> int:
    """The largest |code| of a weight stored as int8 (recorded by the export; older manifests: the bound
    of the type)."""
    if point.get("max_abs_code") is not None:
        return int(point["max_abs_code"])
    return 128


def saturating_layers(manifest: dict[str, Any]) -> list[str]:
    """Layers of an export whose uint8 x int8 pair sums can pass 32767 on a CPU without VNNI: 2 x the
    largest activation code x the largest |weight code| > 32767."""
    points = {p["name"]: p for p in manifest.get("quantization_points", [])}
    layers = []
    for name, point in points.items():
        if point["role"] != "weight" or not point["exported_as"].startswith("qdq_int8"):
            continue
        layer = name.removesuffix(".weight_quantizer")
        activation = points.get(f"{layer}.input_quantizer")
        if activation is None or activation["exported_as"] == "fp":
            continue  # a float input: the runtime dequantizes the weight and multiplies in float
        if 2 * _max_activation_code(activation) * _max_weight_code(point) > INT16_MAX:
            layers.append(layer)
    return layers


def saturation_warning(manifest: dict[str, Any], exact_cpu: bool | None = None) -> str | None:
    """A message naming the problem and the fix when ``manifest``'s int8 layers would run inexactly on this
    CPU (``exact_cpu``: override the CPU check), else None."""
    if exact_cpu is None:
        exact_cpu = cpu_has_exact_int8_dot_product()
    layers = [] if exact_cpu else saturating_layers(manifest)
    if not layers:
        return None
    return (f"this CPU has no VNNI int8 dot product, so onnxruntime and OpenVINO add pairs of uint8 x int8 "
            f"products in 16 bits, which can saturate in {len(layers)} layers of this export (e.g. {layers[0]}; "
            f"weight_layout={manifest.get('weight_layout')}): its outputs are then not the quantized model's. "
            "Export again with weight_layout=uint8 (or weight_layout=auto on the machine that runs it).")

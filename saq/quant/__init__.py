"""Model-agnostic quantization core: pure fake-quant functions, observers and quantizer modules."""

from saq.quant.functional import QParams, compute_qparams, fake_quantize, quantize_to_int, round_ste
from saq.quant.granularity import Granularity, PerChannel, PerTensor, granularity_from_str
from saq.quant.observers import OBSERVERS, Observer, build_observer
from saq.quant.quantizer import FakeQuantizer, QuantMode, QuantSpec, iter_quantizers, quant_mode, set_quant_mode

__all__ = [
    "QParams", "compute_qparams", "fake_quantize", "quantize_to_int", "round_ste",
    "Granularity", "PerChannel", "PerTensor", "granularity_from_str",
    "OBSERVERS", "Observer", "build_observer",
    "FakeQuantizer", "QuantMode", "QuantSpec", "iter_quantizers", "quant_mode", "set_quant_mode",
]

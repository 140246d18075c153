"""Quantized modules, the quantize_ entry point and the deployment check."""

from saq.nn.attention import QuantTwoWayAttention, QuantViTAttention
from saq.nn.deploy import NotDeployableError, assert_deployable, deployment_problems
from saq.nn.modules import QuantConv2d, QuantizedModule, QuantLinear
from saq.nn.quantize import QuantRule, apply_layout_, dequantize_, harden_weights_, plan_layout, quantize_

__all__ = [
    "QuantTwoWayAttention", "QuantViTAttention",
    "NotDeployableError", "assert_deployable", "deployment_problems",
    "QuantConv2d", "QuantizedModule", "QuantLinear",
    "QuantRule", "apply_layout_", "dequantize_", "harden_weights_", "plan_layout", "quantize_",
]

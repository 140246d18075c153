"""Evaluation: box-prompt predictor, COCO mask AP, IoU and fidelity."""

from saq.eval.evaluate import EvalResult, add_fidelity, evaluate, evaluate_runtime, per_set_metrics
from saq.models.predictor import decode_boxes, encode_image

__all__ = ["EvalResult", "add_fidelity", "evaluate", "evaluate_runtime", "per_set_metrics", "decode_boxes", "encode_image"]

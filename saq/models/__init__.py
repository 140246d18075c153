"""Model construction, checkpoints and reconstruction units."""

from saq.models.build import MODEL_NAMES, build_architecture, build_model, build_tiny_sam, load_weights_
from saq.models.checkpoints import CheckpointArchitectureError, CheckpointError, detect_architecture

__all__ = ["MODEL_NAMES", "build_architecture", "build_model", "build_tiny_sam", "load_weights_",
           "CheckpointArchitectureError", "CheckpointError", "detect_architecture"]

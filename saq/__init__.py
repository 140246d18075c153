"""saq: post-training quantization for Segment Anything (SAQ-SAM and its baselines)."""

__version__ = "0.1.0"

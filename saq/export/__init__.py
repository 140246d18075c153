"""Saving and loading quantized checkpoints."""

from saq.export.checkpoint import load_quantized, read_quantized, save_quantized

__all__ = ["load_quantized", "read_quantized", "save_quantized"]

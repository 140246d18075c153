"""Running exported models on inference runtimes (onnxruntime, OpenVINO)."""

from saq.deploy.predictor import Predictor, RuntimeEncoding
from saq.deploy.runtime import BACKENDS, MissingBackendError, load_graph

__all__ = ["BACKENDS", "MissingBackendError", "Predictor", "RuntimeEncoding", "load_graph"]

"""Digests of files, read in blocks so that large checkpoints never sit in memory whole."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_hexdigest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_hexdigest(value: Any) -> str:
    """Digest of a JSON-able value, independent of dict key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

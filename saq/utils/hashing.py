"""Digests of files, read in blocks so that large checkpoints never sit in memory whole."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_hexdigest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

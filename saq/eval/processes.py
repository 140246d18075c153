"""Evaluation of a saved quantized checkpoint in several CPU processes (``eval.processes``), merged into
the EvalResult that one process would give.

On a small CPU, torch's intra-op threads share SAM's many small operations poorly: on the 2-core
benchmark machine, two one-thread processes, each evaluating every other image, got through vit_t's
fake-quantized evaluation about 14% faster than one process with two threads. Process i loads the
checkpoint, checks that it is deployable, and evaluates images i, i + N, i + 2N, ... of the prompted
images; the parent puts the records and IoUs back into one-process order before computing AP and mIoU
(the same sequences an unsharded evaluation sees, as with ``saq.eval.shards``).

Processes are spawned, not forked: a fork of a process whose OpenMP threads already ran can hang.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping

from saq.data.coco import CocoInstances
from saq.data.prompts import Prompt
from saq.eval.evaluate import EvalResult, evaluation_result
from saq.eval.shards import gt_iou_counts, shard_images

log = logging.getLogger(__name__)


def _evaluate_shard(checkpoint: str, dataset: CocoInstances, prompts: dict[int, list[Prompt]],
                    runtime: dict[str, Any], desc: str, prompt_batch: int) -> EvalResult:
    """One process: the checkpoint's fake-quantized model on its share of the images."""
    from saq.eval.evaluate import evaluate
    from saq.export.checkpoint import load_quantized
    from saq.nn.deploy import assert_deployable
    from saq.utils.cpu_runtime import apply_cpu_runtime

    apply_cpu_runtime(runtime)
    model, payload = load_quantized(checkpoint)
    assert_deployable(model, require_quantizers=bool(payload["layout"]))
    if runtime.get("compile"):
        from saq.quant.fused import use_fused_kernels_

        use_fused_kernels_(model)
    return evaluate(model, dataset, prompts, desc, prompt_batch, show_progress=False)


def evaluate_in_processes(checkpoint: str | Path, dataset: CocoInstances, prompts: dict[int, list[Prompt]],
                          processes: int, runtime: Mapping[str, Any], desc: str = "eval",
                          prompt_batch: int = 16) -> EvalResult:
    """``evaluate`` of the checkpoint's model in ``processes`` CPU processes, with
    ``runtime.num_threads // processes`` threads each (at least one)."""
    import torch

    prompted = [img for img in dataset.images if prompts.get(img.id)]
    processes = max(1, min(int(processes), len(prompted)))
    threads = max(1, int(runtime.get("num_threads") or torch.get_num_threads()) // processes)
    child_runtime = {**runtime, "num_threads": threads, "progress": False}
    shards = [[img.id for img in shard_images(prompted, i, processes)] for i in range(processes)]
    log.info("%s: %d images in %d processes of %d thread(s)", desc, len(prompted), processes, threads)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_evaluate_shard, str(checkpoint), dataset.subset(ids), {i: prompts[i] for i in ids},
                               child_runtime, f"{desc} [{k + 1}/{processes}]", prompt_batch)
                   for k, ids in enumerate(shards)]
        results = [f.result() for f in futures]  # re-raises a process's error (e.g. NaN outputs) here
    return _merge(dataset, prompted, shards, results, desc)


def _merge(dataset: CocoInstances, prompted: list, shards: list[list[int]], results: list[EvalResult],
           desc: str) -> EvalResult:
    """One EvalResult from the shards' results, in the order of ``prompted``."""
    per_image: dict[int, tuple[list[dict], list[float]]] = {}
    for ids, result in zip(shards, results):
        counts = gt_iou_counts(dataset.subset(ids).to_coco_dict(), result)
        records_of: dict[int, list[dict]] = {}
        for r in result.records:
            records_of.setdefault(r["image_id"], []).append(r)
        values = iter(result.gt_ious)
        for image_id in ids:  # gt_ious were appended image by image in this order
            per_image[image_id] = (records_of.get(image_id, []), [next(values) for _ in range(counts[image_id])])
    records = [r for img in prompted for r in per_image[img.id][0]]
    gt_ious = [v for img in prompted for v in per_image[img.id][1]]
    n_images = sum(len(ids) for ids in shards)
    timing = {key: sum(r.timing[key] * len(ids) for r, ids in zip(results, shards)) / n_images
              for key in ("encoder_s_per_image", "decoder_s_per_image")}  # per image within a process
    timing["decoder_s_per_prompt"] = timing["decoder_s_per_image"] * n_images / max(len(records), 1)
    timing["processes"] = len(shards)
    return evaluation_result(dataset, records, gt_ious, n_images, timing, desc)

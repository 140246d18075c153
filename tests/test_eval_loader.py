"""Evaluation with images decoded in DataLoader workers gives exactly the in-process result, and a bad
image still fails naming the file."""

import shutil

import pytest

from saq.data.coco import DatasetError, build_dataset
from saq.data.prompts import gt_prompts
from saq.eval import evaluate
from saq.models import build_tiny_sam


def test_worker_decoding_equals_in_process_decoding(coco8):
    model = build_tiny_sam().eval()
    dataset = build_dataset([coco8])
    prompts = gt_prompts(dataset)
    in_process = evaluate(model, dataset, prompts, show_progress=False, num_workers=0)
    workers = evaluate(model, dataset, prompts, show_progress=False, num_workers=2)
    assert workers.records == in_process.records and workers.gt_ious == in_process.gt_ious
    assert workers.metrics == in_process.metrics and workers.metrics["num_images"] > 1


def test_unreadable_image_in_a_worker_names_the_file(coco8, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(coco8["images"], images)
    dataset = build_dataset([{**coco8, "images": str(images)}])
    broken = dataset.images[1].path
    broken.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=broken.name):
        evaluate(build_tiny_sam().eval(), dataset, gt_prompts(dataset), show_progress=False, num_workers=2)

"""Bad inputs never give a number: each case is refused with one line naming the problem."""

import json

import pytest

from saq.data.coco import DatasetError, load_coco_set
from saq.eval.metrics import MetricOutOfRangeError, check_metric_ranges


def _coco(tmp_path, images, annotations):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for img in images:
        Image.new("RGB", (img["width"], img["height"])).save(folder / img["file_name"])
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return folder, path


IMG = {"file_name": "a.png", "width": 32, "height": 24}
ANN = {"image_id": 1, "category_id": 1, "segmentation": [[1, 1, 10, 1, 10, 10]], "area": 40.0}


@pytest.mark.parametrize("images,annotations,message", [
    ([{**IMG, "id": 1}, {**IMG, "file_name": "b.png", "id": 1}], [{**ANN, "id": 1, "bbox": [1, 1, 9, 9]}],
     r"duplicate image ids \[1\]"),
    ([{**IMG, "id": 1}], [{**ANN, "id": 7, "bbox": [1, 1, 9, 9]}, {**ANN, "id": 7, "bbox": [2, 2, 5, 5]}],
     r"duplicate annotation ids \[7\]"),
    ([{**IMG, "id": 1}], [{**ANN, "id": 3, "bbox": [1, 1, 0, 9]}], r"annotation 3 .*width, height > 0"),
    ([{**IMG, "id": 1}], [{**ANN, "id": 4, "bbox": [1, 1, -2, 9]}], r"annotation 4 .*box"),
    ([{**IMG, "id": 1}], [{**ANN, "id": 5, "bbox": [1, float("nan"), 3, 9]}], r"annotation 5 .*finite"),
])
def test_corrupt_annotations_are_refused(tmp_path, images, annotations, message):
    folder, path = _coco(tmp_path, images, annotations)
    with pytest.raises(DatasetError, match=message):
        load_coco_set("bad", folder, path)


def test_valid_annotations_load(tmp_path):
    folder, path = _coco(tmp_path, [{**IMG, "id": 1}], [{**ANN, "id": 1, "bbox": [1, 1, 9, 9]}])
    loaded = load_coco_set("ok", folder, path)
    images, anns = loaded.images, loaded.annotations
    assert len(images) == 1 and len(anns) == 1


def test_annotations_of_unlisted_images_are_counted_and_reported(tmp_path, caplog):
    import logging

    from saq.data.coco import build_dataset

    folder, path = _coco(tmp_path, [{**IMG, "id": 1}], [{**ANN, "id": 1, "bbox": [1, 1, 9, 9]},
                                                         {**ANN, "id": 2, "image_id": 99, "bbox": [1, 1, 5, 5]}])
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset([{"name": "ok", "images": folder, "annotations": path}])
    assert dataset.orphan_annotations == 1 and len(dataset.annotations) == 1
    assert "1 of 2 annotations name an image id the file does not list" in caplog.text


@pytest.mark.parametrize("block,ok", [
    ({"mask_AP": 52.3, "mask_APs": -1.0, "mIoU": 0.7, "fidelity_mIoU": 1.0}, True),
    ({"mask_AP": 100.5, "mIoU": 0.7}, False),
    ({"mask_AP": 10.0, "mIoU": -0.344}, False),
    ({"mask_AP": float("nan"), "mIoU": 0.5}, False),
    ({"mask_AP": 10.0, "fidelity_mIoU": 1.2}, False),
])
def test_metric_range_guard(block, ok):
    if ok:
        check_metric_ranges(block, "quantized")
    else:
        with pytest.raises(MetricOutOfRangeError, match="cannot exist"):
            check_metric_ranges(block, "quantized")


def test_every_refusal_is_one_class_the_cli_prints_in_one_line():
    """The errors that name a bad input or an unusable result share SaqUserError, which the CLI prints
    without a traceback."""
    from saq.cli.task import RunDirInUseError
    from saq.config.validate import ConfigError
    from saq.data.coco import DatasetError
    from saq.data.pixels import UnsupportedImageError
    from saq.eval.metrics import MetricOutOfRangeError
    from saq.eval.shards import ShardError
    from saq.export.qdq import ExportError
    from saq.models.checkpoints import CheckpointError
    from saq.models.finite import NonFiniteOutputError
    from saq.models.minisam_convert import WeightsUnavailableError
    from saq.nn.deploy import NotDeployableError
    from saq.ptq.preflight import PreflightError
    from saq.quant.observers import CalibrationDataError
    from saq.utils.errors import SaqUserError

    for error in (RunDirInUseError, ConfigError, DatasetError, UnsupportedImageError, MetricOutOfRangeError,
                  ShardError, ExportError, CheckpointError, NonFiniteOutputError, WeightsUnavailableError,
                  NotDeployableError, PreflightError, CalibrationDataError):
        assert issubclass(error, SaqUserError), error

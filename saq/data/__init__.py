"""COCO-format data, prompt sources and calibration sampling."""

from saq.data.calibration import CalibrationItem, select_calibration
from saq.data.coco import CocoInstances, DatasetError, ImageRecord, build_dataset, load_image, verify_images
from saq.data.prompts import Prompt, detector_prompts, gt_prompts
from saq.data.sources import dataset_from_config, prompts_from_config  # every data kind and prompt source

__all__ = ["CalibrationItem", "select_calibration", "CocoInstances", "DatasetError", "ImageRecord", "build_dataset",
           "dataset_from_config", "load_image", "verify_images", "Prompt", "detector_prompts", "gt_prompts", "prompts_from_config"]

"""Synthetic COCO ground truth and detections that exercise every corner of COCO's matching."""

import numpy as np

from saq.eval.metrics import encode_mask

H, W = 180, 220  # large enough for COCO's small, medium and large area ranges


def _rect_mask(x0, y0, x1, y1):
    mask = np.zeros((H, W), dtype=bool)
    mask[int(y0):int(y1), int(x0):int(x1)] = True
    return mask


def _box(rng):
    w, h = [(8, 10), (20, 25), (45, 50), (120, 100)][rng.integers(0, 4)]  # small .. large
    x0, y0 = rng.integers(0, W - w), rng.integers(0, H - h)
    return float(x0), float(y0), float(x0 + w), float(y0 + h)


def synthetic_coco(seed=0, n_images=14, n_cats=5, tie_scores=True):
    """Ground truth (polygons, one crowd region) and detections with hits, misses, duplicates,
    false positives, a category without ground truth and an image-category over maxDets."""
    rng = np.random.default_rng(seed)
    images = [{"id": 10 + 3 * i, "width": W, "height": H, "file_name": f"{i}.jpg"} for i in range(n_images)]
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, n_cats + 2)]  # the last one has no ground truth
    anns, dets = [], []
    score = (lambda: float(np.round(rng.random(), 2))) if tie_scores else (lambda: float(rng.random()))
    for img in images[:-1]:  # the last image has neither ground truth nor detections
        for _ in range(rng.integers(1, 7)):
            x0, y0, x1, y1 = _box(rng)
            cat = int(rng.integers(1, n_cats + 1))
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": cat, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
            for _ in range(rng.choice([0, 1, 1, 1, 2])):  # missed, found, found twice
                shift = rng.normal(0, 0.15) * (x1 - x0)
                mask = _rect_mask(max(0, x0 + shift), y0, min(W, x1 + shift), y1)
                dets.append({"image_id": img["id"], "category_id": cat, "score": score(),
                             "segmentation": encode_mask(mask)})
        for _ in range(rng.integers(0, 3)):  # false positives, also of the class without ground truth
            dets.append({"image_id": img["id"], "category_id": int(rng.integers(1, n_cats + 2)),
                         "score": score(), "segmentation": encode_mask(_rect_mask(*_box(rng)))})
    crowd = encode_mask(_rect_mask(0, 0, 60, 60))
    anns.append({"id": len(anns) + 1, "image_id": images[0]["id"], "category_id": 1, "iscrowd": 1,
                 "bbox": [0, 0, 60, 60], "area": 3600.0, "segmentation": crowd})
    dets.append({"image_id": images[0]["id"], "category_id": 1, "score": 0.9,
                 "segmentation": encode_mask(_rect_mask(5, 5, 50, 50))})  # on the crowd: ignored
    for _ in range(105):  # more than maxDets=100 in one image and category
        dets.append({"image_id": images[1]["id"], "category_id": 2, "score": score() * 0.5,
                     "segmentation": encode_mask(_rect_mask(*_box(rng)))})
    return {"images": images, "annotations": anns, "categories": cats}, dets

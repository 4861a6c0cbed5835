#!/usr/bin/env python
"""COCO evaluation speed: faster-coco-eval (our COCOeval_opt) vs pycocotools, same AP.

Predictions are the ground truth of a shapes split with every mask shifted by a few pixels and
random scores, so that AP is neither 0 nor 1. Prints one row per (iou type, implementation).

Usage: python benchmarks/coco_eval.py [--dataset shapes_val] [--repeat 3]
"""

import argparse
import contextlib
import io
import time

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

import maskpyramid  # noqa: F401  (routes COCOeval_opt to faster-coco-eval)


def fake_predictions(coco: COCO, seed: int = 0):
    rng = np.random.default_rng(seed)
    results = []
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        mask = coco.annToMask(ann)
        dy, dx = rng.integers(-3, 4, 2)
        mask = np.roll(mask, (dy, dx), axis=(0, 1))
        rle = mask_util.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        results.append({
            "image_id": img["id"], "category_id": ann["category_id"], "segmentation": rle,
            "bbox": mask_util.toBbox(rle).tolist(), "score": float(rng.random()),
        })  # fmt: skip
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="shapes_val")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    DatasetCatalog.get(args.dataset)  # generates shapes on first use
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(MetadataCatalog.get(args.dataset).json_file)
    results = fake_predictions(coco)
    print(f"{args.dataset}: {len(coco.imgs)} images, {len(results)} predictions")
    print(f"{'iou':5s} {'implementation':18s} {'seconds':>8s} {'AP':>8s}")
    for iou_type in ("bbox", "segm"):
        for fast, name in ((False, "pycocotools"), (True, "faster-coco-eval")):
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    ev = _evaluate_predictions_on_coco(coco, results, iou_type, use_fast_impl=fast)
                times.append(time.perf_counter() - start)
            print(f"{iou_type:5s} {name:18s} {min(times):8.3f} {ev.stats[0]:8.5f}")


if __name__ == "__main__":
    main()

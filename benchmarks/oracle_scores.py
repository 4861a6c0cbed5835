#!/usr/bin/env python
"""How much of a model's COCO AP its scores cost: the same outputs re-scored by oracles.

Each model (any of the project's: MaskPyramid, detectron2's or the scratch Mask R-CNN) runs once
over the images; its outputs (masks, classes, count) are then evaluated with pycocotools under
several scorings, which change the scores only:
- ``model``: the model's own scores (what COCOEvaluator reports);
- ``x IoU``: the model's score times the output's true mask IoU with the best ground-truth
  instance of its class in the image (0 where there is none): a perfect mask-quality factor,
  what SCORE_MODE "maskiou" learns to predict;
- ``dedup``: perfect duplicate removal: the outputs whose best-overlapping instance (of their
  class) is the same form a group; the group's best match (highest IoU) takes the group's highest
  score and the others are scaled by 0.01; outputs that overlap no instance of their class keep
  their scores;
- ``oracle``: score = true IoU for each instance's best match, ~0 for the rest (ties broken by
  the model's score): the AP the masks alone allow.
The gap between ``model`` and ``oracle`` is what better scoring and duplicate removal can give;
``oracle`` itself is bounded by the masks and the classes.

Usage:
  python benchmarks/oracle_scores.py \
      --model configs/shapes/mask_pyramid_R_18_FPN_long.yaml output/mp_long/model_final.pth \
      [--model CFG PTH ...] [--images 300] [--dataset shapes_val]
"""

import contextlib
import io
import os
import sys

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models_side_by_side import load_models  # noqa: E402

from maskpyramid.engine import Trainer  # noqa: E402

SCORINGS = ("model", "x IoU", "dedup", "oracle")
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ground_truth(dataset: str) -> COCO:
    """The ground truth as COCOEvaluator loads it: the dataset's COCO json file when it has one
    (its areas define small / medium / large), else detectron2's conversion of its dicts."""
    json_file = getattr(MetadataCatalog.get(dataset), "json_file", None)
    with contextlib.redirect_stdout(io.StringIO()):
        if json_file and os.path.exists(json_file):
            return COCO(json_file)
        coco = COCO()
        coco.dataset = convert_to_coco_dict(dataset)
        coco.createIndex()
    return coco


def rescore(results, gt: COCO, image_id: int):
    """The four scorings of one image's results (COCO json dicts): a (4, K) array."""
    scores = np.array([r["score"] for r in results], dtype=np.float64)
    k = len(results)
    anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
    iou = np.zeros((k, len(anns)))
    if k and anns:
        gt_rles = [gt.annToRLE(a) for a in anns]
        iou = np.asarray(
            mask_util.iou([r["segmentation"] for r in results], gt_rles, [0] * len(anns))
        ).reshape(k, len(anns))
        same = np.array([r["category_id"] for r in results])[:, None] == np.array(
            [a["category_id"] for a in anns]
        )
        iou = iou * same
    best = iou.max(1) if len(anns) else np.zeros(k)
    owner = iou.argmax(1) if len(anns) else np.zeros(k, dtype=int)
    # an output is its instance's best match when no output of higher IoU has the same owner
    order = np.lexsort((-scores, -best))  # by IoU, then score, descending
    order = order[best[order] > 0]
    _, first = np.unique(owner[order], return_index=True)
    is_best = np.zeros(k, dtype=bool)
    is_best[order[first]] = True
    # perfect duplicate removal: each instance's best match takes the highest score of the
    # outputs it is the best instance of; those others drop to 1%
    top = np.zeros(max(len(anns), 1))
    np.maximum.at(top, owner[best > 0], scores[best > 0])
    dedup = np.where(is_best, top[owner], np.where(best > 0, scores * 0.01, scores))
    oracle = np.where(is_best, best, 0.0) + 1e-3 * scores
    return np.stack([scores, scores * best, dedup, oracle])


def evaluate(gt: COCO, results, iou_type="segm"):
    if not results:
        return [float("nan")] * len(STATS)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [100 * s for s in ev.stats[: len(STATS)]]


def run_model(cfg, model, dataset: str, images: int, gt: COCO):
    meta = MetadataCatalog.get(dataset)
    to_dataset_id = None
    if hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        to_dataset_id = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
    loader = Trainer.build_test_loader(cfg, dataset)
    per_image = []
    with torch.no_grad():
        for i, inputs in enumerate(loader):
            if i >= images:
                break
            inst = model(inputs)[0]["instances"].to("cpu")
            results = instances_to_coco_json(inst, inputs[0]["image_id"])
            for r in results:
                if to_dataset_id:  # as COCOEvaluator and convert_to_coco_dict map them
                    r["category_id"] = to_dataset_id[r["category_id"]]
            per_image.append((inputs[0]["image_id"], results))
    scored = [[] for _ in SCORINGS]
    for image_id, results in per_image:
        if not results:
            continue
        table = rescore(results, gt, image_id)
        for s in range(len(SCORINGS)):
            for r, v in zip(results, table[s]):
                scored[s].append(dict(r, score=float(v)))
    img_ids = [i for i, _ in per_image]
    gt_sub = gt
    if len(img_ids) < len(gt.getImgIds()):  # evaluate on the images seen only
        gt_sub = COCO()
        with contextlib.redirect_stdout(io.StringIO()):
            keep = set(img_ids)
            gt_sub.dataset = dict(
                gt.dataset,
                images=[im for im in gt.dataset["images"] if im["id"] in keep],
                annotations=[a for a in gt.dataset["annotations"] if a["image_id"] in keep],
            )
            gt_sub.createIndex()
    return len(per_image), [evaluate(gt_sub, s) for s in scored]


def main():
    args, models, dataset = load_models(__doc__, 300)
    gt = coco_ground_truth(dataset)
    print(f"segm AP on {dataset} under each scoring (the outputs themselves unchanged)")
    print("| model | scoring | " + " | ".join(STATS) + " |")
    print("|---|---|" + "---|" * len(STATS))
    for (cfg, model), (c, *_) in zip(models, args.model):
        n, rows = run_model(cfg, model, dataset, args.images, gt)
        name = f"{cfg.MODEL.META_ARCHITECTURE} ({c}, {n} images)"
        for scoring, row in zip(SCORINGS, rows):
            print(f"| {name} | {scoring} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


if __name__ == "__main__":
    main()

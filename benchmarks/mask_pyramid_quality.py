#!/usr/bin/env python
"""Where a trained MaskPyramid loses its masks: the positives, growth, and the outputs.

On the test set's images, with their ground truth (the training mapper, without flips):
1. **Positive roots**: the share whose root pixel lies on its own instance, on another instance,
   or on background, and their final masks' IoU with the instance, per root level. Growth is
   teacher-forced there (the positives are spawned, as in training).
2. **Growth**: the mean IoU of the teacher-forced positives' masks with the instance's mask at
   every level they pass through (the level's own grid), per root level: what each level adds.
3. **Recall**: per ground-truth instance and size (COCO's small / medium / large, on the input),
   the best IoU of any final pyramid of the free-running model (no teacher forcing): what the
   masks allow; and the best IoU of an output of the right class (what the scores, classes,
   painting and thresholds keep of it).
4. **Funnel per class**: the share of instances that still have a mask with IoU >= 0.5 after
   each stage of inference: a final pyramid's mask on the last grid; its refined mask
   (REFINE_RESOLUTION; every pyramid read out); that pyramid's best score above
   SCORE_THRESH_TEST; the model's outputs (after NMS and DETECTIONS_PER_IMAGE), of any class;
   of the instance's class.
5. **Refinement per class and size**: each instance's best final pyramid refined in its own
   box (as at inference) and in the instance's box grown as a mask box (REFINE_BOX_MARGIN; not
   grown with REFINE_BOX "regressed"): with a right box, what is left is the refinement head's.

Usage:
  python benchmarks/mask_pyramid_quality.py --model configs/shapes/mask_pyramid_R_18_FPN_long.yaml \
      output/mp_long/model_final.pth [KEY VALUE ...] [--images 60] [--dataset shapes_val]
"""

import os
import sys
from collections import defaultdict

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models_side_by_side import load_mask_pyramid  # noqa: E402

from maskpyramid.data.mapper import MaskPyramidDatasetMapper  # noqa: E402
from maskpyramid.modeling import growth as G  # noqa: E402
from maskpyramid.modeling.inference import (  # noqa: E402
    logits_to_image,
    mask_iou_matrix,
    paste_in_image,
)
from maskpyramid.modeling.losses import mask_iou  # noqa: E402

SIZES = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, float("inf")))


def image_stats(model, x, stats):
    batched = [x]
    images = model.preprocess_image(batched)
    features = model.backbone(images.tensor)
    feats = [features[f] for f in model.mask_features]
    cls_maps, iou_maps = model.score_head(feats[: model.n_root])
    targets = model._batch_targets(batched, feats, images.image_sizes)
    sizes = images.image_sizes
    forced = model.grow(feats, cls_maps, iou_maps, sizes, len(feats), targets)
    full = x["instances"].gt_masks.tensor.to(model.device)  # (M, h, w) on the input
    h, w = full.shape[-2:]
    # 1 and 2: teacher-forced positives, at every level
    for rec in forced:
        p = rec.pyramids
        pos = p.target >= 0
        if not pos.any():
            continue
        H, W = p.logits.shape[-2:]
        valid = G.valid_cells(sizes, rec.stride, H, W, model.device)[p.batch[pos]]
        iou = mask_iou(p.logits[pos], targets["masks"][rec.level][p.target[pos]], valid)
        for root_level, v in zip(p.root_level[pos].tolist(), iou.tolist()):
            stats["growth"][(root_level, rec.name)].append(v)
        if rec is forced[-1]:
            xy = p.roots[pos].long()
            ys, xs = xy[:, 1].clamp(max=h - 1), xy[:, 0].clamp(max=w - 1)
            own = full[p.target[pos], ys, xs]
            other = full[:, ys, xs].any(0) & ~own
            where = torch.where(own, 0, torch.where(other, 1, 2))
            for root_level, k, v in zip(p.root_level[pos].tolist(), where.tolist(), iou.tolist()):
                stats["roots"][(root_level, k)].append(v)
    # 3: the free-running model's final pyramids and its outputs, on the input's grid
    rec = model.grow(feats, cls_maps, iou_maps, sizes, len(feats))[-1]
    masks = model.inference(rec, batched, sizes, features)[0]["instances"]
    pyr = logits_to_image(rec.pyramids.logits, rec.stride, (h, w), tuple(sizes[0])) > 0
    best_any = mask_iou_matrix(full, pyr).amax(1) if len(pyr) else full.new_zeros(len(full)).float()
    out_iou = mask_iou_matrix(full, masks.pred_masks.to(full.device))
    gt_classes = x["instances"].gt_classes.to(out_iou.device)
    same = gt_classes[:, None] == masks.pred_classes[None]
    best_out = (out_iou * same).amax(1) if len(masks) else torch.zeros_like(best_any)
    funnel = [best_any >= 0.5]
    if model.refine_head is not None and not len(pyr):
        funnel += [best_any >= 0.5] * 2  # no pyramid: nothing to refine or score
    elif model.refine_head is not None:
        scores, regressed = model._class_scores(rec.pyramids, rec, sizes, features)
        every = torch.arange(len(pyr), device=pyr.device)
        refined = model._refined_masks(
            rec.pyramids, rec.stride, model._sizes(sizes), features, (h, w), tuple(sizes[0]),
            0.0, regressed, scores.argmax(1) if model.mp.REFINE_CLASS_SPECIFIC else None, every,
        )  # fmt: skip
        good = mask_iou_matrix(full, refined) >= 0.5
        funnel += [good.any(1), (good & (scores.amax(1) > model.mp.SCORE_THRESH_TEST)).any(1)]
        refine_stats(model, rec, features, sizes, targets, full, pyr, scores, regressed, stats)
    funnel += [(out_iou >= 0.5).any(1), (out_iou * same >= 0.5).any(1)]
    for c, *stages in zip(gt_classes.tolist(), *funnel):
        stats["funnel"][c].append([bool(s) for s in stages])
    for size, b, o in zip(_size_names(full), best_any.tolist(), best_out.tolist()):
        stats["recall"][size].append((b, o))
        stats["recall"]["all"].append((b, o))
    stats["pyramids"].append(len(pyr))


def _size_names(full):
    """COCO's size of each (M, h, w) instance mask: "small", "medium" or "large"."""
    return [
        next(size for size, low, high in SIZES if low <= a < high)
        for a in full.flatten(1).sum(1).tolist()
    ]


def refine_stats(model, rec, features, sizes, targets, full, grid, scores, regressed, stats):
    """5: each instance's best final pyramid (on the grid) refined in its own box (as at
    inference, its most probable class with REFINE_CLASS_SPECIFIC) and in the instance's own box
    grown as a mask box (not with REFINE_BOX "regressed"; its true class): what the refinement
    head makes of a right box."""
    on_grid, best = mask_iou_matrix(full, grid).max(1)
    sub = rec.pyramids[best]
    sizes_t = model._sizes(sizes)
    specific = model.mp.REFINE_CLASS_SPECIFIC
    h, w = full.shape[-2:]
    own, own_boxes = model._refine(
        sub, rec.stride, sizes_t, features, regressed[best] if regressed is not None else None,
        scores.argmax(1)[best] if specific else None, model.mp.REFINE_PASSES,
    )  # fmt: skip
    gt_boxes, _ = model._jittered_gt_boxes(targets, sizes_t, rec.stride, 1, 0.0)
    in_gt = model._refine_in(
        sub, rec.stride, features, gt_boxes, targets["classes"] if specific else None
    )
    ious = []
    for logits, boxes in ((own, own_boxes), (in_gt, gt_boxes)):
        ious.append(mask_iou(paste_in_image(logits, boxes, (h, w), tuple(sizes[0]), 0.0), full))
    box_iou = matched_pairwise_iou(Boxes(own_boxes), Boxes(gt_boxes))
    for c, size, *v in zip(targets["classes"].tolist(), _size_names(full), on_grid, *ious, box_iou):
        stats["refine"][c].append([float(x) for x in v])
        stats["refine_sizes"][size].append([float(x) for x in v])


def main():
    args, cfg, model = load_mask_pyramid(__doc__, 60)
    cfg.defrost()
    cfg.INPUT.RANDOM_FLIP = "none"
    mapper = MaskPyramidDatasetMapper(cfg, is_train=True)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    dicts = DatasetCatalog.get(dataset)[: args.images]
    stats = {"growth": defaultdict(list), "roots": defaultdict(list), "recall": defaultdict(list)}
    stats["funnel"] = defaultdict(list)
    stats["refine"] = defaultdict(list)
    stats["refine_sizes"] = defaultdict(list)
    stats["pyramids"] = []
    with torch.no_grad():
        for d in dicts:
            image_stats(model, mapper(dict(d)), stats)
    names = model.mask_features
    print(f"{len(dicts)} images of {dataset}, {len(stats['recall']['all'])} instances, "
          f"{np.mean(stats['pyramids']):.1f} final pyramids per image")  # fmt: skip
    print("\n1. teacher-forced positives: where the root lies, and the final mask's IoU")
    print("| root level | on its instance | on another instance | on background |")
    print("|---|---|---|---|")
    for lvl in range(model.n_root):
        groups = [stats["roots"][(lvl, k)] for k in range(3)]
        n = sum(len(g) for g in groups)
        if not n:
            continue
        cells = [f"{len(g) / n:.2f} (IoU {np.mean(g):.3f})" if g else "0.00 (-)" for g in groups]
        print(f"| {names[lvl]} ({n}) | " + " | ".join(cells) + " |")
    print("\n2. teacher-forced growth: mean IoU of the positives' masks on each level's grid")
    print("| root level | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for lvl in range(model.n_root):
        cells = [
            f"{np.mean(stats['growth'][(lvl, n)]):.3f}" if stats["growth"][(lvl, n)] else ""
            for n in names
        ]
        print(f"| {names[lvl]} | " + " | ".join(cells) + " |")
    print("\n3. per instance: best IoU of any final pyramid / of an output of its class")
    print("| size | instances | any pyramid: mean IoU | >= 0.5 | >= 0.75 "
          "| outputs: mean IoU | >= 0.5 | >= 0.75 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for size in ("all",) + tuple(s[0] for s in SIZES):
        r = np.array(stats["recall"][size]).reshape(-1, 2)
        if not len(r):
            continue
        a, o = r[:, 0], r[:, 1]
        print(f"| {size} | {len(r)} | {a.mean():.3f} | {np.mean(a >= 0.5):.2f} "
              f"| {np.mean(a >= 0.75):.2f} | {o.mean():.3f} | {np.mean(o >= 0.5):.2f} "
              f"| {np.mean(o >= 0.75):.2f} |")  # fmt: skip
    print("\n4. per class: share of instances with a mask of IoU >= 0.5 after each stage")
    stages = ["a final pyramid (grid)"]
    if model.refine_head is not None:
        stages += ["refined", "score > SCORE_THRESH_TEST"]
    stages += ["outputs, any class", "outputs, its class"]
    print("| class | instances | " + " | ".join(stages) + " |")
    print("|---" * (len(stages) + 2) + "|")
    names = MetadataCatalog.get(dataset).get("thing_classes", None)
    rows = [(names[c] if names else c, np.array(v)) for c, v in sorted(stats["funnel"].items())]
    if rows:
        rows.append(("all", np.concatenate([r for _, r in rows])))
    for name, r in rows:
        print(f"| {name} | {len(r)} | " + " | ".join(f"{v:.2f}" for v in r.mean(0)) + " |")

    if not stats["refine"]:
        return
    print(
        "\n5. per class and size: the refinement of each instance's best final pyramid (mean IoU)"
    )
    rows = [(names[c] if names else c, np.array(v)) for c, v in sorted(stats["refine"].items())]
    rows.append(("all", np.concatenate([r for _, r in rows])))
    rows += [
        (s, np.array(stats["refine_sizes"][s])) for s, _, _ in SIZES if stats["refine_sizes"][s]
    ]
    print("| class or size | instances | best final pyramid (grid) | refined, its own box "
          "| refined, the instance's box | own box vs the instance's (box IoU) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {len(r)} | " + " | ".join(f"{v:.3f}" for v in r.mean(0)) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Probe a trained model's FPN for masks: a fresh mask head trained on its frozen features.

A new detectron2 ``MaskRCNNConvUpsampleHead`` (class-agnostic, ``--convs`` 3x3 convs of
``--dim`` channels, 14x14 ``ROIAlignV2`` from p2-p5 by box size, 28x28 masks) is trained on the
model's frozen backbone (eval mode) for ``--iters`` iterations of the config's batch, on its
training set: on ``--copies`` jittered boxes per instance (centre moved by up to ``--jitter`` of
the side, sides scaled by up to exp(+-jitter)), grown by ``--margin`` of the side plus 2 pixels
when set, against the instance's mask cropped to the box (Mask R-CNN's mask loss). SGD at the
config's BASE_LR, momentum 0.9, divided by 10 at 3/4 of the iterations.

Then, on the test set (without flips), the mean mask IoU per class of the probe in each
instance's box (grown likewise); for a MaskPyramid, also in the boxes of each instance's best
final pyramid (best on the last grid): its mask box, its regressed box (REFINE_BOX_REGRESSION)
and the box the model refines it in, beside the model's own refinement in that box, and those
boxes' IoU with the instance's box.

The same probe on two models' features compares the features; the probe beside a model's own
head in the same boxes compares the heads.

Usage:
  python benchmarks/refine_probe.py --model configs/shapes/mask_pyramid_R_18_FPN_long.yaml \
      output/mp_long/model_final.pth [--iters 1500] [--convs 4 --dim 64] [--margin 0.1]
"""

import argparse
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models_side_by_side import load  # noqa: E402

from maskpyramid.modeling import growth as G  # noqa: E402
from maskpyramid.modeling.inference import (  # noqa: E402
    logits_to_image,
    mask_iou_matrix,
    paste_in_image,
)
from maskpyramid.modeling.losses import mask_iou  # noqa: E402

FEATURES = ("p2", "p3", "p4", "p5")


def grow(boxes, margin, size):
    """``boxes`` (N, 4) grown by ``margin`` of the side plus 2 pixels (half a p2 cell, as a mask
    box) when set, clipped to the image ``size`` (h, w)."""
    if margin:
        g = (boxes[:, 2:] - boxes[:, :2]) * margin + 2.0
        boxes = torch.cat([boxes[:, :2] - g, boxes[:, 2:] + g], 1)
    return G.clip_boxes(boxes, G.image_boxes([size], boxes.new_zeros(len(boxes), dtype=torch.long)))


def masks_iou(logits, boxes, full, size):
    """Per-row IoU of ``logits`` (K, R, R) pasted in ``boxes`` with the masks ``full``."""
    return mask_iou(paste_in_image(logits, boxes, tuple(full.shape[-2:]), size, 0.0), full)


def train_probe(args, cfg, model, pooler, head):
    mapper = DatasetMapper(cfg, is_train=True)
    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    opt = torch.optim.SGD(head.parameters(), lr=cfg.SOLVER.BASE_LR, momentum=0.9,
                          weight_decay=1e-4)  # fmt: skip
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [args.iters * 3 // 4], 0.1)
    batch = cfg.SOLVER.IMS_PER_BATCH
    order = torch.randperm(len(dicts)).tolist()
    for it in range(args.iters):
        batched = [mapper(dict(dicts[order[(it * batch + j) % len(dicts)]])) for j in range(batch)]
        with torch.no_grad():
            features = model.backbone(model.preprocess_image(batched).tensor)
        boxes, targets = [], []
        for x in batched:
            inst = x["instances"].to(model.device)
            b = G.jitter_boxes(inst.gt_boxes.tensor.repeat(args.copies, 1), args.jitter)
            b = grow(b, args.margin, inst.image_size)
            boxes.append(Boxes(b))
            index = torch.arange(len(inst)).repeat(args.copies)
            targets.append(inst.gt_masks[index].crop_and_resize(b, 28).float())
        logits = head.layers(pooler([features[f] for f in FEATURES], boxes))[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, torch.cat(targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % max(args.iters // 10, 1) == 0 or it == args.iters - 1:
            print(f"iter {it}: probe mask loss {loss.item():.4f}", flush=True)


def evaluate(args, cfg, model, pooler, head, dataset):
    """{row: {class: [IoU, ...]}} over the test set's instances."""
    cfg.INPUT.RANDOM_FLIP = "none"
    mapper = DatasetMapper(cfg, is_train=True)
    is_mp = cfg.MODEL.META_ARCHITECTURE == "MaskPyramid"
    stats = defaultdict(lambda: defaultdict(list))

    def probe(features, boxes, full, size):
        logits = head.layers(pooler([features[f] for f in FEATURES], [Boxes(boxes)]))[:, 0]
        return masks_iou(logits, boxes, full, size)

    for d in DatasetCatalog.get(dataset)[: args.images]:
        x = mapper(dict(d))
        inst = x["instances"].to(model.device)
        if not len(inst):
            continue
        images = model.preprocess_image([x])
        size = tuple(images.image_sizes[0])
        features = model.backbone(images.tensor)
        full = inst.gt_masks.tensor
        gt_boxes = inst.gt_boxes.tensor
        rows = {"probe, instance's box": probe(features, grow(gt_boxes, args.margin, size),
                                               full, size)}  # fmt: skip
        if is_mp:
            rows.update(pyramid_rows(model, features, images.image_sizes, full, gt_boxes, probe))
        for name, values in rows.items():
            for c, v in zip(inst.gt_classes.tolist(), values.tolist()):
                stats[name][c].append(v)
    return stats


def pyramid_rows(model, features, image_sizes, full, gt_boxes, probe):
    """The MaskPyramid rows: each instance's best final pyramid's boxes."""
    feats = [features[f] for f in model.mask_features]
    cls_maps, iou_maps = model.score_head(feats[: model.n_root])
    rec = model.grow(feats, cls_maps, iou_maps, image_sizes, len(feats))[-1]
    if not len(rec.pyramids) or model.refine_head is None:
        return {}
    size = tuple(image_sizes[0])
    grid = logits_to_image(rec.pyramids.logits, rec.stride, tuple(full.shape[-2:]), size) > 0
    best = mask_iou_matrix(full, grid).argmax(1)
    scores, regressed = model._class_scores(rec.pyramids, rec, image_sizes, features)
    sub, sizes = rec.pyramids[best], model._sizes(image_sizes)
    mask_boxes, _ = model._mask_boxes(sub, rec.stride, sizes)
    classes = scores.argmax(1)[best] if model.mp.REFINE_CLASS_SPECIFIC else None
    own, own_boxes = model._refine(
        sub, rec.stride, sizes, features, regressed[best] if regressed is not None else None,
        classes, model.mp.REFINE_PASSES,
    )  # fmt: skip
    boxes = {"mask box": mask_boxes, "refinement box": own_boxes}
    if regressed is not None:
        reg = regressed[best]
        boxes["regressed box"] = torch.where(torch.isfinite(reg), reg, mask_boxes)
    own_iou = masks_iou(own, own_boxes, full, size)
    rows = {"the model's own refinement, pyramid's refinement box": own_iou}
    for name, b in boxes.items():
        b = grow(b, 0.0, size)
        rows[f"probe, pyramid's {name}"] = probe(features, b, full, size)
        rows[f"box IoU, pyramid's {name}"] = matched_pairwise_iou(Boxes(b), Boxes(gt_boxes))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs=2, required=True, metavar=("CFG", "PTH"))
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--convs", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--dataset", default=None, help="default: the config's TEST[0]")
    parser.add_argument("--device", default=None, help="MODEL.DEVICE (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    cfg, model = load(*args.model, device=args.device)
    cfg.defrost()
    for p in model.parameters():
        p.requires_grad_(False)
    shapes = model.backbone.output_shape()
    missing = [f for f in FEATURES if f not in shapes]
    if missing:
        sys.exit(f"{args.model[0]}: the backbone has no {missing} (needs an FPN with p2-p5)")
    channels = shapes["p2"].channels
    pooler = ROIPooler(14, [1.0 / shapes[f].stride for f in FEATURES], 0, "ROIAlignV2")
    head = MaskRCNNConvUpsampleHead(
        ShapeSpec(channels=channels, height=14, width=14),
        num_classes=1,
        conv_dims=[args.dim] * (args.convs + 1),
    ).to(model.device)
    train_probe(args, cfg, model, pooler, head)
    head.eval()
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    with torch.no_grad():
        stats = evaluate(args, cfg, model, pooler, head, dataset)
    names = MetadataCatalog.get(dataset).get("thing_classes", None)
    classes = sorted({c for row in stats.values() for c in row})
    labels = [names[c] if names else str(c) for c in classes]
    print(f"\n{args.model[1]}: probe {args.convs}x{args.dim}, {args.iters} iterations, "
          f"margin {args.margin}; mean IoU on {args.images} images of {dataset}")  # fmt: skip
    print("| row | " + " | ".join(labels) + " | all |")
    print("|---" * (len(labels) + 2) + "|")
    for name, row in stats.items():
        cells = [sum(row[c]) / len(row[c]) if row[c] else float("nan") for c in classes]
        total = sum(sum(v) for v in row.values()) / max(sum(len(v) for v in row.values()), 1)
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in cells) + f" | {total:.3f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Trained models side by side on the same images: inference s/image and masks per image.

Each model is a config and its weights. Images are fed to the models in turn (image 1 to every
model, then image 2, ...), so that a busy machine slows them alike. Masks per image counts the
predicted instances with a score above each threshold (COCOEvaluator keeps up to 100).

Usage:
  python benchmarks/models_side_by_side.py \
      --model configs/shapes/mask_rcnn_R_18_FPN_long.yaml \
              output/mask_rcnn_R_18_FPN_long/model_final.pth \
      --model configs/shapes/mask_pyramid_R_18_FPN_long.yaml output/mp_long/model_final.pth \
      [--images 100] [--dataset shapes_val]
"""

import argparse
import statistics
import sys
import time

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import maskpyramid  # noqa: F401
import scratch_mask_rcnn
from maskpyramid.config import NUM_CLASSES_KEYS, add_maskpyramid_config, resolve_num_classes
from maskpyramid.engine import Trainer

NUM_CLASSES_KEYS.update(scratch_mask_rcnn.NUM_CLASSES_KEYS)
THRESHOLDS = (0.05, 0.3, 0.5)


def load(config_file, weights):
    cfg = get_cfg()
    add_maskpyramid_config(cfg)
    scratch_mask_rcnn.add_scratch_mask_rcnn_config(cfg)
    cfg.merge_from_file(config_file)
    resolve_num_classes(cfg)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    return cfg, model.eval()


def load_mask_pyramid(doc: str, images: int):
    """The command line of the MaskPyramid-only benchmarks (``--model CFG PTH --images N
    --dataset D``): returns (args, cfg, model); exits when the model is not a MaskPyramid."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", nargs=2, required=True, metavar=("CFG", "PTH"))
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--dataset", default=None, help="default: the config's TEST[0]")
    args = parser.parse_args()
    cfg, model = load(*args.model)
    if cfg.MODEL.META_ARCHITECTURE != "MaskPyramid":
        sys.exit(f"{args.model[0]}: META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}, "
                 "not MaskPyramid")  # fmt: skip
    return args, cfg, model


def load_models(doc: str, images: int):
    """The command line of the benchmarks comparing models (``--model CFG PTH`` repeated,
    ``--images N --dataset D``): returns (args, [(cfg, model), ...], dataset)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", nargs=2, action="append", required=True, metavar=("CFG", "PTH"))
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--dataset", default=None, help="default: the first config's TEST[0]")
    args = parser.parse_args()
    models = [load(c, w) for c, w in args.model]
    return args, models, args.dataset or models[0][0].DATASETS.TEST[0]


def main():
    args, models, dataset = load_models(__doc__, 100)
    loader = Trainer.build_test_loader(models[0][0], dataset)
    times = [[] for _ in models]
    counts = [{t: [] for t in THRESHOLDS} for _ in models]
    with torch.no_grad():
        for i, inputs in enumerate(loader):
            if i >= args.images + 2:
                break
            for k, (_, model) in enumerate(models):
                start = time.perf_counter()
                out = model(inputs)[0]["instances"]
                if i >= 2:  # two warm-up images
                    times[k].append(time.perf_counter() - start)
                    for t in THRESHOLDS:
                        counts[k][t].append(int((out.scores > t).sum()))
    print(f"{len(times[0])} images of {dataset}, "
          f"torch threads {torch.get_num_threads()}, batch 1")  # fmt: skip
    head = " | ".join(f"masks/img > {t}" for t in THRESHOLDS)
    print(f"| model | inference s/image (mean / median) | {head} |")
    print("|---|---|" + "---|" * len(THRESHOLDS))
    for (cfg, _), (c, _), ts, cs in zip(models, args.model, times, counts):
        masks = " | ".join(f"{statistics.mean(cs[t]):.1f}" for t in THRESHOLDS)
        print(f"| {cfg.MODEL.META_ARCHITECTURE} ({c}) | {statistics.mean(ts):.3f} / "
              f"{statistics.median(ts):.3f} | {masks} |")  # fmt: skip


if __name__ == "__main__":
    main()

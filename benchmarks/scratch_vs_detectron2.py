#!/usr/bin/env python
"""Training step and inference time of ScratchMaskRCNN vs detectron2's GeneralizedRCNN, one run.

Both models are built from the same config (only MODEL.META_ARCHITECTURE differs), start from the
same weights (detectron2's initialisation, loaded into the scratch model: the key names are the
same), train on the same batches and infer on the same images. Timed blocks alternate between the
two models so that machine noise hits both alike; the table gives medians and the ratio.

Usage:
  python benchmarks/scratch_vs_detectron2.py \
      [--config-file configs/shapes/mask_rcnn_R_18_FPN.yaml] [--iters 20] [--images 40] \
      [--weights output/mask_rcnn_R_18_FPN_long/model_final.pth] [KEY VALUE ...]
"""

import argparse
import copy
import itertools
import os
import statistics
import sys
import tempfile
import time

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import maskpyramid  # noqa: F401,E402
import scratch_mask_rcnn  # noqa: E402
from maskpyramid.config import (  # noqa: E402
    NUM_CLASSES_KEYS,
    add_maskpyramid_config,
    resolve_num_classes,
)
from maskpyramid.engine import Trainer  # noqa: E402

NUM_CLASSES_KEYS.update(scratch_mask_rcnn.NUM_CLASSES_KEYS)
ARCHS = ("GeneralizedRCNN", "ScratchMaskRCNN")


def build_cfg(args):
    cfg = get_cfg()
    add_maskpyramid_config(cfg)
    scratch_mask_rcnn.add_scratch_mask_rcnn_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts + ["OUTPUT_DIR", tempfile.mkdtemp(prefix="scratch_vs_d2_")])
    resolve_num_classes(cfg)
    return cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default="configs/shapes/mask_rcnn_R_18_FPN.yaml")
    parser.add_argument("--iters", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--images", type=int, default=40, help="timed inference images")
    parser.add_argument(
        "--weights",
        default="",
        help="checkpoint for the inference part (e.g. a trained model_final.pth: a model trained "
        "for a few steps detects nothing, which leaves the heads and mask pasting untimed)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    setup_logger(name="maskpyramid")
    cfg = build_cfg(args)

    torch.manual_seed(0)
    models, optimizers = {}, {}
    for arch in ARCHS:
        c = cfg.clone()
        c.MODEL.META_ARCHITECTURE = arch
        models[arch] = build_model(c)
    models["ScratchMaskRCNN"].load_state_dict(models["GeneralizedRCNN"].state_dict())
    # timing only: the warm-up learning rate, so that no batch diverges without the scheduler
    opt_cfg = cfg.clone()
    opt_cfg.SOLVER.BASE_LR = cfg.SOLVER.BASE_LR * cfg.SOLVER.WARMUP_FACTOR
    for arch in ARCHS:
        optimizers[arch] = build_optimizer(opt_cfg, models[arch])
    loader = iter(build_detection_train_loader(cfg, mapper=Trainer.build_train_mapper(cfg)))
    batches = [next(loader) for _ in range(args.warmup + args.block)]

    def step(arch, batch):
        model, opt = models[arch], optimizers[arch]
        model.train()
        start = time.perf_counter()
        losses = model(copy.deepcopy(batch))
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    times = {a: [] for a in ARCHS}
    with EventStorage(0):
        for arch in ARCHS:
            for b in batches[: args.warmup]:
                step(arch, b)
        blocks = (args.iters + args.block - 1) // args.block
        for k in range(blocks):
            for arch in ARCHS if k % 2 == 0 else ARCHS[::-1]:
                for b in batches[args.warmup :]:
                    times[arch].append(step(arch, b))

    # inference: the same weights in both
    if args.weights:
        DetectionCheckpointer(models["GeneralizedRCNN"]).load(args.weights)
    models["ScratchMaskRCNN"].load_state_dict(models["GeneralizedRCNN"].state_dict())
    test_loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    images = list(itertools.islice(iter(test_loader), args.images + 2))
    infer = {a: [] for a in ARCHS}
    detections = {a: 0 for a in ARCHS}
    with torch.no_grad():
        for arch in ARCHS:
            models[arch].eval()
        for i, inputs in enumerate(images):
            for arch in ARCHS if i % 2 == 0 else ARCHS[::-1]:
                start = time.perf_counter()
                out = models[arch](inputs)
                if i >= 2:
                    infer[arch].append(time.perf_counter() - start)
                    detections[arch] += len(out[0]["instances"])

    weights = args.weights or "as trained here"
    print(f"config: {args.config_file} {' '.join(args.opts)}; inference weights: {weights}")
    print(
        f"device: {cfg.MODEL.DEVICE}, torch threads: {torch.get_num_threads()}, "
        f"batch: {cfg.SOLVER.IMS_PER_BATCH}, input: {cfg.INPUT.MIN_SIZE_TRAIN}, "
        f"timed steps: {len(times[ARCHS[0]])}, images: {len(infer[ARCHS[0]])}"
    )
    print("| model | train s/iter (median) | inference s/image (median) | detections |")
    print("|---|---|---|---|")
    med = {a: (statistics.median(times[a]), statistics.median(infer[a])) for a in ARCHS}
    for arch in ARCHS:
        print(f"| {arch} | {med[arch][0]:.3f} | {med[arch][1]:.4f} | {detections[arch]} |")
    ratio_train = med["ScratchMaskRCNN"][0] / med["GeneralizedRCNN"][0]
    ratio_infer = med["ScratchMaskRCNN"][1] / med["GeneralizedRCNN"][1]
    print(f"| ratio scratch / detectron2 | {ratio_train:.3f}x | {ratio_infer:.3f}x | |")


if __name__ == "__main__":
    main()

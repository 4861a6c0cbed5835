#!/usr/bin/env python
"""Trained models side by side on the same images: inference s/image and masks per image.

Each model is a config and its weights, optionally followed by config options (``KEY VALUE``
pairs, e.g. an inference-only knob on the same weights). Images are fed to the models in turn
(image 1 to every model, then image 2, ...), so that a busy machine slows them alike. Masks per
image counts the predicted instances with a score above each threshold (COCOEvaluator keeps up
to 100). ``--device cuda`` runs every model on the GPU (times then wait for the GPU's work).

Usage:
  python benchmarks/models_side_by_side.py \
      --model configs/shapes/mask_rcnn_R_18_FPN_long.yaml \
              output/mask_rcnn_R_18_FPN_long/model_final.pth \
      --model configs/shapes/mask_pyramid_R_18_FPN_long.yaml output/mp_long/model_final.pth \
      --model configs/shapes/mask_pyramid_R_18_FPN_long.yaml output/mp_long/model_final.pth \
              MODEL.MASK_PYRAMID.REFINE_SCORE_THRESH 0.3 \
      [--images 100] [--dataset shapes_val] [--device cuda]
"""

import argparse
import statistics
import sys
import time

import torch
from detectron2.modeling import build_model

import maskpyramid  # noqa: F401
import scratch_mask_rcnn
from maskpyramid.config import NUM_CLASSES_KEYS, resolve_num_classes
from maskpyramid.engine import Trainer, build_cfg, load_checkpoint

NUM_CLASSES_KEYS.update(scratch_mask_rcnn.NUM_CLASSES_KEYS)
THRESHOLDS = (0.05, 0.3, 0.5)


def load(config_file, weights, *opts, device=None):
    """(cfg, eval model) of a config and its checkpoint; exits naming a checkpoint that does not
    fit (``maskpyramid.engine.load_checkpoint``: a benchmark of random weights measures nothing)."""
    if len(opts) % 2:
        sys.exit(f"--model {config_file} {weights}: options must be KEY VALUE pairs, got {opts}")
    opts = list(opts) + (["MODEL.DEVICE", device] if device else [])
    cfg = build_cfg(config_file, opts, (scratch_mask_rcnn.add_scratch_mask_rcnn_config,))
    resolve_num_classes(cfg)
    model = build_model(cfg)
    try:
        load_checkpoint(model, weights, key=f"--model {config_file}", config_file=config_file)
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    return cfg, model.eval()


def load_mask_pyramid(doc: str, images: int, extra_args=(), other_models=False):
    """The command line of the MaskPyramid-only benchmarks (``--model CFG PTH [KEY VALUE ...]
    --images N --dataset D --device DEV`` and ``extra_args``, (flag, add_argument kwargs)
    pairs): returns (args, cfg, model); exits when the model is not a MaskPyramid (unless
    ``other_models``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", nargs="+", required=True, metavar="CFG PTH [KEY VALUE ...]")
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--dataset", default=None, help="default: the config's TEST[0]")
    parser.add_argument("--device", default=None, help="MODEL.DEVICE (default: the config's)")
    for flag, kwargs in extra_args:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args()
    if len(args.model) < 2:
        parser.error(f"--model {' '.join(args.model)}: needs a config file and its weights")
    cfg, model = load(*args.model, device=args.device)
    if cfg.MODEL.META_ARCHITECTURE != "MaskPyramid" and not other_models:
        sys.exit(f"{args.model[0]}: META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}, "
                 "not MaskPyramid")  # fmt: skip
    return args, cfg, model


def load_models(doc: str, images: int):
    """The command line of the benchmarks comparing models (``--model CFG PTH`` repeated,
    ``--images N --dataset D``): returns (args, [(cfg, model), ...], dataset)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", nargs="+", action="append", required=True,
                        metavar="CFG PTH [KEY VALUE ...]")  # fmt: skip
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--dataset", default=None, help="default: the first config's TEST[0]")
    parser.add_argument("--device", default=None, help="MODEL.DEVICE for every model")
    args = parser.parse_args()
    for m in args.model:
        if len(m) < 2:
            parser.error(f"--model {' '.join(m)}: needs a config file and its weights")
    models = [load(*m, device=args.device) for m in args.model]
    return args, models, args.dataset or models[0][0].DATASETS.TEST[0]


def main():
    args, models, dataset = load_models(__doc__, 100)
    loader = Trainer.build_test_loader(models[0][0], dataset)
    times = [[] for _ in models]
    counts = [{t: [] for t in THRESHOLDS} for _ in models]
    cuda = any(cfg.MODEL.DEVICE.startswith("cuda") for cfg, _ in models)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        for i, inputs in enumerate(loader):
            if i >= args.images + 2:
                break
            for k, (_, model) in enumerate(models):
                sync()
                start = time.perf_counter()
                out = model(inputs)[0]["instances"]
                sync()
                if i >= 2:  # two warm-up images
                    times[k].append(time.perf_counter() - start)
                    for t in THRESHOLDS:
                        counts[k][t].append(int((out.scores > t).sum()))
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if cuda else f"CPU, torch threads {threads}"
    print(f"{len(times[0])} images of {dataset}, {where}, batch 1")
    head = " | ".join(f"masks/img > {t}" for t in THRESHOLDS)
    print(f"| model | inference s/image (mean / median) | {head} |")
    print("|---|---|" + "---|" * len(THRESHOLDS))
    for (cfg, _), (c, _, *opts), ts, cs in zip(models, args.model, times, counts):
        masks = " | ".join(f"{statistics.mean(cs[t]):.1f}" for t in THRESHOLDS)
        name = " ".join([c] + opts)
        print(f"| {cfg.MODEL.META_ARCHITECTURE} ({name}) | {statistics.mean(ts):.3f} / "
              f"{statistics.median(ts):.3f} | {masks} |")  # fmt: skip


if __name__ == "__main__":
    main()

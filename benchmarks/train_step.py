#!/usr/bin/env python
"""Training s/iter, inference s/image and peak memory of a model built from a config.

Uses the real Trainer and data pipeline (DATASETS.TRAIN / DATASETS.TEST[0] of the config).
Prints one table; comparisons between models must use the same machine and threads.

Usage:
  python benchmarks/train_step.py --config-file configs/shapes/mask_rcnn_R_18_FPN.yaml \
      [--iters 20] [--warmup 3] [--images 50] [KEY VALUE ...]
"""

import argparse
import resource
import tempfile
import time

import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger

import maskpyramid  # noqa: F401
from maskpyramid.config import add_maskpyramid_config, resolve_num_classes
from maskpyramid.engine import Trainer


def peak_rss_mib() -> float:
    """Peak resident memory of this process (data-loader workers not included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=20, help="timed training iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--images", type=int, default=50, help="timed inference images")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    setup_logger(name="maskpyramid")
    cfg = get_cfg()
    add_maskpyramid_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts + ["OUTPUT_DIR", tempfile.mkdtemp(prefix="train_step_")])
    resolve_num_classes(cfg)
    cfg.freeze()

    trainer = Trainer(cfg)
    step_times = []
    with EventStorage(0) as storage:
        for it in range(args.warmup + args.iters):
            storage.iter = trainer.iter = it
            start = time.perf_counter()
            trainer.run_step()
            if it >= args.warmup:
                step_times.append(time.perf_counter() - start)
    train_rss = peak_rss_mib()

    model = trainer.model
    model.eval()
    loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    infer_times, num_instances = [], []
    with torch.no_grad():
        for i, inputs in enumerate(loader):
            if i >= args.images + 2:
                break
            start = time.perf_counter()
            outputs = model(inputs)
            if i >= 2:  # the first images warm up
                infer_times.append(time.perf_counter() - start)
                num_instances.append(len(outputs[0]["instances"]))

    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    print(f"config: {args.config_file} {' '.join(args.opts)}")
    print(f"device: {cfg.MODEL.DEVICE}, torch threads: {torch.get_num_threads()}, "
          f"batch: {cfg.SOLVER.IMS_PER_BATCH}, input: {cfg.INPUT.MIN_SIZE_TRAIN}")  # fmt: skip
    print(
        "| train s/iter | inference s/image | instances/image | peak RSS after training MiB "
        "| peak RSS MiB |"
    )
    print("|---|---|---|---|---|")
    print(f"| {mean(step_times):.3f} | {mean(infer_times):.3f} | {mean(num_instances):.1f} "
          f"| {train_rss:.0f} | {peak_rss_mib():.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()

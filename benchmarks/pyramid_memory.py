#!/usr/bin/env python
"""MaskPyramid training step vs ground-truth instances per image: peak memory, time, pyramids.

The log's failure: the number of pyramids exploded and the GPU ran out of memory. Each row
trains steps on a batch of synthetic 256x256 images with N instances each (discs, log-uniform
radii 4..64 px, painted in random order: visible masks) and prints the peak memory of the step,
its time, and the surviving pyramids per image on each level. With the caps
(MODEL.MASK_PYRAMID.MAX_PYRAMIDS / MAX_PSEUDO) binding, memory and time must flatten.

Memory: CUDA peak allocated on a GPU; on CPU, each count runs in a fresh subprocess and the row
is the growth of its peak RSS over a warm-up step with one instance (ru_maxrss never drops).

Usage:
  python benchmarks/pyramid_memory.py [--config-file configs/shapes/mask_pyramid_R_18_FPN.yaml]
      [--counts 1 2 5 10 20 30 50] [--batch 4] [--steps 3] [KEY VALUE ...]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_batch(n_instances, batch, size, seed, params):
    from detectron2.structures import BitMasks, Boxes, Instances

    from maskpyramid.modeling.targets import prepare_pyramid_targets

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for b in range(batch):
        owner = np.full((size, size), -1)
        image = rng.integers(0, 255, (3, size, size), dtype=np.uint8)
        for k in range(n_instances):
            r = np.exp(rng.uniform(np.log(4), np.log(64)))
            cx, cy = rng.uniform(0, size, 2)
            owner[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = k
        masks = torch.from_numpy(np.stack([owner == k for k in range(n_instances)]))
        masks = masks[masks.flatten(1).any(1)]
        inst = Instances((size, size))
        inst.gt_masks = BitMasks(masks)
        inst.gt_boxes = Boxes(BitMasks(masks).get_bounding_boxes().tensor)
        inst.gt_classes = torch.from_numpy(rng.integers(0, 5, len(masks)))
        x = {"image": torch.from_numpy(image), "instances": inst, "height": size, "width": size}
        x["pyramid_targets"] = prepare_pyramid_targets(inst, params)
        out.append(x)
    return out


def run_one(args, n):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    import maskpyramid  # noqa: F401
    from maskpyramid.config import add_maskpyramid_config
    from maskpyramid.modeling.targets import TargetParams

    cfg = get_cfg()
    add_maskpyramid_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.MASK_PYRAMID.NUM_CLASSES", 5] + args.opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    params = TargetParams.from_config(cfg)
    cuda = cfg.MODEL.DEVICE.startswith("cuda")
    records = []
    grow = model.grow
    model.grow = lambda *a, **k: records.append(grow(*a, **k)) or records[-1]

    def step(data):
        with EventStorage(0):
            loss = sum(model(data).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(synthetic_batch(1, args.batch, 256, 0, params))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for s in range(args.steps):
        data = synthetic_batch(n, args.batch, 256, 1 + s, params)
        records.clear()
        start = time.perf_counter()
        step(data)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    per_level = {r.name: len(r.pyramids) / args.batch for r in records[-1]}
    gt = sum(len(x["instances"]) for x in data) / args.batch
    return {"n": n, "gt": gt, "peak_mib": peak, "step_s": float(np.median(times)), "pyr": per_level}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config-file", default=os.path.join(REPO, "configs/shapes/mask_pyramid_R_18_FPN.yaml")
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 5, 10, 20, 30, 50])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # subprocess mode
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args, args.one)))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
    print(f"{'N/img':>5} {'GT kept':>7} {'peak MiB':>9} {'step s':>7}  pyramids/img per level")
    for n in args.counts:
        cmd = [sys.executable, __file__, "--one", str(n), "--config-file", args.config_file]
        cmd += ["--batch", str(args.batch), "--steps", str(args.steps)] + args.opts
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-3000:])
            raise SystemExit(f"count {n} failed")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        levels = "  ".join(f"{k} {v:5.1f}" for k, v in r["pyr"].items())
        print(f"{r['n']:>5} {r['gt']:>7.1f} {r['peak_mib']:>9.1f} {r['step_s']:>7.3f}  {levels}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""NMS speed: scratch_mask_rcnn.nms (plain PyTorch) vs torchvision's compiled kernels.

RPN-like inputs: N random boxes inside an 800x1216 image, widths and heights 5-205 px, random
scores; class-aware rows give each box one of 80 random classes. For N in {1000, 6000} and IoU
thresholds {0.5, 0.7}, prints one row per (op, N, threshold): median time of ours and of
torchvision over --repeat interleaved runs (after --warmup), their ratio, and whether the kept
indices are equal (torch.equal: same boxes, same order; torchvision's batched_nms may order boxes
of equal scores differently). Fast NMS has no torchvision counterpart: its rows are timed against
torchvision's batched_nms and check that it keeps a subset of its boxes.

Timings depend on the machine's load: compare rows of one run only. On CPU, torch runs on
--threads threads (default 1, as torchvision's CPU kernel; on a machine whose cores are all busy,
torch's multi-threaded ops each wait for their threads to be scheduled, and ours, a few hundred
ops per call, can become 10-100x slower).

Usage: python benchmarks/nms.py [--device cpu|cuda] [--repeat 20] [--warmup 3] [--threads 1]
"""

import argparse
import statistics
import time

import torch
import torchvision

from scratch_mask_rcnn.nms import batched_nms, fast_nms, nms

IMAGE_HW = (800, 1216)
NUM_CLASSES = 80


def rpn_like(n: int, device: str, seed: int = 0):
    """``n`` boxes inside the image (sides 5-205 px), random scores and classes."""
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_HW
    wh = torch.rand(n, 2, generator=g) * 200 + 5
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    classes = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return boxes.to(device), scores.to(device), classes.to(device)


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeat", type=int, default=20, help="timed runs of each function")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")

    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}, "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}")  # fmt: skip
    print("| op | N | IoU thr | kept | ours ms | torchvision ms | ours / torchvision | equal |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (1000, 6000):
        boxes, scores, classes = rpn_like(n, args.device)
        for thr in (0.5, 0.7):
            cases = [
                (
                    "nms",
                    lambda: nms(boxes, scores, thr),
                    lambda: torchvision.ops.nms(boxes, scores, thr),
                ),
                (
                    f"batched_nms ({NUM_CLASSES} classes)",
                    lambda: batched_nms(boxes, scores, classes, thr),
                    lambda: torchvision.ops.batched_nms(boxes, scores, classes, thr),
                ),
                (
                    f"fast_nms ({NUM_CLASSES} classes)",
                    lambda: fast_nms(boxes, scores, classes, thr),
                    lambda: torchvision.ops.batched_nms(boxes, scores, classes, thr),
                ),
            ]
            for name, ours_fn, ref_fn in cases:
                for _ in range(args.warmup):
                    ours_fn(), ref_fn()
                ours_t, ref_t = [], []
                for _ in range(args.repeat):  # interleaved: both see the same machine load
                    t, ours = timed(ours_fn, args.device)
                    ours_t.append(t)
                    t, ref = timed(ref_fn, args.device)
                    ref_t.append(t)
                if name.startswith("fast_nms"):
                    subset = set(ours.tolist()) <= set(ref.tolist())
                    equal = "subset" if subset else "NOT a subset"
                elif torch.equal(ours, ref):
                    equal = "yes"
                elif torch.equal(ours.sort().values, ref.sort().values) and torch.equal(
                    scores[ours], scores[ref]
                ):  # torchvision's batched_nms sorts its result unstably (N > 1000 on CPU)
                    equal = "same set, tied scores in another order"
                else:
                    equal = "NO"
                ours_ms = statistics.median(ours_t) * 1e3
                ref_ms = statistics.median(ref_t) * 1e3
                print(f"| {name} | {n} | {thr} | {len(ours)} | {ours_ms:.2f} | {ref_ms:.2f} "
                      f"| {ours_ms / ref_ms:.2f} | {equal} |")  # fmt: skip


if __name__ == "__main__":
    main()

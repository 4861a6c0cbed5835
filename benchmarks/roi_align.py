#!/usr/bin/env python
"""RoIAlign speed and peak memory: scratch_mask_rcnn (one embedding_bag) vs torchvision's kernel.

Forward + backward (gradient of the features) of RoI pooling on FPN features of an 800x1216
input: 4 levels p2-p5 (strides 4, 8, 16, 32), batch of 2 images, 256 channels, output 7x7,
sampling_ratio 0 (adaptive), aligned=True ("ROIAlignV2"). RPN-like RoIs (512 and 2000 by
default, half per image): random centres in the image, side lengths log-uniform in 16-800 px,
clipped to the image; the poolers assign them to levels with the canonical FPN rule. Cases:

* ``fpn``: scratch_mask_rcnn.poolers.ROIPooler vs detectron2's ROIPooler (one torchvision
  roi_align per level);
* ``single``: scratch_mask_rcnn.roi_align.roi_align vs torchvision.ops.roi_align, all RoIs on
  the stride-16 map (``--single-stride``).

Prints, per case and RoI count, the median forward, backward and total time over ``--repeat``
runs (after ``--warmup``), the peak memory, their ratios ours / torchvision, and the largest
absolute difference of the outputs and of the feature gradients between the two.

Each (implementation, case, RoI count) runs in a fresh process (multiprocessing "spawn"). On
CPU its peak memory is the growth of ru_maxrss (resource.getrusage) over the value taken after
the inputs are allocated; on CUDA (``--device cuda``) it is torch.cuda.max_memory_allocated
minus the memory allocated after the inputs. The features' gradients are reset between runs, so
their allocation counts as in training. Timings depend on the machine's load and on torch's
threads (``--threads``; torchvision's CPU kernel uses several): compare rows of one run only.
Nothing is asserted.

Usage: python benchmarks/roi_align.py [--device cpu|cuda] [--rois 512 2000] [--repeat 3]
    [--warmup 1] [--threads N] [--channels 256] [--single-stride 16]
"""

import argparse
import math
import multiprocessing
import resource
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Tuple

import torch

IMAGE_HW = (800, 1216)
STRIDES = (4, 8, 16, 32)
OUTPUT_SIZE = 7
IMPLS = ("ours", "torchvision")
# detectron2's import warns about torch.jit.script in every (spawned) process
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


def make_inputs(args, num_rois: int, strides: Tuple[int, ...]):
    """RPN-like per-image boxes and seeded features (requires_grad) of the given strides."""
    gen = torch.Generator().manual_seed(0)
    boxes = []
    for i in range(args.images):
        n = num_rois // args.images + (i < num_rois % args.images)
        side = torch.exp(torch.empty(n, 2).uniform_(math.log(16), math.log(800), generator=gen))
        ctr = torch.rand(n, 2, generator=gen) * torch.tensor([IMAGE_HW[1], IMAGE_HW[0]])
        b = torch.cat([ctr - side / 2, ctr + side / 2], dim=1)
        b[:, 0::2] = b[:, 0::2].clamp(0, IMAGE_HW[1])
        b[:, 1::2] = b[:, 1::2].clamp(0, IMAGE_HW[0])
        boxes.append(b.to(args.device))
    feats = [
        torch.randn(
            args.images,
            args.channels,
            math.ceil(IMAGE_HW[0] / s),
            math.ceil(IMAGE_HW[1] / s),
            generator=gen,
        )
        .to(args.device)
        .requires_grad_()
        for s in strides
    ]
    return feats, boxes


def build(impl: str, case: str, args, feats, boxes):
    """A closure running the forward of one implementation on one case."""
    if case == "fpn":
        scales = [1.0 / s for s in STRIDES]
        if impl == "ours":
            from scratch_mask_rcnn.poolers import ROIPooler

            pooler = ROIPooler(OUTPUT_SIZE, scales, 0, "ROIAlignV2")
            return lambda: pooler(feats, boxes)
        from detectron2.modeling.poolers import ROIPooler as D2ROIPooler
        from detectron2.structures import Boxes

        d2_pooler = D2ROIPooler(OUTPUT_SIZE, scales, 0, "ROIAlignV2")
        d2_boxes = [Boxes(b) for b in boxes]
        return lambda: d2_pooler(feats, d2_boxes)
    rois = torch.cat(
        [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
    )
    scale = 1.0 / args.single_stride
    if impl == "ours":
        from scratch_mask_rcnn.roi_align import roi_align
    else:
        from torchvision.ops import roi_align
    return lambda: roi_align(feats[0], rois, OUTPUT_SIZE, scale, 0, True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(impl: str, case: str, num_rois: int, args) -> Dict:
    """Runs in a fresh process: times and peak memory of one implementation on one case."""
    if args.threads:
        torch.set_num_threads(args.threads)
    strides = STRIDES if case == "fpn" else (args.single_stride,)
    feats, boxes = make_inputs(args, num_rois, strides)
    run = build(impl, case, args, feats, boxes)
    cuda = args.device.startswith("cuda")
    sync(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_mib()
    fwd, bwd = [], []
    for it in range(args.warmup + args.repeat):
        for f in feats:
            f.grad = None
        sync(args.device)
        t0 = time.perf_counter()
        out = run()
        sync(args.device)
        t1 = time.perf_counter()
        out.backward(torch.ones_like(out))
        sync(args.device)
        t2 = time.perf_counter()
        del out
        if it >= args.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_rss_mib() - base
    return {"fwd": statistics.median(fwd), "bwd": statistics.median(bwd), "peak": peak}


def compare(case: str, num_rois: int, args) -> Tuple[float, float]:
    """Max |ours - torchvision| of the outputs and of the feature gradients (fresh process)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    strides = STRIDES if case == "fpn" else (args.single_stride,)
    feats, boxes = make_inputs(args, num_rois, strides)
    outs, grads = [], []
    for impl in IMPLS:
        out = build(impl, case, args, feats, boxes)()
        grad = torch.autograd.grad(out, feats, torch.ones_like(out), allow_unused=True)
        outs.append(out.detach())
        grads.append([torch.zeros_like(f) if g is None else g for f, g in zip(feats, grad)])
    out_diff = (outs[0] - outs[1]).abs().max().item() if outs[0].numel() else 0.0
    grad_diff = max((a - b).abs().max().item() for a, b in zip(*grads))
    return out_diff, grad_diff


def in_fresh_process(fn, *fn_args):
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *fn_args).result()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rois", type=int, nargs="+", default=[512, 2000])
    parser.add_argument("--cases", nargs="+", default=["fpn", "single"], choices=["fpn", "single"])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--single-stride", type=int, default=16, help="map of the single case")
    args = parser.parse_args()

    threads = args.threads or torch.get_num_threads()
    print(
        f"device: {args.device}, torch {torch.__version__}, threads: {threads}, input "
        f"{IMAGE_HW[0]}x{IMAGE_HW[1]}, batch {args.images}, {args.channels} channels, output "
        f"{OUTPUT_SIZE}x{OUTPUT_SIZE}, sampling_ratio 0, aligned, median of {args.repeat} "
        f"(+{args.warmup} warm-up)"
    )
    mem = "peak CUDA MiB" if args.device.startswith("cuda") else "peak RSS growth MiB"
    print(
        f"| case | RoIs | impl | fwd ms | bwd ms | total ms | {mem} | ours/tv time "
        "| ours/tv memory | max abs diff out | max abs diff grad |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        ref_name = "detectron2 ROIPooler" if case == "fpn" else "torchvision roi_align"
        ours_name = "ours ROIPooler" if case == "fpn" else "ours roi_align"
        for num_rois in args.rois:
            results: List[Dict] = [
                in_fresh_process(measure, impl, case, num_rois, args) for impl in IMPLS
            ]
            out_diff, grad_diff = in_fresh_process(compare, case, num_rois, args)
            ours, ref = results
            total = [r["fwd"] + r["bwd"] for r in results]
            for name, r, t in zip((ours_name, ref_name), results, total):
                first = name == ours_name
                ratio_t = f"{total[0] / total[1]:.2f}" if first else ""
                ratio_m = f"{ours['peak'] / ref['peak']:.2f}" if first and ref["peak"] else ""
                diffs = f"{out_diff:.2e} | {grad_diff:.2e}" if first else " | "
                print(
                    f"| {case} | {num_rois} | {name} | {r['fwd'] * 1e3:.0f} | "
                    f"{r['bwd'] * 1e3:.0f} | {t * 1e3:.0f} | {r['peak']:.0f} | {ratio_t} | "
                    f"{ratio_m} | {diffs} |"
                )


if __name__ == "__main__":
    main()

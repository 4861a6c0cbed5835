#!/usr/bin/env python
"""MaskPyramid's window pooling: ``growth.pool_windows`` (one ``grid_sample`` per level) vs
detectron2's ``ROIAlign`` (torchvision's kernel), with one sample per bin (WINDOW_SAMPLING_RATIO 1,
the shapes config's), on the shapes of the shapes config.

Per FPN level of a 256x256 input (p6 ... p2: 4x4 ... 64x64 cells), ``--channels`` feature
channels (the heads' 64) and ``--pyramids`` windows of ``--window`` cells per image (46: the
pyramids alive on p3 and p2 of a half-trained model; 16-37 for trained ones), boxes with random
centres and sides of 2-24 cells, clipped to the image. Cases: inference (one image, forward) and
training (``--batch`` images, forward and backward to the features). Prints the median time over
``--repeat`` runs of each, their ratio, and the largest absolute difference of the outputs and
of the features' gradients. Timings depend on the machine's load and threads (``--threads``;
torchvision's CPU ``roi_align`` runs on one): compare rows of one run only. Nothing is asserted.

Usage: python benchmarks/window_pooling.py [--threads 2] [--pyramids 46] [--repeat 50]
"""

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

from detectron2.layers import ROIAlign  # noqa: E402

from maskpyramid.modeling.growth import clip_boxes, pool_windows  # noqa: E402

IMAGE = 256
LEVELS = (("p6", 64), ("p5", 32), ("p4", 16), ("p3", 8), ("p2", 4))


def inputs(args, images: int, stride: int, gen):
    cells = IMAGE // stride
    maps = torch.randn(images, args.channels, cells, cells, generator=gen, requires_grad=True)
    n = args.pyramids * images
    centre = torch.rand(n, 2, generator=gen) * IMAGE
    side = (torch.rand(n, 2, generator=gen) * 22 + 2) * stride
    boxes = torch.cat([centre - side / 2, centre + side / 2], 1)
    boxes = clip_boxes(boxes, torch.tensor([[0.0, 0.0, IMAGE, IMAGE]]).expand(n, 4))
    batch = torch.arange(images).repeat_interleave(args.pyramids)
    return maps, boxes, batch


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--pyramids", type=int, default=46, help="windows per image")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="images of the training case")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    r = args.window
    print(f"CPU, torch threads {torch.get_num_threads()}, {args.pyramids} windows of {r}x{r} "
          f"per image, {args.channels} channels")  # fmt: skip
    print("| level | case | ROIAlign ms | pool_windows ms | ratio | max diff out / grad |")
    print("|---|---|---|---|---|---|")
    totals = {"inference": [0.0, 0.0], "training": [0.0, 0.0]}
    for name, stride in LEVELS:
        for case, images in (("inference", 1), ("training", args.batch)):
            maps, boxes, batch = inputs(args, images, stride, gen)
            rois = torch.cat([batch[:, None].float(), boxes], 1)
            align = ROIAlign((r, r), 1.0 / stride, 1, aligned=True)
            weights = torch.randn(len(boxes), args.channels, r, r, generator=gen)

            def run(fn):
                if case == "inference":
                    with torch.no_grad():
                        return fn(), None
                out = fn()
                (grad,) = torch.autograd.grad((out * weights).sum(), maps)
                return out, grad

            def ours():
                return pool_windows(maps, boxes, batch, r, 1.0 / stride)

            def theirs():
                return align(maps, rois)

            t_theirs = timed(lambda: run(theirs), args.repeat)
            t_ours = timed(lambda: run(ours), args.repeat)
            (a, ga), (b, gb) = run(theirs), run(ours)
            diff = (a - b).abs().max().item()
            gdiff = "-" if ga is None else f"{(ga - gb).abs().max().item():.1e}"
            totals[case][0] += t_theirs
            totals[case][1] += t_ours
            print(f"| {name} | {case} ({images} image{'s' * (images > 1)}) | "
                  f"{1e3 * t_theirs:.3f} | {1e3 * t_ours:.3f} | {t_ours / t_theirs:.2f} | "
                  f"{diff:.1e} / {gdiff} |")  # fmt: skip
    for case, (t_theirs, t_ours) in totals.items():
        print(f"| all levels | {case} | {1e3 * t_theirs:.3f} | {1e3 * t_ours:.3f} | "
              f"{t_ours / t_theirs:.2f} | |")  # fmt: skip


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Where MaskPyramid's inference time goes: milliseconds per image for each part of the model.

A Mask R-CNN (detectron2's ``GeneralizedRCNN`` or ``ScratchMaskRCNN``) given instead is split
the same way into its backbone, RPN and each module of its ROI heads (poolers, box head and
predictor, mask head), so the two models' budgets can be set side by side.

Forward hooks time the backbone (ResNet + FPN), the dense score head, each level's mask heads
(split into the per-image part, the tower and first conv run once per image on the whole level,
and the per-pyramid part, the convs on the pyramids' windows) and the pooled class head; "other"
is the rest of the forward pass (windows pooled and pasted back, pruning, painting, outputs).
Also prints the mean number of pyramids alive after each level. On CUDA (``--device cuda``) each
part waits for the GPU's work before and after it. ``--ops N`` also prints torch.profiler's N
operators of most CPU time (on a GPU, launch overhead and synchronisations show up there).

The weights may be followed by config options (``KEY VALUE`` pairs: an inference-only knob on
the same weights, e.g. ``MODEL.MASK_PYRAMID.REFINE_PASSES 1``).

Usage:
  python benchmarks/mask_pyramid_profile.py --model configs/shapes/mask_pyramid_R_18_FPN_long.yaml \
      output/mp_long/model_final.pth [KEY VALUE ...] [--images 50] [--dataset shapes_val] \
      [--device cuda] [--ops 25]
  python benchmarks/mask_pyramid_profile.py --model configs/shapes/mask_rcnn_R_18_FPN_long.yaml \
      output/mask_rcnn_R_18_FPN_long/model_final.pth
"""

import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models_side_by_side import load_mask_pyramid  # noqa: E402

from maskpyramid.engine import Trainer  # noqa: E402


def rcnn_parts(model):
    """(label, module) pairs of a Mask R-CNN: backbone, RPN, each module of its ROI heads."""
    out = [("backbone (ResNet + FPN)", model.backbone), ("RPN", model.proposal_generator)]
    return out + [(f"ROI heads: {n}", m) for n, m in model.roi_heads.named_children()]


def parts(model):
    """(label, module) pairs to time; modules called more than once are summed."""
    if not hasattr(model, "grow"):
        return rcnn_parts(model)
    out = [("backbone (ResNet + FPN)", model.backbone), ("score head", model.score_head)]
    for kind, heads, names in (
        ("init", model.init_heads, model.in_features),
        ("grow", model.grow_heads, model.mask_features),
    ):
        for i, head in enumerate(heads):
            level = names[i] if len(heads) > 1 else "shared"
            if kind == "grow" and len(heads) > 1 and i == 0:
                continue  # nothing grows into the first level
            out.append((f"{kind} {level}: per image", head.tower))
            out.append((f"{kind} {level}: per image", head.feature_conv))
            out.append((f"{kind} {level}: per pyramid", head))
    if model.class_head is not None:
        out.append(("pooled class head", model.class_head))
    if model.refine_head is not None:
        out.append(("refinement at object resolution (REFINE_RESOLUTION)", model.refine_head))
    return out


def main():
    args, cfg, model = load_mask_pyramid(
        __doc__,
        50,
        [("--ops", dict(type=int, default=0, help="profiler rows to print"))],
        other_models=True,
    )
    cuda = cfg.MODEL.DEVICE.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    spent = defaultdict(float)
    starts = {}

    def pre(label):
        def hook(module, inputs):
            sync()
            starts[id(module)] = time.perf_counter()

        return hook

    def post(label):
        def hook(module, inputs, output):
            sync()
            spent[label] += time.perf_counter() - starts.pop(id(module))

        return hook

    for label, module in parts(model):
        module.register_forward_pre_hook(pre(label))
        module.register_forward_hook(post(label))
    alive = defaultdict(list)
    grow = getattr(model, "grow", None)

    def counting_grow(*a, **k):
        records = grow(*a, **k)
        for rec in records:
            alive[rec.name].append(len(rec.pyramids))
        return records

    if grow is not None:
        model.grow = counting_grow
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    loader = Trainer.build_test_loader(cfg, dataset)
    total, n = 0.0, 0
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities) if args.ops else None
    with torch.no_grad():
        for i, inputs in enumerate(loader):
            if i == 2:  # two warm-up images
                spent.clear()
                alive.clear()
                if profiler is not None:
                    profiler.start()
            if i >= args.images + 2:
                break
            sync()
            start = time.perf_counter()
            model(inputs)
            sync()
            if i >= 2:
                total += time.perf_counter() - start
                n += 1
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if cuda else f"CPU, torch threads {threads}"
    print(f"{n} images of {dataset}, {where}, batch 1")
    print("| part | ms / image | share |")
    print("|---|---|---|")
    for label, s in list(spent.items()) + [("other", total - sum(spent.values()))]:
        print(f"| {label} | {1000 * s / n:.1f} | {100 * s / total:.0f}% |")
    print(f"| **total** | {1000 * total / n:.1f} | 100% |")
    if alive:
        print("pyramids alive after each level (mean per image): " + ", ".join(
            f"{k} {sum(v) / len(v):.1f}" for k, v in alive.items()
        ))  # fmt: skip
    if profiler is not None:
        profiler.stop()
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))


if __name__ == "__main__":
    main()

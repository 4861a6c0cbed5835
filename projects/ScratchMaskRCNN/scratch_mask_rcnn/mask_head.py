"""Mask head (convs + deconv + per-class 1x1), its per-class loss, and pasting masks into images."""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Instances, PolygonMasks
from detectron2.utils.events import get_event_storage
from torch import nn

from .layers import ConvNormAct, msra_fill
from .roi_align import roi_align, roi_align_bins_exact

__all__ = ["MaskHead", "mask_targets", "mask_loss", "mask_inference", "paste_masks"]

# Pooled target values this close to the 0.5 threshold are recomputed in torchvision's order
# (roi_align's bag sums differ from it by at most a few float32 ulps, about 5e-7).
TIE_MARGIN = 1e-5


class MaskHead(nn.Module):
    """``mask_fcn1..N`` (3x3 + ReLU), ``deconv`` (2x2, stride 2) + ReLU, ``predictor`` (1x1, one
    channel per class, or one when class-agnostic): detectron2's ``MaskRCNNConvUpsampleHead``."""

    def __init__(self, in_channels: int, num_classes: int, num_conv=4, conv_dim=256, norm="",
                 cls_agnostic=False):  # fmt: skip
        super().__init__()
        if num_conv < 1:
            raise ValueError("MODEL.ROI_MASK_HEAD.NUM_CONV must be >= 1")
        self.num_conv = num_conv
        channels = in_channels
        for k in range(num_conv):
            self.add_module(f"mask_fcn{k + 1}", ConvNormAct(channels, conv_dim, norm))
            channels = conv_dim
        self.deconv = nn.ConvTranspose2d(channels, conv_dim, kernel_size=2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1 if cls_agnostic else num_classes, kernel_size=1)
        # filled after all are built, as detectron2 does (same random draws for one seed)
        for k in range(num_conv):
            msra_fill(getattr(self, f"mask_fcn{k + 1}"))
        msra_fill(self.deconv)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.num_conv):
            x = getattr(self, f"mask_fcn{k + 1}")(x)
        return self.predictor(F.relu(self.deconv(x)))


def mask_targets(gt_masks, gt_index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(R, size, size) bool targets: ground truth ``gt_index[i]`` cropped to ``boxes[i]``.

    Bit masks are cropped with our RoIAlign (aligned, adaptive sampling, thresholded at 0.5: the
    targets of detectron2's ``BitMasks.crop_and_resize``) straight from the image's mask stack, one
    call for all RoIs; the values within ``TIE_MARGIN`` of 0.5 are recomputed in torchvision's
    order, so that ties fall as in detectron2. Polygons are rasterised in the box by detectron2's
    ``PolygonMasks``.
    """
    if isinstance(gt_masks, PolygonMasks):
        return gt_masks[gt_index].crop_and_resize(boxes, size).to(boxes.device)
    masks = gt_masks.tensor if isinstance(gt_masks, BitMasks) else gt_masks
    rois = torch.cat([gt_index.to(boxes.dtype)[:, None], boxes], dim=1)
    masks, rois = masks[:, None].to(torch.float32), rois.float()
    crops = roi_align(masks, rois, (size, size), 1.0, 0, True)[:, 0]
    near = ((crops - 0.5).abs() <= TIE_MARGIN).nonzero(as_tuple=True)
    if near[0].numel():
        # ties: torchvision gives exactly 0.5 (foreground), a bag sum may give 0.49999997
        crops[near] = roi_align_bins_exact(masks, rois, near, size, 1.0, 0, True)[:, 0]
    return crops >= 0.5


def mask_loss(logits: torch.Tensor, items: List[Tuple], cls_agnostic: bool):
    """Binary cross-entropy on each foreground RoI's own-class mask (detectron2's
    ``mask_rcnn_loss``).

    Args:
        logits: (R, K or 1, M, M) for the foreground RoIs of all images, in order.
        items: per image with foreground, (gt_masks, gt_index, boxes, gt_classes): the image's
            ground-truth masks and, per RoI, its matched ground truth, box and class.
    """
    size = logits.shape[2]
    targets, classes = [], []
    for gt_masks, gt_index, boxes, gt_classes in items:
        targets.append(mask_targets(gt_masks, gt_index, boxes, size).to(logits.device))
        classes.append(gt_classes.to(torch.int64))
    if not targets:
        return {"loss_mask": logits.sum() * 0}
    target = torch.cat(targets)
    if cls_agnostic:
        logits = logits[:, 0]
    else:
        logits = logits[torch.arange(len(logits), device=logits.device), torch.cat(classes)]
    wrong = (logits > 0.0) != target
    num_pos = target.sum().item()
    storage = get_event_storage()
    storage.put_scalar("mask_rcnn/accuracy", 1 - wrong.sum().item() / max(wrong.numel(), 1.0))
    storage.put_scalar(
        "mask_rcnn/false_positive",
        (wrong & ~target).sum().item() / max(target.numel() - num_pos, 1.0),
    )
    storage.put_scalar(
        "mask_rcnn/false_negative", (wrong & target).sum().item() / max(num_pos, 1.0)
    )
    loss = F.binary_cross_entropy_with_logits(logits, target.to(torch.float32), reduction="mean")
    return {"loss_mask": loss}


def mask_inference(logits: torch.Tensor, instances: List[Instances]) -> None:
    """Set ``pred_masks`` (n, 1, M, M) probabilities of each detection's class, in place."""
    if logits.shape[1] == 1:
        probs = logits.sigmoid()
    else:
        classes = torch.cat([i.pred_classes for i in instances])
        probs = logits[torch.arange(len(logits), device=logits.device), classes][:, None].sigmoid()
    for p, inst in zip(probs.split([len(i) for i in instances]), instances):
        inst.pred_masks = p


# pixels (masks x height x width) pasted per chunk: bounds the float temporaries (~50 MB)
_PASTE_CHUNK_PIXELS = 1 << 22


def paste_masks(
    masks: torch.Tensor, boxes: torch.Tensor, image_size, threshold: float = 0.5
) -> torch.Tensor:
    """Paste (N, M, M) mask probabilities into their boxes of an (h, w) image.

    Each image pixel centre is mapped into its box's mask and interpolated bilinearly, outside the
    mask counting as 0 (``grid_sample`` with ``align_corners=False``), as detectron2 pastes. All
    masks of a chunk are pasted by one call; chunks only bound memory.

    Returns:
        (N, h, w) bool when ``threshold >= 0``, else float probabilities.
    """
    h, w = int(image_size[0]), int(image_size[1])
    n = masks.shape[0]
    dtype = torch.bool if threshold >= 0 else torch.float32
    out = torch.zeros((n, h, w), dtype=dtype, device=masks.device)
    if n == 0 or h == 0 or w == 0:
        return out
    boxes = boxes.to(torch.float32)
    ys = torch.arange(h, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=masks.device, dtype=torch.float32) + 0.5
    step = max(1, _PASTE_CHUNK_PIXELS // (h * w))
    for s in range(0, n, step):
        b = boxes[s : s + step]
        x0, y0, x1, y1 = b[:, 0:1], b[:, 1:2], b[:, 2:3], b[:, 3:4]
        gx = (xs[None] - x0) / (x1 - x0) * 2 - 1  # (k, w)
        gy = (ys[None] - y0) / (y1 - y0) * 2 - 1  # (k, h)
        k = b.shape[0]
        grid = torch.stack((gx[:, None, :].expand(k, h, w), gy[:, :, None].expand(k, h, w)), dim=3)
        pasted = F.grid_sample(
            masks[s : s + step, None].to(torch.float32), grid, align_corners=False
        )[:, 0]
        out[s : s + step] = pasted >= threshold if threshold >= 0 else pasted
    return out

"""From grown pyramids to ``Instances``: priority painting, duplicate removal, optional NMS.

Pyramids are ordered by score; a higher-scoring pyramid has priority over the pixels it claims.
A pyramid keeping less than ``MIN_KEPT_FRACTION`` of its own mask after painting is a duplicate
(several roots of one instance predict the same mask) and is dropped. Boxes are the masks'
bounding boxes: the model regresses none.
"""

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from .growth import mask_extents, sample_windows

__all__ = [
    "NMS_MODES",
    "NMS_MASKS",
    "paint",
    "mask_iou_matrix",
    "mask_nms",
    "fast_mask_nms",
    "matrix_nms",
    "logits_to_image",
    "paste_in_image",
    "pyramids_to_instances",
]

NMS_MODES = ("none", "mask", "fast", "matrix")
NMS_MASKS = ("grid", "output")


def paint(masks: torch.Tensor, min_kept: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Priority painting of (N, H, W) bool masks sorted by score, highest first.

    Returns (keep (N,) bool, painted (N, H, W) bool): a pyramid is kept when it has pixels and
    keeps at least ``min_kept`` of them once every higher-scoring kept pyramid has painted.
    Two passes, each one cumulative sum over the pyramids (no loop over them): the first judges
    against every higher pyramid, the second repaints with the kept ones only.
    """
    area = masks.flatten(1).sum(1)
    m = masks.to(torch.int32)
    above = torch.cumsum(m, 0) - m > 0
    kept_px = (masks & ~above).flatten(1).sum(1)
    keep = (area > 0) & (kept_px >= min_kept * area)
    mk = m * keep[:, None, None]
    above = torch.cumsum(mk, 0) - mk > 0
    painted = masks & ~above & keep[:, None, None]
    return keep, painted


def mask_iou_matrix(
    masks: torch.Tensor, others: Optional[torch.Tensor] = None, chunk: int = 1 << 16
) -> torch.Tensor:
    """(N, M) IoU of (N, H, W) bool masks with (M, H, W) ``others`` (default: themselves).

    The pixels go through the matrix product ``chunk`` at a time, so that no float copy of the
    masks is made whole (100 output masks of an 800 x 1333 image: 430 MB as float32)."""
    flat = masks.flatten(1)
    other = flat if others is None else others.flatten(1)
    inter = flat.new_zeros(flat.shape[0], other.shape[0], dtype=torch.float32)
    for start in range(0, flat.shape[1], chunk):  # pixels, not masks
        a = flat[:, start : start + chunk].float()
        b = a if others is None else other[:, start : start + chunk].float()
        inter += a @ b.T
    area, area_other = flat.sum(1).float(), other.sum(1).float()
    return inter / (area[:, None] + area_other[None, :] - inter).clamp(min=1)


def mask_nms(masks: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy mask NMS for masks sorted by score: (N,) bool keep, exactly greedy's result.

    Computed as the fixed point of "keep i unless a kept higher-scoring mask overlaps it more
    than ``threshold``": matrix steps, at most N of them (a few in practice), no per-mask loop.
    """
    n = masks.shape[0]
    over = torch.triu(mask_iou_matrix(masks) > threshold, diagonal=1)
    keep = torch.ones(n, dtype=torch.bool, device=masks.device)
    for _ in range(n):
        new = ~(over & keep[:, None]).any(0)
        if torch.equal(new, keep):
            break
        keep = new
    return keep


def fast_mask_nms(masks: torch.Tensor, threshold: float) -> torch.Tensor:
    """YOLACT's Fast NMS on masks sorted by score: drop a mask overlapping any higher one."""
    iou = torch.triu(mask_iou_matrix(masks), diagonal=1)
    return iou.max(0).values <= threshold if masks.shape[0] else masks.new_zeros(0).bool()


def matrix_nms(masks: torch.Tensor, scores: torch.Tensor, sigma: float) -> torch.Tensor:
    """SOLOv2's Matrix NMS (Gaussian kernel) for masks sorted by score: decayed scores (N,)."""
    n = masks.shape[0]
    if n == 0:
        return scores
    iou = torch.triu(mask_iou_matrix(masks), diagonal=1)
    compensate = iou.max(0).values.expand(n, n).T  # (i, j): max IoU of i with those above it
    decay = torch.exp(-sigma * (iou**2 - compensate**2)).min(0).values
    return scores * decay


def _output_pixel_centres(output_size, input_size, like: torch.Tensor):
    """The centres of an output image's pixel rows and columns, in the input image's pixels
    (the output is the input resized back to ``output_size``): (ys, xs)."""
    dev, dt = like.device, like.dtype
    ys = (torch.arange(output_size[0], device=dev, dtype=dt) + 0.5) * (
        input_size[0] / output_size[0]
    )
    xs = (torch.arange(output_size[1], device=dev, dtype=dt) + 0.5) * (
        input_size[1] / output_size[1]
    )
    return ys, xs


def logits_to_image(
    logits: torch.Tensor, stride: float, output_size: Tuple[int, int], input_size: Tuple[int, int]
) -> torch.Tensor:
    """Resample (N, H, W) level logits to an (N, h_out, w_out) image of ``output_size``, for an
    input image of ``input_size`` (the network's, before resizing back)."""
    n, h, w = logits.shape
    if n == 0:
        return logits.new_zeros(0, *output_size)
    ys, xs = _output_pixel_centres(output_size, input_size, logits)
    gy = 2 * ys / (stride * h) - 1
    gx = 2 * xs / (stride * w) - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None].expand(n, -1, -1, -1)
    return F.grid_sample(logits[:, None], grid, align_corners=False, padding_mode="border")[:, 0]


def paste_in_image(
    windows: torch.Tensor,
    boxes: torch.Tensor,
    output_size: Tuple[int, int],
    input_size: Tuple[int, int],
    logit_thresh: float,
) -> torch.Tensor:
    """(K, h_out, w_out) bool masks of (K, R, R) window logits over ``boxes`` (K, 4, input
    pixels) in an image of ``output_size`` (the input image of ``input_size`` resized back):
    bilinear inside each box, empty outside. One batched ``grid_sample``, no loop over masks."""
    k = windows.shape[0]
    if k == 0:
        return torch.zeros(0, *output_size, dtype=torch.bool, device=windows.device)
    ys, xs = _output_pixel_centres(output_size, input_size, windows)
    sampled, inside = sample_windows(
        windows[:, None], boxes.to(windows.dtype), xs[None].expand(k, -1), ys[None].expand(k, -1)
    )
    return (sampled[:, 0] > logit_thresh) & inside


def pyramids_to_instances(
    logits: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    stride: float,
    input_size: Tuple[int, int],
    output_size: Tuple[int, int],
    score_thresh: float,
    mask_thresh: float,
    min_kept: float,
    nms: str,
    nms_thresh: float,
    matrix_sigma: float,
    max_detections: int,
    painted_output: bool,
    readout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    readout_thresh: float = 0.0,
    nms_masks: str = "grid",
) -> Instances:
    """The final pyramids of one image, (N, H, W) logits on the last level -> ``Instances``
    of ``output_size`` with pred_masks, pred_boxes (from the masks), scores, pred_classes.

    ``scores`` and ``classes`` are (N,) or (N, K): K class hypotheses per pyramid, best first.
    The first decides thresholds, order, painting and NMS; each kept pyramid is then output once
    per hypothesis above ``score_thresh`` (as Mask R-CNN outputs a box once per class), and
    ``max_detections`` caps the outputs. ``readout``, when given, maps the indices (into the
    N pyramids) of the output pyramids to their (K, h_out, w_out) bool masks (REFINE_RESOLUTION),
    for the pyramids whose best output score reaches ``readout_thresh``; otherwise the masks are
    the level logits resampled to ``output_size``.

    ``nms_masks``: the masks NMS and painting judge overlaps on: "grid" (the level's, before the
    readout) or "output" (the output masks: every candidate is read out first, and the readout
    threshold applies to its first score before NMS's decay)."""
    if nms not in NMS_MODES:
        raise ValueError(f"MODEL.MASK_PYRAMID.NMS must be one of {NMS_MODES}, got {nms}")
    if nms_masks not in NMS_MASKS:
        raise ValueError(
            f"MODEL.MASK_PYRAMID.NMS_MASKS must be one of {NMS_MASKS}, got {nms_masks}"
        )
    if scores.dim() == 1:
        scores, classes = scores[:, None], classes[:, None]
    all_scores, all_classes = scores, classes
    scores, classes = scores[:, 0], classes[:, 0]
    index = torch.arange(len(logits), device=logits.device)  # into the pyramids given
    keep = scores > score_thresh
    all_scores, all_classes = all_scores[keep], all_classes[keep]
    logits, scores, classes, index = logits[keep], scores[keep], classes[keep], index[keep]
    order = torch.argsort(scores, descending=True, stable=True)
    logits, scores, classes, index = logits[order], scores[order], classes[order], index[order]
    all_scores, all_classes = all_scores[order], all_classes[order]
    # the level's grid inside the image
    hv = -(-input_size[0] // int(stride))
    wv = -(-input_size[1] // int(stride))
    logit_thresh = torch.logit(torch.tensor(mask_thresh)).item()

    def output_masks(level_logits, pyramids, best) -> torch.Tensor:
        """(K, h_out, w_out) bool output masks of K pyramids (their level logits, indices into
        the N given, best scores): read out when they reach ``readout_thresh``, else resampled
        from the level's grid."""
        refined = best >= readout_thresh
        if readout is None:
            refined = torch.zeros_like(refined)
        masks = torch.zeros(len(best), *output_size, dtype=torch.bool, device=best.device)
        if refined.any():
            masks[refined] = readout(pyramids[refined])
        if not refined.all():
            grid = level_logits[~refined]
            masks[~refined] = logits_to_image(grid, stride, output_size, input_size) > logit_thresh
        return masks

    candidates = None  # output masks of every candidate, when NMS judges on them
    if nms_masks == "output":
        candidates = output_masks(logits, index, scores)
        binary = candidates
    else:
        binary = logits[:, :hv, :wv] > logit_thresh
    if nms == "matrix":
        scores = matrix_nms(binary, scores, matrix_sigma)
        keep = scores > score_thresh
    elif nms == "mask":
        keep = mask_nms(binary, nms_thresh)
    elif nms == "fast":
        keep = fast_mask_nms(binary, nms_thresh)
    else:
        keep = torch.ones_like(scores, dtype=torch.bool)
    if min_kept > 0 and len(scores):
        sub = keep.nonzero()[:, 0]
        kept, _ = paint(binary[sub], min_kept)
        keep = torch.zeros_like(keep)
        keep[sub[kept]] = True
    if nms == "matrix":  # decayed first scores; the other hypotheses decay alike
        decay = scores / all_scores[:, 0].clamp(min=1e-12)
        all_scores = all_scores * decay[:, None]
    rows = keep.nonzero()[:, 0]
    logits, scores, classes, index = logits[keep], scores[keep], classes[keep], index[keep]
    all_scores, all_classes = all_scores[keep], all_classes[keep]
    # one output per (pyramid, hypothesis) above the threshold, best scores first
    which = torch.arange(len(logits), device=logits.device)[:, None].expand_as(all_scores)
    valid_hyp = all_scores > score_thresh
    valid_hyp[:, 0] = True  # passed the threshold above (after Matrix NMS's decay too)
    which, scores, classes = which[valid_hyp], all_scores[valid_hyp], all_classes[valid_hyp]
    order = torch.argsort(scores, descending=True, stable=True)[:max_detections]
    which, scores, classes = which[order], scores[order], classes[order]
    used, inverse = torch.unique(which, return_inverse=True)
    if candidates is not None:
        masks = candidates[rows[used]]
    else:
        best = scores.new_zeros(len(used)).scatter_reduce(0, inverse, scores, "amax")
        masks = output_masks(logits[used], index[used], best)
    if painted_output and len(masks):
        _, masks = paint(masks, 0.0)  # among the pyramids, in order of their first score
    # boxes as BitMasks' (no loop), once per pyramid, not per hypothesis
    boxes, nonempty = mask_extents(masks)
    keep = nonempty[inverse]
    inverse = inverse[keep]
    result = Instances(output_size)
    result.pred_masks = masks[inverse]
    result.pred_boxes = Boxes(boxes[inverse].float())
    scores, classes = scores[keep], classes[keep]
    result.scores = scores
    result.pred_classes = classes
    return result

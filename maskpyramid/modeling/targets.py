"""Per-level training targets of MaskPyramid, prepared once per image (in the dataset mapper).

For every level of ``MODEL.MASK_PYRAMID.IN_FEATURES`` (coarse to fine) and every ground-truth
instance this gives the instance's mask resampled to the level and the level's positive roots.
Pixels between levels correspond by centre: cell ``(i, j)`` of a level of stride ``s`` covers
image pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)`` and its centre is ``((j + 0.5) s, (i + 0.5) s)``;
a level's mask is the area average of the image mask over each cell (exact, no corner alignment).
"""

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.structures import BitMasks, Instances, PolygonMasks

__all__ = [
    "TargetParams",
    "feature_strides",
    "resample_masks",
    "cell_centre_masks",
    "root_regions",
    "assign_positives",
    "prepare_pyramid_targets",
]


def feature_strides(names: Sequence[str], key: str = "IN_FEATURES") -> List[int]:
    """Strides of detectron2 FPN levels from their names (``p{k}`` has stride ``2**k``)."""
    strides = []
    for name in names:
        m = re.fullmatch(r"p(\d+)", name)
        if m is None:
            raise ValueError(
                f"MODEL.MASK_PYRAMID.{key}: '{name}' is not an FPN level name 'p<k>' "
                "(stride 2**k)"
            )
        strides.append(2 ** int(m.group(1)))
    if any(a <= b for a, b in zip(strides, strides[1:])):
        raise ValueError(f"MODEL.MASK_PYRAMID.{key} must go coarse to fine, got {list(names)}")
    return strides


@dataclass(frozen=True)
class TargetParams:
    """The config keys target preparation reads (picklable, for data-loader workers)."""

    strides: tuple  # of the root levels (IN_FEATURES)
    size_ranges: tuple  # one (low, high) per level, pixels of sqrt(box area)
    assign_mode: str = "center"
    center_radius: float = 1.5
    atss_topk: int = 9
    atss_scale: float = 4.0
    one_positive: bool = False
    center_in_mask: bool = True
    center_fill_holes: bool = False
    readout_strides: tuple = ()  # READOUT_FEATURES: mask targets only, no roots

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "TargetParams":
        mp = cfg.MODEL.MASK_PYRAMID
        n_root = len(mp.IN_FEATURES)
        all_strides = feature_strides(
            list(mp.IN_FEATURES) + list(mp.READOUT_FEATURES), "IN_FEATURES + READOUT_FEATURES"
        )
        strides, readout = all_strides[:n_root], all_strides[n_root:]
        ranges = [tuple(float(v) for v in r) for r in mp.SIZE_RANGES]
        if not mp.GROWTH:
            # the single-level reference: every instance is rooted on the first level
            ranges = [(0.0, math.inf)] + [(math.inf, math.inf)] * (len(strides) - 1)
        if len(ranges) != len(strides) or any(len(r) != 2 for r in ranges):
            raise ValueError(
                "MODEL.MASK_PYRAMID.SIZE_RANGES needs one [low, high] pair per level of "
                f"IN_FEATURES {list(mp.IN_FEATURES)}, got {list(mp.SIZE_RANGES)}"
            )
        if mp.ASSIGN_MODE not in ("center", "mask", "atss"):
            raise ValueError(
                f"MODEL.MASK_PYRAMID.ASSIGN_MODE must be center, mask or atss, got {mp.ASSIGN_MODE}"
            )
        return cls(
            strides=tuple(strides),
            size_ranges=tuple(ranges),
            assign_mode=mp.ASSIGN_MODE,
            center_radius=float(mp.CENTER_RADIUS),
            atss_topk=int(mp.ATSS_TOPK),
            atss_scale=float(mp.ATSS_SCALE),
            one_positive=bool(mp.ONE_POSITIVE_PER_LEVEL),
            center_in_mask=bool(mp.CENTER_IN_MASK),
            center_fill_holes=bool(mp.CENTER_FILL_HOLES),
            readout_strides=tuple(readout),
        )


def resample_masks(masks: torch.Tensor, strides: Sequence[int]) -> List[torch.Tensor]:
    """Area-average ``masks`` (N, H, W) onto each level's grid of ``ceil(H/s) x ceil(W/s)`` cells.

    Returns one float tensor per stride, values in [0, 1] (the covered fraction of each cell).
    """
    n, h, w = masks.shape
    top = max(strides)
    hp, wp = math.ceil(h / top) * top, math.ceil(w / top) * top
    x = F.pad(masks[:, None].float(), (0, wp - w, 0, hp - h))
    out = []
    for s in strides:
        pooled = F.avg_pool2d(x, s, s) if n else x.new_zeros(0, 1, hp // s, wp // s)
        out.append(pooled[:, 0, : math.ceil(h / s), : math.ceil(w / s)].contiguous())
    return out


def _cell_centres(hl: int, wl: int, stride: float):
    ys = (torch.arange(hl, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(wl, dtype=torch.float32) + 0.5) * stride
    return ys[None, :, None], xs[None, None, :]  # (1, hl, 1), (1, 1, wl)


def _box_iou_square(boxes: torch.Tensor, cy, cx, side: float) -> torch.Tensor:
    """IoU of each box (N, 4) with squares of ``side`` centred at the cells: (N, hl, wl)."""
    x0, y0, x1, y1 = (boxes[:, k, None, None] for k in range(4))
    half = side / 2
    iw = (torch.minimum(x1, cx + half) - torch.maximum(x0, cx - half)).clamp(min=0)
    ih = (torch.minimum(y1, cy + half) - torch.maximum(y0, cy - half)).clamp(min=0)
    inter = iw * ih
    return inter / ((x1 - x0) * (y1 - y0) + side * side - inter).clamp(min=1e-6)


def cell_centre_masks(masks: torch.Tensor, strides: Sequence[int]) -> List[torch.Tensor]:
    """Per stride, (N, hl, wl) bool: whether each cell's centre pixel lies in each mask (N, H, W).

    Cells past the image's edge (the last row and column of ``ceil(H / s)``) take the edge pixel.
    """
    n, h, w = masks.shape
    out = []
    for s in strides:
        ys = ((torch.arange(math.ceil(h / s)) + 0.5) * s).long().clamp(max=h - 1)
        xs = ((torch.arange(math.ceil(w / s)) + 0.5) * s).long().clamp(max=w - 1)
        out.append(masks[:, ys][:, :, xs].bool())
    return out


def root_regions(masks: torch.Tensor) -> torch.Tensor:
    """Where (N, H, W) bool masks may hold their roots with CENTER_FILL_HOLES: each mask with its
    holes filled (the inside of its outer contours: a ring's hole belongs to the ring), less the
    pixels of every other instance (an object seen through the hole keeps its own)."""
    n = masks.shape[0]
    if n == 0:
        return masks.clone()
    filled = np.zeros(tuple(masks.shape), dtype=np.uint8)
    # one C++ contour fill per ground-truth instance, once per image in the data loader
    for i, m in enumerate(masks.numpy().astype(np.uint8)):
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(filled[i], contours, -1, 1, thickness=cv2.FILLED)
    count = masks.sum(0, dtype=torch.int32)
    others = (count[None] - masks.int()) > 0
    return (torch.from_numpy(filled).bool() | masks) & ~others


def assign_positives(
    level_masks: List[torch.Tensor],
    boxes: torch.Tensor,
    centres: torch.Tensor,
    areas: torch.Tensor,
    params: TargetParams,
    inside: Optional[List[torch.Tensor]] = None,
) -> List[torch.Tensor]:
    """Positive roots of every level: a (hl, wl) map of instance index, -1 where none.

    Args:
        level_masks: per level, the instances' masks on its grid (N, hl, wl).
        boxes: (N, 4) XYXY boxes of the masks; centres: (N, 2) xy centres of mass;
        areas: (N,) mask areas in pixels (ties go to the smaller instance).
        inside: per level, (N, hl, wl) bool, the cell's centre pixel lies in the mask
            (``cell_centre_masks``); needed by ``center_in_mask`` ("center" and "atss" modes).
    """
    in_mask = params.center_in_mask and params.assign_mode in ("center", "atss")
    if in_mask and inside is None:
        raise ValueError("assign_positives: center_in_mask needs the cell-centre masks 'inside'")
    n = boxes.shape[0]
    sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    valid = areas > 0
    candidates, dists = [], []
    for lvl, (masks, s) in enumerate(zip(level_masks, params.strides)):
        hl, wl = masks.shape[-2:]
        cy, cx = _cell_centres(hl, wl, s)
        dx = cx - centres[:, 0, None, None]
        dy = cy - centres[:, 1, None, None]
        dists.append(torch.sqrt(dx * dx + dy * dy).expand(n, hl, wl))
        # candidates lie in the instance's box (and on the instance, with center_in_mask)
        allowed = (
            (cx >= boxes[:, 0, None, None])
            & (cx <= boxes[:, 2, None, None])
            & (cy >= boxes[:, 1, None, None])
            & (cy <= boxes[:, 3, None, None])
        )
        # the cell that holds the centre of mass is always a candidate ...
        ci = (centres[:, 1] / s).long().clamp(0, hl - 1)
        cj = (centres[:, 0] / s).long().clamp(0, wl - 1)
        centre_cell = torch.zeros(n, hl, wl, dtype=torch.bool)
        centre_cell[torch.arange(n), ci, cj] = True
        if in_mask:
            # ... or, with center_in_mask, the cell nearest it whose centre is on the instance
            # (a ring's centre of mass is in its hole); the centre cell when no cell is
            on = inside[lvl]
            d = torch.where(on, dists[-1], torch.full_like(dists[-1], math.inf)).reshape(n, hl * wl)
            dmin, arg = d.min(1)
            nearest = torch.zeros(n, hl * wl, dtype=torch.bool)
            nearest[torch.arange(n), arg] = True
            centre_cell = torch.where(
                torch.isfinite(dmin)[:, None, None], nearest.view(n, hl, wl), centre_cell
            )
            allowed = allowed & on
        if params.assign_mode == "center":
            r = params.center_radius * s
            cand = ((dx.abs() <= r) & (dy.abs() <= r) & allowed) | centre_cell
        elif params.assign_mode == "mask":
            cand = (masks >= 0.5) | centre_cell
        else:  # atss: ATSS_TOPK nearest cells; thresholded below, across levels
            k = min(params.atss_topk, hl * wl)
            flat = dists[-1].reshape(n, -1)
            idx = flat.topk(k, dim=1, largest=False).indices
            cand = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
            cand = cand.view(n, hl, wl) & allowed | centre_cell
        candidates.append(cand)

    if params.assign_mode == "atss":
        qualities = [
            _box_iou_square(boxes, *_cell_centres(*m.shape[-2:], s), params.atss_scale * s)
            for m, s in zip(level_masks, params.strides)
        ]
        if n:
            q_all = torch.cat([q.reshape(n, -1) for q in qualities], 1)
            c_all = torch.cat([c.reshape(n, -1) for c in candidates], 1).float()
            cnt = c_all.sum(1).clamp(min=1)
            mean = (q_all * c_all).sum(1) / cnt
            std = (((q_all - mean[:, None]) ** 2 * c_all).sum(1) / cnt).sqrt()
            thr = mean + std
            best = (q_all * c_all).max(1).values  # at least one positive per instance
            thr = torch.minimum(thr, best)
            candidates = [c & (q >= thr[:, None, None]) for c, q in zip(candidates, qualities)]
    else:
        for lvl, (low, high) in enumerate(params.size_ranges):
            in_range = (sizes >= low) & (sizes < high)
            candidates[lvl] = candidates[lvl] & in_range[:, None, None]

    positives = []
    for cand, dist in zip(candidates, dists):
        cand = cand & valid[:, None, None]
        hl, wl = cand.shape[-2:]
        if n == 0:
            positives.append(torch.full((hl, wl), -1, dtype=torch.long))
            continue
        key = torch.where(cand, areas[:, None, None].float(), torch.full_like(dist, math.inf))
        best_key, owner = key.min(0)
        owner = torch.where(torch.isfinite(best_key), owner, torch.full_like(owner, -1))
        if params.one_positive:
            owned = owner[None] == torch.arange(n)[:, None, None]
            d = torch.where(owned, dist, torch.full_like(dist, math.inf)).reshape(n, -1)
            dmin, arg = d.min(1)
            owner = torch.full((hl * wl,), -1, dtype=torch.long)
            keep = torch.isfinite(dmin)
            owner[arg[keep]] = torch.arange(n)[keep]
            owner = owner.view(hl, wl)
        positives.append(owner)
    return positives


def prepare_pyramid_targets(instances: Instances, params: TargetParams) -> Dict:
    """The per-level targets of one image (what ``MaskPyramidDatasetMapper`` adds to its dict).

    Returns a dict with
        masks: per level (root levels, then read-out levels), (N, hl, wl) float16 masks on the
            level's grid;
        positives: per level, (hl, wl) int64 map of positive roots (instance index or -1; all -1
            on read-out levels);
        levels: (N,) int64, the coarsest level where the instance has a positive root (-1: none,
            e.g. an empty mask; such an instance is only ever a region other pyramids must avoid).
    """
    h, w = instances.image_size
    gt_masks = instances.gt_masks if instances.has("gt_masks") else None
    if gt_masks is None:
        raise ValueError("MaskPyramid needs instance masks: set MODEL.MASK_ON True")
    if isinstance(gt_masks, PolygonMasks):
        gt_masks = BitMasks.from_polygon_masks(gt_masks, h, w)
    masks = gt_masks.tensor.bool()
    n = masks.shape[0]
    level_masks = resample_masks(masks, params.strides + params.readout_strides)
    readout_masks = level_masks[len(params.strides) :]
    level_masks = level_masks[: len(params.strides)]
    areas = masks.flatten(1).sum(1).float()
    boxes = BitMasks(masks).get_bounding_boxes().tensor if n else torch.zeros(0, 4)
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    safe = areas.clamp(min=1)
    cx = (masks.sum(1).float() * xs).sum(1) / safe
    cy = (masks.sum(2).float() * ys).sum(1) / safe
    centres = torch.stack([cx, cy], 1)
    inside = None
    if params.center_in_mask:
        regions = root_regions(masks) if params.center_fill_holes else masks
        inside = cell_centre_masks(regions, params.strides)
    positives = assign_positives(level_masks, boxes, centres, areas, params, inside)
    levels = torch.full((n,), -1, dtype=torch.long)
    for lvl in reversed(range(len(positives))):
        owners = positives[lvl][positives[lvl] >= 0].unique()
        levels[owners] = lvl
    positives = positives + [torch.full(m.shape[1:], -1, dtype=torch.long) for m in readout_masks]
    return {
        "masks": [m.half() for m in level_masks + readout_masks],
        "positives": positives,
        "levels": levels,
    }

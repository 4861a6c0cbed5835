"""The growth loop's tensor operations: pyramids, resampling, windows, spawning, pruning, caps.

Pure tensor code: it knows nothing of losses, datasets or heads (``meta_arch.py`` wires them).
The pyramids of all images of a batch live in one flat set (``Pyramids``) with a ``batch`` index,
so every operation here is batched over images and pyramids; the only loops are over levels.

Coordinates: a level of stride ``s`` has cells centred at ``(j + 0.5) s, (i + 0.5) s`` in input
pixels; every resampling goes through those centres (``align_corners=False`` semantics).
"""

from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .position import cell_centres

__all__ = [
    "Pyramids",
    "valid_cells",
    "resample_to_grid",
    "paste_windows",
    "pool_windows",
    "sample_windows",
    "support_boxes",
    "tight_boxes",
    "centred_boxes",
    "image_boxes",
    "local_peaks",
    "coverage",
    "rank_within_group",
    "topk_survivors",
    "cap_per_image",
    "soft_clamp",
]


@dataclass
class Pyramids:
    """A set of mask pyramids (candidate instances) of a batch, at the current level.

    Every field is a tensor whose first dimension is the pyramid.
    """

    batch: torch.Tensor  # (N,) image index in the batch
    roots: torch.Tensor  # (N, 2) root xy, input pixels
    root_level: torch.Tensor  # (N,) index into IN_FEATURES of the level the root was spawned on
    root_stride: torch.Tensor  # (N,) cell size of the root's grid, pixels (position map radius)
    logits: torch.Tensor  # (N, H, W) mask logits on the current level's grid
    cls_logits: torch.Tensor  # (N, C) class logits at the root
    scores: torch.Tensor  # (N,) score (root response, or times predicted mask IoU)
    classes: torch.Tensor  # (N,) class that picks class-specific mask channels
    target: torch.Tensor  # (N,) index of its instance in the batch (training), -1 for none
    pseudo: torch.Tensor  # (N,) bool: a pseudo pyramid (holds background, "uncovered" mode)
    # (N, H, W) bool: root cell dilated by one cell, carried down (None where nothing reads it)
    territory: Optional[torch.Tensor]
    hidden: Optional[torch.Tensor] = None  # (N, D, R, R) last head features (GROW_SKIP)
    windows: Optional[torch.Tensor] = None  # (N, 4) XYXY window of the last head, pixels
    iou_logits: Optional[torch.Tensor] = None  # (N,) predicted mask IoU logit ("maskiou")

    def __len__(self) -> int:
        return self.batch.shape[0]

    def __getitem__(self, idx) -> "Pyramids":
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
            # One nonzero for all fields: each boolean index is a host synchronisation on a GPU.
            idx = idx.nonzero().squeeze(1)
        return Pyramids(
            **{
                f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                for f in fields(self)
            }
        )

    @staticmethod
    def cat(items: Sequence["Pyramids"]) -> "Pyramids":
        items = [p for p in items if p is not None]
        out = {}
        for f in fields(Pyramids):
            values = [getattr(p, f.name) for p in items]
            out[f.name] = None if any(v is None for v in values) else torch.cat(values, 0)
        return Pyramids(**out)


def soft_clamp(logits: torch.Tensor, limit: float) -> torch.Tensor:
    """``limit * tanh(x / limit)``: keeps logits in a trainable range (0 = no clamp)."""
    return limit * torch.tanh(logits / limit) if limit > 0 else logits


def valid_cells(image_sizes, stride: float, height: int, width: int, device) -> torch.Tensor:
    """(B, H, W) bool: cells whose area overlaps the image (the rest is batch padding)."""
    sizes = torch.as_tensor(image_sizes, device=device, dtype=torch.float32).view(-1, 2)
    rows = torch.arange(height, device=device)[None, :] * stride < sizes[:, :1]
    cols = torch.arange(width, device=device)[None, :] * stride < sizes[:, 1:]
    return rows[:, :, None] & cols[:, None, :]


def _grid_coords(height, width, stride, device, dtype):
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) * stride
    return ys, xs


def resample_to_grid(
    maps: torch.Tensor, src_stride: float, size: Tuple[int, int], dst_stride: float
) -> torch.Tensor:
    """Bilinear resampling of (N, h, w) maps of one level onto another level's (H, W) grid.

    Cells correspond by centre, whatever the two grids' sizes (FPN levels of padded images need
    not be exact multiples of each other).
    """
    n, h, w = maps.shape
    if n == 0:
        return maps.new_zeros(0, *size)
    ys, xs = _grid_coords(size[0], size[1], dst_stride, maps.device, maps.dtype)
    gx = 2 * xs / (src_stride * w) - 1
    gy = 2 * ys / (src_stride * h) - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)
    grid = grid[None].expand(n, -1, -1, -1)
    return F.grid_sample(maps[:, None], grid, align_corners=False, padding_mode="border")[:, 0]


def paste_windows(
    windows: torch.Tensor,
    boxes: torch.Tensor,
    size: Tuple[int, int],
    stride: float,
    background: torch.Tensor,
) -> torch.Tensor:
    """Paste (N, R, R) window maps over ``boxes`` (N, 4) into (N, H, W) maps of a level.

    Cells whose centre falls inside a pyramid's window take the window's bilinear value; the
    others keep ``background`` (N, H, W) (or a scalar).
    """
    n = windows.shape[0]
    height, width = size
    if n == 0:
        return windows.new_zeros(0, height, width)
    ys, xs = _grid_coords(height, width, stride, windows.device, windows.dtype)
    sampled, inside = sample_windows(
        windows[:, None], boxes, xs[None].expand(n, -1), ys[None].expand(n, -1)
    )
    sampled = sampled[:, 0]
    if not torch.is_tensor(background):
        background = torch.full_like(sampled, float(background))
    return torch.where(inside, sampled, background)


def sample_windows(windows: torch.Tensor, boxes: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor):
    """Bilinear samples of (N, C, R, R) windows over ``boxes`` (N, 4) at the points
    ``xs`` (N, W) x ``ys`` (N, H) (input pixels; outside a window, its border value).

    Returns (samples (N, C, H, W), inside (N, H, W) bool: the point lies in the window).
    """
    n, height, width = windows.shape[0], ys.shape[1], xs.shape[1]
    sides = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)  # (N, 2): width, height
    gx = 2 * (xs - boxes[:, 0:1]) / sides[:, 0:1] - 1
    gy = 2 * (ys - boxes[:, 1:2]) / sides[:, 1:2] - 1
    grid = torch.stack(
        [gx[:, None, :].expand(n, height, width), gy[:, :, None].expand(n, height, width)], -1
    )
    sampled = F.grid_sample(windows, grid, align_corners=False, padding_mode="border")
    inside = (gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None]
    return sampled, inside


def pool_windows(
    maps: torch.Tensor,
    boxes: torch.Tensor,
    batch: Optional[torch.Tensor],
    size: int,
    scale: float,
) -> torch.Tensor:
    """(N, C, size, size) windows of (B, C, H, W) ``maps`` over ``boxes`` (N, 4, XYXY in input
    pixels; ``scale``: the maps' cells per pixel) of images ``batch`` (N,), or (``batch`` None)
    one box per map: detectron2's ``ROIAlign((size, size), scale, sampling_ratio=1,
    aligned=True)``, to float rounding. One bilinear sample at each bin's centre; as ROIAlign's,
    a point within one cell outside the map takes the border's value, a point farther out 0.

    On the CPU, where torchvision's ``roi_align`` kernel runs on one thread, this runs on all:
    the windows of each image are laid side by side in one ``grid_sample`` call (images with
    fewer windows are padded). For MaskPyramid's windows on 2 cores, 2-3x faster forward and
    forward + backward (``benchmarks/window_pooling.py``); with more samples per bin
    (``avg_pool2d`` of a finer grid) it was slower than torchvision's kernel, so only this case
    is taken."""
    n = boxes.shape[0]
    num_maps, channels, height, width = maps.shape
    if n == 0:
        return maps.new_zeros(0, channels, size, size)
    points = cell_centres(boxes.to(maps.dtype), size) * scale  # (N, 2, size): xs, ys in cells
    extent = torch.tensor([[width], [height]], dtype=maps.dtype, device=maps.device)
    g = 2 * points / extent - 1
    grid = torch.stack(
        [g[:, 0, None, :].expand(n, size, size), g[:, 1, :, None].expand(n, size, size)], -1
    )

    def sample(m, g):
        return F.grid_sample(m, g, mode="bilinear", padding_mode="border", align_corners=False)

    if batch is None:  # one box per map
        if num_maps != n:
            raise ValueError(f"pool_windows: {n} boxes for {num_maps} maps and no batch index")
        out = sample(maps, grid)
    elif num_maps == 1:  # no padding, no gather: the windows' rows one after the other
        out = sample(maps, grid.reshape(1, n * size, size, 2))
        out = out.view(channels, n, size, size).transpose(0, 1)
    else:
        slot = rank_within_group(batch, torch.zeros_like(points[:, 0, 0]))
        per_map = int(torch.bincount(batch).max())
        padded = grid.new_zeros(num_maps, per_map, size, size, 2)
        padded[batch, slot] = grid
        out = sample(maps, padded.view(num_maps, per_map * size, size, 2))
        out = out.view(num_maps, channels, per_map, size, size).transpose(1, 2)[batch, slot]
    # ROIAlign's sample coordinates (cells less 0.5) beyond one cell of the map give 0
    inside = (points >= -0.5) & (points <= extent + 0.5)  # (N, 2, size)
    if bool(inside.all()):
        return out
    return out * (inside[:, 1, :, None] & inside[:, 0, None, :])[:, None].to(out.dtype)


def image_boxes(image_sizes, index: torch.Tensor) -> torch.Tensor:
    """(N, 4) boxes of the whole image of each pyramid (``index`` = its image in the batch)."""
    sizes = torch.as_tensor(image_sizes, device=index.device, dtype=torch.float32).view(-1, 2)
    hw = sizes[index]
    zeros = torch.zeros_like(hw[:, 0])
    return torch.stack([zeros, zeros, hw[:, 1], hw[:, 0]], 1)


def box_sides(boxes: torch.Tensor) -> torch.Tensor:
    """(N,) side of each (N, 4) box as COCO sizes objects: the square root of its area."""
    return (boxes[:, 2:] - boxes[:, :2]).prod(1).clamp(min=0).sqrt()


def centred_boxes(centres: torch.Tensor, side: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """Square boxes of ``side`` (N,) around ``centres`` (N, 2), shifted inside ``limits`` (N, 4)
    (when the image is smaller than the side, the box is the image)."""
    side = side[:, None]
    low, high = limits[:, :2], limits[:, 2:]  # x and y together
    start = torch.minimum(torch.maximum(centres - side / 2, low), high - side)
    start = torch.maximum(start, low)
    return torch.cat([start, torch.minimum(start + side, high)], 1)


def support_boxes(
    probs: torch.Tensor, stride: float, eps: float, margin: int, limits: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Windows around where each (N, H, W) probability map exceeds ``eps``, plus ``margin`` cells,
    clipped to ``limits`` (N, 4). Returns (boxes (N, 4) in pixels, nonempty (N,) bool)."""
    # the rows' and columns' maxima, not (probs > eps).any(): 5-10x faster on the CPU
    extents, nonempty = _extents(probs.amax(2) > eps, probs.amax(1) > eps)
    margins = torch.tensor([-margin, -margin, margin, margin], device=probs.device)
    boxes = (extents + margins).to(probs.dtype) * stride
    return clip_boxes(boxes, limits), nonempty


def jitter_boxes(boxes: torch.Tensor, jitter: float) -> torch.Tensor:
    """(N, 4) XYXY ``boxes`` with the centre moved by up to ``jitter`` of the side and each side
    scaled by up to exp(+-``jitter``), uniformly at random (proposals near an instance)."""
    wh = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + (torch.rand_like(wh) * 2 - 1) * jitter * wh
    wh = wh * torch.exp((torch.rand_like(wh) * 2 - 1) * jitter)
    return torch.cat([centre - wh / 2, centre + wh / 2], 1)


def clip_boxes(boxes: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """(N, 4) XYXY ``boxes`` clipped to (N, 4) ``limits``, box by box (detectron2's
    ``Boxes.clip`` takes one image size for all)."""
    return torch.cat(
        [torch.maximum(boxes[:, :2], limits[:, :2]), torch.minimum(boxes[:, 2:], limits[:, 2:])], 1
    )


def mask_extents(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes of (N, H, W) bool masks in cells, XYXY with exclusive ends (N, 4) long (0 for
    an empty mask), and (N,) bool: the mask is not empty. No loop over the masks."""
    # as uint8 maxima: on the CPU, bool any() of a (12, 256, 256) batch of masks is 30x slower
    as_bytes = masks.view(torch.uint8)
    return _extents(as_bytes.amax(2) > 0, as_bytes.amax(1) > 0)


def _extents(rows: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mask_extents`` from (N, H) ``rows`` and (N, W) ``cols``: whether each row and column
    of each mask has a cell."""
    height, width = rows.shape[1], cols.shape[1]
    y0 = rows.byte().argmax(1)
    y1 = height - rows.flip(1).byte().argmax(1)
    x0 = cols.byte().argmax(1)
    x1 = width - cols.flip(1).byte().argmax(1)
    nonempty = rows.any(1)
    boxes = torch.stack([x0, y0, x1, y1], 1) * nonempty[:, None]
    return boxes, nonempty


def tight_boxes(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) boxes, in the units of ``boxes``, of the cells of (N, R, R) bool ``masks`` laid on
    (N, 4) ``boxes`` (cell edges, as ROIAlign's bins); an empty mask keeps its box."""
    extents, nonempty = mask_extents(masks)
    cells = torch.tensor(
        [masks.shape[2], masks.shape[1]] * 2, dtype=boxes.dtype, device=boxes.device
    )
    cell = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2) / cells
    tight = boxes[:, :2].repeat(1, 2) + extents.to(boxes.dtype) * cell
    return torch.where(nonempty[:, None], tight, boxes)


def local_peaks(score_map: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, H, W) bool: 3x3 local maxima of ``score_map`` above ``threshold``."""
    pooled = F.max_pool2d(score_map[:, None], 3, stride=1, padding=1)[:, 0]
    return (score_map >= pooled) & (score_map > threshold)


def coverage(probs: torch.Tensor, batch: torch.Tensor, num_images: int) -> torch.Tensor:
    """(B, H, W): per image and pixel, the highest probability of any of its pyramids."""
    n = probs.shape[0]
    out = probs.new_zeros(num_images, *probs.shape[1:])
    if n:
        flat = probs.reshape(n, -1)
        index = batch[:, None].expand_as(flat)
        out = out.view(num_images, -1).scatter_reduce(0, index, flat, "amax").view_as(out)
    return out


def rank_within_group(group: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Rank of each element among those of its group, by ``key`` descending (0 = highest)."""
    n = group.shape[0]
    if n == 0:
        return group.clone()
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    sorted_group = group[order]
    counts = torch.bincount(sorted_group)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=group.device) - starts[sorted_group]
    return rank


def topk_survivors(
    probs: torch.Tensor, batch: torch.Tensor, num_images: int, low: float, k: int
) -> torch.Tensor:
    """(N,) bool: pyramids that are among the ``k`` most probable of their image at some pixel
    where their probability is at least ``low`` (the others are pruned)."""
    n = probs.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=probs.device)
    slot = rank_within_group(batch, torch.zeros_like(probs[:, 0, 0]))
    n_max = int(slot.max()) + 1
    padded = probs.new_full((num_images, n_max) + tuple(probs.shape[1:]), -1.0)
    padded[batch, slot] = torch.where(probs >= low, probs, torch.full_like(probs, -1.0))
    values, index = padded.topk(min(k, n_max), dim=1)
    # slots that win a pixel; the losers' entries go to a spare column (no boolean index: on a
    # GPU each one waits for the device)
    index = torch.where(values >= low, index, n_max).view(num_images, -1)
    hit = torch.zeros(num_images, n_max + 1, dtype=torch.bool, device=probs.device)
    hit.scatter_(1, index, True)
    return hit[batch, slot]


def cap_per_image(batch: torch.Tensor, priority: torch.Tensor, cap: int) -> torch.Tensor:
    """(N,) bool: the ``cap`` highest-``priority`` pyramids of each image."""
    return rank_within_group(batch, priority) < cap

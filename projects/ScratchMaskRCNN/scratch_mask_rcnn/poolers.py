"""Multi-level RoI pooling (detectron2's ``ROIPooler``) as ONE ``embedding_bag`` call.

Each box is assigned an FPN level with detectron2's canonical rule (``assign_boxes_to_levels``).
Instead of one RoIAlign per level and an ``index_put_`` of the results, the feature maps of all
levels are laid out channels-last and concatenated into a single ``(rows, C)`` table; every box
gets the scale, height, width and first table row of its level (and image), and the bags of all
boxes are built at once by :func:`.roi_align.bilinear_bags` and summed by a single
``embedding_bag`` (see :mod:`.roi_align` for the design and the exact torchvision semantics).
The output is in the order of the concatenated boxes, with no loop over RoIs or levels other
than laying out the table.
"""

import math
from typing import List, Optional, Sequence, Union

import torch
from detectron2.structures import Boxes
from torch import Tensor, nn

from .roi_align import OutputSize, _pair, bilinear_bags, channels_last_table, coord_dtype, pool_bags

__all__ = ["assign_boxes_to_levels", "ROIPooler"]

BoxList = Sequence[Union[Tensor, Boxes]]

_POOLER_TYPES = {"ROIAlignV2": True, "ROIAlign": False}  # name -> aligned


def _box_tensor(boxes: Union[Tensor, Boxes]) -> Tensor:
    tensor = boxes.tensor if isinstance(boxes, Boxes) else boxes
    if not isinstance(tensor, Tensor) or tensor.dim() != 2 or tensor.shape[1] != 4:
        raise ValueError("boxes must be Boxes or Tensor[L, 4] (x1, y1, x2, y2) per image")
    return tensor


def assign_boxes_to_levels(
    box_lists: BoxList,
    min_level: int,
    max_level: int,
    canonical_box_size: float,
    canonical_level: int,
) -> Tensor:
    """FPN level of every box, minus ``min_level`` (detectron2's ``assign_boxes_to_levels``).

    ``level = floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8))``, clamped
    to ``[min_level, max_level]``, with ``area = (x2 - x1) * (y2 - y1)``.

    Args:
        box_lists: per image, ``Boxes`` or ``Tensor[Li, 4]``.

    Returns:
        int64 ``(sum Li,)`` in the order of the concatenated boxes.
    """
    boxes = torch.cat([_box_tensor(b) for b in box_lists])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    box_sizes = torch.sqrt(area)
    levels = torch.floor(canonical_level + torch.log2(box_sizes / canonical_box_size + 1e-8))
    levels = torch.clamp(levels, min=min_level, max=max_level)
    return levels.to(torch.int64) - min_level


class ROIPooler(nn.Module):
    """Pools boxes from one or more feature maps (detectron2's ``ROIPooler``, same arguments).

    Args:
        output_size: ``PH`` or ``(PH, PW)``.
        scales: ``1 / stride`` of every feature map, a pyramid: strides are powers of two,
            increasing by 2 from one map to the next.
        sampling_ratio: samples per bin along each axis; 0 for adaptive.
        pooler_type: ``"ROIAlignV2"`` (aligned) or ``"ROIAlign"`` (legacy, not aligned).
        canonical_box_size: box size (sqrt of area) in pixels that goes to ``canonical_level``.
        canonical_level: level of a canonically sized box.
    """

    def __init__(
        self,
        output_size: OutputSize,
        scales: Sequence[float],
        sampling_ratio: int,
        pooler_type: str = "ROIAlignV2",
        canonical_box_size: float = 224,
        canonical_level: int = 4,
    ):
        super().__init__()
        self.output_size = _pair(output_size)
        if pooler_type not in _POOLER_TYPES:
            raise ValueError(
                f"Unsupported pooler type {pooler_type!r} (MODEL.ROI_BOX_HEAD.POOLER_TYPE / "
                f"MODEL.ROI_MASK_HEAD.POOLER_TYPE): ScratchMaskRCNN supports "
                f"{sorted(_POOLER_TYPES)}"
            )
        self.pooler_type = pooler_type
        self.aligned = _POOLER_TYPES[pooler_type]
        self.sampling_ratio = int(sampling_ratio)
        self.scales = [float(s) for s in scales]
        if not self.scales:
            raise ValueError("ROIPooler needs at least one scale")
        min_level = -math.log2(self.scales[0])
        max_level = -math.log2(self.scales[-1])
        if not (
            math.isclose(min_level, round(min_level)) and math.isclose(max_level, round(max_level))
        ):
            raise ValueError(f"Feature map strides must be powers of 2, got scales {scales}")
        self.min_level, self.max_level = int(round(min_level)), int(round(max_level))
        if len(self.scales) != self.max_level - self.min_level + 1:
            raise ValueError(f"Scales {scales} do not form a pyramid (factor 1/2 per level)")
        if not 0 <= self.min_level <= self.max_level:
            raise ValueError(f"Scales {scales} must be <= 1 and decreasing")
        if canonical_box_size <= 0:
            raise ValueError("canonical_box_size must be positive")
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def forward(
        self, x: List[Tensor], box_lists: BoxList, table: Optional[Tensor] = None
    ) -> Tensor:
        """Pool every box from its level.

        Args:
            x: one NCHW feature map per scale (same N and C).
            box_lists: ``N`` per-image ``Boxes`` or ``Tensor[Li, 4]``, in input coordinates.
            table: ``channels_last_table(x)`` when the caller already has it (the box and mask
                branches pool from the same maps: one copy of the features serves both).

        Returns:
            ``(sum Li, C, PH, PW)`` contiguous, boxes in concatenated order.
        """
        if not isinstance(x, (list, tuple)) or not isinstance(box_lists, (list, tuple)):
            raise TypeError("ROIPooler takes a list of feature maps and a list of boxes")
        if len(x) != len(self.scales):
            raise ValueError(
                f"ROIPooler has {len(self.scales)} scales but got {len(x)} feature maps"
            )
        N, C = x[0].shape[:2]
        for level, f in enumerate(x):
            if f.dim() != 4 or f.shape[0] != N or f.shape[1] != C:
                raise ValueError(
                    f"feature map {level} has shape {tuple(f.shape)}; expected ({N}, {C}, H, W)"
                )
        if len(box_lists) != N:
            raise ValueError(f"{len(box_lists)} box lists for a batch of {N} feature maps")
        device = x[0].device
        boxes_per_image = [_box_tensor(b) for b in box_lists]
        if table is None:
            table = channels_last_table(x)
        if not boxes_per_image:
            return pool_bags(table, None, 0, self.output_size)
        boxes = torch.cat(boxes_per_image).to(device)
        R = boxes.shape[0]
        counts = torch.tensor([len(b) for b in boxes_per_image], device=device)
        image = torch.repeat_interleave(torch.arange(N, device=device), counts, output_size=R)
        if len(x) == 1:
            level = torch.zeros(R, dtype=torch.long, device=device)
        else:
            level = assign_boxes_to_levels(
                [boxes],
                self.min_level,
                self.max_level,
                self.canonical_box_size,
                self.canonical_level,
            )
        # a box whose level is undefined (e.g. NaN size) is not pooled, as in detectron2
        valid = (level >= 0) & (level < len(x))
        level = level.clamp(0, len(x) - 1)

        cdt = coord_dtype(x[0].dtype)
        sizes = [f.shape[2:] for f in x]
        rows = [N * int(h) * int(w) for h, w in sizes]
        level_base = [sum(rows[:i]) for i in range(len(x))]
        per_level = torch.tensor(
            [[int(h), int(w), b] for (h, w), b in zip(sizes, level_base)], device=device
        )[level]
        height, width = per_level[:, 0], per_level[:, 1]
        scale = torch.tensor(self.scales, dtype=cdt, device=device)[level]
        bags = bilinear_bags(
            boxes.to(cdt),
            scale,
            height,
            width,
            per_level[:, 2] + image * height * width,
            self.output_size,
            self.sampling_ratio,
            self.aligned,
            valid,
        )
        return pool_bags(table, bags, R, self.output_size)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, scales={self.scales}, "
            f"sampling_ratio={self.sampling_ratio}, pooler_type={self.pooler_type!r}"
        )

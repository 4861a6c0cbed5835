"""Anchor generator: per FPN level, sizes x aspect ratios cell anchors tiled over the feature map.

Same anchors, in the same order, as detectron2's ``DefaultAnchorGenerator``: for each location
(row-major), for each size, for each aspect ratio; boxes are XYXY in input-image pixels.
"""

import math
from typing import List, Sequence

import torch
from torch import nn

__all__ = ["AnchorGenerator", "cell_anchors"]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """(len(sizes) * len(aspect_ratios), 4) anchors centred on (0, 0); ratio = height / width."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


def _per_level(values, num_levels: int, key: str) -> List[Sequence[float]]:
    values = [list(v) for v in values]
    if len(values) == 1:
        return values * num_levels
    if len(values) != num_levels:
        raise ValueError(
            f"{key} has {len(values)} entries but there are {num_levels} feature levels: "
            "give one list per level, or a single list for all"
        )
    return values


class AnchorGenerator(nn.Module):
    """Anchors of every level; ``forward(features)`` returns one (Hi * Wi * A, 4) tensor per level.

    Args:
        sizes: per level, the anchor sizes (sqrt of the area) in pixels; one list = all levels.
        aspect_ratios: per level, the ratios height / width; one list = all levels.
        strides: the stride of each level.
        offset: where the anchor centres sit in a stride cell, in [0, 1) (detectron2's OFFSET).
    """

    box_dim = 4

    def __init__(self, sizes, aspect_ratios, strides: Sequence[int], offset: float = 0.0):
        super().__init__()
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"MODEL.ANCHOR_GENERATOR.OFFSET must be in [0, 1), got {offset}")
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)
        sizes = _per_level(sizes, len(self.strides), "MODEL.ANCHOR_GENERATOR.SIZES")
        ratios = _per_level(
            aspect_ratios, len(self.strides), "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS"
        )
        for i, (s, r) in enumerate(zip(sizes, ratios)):
            # not saved in checkpoints: detectron2's are not either, and they follow the config
            self.register_buffer(f"cell_anchors_{i}", cell_anchors(s, r), persistent=False)

    @property
    def num_cell_anchors(self) -> List[int]:
        return [len(getattr(self, f"cell_anchors_{i}")) for i in range(len(self.strides))]

    @property
    def num_anchors(self) -> List[int]:
        """Anchors per location, per level (detectron2's name)."""
        return self.num_cell_anchors

    def _centres(self, n: int, stride: int, device) -> torch.Tensor:
        # the float32 arange of detectron2's _create_grid_offsets, for identical values
        start = self.offset * stride
        return torch.arange(start, n * stride, step=stride, dtype=torch.float32, device=device)

    def grid_anchors(self, grid_sizes: List[Sequence[int]]) -> List[torch.Tensor]:
        out = []
        for i, ((h, w), stride) in enumerate(zip(grid_sizes, self.strides)):
            base = getattr(self, f"cell_anchors_{i}")
            xs = self._centres(w, stride, base.device)
            ys = self._centres(h, stride, base.device)
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = torch.stack((sx, sy, sx, sy), dim=1)
            out.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
        return out

    def forward(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(features) != len(self.strides):
            raise ValueError(f"{len(features)} feature maps for {len(self.strides)} anchor levels")
        return self.grid_anchors([f.shape[-2:] for f in features])

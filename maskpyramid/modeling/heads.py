"""MaskPyramid's heads: the dense root-score head, and per-pyramid mask-init and mask-grow heads.

The per-pyramid heads run on windows (``WINDOW_SIZE`` cells square) pooled from the FPN level
with detectron2's ``ROIAlign``. Their first convolution is split: the part that sees the
features (``feature_conv``) runs once per image on the whole level and is pooled; the part that
sees the pyramid's own channels (position map, root point, coverage, upsampled mask) runs per
window. With concatenation this equals one convolution over ``[features, extras]``, and the
non-linear layers after the join tell the pyramids of an image apart.
"""

import math
from typing import List, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.structures import Boxes
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ScoreHead",
    "PyramidMaskHead",
    "PooledClassHead",
    "PooledBoxHead",
    "RefineHead",
    "SemSegHead",
]


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 2 channels (a 1x1 level, e.g. p6 of a small
    image, has a single value per channel: one-channel groups cannot be normalised)."""
    groups = 32
    while groups > 1 and (channels % groups or channels // groups < 2):
        groups //= 2
    return nn.GroupNorm(groups, channels)


def _pool_per_image(pooler: ROIPooler, features, boxes: torch.Tensor, batch: torch.Tensor):
    """``ROIPooler`` over (K, 4) boxes of images ``batch`` (K,), in the boxes' order (the
    pooler takes one ``Boxes`` per image and returns them image by image)."""
    order = torch.argsort(batch, stable=True)
    counts = torch.bincount(batch, minlength=features[0].shape[0]).tolist()
    pooled = pooler(features, [Boxes(b) for b in boxes[order].split(counts)])
    return torch.empty_like(pooled).index_copy(0, order, pooled)


class ScoreHead(nn.Module):
    """Dense root-score head, shared across levels (FCOS-style): class logits at every pixel of
    every level, and optionally a mask-IoU logit ("maskiou" scoring)."""

    def __init__(self, in_channels: int, num_classes: int, num_convs: int, maskiou: bool):
        super().__init__()
        tower = []
        for _ in range(num_convs):
            tower += [
                Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
                _group_norm(in_channels),
                nn.ReLU(inplace=True),
            ]
        self.tower = nn.Sequential(*tower)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.maskiou = nn.Conv2d(in_channels, 1, 3, padding=1) if maskiou else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        # focal-loss prior: every pixel starts at probability 0.01
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, features: List[torch.Tensor]):
        cls, iou = [], []
        for x in features:
            t = self.tower(x)
            cls.append(self.cls_logits(t))
            iou.append(self.maskiou(t)[:, 0] if self.maskiou is not None else None)
        return cls, iou


class PyramidMaskHead(nn.Module):
    """Mask head of one level (init: a new root's mask; grow: refine an upsampled mask).

    ``feature_conv`` is applied to the level once per image; ``forward`` takes its pooled
    windows plus the pyramids' extra channels and returns (logits (N, K, R, R), hidden).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_convs: int,
        num_extra: int,
        position_mode: str,
        out_channels: int,
        skip: bool,
        feature_convs: int = 0,
        tower_channels: int = 0,
    ):
        super().__init__()
        if position_mode not in ("concat", "multiply"):
            raise ValueError(
                f"MODEL.MASK_PYRAMID.POSITION_MODE must be concat or multiply, got {position_mode}"
            )
        self.position_mode = position_mode
        # per-image tower before the split first conv (runs once per image, not per pyramid), at
        # the FPN's width or at ``tower_channels`` (its first conv narrows the features)
        if tower_channels < 0:
            raise ValueError(
                f"MODEL.MASK_PYRAMID.TOWER_CHANNELS must be >= 0, got {tower_channels}"
            )
        width = tower_channels or in_channels
        tower, c_in = [], in_channels
        for _ in range(feature_convs):
            tower += [Conv2d(c_in, width, 3, padding=1, bias=False)]
            tower += [_group_norm(width), nn.ReLU(inplace=True)]
            c_in = width
        self.tower = nn.Sequential(*tower)
        self.feature_conv = Conv2d(c_in, channels, 3, padding=1)
        # "multiply": the Gaussian (extra channel 0) multiplies the features; the rest join by conv
        n_conv_extra = num_extra if position_mode == "concat" else num_extra - 1
        self.extra_conv = Conv2d(n_conv_extra, channels, 3, padding=1) if n_conv_extra else None
        self.skip_conv = Conv2d(channels, channels, 1) if skip else None
        self.convs = nn.ModuleList(
            Conv2d(channels, channels, 3, padding=1) for _ in range(num_convs - 1)
        )
        self.predictor = Conv2d(channels, out_channels, 1)
        for m in [*self.tower, self.feature_conv, self.extra_conv, self.skip_conv, *self.convs]:
            if isinstance(m, (nn.GroupNorm, nn.ReLU)):
                continue
            if m is not None:
                weight_init.c2_msra_fill(m)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature part of the first conv, on a whole level (once per image)."""
        return self.feature_conv(self.tower(x))

    def forward(
        self, pooled: torch.Tensor, extras: torch.Tensor, skip: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.position_mode == "multiply":
            x = pooled * extras[:, :1]
            extras = extras[:, 1:]
        else:
            x = pooled
        if self.extra_conv is not None:
            x = x + self.extra_conv(extras)
        if self.skip_conv is not None and skip is not None:
            x = x + self.skip_conv(skip)
        x = F.relu(x)
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.predictor(x), x


def _pooled_conv_fc(in_channels, strides, resolution, num_conv, conv_dim, fc_dims, sampling):
    """detectron2's ``ROIPooler`` (``ROIAlignV2``) and ``FastRCNNConvFCHead`` (GroupNorm convs,
    then fully connected layers) on the pooled features plus one mask channel: the pooled
    class and box heads' trunk."""
    pooler = ROIPooler(resolution, [1.0 / s for s in strides], sampling, "ROIAlignV2")
    fc = FastRCNNConvFCHead(
        ShapeSpec(channels=in_channels + 1, height=resolution, width=resolution),
        conv_dims=[conv_dim] * num_conv,
        fc_dims=list(fc_dims),
        conv_norm="GN",
    )
    return pooler, fc


def _box_predictor(in_dim: int) -> nn.Linear:
    """Class-agnostic box deltas, initialised as Fast R-CNN's box predictor."""
    pred = nn.Linear(in_dim, 4)
    nn.init.normal_(pred.weight, std=0.001)
    nn.init.constant_(pred.bias, 0)
    return pred


class PooledClassHead(nn.Module):
    """Classifies pyramids from what lies under their masks (``CLASS_HEAD: "pooled"``).
    ``strides``: those of consecutive FPN levels (as ``ROIPooler`` needs), checked by the
    caller.

    Each pyramid's box (from its mask) is pooled with detectron2's ``ROIPooler`` (``ROIAlignV2``
    on the FPN level its size picks); the pyramid's own mask, pooled on
    the same box, joins as one more channel (so an occluder inside the box is not the object);
    detectron2's ``FastRCNNConvFCHead`` (3x3 convs with GroupNorm, then fully connected layers)
    and a linear layer give class logits (and, with ``maskiou``, a second linear layer the logit
    of the mask's IoU with its instance, as Mask Scoring R-CNN's MaskIoU head, but class-agnostic
    and on the same features), and with ``box_deltas`` class-agnostic box deltas (Fast R-CNN's)
    of the pyramid's instance box from the mask's box, by a fully connected layer of its own on
    the convolutions' maps (detached from them). The GroupNorm matters: on the raw
    FPN features of a from-scratch backbone, fully connected layers alone diverged at a learning
    rate of 0.02 (shapes, about 120 iterations).
    """

    def __init__(
        self,
        in_channels: int,
        strides: List[int],
        num_classes: int,
        resolution: int,
        num_conv: int,
        conv_dim: int,
        num_fc: int,
        fc_dim: int,
        maskiou: bool = False,
        sampling_ratio: int = 0,
        box_deltas: bool = False,
        box_fc_dim: int = 256,
    ):
        super().__init__()
        if num_fc < 1 or num_conv < 0:
            raise ValueError(
                "MODEL.MASK_PYRAMID.CLASS_NUM_FC must be >= 1 and CLASS_NUM_CONV >= 0, got "
                f"{num_fc} and {num_conv}"
            )
        self.pooler, self.fc = _pooled_conv_fc(
            in_channels, strides, resolution, num_conv, conv_dim, [fc_dim] * num_fc, sampling_ratio
        )
        self.cls_score = nn.Linear(fc_dim, num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, 0)
        self.mask_iou = None
        if maskiou:
            self.mask_iou = nn.Linear(fc_dim, 1)
            nn.init.normal_(self.mask_iou.weight, std=0.01)
            nn.init.constant_(self.mask_iou.bias, 0)
        self.box_fc = self.bbox_pred = None
        if box_deltas:
            # its own fully connected layer on the convolutions' maps, which it does not train:
            # sharing the class head's layers cost 6.6 segm AP on shapes_val (its classes)
            conv_out = (conv_dim if num_conv else in_channels + 1) * resolution**2
            self.box_fc = nn.Sequential(nn.Linear(conv_out, box_fc_dim), nn.ReLU(inplace=True))
            nn.init.kaiming_uniform_(self.box_fc[0].weight, a=1)  # as FastRCNNConvFCHead's
            nn.init.constant_(self.box_fc[0].bias, 0)
            self.bbox_pred = _box_predictor(box_fc_dim)

    def forward(
        self,
        features: List[torch.Tensor],
        boxes: torch.Tensor,
        batch: torch.Tensor,
        pooled_masks: torch.Tensor,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """features: the CLASS_POOL_FEATURES maps; boxes: (K, 4) XYXY pixels of images
        ``batch`` (K,); pooled_masks: (K, 1, R, R) mask probabilities on the same boxes.
        Returns (K, C) class logits, (K,) mask-IoU logits (None without ``maskiou``) and (K, 4)
        box deltas from ``boxes`` (None without ``box_deltas``)."""
        pooled = _pool_per_image(self.pooler, features, boxes, batch)
        x = torch.cat([pooled, pooled_masks], 1)
        maps = x
        for layer in self.fc:  # FastRCNNConvFCHead is a Sequential: convs, flatten, fcs
            if isinstance(layer, nn.Flatten):
                maps = x
            x = layer(x)
        iou = self.mask_iou(x)[:, 0] if self.mask_iou is not None else None
        deltas = None
        if self.bbox_pred is not None:
            deltas = self.bbox_pred(self.box_fc(maps.detach().flatten(1)))
        return self.cls_score(x), iou, deltas


class PooledBoxHead(nn.Module):
    """Fast R-CNN's class-agnostic box deltas of pyramids from features of their own
    (``BOX_REG_HEAD: "own"``): each box (the caller's, grown for context) pooled with
    detectron2's ``ROIPooler`` (``ROIAlignV2``), the pyramid's mask pooled on the same box as one
    more channel, detectron2's ``FastRCNNConvFCHead`` (GroupNorm convs, one fully connected
    layer) and a linear layer of 4 deltas initialised as Fast R-CNN's box predictor. Unlike the
    class head's box layer, its loss trains its convolutions and, through the pooled features,
    the FPN."""

    def __init__(
        self,
        in_channels: int,
        strides: List[int],
        resolution: int,
        num_conv: int,
        conv_dim: int,
        fc_dim: int = 256,
        sampling_ratio: int = 0,
    ):
        super().__init__()
        self.pooler, self.fc = _pooled_conv_fc(
            in_channels, strides, resolution, num_conv, conv_dim, [fc_dim], sampling_ratio
        )
        self.bbox_pred = _box_predictor(fc_dim)

    def forward(
        self,
        features: List[torch.Tensor],
        boxes: torch.Tensor,
        batch: torch.Tensor,
        pooled_masks: torch.Tensor,
    ) -> torch.Tensor:
        """features: the CLASS_POOL_FEATURES maps; boxes (K, 4) XYXY pixels of images ``batch``
        (K,), where it pools; pooled_masks: (K, 1, R, R) mask probabilities on the same boxes.
        Returns (K, 4) box deltas (the caller says from which boxes)."""
        pooled = _pool_per_image(self.pooler, features, boxes, batch)
        return self.bbox_pred(self.fc(torch.cat([pooled, pooled_masks], 1)))


class RefineHead(nn.Module):
    """The last growth step, at object resolution (``REFINE_RESOLUTION``).

    Each pyramid's mask box is pooled from the FPN with detectron2's ``ROIPooler``
    (``ROIAlignV2``, the level by the box's size) at half the output resolution; the pyramid's
    mask probabilities, pooled on the same box, join as one more channel; detectron2's
    ``MaskRCNNConvUpsampleHead`` (3x3 convs, 2x deconv, 1x1 predictor; class-agnostic, or one
    mask per class with ``num_classes`` > 1, as Mask R-CNN's) gives,
    with ``residual``, a correction that adds to the pyramid's own logits resampled into the box
    (the predictor starts near 0, so the refined mask starts as the pyramid's); without, the
    mask's logits themselves (Mask R-CNN's mask head with the pyramid's mask as an input).
    """

    def __init__(
        self,
        in_channels: int,
        strides: List[int],
        resolution: int,
        num_conv: int,
        conv_dim: int,
        residual: bool = True,
        sampling_ratio: int = 0,
        num_classes: int = 1,
    ):
        super().__init__()
        self.residual = residual
        if resolution % 2 or resolution < 2:
            raise ValueError(
                "MODEL.MASK_PYRAMID.REFINE_RESOLUTION must be an even number >= 2 (the head "
                f"pools at half of it and upsamples 2x), got {resolution}"
            )
        if num_conv < 1 or conv_dim < 1:
            raise ValueError(
                "MODEL.MASK_PYRAMID.REFINE_CONVS and REFINE_CHANNELS must be >= 1, got "
                f"{num_conv} and {conv_dim}"
            )
        self.resolution = resolution
        self.pooler = ROIPooler(
            resolution // 2, [1.0 / s for s in strides], sampling_ratio, "ROIAlignV2"
        )
        self.mask_head = MaskRCNNConvUpsampleHead(
            ShapeSpec(channels=in_channels + 1, height=resolution // 2, width=resolution // 2),
            num_classes=num_classes,
            conv_dims=[conv_dim] * (num_conv + 1),
        )

    def forward(
        self,
        features: List[torch.Tensor],
        boxes: torch.Tensor,
        batch: torch.Tensor,
        pooled_probs: torch.Tensor,
        prior_logits: Optional[torch.Tensor],
        classes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """features: the REFINE_FEATURES maps; boxes (K, 4) XYXY pixels of images ``batch``
        (K,); pooled_probs (K, 1, R/2, R/2): the pyramids' mask probabilities on the boxes;
        prior_logits (K, R, R): their logits on the boxes (needed when ``residual``, else
        unused and may be None); classes (K,): the class whose mask each row takes (needed
        with ``num_classes`` > 1). Returns (K, R, R) refined logits."""
        pooled = _pool_per_image(self.pooler, features, boxes, batch)
        out = self.mask_head.layers(torch.cat([pooled, pooled_probs], 1))
        if out.shape[1] > 1:
            if classes is None:
                raise ValueError(
                    "MODEL.MASK_PYRAMID.REFINE_CLASS_SPECIFIC: the refinement needs each "
                    "pyramid's class"
                )
            out = out[torch.arange(len(out), device=out.device), classes]
        else:
            out = out[:, 0]
        if not self.residual:
            return out
        if prior_logits is None:
            raise ValueError("a residual refinement (REFINE_RESIDUAL) needs the prior logits")
        return prior_logits + out


class SemSegHead(nn.Module):
    """Auxiliary per-class semantic segmentation logits on the last level (YOLACT's trick)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.predictor = nn.Conv2d(in_channels, num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.constant_(self.predictor.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(x)

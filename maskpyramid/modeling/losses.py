"""MaskPyramid's losses: dense focal class loss, per-pyramid mask losses, penalties.

Knows nothing of spawning: it receives pyramids' logits and their targets on a level's grid.
Mask losses are averaged per pyramid (over the image's valid cells), then over pyramids: summing
made the log's level losses differ 4.67 / 21.34 / 80.20 and starved the coarse level.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss

__all__ = [
    "MASK_LOSSES",
    "dense_class_loss",
    "per_pyramid_mask_loss",
    "dice_loss",
    "territory_penalty",
    "mask_iou",
]

MASK_LOSSES = ("bce", "bce_dice", "l1", "l2")


def dense_class_loss(
    cls_maps: List[torch.Tensor],
    positives: List[torch.Tensor],
    instance_classes: torch.Tensor,
    alpha: float,
    gamma: float,
) -> torch.Tensor:
    """Sigmoid focal loss on every valid pixel of every level, normalised by the positives.

    Args:
        cls_maps: per level (B, C, H, W) logits.
        positives: per level (B, H, W): instance index in the batch, -1 background, -2 padding.
        instance_classes: (M,) class of each instance of the batch.
    """
    total, num_pos = cls_maps[0].sum() * 0, 0
    for logits, pos in zip(cls_maps, positives):
        c = logits.shape[1]
        logits = logits.permute(0, 2, 3, 1).reshape(-1, c)
        pos = pos.reshape(-1)
        valid = pos >= -1
        target = torch.zeros_like(logits)
        fg = pos >= 0
        target[fg, instance_classes[pos[fg]]] = 1
        total = total + sigmoid_focal_loss(
            logits[valid], target[valid], alpha=alpha, gamma=gamma, reduction="sum"
        )
        num_pos += int(fg.sum())
    return total / max(num_pos, 1)


def per_pyramid_mask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """(P,) loss of each pyramid: its pixels' loss averaged with ``weights`` (P, H, W)
    (0 = ignored). ``mode``: "bce" / "bce_dice" (BCE on logits) or "l1" / "l2" (probabilities)."""
    if mode in ("bce", "bce_dice"):
        pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    elif mode == "l1":
        pixel = (logits.sigmoid() - targets).abs()
    elif mode == "l2":
        pixel = (logits.sigmoid() - targets) ** 2
    else:
        raise ValueError(f"MODEL.MASK_PYRAMID.MASK_LOSS must be one of {MASK_LOSSES}, got {mode}")
    norm = (weights > 0).flatten(1).sum(1).clamp(min=1)
    return (pixel * weights).flatten(1).sum(1) / norm


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(P,) soft dice loss over the valid pixels."""
    p = logits.sigmoid() * valid
    t = targets * valid
    inter = (p * t).flatten(1).sum(1)
    union = (p * p).flatten(1).sum(1) + (t * t).flatten(1).sum(1)
    return 1 - (2 * inter + 1) / (union + 1)


def territory_penalty(
    logits: torch.Tensor, own: torch.Tensor, others: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """(P,) ``relu(mean probability on others' ground - mean probability on own ground)``.

    The log's complaint: pseudo pyramids scoring near 0 on their own territory and near 1 on
    another's. ``own`` / ``others`` are (P, H, W) soft regions.
    """
    p = logits.sigmoid()
    own, others = own * valid, others * valid
    on_own = (p * own).flatten(1).sum(1) / own.flatten(1).sum(1).clamp(min=1e-6)
    on_others = (p * others).flatten(1).sum(1) / others.flatten(1).sum(1).clamp(min=1e-6)
    has_others = others.flatten(1).sum(1) > 0
    return F.relu(on_others - on_own) * has_others


def mask_iou(
    logits: torch.Tensor, targets: torch.Tensor, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(P,) IoU of the binarised masks (logit > 0) with the binarised targets (>= 0.5)."""
    pred = logits > 0
    gt = targets >= 0.5
    if valid is not None:
        pred, gt = pred & valid, gt & valid
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return inter / union.clamp(min=1)

"""Box coder: boxes <-> (dx, dy, dw, dh) regression deltas, with weights and a scale clamp."""

import math
from typing import Sequence

import torch

__all__ = [
    "BoxCoder",
    "DEFAULT_SCALE_CLAMP",
    "pairwise_iou",
    "clip_boxes",
    "nonempty",
    "smooth_l1_loss",
]

# the largest log-ratio a width or height may grow by: a 16-pixel anchor may reach 1000 pixels
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """The Faster R-CNN parameterisation, equal to detectron2's ``Box2BoxTransform``.

    Args:
        weights: (wx, wy, ww, wh) multiplying the deltas (10, 10, 5, 5 in the box head; 1 in RPN).
        scale_clamp: dw and dh are clamped to this when decoding.
    """

    def __init__(self, weights: Sequence[float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4:
            raise ValueError(f"box regression weights must be 4 numbers, got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, src: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Deltas (N, 4) that take ``src`` (N, 4) boxes to ``target`` (N, 4) boxes."""
        if src.numel() and not bool((src[:, 2] > src[:, 0]).all()):
            raise ValueError("BoxCoder.encode: source boxes must have a positive width")
        sw = src[:, 2] - src[:, 0]
        sh = src[:, 3] - src[:, 1]
        sx = src[:, 0] + 0.5 * sw
        sy = src[:, 1] + 0.5 * sh
        tw = target[:, 2] - target[:, 0]
        th = target[:, 3] - target[:, 1]
        tx = target[:, 0] + 0.5 * tw
        ty = target[:, 1] + 0.5 * th
        wx, wy, ww, wh = self.weights
        return torch.stack(
            (
                wx * (tx - sx) / sw,
                wy * (ty - sy) / sh,
                ww * torch.log(tw / sw),
                wh * torch.log(th / sh),
            ),
            dim=1,
        )

    def decode(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Apply (N, k*4) deltas to (N, 4) boxes: (N, k*4) boxes, computed in float32 or wider."""
        if deltas.dtype not in (torch.float32, torch.float64):
            deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        cx = boxes[:, 0] + 0.5 * widths
        cy = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        px = dx * widths[:, None] + cx[:, None]
        py = dy * heights[:, None] + cy[:, None]
        pw = torch.exp(dw) * widths[:, None]
        ph = torch.exp(dh) * heights[:, None]
        out = torch.stack((px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph), dim=-1)
        return out.reshape(deltas.shape)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, N) IoU of XYXY boxes, 0 where they do not intersect (detectron2's ``pairwise_iou``)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])
    inter = wh.clamp_(min=0).prod(dim=2)
    return torch.where(
        inter > 0,
        inter / (area_a[:, None] + area_b - inter),
        torch.zeros(1, dtype=inter.dtype, device=inter.device),
    )


def clip_boxes(boxes: torch.Tensor, image_size) -> torch.Tensor:
    """Clip XYXY boxes to an (h, w) image, out of place."""
    h, w = image_size
    x1 = boxes[..., 0].clamp(min=0, max=w)
    y1 = boxes[..., 1].clamp(min=0, max=h)
    x2 = boxes[..., 2].clamp(min=0, max=w)
    y2 = boxes[..., 3].clamp(min=0, max=h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Mask of boxes whose width and height both exceed ``threshold``."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def smooth_l1_loss(input: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed smooth-L1 (Huber) loss; ``beta`` < 1e-5 is plain L1 (detectron2's default)."""
    diff = torch.abs(input - target)
    if beta < 1e-5:
        return diff.sum()
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta).sum()

"""Fast R-CNN box head (convs + 2 fc), its predictor, losses and inference."""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .box_coder import BoxCoder, clip_boxes, smooth_l1_loss
from .layers import ConvNormAct, msra_fill, xavier_fill
from .nms import batched_nms, fast_nms

__all__ = ["BoxHead", "BoxPredictor", "box_losses", "box_inference"]


class BoxHead(nn.Module):
    """``conv1..convN`` (3x3) then ``fc1..fcM`` with ReLU: detectron2's ``FastRCNNConvFCHead``."""

    def __init__(self, in_channels: int, resolution: int, num_conv=0, conv_dim=256, num_fc=2,
                 fc_dim=1024, norm=""):  # fmt: skip
        super().__init__()
        if num_conv + num_fc == 0:
            raise ValueError("MODEL.ROI_BOX_HEAD: NUM_CONV + NUM_FC must be positive")
        channels = in_channels
        for k in range(num_conv):
            self.add_module(f"conv{k + 1}", ConvNormAct(channels, conv_dim, norm))
            channels = conv_dim
        self.num_conv, self.num_fc = num_conv, num_fc
        dim = channels * resolution * resolution
        for k in range(num_fc):
            self.add_module(f"fc{k + 1}", nn.Linear(dim, fc_dim))
            dim = fc_dim
        self.output_size = dim
        # filled after all are built, as detectron2 does (same random draws for one seed)
        for k in range(num_conv):
            msra_fill(getattr(self, f"conv{k + 1}"))
        for k in range(num_fc):
            xavier_fill(getattr(self, f"fc{k + 1}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.num_conv):
            x = getattr(self, f"conv{k + 1}")(x)
        if self.num_fc:
            x = torch.flatten(x, start_dim=1)
            for k in range(self.num_fc):
                x = F.relu(getattr(self, f"fc{k + 1}")(x))
        return x


class BoxPredictor(nn.Module):
    """Class logits (K + 1, background last) and per-class (or agnostic) box deltas."""

    def __init__(self, in_features: int, num_classes: int, cls_agnostic: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, (1 if cls_agnostic else num_classes) * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.cls_score.bias, 0)
        nn.init.constant_(self.bbox_pred.bias, 0)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = torch.flatten(x, start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def _log_classification_stats(logits: torch.Tensor, gt_classes: torch.Tensor) -> None:
    n = gt_classes.numel()
    if n == 0:
        return
    pred = logits.argmax(dim=1)
    bg = logits.shape[1] - 1
    fg = (gt_classes >= 0) & (gt_classes < bg)
    num_fg = int(fg.sum())
    storage = get_event_storage()
    storage.put_scalar("fast_rcnn/cls_accuracy", (pred == gt_classes).sum().item() / n)
    if num_fg > 0:
        fg_pred = pred[fg]
        storage.put_scalar(
            "fast_rcnn/fg_cls_accuracy", (fg_pred == gt_classes[fg]).sum().item() / num_fg
        )
        storage.put_scalar("fast_rcnn/false_negative", (fg_pred == bg).sum().item() / num_fg)


def box_losses(
    logits: torch.Tensor,
    deltas: torch.Tensor,
    proposal_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    box_coder: BoxCoder,
    smooth_l1_beta: float,
):
    """Softmax cross-entropy over K + 1 classes, and L1 / smooth-L1 on the foreground's deltas of
    its own class, normalised by the number of sampled RoIs (detectron2's ``FastRCNNOutputLayers``).
    """
    _log_classification_stats(logits, gt_classes)
    if gt_classes.numel() == 0:
        zero = logits.sum() * 0.0 + deltas.sum() * 0.0
        return {"loss_cls": zero, "loss_box_reg": zero}
    num_classes = logits.shape[1] - 1
    fg = torch.nonzero((gt_classes >= 0) & (gt_classes < num_classes), as_tuple=True)[0]
    if deltas.shape[1] == 4:
        fg_deltas = deltas[fg]
    else:
        fg_deltas = deltas.view(-1, num_classes, 4)[fg, gt_classes[fg]]
    target = box_coder.encode(proposal_boxes[fg], gt_boxes[fg])
    loss_box = smooth_l1_loss(fg_deltas, target, smooth_l1_beta) / max(gt_classes.numel(), 1.0)
    return {"loss_cls": F.cross_entropy(logits, gt_classes), "loss_box_reg": loss_box}


def box_inference(
    logits: torch.Tensor,
    deltas: torch.Tensor,
    proposals: List[Instances],
    box_coder: BoxCoder,
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
    nms_type: str = "greedy",
    fast_nms_top_k: int = -1,
) -> List[Instances]:
    """Per image: softmax, per-class decoding, clip, score threshold, per-class NMS, top-k.

    Returns ``Instances`` with ``pred_boxes``, ``scores`` and ``pred_classes``, best first.
    """
    num_per_image = [len(p) for p in proposals]
    proposal_boxes = (
        torch.cat([p.proposal_boxes.tensor for p in proposals])
        if proposals
        else deltas.new_zeros((0, 4))
    )
    boxes_all = box_coder.decode(deltas, proposal_boxes).split(num_per_image)
    probs_all = F.softmax(logits, dim=-1).split(num_per_image)
    results = []
    for boxes, scores, p in zip(boxes_all, probs_all, proposals):
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
        if not bool(valid.all()):
            boxes, scores = boxes[valid], scores[valid]
        scores = scores[:, :-1]
        num_reg = boxes.shape[1] // 4
        boxes = clip_boxes(boxes.reshape(-1, 4), p.image_size).view(-1, num_reg, 4)
        keep_mask = scores > score_thresh
        inds = keep_mask.nonzero()  # (roi, class)
        boxes = boxes[inds[:, 0], 0] if num_reg == 1 else boxes[keep_mask]
        scores = scores[keep_mask]
        if nms_type == "fast":
            keep = fast_nms(boxes, scores, inds[:, 1], nms_thresh, fast_nms_top_k)
        else:
            keep = batched_nms(boxes, scores, inds[:, 1], nms_thresh)
        if topk_per_image >= 0:
            keep = keep[:topk_per_image]
        res = Instances(p.image_size)
        res.pred_boxes = Boxes(boxes[keep])
        res.scores = scores[keep]
        res.pred_classes = inds[keep, 1]
        results.append(res)
    return results

"""Region proposal network: the head, anchor labelling and losses, and proposal selection."""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .anchors import AnchorGenerator
from .box_coder import BoxCoder, clip_boxes, nonempty, pairwise_iou, smooth_l1_loss
from .matcher import Matcher
from .nms import batched_nms, fast_nms
from .sampler import sample_balanced

__all__ = ["RPNHead", "RPN", "select_proposals"]


class RPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then 1x1 convs for objectness (A) and deltas (A * 4) per level."""

    def __init__(self, in_channels: int, num_anchors: int, box_dim: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * box_dim, kernel_size=1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, features: List[torch.Tensor]):
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


def select_proposals(
    proposals: List[torch.Tensor],
    logits: List[torch.Tensor],
    image_sizes: Sequence[Tuple[int, int]],
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
    training: bool,
    nms_type: str = "greedy",
) -> List[Instances]:
    """Per level the ``pre_nms_topk`` best, then per image: drop non-finite, clip, drop small,
    NMS within each level, keep the ``post_nms_topk`` best (detectron2's
    ``find_top_rpn_proposals``).

    Args:
        proposals: per level, (N, Hi*Wi*A, 4) decoded boxes.
        logits: per level, (N, Hi*Wi*A) objectness logits.

    Returns:
        per image, ``Instances`` with ``proposal_boxes`` and ``objectness_logits``, best first.
    """
    device = proposals[0].device
    num_images = len(image_sizes)
    batch_idx = torch.arange(num_images, device=device)[:, None]
    top_scores, top_boxes, level_ids = [], [], []
    for level, (boxes_l, logits_l) in enumerate(zip(proposals, logits)):
        k = min(logits_l.shape[1], pre_nms_topk)
        # sort + narrow as detectron2 v0.6 does (topk orders ties differently)
        logits_l, idx = logits_l.sort(descending=True, dim=1)
        top_scores.append(logits_l[:, :k])
        top_boxes.append(boxes_l[batch_idx, idx[:, :k]])
        level_ids.append(torch.full((k,), level, dtype=torch.int64, device=device))
    top_scores = torch.cat(top_scores, dim=1)
    top_boxes = torch.cat(top_boxes, dim=1)
    level_ids = torch.cat(level_ids)

    results = []
    for n, image_size in enumerate(image_sizes):
        boxes, scores, lvl = top_boxes[n], top_scores[n], level_ids
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        if not bool(valid.all()):
            if training:
                raise FloatingPointError(
                    "RPN: predicted boxes or objectness contain Inf/NaN. Training has diverged."
                )
            boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
        boxes = clip_boxes(boxes, image_size)
        keep = nonempty(boxes, min_box_size)
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        if nms_type == "fast":
            keep = fast_nms(boxes, scores, lvl, nms_thresh)
        else:
            keep = batched_nms(boxes, scores, lvl, nms_thresh)
        keep = keep[:post_nms_topk]
        res = Instances(tuple(image_size))
        res.proposal_boxes = Boxes(boxes[keep])
        res.objectness_logits = scores[keep]
        results.append(res)
    return results


class RPN(nn.Module):
    """Region proposal network over several feature maps (detectron2's ``RPN``, same keys)."""

    def __init__(self, cfg, input_shape: Dict[str, "ShapeSpec"]):  # noqa: F821
        super().__init__()
        rpn = cfg.MODEL.RPN
        self.in_features = list(rpn.IN_FEATURES)
        missing = [f for f in self.in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.RPN.IN_FEATURES {missing} are not backbone outputs {list(input_shape)}"
            )
        shapes = [input_shape[f] for f in self.in_features]
        channels = {s.channels for s in shapes}
        if len(channels) != 1:
            raise ValueError(f"MODEL.RPN.IN_FEATURES must share their channels, got {channels}")
        anchors = cfg.MODEL.ANCHOR_GENERATOR
        if anchors.NAME != "DefaultAnchorGenerator":
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR.NAME {anchors.NAME!r}: ScratchMaskRCNN has only "
                "'DefaultAnchorGenerator'"
            )
        self.anchor_generator = AnchorGenerator(
            anchors.SIZES, anchors.ASPECT_RATIOS, [s.stride for s in shapes], anchors.OFFSET
        )
        num_anchors = set(self.anchor_generator.num_cell_anchors)
        if len(num_anchors) != 1:
            raise ValueError("every level needs the same number of anchors (one shared RPN head)")
        if rpn.HEAD_NAME != "StandardRPNHead":
            raise ValueError(
                f"MODEL.RPN.HEAD_NAME {rpn.HEAD_NAME!r}: ScratchMaskRCNN has only 'StandardRPNHead'"
            )
        self.rpn_head = RPNHead(channels.pop(), num_anchors.pop())
        self.anchor_matcher = Matcher(
            rpn.IOU_THRESHOLDS, rpn.IOU_LABELS, allow_low_quality_matches=True
        )
        self.box_coder = BoxCoder(rpn.BBOX_REG_WEIGHTS)
        if rpn.BBOX_REG_LOSS_TYPE != "smooth_l1":
            raise ValueError(
                f"MODEL.RPN.BBOX_REG_LOSS_TYPE {rpn.BBOX_REG_LOSS_TYPE!r}: only 'smooth_l1'"
            )
        self.smooth_l1_beta = rpn.SMOOTH_L1_BETA
        self.batch_size_per_image = rpn.BATCH_SIZE_PER_IMAGE
        self.positive_fraction = rpn.POSITIVE_FRACTION
        self.boundary_thresh = rpn.BOUNDARY_THRESH
        self.loss_weight = {
            "loss_rpn_cls": rpn.LOSS_WEIGHT,
            "loss_rpn_loc": rpn.BBOX_REG_LOSS_WEIGHT * rpn.LOSS_WEIGHT,
        }
        self.nms_thresh = rpn.NMS_THRESH
        self.min_box_size = float(cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE)
        self.pre_nms_topk = {True: rpn.PRE_NMS_TOPK_TRAIN, False: rpn.PRE_NMS_TOPK_TEST}
        self.post_nms_topk = {True: rpn.POST_NMS_TOPK_TRAIN, False: rpn.POST_NMS_TOPK_TEST}
        self.nms_type = cfg.MODEL.SCRATCH.RPN_NMS
        if self.nms_type not in ("greedy", "fast"):
            raise ValueError(
                f"MODEL.SCRATCH.RPN_NMS must be 'greedy' or 'fast', got {self.nms_type!r}"
            )

    @torch.no_grad()
    def label_anchors(
        self, anchors: torch.Tensor, gt_instances: List[Instances]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, R) labels in {-1, 0, 1} after sampling, and (N, R, 4) matched ground-truth boxes."""
        labels, matched = [], []
        for gt in gt_instances:
            gt_boxes = gt.gt_boxes.tensor
            matches, labels_i = self.anchor_matcher(pairwise_iou(gt_boxes, anchors))
            if self.boundary_thresh >= 0:
                h, w = gt.image_size
                t = self.boundary_thresh
                inside = (
                    (anchors[:, 0] >= -t)
                    & (anchors[:, 1] >= -t)
                    & (anchors[:, 2] < w + t)
                    & (anchors[:, 3] < h + t)
                )
                labels_i[~inside] = -1
            pos, neg = sample_balanced(
                labels_i, self.batch_size_per_image, self.positive_fraction, 0
            )
            labels_i = torch.full_like(labels_i, -1)
            labels_i[pos] = 1
            labels_i[neg] = 0
            labels.append(labels_i)
            matched.append(gt_boxes[matches] if len(gt_boxes) else torch.zeros_like(anchors))
        return torch.stack(labels), torch.stack(matched)

    def losses(self, anchors, logits, deltas, gt_labels, gt_boxes) -> Dict[str, torch.Tensor]:
        num_images = gt_labels.shape[0]
        pos = gt_labels == 1
        storage = get_event_storage()
        storage.put_scalar("rpn/num_pos_anchors", pos.sum().item() / num_images)
        storage.put_scalar("rpn/num_neg_anchors", (gt_labels == 0).sum().item() / num_images)
        # deltas of the positives only: encoding every anchor of every image is wasted work
        pos_img, pos_anchor = torch.nonzero(pos, as_tuple=True)
        target = self.box_coder.encode(anchors[pos_anchor], gt_boxes[pos_img, pos_anchor])
        loc = smooth_l1_loss(deltas[pos], target, self.smooth_l1_beta)
        valid = gt_labels >= 0
        cls = F.binary_cross_entropy_with_logits(
            logits[valid], gt_labels[valid].to(torch.float32), reduction="sum"
        )
        norm = self.batch_size_per_image * num_images
        losses = {"loss_rpn_cls": cls / norm, "loss_rpn_loc": loc / norm}
        return {k: v * self.loss_weight[k] for k, v in losses.items()}

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        gt_instances: Optional[List[Instances]] = None,
    ):
        """Proposals per image (``Instances``) and the losses (empty when not training)."""
        features = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(features)
        logits, deltas = self.rpn_head(features)
        # (N, A, H, W) -> (N, H*W*A): location-major, the anchors' order
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [
            x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1])
            .permute(0, 3, 4, 1, 2)
            .flatten(1, -2)
            for x in deltas
        ]
        losses = {}
        if self.training:
            if gt_instances is None:
                raise ValueError("RPN needs gt_instances in training")
            all_anchors = torch.cat(anchors)
            gt_labels, gt_boxes = self.label_anchors(all_anchors, gt_instances)
            losses = self.losses(
                all_anchors, torch.cat(logits, dim=1), torch.cat(deltas, dim=1), gt_labels, gt_boxes
            )
        with torch.no_grad():
            n = len(images.image_sizes)
            boxes = [
                self.box_coder.decode(d.reshape(-1, 4), a.repeat(n, 1)).view(n, -1, 4)
                for a, d in zip(anchors, deltas)
            ]
            proposals = select_proposals(
                boxes,
                logits,
                images.image_sizes,
                self.nms_thresh,
                self.pre_nms_topk[self.training],
                self.post_nms_topk[self.training],
                self.min_box_size,
                self.training,
                self.nms_type,
            )
        return proposals, losses

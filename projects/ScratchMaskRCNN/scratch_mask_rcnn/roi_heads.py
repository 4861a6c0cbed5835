"""RoI heads: proposal labelling and sampling, then the box and mask branches on pooled features."""

import math
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .box_coder import BoxCoder, pairwise_iou
from .box_head import BoxHead, BoxPredictor, box_inference, box_losses
from .mask_head import MaskHead, mask_inference, mask_loss
from .matcher import Matcher
from .poolers import ROIPooler
from .roi_align import channels_last_table
from .sampler import sample_balanced

__all__ = ["ROIHeads"]

# objectness logit given to ground-truth boxes appended to the proposals (detectron2's value)
GT_LOGIT = math.log((1.0 - 1e-10) / (1 - (1.0 - 1e-10)))


def _pooler(cfg_head, input_shape, in_features):
    scales = [1.0 / input_shape[f].stride for f in in_features]
    return ROIPooler(
        output_size=cfg_head.POOLER_RESOLUTION,
        scales=scales,
        sampling_ratio=cfg_head.POOLER_SAMPLING_RATIO,
        pooler_type=cfg_head.POOLER_TYPE,
    )


class ROIHeads(nn.Module):
    """detectron2's ``StandardROIHeads`` with a box head and an optional mask head (same keys)."""

    def __init__(self, cfg, input_shape):
        super().__init__()
        rh = cfg.MODEL.ROI_HEADS
        if rh.NAME != "StandardROIHeads":
            raise ValueError(
                f"MODEL.ROI_HEADS.NAME {rh.NAME!r}: ScratchMaskRCNN has 'StandardROIHeads'"
            )
        self.num_classes = rh.NUM_CLASSES
        if self.num_classes <= 0:
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {self.num_classes}: set it, or let "
                "resolve_num_classes take it from the training set"
            )
        self.in_features = list(rh.IN_FEATURES)
        missing = [f for f in self.in_features if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES {missing} are not backbone outputs")
        channels = {input_shape[f].channels for f in self.in_features}
        if len(channels) != 1:
            raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES must share their channels: {channels}")
        channels = channels.pop()
        self.batch_size_per_image = rh.BATCH_SIZE_PER_IMAGE
        self.positive_fraction = rh.POSITIVE_FRACTION
        self.proposal_append_gt = rh.PROPOSAL_APPEND_GT
        self.proposal_matcher = Matcher(rh.IOU_THRESHOLDS, rh.IOU_LABELS, False)
        self.score_thresh = rh.SCORE_THRESH_TEST
        self.nms_thresh = rh.NMS_THRESH_TEST
        self.topk_per_image = cfg.TEST.DETECTIONS_PER_IMAGE
        self.nms_type = cfg.MODEL.SCRATCH.BOX_NMS
        if self.nms_type not in ("greedy", "fast"):
            raise ValueError(
                f"MODEL.SCRATCH.BOX_NMS must be 'greedy' or 'fast', got {self.nms_type!r}"
            )
        self.fast_nms_top_k = cfg.MODEL.SCRATCH.FAST_NMS_TOP_K

        bh = cfg.MODEL.ROI_BOX_HEAD
        if bh.NAME != "FastRCNNConvFCHead":
            raise ValueError(f"MODEL.ROI_BOX_HEAD.NAME {bh.NAME!r}: only 'FastRCNNConvFCHead'")
        if bh.BBOX_REG_LOSS_TYPE != "smooth_l1":
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE {bh.BBOX_REG_LOSS_TYPE!r}: only 'smooth_l1'"
            )
        self.box_pooler = _pooler(bh, input_shape, self.in_features)
        self.box_head = BoxHead(
            channels, bh.POOLER_RESOLUTION, bh.NUM_CONV, bh.CONV_DIM, bh.NUM_FC, bh.FC_DIM, bh.NORM
        )
        self.box_predictor = BoxPredictor(
            self.box_head.output_size, self.num_classes, bh.CLS_AGNOSTIC_BBOX_REG
        )
        self.box_coder = BoxCoder(bh.BBOX_REG_WEIGHTS)
        self.smooth_l1_beta = bh.SMOOTH_L1_BETA
        self.box_loss_weight = bh.BBOX_REG_LOSS_WEIGHT

        self.mask_on = cfg.MODEL.MASK_ON
        if self.mask_on:
            mh = cfg.MODEL.ROI_MASK_HEAD
            if mh.NAME != "MaskRCNNConvUpsampleHead":
                raise ValueError(
                    f"MODEL.ROI_MASK_HEAD.NAME {mh.NAME!r}: only 'MaskRCNNConvUpsampleHead'"
                )
            self.mask_pooler = _pooler(mh, input_shape, self.in_features)
            self.cls_agnostic_mask = mh.CLS_AGNOSTIC_MASK
            self.mask_head = MaskHead(
                channels, self.num_classes, mh.NUM_CONV, mh.CONV_DIM, mh.NORM, mh.CLS_AGNOSTIC_MASK
            )

    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposals: List[Instances], targets: List[Instances]
    ) -> List[Instances]:
        """Append the ground truth to the proposals, match (IoU >= 0.5 is foreground), sample
        ``BATCH_SIZE_PER_IMAGE`` RoIs with at most ``POSITIVE_FRACTION`` foreground."""
        out, num_fg, num_bg = [], [], []
        for props, gt in zip(proposals, targets):
            boxes = props.proposal_boxes.tensor
            logits = props.objectness_logits
            if self.proposal_append_gt:
                boxes = torch.cat([boxes, gt.gt_boxes.tensor.to(boxes.dtype)])
                logits = torch.cat([logits, logits.new_full((len(gt),), GT_LOGIT)])
            matches, labels = self.proposal_matcher(pairwise_iou(gt.gt_boxes.tensor, boxes))
            if len(gt):
                classes = gt.gt_classes[matches]
                classes[labels == 0] = self.num_classes
                classes[labels == -1] = -1
            else:
                classes = torch.full_like(matches, self.num_classes)
            fg, bg = sample_balanced(
                classes, self.batch_size_per_image, self.positive_fraction, self.num_classes
            )
            idx = torch.cat([fg, bg])
            res = Instances(props.image_size)
            res.proposal_boxes = Boxes(boxes[idx])
            res.objectness_logits = logits[idx]
            res.gt_classes = classes[idx]
            if len(gt):
                res.gt_index = matches[idx]
                res.gt_boxes = Boxes(gt.gt_boxes.tensor[res.gt_index])
            else:  # background only: regression targets are never read
                res.gt_index = torch.zeros_like(idx)
                res.gt_boxes = Boxes(boxes[idx])
            num_fg.append(len(fg))
            num_bg.append(len(bg))
            out.append(res)
        storage = get_event_storage()
        storage.put_scalar("roi_head/num_fg_samples", np.mean(num_fg))
        storage.put_scalar("roi_head/num_bg_samples", np.mean(num_bg))
        return out

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ):
        """Training: (sampled proposals, losses). Inference: (detections, {})."""
        features = [features[f] for f in self.in_features]
        # one channels-last copy of the maps, pooled from by both branches
        table = channels_last_table(features)
        if self.training:
            if targets is None:
                raise ValueError("ROIHeads needs targets in training")
            proposals = self.label_and_sample_proposals(proposals, targets)
            losses = self._forward_box(features, table, proposals)
            if self.mask_on:
                losses.update(self._forward_mask(features, table, proposals, targets))
            return proposals, losses
        detections = self._forward_box(features, table, proposals)
        return self.forward_with_given_boxes(features, detections, table), {}

    def forward_with_given_boxes(
        self,
        features: List[torch.Tensor],
        detections: List[Instances],
        table: Optional[torch.Tensor] = None,
    ):
        """Masks for given detections (``pred_boxes``, ``pred_classes``); features as a list."""
        if self.mask_on:
            boxes = [d.pred_boxes.tensor for d in detections]
            logits = self.mask_head(self.mask_pooler(features, boxes, table))
            mask_inference(logits, detections)
        return detections

    def _forward_box(self, features, table, proposals: List[Instances]):
        boxes = [p.proposal_boxes.tensor for p in proposals]
        x = self.box_head(self.box_pooler(features, boxes, table))
        logits, deltas = self.box_predictor(x)
        if self.training:
            cat = torch.cat
            losses = box_losses(
                logits,
                deltas,
                cat(boxes),
                cat([p.gt_boxes.tensor for p in proposals]),
                cat([p.gt_classes for p in proposals]),
                self.box_coder,
                self.smooth_l1_beta,
            )
            losses["loss_box_reg"] = losses["loss_box_reg"] * self.box_loss_weight
            return losses
        return box_inference(
            logits,
            deltas,
            proposals,
            self.box_coder,
            self.score_thresh,
            self.nms_thresh,
            self.topk_per_image,
            self.nms_type,
            self.fast_nms_top_k,
        )

    def _forward_mask(self, features, table, proposals: List[Instances], targets: List[Instances]):
        fg, items = [], []
        for p, gt in zip(proposals, targets):
            inst = p[(p.gt_classes >= 0) & (p.gt_classes != self.num_classes)]
            fg.append(inst.proposal_boxes.tensor)
            if len(inst) == 0:
                continue
            if not gt.has("gt_masks"):
                raise ValueError(
                    "MODEL.MASK_ON is True but the ground truth has no gt_masks: the dataset needs "
                    "'segmentation' annotations"
                )
            items.append((gt.gt_masks, inst.gt_index, inst.proposal_boxes.tensor, inst.gt_classes))
        logits = self.mask_head(self.mask_pooler(features, fg, table))
        return mask_loss(logits, items, self.cls_agnostic_mask)

"""``ScratchMaskRCNN``: detectron2's backbone + FPN, then our RPN and RoI heads.

Module names follow detectron2's ``GeneralizedRCNN`` (``backbone``, ``proposal_generator``,
``roi_heads``, and inside them detectron2's own names), so checkpoints of either model load into
the other with no key map, and ``DetectionCheckpointer`` reports no missing or unexpected keys.
"""

from typing import Dict, List, Optional

import torch
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from .box_coder import clip_boxes, nonempty
from .mask_head import paste_masks
from .roi_heads import ROIHeads
from .rpn import RPN

__all__ = ["ScratchMaskRCNN", "postprocess"]


def postprocess(result: Instances, height: int, width: int, mask_threshold: float = 0.5):
    """Scale detections from the network's input size to the original (height, width), clip, drop
    empty boxes and paste the masks (detectron2's ``detector_postprocess``)."""
    sx, sy = width / result.image_size[1], height / result.image_size[0]
    boxes = result.pred_boxes.tensor.clone()
    boxes[:, 0::2] *= sx
    boxes[:, 1::2] *= sy
    boxes = clip_boxes(boxes, (height, width))
    keep = nonempty(boxes)
    out = Instances((height, width))
    for name, value in result.get_fields().items():
        if name != "pred_boxes":
            out.set(name, value[keep])
    out.pred_boxes = Boxes(boxes[keep])
    if out.has("pred_masks"):
        out.pred_masks = paste_masks(
            out.pred_masks[:, 0], out.pred_boxes.tensor, (height, width), mask_threshold
        )
    return out


@META_ARCH_REGISTRY.register()
class ScratchMaskRCNN(nn.Module):
    """Mask R-CNN whose RPN, RoIAlign, NMS and heads are written here (see the package README).

    Inputs and outputs are those of detectron2's ``GeneralizedRCNN``: a list of dicts with
    ``image`` (C, H, W) in ``INPUT.FORMAT`` and, in training, ``instances``; returns the losses in
    training and ``[{"instances": Instances}]`` at the requested ``height``/``width`` otherwise.
    """

    def __init__(self, cfg):
        super().__init__()
        if not cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN":
            raise ValueError(
                f"MODEL.PROPOSAL_GENERATOR.NAME {cfg.MODEL.PROPOSAL_GENERATOR.NAME!r}: "
                "ScratchMaskRCNN has only 'RPN'"
            )
        if cfg.MODEL.KEYPOINT_ON:
            raise ValueError("MODEL.KEYPOINT_ON: ScratchMaskRCNN has no keypoint head")
        self.backbone = build_backbone(cfg)
        shapes = self.backbone.output_shape()
        self.proposal_generator = RPN(cfg, shapes)
        self.roi_heads = ROIHeads(cfg, shapes)
        self.input_format = cfg.INPUT.FORMAT
        if len(cfg.MODEL.PIXEL_MEAN) != len(cfg.MODEL.PIXEL_STD):
            raise ValueError("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD must have the same length")
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("ScratchMaskRCNN: training inputs need 'instances'")
        gt = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, losses = self.proposal_generator(images, features, gt)
        _, detector_losses = self.roi_heads(features, proposals, gt)
        losses.update(detector_losses)
        return losses

    def inference(
        self,
        batched_inputs: List[Dict],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        """Detections per image; with ``detected_instances``, only their masks are predicted."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if detected_instances is None:
            proposals, _ = self.proposal_generator(images, features, None)
            results, _ = self.roi_heads(features, proposals, None)
        else:
            results = self.roi_heads.forward_with_given_boxes(
                [features[f] for f in self.roi_heads.in_features],
                [x.to(self.device) for x in detected_instances],
            )
        if not do_postprocess:
            return results
        out = []
        for result, inputs, size in zip(results, batched_inputs, images.image_sizes):
            height = inputs.get("height", size[0])
            width = inputs.get("width", size[1])
            out.append({"instances": postprocess(result, height, width)})
        return out

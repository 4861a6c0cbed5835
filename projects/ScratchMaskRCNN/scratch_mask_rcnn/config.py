"""Config keys of the scratch Mask R-CNN.

The model reads detectron2's own keys (``MODEL.ANCHOR_GENERATOR``, ``MODEL.RPN``,
``MODEL.ROI_HEADS``, ``MODEL.ROI_BOX_HEAD``, ``MODEL.ROI_MASK_HEAD``), so one config file trains
either ``GeneralizedRCNN`` or ``ScratchMaskRCNN`` and their checkpoints load into each other.
Only what detectron2 has no key for lives under ``MODEL.SCRATCH``.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_scratch_mask_rcnn_config", "NUM_CLASSES_KEYS"]

# where the model reads its number of classes (for maskpyramid.config.resolve_num_classes)
NUM_CLASSES_KEYS = {"ScratchMaskRCNN": ("MODEL.ROI_HEADS.NUM_CLASSES",)}


def add_scratch_mask_rcnn_config(cfg: CN) -> None:
    """Add ``MODEL.SCRATCH`` to ``cfg`` (in place)."""
    cfg.MODEL.SCRATCH = CN()
    # NMS of the RPN proposals (per level): "greedy" (detectron2's) or "fast" (YOLACT's Fast NMS)
    cfg.MODEL.SCRATCH.RPN_NMS = "greedy"
    # NMS of the final detections (per class): "greedy" or "fast"
    cfg.MODEL.SCRATCH.BOX_NMS = "greedy"
    # Fast NMS only: boxes kept per class before its IoU matrix (YOLACT uses 200); -1 = all
    cfg.MODEL.SCRATCH.FAST_NMS_TOP_K = 200

"""A Mask R-CNN written from scratch in plain PyTorch, numerically equal to detectron2's."""

from .config import NUM_CLASSES_KEYS, add_scratch_mask_rcnn_config

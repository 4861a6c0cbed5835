"""A Mask R-CNN written from scratch in plain PyTorch, numerically equal to detectron2's.

Importing the package registers ``ScratchMaskRCNN`` on detectron2's ``META_ARCH_REGISTRY``.
"""

from .config import NUM_CLASSES_KEYS, add_scratch_mask_rcnn_config
from .meta_arch import ScratchMaskRCNN

"""A Mask R-CNN written from scratch in plain PyTorch, numerically equal to detectron2's."""

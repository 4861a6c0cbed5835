"""Shared fixtures: a tiny `shapes` dataset and configs of the real models sized for tests."""

import os
import random

import numpy as np
import pytest
import torch

import maskpyramid  # noqa: F401  (registers datasets)
import scratch_mask_rcnn
from maskpyramid.config import NUM_CLASSES_KEYS, add_maskpyramid_config, resolve_num_classes
from maskpyramid.data.shapes import ShapesSpec, ensure_shapes, register_shapes

NUM_CLASSES_KEYS.update(scratch_mask_rcnn.NUM_CLASSES_KEYS)  # as train_net.py does
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SPEC = ShapesSpec(height=64, width=64, min_radius=4.0, max_radius=30.0, max_instances=5)
TINY_SPLITS = {"tiny_shapes_train": ("tiny_train", 16), "tiny_shapes_val": ("tiny_val", 6)}


@pytest.fixture(autouse=True)
def same_random_state():
    """Every test starts from the same random state, whatever ran before it: detectron2's
    TrainingSampler draws its shuffling seed from NumPy's global generator, so a test's batches
    would otherwise depend on the tests that ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """Registers `tiny_shapes_train` (16 images) and `tiny_shapes_val` (6), 64x64 pixels."""
    root = tmp_path_factory.mktemp("datasets")
    ensure_shapes(str(root), TINY_SPEC, TINY_SPLITS)
    register_shapes(str(root), TINY_SPEC, TINY_SPLITS)
    return str(root)


# Mask R-CNN of configs/shapes at test size: the real model code, a few seconds per iteration.
TINY_MASK_RCNN = [
    "DATASETS.TRAIN", ("tiny_shapes_train",),
    "DATASETS.TEST", (),
    "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64,
    "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64,
    "DATALOADER.NUM_WORKERS", 0,
    "SOLVER.IMS_PER_BATCH", 2, "SOLVER.BASE_LR", 0.01, "SOLVER.WARMUP_ITERS", 0,
    "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", (), "SOLVER.CHECKPOINT_PERIOD", 1000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64, "MODEL.RPN.POST_NMS_TOPK_TEST", 32,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
    "MODEL.DEVICE", "cpu",
]  # fmt: skip


@pytest.fixture
def make_cfg(tiny_shapes, tmp_path):
    """make_cfg(config_file=..., *opts) -> a resolved, unfrozen cfg writing to tmp_path."""

    def make(*opts, config_file="configs/shapes/mask_rcnn_R_18_FPN.yaml", output_dir=None):
        from detectron2.config import get_cfg

        cfg = get_cfg()
        add_maskpyramid_config(cfg)
        scratch_mask_rcnn.add_scratch_mask_rcnn_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, config_file))
        cfg.merge_from_list(TINY_MASK_RCNN + ["OUTPUT_DIR", str(output_dir or tmp_path)])
        cfg.merge_from_list(list(opts))
        resolve_num_classes(cfg)
        return cfg

    return make

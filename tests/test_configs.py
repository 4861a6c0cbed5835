"""Every config under configs/ merges onto the project's defaults and builds its model."""

import glob
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import scratch_mask_rcnn
from maskpyramid.config import add_maskpyramid_config
from tests.conftest import REPO

CONFIGS = sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)


@pytest.mark.parametrize("config_file", CONFIGS)
def test_config_builds_its_model(config_file):
    cfg = get_cfg()
    add_maskpyramid_config(cfg)
    scratch_mask_rcnn.add_scratch_mask_rcnn_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config_file))
    cfg.MODEL.DEVICE = "cpu"
    num_classes = 80 if "COCO" in config_file else 5
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.MASK_PYRAMID.NUM_CLASSES = num_classes
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 64, 96), "height": 64, "width": 96}])
    assert out[0]["instances"].image_size == (64, 96)

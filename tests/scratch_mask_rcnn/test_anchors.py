"""Anchors equal detectron2's DefaultAnchorGenerator, value for value and in the same order."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

from scratch_mask_rcnn.anchors import AnchorGenerator


@pytest.mark.parametrize(
    "sizes,ratios,offset",
    [
        ([[32], [64], [128], [256], [512]], [[0.5, 1.0, 2.0]], 0.0),
        ([[16, 24, 32, 48, 64]] * 5, [[0.5, 1.0, 2.0]], 0.5),  # 5 sizes x 3 ratios, the seed's
        ([[8], [16], [32]], [[1.0], [0.25, 4.0], [0.5, 1.0, 2.0, 3.0]], 0.25),
    ],
)
def test_anchors_equal_detectron2(sizes, ratios, offset):
    strides = [4, 8, 16, 32, 64][: len(sizes)]
    cfg = get_cfg()
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = sizes
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = ratios
    cfg.MODEL.ANCHOR_GENERATOR.OFFSET = offset
    ref = DefaultAnchorGenerator(cfg, [ShapeSpec(stride=s) for s in strides])
    ours = AnchorGenerator(sizes, ratios, strides, offset)
    features = [torch.zeros(2, 3, 40 // s + 1, 56 // s + 3) for s in strides]
    expected = [b.tensor for b in ref(features)]
    got = ours(features)
    assert ours.num_anchors == ref.num_anchors
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32
        assert torch.equal(e, g)


def test_anchor_config_errors_name_the_key():
    with pytest.raises(ValueError, match="MODEL.ANCHOR_GENERATOR.SIZES"):
        AnchorGenerator([[32], [64]], [[1.0]], [4, 8, 16])
    with pytest.raises(ValueError, match="OFFSET"):
        AnchorGenerator([[32]], [[1.0]], [4], offset=1.0)

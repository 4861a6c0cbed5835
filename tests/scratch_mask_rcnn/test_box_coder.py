"""Box coder and box utilities equal detectron2's Box2BoxTransform, pairwise_iou, clip, nonempty."""

import math

import pytest
import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes
from detectron2.structures import pairwise_iou as d2_pairwise_iou
from fvcore.nn import smooth_l1_loss as fv_smooth_l1

from scratch_mask_rcnn.box_coder import BoxCoder, clip_boxes, nonempty, pairwise_iou, smooth_l1_loss


def _boxes(n, seed, scale=100.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * scale
    wh = torch.rand(n, 2, generator=g) * scale + 1
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_equal_detectron2(weights):
    src, dst = _boxes(500, 0), _boxes(500, 1)
    ref = Box2BoxTransform(weights, scale_clamp=math.log(1000.0 / 16))
    ours = BoxCoder(weights)
    assert torch.equal(ours.encode(src, dst), ref.get_deltas(src, dst))
    deltas = torch.randn(500, 12) * 3  # 3 classes, some clamped by scale_clamp
    deltas[:5, 2] = 20.0
    assert torch.equal(ours.decode(deltas, src), ref.apply_deltas(deltas, src))
    deltas = ours.encode(src, dst)
    ok = (deltas[:, 2:] / torch.tensor(weights[2:])).abs().max(dim=1).values < ours.scale_clamp
    assert torch.allclose(ours.decode(deltas, src)[ok], dst[ok], atol=1e-3, rtol=1e-5)


def test_encode_rejects_empty_sources():
    src = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    with pytest.raises(ValueError, match="positive width"):
        BoxCoder((1, 1, 1, 1)).encode(src, src)


def test_iou_clip_nonempty_equal_detectron2():
    a, b = _boxes(60, 2), _boxes(80, 3)
    b[:5] = a[:5]  # identical boxes
    b[5:8, 2] = b[5:8, 0]  # zero width
    assert torch.equal(pairwise_iou(a, b), d2_pairwise_iou(Boxes(a), Boxes(b)))
    assert pairwise_iou(a[:0], b).shape == (0, 80)
    big = _boxes(50, 4, scale=300.0) - 100
    ref = Boxes(big.clone())
    ref.clip((120, 90))
    assert torch.equal(clip_boxes(big, (120, 90)), ref.tensor)
    assert torch.equal(nonempty(ref.tensor, 2.0), ref.nonempty(2.0))


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_smooth_l1_equal_fvcore(beta):
    x, y = torch.randn(100, 4), torch.randn(100, 4)
    assert torch.allclose(smooth_l1_loss(x, y, beta), fv_smooth_l1(x, y, beta, reduction="sum"))

"""RPN: proposals and losses equal detectron2's RPN with the same weights and inputs."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

import scratch_mask_rcnn
from scratch_mask_rcnn.rpn import RPN

STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def _cfg(*opts):
    cfg = get_cfg()
    scratch_mask_rcnn.add_scratch_mask_rcnn_config(cfg)
    cfg.MODEL.RPN.IN_FEATURES = list(STRIDES)
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 300
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 400
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 250
    cfg.merge_from_list(list(opts))
    return cfg


def _pair(cfg):
    shapes = {k: ShapeSpec(channels=16, stride=s) for k, s in STRIDES.items()}
    torch.manual_seed(0)
    ref = build_proposal_generator(cfg, shapes)
    ours = RPN(cfg, shapes)
    assert ref.state_dict().keys() == ours.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    # weights that make the scores and deltas spread (the init ones are near-constant)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    ref.load_state_dict(ours.state_dict())
    return ref, ours


def _inputs(sizes=((120, 160), (96, 128)), seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = 128, 160
    images = ImageList(torch.zeros(len(sizes), 3, h, w), list(sizes))
    features = {
        k: torch.randn(len(sizes), 16, -(-h // s), -(-w // s), generator=g)
        for k, s in STRIDES.items()
    }
    gts = []
    for size in sizes:
        inst = Instances(size)
        xy = torch.rand(4, 2, generator=g) * 60
        inst.gt_boxes = Boxes(torch.cat([xy, xy + 8 + torch.rand(4, 2, generator=g) * 60], 1))
        inst.gt_classes = torch.zeros(4, dtype=torch.int64)
        gts.append(inst)
    return images, features, gts


@pytest.mark.parametrize(
    "opts", [(), ("MODEL.RPN.NMS_THRESH", 0.5, "MODEL.PROPOSAL_GENERATOR.MIN_SIZE", 4)]
)
def test_proposals_equal_detectron2(opts):
    ref, ours = _pair(_cfg(*opts))
    ref.eval()
    ours.eval()
    images, features, _ = _inputs()
    with torch.no_grad():
        expected, _ = ref(images, features)
        got, _ = ours(images, features)
    for e, g in zip(expected, got):
        assert len(e) == len(g) > 50
        assert torch.equal(g.proposal_boxes.tensor, e.proposal_boxes.tensor)
        assert torch.equal(g.objectness_logits, e.objectness_logits)


def test_training_losses_and_proposals_equal_detectron2():
    ref, ours = _pair(_cfg("MODEL.RPN.BOUNDARY_THRESH", 0))
    images, features, gts = _inputs()
    gts[1] = gts[1][:0]  # an image without ground truth
    results = []
    for model in (ref, ours):
        torch.manual_seed(3)
        with EventStorage() as storage:
            proposals, losses = model(images, features, gts)
            scalars = {k: v[0] for k, v in storage.latest().items()}
        results.append((proposals, losses, scalars))
    (ep, el, es), (gp, gl, gs) = results
    assert el.keys() == gl.keys()
    for k in el:
        assert torch.allclose(gl[k], el[k], rtol=1e-6, atol=1e-7), k
    assert es == gs
    for e, g in zip(ep, gp):
        assert torch.equal(g.proposal_boxes.tensor, e.proposal_boxes.tensor)


def test_fast_nms_option_gives_proposals_too():
    _, ours = _pair(_cfg("MODEL.SCRATCH.RPN_NMS", "fast"))
    ours.eval()
    images, features, _ = _inputs()
    with torch.no_grad():
        got, _ = ours(images, features)
    assert all(0 < len(p) <= 200 for p in got)
    with pytest.raises(ValueError, match="MODEL.SCRATCH.RPN_NMS"):
        _pair(_cfg("MODEL.SCRATCH.RPN_NMS", "soft"))

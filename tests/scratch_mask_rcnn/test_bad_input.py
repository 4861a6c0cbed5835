"""Bad input to ScratchMaskRCNN: empty ground truth, zero or degenerate proposals, RoIs outside the
image, images smaller than the coarsest stride and NaN features. None of them may crash; losses
stay finite and inference gives (possibly zero) detections."""

import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage


@pytest.fixture
def model(make_cfg):
    cfg = make_cfg("MODEL.META_ARCHITECTURE", "ScratchMaskRCNN")
    torch.manual_seed(0)
    return build_model(cfg)


def _input(h=64, w=64, boxes=((4, 6, 30, 40), (20, 20, 60, 50)), classes=(0, 3)):
    image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, int(y0) : int(y1), int(x0) : int(x1)] = True
    inst.gt_masks = BitMasks(masks)
    return {"image": image, "instances": inst, "height": h, "width": w}


def _train(model, inputs):
    model.train()
    with EventStorage():
        losses = model(inputs)
    total = sum(losses.values())
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    total.backward()
    return losses


def test_images_without_ground_truth_train(model):
    empty = _input(boxes=(), classes=())
    losses = _train(model, [empty, _input()])
    assert losses["loss_mask"].item() > 0
    losses = _train(model, [empty, _input(boxes=(), classes=())])
    assert losses["loss_mask"].item() == 0 and losses["loss_box_reg"].item() == 0


@pytest.mark.parametrize("append_gt", [True, False])
def test_zero_proposals_after_nms(model, monkeypatch, append_gt):
    """The RPN leaves nothing (the seed's torch.cat of an empty list): the heads still train."""
    rpn = model.proposal_generator

    def no_proposals(images, features, gt_instances=None):
        proposals, losses = type(rpn).forward(rpn, images, features, gt_instances)
        return [p[:0] for p in proposals], losses

    monkeypatch.setattr(rpn, "forward", no_proposals)
    model.roi_heads.proposal_append_gt = append_gt
    losses = _train(model, [_input(), _input(boxes=(), classes=())])
    if append_gt:
        assert losses["loss_mask"].item() > 0  # the ground truth itself is a proposal
    model.eval()
    with torch.no_grad():
        out = model([_input()])
    assert len(out[0]["instances"]) == 0


def test_degenerate_and_outside_rois(model):
    """Zero-size proposals (the seed's "empty spatial dimensions") and RoIs outside the image pool
    to finite features; detections on given degenerate boxes still get masks."""
    model.eval()
    x = _input()
    images = model.preprocess_image([x])
    features = model.backbone(images.tensor)
    boxes = torch.tensor(
        [[10, 10, 10, 30], [5, 5, 5, 5], [-50, -50, -10, -10], [70, 70, 200, 90], [30, 2, 20, 8]],
        dtype=torch.float32,
    )
    props = Instances((64, 64))
    props.proposal_boxes = Boxes(boxes)
    props.objectness_logits = torch.zeros(len(boxes))
    with torch.no_grad():
        pooled = model.roi_heads.box_pooler(
            [features[f] for f in model.roi_heads.in_features], [boxes]
        )
        assert pooled.shape[0] == 5 and torch.isfinite(pooled).all()
        dets, _ = model.roi_heads(features, [props])
        given = Instances((64, 64), pred_boxes=Boxes(boxes), pred_classes=torch.zeros(5).long())
        given.scores = torch.ones(5)
        out = model.inference([x], detected_instances=[given])[0]["instances"]
    assert torch.isfinite(dets[0].pred_boxes.tensor).all()
    assert out.pred_masks.shape[1:] == (64, 64)


@pytest.mark.parametrize("size", [(20, 20), (20, 33), (7, 90)])
def test_images_smaller_than_the_coarsest_stride(model, size):
    h, w = size
    _train(model, [_input(h, w, boxes=((1, 1, w - 2, h - 2),), classes=(1,)), _input()])
    model.eval()
    with torch.no_grad():
        out = model([_input(h, w)])[0]["instances"]
    assert out.image_size == (h, w)
    assert out.pred_masks.shape[1:] == (h, w)


def test_nan_features_give_no_detections(model, monkeypatch):
    model.eval()
    backbone_forward = model.backbone.forward

    def nan_backbone(x):
        return {k: torch.full_like(v, float("nan")) for k, v in backbone_forward(x).items()}

    monkeypatch.setattr(model.backbone, "forward", nan_backbone)
    with torch.no_grad():
        out = model([_input(), _input(32, 48)])
    assert [len(o["instances"]) for o in out] == [0, 0]
    assert out[1]["instances"].pred_masks.shape == (0, 32, 48)


def test_nan_loss_in_training_is_an_error(model, monkeypatch):
    """Training must not silently go on: the RPN reports diverged predictions."""
    backbone_forward = model.backbone.forward
    monkeypatch.setattr(
        model.backbone,
        "forward",
        lambda x: {k: v * float("nan") for k, v in backbone_forward(x).items()},
    )
    model.train()
    with EventStorage(), pytest.raises(FloatingPointError, match="diverged"):
        model([_input()])

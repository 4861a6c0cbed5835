"""Box and mask heads: inference, losses, mask targets and pasting equal detectron2's."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import paste_masks_in_image
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from scratch_mask_rcnn.box_coder import BoxCoder
from scratch_mask_rcnn.box_head import box_inference, box_losses
from scratch_mask_rcnn.mask_head import mask_loss, mask_targets, paste_masks

K = 4  # classes


def _boxes(n, g, size=100.0):
    xy = torch.rand(n, 2, generator=g) * size
    return torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=g) * size / 2], 1)


def _proposals(g, counts=(60, 0, 35), size=(120, 110)):
    out = []
    for n in counts:
        p = Instances(size)
        p.proposal_boxes = Boxes(_boxes(n, g))
        out.append(p)
    return out


@pytest.mark.parametrize("agnostic,thresh", [(False, 0.05), (False, 0.0), (True, 0.3)])
def test_box_inference_equals_detectron2(agnostic, thresh):
    g = torch.Generator().manual_seed(0)
    props = _proposals(g)
    n = sum(len(p) for p in props)
    logits = torch.randn(n, K + 1, generator=g) * 2
    deltas = torch.randn(n, 4 if agnostic else 4 * K, generator=g) * 0.5
    coder = BoxCoder((10, 10, 5, 5))
    ours = box_inference(logits, deltas, props, coder, thresh, 0.5, 50)
    boxes = coder.decode(deltas, torch.cat([p.proposal_boxes.tensor for p in props]))
    probs = torch.softmax(logits, -1)
    split = [len(p) for p in props]
    ref, _ = fast_rcnn_inference(
        boxes.split(split), probs.split(split), [p.image_size for p in props], thresh, 0.5, 50
    )
    for o, r in zip(ours, ref):
        assert torch.equal(o.pred_boxes.tensor, r.pred_boxes.tensor)
        assert torch.equal(o.scores, r.scores)
        assert torch.equal(o.pred_classes, r.pred_classes)
    assert sum(len(o) for o in ours) > 20


def test_fast_nms_box_inference_keeps_a_subset():
    g = torch.Generator().manual_seed(1)
    props = _proposals(g, counts=(80,))
    logits = torch.randn(80, K + 1, generator=g) * 2
    deltas = torch.randn(80, 4 * K, generator=g) * 0.5
    coder = BoxCoder((10, 10, 5, 5))
    greedy = box_inference(logits, deltas, props, coder, 0.05, 0.5, -1)[0]
    fast = box_inference(logits, deltas, props, coder, 0.05, 0.5, -1, "fast")[0]

    def key(r):
        return {(tuple(b.tolist()), int(c)) for b, c in zip(r.pred_boxes.tensor, r.pred_classes)}

    assert 0 < len(fast) <= len(greedy) and key(fast) <= key(greedy)


def test_box_losses_equal_detectron2():
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    cfg = get_cfg()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    layer = FastRCNNOutputLayers(cfg, ShapeSpec(channels=8))
    g = torch.Generator().manual_seed(2)
    props = _proposals(g, counts=(40, 30))
    for p in props:
        p.gt_boxes = Boxes(_boxes(len(p), g))
        p.gt_classes = torch.randint(0, K + 1, (len(p),), generator=g)  # K = background
    logits = torch.randn(70, K + 1, generator=g)
    deltas = torch.randn(70, 4 * K, generator=g)
    with EventStorage() as s:
        ref = layer.losses((logits, deltas), props)
        ref_scalars = {k: v[0] for k, v in s.latest().items()}
    with EventStorage() as s:
        cat = torch.cat
        ours = box_losses(
            logits,
            deltas,
            cat([p.proposal_boxes.tensor for p in props]),
            cat([p.gt_boxes.tensor for p in props]),
            cat([p.gt_classes for p in props]),
            BoxCoder((10, 10, 5, 5)),
            0.0,
        )
        our_scalars = {k: v[0] for k, v in s.latest().items()}
    for k in ref:
        assert torch.allclose(ours[k], ref[k]), k
    assert our_scalars == ref_scalars


def _gt_masks(g, n=5, h=90, w=100):
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        y0, x0 = int(torch.randint(0, h // 2, (1,), generator=g)), int(
            torch.randint(0, w // 2, (1,), generator=g)
        )
        masks[i, y0 : y0 + 30, x0 : x0 + 40] = True
        masks[i, y0 + 10 : y0 + 15, x0 + 5 : x0 + 12] = False  # a hole
    return BitMasks(masks)


def test_mask_targets_fall_as_detectron2s_at_ties():
    """Boxes on whole and half pixels put samples exactly between mask pixels: torchvision pools
    exactly 0.5 there (foreground), which the bag sum can miss by an ulp; the targets agree with
    ``BitMasks.crop_and_resize`` everywhere."""
    from scratch_mask_rcnn.roi_align import roi_align

    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(6, 1, 32, 32, generator=g) > 0.5
    gt = BitMasks(F.interpolate(coarse.float(), size=(256, 256), mode="nearest")[:, 0] > 0)
    xy = torch.rand(800, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + torch.rand(800, 2, generator=g) * 150 + 2], 1)
    boxes = (boxes * 2).round() / 2
    index = torch.randint(0, 6, (800,), generator=g)
    ref = gt[index].crop_and_resize(boxes, 28)
    rois = torch.cat([index.float()[:, None], boxes], 1)
    bag_sums = roi_align(gt.tensor[:, None].float(), rois, 28, 1.0, 0, True)[:, 0] >= 0.5
    assert (bag_sums != ref).sum() > 0  # the case this guards against occurs here
    assert torch.equal(mask_targets(gt, index, boxes, 28), ref)


def test_mask_targets_and_loss_equal_detectron2():
    g = torch.Generator().manual_seed(3)
    gt = _gt_masks(g)
    boxes = _boxes(25, g, size=80.0)
    boxes[0] = torch.tensor([10.0, 10.0, 10.0, 30.0])  # zero width
    index = torch.randint(0, len(gt), (25,), generator=g)
    ours = mask_targets(gt, index, boxes, 28)
    ref = gt[index].crop_and_resize(boxes, 28)
    assert torch.equal(ours, ref)
    # polygons go through detectron2's rasteriser
    poly = PolygonMasks([[[10, 10, 60, 12, 40, 50]], [[0, 0, 30, 0, 30, 30, 0, 30]]])
    idx = torch.tensor([1, 0, 1])
    assert torch.equal(
        mask_targets(poly, idx, boxes[1:4], 14), poly[idx].crop_and_resize(boxes[1:4], 14)
    )

    inst = Instances((90, 100))
    inst.proposal_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(0, K, (25,), generator=g)
    inst.gt_masks = gt[index]
    logits = torch.randn(25, K, 28, 28, generator=g)
    with EventStorage() as s:
        ref_loss = mask_rcnn_loss(logits, [inst])
        ref_scalars = {k: v[0] for k, v in s.latest().items()}
    with EventStorage() as s:
        our_loss = mask_loss(logits, [(gt, index, boxes, inst.gt_classes)], False)["loss_mask"]
        our_scalars = {k: v[0] for k, v in s.latest().items()}
    assert torch.allclose(our_loss, ref_loss)
    assert our_scalars == pytest.approx(ref_scalars)
    assert mask_loss(logits[:0], [], False)["loss_mask"].item() == 0


@pytest.mark.parametrize("size", [(90, 100), (7, 300)])
def test_paste_masks_equal_detectron2(size):
    g = torch.Generator().manual_seed(4)
    n = 30
    masks = torch.rand(n, 28, 28, generator=g)
    boxes = Boxes(_boxes(n, g, size=120.0) - 10)
    boxes.clip(size)  # as after detection post-processing; some are now empty
    boxes.tensor[0] = torch.tensor([5.0, 2.0, 5.5, 2.2])  # tiny
    ref = paste_masks_in_image(masks, boxes, size)
    ours = paste_masks(masks, boxes.tensor, size)
    assert ours.dtype == torch.bool and ours.shape == (n, *size)
    assert torch.equal(ours, ref)
    # boxes outside the image (detectron2's CPU paste raises on them) paste nothing
    outside = torch.tensor([[-50.0, -40.0, -10.0, -5.0], [400.0, 0.0, 420.0, 5.0]])
    assert not paste_masks(masks[:2], outside, size).any()
    assert paste_masks(masks[:0], boxes[:0], size).shape == (0, *size)

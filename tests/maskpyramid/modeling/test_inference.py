"""inference.py: priority painting, mask NMS variants, resampling to the image, Instances."""

import math

import pytest
import torch

from maskpyramid.modeling import inference as inf


def _masks():
    m = torch.zeros(4, 8, 8, dtype=torch.bool)
    m[0, :4, :4] = True  # highest score
    m[1, :4, :3] = True  # a duplicate of 0, inside it
    m[2, 4:, 4:] = True
    m[3, 3:5, 3:5] = True  # keeps 2 of 4 pixels once 0 and 2 have painted
    return m


def test_paint_drops_duplicates_and_keeps_partly_covered():
    keep, painted = inf.paint(_masks(), 0.5)
    assert keep.tolist() == [True, False, True, True]
    assert painted[3].sum() == 2 and not (painted[0] & painted[3]).any()
    keep, _ = inf.paint(_masks(), 0.0)
    assert keep.all()


def test_mask_iou_matrix_in_pixel_chunks_equals_the_whole_product():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(7, 13, 11, generator=g) > 0.6
    b = torch.rand(4, 13, 11, generator=g) > 0.3
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = fa @ fb.T
    ref = inter / (fa.sum(1)[:, None] + fb.sum(1)[None] - inter)
    for chunk in (1, 10, 143, 1 << 16):  # 143 pixels: one chunk
        assert torch.allclose(inf.mask_iou_matrix(a, b, chunk=chunk), ref)
        assert torch.allclose(inf.mask_iou_matrix(a, chunk=chunk).diagonal(), torch.ones(7))
    empty = torch.zeros(2, 5, 5, dtype=torch.bool)
    assert inf.mask_iou_matrix(empty).eq(0).all()  # no pixels: IoU 0, not NaN


def test_greedy_mask_nms_matches_a_sequential_reference():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(30, 6, 6, generator=g) > 0.5
    iou = inf.mask_iou_matrix(m)
    ref = []
    for i in range(len(m)):
        if all(iou[j, i] <= 0.3 for j in ref):
            ref.append(i)
    keep = inf.mask_nms(m, 0.3)
    assert keep.nonzero()[:, 0].tolist() == ref


def test_fast_and_matrix_nms():
    m = _masks()
    assert inf.fast_mask_nms(m, 0.5).tolist() == [True, False, True, True]
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    decayed = inf.matrix_nms(m, scores, 2.0)
    assert decayed[0] == 0.9 and decayed[2] == 0.7 and decayed[1] < 0.8 * 0.5


def test_logits_to_image_crops_the_padding_and_scales():
    logits = torch.full((1, 4, 4), -10.0)
    logits[0, :2, :2] = 10  # the top-left 16x16 pixels of a 32x32 input at stride 8
    out = inf.logits_to_image(logits, 8, (64, 64), (32, 32))
    assert out.shape == (1, 64, 64)
    assert (out[0, :24, :24] > 0).all() and (out[0, 40:, 40:] < 0).all()


def test_instances_have_boxes_from_masks_and_respect_threshold_and_top_k():
    logits = torch.full((3, 4, 4), -10.0)
    logits[0, 1:3, 1:3] = 10
    logits[1, 0, 0] = 10
    logits[2, 3, 3] = 10
    args = dict(stride=8, input_size=(32, 32), output_size=(32, 32), mask_thresh=0.5, min_kept=0.5,
                nms="none", nms_thresh=0.5, matrix_sigma=2.0, painted_output=False)  # fmt: skip
    out = inf.pyramids_to_instances(
        logits, torch.tensor([0.9, 0.02, 0.5]), torch.tensor([1, 2, 3]), score_thresh=0.05,
        max_detections=100, **args,
    )  # fmt: skip
    assert out.scores.tolist() == pytest.approx([0.9, 0.5]) and out.pred_classes.tolist() == [1, 3]
    box = out.pred_boxes.tensor[0].tolist()
    assert box[0] < 10 and box[2] > 22 and out.pred_masks.dtype == torch.bool
    one = inf.pyramids_to_instances(
        logits, torch.tensor([0.9, 0.02, 0.5]), torch.tensor([1, 2, 3]), score_thresh=0.0,
        max_detections=1, **args,
    )  # fmt: skip
    assert len(one) == 1
    empty = inf.pyramids_to_instances(
        logits[:0], torch.zeros(0), torch.zeros(0, dtype=torch.long), score_thresh=0.05,
        max_detections=100, **args,
    )  # fmt: skip
    assert len(empty) == 0 and empty.pred_boxes.tensor.shape == (0, 4)


@pytest.mark.parametrize("nms", ["none", "matrix"])
def test_each_kept_pyramid_is_output_once_per_class_hypothesis(nms):
    logits = torch.full((3, 4, 4), -10.0)
    logits[0, 1:3, 1:3] = 10
    logits[1, 1:3, 1:3] = 10  # a duplicate of pyramid 0, lower score: painted away
    logits[2, 3, 3] = 10
    scores = torch.tensor([[0.6, 0.3, 0.01], [0.5, 0.4, 0.1], [0.2, 0.1, 0.04]])
    classes = torch.tensor([[1, 0, 2], [0, 1, 2], [2, 1, 0]])
    args = dict(stride=8, input_size=(32, 32), output_size=(32, 32), mask_thresh=0.5, min_kept=0.5,
                nms=nms, nms_thresh=0.5, matrix_sigma=2.0, painted_output=False)  # fmt: skip
    out = inf.pyramids_to_instances(
        logits, scores, classes, score_thresh=0.05, max_detections=100, **args
    )
    # pyramid 0 twice (its third hypothesis is below the threshold), pyramid 2 twice; pyramid 1
    # is a duplicate of 0 (matrix NMS decays it below, painting drops it otherwise)
    got = sorted(zip(out.scores.tolist(), out.pred_classes.tolist()), reverse=True)
    assert [c for _, c in got] == [1, 0, 2, 1]
    assert [s for s, _ in got][:2] == pytest.approx([0.6, 0.3])
    assert out.scores.tolist() == sorted(out.scores.tolist(), reverse=True)
    masks = out.pred_masks
    assert torch.equal(masks[0], masks[1]) and masks[0, 12, 12] and masks[2, 28, 28]
    top = inf.pyramids_to_instances(
        logits, scores, classes, score_thresh=0.05, max_detections=3, **args
    )
    assert len(top) == 3 and top.scores.min() >= out.scores[2]
    # (N,) scores are one hypothesis each
    one = inf.pyramids_to_instances(
        logits, scores[:, 0], classes[:, 0], score_thresh=0.05, max_detections=100, **args
    )
    assert one.pred_classes.tolist() == [1, 2]


def test_mask_boxes_equal_detectron2_bitmasks_boxes():
    from detectron2.structures import BitMasks

    from maskpyramid.modeling.growth import mask_extents

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 20, 30, dtype=torch.bool)
    for k in range(5):  # random rectangles with holes; the last mask stays empty
        y0, x0 = torch.randint(0, 15, (2,), generator=g).tolist()
        masks[k, y0 : y0 + 1 + k, x0 : x0 + 3 + 2 * k] = True
        masks[k] &= torch.rand(20, 30, generator=g) > 0.3
    masks[0, 19, 29] = True  # touching the far corner
    boxes, nonempty = mask_extents(masks)
    assert torch.equal(boxes.float(), BitMasks(masks).get_bounding_boxes().tensor)
    assert nonempty.tolist() == [True] * 5 + [False]
    assert mask_extents(masks[:0])[0].shape == (0, 4)


def test_paste_in_image_inverts_detectron2s_crop_and_resize():
    """The refinement's training target (detectron2's crop_and_resize of the ground truth to
    the box) pasted back by ``paste_in_image`` is the ground truth again, up to the resolution
    of the window; outside the box nothing."""
    from detectron2.structures import BitMasks

    gt = torch.zeros(1, 60, 80, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(60.0), torch.arange(80.0), indexing="ij")
    gt[0] = ((xx + 0.5 - 37) / 15) ** 2 + ((yy + 0.5 - 30) / 9) ** 2 <= 1  # an ellipse
    box = torch.tensor([[18.5, 18.0, 55.0, 42.5]])
    window = BitMasks(gt).crop_and_resize(box, 28).float() * 20 - 10  # logits
    pasted = inf.paste_in_image(window, box, (60, 80), (60, 80), 0.0)
    assert pasted.shape == (1, 60, 80) and pasted.dtype == torch.bool
    iou = (pasted & gt).sum() / (pasted | gt).sum()
    assert iou > 0.93
    x0, y0, x1, y1 = box[0].tolist()
    inside = (xx + 0.5 >= x0) & (xx + 0.5 <= x1) & (yy + 0.5 >= y0) & (yy + 0.5 <= y1)
    everything = inf.paste_in_image(torch.full((1, 28, 28), 5.0), box, (60, 80), (60, 80), 0.0)
    assert torch.equal(everything[0], inside)
    # an output image half the input's size: the same box covers half as many pixels a side
    half = inf.paste_in_image(torch.full((1, 28, 28), 5.0), box, (30, 40), (60, 80), 0.0)
    assert abs(int(half.sum()) - int(inside.sum()) / 4) <= 20


def test_readout_refines_only_outputs_scoring_at_least_readout_thresh():
    """With a ``readout``, the pyramids whose best output score reaches ``readout_thresh`` get
    its masks (asked for once, by pyramid index); the others are read out on the level grid."""
    logits = torch.full((3, 4, 4), -10.0)
    logits[0, 1:3, 1:3] = 10
    logits[1, 0, 0] = 10
    logits[2, 3, 3] = 10
    scores = torch.tensor([[0.9, 0.05], [0.3, 0.2], [0.5, 0.4]])
    classes = torch.tensor([[1, 2], [2, 0], [3, 1]])
    asked = []

    def readout(index):  # every refined mask: the whole image
        asked.append(index.tolist())
        return torch.ones(len(index), 32, 32, dtype=torch.bool)

    args = dict(stride=8, input_size=(32, 32), output_size=(32, 32), mask_thresh=0.5, min_kept=0.0,
                nms="none", nms_thresh=0.5, matrix_sigma=2.0, painted_output=False,
                score_thresh=0.1, max_detections=100, readout=readout)  # fmt: skip
    out = inf.pyramids_to_instances(logits, scores, classes, readout_thresh=0.4, **args)
    assert sorted(sum(asked, [])) == [0, 2]  # pyramid 1's best score 0.3 < 0.4
    full = out.pred_masks.flatten(1).all(1)
    assert out.scores.tolist() == pytest.approx([0.9, 0.5, 0.4, 0.3, 0.2])
    assert full.tolist() == [True, True, True, False, False]  # pyramid 1 from the grid
    grid = inf.logits_to_image(logits[1:2], 8, (32, 32), (32, 32))[0] > 0
    assert torch.equal(out.pred_masks[3], grid) and grid[:6, :6].all() and not grid[10:].any()
    asked.clear()
    out = inf.pyramids_to_instances(logits, scores, classes, readout_thresh=0.0, **args)
    assert sorted(sum(asked, [])) == [0, 1, 2] and out.pred_masks.flatten(1).all(1).all()


def test_nms_masks_output_judges_duplicates_on_the_read_out_masks():
    """Two pyramids apart on the level grid whose read-out masks coincide: NMS on the grid keeps
    both; NMS_MASKS "output" reads every candidate out first and drops the lower one, and the
    kept one's mask is the read-out mask it was judged on (read out once)."""
    logits = torch.full((3, 4, 4), -10.0)
    logits[0, 0:2, 0:2] = 10
    logits[1, 2:4, 2:4] = 10
    logits[2, 0:2, 2:4] = 10
    scores = torch.tensor([0.9, 0.8, 0.7])
    classes = torch.tensor([0, 0, 1])
    asked = []

    def readout(index):  # pyramids 0 and 1 read out to the same left half; 2 to the right half
        asked.append(index.tolist())
        masks = torch.zeros(len(index), 32, 32, dtype=torch.bool)
        masks[index < 2, :, :16] = True
        masks[index == 2, :, 16:] = True
        return masks

    args = dict(stride=8, input_size=(32, 32), output_size=(32, 32), mask_thresh=0.5, min_kept=0.0,
                nms="mask", nms_thresh=0.5, matrix_sigma=2.0, painted_output=False,
                score_thresh=0.1, max_detections=100, readout=readout)  # fmt: skip
    grid = inf.pyramids_to_instances(logits, scores, classes, **args)
    assert grid.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    asked.clear()
    out = inf.pyramids_to_instances(logits, scores, classes, nms_masks="output", **args)
    assert out.scores.tolist() == pytest.approx([0.9, 0.7])
    assert out.pred_masks[0, :, :16].all() and not out.pred_masks[0, :, 16:].any()
    assert out.pred_masks[1, :, 16:].all() and not out.pred_masks[1, :, :16].any()
    assert sorted(sum(asked, [])) == [0, 1, 2]  # every candidate once, none again
    # Matrix NMS decays the duplicate's score on the output masks (IoU 1: exp(-sigma))
    args.update(nms="matrix", score_thresh=0.01)
    out = inf.pyramids_to_instances(logits, scores, classes, nms_masks="output", **args)
    assert out.scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * math.exp(-2.0)])
    with pytest.raises(ValueError, match="NMS_MASKS"):
        inf.pyramids_to_instances(logits, scores, classes, nms_masks="level", **args)

"""Matcher labels and matches equal detectron2's Matcher, low-quality matches included."""

import pytest
import torch
from detectron2.modeling.matcher import Matcher as D2Matcher
from detectron2.modeling.sampling import subsample_labels

from scratch_mask_rcnn.matcher import Matcher
from scratch_mask_rcnn.sampler import sample_balanced


@pytest.mark.parametrize(
    "thresholds,labels,low_quality",
    [([0.3, 0.7], [0, -1, 1], True), ([0.5], [0, 1], False), ([0.4, 0.5], [0, -1, 1], False)],
)
def test_matcher_equals_detectron2(thresholds, labels, low_quality):
    g = torch.Generator().manual_seed(0)
    for m, n in [(1, 50), (7, 300), (20, 1000)]:
        iou = torch.rand(m, n, generator=g) ** 3
        iou[iou < 0.1] = 0.0
        iou[0, :3] = 0.7  # exactly on a threshold, and a tie for the best of gt 0
        ours = Matcher(thresholds, labels, low_quality)(iou)
        ref = D2Matcher(thresholds, labels, low_quality)(iou)
        assert torch.equal(ours[0], ref[0])
        assert torch.equal(ours[1], ref[1])


def test_matcher_without_ground_truth():
    matches, labels = Matcher([0.5], [0, 1])(torch.zeros(0, 9))
    assert matches.tolist() == [0] * 9 and labels.tolist() == [0] * 9


def test_matcher_bad_config():
    with pytest.raises(ValueError, match="IOU_LABELS"):
        Matcher([0.3, 0.7], [0, 1])
    with pytest.raises(ValueError, match="increasing"):
        Matcher([0.7, 0.3], [0, -1, 1])


@pytest.mark.parametrize("num,fraction", [(256, 0.5), (512, 0.25), (16, 0.5)])
def test_sampler_equals_detectron2_with_the_same_seed(num, fraction):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(-1, 4, (3000,), generator=g)  # 3 = background
    labels[:2900][labels[:2900] < 3] = 3  # few positives
    torch.manual_seed(5)
    ours = sample_balanced(labels, num, fraction, 3)
    torch.manual_seed(5)
    ref = subsample_labels(labels, num, fraction, 3)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert len(ours[0]) <= int(num * fraction)
    assert len(ours[0]) + len(ours[1]) == min(num, int((labels >= 0).sum()))

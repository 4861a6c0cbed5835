"""`scratch_mask_rcnn.nms` against torchvision's NMS (bit-for-bit keep lists) and a reference Fast
NMS."""

import pytest
import torch
import torchvision

import scratch_mask_rcnn.nms as nms_module
from scratch_mask_rcnn.nms import batched_nms, fast_nms, nms

THRESHOLDS = [0.3, 0.5, 0.7]


@pytest.fixture(autouse=True)
def one_thread():
    """The results do not depend on threads; one keeps this file fast on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_boxes(n: int, seed: int, dtype: torch.dtype = torch.float32, size: float = 100.0):
    """``n`` random boxes in a ``size`` square (sides up to ``size / 2``) and random scores."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * size / 2
    boxes = torch.cat([xy, xy + wh], 1).to(dtype)
    return boxes, torch.rand(n, generator=g, dtype=torch.float64).to(dtype)


def tie_heavy_boxes(n: int, seed: int):
    """Integer boxes on a small grid: many exact duplicates, IoUs exactly at 0.3 / 0.5 / 0.7 (and
    at float32-rounded neighbours of them), zero-area boxes; scores from 3 distinct values."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 8, (n, 2), generator=g)
    wh = torch.randint(0, 5, (n, 2), generator=g)  # 0: zero-area boxes
    boxes = torch.cat([xy, xy + wh], 1).float()
    # Pairs of boxes with an IoU of exactly 1/2, 3/10, 7/10: [0, 10] vs [0, 5], [0, 3], [0, 7].
    exact = torch.tensor(
        [[0, 0, 10, 1], [0, 0, 5, 1], [0, 0, 3, 1], [0, 0, 7, 1], [0, 0, 10, 1], [20, 0, 27, 1]]
    ).float()
    boxes = torch.cat([boxes, exact, boxes[: n // 4]])  # and exact duplicates
    scores = torch.tensor([0.2, 0.5, 0.9])[torch.randint(0, 3, (boxes.shape[0],), generator=g)]
    return boxes, scores


def per_class_nms(boxes, scores, idxs, thr):
    """One `torchvision.ops.nms` per class; the kept indices by decreasing score (ties: index)."""
    keep = torch.zeros(0, dtype=torch.int64)
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).squeeze(1)
        keep = torch.cat([keep, members[torchvision.ops.nms(boxes[members], scores[members], thr)]])
    keep = torch.sort(keep).values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def reference_fast_nms(boxes, scores, idxs, thr, top_k=-1):
    """YOLACT's Fast NMS, one class at a time, with an explicit upper-triangular IoU matrix (0/0
    IoUs of zero-area boxes count as 0)."""
    keep = torch.zeros(0, dtype=torch.int64)
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).squeeze(1)
        members = members[torch.sort(scores[members], descending=True, stable=True).indices]
        if top_k >= 0:
            members = members[:top_k]
        b = boxes[members]  # IoU in the boxes' dtype, compared in float64 as torchvision does
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        lt = torch.maximum(b[:, None, :2], b[None, :, :2])
        rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        iou = (inter / (area[:, None] + area[None, :] - inter)).nan_to_num(0).triu(1)
        keep = torch.cat(
            [keep, members[iou.max(0).values.double() <= thr] if len(members) else members]
        )
    keep = torch.sort(keep).values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


@pytest.mark.parametrize("n", [0, 1, 2, 50, 1000, 3000])
@pytest.mark.parametrize("thr", THRESHOLDS)
def test_nms_random(n, thr):
    for seed in range(3 if n < 3000 else 1):
        boxes, scores = random_boxes(n, seed, size=100.0 if n < 1000 else 1000.0)
        keep = nms(boxes, scores, thr)
        assert keep.dtype == torch.int64 and keep.device == boxes.device
        assert torch.equal(keep, torchvision.ops.nms(boxes, scores, thr))


@pytest.mark.parametrize("thr", THRESHOLDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_ties_and_degenerate_boxes(thr, seed):
    boxes, scores = tie_heavy_boxes(300, seed)
    assert torch.equal(nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))
    # IoUs exactly at the threshold are not suppressed; and the float32 threshold is compared as
    # torchvision does (in float64): float32(0.3) > 0.3, so an IoU of float32(0.3) is suppressed.
    for t in [thr, torch.tensor(thr).item()]:
        assert torch.equal(nms(boxes, scores, t), torchvision.ops.nms(boxes, scores, t))


def test_nms_exact_threshold():
    boxes = torch.tensor([[0, 0, 10, 1], [0, 0, 5, 1], [0, 0, 3, 1]]).float()
    scores = torch.tensor([0.9, 0.8, 0.7])
    # IoU(0, 1) = 0.5, IoU(0, 2) = float32(0.3) > 0.3, IoU(1, 2) = 0.6.
    cases = [(0.5, [0, 1]), (0.4999, [0, 2]), (0.3, [0]), (torch.tensor(0.3).item(), [0, 2])]
    for thr, expected in cases:
        assert nms(boxes, scores, thr).tolist() == expected
        assert torchvision.ops.nms(boxes, scores, thr).tolist() == expected


@pytest.mark.parametrize("thr", THRESHOLDS)
def test_nms_float64(thr):
    for n in [50, 700]:
        boxes, scores = random_boxes(n, n, dtype=torch.float64)
        assert torch.equal(nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))
    boxes, scores = tie_heavy_boxes(200, 3)
    boxes, scores = boxes.double(), scores.double()
    assert torch.equal(nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))


def test_nms_suppression_chain():
    """Each box suppresses only the next one: greedy keeps every other box (the longest possible
    fixed-point iteration inside a block)."""
    x = torch.arange(1200, dtype=torch.float32)
    boxes = torch.stack([x, torch.zeros_like(x), x + 3, torch.ones_like(x)], 1)  # IoUs 0.5, 0.2
    scores = torch.linspace(1, 0, 1200)
    keep = nms(boxes, scores, 0.3)
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, 0.3))
    assert torch.equal(keep, torch.arange(0, 1200, 2))


@pytest.mark.parametrize("thr", THRESHOLDS)
@pytest.mark.parametrize("num_classes", [1, 3, 40])
def test_batched_nms(thr, num_classes):
    for seed, n in [(0, 0), (1, 1), (2, 60), (3, 1500)]:
        boxes, scores = random_boxes(n, seed, size=100.0 if n < 1000 else 400.0)
        idxs = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))
        keep = batched_nms(boxes, scores, idxs, thr)
        expected = per_class_nms(boxes, scores, idxs, thr)
        assert keep.dtype == torch.int64
        assert set(keep.tolist()) == set(expected.tolist())
        assert torch.equal(keep, expected)
        assert torch.equal(keep, torchvision.ops.batched_nms(boxes, scores, idxs, thr))


@pytest.mark.parametrize("thr", THRESHOLDS)
def test_batched_nms_ties(thr):
    boxes, scores = tie_heavy_boxes(400, 5)
    idxs = torch.randint(-2, 3, (boxes.shape[0],), generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        batched_nms(boxes, scores, idxs, thr), per_class_nms(boxes, scores, idxs, thr)
    )
    # A single class: plain NMS.
    same = torch.zeros_like(idxs)
    assert torch.equal(batched_nms(boxes, scores, same, thr), nms(boxes, scores, thr))


@pytest.mark.parametrize("thr", THRESHOLDS)
@pytest.mark.parametrize("top_k", [-1, 0, 5, 200])
def test_fast_nms(thr, top_k):
    cases = [random_boxes(n, n, size=100.0) for n in (1, 2, 80, 1100)] + [tie_heavy_boxes(300, 1)]
    for num_classes in (1, 4):
        for boxes, scores in cases:
            n = boxes.shape[0]
            idxs = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(n))
            keep = fast_nms(boxes, scores, idxs, thr, top_k)
            assert keep.dtype == torch.int64
            assert torch.equal(keep, reference_fast_nms(boxes, scores, idxs, thr, top_k))
            if top_k == -1:  # Fast NMS suppresses more: a subset of greedy NMS, per class.
                greedy = set(batched_nms(boxes, scores, idxs, thr).tolist())
                assert set(keep.tolist()) <= greedy


@pytest.mark.parametrize("block, chunk", [(64, 16), (50, 7)])
def test_small_blocks(monkeypatch, block, chunk):
    """Many blocks and chunks (and sizes that do not divide each other) on small inputs."""
    monkeypatch.setattr(nms_module, "_BLOCK", block)
    monkeypatch.setattr(nms_module, "_CHUNK", chunk)
    cases = [random_boxes(300, 0), random_boxes(400, 1, size=300.0), tie_heavy_boxes(200, 2)]
    for i, (boxes, scores) in enumerate(cases):
        idxs = torch.randint(0, 6, scores.shape, generator=torch.Generator().manual_seed(i))
        for thr in THRESHOLDS:
            assert torch.equal(nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))
            expected = per_class_nms(boxes, scores, idxs, thr)
            assert torch.equal(batched_nms(boxes, scores, idxs, thr), expected)
            expected = reference_fast_nms(boxes, scores, idxs, thr, 30)
            assert torch.equal(fast_nms(boxes, scores, idxs, thr, 30), expected)


def test_nan_does_not_crash():
    boxes, scores = random_boxes(100, 0)
    boxes[::7, 1] = float("nan")
    scores[::5] = float("nan")
    idxs = torch.zeros(100, dtype=torch.int64)
    for keep in [
        nms(boxes, scores, 0.5),
        batched_nms(boxes, scores, idxs, 0.5),
        fast_nms(boxes, scores, idxs, 0.5),
    ]:
        assert keep.dtype == torch.int64 and len(set(keep.tolist())) == len(keep) <= 100


def test_empty_inputs():
    boxes, scores = torch.zeros(0, 4), torch.zeros(0)
    idxs = torch.zeros(0, dtype=torch.int64)
    for keep in [
        nms(boxes, scores, 0.5),
        batched_nms(boxes, scores, idxs, 0.5),
        fast_nms(boxes, scores, idxs, 0.5),
        fast_nms(boxes, scores, idxs, 0.5, top_k=10),
    ]:
        assert keep.dtype == torch.int64 and keep.shape == (0,)


def test_bad_shapes():
    with pytest.raises(ValueError):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.int64), 0.5)

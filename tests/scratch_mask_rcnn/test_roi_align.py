"""RoIAlign and ROIPooler of scratch_mask_rcnn against torchvision's and detectron2's kernels.

Forward and input gradient must equal ``torchvision.ops.roi_align`` (1e-5 in float32, 1e-10 in
float64) and the multi-level pooler detectron2's ``ROIPooler``.
"""

import math

import pytest
import torch
import torchvision
from detectron2.layers import ROIAlign as D2ROIAlign
from detectron2.modeling import poolers as d2_poolers
from detectron2.structures import Boxes

from scratch_mask_rcnn.poolers import ROIPooler, assign_boxes_to_levels
from scratch_mask_rcnn.roi_align import ROIAlign, bilinear_bags, roi_align, roi_align_bins_exact

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _special_rois(dtype: torch.dtype, scale: float) -> torch.Tensor:
    """RoIs partly and fully outside the map, zero-size and slightly negative-size (image 0/1).

    (torchvision itself crashes on adaptive aligned RoIs of size <= -output_size.)
    """
    s = 1 / scale
    rows = [
        [0, -3 * s, -2 * s, 5 * s, 6 * s],  # partly outside, top-left
        [1, 8 * s, 9 * s, 40 * s, 30 * s],  # partly outside, bottom-right
        [0, -50 * s, -40 * s, -20 * s, -10 * s],  # fully outside
        [1, 30 * s, 30 * s, 60 * s, 50 * s],  # fully outside
        [0, 3 * s, 4 * s, 3 * s, 4 * s],  # zero-size
        [1, 2 * s, 5 * s, 2 * s, 9 * s],  # zero width
        [0, 6 * s, 6 * s, 5.6 * s, 5.5 * s],  # negative size
        [1, -1 * s, -1 * s, 17 * s, 13 * s],  # the whole map and its border
        [0, 0.0, 0.0, 1.0, 1.0],  # tiny
    ]
    return torch.tensor(rows, dtype=dtype)


def _random_rois(n: int, num_images: int, scale: float, dtype: torch.dtype, gen) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * 24 - 4
    wh = torch.rand(n, 2, generator=gen, dtype=dtype) * 20
    batch = torch.randint(0, num_images, (n, 1), generator=gen).to(dtype)
    return torch.cat([batch, (xy) / scale, (xy + wh) / scale], dim=1)


def _check(x, rois, output_size, scale, sampling_ratio, aligned, tol):
    """Forward within ``tol``; input gradient within ``tol`` plus, in float32, 1e-5 relative:
    gradients add up the contributions of many overlapping RoIs (magnitudes of several units),
    in another order than torchvision's."""
    ours = roi_align(x, rois, output_size, scale, sampling_ratio, aligned)
    ref = torchvision.ops.roi_align(x, rois, output_size, scale, sampling_ratio, aligned)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype and ours.is_contiguous()
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
    grad = torch.randn_like(ref)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    rtol = 1e-5 if x.dtype == torch.float32 else 0.0
    torch.testing.assert_close(g_ours, g_ref, rtol=rtol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
def test_roi_align_matches_torchvision(dtype, aligned, sampling_ratio):
    gen = torch.Generator().manual_seed(0)
    for scale, output_size in [(1.0, (7, 7)), (0.25, (14, 14)), (0.5, (3, 5)), (1 / 16, 7)]:
        x = torch.randn(2, 3, 13, 17, dtype=dtype, generator=gen, requires_grad=True)
        rois = torch.cat([_special_rois(dtype, scale), _random_rois(24, 2, scale, dtype, gen)])
        _check(x, rois, output_size, scale, sampling_ratio, aligned, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_exact_bins_are_torchvisions_bit_for_bit(dtype, aligned, sampling_ratio):
    """Every bin, recomputed in torchvision's order, equals its kernel exactly (on CPU), also
    for RoIs outside the map, empty or negative; a subset of bins comes back in its order."""
    gen = torch.Generator().manual_seed(1)
    for scale, output_size in [(1.0, (7, 7)), (0.25, (14, 14)), (0.5, (3, 5))]:
        x = torch.randn(2, 3, 13, 17, dtype=dtype, generator=gen)
        rois = torch.cat([_special_rois(dtype, scale), _random_rois(24, 2, scale, dtype, gen)])
        ph, pw = output_size
        ref = torchvision.ops.roi_align(x, rois, output_size, scale, sampling_ratio, aligned)
        bins = [t.reshape(-1) for t in torch.meshgrid(
            torch.arange(len(rois)), torch.arange(ph), torch.arange(pw), indexing="ij"
        )]  # fmt: skip
        got = roi_align_bins_exact(x, rois, bins, output_size, scale, sampling_ratio, aligned)
        assert got.dtype == dtype
        assert torch.equal(got, ref.permute(0, 2, 3, 1).reshape(-1, 3))
        some = torch.randperm(len(bins[0]), generator=gen)[:10]
        picked = [b[some] for b in bins]
        sub = roi_align_bins_exact(x, rois, picked, output_size, scale, sampling_ratio, aligned)
        assert torch.equal(sub, ref[picked[0], :, picked[1], picked[2]])
    empty = [torch.zeros(0, dtype=torch.long)] * 3
    assert roi_align_bins_exact(x, rois, empty, output_size, scale).shape == (0, 3)


def test_roi_align_boundaries_and_large_rois():
    """Half-pixel RoI coordinates put samples exactly on -1 and H; RoIs much larger than the map
    sample it many times (adaptive grid up to 143 x 143 per bin)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 9, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    coords = torch.randint(-12, 34, (60, 4), generator=gen).to(torch.float64) / 2
    batch = torch.randint(0, 2, (60, 1), generator=gen).to(torch.float64)
    rois = torch.cat([batch, coords], dim=1)
    rois = rois[((rois[:, 3] - rois[:, 1]) > -1) & ((rois[:, 4] - rois[:, 2]) > -1)]
    large = torch.tensor([[1, -400.0, -300.0, 600.0, 700.0], [0, -30.0, 4.0, 1000.0, 9.0]])
    rois = torch.cat([rois, large.to(torch.float64)])
    for aligned in [True, False]:
        for sampling_ratio in [0, 3]:
            _check(x, rois, (2, 3), 1.0, sampling_ratio, aligned, 1e-10)


def test_rois_as_list_and_module():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 10, 12, generator=gen)
    boxes = [_random_rois(5, 1, 0.5, torch.float32, gen)[:, 1:], torch.zeros(0, 4)]
    as_list = roi_align(x, boxes, 5, 0.5, 0, True)
    rois = torch.cat([torch.zeros(5, 1), boxes[0]], dim=1)
    torch.testing.assert_close(as_list, roi_align(x, rois, 5, 0.5, 0, True), rtol=0, atol=0)
    ours = ROIAlign((5, 5), 0.5, 0)
    ref = D2ROIAlign((5, 5), 0.5, 0)
    assert repr(ours) == repr(ref)
    torch.testing.assert_close(ours(x, rois), ref(x, rois), rtol=0, atol=1e-5)


def test_empty_rois_backprop():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for rois in [torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]]:
        out = roi_align(x, rois, (7, 5), 0.5, 0, True)
        assert out.shape == (0, 3, 7, 5)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.shape == x.shape and not grad.any()


def test_degenerate_rois_pool_to_zeros():
    """Non-finite coordinates, bad batch indices and absurdly large RoIs: zeros, no crash, and
    the normal RoI among them unaffected; a huge RoI costs no more entries than the map."""
    x = torch.randn(2, 3, 16, 20, requires_grad=True)
    nan, inf = float("nan"), float("inf")
    rois = torch.tensor(
        [
            [0, nan, 1, 5, 5],
            [1, 0, 0, inf, 5],
            [0, -3e38, -3e38, 3e38, 3e38],  # finite corners, infinite size
            [0, 1e30, 1, 1e30 + 5, 5],
            [nan, 1, 1, 5, 5],
            [2, 1, 1, 5, 5],
            [-1, 1, 1, 5, 5],
            [0, 1, 1, 5, 5],
        ]
    )
    out = roi_align(x, rois, 7, 1.0, 0, True)
    assert torch.isfinite(out).all()
    assert not out[:-1].any()
    ref = torchvision.ops.roi_align(x, rois[-1:], 7, 1.0, 0, True)
    torch.testing.assert_close(out[-1:], ref, rtol=0, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()

    huge = torch.tensor([[-1e6, -1e6, 1e6, 1e6]])
    one = torch.ones(1, dtype=torch.long)
    bags = bilinear_bags(huge, 1.0, 16 * one, 20 * one, 0 * one, 7, 0, True)
    assert bags.idx.numel() <= 4 * (16 + 2 * 7 + 4) * (20 + 2 * 7 + 4)
    assert int(bags.idx.min()) >= 0 and int(bags.idx.max()) < 16 * 20


def test_gradcheck():
    x = torch.randn(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.3, 0.7, 4.2, 3.1], [1, -1.2, 2.0, 3.3, 6.2], [1, 2.5, 1.5, 2.5, 4.0]],
        dtype=torch.float64,
    )
    for aligned, sampling_ratio in [(True, 0), (False, 2)]:
        assert torch.autograd.gradcheck(
            lambda f: roi_align(f, rois, (3, 2), 0.9, sampling_ratio, aligned), (x,)
        )


def _fpn(num_images: int, gen, channels: int = 4, image_size=(224, 320)):
    return [
        torch.randn(
            num_images,
            channels,
            math.ceil(image_size[0] * s),
            math.ceil(image_size[1] * s),
            generator=gen,
            requires_grad=True,
        )
        for s in SCALES
    ]


def _boxes(n: int, gen, image_size=(224, 320)) -> torch.Tensor:
    """Boxes of sizes 2..400 px (all levels), some leaving the image."""
    size = torch.exp(torch.rand(n, 2, generator=gen) * math.log(200)) * 2
    ctr = torch.rand(n, 2, generator=gen) * torch.tensor([image_size[1], image_size[0]])
    return torch.cat([ctr - size / 2, ctr + size / 2], dim=1)


@pytest.mark.parametrize("counts", [(40, 25), (0, 30), (30, 0), (0, 0)])
@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign"])
def test_pooler_matches_detectron2(counts, pooler_type):
    gen = torch.Generator().manual_seed(sum(counts))
    x = _fpn(2, gen)
    boxes = [_boxes(n, gen) for n in counts]
    ours = ROIPooler(7, SCALES, 0, pooler_type)
    ref = d2_poolers.ROIPooler(7, SCALES, 0, pooler_type)
    out = ours(x, boxes)
    expected = ref(x, [Boxes(b) for b in boxes])
    assert out.shape == expected.shape == (sum(counts), 4, 7, 7)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours(x, [Boxes(b) for b in boxes]), out, rtol=0, atol=0)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, x, grad)
    expected_grads = torch.autograd.grad(expected, x, grad, allow_unused=True)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=0, atol=1e-5)


def test_single_level_pooler_and_sampling_ratio():
    gen = torch.Generator().manual_seed(3)
    x = _fpn(2, gen)
    boxes = [_boxes(20, gen), _boxes(7, gen)]
    for scales, feats in [(SCALES[:1], x[:1]), (SCALES, x)]:
        ours = ROIPooler(14, scales, 2, "ROIAlignV2")(feats, boxes)
        ref = d2_poolers.ROIPooler(14, scales, 2, "ROIAlignV2")(feats, [Boxes(b) for b in boxes])
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_assign_boxes_to_levels_matches_detectron2():
    gen = torch.Generator().manual_seed(4)
    boxes = [_boxes(300, gen), torch.zeros(0, 4), _boxes(50, gen)]
    boxes[2][:5, 2:] = boxes[2][:5, :2]  # zero-size boxes
    for args in [(2, 5, 224, 4), (3, 6, 160, 5)]:
        ours = assign_boxes_to_levels(boxes, *args)
        ref = d2_poolers.assign_boxes_to_levels([Boxes(b) for b in boxes], *args)
        assert ours.dtype == torch.int64 and torch.equal(ours, ref)


def test_pooler_errors():
    with pytest.raises(ValueError, match="MODEL.ROI_BOX_HEAD.POOLER_TYPE"):
        ROIPooler(7, SCALES, 0, "ROIPool")
    with pytest.raises(ValueError, match="MODEL.ROI_BOX_HEAD.POOLER_TYPE"):
        ROIPooler(7, SCALES, 0, "ROIAlignRotated")
    with pytest.raises(ValueError, match="pyramid"):
        ROIPooler(7, [1 / 4, 1 / 16], 0, "ROIAlignV2")
    pooler = ROIPooler(7, SCALES, 0, "ROIAlignV2")
    x = _fpn(2, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="4 scales but got 3 feature maps"):
        pooler(x[:3], [torch.zeros(0, 4)] * 2)
    with pytest.raises(ValueError, match="3 box lists for a batch of 2"):
        pooler(x, [torch.zeros(0, 4)] * 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_torchvision():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 13, 17, generator=gen).cuda().requires_grad_()
    rois = torch.cat(
        [_special_rois(torch.float32, 0.5), _random_rois(30, 2, 0.5, torch.float32, gen)]
    )
    _check(x, rois.cuda(), (7, 7), 0.5, 0, True, 1e-5)
    feats = [f.detach().cuda() for f in _fpn(2, gen)]
    boxes = [_boxes(20, gen).cuda(), _boxes(9, gen).cuda()]
    ours = ROIPooler(7, SCALES, 0, "ROIAlignV2")(feats, boxes)
    ref = d2_poolers.ROIPooler(7, SCALES, 0, "ROIAlignV2")(feats, [Boxes(b) for b in boxes])
    assert ours.device == feats[0].device
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)

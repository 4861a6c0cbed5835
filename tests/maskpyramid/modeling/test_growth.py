"""growth.py: resampling by cell centres, windows, peaks, coverage, pruning and caps."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ROIAlign

from maskpyramid.modeling import growth as G


def test_resample_exact_double_matches_interpolate():
    x = torch.randn(3, 5, 7)
    up = G.resample_to_grid(x, 16, (10, 14), 8)
    ref = F.interpolate(x[:, None], size=(10, 14), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up, ref)


def test_resample_uses_centres_when_sizes_are_not_multiples():
    # a p6 grid of ceil(5/2) = 3 cells over a p5 grid of 5: cell k of p5 is centred at 32 (k+.5)
    x = torch.arange(3.0).view(1, 1, 3).expand(1, 3, 3).contiguous()
    up = G.resample_to_grid(x, 64, (5, 5), 32)
    # p5 centres 16, 48, 80, 112, 144 -> p6 coordinates (x / 64 - 0.5): clamp, .25, .75, 1.25, 1.75
    torch.testing.assert_close(up[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75]))


def test_paste_windows_places_values_inside_the_box_only():
    win = torch.ones(1, 4, 4) * 5
    boxes = torch.tensor([[16.0, 8.0, 48.0, 24.0]])
    out = G.paste_windows(win, boxes, (4, 8), 8, -1.0)
    expect = torch.full((4, 8), -1.0)
    expect[1:3, 2:6] = 5  # centres 12, 20 in y; 20..44 in x
    torch.testing.assert_close(out[0], expect)


def test_paste_reproduces_a_window_pooled_at_native_resolution():
    from detectron2.layers import ROIAlign

    level = torch.randn(1, 1, 8, 8)
    box = torch.tensor([[0, 16.0, 8.0, 48.0, 40.0]])  # 4 x 4 cells at stride 8
    pooled = ROIAlign((4, 4), 1 / 8, 0, aligned=True)(level, box)
    out = G.paste_windows(pooled[:, 0], box[:, 1:], (8, 8), 8, level[:, 0])
    torch.testing.assert_close(out, level[:, 0])


def test_support_boxes_and_empty_maps():
    p = torch.zeros(2, 6, 6)
    p[0, 2:4, 1:3] = 0.9
    limits = torch.tensor([[0.0, 0, 48, 48]] * 2)
    boxes, nonempty = G.support_boxes(p, 8, 0.05, 1, limits)
    assert nonempty.tolist() == [True, False]
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 8, 32, 40]))


@pytest.mark.parametrize("shape", [(7, 9, 13), (0, 5, 5), (2, 1, 1)])
def test_mask_extents_and_support_boxes_match_the_cells_of_each_mask(shape):
    """The extents (by rows' and columns' maxima) are the first and one past the last row and
    column with a cell, 0 for empty masks; support_boxes takes the cells above eps."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(shape, generator=gen) ** 6
    if shape[0]:
        probs[0] = 0.0  # one empty map
    masks = probs > 0.3
    boxes, nonempty = G.mask_extents(masks)
    want = torch.zeros(shape[0], 4, dtype=torch.long)
    for i, m in enumerate(masks):
        ys, xs = m.nonzero(as_tuple=True)
        if len(ys):
            want[i] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert torch.equal(boxes, want)
    assert nonempty.tolist() == [bool(m.any()) for m in masks]
    limits = torch.tensor([[0.0, 0.0, 1e4, 1e4]]).expand(shape[0], 4)
    sboxes, snonempty = G.support_boxes(probs, 4, 0.3, 0, limits)
    assert torch.equal(snonempty, nonempty)
    torch.testing.assert_close(sboxes, want.float() * 4 * nonempty[:, None])


def test_tight_boxes_are_the_masks_cells_on_their_boxes_and_empty_masks_keep_theirs():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1:3, 2] = True  # rows 1-2, column 2 of a 4x4 grid on a 40 x 20 box
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 8.0, 8.0]])
    out = G.tight_boxes(masks, boxes)
    torch.testing.assert_close(out, torch.tensor([[30.0, 25.0, 40.0, 35.0], [0.0, 0, 8, 8]]))


def test_centred_boxes_stay_inside_and_shrink_to_small_images():
    c = torch.tensor([[2.0, 2.0], [30.0, 10.0]])
    lim = torch.tensor([[0.0, 0, 64, 64], [0.0, 0, 20, 20]])
    b = G.centred_boxes(c, torch.tensor([32.0, 32.0]), lim)
    torch.testing.assert_close(b, torch.tensor([[0.0, 0, 32, 32], [0.0, 0, 20, 20]]))


def test_jitter_boxes_move_the_centre_and_scale_the_sides_within_the_jitter():
    torch.manual_seed(0)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0]]).repeat(2000, 1)
    torch.testing.assert_close(G.jitter_boxes(boxes, 0.0), boxes)
    out = G.jitter_boxes(boxes, 0.1)
    wh, side = out[:, 2:] - out[:, :2], torch.tensor([40.0, 20.0])
    shift = ((out[:, :2] + out[:, 2:]) / 2 - torch.tensor([30.0, 30.0])) / side
    assert shift.abs().max() <= 0.1 + 1e-5 and shift.abs().max() > 0.09
    scale = (wh / side).log()
    assert scale.abs().max() <= 0.1 + 1e-5 and scale.abs().max() > 0.09
    assert len(out.unique(dim=0)) == len(out)  # each copy its own


def test_local_peaks():
    s = torch.zeros(1, 5, 5)
    s[0, 1, 1] = 0.5
    s[0, 3, 3] = 0.04
    s[0, 1, 2] = 0.3
    assert G.local_peaks(s, 0.05).nonzero().tolist() == [[0, 1, 1]]


def test_rank_within_group_and_caps():
    group = torch.tensor([1, 0, 1, 1, 0])
    key = torch.tensor([0.1, 0.9, 0.7, 0.3, 0.2])
    assert G.rank_within_group(group, key).tolist() == [2, 0, 0, 1, 1]
    assert G.cap_per_image(group, key, 2).tolist() == [False, True, True, True, True]


def test_topk_survivors_prunes_pyramids_that_win_no_pixel():
    probs = torch.zeros(4, 2, 2)
    probs[0] = 0.9
    probs[1] = 0.8
    probs[2] = 0.7  # third everywhere: survives with k=3, pruned with k=2
    probs[3] = 0.1  # below LOW_THRESHOLD everywhere: pruned whatever k
    batch = torch.zeros(4, dtype=torch.long)
    assert G.topk_survivors(probs, batch, 1, 0.2, 3).tolist() == [True, True, True, False]
    assert G.topk_survivors(probs, batch, 1, 0.2, 2).tolist() == [True, True, False, False]
    # pyramids of different images never compete
    assert G.topk_survivors(probs, torch.tensor([0, 0, 1, 1]), 2, 0.2, 1).tolist() == [
        True,
        False,
        True,
        False,
    ]


def test_valid_cells_cover_images_smaller_than_a_cell():
    v = G.valid_cells([(20, 70)], 64, 1, 2, "cpu")
    assert v.tolist() == [[[True, True]]]


def _pyramids(n, **fields):
    """A set of ``n`` pyramids on a 2x2 grid, random where it matters."""
    defaults = dict(
        batch=torch.arange(n), roots=torch.randn(n, 2), root_level=torch.zeros(n, dtype=torch.long),
        root_stride=torch.ones(n), logits=torch.randn(n, 2, 2), cls_logits=torch.randn(n, 4),
        scores=torch.rand(n), classes=torch.zeros(n, dtype=torch.long),
        target=torch.full((n,), -1), pseudo=torch.zeros(n, dtype=torch.bool),
        territory=torch.rand(n, 2, 2) > 0.5,
    )  # fmt: skip
    return G.Pyramids(**{**defaults, **fields})


def test_pyramids_index_and_cat():
    p = _pyramids(3)
    q = G.Pyramids.cat([p[torch.tensor([True, False, True])], p[1:2]])
    assert q.batch.tolist() == [0, 2, 1] and q.hidden is None and len(q) == 3


def test_pyramids_boolean_index_is_one_synchronisation():
    """A boolean index selects the same pyramids as their indices, with one nonzero for all fields
    (each boolean index of a CUDA tensor waits for the GPU)."""
    from torch.overrides import TorchFunctionMode

    n = 4
    p = _pyramids(n, iou_logits=torch.randn(n))
    keep = torch.tensor([True, False, True, True])
    calls = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            index = args[1] if len(args) > 1 else None
            if func.__name__ == "nonzero" or (
                func.__name__ == "__getitem__"
                and isinstance(index, torch.Tensor)
                and index.dtype == torch.bool
            ):
                calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Spy():
        q = p[keep]
    assert calls == ["nonzero"]
    r = p[torch.tensor([0, 2, 3])]
    for f in ("batch", "roots", "logits", "cls_logits", "territory", "iou_logits", "pseudo"):
        assert torch.equal(getattr(q, f), getattr(r, f)), f
    assert q.hidden is None and len(p[torch.zeros(n, dtype=torch.bool)]) == 0


def _window_rois(counts, height, width, scale, seed):
    """(K, 5) ROIAlign rows of images with ``counts`` boxes each: inside the map, straddling its
    border, more than a cell beyond it, and of zero width."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(counts):
        size = torch.tensor([width, height], dtype=torch.float64) / scale
        xy = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2) * size
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * size * 0.6
        boxes = torch.cat([xy, xy + wh], 1)
        if n > 2:
            boxes[0, 2] = boxes[0, 0]
            boxes[1] = torch.tensor([-30.0, -30.0, -20.0, 10.0])
        rows.append(torch.cat([torch.full((n, 1), float(b), dtype=torch.float64), boxes], 1))
    return torch.cat(rows)


@pytest.mark.parametrize("counts", [[7], [5, 0, 9], [1, 1]])
def test_pool_windows_equals_roi_align_with_one_sample_per_bin_and_its_gradient(counts):
    maps = torch.randn(len(counts), 6, 13, 17, dtype=torch.float64, requires_grad=True)
    rois = _window_rois(counts, 13, 17, 0.25, seed=len(counts))
    ref = ROIAlign((5, 5), 0.25, 1, aligned=True)(maps, rois)
    out = G.pool_windows(maps, rois[:, 1:], rois[:, 0].long(), 5, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    weights = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), maps)
    (g_out,) = torch.autograd.grad((out * weights).sum(), maps)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-9, atol=1e-9)


def test_pool_windows_one_box_per_map_and_no_boxes():
    maps = torch.randn(4, 2, 9, 9, dtype=torch.float64)
    rois = _window_rois([4], 9, 9, 0.5, seed=0)
    rois[:, 0] = torch.arange(4.0)
    ref = ROIAlign((4, 4), 0.5, 1, aligned=True)(maps, rois)
    torch.testing.assert_close(G.pool_windows(maps, rois[:, 1:], None, 4, 0.5), ref)
    with pytest.raises(ValueError, match="3 boxes for 4 maps"):
        G.pool_windows(maps, rois[:3, 1:], None, 4, 0.5)
    assert G.pool_windows(maps, rois[:0, 1:], None, 4, 0.5).shape == (0, 2, 4, 4)

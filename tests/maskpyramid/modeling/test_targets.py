"""targets.py: per-level masks by cell area, level assignment, positive roots, ties."""

import math

import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances

from maskpyramid.modeling.targets import (
    TargetParams,
    feature_strides,
    prepare_pyramid_targets,
    resample_masks,
)

PARAMS = TargetParams(strides=(32, 16, 8), size_ranges=((32, math.inf), (16, 32), (0, 16)))


def _instances(masks, size=(64, 64)):
    inst = Instances(size)
    m = torch.stack(masks) if masks else torch.zeros(0, *size, dtype=torch.bool)
    inst.gt_masks = BitMasks(m)
    inst.gt_boxes = Boxes(BitMasks(m).get_bounding_boxes().tensor if len(m) else torch.zeros(0, 4))
    inst.gt_classes = torch.zeros(len(m), dtype=torch.long)
    return inst


def _rect(y0, y1, x0, x1, size=(64, 64)):
    m = torch.zeros(size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_feature_strides():
    assert feature_strides(["p6", "p5", "p3"]) == [64, 32, 8]
    with pytest.raises(ValueError, match="IN_FEATURES"):
        feature_strides(["res5"])
    with pytest.raises(ValueError, match="coarse to fine"):
        feature_strides(["p3", "p4"])


def test_resample_is_the_cell_area_fraction_by_centre():
    m = _rect(0, 4, 0, 12)[None]
    lv = resample_masks(m, (8, 4))
    assert lv[0].shape == (1, 8, 8) and lv[1].shape == (1, 16, 16)
    assert lv[0][0, 0, :2].tolist() == [0.5, 0.25]  # 8x8 cells: 32 / 64 and 16 / 64 pixels
    assert lv[1][0, 0, :4].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_resample_pads_images_that_are_not_multiples():
    lv = resample_masks(torch.ones(1, 20, 30, dtype=torch.bool), (16, 8))
    assert lv[0].shape == (1, 2, 2) and lv[1].shape == (1, 3, 4)
    assert lv[0][0, 1, 1] == pytest.approx(4 * 14 / 256)


def test_levels_by_size_and_centre_positives():
    big, small = _rect(8, 56, 8, 56), _rect(0, 8, 0, 8)
    t = prepare_pyramid_targets(_instances([big, small]), PARAMS)
    assert t["levels"].tolist() == [0, 2]
    pos0 = t["positives"][0]
    assert (pos0 == 0).sum() >= 1 and (pos0 == 1).sum() == 0
    # the small one's centre (4, 4) is in cell (0, 0) of stride 8; centre radius 1.5 cells
    assert t["positives"][2][0, 0] == 1
    assert (t["positives"][1] >= 0).sum() == 0
    assert t["masks"][2].dtype == torch.float16 and t["masks"][2].shape == (2, 8, 8)


def test_ties_go_to_the_smaller_instance():
    big, inner = _rect(0, 20, 0, 20), _rect(8, 13, 8, 13)
    params = TargetParams(strides=(8,), size_ranges=((0, math.inf),), center_radius=3)
    t = prepare_pyramid_targets(_instances([big, inner]), params)
    assert t["positives"][0][1, 1] == 1  # in both regions: the smaller instance's


def test_mask_mode_and_one_positive_per_level():
    big = _rect(8, 56, 8, 56)  # on 16-pixel cells: 4 inner cells full, 8 edge cells half full
    p_mask = TargetParams(strides=(16,), size_ranges=((0, math.inf),), assign_mode="mask")
    assert (prepare_pyramid_targets(_instances([big]), p_mask)["positives"][0] == 0).sum() == 12
    p_one = TargetParams(
        strides=(16,), size_ranges=((0, math.inf),), assign_mode="mask", one_positive=True
    )
    assert (prepare_pyramid_targets(_instances([big]), p_one)["positives"][0] == 0).sum() == 1


def test_atss_gives_every_instance_a_positive():
    masks = [_rect(8, 56, 8, 56), _rect(0, 6, 0, 6), _rect(40, 50, 2, 30)]
    params = TargetParams(strides=(32, 16, 8), size_ranges=((0, 1),) * 3, assign_mode="atss")
    t = prepare_pyramid_targets(_instances(masks), params)
    assert (t["levels"] >= 0).all()
    assert t["levels"][0] <= t["levels"][1]  # the large one is not rooted finer than the tiny one


def test_empty_image_and_empty_mask():
    t = prepare_pyramid_targets(_instances([]), PARAMS)
    assert t["levels"].shape == (0,) and all((p == -1).all() for p in t["positives"])
    t = prepare_pyramid_targets(_instances([torch.zeros(64, 64, dtype=torch.bool)]), PARAMS)
    assert t["levels"].tolist() == [-1] and all((p == -1).all() for p in t["positives"])


def test_polygon_masks_are_rasterised():
    from detectron2.structures import PolygonMasks

    inst = Instances((64, 64))
    inst.gt_masks = PolygonMasks([[[8, 8, 56, 8, 56, 56, 8, 56]]])
    inst.gt_classes = torch.zeros(1, dtype=torch.long)
    t = prepare_pyramid_targets(inst, PARAMS)
    assert t["levels"].tolist() == [0] and t["masks"][0].float().sum() > 2


def test_center_positives_lie_on_their_own_instance():
    # an L whose centre-region cells (16-pixel cells, radius 1.5) partly lie off it, and a small
    # square sitting in the L's empty corner
    ell = _rect(8, 56, 8, 24) | _rect(40, 56, 8, 56)
    other = _rect(12, 36, 30, 54)
    params = TargetParams(strides=(16,), size_ranges=((0, math.inf),), center_radius=1.5)
    off = TargetParams(
        strides=(16,), size_ranges=((0, math.inf),), center_radius=1.5, center_in_mask=False
    )
    masks = torch.stack([ell, other])
    for p, only_own in ((params, True), (off, False)):
        pos = prepare_pyramid_targets(_instances([ell, other]), p)["positives"][0]
        i, j = (pos >= 0).nonzero(as_tuple=True)
        on_own = masks[pos[i, j], (i * 16 + 8), (j * 16 + 8)]
        assert on_own.all() == only_own
        assert (pos == 0).any() and (pos == 1).any()


def test_a_ring_is_rooted_on_the_ring_not_in_its_hole():
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    r = ((yy - 32) ** 2 + (xx - 32) ** 2).sqrt()
    ring = (r >= 18) & (r < 26)
    params = TargetParams(strides=(8,), size_ranges=((0, math.inf),), center_radius=1.5)
    pos = prepare_pyramid_targets(_instances([ring]), params)["positives"][0]
    i, j = (pos == 0).nonzero(as_tuple=True)
    assert len(i) >= 1
    assert ring[i * 8 + 4, j * 8 + 4].all()
    off = TargetParams(
        strides=(8,), size_ranges=((0, math.inf),), center_radius=1.5, center_in_mask=False
    )
    pos_off = prepare_pyramid_targets(_instances([ring]), off)["positives"][0]
    i, j = (pos_off == 0).nonzero(as_tuple=True)
    assert not ring[i * 8 + 4, j * 8 + 4].any()  # without it: the cells around the hole's centre


def test_with_fill_holes_a_ring_is_rooted_at_its_centre_but_not_on_what_its_hole_shows():
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    r = ((yy - 32) ** 2 + (xx - 32) ** 2).sqrt()
    ring = (r >= 18) & (r < 26)
    params = TargetParams(
        strides=(8,), size_ranges=((0, math.inf),), center_radius=1.5, center_fill_holes=True
    )
    pos = prepare_pyramid_targets(_instances([ring]), params)["positives"][0]
    assert pos[3:5, 3:5].eq(0).all()  # the four cells around the centre (32, 32), in the hole
    assert not ring[32, 32]
    # a small square seen through the hole, behind the ring: its cells stay its own
    seen = _rect(26, 38, 26, 38) & ~ring
    pos = prepare_pyramid_targets(_instances([ring, seen]), params)["positives"][0]
    i, j = (pos == 0).nonzero(as_tuple=True)
    assert len(i) >= 1 and not seen[i * 8 + 4, j * 8 + 4].any()
    assert (pos == 1).any()


def test_root_regions_fill_holes_less_the_other_instances():
    from maskpyramid.modeling.targets import root_regions

    frame = _rect(8, 40, 8, 40) & ~_rect(16, 32, 16, 32)
    inner = _rect(20, 28, 20, 28)
    regions = root_regions(torch.stack([frame, inner]))
    assert regions[0].sum() == 32 * 32 - 8 * 8 and not (regions[0] & inner).any()
    assert torch.equal(regions[1], inner)
    assert root_regions(torch.zeros(0, 64, 64, dtype=torch.bool)).shape == (0, 64, 64)

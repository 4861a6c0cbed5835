"""MaskPyramid end to end: every ablation knob trains a step and infers; bad input.

Each knob runs through the real data path (tiny `shapes`, the MaskPyramid mapper) for one
training step and one inference step (score threshold 0, so that painting, NMS and the boxes see
pyramids even from an untrained model).
"""

import math

import pytest
import torch
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from maskpyramid.engine.trainer import Trainer
from maskpyramid.modeling import meta_arch
from maskpyramid.modeling.growth import local_peaks
from maskpyramid.modeling.targets import TargetParams, prepare_pyramid_targets

CONFIG = "configs/shapes/mask_pyramid_R_18_FPN.yaml"
TINY = [
    "MODEL.MASK_PYRAMID.SIZE_RANGES", [[48, 100000], [24, 48], [12, 24], [0, 12]],
    "MODEL.MASK_PYRAMID.HEAD_CHANNELS", 16, "MODEL.MASK_PYRAMID.WINDOW_SIZE", 8,
    "MODEL.FPN.OUT_CHANNELS", 32,
    # single images below the coarsest stride: BatchNorm cannot train on one 1x1 map
    "MODEL.RESNETS.NORM", "FrozenBN",
    # the refinement's tests start from the union box without instance-box rows; the shapes
    # config's REFINE_BOX "regressed" and REFINE_GT_BOXES 2 have knobs and tests of their own
    "MODEL.MASK_PYRAMID.REFINE_BOX", "union", "MODEL.MASK_PYRAMID.REFINE_GT_BOXES", 0,
]  # fmt: skip


def mp(**keys):
    """MODEL.MASK_PYRAMID options as a merge_from_list list."""
    return [x for k, v in keys.items() for x in (f"MODEL.MASK_PYRAMID.{k}", v)]


KNOBS = {
    "default": mp(),
    "init_convs_4": mp(INIT_CONVS=4),
    "spawn_uncovered": mp(SPAWN_MODE="uncovered"),
    "spawn_both_pseudo_0": mp(SPAWN_MODE="both", PSEUDO_WEIGHT=0.0),
    "growth_off": mp(GROWTH=False),
    "score_maskiou": mp(SCORE_MODE="maskiou"),
    "class_pooled": mp(CLASS_HEAD="pooled"),
    "class_pooled_background": mp(CLASS_HEAD="pooled", CLASS_BACKGROUND=True),
    "classes_per_pyramid_1": mp(CLASSES_PER_PYRAMID=1),
    "class_negative_roots": mp(CLASS_HEAD="pooled", CLASS_BACKGROUND=True, CLASS_NEGATIVE_ROOTS=4),
    "readout_p2": mp(READOUT_FEATURES=["p2"]),
    "readout_p2_growth_off": mp(READOUT_FEATURES=["p2"], GROWTH=False),
    "readout_p2_shared_pooled": mp(
        READOUT_FEATURES=["p2"], HEAD_SHARING="shared", CLASS_HEAD="pooled"
    ),
    "class_pooled_maskiou_p3_p5": mp(
        CLASS_HEAD="pooled", SCORE_MODE="maskiou", CLASS_POOL_FEATURES=["p3", "p4", "p5"]
    ),
    "loss_bce": mp(MASK_LOSS="bce"),
    "no_feature_convs": mp(FEATURE_CONVS=0),
    "tower_channels_8": mp(TOWER_CHANNELS=8),
    "refine_14": mp(REFINE_RESOLUTION=14, REFINE_CHANNELS=8, REFINE_CONVS=2),
    "refine_p3_p4_no_cap": mp(
        REFINE_RESOLUTION=8, REFINE_FEATURES=["p3", "p4"], REFINE_MAX_PER_IMAGE=0
    ),
    "refine_score_thresh": mp(REFINE_RESOLUTION=8, REFINE_SCORE_THRESH=0.5),
    "refine_residual_positives_only": mp(
        REFINE_RESOLUTION=8, REFINE_RESIDUAL=True, REFINE_OVERLAPPING=False
    ),
    "loss_l1": mp(MASK_LOSS="l1"),
    "loss_l2": mp(MASK_LOSS="l2"),
    "nms_mask": mp(NMS="mask"),
    "nms_fast": mp(NMS="fast"),
    "nms_matrix": mp(NMS="matrix"),
    "nms_masks_output": mp(REFINE_RESOLUTION=8, NMS="matrix", NMS_MASKS="output"),
    "refine_box_regression": mp(
        REFINE_RESOLUTION=8,
        CLASS_HEAD="pooled",
        CLASS_BACKGROUND=True,
        CLASS_NEGATIVE_ROOTS=4,
        REFINE_BOX_REGRESSION=True,
    ),
    "refine_class_specific": mp(
        REFINE_RESOLUTION=8,
        CLASS_HEAD="pooled",
        CLASS_BACKGROUND=True,
        REFINE_BOX_REGRESSION=True,
        REFINE_CLASS_SPECIFIC=True,
        REFINE_RESIDUAL=False,
    ),
    "refine_class_specific_residual": mp(REFINE_RESOLUTION=8, REFINE_CLASS_SPECIFIC=True),
    "refine_gt_boxes": mp(REFINE_RESOLUTION=8, REFINE_GT_BOXES=2, REFINE_GT_JITTER=0.2),
    "refine_passes": mp(REFINE_RESOLUTION=8, REFINE_PASSES=2, REFINE_PASS_MIN_SIZE=0),
    "refine_pass_min_size": mp(REFINE_RESOLUTION=8, REFINE_PASSES=2, REFINE_PASS_MIN_SIZE=16),
    "refine_box_regressed": mp(
        REFINE_RESOLUTION=8,
        CLASS_HEAD="pooled",
        CLASS_BACKGROUND=True,
        REFINE_BOX_REGRESSION=True,
        REFINE_BOX="regressed",
        REFINE_GT_BOXES=1,
    ),
    "box_reg_own": mp(
        REFINE_RESOLUTION=8,
        CLASS_HEAD="pooled",
        CLASS_BACKGROUND=True,
        REFINE_BOX_REGRESSION=True,
        BOX_REG_HEAD="own",
        BOX_REG_CONTEXT=0.5,
        REFINE_BOX="regressed",
    ),
    "pool_sampling_2": mp(
        REFINE_RESOLUTION=8, CLASS_POOL_SAMPLING_RATIO=2, REFINE_SAMPLING_RATIO=2
    ),
    "extra_channels_2": mp(EXTRA_CHANNELS=2),
    "extra_channels_3": mp(EXTRA_CHANNELS=3, SPAWN_MODE="both"),
    "start_grid_2x4": mp(START_GRID=[2, 4]),
    "first_level_peaks": mp(FIRST_LEVEL_ROOTS="peaks"),
    "peak_threshold_test": mp(PEAK_THRESHOLD_TEST=0.5),
    "readout_test_off": mp(READOUT_TEST=False),
    "readout_grow_max_size": mp(READOUT_GROW_MAX_SIZE=24),
    "low_threshold": mp(LOW_THRESHOLD=0.4),
    "topk_keep_1": mp(TOPK_KEEP=1),
    "heads_shared": mp(HEAD_SHARING="shared"),
    "class_specific": mp(CLASS_SPECIFIC_MASKS=True),
    "drown": mp(DROWN_WEIGHT=2.0),
    "territory": mp(TERRITORY_WEIGHT=1.0, SPAWN_MODE="uncovered"),
    "grow_skip": mp(GROW_SKIP=True),
    "assign_mask": mp(ASSIGN_MODE="mask"),
    "assign_atss": mp(ASSIGN_MODE="atss"),
    "center_anywhere_in_box": mp(CENTER_IN_MASK=False),
    "center_fill_holes": mp(CENTER_FILL_HOLES=True),
    "one_positive": mp(ONE_POSITIVE_PER_LEVEL=True),
    "sem_seg": mp(SEM_SEG_LOSS_WEIGHT=1.0),
    "position_multiply": mp(POSITION_MODE="multiply"),
    "rho_2": mp(POSITION_RHO=2.0),
    "window_sampling_2": mp(WINDOW_SAMPLING_RATIO=2),
    "offsets": mp(POSITION_OFFSETS=8.0, EXTRA_CHANNELS=3),
    "no_logit_clamp": mp(LOGIT_CLAMP=0.0),
    # one value per level: p6 p5 p4 p3 and the read-out p2
    "level_weights": mp(LEVEL_LOSS_WEIGHTS=[2.0, 1.0, 1.0, 0.5, 0.5]),
    "staged": mp(STAGE_ITERS=[0, 0, 5, 10, 12]),
    "painted_no_dedup": mp(PAINTED_OUTPUT=True, MIN_KEPT_FRACTION=0.0),
    "caps": mp(MAX_PYRAMIDS=2, MAX_PSEUDO=1, SPAWN_MODE="both"),
}


@pytest.fixture
def mp_cfg(make_cfg):
    def make(*opts):
        return make_cfg(*(TINY + list(opts)), config_file=CONFIG)

    return make


def _one_batch(cfg):
    loader = build_detection_train_loader(cfg, mapper=Trainer.build_train_mapper(cfg))
    return next(iter(loader))


def _capture_records(model):
    records = []
    grow = model.grow

    def wrapped(*args, **kwargs):
        out = grow(*args, **kwargs)
        records.append(out)
        return out

    model.grow = wrapped
    return records


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_knob_trains_and_infers(mp_cfg, knob):
    cfg = mp_cfg(*KNOBS[knob], "MODEL.MASK_PYRAMID.SCORE_THRESH_TEST", 0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    data = _one_batch(cfg)
    records = _capture_records(model)
    with EventStorage(0):
        losses = model(data)
    total = sum(losses.values())
    assert torch.isfinite(total) and total.requires_grad
    total.backward()
    assert all(k.startswith("loss_") for k in losses)
    if "growth_off" not in knob and knob != "staged":  # staged: p4 and p3 start later
        for name in ("p6", "p5", "p4", "p3"):
            assert f"loss_mask_{name}" in losses  # level losses reported separately
    if "readout_p2" in knob:
        assert "loss_mask_p2" in losses
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(data)
    assert len(out) == len(data)
    for x, o in zip(data, out):
        inst = o["instances"]
        assert inst.image_size == (x["height"], x["width"])
        assert inst.pred_masks.shape[1:] == inst.image_size
        assert inst.pred_boxes.tensor.shape == (len(inst), 4)
        assert (inst.pred_classes < cfg.MODEL.MASK_PYRAMID.NUM_CLASSES).all()
    final = records[-1][-1].pyramids
    per_image = torch.bincount(final.batch, minlength=len(data))
    assert (per_image <= cfg.MODEL.MASK_PYRAMID.MAX_PYRAMIDS).all()


def test_staged_training_switches_levels_on_by_iteration(mp_cfg):
    cfg = mp_cfg("MODEL.MASK_PYRAMID.STAGE_ITERS", [0, 0, 5, 10, 12])
    model = build_model(cfg)
    data = _one_batch(cfg)
    with EventStorage(0):
        assert set(model(data)) >= {"loss_mask_p6", "loss_mask_p5"}
        assert "loss_mask_p4" not in model(data)
    with EventStorage(7):
        assert "loss_mask_p4" in model(data) and "loss_mask_p3" not in model(data)
    with EventStorage(10):
        losses = model(data)
        assert "loss_mask_p3" in losses and "loss_mask_p2" not in losses
    with EventStorage(12):
        assert "loss_mask_p2" in model(data)


def test_positives_are_never_pruned_in_training(mp_cfg):
    cfg = mp_cfg("MODEL.MASK_PYRAMID.LOW_THRESHOLD", 1.0)  # nothing wins a pixel: prune all
    model = build_model(cfg)
    data = _one_batch(cfg)
    records = _capture_records(model)
    with EventStorage(0):
        model(data)
    n_pos = sum(int((x["pyramid_targets"]["levels"] >= 0).sum()) for x in data)
    last = records[0][-1].pyramids
    assert (last.target >= 0).all() and len(last.target.unique()) == n_pos


def test_readout_level_grows_the_pyramids_without_spawning(mp_cfg):
    cfg = mp_cfg(
        "MODEL.MASK_PYRAMID.READOUT_FEATURES", ["p2"], "MODEL.MASK_PYRAMID.SCORE_THRESH_TEST", 0.0
    )
    model = build_model(cfg).eval()
    data = _one_batch(cfg)
    records = _capture_records(model)
    with torch.no_grad():
        out = model(data)
    p3, p2 = records[0][-2], records[0][-1]
    assert [r.name for r in records[0]] == ["p6", "p5", "p4", "p3", "p2"]
    assert p2.stride == 4 and len(p2.spawned) == 0
    h, w = data[0]["image"].shape[-2:]
    assert p2.pyramids.logits.shape[-2:] == (-(-h // 4), -(-w // 4))
    # the same pyramids as on p3 (none spawned; pruning may only drop some), in the same order
    assert len(p2.pyramids) + int(p2.num_pruned.sum()) == len(p3.pyramids)
    k = cfg.MODEL.MASK_PYRAMID.CLASSES_PER_PYRAMID  # outputs per pyramid, one per class
    assert sum(len(o["instances"]) for o in out) <= k * len(p2.pyramids)


def test_caps_bind_in_inference(mp_cfg):
    cfg = mp_cfg(
        "MODEL.MASK_PYRAMID.MAX_PYRAMIDS", 3, "MODEL.MASK_PYRAMID.SPAWN_MODE", "uncovered",
        "MODEL.MASK_PYRAMID.LOW_THRESHOLD", 0.9,
    )  # fmt: skip
    model = build_model(cfg).eval()
    data = _one_batch(cfg)
    records = _capture_records(model)
    with torch.no_grad():
        model(data)
    for rec in records[0]:
        assert torch.bincount(rec.pyramids.batch, minlength=len(data)).max() <= 3
    assert sum(int(r.num_pruned.sum()) for r in records[0]) > 0  # the caps did bind


def test_pooled_class_head_gives_the_classes_and_scales_the_scores(mp_cfg):
    cfg = mp_cfg(*mp(CLASS_HEAD="pooled", SCORE_THRESH_TEST=0.0, CLASSES_PER_PYRAMID=1))
    torch.manual_seed(0)
    model = build_model(cfg)
    data = _one_batch(cfg)
    with EventStorage(0):
        losses = model(data)
    assert losses["loss_cls_pooled"] > 0
    head = model.class_head
    losses["loss_cls_pooled"].backward()
    assert head.cls_score.weight.grad.abs().sum() > 0
    model.eval()
    records = _capture_records(model)
    with torch.no_grad():
        head.cls_score.weight.zero_()
        head.cls_score.bias.fill_(-10.0)
        head.cls_score.bias[2] = 10.0  # the pooled head says: class 2, probability ~1
        out = model(data)
        head.cls_score.bias.zero_()  # now uniform: probability 1 / C
        uniform = model(data)
    pyr = records[0][-1].pyramids
    assert len(pyr) and pyr.cls_logits.argmax(1).ne(2).any()  # the root disagrees somewhere
    for o, u in zip(out, uniform):
        inst = o["instances"]
        assert len(inst) and (inst.pred_classes == 2).all()
        # the same pyramids (the painting order is by score), scores divided by the number of
        # outputs (C, or C + 1 with CLASS_BACKGROUND)
        c = head.cls_score.out_features
        assert torch.allclose(u["instances"].scores * c, inst.scores, rtol=1e-4)


def test_pooled_class_head_skips_pyramids_below_the_score_threshold(mp_cfg):
    cfg = mp_cfg(*mp(CLASS_HEAD="pooled", SCORE_THRESH_TEST=0.0))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    data = _one_batch(cfg)
    records = _capture_records(model)
    features = []
    model.backbone.register_forward_hook(lambda m, i, out: features.append(out))
    seen = []
    model.class_head.register_forward_hook(lambda m, i, out: seen.append(len(out[0])))
    with torch.no_grad():
        model(data)
        rec = records[0][-1]
        sizes = [(x["image"].shape[1], x["image"].shape[2]) for x in data]
        every, _ = model._class_scores(rec.pyramids, rec, sizes, features[0])
        objectness = rec.pyramids.cls_logits.sigmoid().amax(1)
        model.mp.SCORE_THRESH_TEST = float(objectness.median())
        some, _ = model._class_scores(rec.pyramids, rec, sizes, features[0])
    above = objectness > model.mp.SCORE_THRESH_TEST
    assert 0 < int(above.sum()) < len(above) and seen[-1] == int(above.sum())
    assert torch.allclose(some[above], every[above], atol=1e-6)
    assert (some[~above] == 0).all() and (every[~above] <= model.mp.SCORE_THRESH_TEST).all()


@pytest.mark.parametrize("fg_iou", [0.5, 0.0])
def test_pooled_background_class_labels_poor_masks_background(mp_cfg, monkeypatch, fg_iou):
    cfg = mp_cfg(
        *mp(
            CLASS_HEAD="pooled", CLASS_BACKGROUND=True, CLASS_FG_IOU=fg_iou, SCORE_THRESH_TEST=0.0,
            CLASS_NEGATIVE_ROOTS=0,  # the ground truth and the positives only
        )
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    c = cfg.MODEL.MASK_PYRAMID.NUM_CLASSES
    assert model.class_head.cls_score.out_features == c + 1
    data = _one_batch(cfg)
    seen = []
    cross_entropy = torch.nn.functional.cross_entropy

    def spy(logits, labels, *args, **kwargs):
        seen.append((logits.shape, labels.clone()))
        return cross_entropy(logits, labels, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    ious = []
    mask_iou = meta_arch.mask_iou

    def iou_spy(*args):
        ious.append(mask_iou(*args))
        return ious[-1]

    monkeypatch.setattr(meta_arch, "mask_iou", iou_spy)
    records = _capture_records(model)
    with EventStorage(0):
        model(data)
    ((shape, labels),) = seen
    gt = torch.cat([x["instances"].gt_classes for x in data])
    n_pos = int((records[0][-1].pyramids.target >= 0).sum())
    assert shape == (len(gt) + n_pos, c + 1) and n_pos > 0
    assert torch.equal(labels[: len(gt)], gt)  # the ground-truth masks keep their classes
    (iou,) = ious  # of each positive pyramid's final mask with its instance's
    pos_labels = labels[len(gt) :]
    assert torch.equal(pos_labels == c, iou < fg_iou)
    if fg_iou > 0:  # an untrained model's masks are mostly poor
        assert (pos_labels == c).any()
    model.eval()
    with torch.no_grad():
        head = model.class_head
        head.cls_score.weight.zero_()
        head.cls_score.bias.zero_()
        head.cls_score.bias[c] = 10.0  # background, probability ~1: every score ~0
        out = model(data)
    scores = torch.cat([o["instances"].scores for o in out])
    assert len(scores) and (scores < 1e-3).all()


def test_pooled_maskiou_learns_the_final_masks_iou_and_scales_the_scores(mp_cfg, monkeypatch):
    cfg = mp_cfg(
        *mp(
            CLASS_HEAD="pooled", CLASS_BACKGROUND=True, SCORE_MODE="maskiou",
            CLASS_NEGATIVE_ROOTS=3, SCORE_THRESH_TEST=0.0, CLASSES_PER_PYRAMID=1,
        )
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.score_head.maskiou is None and model.class_head.mask_iou is not None
    data = _one_batch(cfg)
    seen = []
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def spy(logits, targets, *args, **kwargs):
        seen.append((logits.detach().clone(), targets.clone()))
        return bce(logits, targets, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", spy)
    records = _capture_records(model)
    with EventStorage(0):
        losses = model(data)
    assert "loss_maskiou" in losses and losses["loss_maskiou"] > 0
    ((logits, targets),) = [x for x in seen if x[0].dim() == 1]
    # one IoU per pyramid alive at the last level (positives first, then the others), none for
    # the ground-truth masks; a positive's target is its final mask's IoU with its instance
    last = records[0][-1]
    pyr = last.pyramids
    pos = pyr.target >= 0
    assert len(targets) == len(pyr) and 0 < int(pos.sum()) < len(pyr)
    gt = model._batch_targets(data, [torch.zeros(len(data), 1, *pyr.logits.shape[-2:])] * 5, None)
    valid = meta_arch.G.valid_cells(
        [(x["image"].shape[1], x["image"].shape[2]) for x in data], last.stride,
        *pyr.logits.shape[-2:], pyr.logits.device,
    )  # fmt: skip
    want = meta_arch.mask_iou(
        pyr.logits[pos], gt["masks"][-1][pyr.target[pos]], valid[pyr.batch[pos]]
    )
    assert torch.allclose(targets[: int(pos.sum())], want)
    assert ((targets >= 0) & (targets <= 1)).all()
    losses["loss_maskiou"].backward()
    assert model.class_head.mask_iou.weight.grad.abs().sum() > 0
    # inference: the scores are multiplied by the predicted IoU
    model.eval()
    head = model.class_head
    with torch.no_grad():
        head.mask_iou.weight.zero_()
        head.mask_iou.bias.fill_(10.0)  # IoU ~1
        full = model(data)
        head.mask_iou.bias.fill_(0.0)  # IoU 0.5
        half = model(data)
    for f, h in zip(full, half):
        assert len(f["instances"])
        assert torch.allclose(h["instances"].scores * 2, f["instances"].scores, rtol=1e-3)


def test_tower_channels_narrow_the_per_image_towers(mp_cfg):
    wide = build_model(mp_cfg(*mp(TOWER_CHANNELS=0)))
    narrow = build_model(mp_cfg(*mp(TOWER_CHANNELS=8)))
    fpn = mp_cfg().MODEL.FPN.OUT_CHANNELS
    for model, width in ((wide, fpn), (narrow, 8)):
        for head in [*model.init_heads, *model.grow_heads]:
            convs = [m for m in head.tower if isinstance(m, torch.nn.Conv2d)]
            assert len(convs) == 2 and convs[0].in_channels == fpn
            assert all(c.out_channels == width for c in convs)
            assert head.feature_conv.in_channels == width
            x = torch.randn(1, fpn, 6, 6)
            assert head.image_features(x).shape == (1, head.feature_conv.out_channels, 6, 6)
    n_params = [sum(p.numel() for p in m.grow_heads.parameters()) for m in (wide, narrow)]
    assert n_params[1] < n_params[0]
    with pytest.raises(ValueError, match="TOWER_CHANNELS"):
        build_model(mp_cfg(*mp(TOWER_CHANNELS=-1)))


def test_pooler_sampling_ratios_reach_the_class_and_refinement_poolers(mp_cfg):
    model = build_model(
        mp_cfg(*mp(REFINE_RESOLUTION=8, CLASS_POOL_SAMPLING_RATIO=2, REFINE_SAMPLING_RATIO=3))
    )
    default = build_model(
        mp_cfg(*mp(REFINE_RESOLUTION=8, CLASS_POOL_SAMPLING_RATIO=0, REFINE_SAMPLING_RATIO=0))
    )
    for m, ratios in ((model, (2, 3)), (default, (0, 0))):  # 0: adaptive
        heads = (m.class_head, m.refine_head)
        for head, ratio in zip(heads, ratios):
            assert {p.sampling_ratio for p in head.pooler.level_poolers} == {ratio}


def test_window_sampling_ratio_reaches_roi_align(mp_cfg):
    import torchvision

    base = torch.randn(1, 4, 32, 32)
    boxes = torch.tensor([[0.0, 0.0, 256.0, 256.0]])  # bins of several cells at stride 8
    rois = torch.cat([torch.zeros(1, 1), boxes], 1)
    windows = {}
    for ratio in (0, 1, 3):
        model = build_model(mp_cfg(*mp(WINDOW_SAMPLING_RATIO=ratio)))
        windows[ratio] = model._windows(base, boxes, torch.zeros(1, dtype=torch.long), 8)
        size = (model.window, model.window)
        want = torchvision.ops.roi_align(base, rois, size, 1 / 8, ratio, aligned=True)
        assert torch.allclose(windows[ratio], want)
    assert not torch.allclose(windows[0], windows[1])  # adaptive: several points per bin


@pytest.mark.parametrize("ratio", [0, 1, 2])
def test_windows_pool_by_grid_sample_on_the_cpu_with_one_sample_per_bin(mp_cfg, monkeypatch, ratio):
    """WINDOW_SAMPLING_RATIO 1 on the CPU: every window (features, the previous level's logits)
    pooled by growth.pool_windows, and the outputs those of torchvision's kernel; other ratios
    (and CUDA) keep ROIAlign."""
    cfg = mp_cfg(*mp(WINDOW_SAMPLING_RATIO=ratio, SCORE_THRESH_TEST=0.0))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    data = _one_batch(cfg)
    real = meta_arch.G.pool_windows
    calls = []

    def spy(maps, boxes, batch, size, scale):
        calls.append(batch is None)
        return real(maps, boxes, batch, size, scale)

    monkeypatch.setattr(meta_arch.G, "pool_windows", spy)
    with torch.no_grad():
        fast = model(data)
    if ratio != 1:
        assert not calls
        return
    # the features' windows of the roots and of the growth, and each pyramid's own logits
    assert False in calls and True in calls

    def by_roi_align(maps, boxes, batch, size, scale):
        if batch is None:
            batch = torch.arange(len(boxes))
        rois = torch.cat([batch[:, None].to(boxes.dtype), boxes], 1)
        return meta_arch.ROIAlign((size, size), scale, 1, aligned=True)(maps, rois)

    monkeypatch.setattr(meta_arch.G, "pool_windows", by_roi_align)
    with torch.no_grad():
        ref = model(data)
    for a, b in zip(fast, ref):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b) > 0
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
        assert (a.pred_masks != b.pred_masks).float().mean() < 1e-3


@pytest.mark.parametrize("spawn", ["peaks", "uncovered"])
def test_territory_and_hidden_are_carried_only_where_read(mp_cfg, spawn):
    """The territory (pseudo pyramids' loss) only in training with SPAWN_MODE uncovered / both,
    the head features only with GROW_SKIP."""
    for skip in (False, True):
        cfg = mp_cfg(*mp(SPAWN_MODE=spawn, GROW_SKIP=skip))
        model = build_model(cfg)
        data = _one_batch(cfg)
        records = _capture_records(model)
        with EventStorage(0):
            model(data)
        model.eval()
        with torch.no_grad():
            model(data)
        train, test = records
        for rec in train:
            assert (rec.pyramids.territory is not None) == (spawn != "peaks")
        assert all(rec.pyramids.territory is None for rec in test)
        for rec in train + test:
            assert (rec.pyramids.hidden is not None) == skip


def test_class_negative_roots_are_capped_and_labelled_by_their_best_instance(mp_cfg, monkeypatch):
    n_neg = 3
    cfg = mp_cfg(
        *mp(
            CLASS_HEAD="pooled", CLASS_BACKGROUND=True, CLASS_NEGATIVE_ROOTS=n_neg,
            CLASS_FG_IOU=0.05, MAX_PYRAMIDS=50, LOW_THRESHOLD=0.0, TOPK_KEEP=100,
            PEAK_THRESHOLD=0.0,
        )
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    c = cfg.MODEL.MASK_PYRAMID.NUM_CLASSES
    data = _one_batch(cfg)
    seen = []
    cross_entropy = torch.nn.functional.cross_entropy

    def spy(logits, labels, *args, **kwargs):
        seen.append(labels.clone())
        return cross_entropy(logits, labels, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    records = _capture_records(model)
    with EventStorage(0):
        losses = model(data)
    recs = records[0]
    B = len(data)
    for rec in recs[: model.n_root]:  # at most n_neg non-positive roots per image and level
        new = rec.pyramids  # the level's new roots are the pyramids whose root_level is this one
        new = new[new.root_level == rec.level]
        others = torch.bincount(new.batch[new.target < 0], minlength=B)
        assert (others <= n_neg).all()
    spawned_others = sum(
        int((r.pyramids.target < 0).sum()) for r in recs[: model.n_root]
    )  # fmt: skip
    assert spawned_others > 0  # an untrained model's peaks are not all on positives
    last = recs[-1].pyramids
    gt_classes = torch.cat([x["instances"].gt_classes for x in data])
    pos, neg = last.target >= 0, last.target < 0
    ((labels,),) = [seen]
    assert len(labels) == len(gt_classes) + int(pos.sum()) + int(neg.sum())
    neg_labels = labels[len(gt_classes) + int(pos.sum()) :]
    # brute force: each negative's best IoU with an instance of its own image
    gt = model._batch_targets(data, [torch.zeros(B, 1, *last.logits.shape[-2:])] * 5, None)
    gt_masks = gt["masks"][-1] >= 0.5
    for k in range(int(neg.sum())):
        logits = last.logits[neg][k].detach()
        b = int(last.batch[neg][k])
        size = data[b]["image"].shape[-2:]
        h, w = -(-size[0] // recs[-1].stride), -(-size[1] // recs[-1].stride)
        m = torch.zeros_like(logits, dtype=torch.bool)
        m[:h, :w] = logits[:h, :w] > 0
        best, label = -1.0, c
        for g in (gt["batch"] == b).nonzero()[:, 0].tolist():
            inter = (m & gt_masks[g]).sum().item()
            iou = inter / max(1, (m | gt_masks[g]).sum().item())
            if iou > best:
                best, label = iou, int(gt_classes[g]) if iou >= 0.05 else c
        assert int(neg_labels[k]) == label
    assert torch.isfinite(sum(losses.values()))
    # and it needs the background class
    with pytest.raises(ValueError, match="CLASS_NEGATIVE_ROOTS"):
        build_model(
            mp_cfg(*mp(CLASS_HEAD="pooled", CLASS_BACKGROUND=False, CLASS_NEGATIVE_ROOTS=2))
        )


# ---------------------------------------------------------------- bad input
def _input(image, masks, image_id=7, classes=None):
    h, w = image.shape[-2:]
    inst = Instances((h, w))
    m = torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)
    inst.gt_masks = BitMasks(m)
    inst.gt_boxes = Boxes(BitMasks(m).get_bounding_boxes().tensor if len(m) else torch.zeros(0, 4))
    inst.gt_classes = classes if classes is not None else torch.zeros(len(m), dtype=torch.long)
    return {"image": image, "instances": inst, "height": h, "width": w, "image_id": image_id}


def _with_targets(cfg, inputs):
    params = TargetParams.from_config(cfg)
    for x in inputs:
        x["pyramid_targets"] = prepare_pyramid_targets(x["instances"], params)
    return inputs


def _train_and_infer(cfg, inputs):
    model = build_model(cfg)
    with EventStorage(0):
        losses = model(_with_targets(cfg, inputs))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        return losses, model(inputs)


def _noise(h, w, seed=0):
    return (torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255).to(
        torch.uint8
    )


def test_zero_ground_truth(mp_cfg):
    losses, out = _train_and_infer(mp_cfg(), [_input(_noise(64, 64), [])])
    assert all(float(v) == 0 for k, v in losses.items() if k.startswith("loss_mask_"))
    assert losses["loss_cls"] > 0  # every pixel is a negative
    # the config's class negatives still train the pooled head: background, mask IoU 0
    assert losses["loss_cls_pooled"] > 0 and losses["loss_maskiou"] > 0


def test_all_background_image_at_inference_gives_no_output(mp_cfg):
    cfg = mp_cfg()
    model = build_model(cfg).eval()
    x = {"image": torch.full((3, 64, 64), 114, dtype=torch.uint8), "height": 64, "width": 64}
    with torch.no_grad():
        inst = model([x])[0]["instances"]
    assert len(inst) == 0 and inst.pred_masks.shape == (0, 64, 64)


def test_one_object_covering_the_whole_image(mp_cfg):
    full = torch.ones(64, 64, dtype=torch.bool)
    losses, out = _train_and_infer(mp_cfg(), [_input(_noise(64, 64), [full])])
    assert float(losses["loss_mask_p6"]) > 0  # rooted on the coarsest level


def test_fifty_tiny_objects(mp_cfg):
    masks = []
    for k in range(50):
        m = torch.zeros(80, 80, dtype=torch.bool)
        r, c = divmod(k, 10)
        m[r * 8 + 2 : r * 8 + 5, c * 8 + 2 : c * 8 + 5] = True
        masks.append(m)
    cfg = mp_cfg("MODEL.MASK_PYRAMID.MAX_PYRAMIDS", 20, "MODEL.MASK_PYRAMID.SCORE_THRESH_TEST", 0.0)
    losses, out = _train_and_infer(cfg, [_input(_noise(80, 80), masks)])
    assert float(losses["loss_mask_p3"]) > 0
    assert len(out[0]["instances"]) <= 20


@pytest.mark.parametrize("size", [(20, 20), (8, 30)])
def test_image_smaller_than_the_coarsest_stride(mp_cfg, size):
    h, w = size
    m = torch.zeros(h, w, dtype=torch.bool)
    m[2:6, 2:6] = True
    cfg = mp_cfg("MODEL.MASK_PYRAMID.SCORE_THRESH_TEST", 0.0)
    losses, out = _train_and_infer(cfg, [_input(_noise(h, w), [m])])
    assert out[0]["instances"].pred_masks.shape[1:] == (h, w)


def test_refine_on_bad_input(mp_cfg):
    """REFINE_RESOLUTION with no ground truth (no positive: loss 0), an image smaller than the
    coarsest stride, and one object covering the whole image."""
    cfg = mp_cfg(*mp(REFINE_RESOLUTION=8, SCORE_THRESH_TEST=0.0))
    losses, out = _train_and_infer(cfg, [_input(_noise(64, 64), [])])
    assert float(losses["loss_refine"]) == 0 and losses["loss_refine"].requires_grad
    m = torch.zeros(8, 30, dtype=torch.bool)
    m[2:6, 2:6] = True
    losses, out = _train_and_infer(cfg, [_input(_noise(8, 30), [m])])
    assert float(losses["loss_refine"]) > 0
    assert out[0]["instances"].pred_masks.shape[1:] == (8, 30)
    full = torch.ones(64, 48, dtype=torch.bool)
    losses, out = _train_and_infer(cfg, [_input(_noise(64, 48), [full])])
    assert float(losses["loss_refine"]) > 0
    boxes = out[0]["instances"].pred_boxes.tensor
    assert (boxes >= 0).all() and (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 64).all()


@pytest.mark.parametrize("readout", [[], ["p2"]])
def test_every_pyramid_pruned_gives_empty_output(mp_cfg, readout):
    cfg = mp_cfg(*mp(LOW_THRESHOLD=1.0, PEAK_THRESHOLD_TEST=1.0, SCORE_THRESH_TEST=0.0,
                     READOUT_FEATURES=readout))  # fmt: skip
    model = build_model(cfg).eval()
    records = _capture_records(model)
    with torch.no_grad():
        out = model([_input(_noise(64, 64), [])])
    assert all(len(r.pyramids) == 0 for r in records[0])
    assert len(out[0]["instances"]) == 0


def test_nan_features_name_the_image(mp_cfg):
    cfg = mp_cfg()
    model = build_model(cfg)
    x = _input(_noise(64, 64).float(), [], image_id=1234)
    x["image"][0, 5, 5] = math.nan
    with pytest.raises(FloatingPointError, match="1234"):
        with EventStorage(0):
            model(_with_targets(cfg, [x]))
    model.eval()
    with pytest.raises(FloatingPointError, match="non-finite"):
        model([x])


def test_finite_check_names_the_level_and_tolerates_an_overflowing_sum(mp_cfg):
    """The check sums each level first: a finite level whose float32 sum overflows passes, an
    Inf (not only a NaN) is caught and named with its image id."""
    model = build_model(mp_cfg())
    n = len(model.mask_features)
    inputs = [{"image_id": 11}, {"image_id": 22}]
    huge = [torch.full((2, 4, 8, 8), 3e38) for _ in range(n)]
    assert not torch.isfinite(huge[0].sum())
    model._check_finite(huge, inputs)  # no error
    feats = [torch.zeros(2, 4, 8, 8) for _ in range(n)]
    feats[-1][1, 2, 3, 3] = -math.inf
    with pytest.raises(FloatingPointError, match=rf"'{model.mask_features[-1]}'.*\[22\]"):
        model._check_finite(feats, inputs)


def test_training_without_the_mapper_is_a_clear_error(mp_cfg):
    model = build_model(mp_cfg())
    with pytest.raises(ValueError, match="MaskPyramidDatasetMapper"):
        with EventStorage(0):
            model([_input(_noise(64, 64), [])])


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.MASK_PYRAMID.SPAWN_MODE", "everywhere"], "SPAWN_MODE"),
        (["MODEL.MASK_PYRAMID.INIT_CONVS", 1], "INIT_CONVS"),
        (["MODEL.MASK_PYRAMID.IN_FEATURES", ["p7", "p3"]], "IN_FEATURES"),
        (["MODEL.MASK_PYRAMID.SIZE_RANGES", [[0, 10]]], "SIZE_RANGES"),
        (["MODEL.MASK_PYRAMID.STAGE_ITERS", [0, 1]], "STAGE_ITERS"),
        (["MODEL.MASK_PYRAMID.NMS", "soft"], "NMS"),
        (["MODEL.MASK_PYRAMID.CLASS_HEAD", "box"], "CLASS_HEAD"),
        (["MODEL.MASK_PYRAMID.READOUT_FEATURES", ["p4"]], "READOUT_FEATURES"),
        (["MODEL.MASK_PYRAMID.READOUT_FEATURES", ["p1"]], "READOUT_FEATURES"),
        (
            [
                "MODEL.MASK_PYRAMID.READOUT_FEATURES",
                ["p2"],
                "MODEL.MASK_PYRAMID.STAGE_ITERS",
                [0, 0, 0, 0],
            ],
            "STAGE_ITERS",
        ),
        (
            [
                "MODEL.MASK_PYRAMID.CLASS_HEAD",
                "pooled",
                "MODEL.MASK_PYRAMID.CLASS_POOL_FEATURES",
                ["p2", "p9"],
            ],
            "CLASS_POOL_FEATURES",
        ),
        (
            [
                "MODEL.MASK_PYRAMID.CLASS_HEAD",
                "pooled",
                "MODEL.MASK_PYRAMID.CLASS_POOL_FEATURES",
                ["p2", "p4"],
            ],
            "CLASS_POOL_FEATURES",
        ),
        (["MODEL.MASK_PYRAMID.REFINE_RESOLUTION", 7], "REFINE_RESOLUTION"),
        (mp(REFINE_RESOLUTION=8, REFINE_CONVS=0), "REFINE_CONVS"),
        (mp(REFINE_RESOLUTION=8, REFINE_FEATURES=["p2", "p9"]), "REFINE_FEATURES"),
        (mp(REFINE_RESOLUTION=8, REFINE_FEATURES=["p2", "p4"]), "REFINE_FEATURES"),
        (mp(CLASS_POOL_SAMPLING_RATIO=-1), "CLASS_POOL_SAMPLING_RATIO"),
        (mp(REFINE_SAMPLING_RATIO=-2), "REFINE_SAMPLING_RATIO"),
        (mp(REFINE_BOX_REGRESSION=True, REFINE_RESOLUTION=0), "REFINE_BOX_REGRESSION"),
        (mp(REFINE_BOX_REGRESSION=True, CLASS_HEAD="root"), "REFINE_BOX_REGRESSION"),
        (mp(REFINE_CLASS_SPECIFIC=True, REFINE_RESOLUTION=0), "REFINE_CLASS_SPECIFIC"),
        (mp(REFINE_RESOLUTION=8, REFINE_BOX="tight"), "REFINE_BOX"),
        (mp(REFINE_BOX_REGRESSION=False, REFINE_BOX="regressed"), "REFINE_BOX"),
        (mp(REFINE_BOX_REGRESSION=True, BOX_REG_HEAD="shared"), "BOX_REG_HEAD"),
        (mp(BOX_REG_CONTEXT=-0.1), "BOX_REG_CONTEXT"),
        (mp(REFINE_RESOLUTION=8, REFINE_PASSES=0), "REFINE_PASSES"),
        (mp(REFINE_RESOLUTION=8, REFINE_PASS_MIN_SIZE=-1), "REFINE_PASS_MIN_SIZE"),
        (mp(READOUT_GROW_MAX_SIZE=-1), "READOUT_GROW_MAX_SIZE"),
    ],
)
def test_bad_config_names_the_key(mp_cfg, opts, match):
    cfg = mp_cfg(*opts)
    with pytest.raises(ValueError, match=match):
        build_model(cfg)
        TargetParams.from_config(cfg)


def test_a_few_iterations_on_fruits_nuts_photographs(mp_cfg, tmp_path):
    from maskpyramid.config import resolve_num_classes
    from maskpyramid.data import register_fruits_nuts

    if register_fruits_nuts() is None:
        pytest.skip("../shared/data/fruits_nuts is absent on this machine")
    cfg = mp_cfg(
        "DATASETS.TRAIN", ("fruits_nuts",), "MODEL.MASK_PYRAMID.NUM_CLASSES", -1,
        "INPUT.MIN_SIZE_TRAIN", (160,), "INPUT.MAX_SIZE_TRAIN", 224, "SOLVER.MAX_ITER", 3,
        "OUTPUT_DIR", str(tmp_path / "fruits"),
    )  # fmt: skip
    assert resolve_num_classes(cfg) == 3
    trainer = Trainer(cfg)
    trainer.train()
    assert trainer.iter == 3  # SOLVER.MAX_ITER iterations ran
    history = trainer.storage.history("loss_mask_p3").values()
    assert history and all(math.isfinite(v) for v, _ in history)


def test_refine_reads_the_masks_out_in_their_grown_boxes(mp_cfg):
    """REFINE_RESOLUTION: the output masks are the refinement's windows pasted into the image.
    A predictor forced to +20 fills each window, so every output mask is exactly its box: the
    pyramid's mask box (probability > 0.5) grown by REFINE_BOX_MARGIN and half a cell."""
    cfg = mp_cfg(
        *mp(REFINE_RESOLUTION=8, SCORE_THRESH_TEST=0.0, REFINE_SCORE_THRESH=0.0,
            CLASSES_PER_PYRAMID=1),
        "MODEL.MASK_PYRAMID.MIN_KEPT_FRACTION", 0.0, "MODEL.MASK_PYRAMID.NMS", "none",
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    predictor = model.refine_head.mask_head.predictor
    torch.nn.init.zeros_(predictor.weight)
    torch.nn.init.constant_(predictor.bias, 20.0)
    data = _one_batch(cfg)[:1]
    seen = []
    refine = model._refine

    def spy(pyr, stride, sizes, features, regressed=None, classes=None, passes=1):
        logits, boxes = refine(pyr, stride, sizes, features, regressed, classes, passes)
        seen.append((len(pyr), boxes))
        return logits, boxes

    model._refine = spy
    with torch.no_grad():
        inst = model(data)[0]["instances"]
    assert len(inst) and len(seen) == 1 and seen[0][0] == len(inst)  # only the outputs
    x = data[0]
    scale = torch.tensor([x["width"], x["height"]] * 2) / torch.tensor(
        [x["image"].shape[2], x["image"].shape[1]] * 2
    )
    for mask, box in zip(inst.pred_masks, inst.pred_boxes.tensor):
        x0, y0, x1, y1 = box.long().tolist()
        assert mask[y0:y1, x0:x1].all() and mask.sum() == (y1 - y0) * (x1 - x0)
    in_boxes = sorted(seen[0][1].mul(scale).round().tolist())
    out_boxes = sorted(inst.pred_boxes.tensor.tolist())
    for a, b in zip(in_boxes, out_boxes):
        assert all(abs(u - v) <= 1.01 for u, v in zip(a, b))
    # forced to -20: every refined mask is empty, so there is no output
    torch.nn.init.constant_(predictor.bias, -20.0)
    model._refine = refine
    with torch.no_grad():
        assert len(model(data)[0]["instances"]) == 0


def test_peak_threshold_test_picks_the_roots_at_inference_and_peak_threshold_in_training(
    mp_cfg,
):
    """At inference every 3x3 peak of the root-score map above PEAK_THRESHOLD_TEST is a root
    (levels after the first; nothing capped); in training PEAK_THRESHOLD gates the peaks that
    may be class negatives (CLASS_NEGATIVE_ROOTS), whatever PEAK_THRESHOLD_TEST."""
    cfg = mp_cfg(*mp(PEAK_THRESHOLD=1.0, PEAK_THRESHOLD_TEST=0.0, MAX_PYRAMIDS=1000))
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = []
    grow = model.grow

    def spy(feats, cls_maps, *args, **kwargs):
        records = grow(feats, cls_maps, *args, **kwargs)
        seen.append(([m.sigmoid().amax(1) for m in cls_maps], records))
        return records

    model.grow = spy
    image = [_input(_noise(64, 64), [])]
    model.eval()
    with torch.no_grad():
        model(image)
    levels = range(1, model.n_root)
    score_maps = seen[-1][0]
    peaks = torch.cat([score_maps[lvl][local_peaks(score_maps[lvl], 0.0)]
                       for lvl in levels])  # fmt: skip
    threshold = float(peaks.median())
    cfg.defrost()
    cfg.MODEL.MASK_PYRAMID.PEAK_THRESHOLD_TEST = threshold
    model.mp = cfg.MODEL.MASK_PYRAMID
    with torch.no_grad():
        model(image)
    score_maps, records = seen[-1]
    roots = 0
    for lvl in levels:
        want = local_peaks(score_maps[lvl], threshold).nonzero()
        assert torch.equal(records[lvl].spawned, want)
        roots += len(want)
    assert 0 < roots < len(peaks)

    # training: PEAK_THRESHOLD 1.0 leaves no peak to be a class negative; 0.0 does
    data = _one_batch(cfg)
    negatives = {}
    for value in (1.0, 0.0):
        cfg.MODEL.MASK_PYRAMID.PEAK_THRESHOLD = value
        model.mp = cfg.MODEL.MASK_PYRAMID
        model.train()
        with EventStorage(0):
            model(data)
        negatives[value] = sum(
            int(((r.pyramids.root_level == r.level) & (r.pyramids.target < 0)).sum())
            for r in seen[-1][1][1 : model.n_root]
        )  # fmt: skip
    assert negatives[1.0] == 0 < negatives[0.0]


def test_readout_test_off_reads_out_on_the_last_root_level_at_inference(mp_cfg):
    """READOUT_TEST False: inference grows the pyramids through IN_FEATURES only and reads them
    out there (the same outputs as the full growth's p3 record read out); training still grows
    into READOUT_FEATURES and reports their loss."""
    cfg = mp_cfg(*mp(SCORE_THRESH_TEST=0.0, REFINE_SCORE_THRESH=0.0))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    data = _one_batch(cfg)
    records = _capture_records(model)
    with torch.no_grad():
        full = model(data)
    assert [r.name for r in records[-1]] == ["p6", "p5", "p4", "p3", "p2"]
    p3 = records[-1][3]
    with torch.no_grad():
        images = model.preprocess_image(data)
        want = model.inference(p3, data, images.image_sizes, model.backbone(images.tensor))
    cfg.defrost()
    cfg.MODEL.MASK_PYRAMID.READOUT_TEST = False
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    records = _capture_records(model)
    with torch.no_grad():
        got = model(data)
    assert [r.name for r in records[-1]] == ["p6", "p5", "p4", "p3"]
    assert sum(len(o["instances"]) for o in got) > 0
    for g, w, f in zip(got, want, full):
        g, w = g["instances"], w["instances"]
        assert len(g) == len(w)
        assert torch.equal(g.pred_masks, w.pred_masks)
        assert torch.allclose(g.scores, w.scores)
        assert g.pred_masks.shape[1:] == f["instances"].pred_masks.shape[1:]
    model.train()
    with EventStorage(0):
        losses = model(data)
    assert "loss_mask_p2" in losses and [r.name for r in records[-1]][-1] == "p2"


def test_readout_grow_max_size_grows_the_small_pyramids_and_upsamples_the_large(mp_cfg):
    """READOUT_GROW_MAX_SIZE: at inference the pyramids whose mask box on p3 has a side below
    it grow into p2 as without the key; the others are p3's logits upsampled and soft-clamped.
    Training grows them all."""
    opts = mp(PEAK_THRESHOLD_TEST=0.0, LOW_THRESHOLD=0.0, TOPK_KEEP=1000, MAX_PYRAMIDS=1000)
    cfg = mp_cfg(*opts, *mp(READOUT_GROW_MAX_SIZE=0))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = [_input(_noise(160, 160), [])]  # boxes of several sizes: the image limits some
    records = _capture_records(model)
    with torch.no_grad():
        model(image)
    p3, p2 = records[-1][3], records[-1][4]
    boxes, _ = model._mask_boxes(p3.pyramids, p3.stride, model._sizes([(160, 160)]))
    side = (boxes[:, 2:] - boxes[:, :2]).prod(1).sqrt()
    limit = float(side.median())
    small = side < limit
    assert 0 < int(small.sum()) < len(side) and len(p2.pyramids) == len(side)

    cfg.defrost()
    cfg.MODEL.MASK_PYRAMID.READOUT_GROW_MAX_SIZE = limit
    model.mp = cfg.MODEL.MASK_PYRAMID
    with torch.no_grad():
        model(image)
    got = records[-1][4].pyramids.logits
    assert torch.equal(records[-1][3].pyramids.logits, p3.pyramids.logits)
    torch.testing.assert_close(got[small], p2.pyramids.logits[small])
    up = meta_arch.G.resample_to_grid(p3.pyramids.logits, p3.stride, got.shape[-2:], p2.stride)
    want = meta_arch.G.soft_clamp(up, cfg.MODEL.MASK_PYRAMID.LOGIT_CLAMP)[~small]
    torch.testing.assert_close(got[~small], want)
    assert not torch.allclose(got[~small], p2.pyramids.logits[~small])

    # training: every pyramid grows, whatever the key (1 pixel would upsample them all)
    data = _one_batch(cfg)
    model.train()
    grown = {}
    for value in (0, 1.0):
        cfg.MODEL.MASK_PYRAMID.READOUT_GROW_MAX_SIZE = value
        model.mp = cfg.MODEL.MASK_PYRAMID
        torch.manual_seed(1)
        with EventStorage(0):
            grown[value] = model(data)["loss_mask_p2"]
    assert torch.equal(grown[0], grown[1.0])


def _refine_passes_model(mp_cfg, passes):
    """An untrained model with REFINE_PASSES ``passes`` (REFINE_PASS_MIN_SIZE 0) whose every
    local peak is a root and nothing is pruned (several pyramids), and one image."""
    cfg = mp_cfg(
        *mp(REFINE_RESOLUTION=8, SCORE_THRESH_TEST=0.0, REFINE_SCORE_THRESH=0.0,
            CLASSES_PER_PYRAMID=1, MIN_KEPT_FRACTION=0.0, NMS="none", REFINE_PASSES=passes,
            REFINE_PASS_MIN_SIZE=0, PEAK_THRESHOLD_TEST=0.0, LOW_THRESHOLD=0.0, TOPK_KEEP=1000),
    )  # fmt: skip
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval(), _one_batch(cfg)[:1]


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_refine_passes_refine_again_in_the_tight_box_of_the_previous_mask(mp_cfg, passes):
    """REFINE_PASSES: at inference each further pass refines in the box of the previous
    pass's mask cells (probability > MASK_THRESHOLD) on its box; an empty mask keeps its box.
    The outputs are the last pass's masks."""
    cfg, model, data = _refine_passes_model(mp_cfg, passes)
    calls = []

    def fake_refine_in(pyr, stride, features, boxes, classes=None, probs=None):
        # every pass but the last: rows 2-4 and columns 1-3 of the 8x8 window, none for row 0
        logits = torch.full((len(pyr), 8, 8), -10.0)
        logits[:, 2:5, 1:4] = 10.0
        logits[0] = -10.0
        if len(calls) == passes - 1:
            logits = torch.full((len(pyr), 8, 8), 10.0)  # the last fills its box
        calls.append(boxes.clone())
        return logits

    model._refine_in = fake_refine_in
    with torch.no_grad():
        inst = model(data)[0]["instances"]
    assert len(calls) == passes and len(inst) >= 2
    for before, after in zip(calls, calls[1:]):
        cell = (before[:, 2:] - before[:, :2]) / 8
        want = torch.cat([before[:, :2] + cell * torch.tensor([1.0, 2.0]),
                          before[:, :2] + cell * torch.tensor([4.0, 5.0])], 1)  # fmt: skip
        want[0] = before[0]  # the empty mask keeps its box
        torch.testing.assert_close(after, want)
    x = data[0]
    scale = torch.tensor([x["width"], x["height"]] * 2) / torch.tensor(
        [x["image"].shape[2], x["image"].shape[1]] * 2
    )
    out_boxes = sorted(inst.pred_boxes.tensor.tolist())
    for a, b in zip(sorted(calls[-1].mul(scale).round().tolist()), out_boxes):
        assert all(abs(u - v) <= 1.01 for u, v in zip(a, b))


@pytest.mark.parametrize("min_size", ["median", "huge"])
def test_refine_pass_min_size_refines_again_only_the_large_masks(mp_cfg, min_size):
    """REFINE_PASS_MIN_SIZE: the second pass runs only on the masks whose tight box (after the
    first pass) has a side (square root of its area) of at least the size; the others keep the
    first pass's mask. None large enough: one pass only."""
    cfg, model, data = _refine_passes_model(mp_cfg, 2)
    calls = []

    def fake_refine_in(pyr, stride, features, boxes, classes=None, probs=None):
        logits = torch.full((len(pyr), 8, 8), -10.0)
        if not calls:  # the first pass: k x k cells from row 2, column 1; row 0 empty
            for i in range(1, len(pyr)):
                k = int(extent[i])
                logits[i, 2 : 2 + k, 1 : 1 + k] = 10.0
        else:
            logits[:] = 10.0
        calls.append(boxes.clone())
        return logits

    extent = 2 + torch.arange(1000) % 3 * 2  # 2, 4 or 6 cells
    model._refine_in = fake_refine_in
    with torch.no_grad():
        model(data)  # the first pass's boxes (every mask refined twice), to pick the size
    first = calls[0]
    cell = (first[:, 2:] - first[:, :2]) / 8
    k = extent[: len(first), None].float()
    tight = torch.cat([first[:, :2] + cell * torch.tensor([1.0, 2.0]),
                       first[:, :2] + cell * (torch.tensor([1.0, 2.0]) + k)], 1)  # fmt: skip
    tight[0] = first[0]  # the empty mask keeps its box
    side = (tight[:, 2:] - tight[:, :2]).prod(1).sqrt()
    assert len(side) >= 3 and side.max() > side.min()
    size = int(side[1:].median()) if min_size == "median" else int(side.max()) + 1
    cfg.defrost()
    cfg.MODEL.MASK_PYRAMID.REFINE_PASS_MIN_SIZE = size
    model.mp = cfg.MODEL.MASK_PYRAMID
    calls.clear()
    with torch.no_grad():
        inst = model(data)[0]["instances"]
    large = side >= size
    if min_size == "huge":
        assert len(calls) == 1
    else:
        assert len(calls) == 2 and 0 < int(large.sum()) < len(side)
        torch.testing.assert_close(calls[1], tight[large])
    # every non-empty mask is output: the first pass's, or the second's, which fills its box
    assert len(inst) == len(side) - 1 + int(large[0])


def test_refine_loss_learns_the_ground_truth_in_the_box_on_capped_positives(mp_cfg):
    cfg = mp_cfg(*mp(REFINE_RESOLUTION=8, REFINE_MAX_PER_IMAGE=2, REFINE_OVERLAPPING=False))
    torch.manual_seed(0)
    model = build_model(cfg)
    data = _one_batch(cfg)
    seen = []
    refine = model._refine

    def spy(pyr, stride, sizes, features, regressed=None, classes=None, passes=1):
        seen.append(pyr)
        return refine(pyr, stride, sizes, features, regressed, classes, passes)

    model._refine = spy
    records = _capture_records(model)
    with EventStorage(0):
        losses = model(data)
    final = records[-1][-1].pyramids
    (sub,) = seen
    assert (sub.target >= 0).all()
    per_image = torch.bincount(sub.batch, minlength=len(data))
    for b in range(len(data)):
        positives = final.target[(final.batch == b) & (final.target >= 0)]
        assert per_image[b] == min(2, len(positives))
        # round-robin over the instances: two different instances when there are two
        assert len(sub.target[sub.batch == b].unique()) == min(2, len(positives.unique()))
    loss = losses["loss_refine"]
    assert loss > 0 and loss.requires_grad
    loss.backward()
    assert model.refine_head.mask_head.predictor.weight.grad.abs().sum() > 0
    # the pyramids' own logits are its prior, not trained by it
    assert all(p.grad is None for p in model.grow_heads.parameters())


def _refine_head_calls(model):
    """Each call of the refinement head: (boxes, batch, pooled_probs, prior, classes, logits)."""
    calls = []
    forward = model.refine_head.forward

    def spy(features, boxes, batch, pooled_probs, prior, classes=None):
        out = forward(features, boxes, batch, pooled_probs, prior, classes)
        calls.append((boxes, batch, pooled_probs, prior, classes, out))
        return out

    model.refine_head.forward = spy
    return calls


@pytest.mark.parametrize("box", ["union", "regressed"])
@pytest.mark.parametrize("no_positives", [False, True])
def test_refine_gt_boxes_learn_each_instance_on_its_own_box(mp_cfg, no_positives, box):
    """REFINE_GT_BOXES: the refinement also learns, for every ground-truth instance, on its box
    (jitter 0 here) grown as a mask box (REFINE_BOX_MARGIN of its side plus half a cell of the
    last level; with REFINE_BOX "regressed", whose boxes are not grown, the box itself), clipped
    to the image, with a zero prior; against the instance's mask cropped to that box. Without
    any positive pyramid, the loss is these rows alone."""
    regressed = mp(CLASS_HEAD="pooled", CLASS_BACKGROUND=True, REFINE_BOX_REGRESSION=True)
    cfg = mp_cfg(
        *mp(REFINE_RESOLUTION=8, REFINE_RESIDUAL=False, REFINE_GT_BOXES=1, REFINE_GT_JITTER=0.0,
            REFINE_OVERLAPPING=False, REFINE_BOX=box),
        *(regressed if box == "regressed" else []),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    data = _one_batch(cfg)
    calls = _refine_head_calls(model)
    records = _capture_records(model)
    if no_positives:
        grow = model.grow

        def no_targets(*args, **kwargs):
            out = grow(*args, **kwargs)
            out[-1].pyramids.target.fill_(-1)
            return out

        model.grow = no_targets
    seen = []
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def bce_spy(logits, targets, *args, **kwargs):
        seen.append((logits, targets))
        return bce(logits, targets, *args, **kwargs)

    with EventStorage(0), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", bce_spy)
        losses = model(data)
    assert len(calls) == (1 if no_positives else 2)
    boxes, batch, pooled_probs, prior, classes, logits = calls[-1]
    gt_boxes = torch.cat([x["instances"].gt_boxes.tensor for x in data])
    assert classes is None and len(boxes) == len(gt_boxes) > 0
    assert (pooled_probs == 0).all() and (prior == 0).all()
    stride = records[0][-1].stride
    grow = (gt_boxes[:, 2:] - gt_boxes[:, :2]) * 0.1 + stride / 2
    if box == "regressed":
        grow = torch.zeros_like(grow)
    else:
        assert (grow > 0).all()
    expected = torch.cat([gt_boxes[:, :2] - grow, gt_boxes[:, 2:] + grow], 1)
    counts = torch.tensor([len(x["instances"]) for x in data])
    image = torch.repeat_interleave(torch.arange(len(data)), counts)
    torch.testing.assert_close(batch, image)
    hw = torch.tensor([x["image"].shape[1:] for x in data], dtype=torch.float32)[image]
    expected = torch.cat(
        [expected[:, :2].clamp(min=0), torch.minimum(expected[:, 2:], hw.flip(1))], 1
    )
    torch.testing.assert_close(boxes, expected)
    crops = torch.cat(
        [x["instances"].gt_masks.crop_and_resize(boxes[batch == b], 8).float()
         for b, x in enumerate(data)]
    )  # fmt: skip
    refine_logits, refine_targets = [c for c in seen if c[0].dim() == 3][-1]
    torch.testing.assert_close(refine_logits[-len(boxes) :], logits)
    torch.testing.assert_close(refine_targets[-len(boxes) :], crops)
    assert len(refine_logits) == (len(boxes) if no_positives else len(calls[0][0]) + len(boxes))
    assert losses["loss_refine"] > 0


@pytest.mark.parametrize("best_iou", [0.6, 0.4])
def test_refine_overlapping_pyramids_learn_the_instance_they_overlap(mp_cfg, best_iou):
    """REFINE_OVERLAPPING: a pyramid rooted on no instance enters the refinement's loss,
    against the instance its final mask overlaps best, when that IoU reaches CLASS_FG_IOU (0.5)
    and only then. The overlaps are forced (instance 0 of each image, IoU ``best_iou``); the
    loss must then be the cross-entropy against that instance's mask cropped to each box."""
    cfg = mp_cfg(
        *mp(REFINE_RESOLUTION=8, REFINE_OVERLAPPING=True, REFINE_MAX_PER_IMAGE=0),
        # every local peak a candidate root and no pruning: the negative roots
        # (CLASS_NEGATIVE_ROOTS) of the untrained model reach the last level
        *mp(PEAK_THRESHOLD=0.0, LOW_THRESHOLD=0.0, TOPK_KEEP=1000),
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    data = _one_batch(cfg)
    firsts = {}

    def forced(pyr, rec, gt_masks, targets, image_sizes):
        firsts["offsets"] = targets["offsets"]
        owner = torch.as_tensor(targets["offsets"])[pyr.batch]
        counts = torch.bincount(targets["batch"], minlength=len(image_sizes))
        best = torch.where(counts[pyr.batch] > 0, best_iou, -1.0)  # -1: no instance
        return best, owner.clamp(max=len(targets["batch"]) - 1)

    seen = []
    refine = model._refine

    def spy(pyr, stride, sizes, features, regressed=None, classes=None, passes=1):
        logits, boxes = refine(pyr, stride, sizes, features, regressed, classes, passes)
        seen.append((pyr, logits, boxes))
        return logits, boxes

    model._best_instances = forced
    model._refine = spy
    records = _capture_records(model)
    with EventStorage(0):
        losses = model(data)
    final = records[-1][-1].pyramids
    ((sub, logits, boxes),) = seen
    n_pos = int((final.target >= 0).sum())
    assert len(final) > n_pos  # pyramids rooted on no instance
    if best_iou < 0.5:  # below CLASS_FG_IOU: the positives only
        assert len(sub) == n_pos and (sub.target >= 0).all()
        return
    # every pyramid of an image with instances: the positives and the forced others
    has_instances = torch.tensor([len(x["instances"]) > 0 for x in data])
    assert len(sub) == int(has_instances[final.batch].sum()) > n_pos
    gt = torch.zeros_like(logits)
    for k in range(len(sub)):
        b = int(sub.batch[k])
        local = int(sub.target[k] - firsts["offsets"][b]) if sub.target[k] >= 0 else 0
        masks = data[b]["instances"].gt_masks
        gt[k] = masks[[local]].crop_and_resize(boxes[k : k + 1], 8)[0].float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, gt)
    torch.testing.assert_close(losses["loss_refine"], expected)


@pytest.mark.parametrize("residual", [True, False])
def test_refine_residual_adds_to_the_pyramids_logits_or_not(mp_cfg, residual):
    """REFINE_RESIDUAL: with the predictor forced to a constant c, the refined logits are the
    pyramid's logits resampled into the box plus c (True), or c alone (False, where the
    pyramid's logits are not resampled into the box at all)."""
    cfg = mp_cfg(
        *mp(REFINE_RESOLUTION=8, REFINE_RESIDUAL=residual, SCORE_THRESH_TEST=0.0,
            REFINE_SCORE_THRESH=0.0)
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    predictor = model.refine_head.mask_head.predictor
    torch.nn.init.zeros_(predictor.weight)
    torch.nn.init.constant_(predictor.bias, 3.0)
    priors = []
    head_forward = model.refine_head.forward

    def spy(features, boxes, batch, pooled_probs, prior, classes=None):
        priors.append(prior)
        return head_forward(features, boxes, batch, pooled_probs, prior, classes)

    model.refine_head.forward = spy
    outputs = []
    refine = model._refine

    def keep_output(*args):
        out = refine(*args)
        outputs.append(out[0])
        return out

    model._refine = keep_output
    with torch.no_grad():
        model(_one_batch(cfg)[:1])
    assert len(outputs) == 1 and len(outputs[0])
    if residual:
        assert priors[0].abs().max() > 0
        torch.testing.assert_close(outputs[0], priors[0] + 3.0)
    else:  # the prior is not pooled at all
        assert priors[0] is None
        torch.testing.assert_close(outputs[0], torch.full((len(outputs[0]), 8, 8), 3.0))


def _class_constant_refinement(model):
    """The refinement's predictor forced to output the constant c for class c (zero weights,
    bias c), so that a refined mask tells which class channel it was taken from."""
    predictor = model.refine_head.mask_head.predictor
    torch.nn.init.zeros_(predictor.weight)
    with torch.no_grad():
        predictor.bias.copy_(torch.arange(predictor.out_channels, dtype=torch.float32))


def test_refine_class_specific_learns_each_instances_class_mask(mp_cfg):
    """REFINE_CLASS_SPECIFIC: one mask per class; the loss takes, for each pyramid, the mask of
    its instance's class (as Mask R-CNN's mask loss takes its proposal's ground-truth class)."""
    cfg = mp_cfg(*mp(REFINE_RESOLUTION=8, REFINE_RESIDUAL=False, REFINE_CLASS_SPECIFIC=True))
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.refine_head.mask_head.predictor.out_channels == model.num_classes
    _class_constant_refinement(model)
    data = _one_batch(cfg)
    seen = []
    refine = model._refine

    def spy(pyr, stride, sizes, features, regressed=None, classes=None, passes=1):
        logits, boxes = refine(pyr, stride, sizes, features, regressed, classes, passes)
        seen.append((pyr, logits))
        return logits, boxes

    model._refine = spy
    with EventStorage(0):
        losses = model(data)
    ((sub, logits),) = seen
    gt_classes = torch.cat([x["instances"].gt_classes for x in data])
    assert len(sub) and (sub.target >= 0).all()  # the positives (REFINE_OVERLAPPING off)
    expected = gt_classes[sub.target].float()[:, None, None].expand_as(logits)
    torch.testing.assert_close(logits, expected)
    assert len(set(gt_classes[sub.target].tolist())) > 1  # the test tells classes apart
    assert torch.isfinite(losses["loss_refine"])


def test_refine_class_specific_reads_out_each_pyramids_best_class_mask(mp_cfg):
    """REFINE_CLASS_SPECIFIC at inference: each output pyramid's mask is its most probable
    class's mask, the class it is output with (CLASSES_PER_PYRAMID 1)."""
    cfg = mp_cfg(
        *mp(REFINE_RESOLUTION=8, REFINE_RESIDUAL=False, REFINE_CLASS_SPECIFIC=True,
            SCORE_THRESH_TEST=0.0, REFINE_SCORE_THRESH=0.0, CLASSES_PER_PYRAMID=1, NMS="none",
            MIN_KEPT_FRACTION=0.0, PAINTED_OUTPUT=False),
        # every local peak a root and no pruning: pyramids of several classes
        *mp(PEAK_THRESHOLD_TEST=0.0, LOW_THRESHOLD=0.0, TOPK_KEEP=1000),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _class_constant_refinement(model)
    seen = []
    refine = model._refine

    def spy(pyr, stride, sizes, features, regressed=None, classes=None, passes=1):
        logits, boxes = refine(pyr, stride, sizes, features, regressed, classes, passes)
        seen.append(logits)
        return logits, boxes

    class_scores = model._class_scores

    def mixed(*args):  # the untrained model's pyramids all favour one class: random scores
        scores, regressed = class_scores(*args)
        return torch.rand(scores.shape, generator=torch.Generator().manual_seed(0)), regressed

    model._refine = spy
    model._class_scores = mixed
    with torch.no_grad():
        inst = model(_one_batch(cfg)[:1])[0]["instances"]
    (logits,) = seen
    assert len(inst) == len(logits) > 1
    values = logits.flatten(1)
    assert (values == values[:, :1]).all()  # one class channel per pyramid
    read = sorted(values[:, 0].long().tolist())
    assert read == sorted(inst.pred_classes.tolist()) and len(set(read)) > 1


BOX_REGRESSION = mp(
    REFINE_RESOLUTION=8, CLASS_HEAD="pooled", CLASS_BACKGROUND=True, CLASS_NEGATIVE_ROOTS=4,
    REFINE_BOX_REGRESSION=True, SCORE_THRESH_TEST=0.0, REFINE_SCORE_THRESH=0.0,
    CLASSES_PER_PYRAMID=1, NMS="none", MIN_KEPT_FRACTION=0.0,
)  # fmt: skip


def _force_deltas(model, deltas):
    """The box deltas (the class head's, or BOX_REG_HEAD "own"'s) forced to the constant
    ``deltas`` (4,)."""
    head = model.box_head if model.box_head is not None else model.class_head
    torch.nn.init.zeros_(head.bbox_pred.weight)
    with torch.no_grad():
        head.bbox_pred.bias.copy_(torch.tensor(deltas))


@pytest.mark.parametrize("box", ["union", "regressed"])
def test_box_regression_widens_the_refinement_box_to_the_regressed_box(mp_cfg, box):
    """REFINE_BOX_REGRESSION: the refinement works on the union of the grown mask box and the
    class head's regressed box (REFINE_BOX "regressed": on the regressed box alone), in
    training and at inference. Deltas forced to 0 leave the grown mask box (the mask box);
    deltas forced to twice the width and height (Box2BoxTransform's weights 5) give the mask
    box doubled about its centre, clipped to the image."""
    cfg = mp_cfg(*BOX_REGRESSION, *mp(REFINE_BOX=box))
    torch.manual_seed(0)
    model = build_model(cfg)
    data = _one_batch(cfg)[:1]
    seen = []
    refine = model._refine

    def spy(pyr, stride, sizes, features, regressed=None, classes=None, passes=1):
        logits, boxes = refine(pyr, stride, sizes, features, regressed, classes, passes)
        mask_boxes, _ = model._mask_boxes(pyr, stride, sizes)
        seen.append((mask_boxes, boxes, regressed))
        return logits, boxes

    model._refine = spy
    for training in (True, False):
        model.train(training)
        for deltas in ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5 * math.log(2), 5 * math.log(2)]):
            _force_deltas(model, deltas)
            seen.clear()
            with EventStorage(0), torch.set_grad_enabled(training):
                model(data)
            ((mask_boxes, boxes, regressed),) = seen
            assert len(boxes) and torch.isfinite(regressed).all()
            h, w = data[0]["image"].shape[1:]
            side = mask_boxes[:, 2:] - mask_boxes[:, :2]
            grow = side * cfg.MODEL.MASK_PYRAMID.REFINE_BOX_MARGIN + 2.0  # half a p2 cell
            grown = torch.cat([mask_boxes[:, :2] - grow, mask_boxes[:, 2:] + grow], 1)
            if deltas[2] == 0:
                torch.testing.assert_close(regressed, mask_boxes)
                want = grown if box == "union" else mask_boxes
            else:
                centre = (mask_boxes[:, :2] + mask_boxes[:, 2:]) / 2
                doubled = torch.cat([centre - side, centre + side], 1)
                torch.testing.assert_close(
                    regressed, doubled.clamp(min=0).minimum(torch.tensor([w, h, w, h]))
                )
                want = torch.cat([grown[:, :2].minimum(doubled[:, :2]), grown[:, 2:].maximum(
                    doubled[:, 2:])], 1) if box == "union" else doubled  # fmt: skip
                assert (want != grown).any()
            want = want.clamp(min=0).minimum(torch.tensor([w, h, w, h], dtype=want.dtype))
            torch.testing.assert_close(boxes, want)


@pytest.mark.parametrize("box", ["union", "regressed"])
def test_refine_box_is_the_grown_mask_box_where_nothing_was_regressed(mp_cfg, box):
    """A NaN regressed box (a pyramid the class head did not score) leaves the grown mask box,
    with either REFINE_BOX."""
    # every local peak a root and no pruning: several pyramids from the untrained model
    cfg = mp_cfg(
        *BOX_REGRESSION,
        *mp(PEAK_THRESHOLD_TEST=0.0, LOW_THRESHOLD=0.0, TOPK_KEEP=1000, REFINE_BOX=box),
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    records = _capture_records(model)
    data = _one_batch(cfg)[:1]
    features = []
    model.backbone.register_forward_hook(lambda m, i, out: features.append(out))
    with torch.no_grad():
        model(data)
        rec = records[0][-1]
        pyr = rec.pyramids
        sizes = [tuple(data[0]["image"].shape[1:])]
        _, plain = model._refine(pyr, rec.stride, sizes, features[0])
        huge = torch.tensor([[0.0, 0.0, 1e4, 1e4]]).repeat(len(pyr), 1)
        huge[::2] = float("nan")
        _, boxes = model._refine(pyr, rec.stride, sizes, features[0], huge)
    assert len(pyr) >= 2
    torch.testing.assert_close(boxes[::2], plain[::2])
    h, w = sizes[0]
    assert (boxes[1::2] == torch.tensor([0.0, 0.0, w, h])).all()


def test_box_regression_loss_is_fast_rcnns_l1_on_close_rows(mp_cfg):
    """``loss_box_reg``: L1 between the predicted deltas and Box2BoxTransform's deltas from each
    row's box to its instance's box, summed over the rows of an instance whose box overlaps it
    with IoU >= BOX_REG_MIN_IOU, divided by all rows; it trains the class head's box layers, not
    the layers the classes share."""
    cfg = mp_cfg(*BOX_REGRESSION)
    model = build_model(cfg)
    targets = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 8.0, 8.0]])}
    boxes = torch.tensor(
        [
            [10.0, 10.0, 30.0, 30.0],  # the instance's own box: deltas 0
            [12.0, 10.0, 30.0, 26.0],  # close to instance 0: regressed
            [40.0, 40.0, 60.0, 60.0],  # far from instance 1 (IoU 0): not regressed
            [0.0, 0.0, 8.0, 8.0],  # no instance (-1): not regressed
        ]
    )
    instances = torch.tensor([0, 0, 1, -1])
    deltas = torch.randn(4, 4, requires_grad=True)
    loss = model._box_reg_loss(deltas, boxes, instances, targets)
    want = model.box_transform.get_deltas(boxes[:2], targets["boxes"][[0, 0]])
    expected = (deltas[:2] - want).abs().sum() / 4
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (deltas.grad[:2] != 0).all() and (deltas.grad[2:] == 0).all()
    model.mp.BOX_REG_MIN_IOU = 0.0  # every row of an instance
    loss = model._box_reg_loss(deltas.detach(), boxes, instances, targets)
    want = model.box_transform.get_deltas(boxes[:3], targets["boxes"][[0, 0, 1]])
    torch.testing.assert_close(loss, (deltas.detach()[:3] - want).abs().sum() / 4)
    # through the model: a loss that trains the box output
    torch.manual_seed(0)
    model = build_model(cfg)
    with EventStorage(0):
        losses = model(_one_batch(cfg))
    assert losses["loss_box_reg"] > 0
    losses["loss_box_reg"].backward()
    assert model.class_head.bbox_pred.weight.grad.abs().sum() > 0
    assert model.class_head.box_fc[0].weight.grad.abs().sum() > 0
    # its own layer on the class head's convolutions, which it does not train
    assert all(p.grad is None for p in model.class_head.fc.parameters())


def test_box_reg_head_own_pools_a_context_box_and_trains_the_fpn(mp_cfg):
    """BOX_REG_HEAD "own": the deltas come from a head of its own that pools each mask box grown
    by BOX_REG_CONTEXT of its side on each side (the class head pools the mask box itself); the
    deltas are still from the mask box (forced to 0, the regressed box is the mask box); its
    loss trains that head and the backbone, not the class head's layers."""
    cfg = mp_cfg(*BOX_REGRESSION, *mp(BOX_REG_HEAD="own", BOX_REG_CONTEXT=0.5))
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.class_head.bbox_pred is None and model.class_head.box_fc is None
    data = _one_batch(cfg)[:1]
    pooled = {}
    for name in ("class_head", "box_head"):
        head = getattr(model, name)

        def spy(maps, boxes, batch, masks, _forward=head.forward, _name=name):
            pooled[_name] = boxes.detach().clone()
            return _forward(maps, boxes, batch, masks)

        head.forward = spy
    seen = []
    refine = model._refine

    def refine_spy(pyr, stride, sizes, features, regressed=None, classes=None, passes=1):
        seen.append((model._mask_boxes(pyr, stride, sizes)[0], regressed))
        return refine(pyr, stride, sizes, features, regressed, classes, passes)

    model._refine = refine_spy
    _force_deltas(model, [0.0, 0.0, 0.0, 0.0])
    model.eval()
    with torch.no_grad():
        model(data)
    side = pooled["class_head"][:, 2:] - pooled["class_head"][:, :2]
    want = torch.cat(
        [pooled["class_head"][:, :2] - side / 2, pooled["class_head"][:, 2:] + side / 2], 1
    )
    assert len(want) and (side > 0).all()
    torch.testing.assert_close(pooled["box_head"], want)
    ((mask_boxes, regressed),) = seen
    assert len(regressed) and torch.isfinite(regressed).all()
    torch.testing.assert_close(regressed, mask_boxes)
    # training: the box loss reaches the box head and the backbone, not the class head
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(_one_batch(cfg))
    assert losses["loss_box_reg"] > 0
    losses["loss_box_reg"].backward()
    assert model.box_head.bbox_pred.weight.grad.abs().sum() > 0
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.box_head.fc.parameters()
    )
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.class_head.parameters())

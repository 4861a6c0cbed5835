"""The heart of the project: a detectron2 GeneralizedRCNN checkpoint, trained on `shapes`, loaded
into ScratchMaskRCNN gives the same predictions; and on the same batch and seed, the same losses
and gradients."""

import copy
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from maskpyramid.engine import Trainer
from scratch_mask_rcnn import ScratchMaskRCNN
from tests.conftest import REPO, TINY_MASK_RCNN  # noqa: F401  (fixtures come from conftest)

TRAIN_ITERS = 60


def _cfg(output_dir, *opts):
    from detectron2.config import get_cfg

    import scratch_mask_rcnn
    from maskpyramid.config import add_maskpyramid_config, resolve_num_classes

    cfg = get_cfg()
    add_maskpyramid_config(cfg)
    scratch_mask_rcnn.add_scratch_mask_rcnn_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs/shapes/mask_rcnn_R_18_FPN.yaml"))
    cfg.merge_from_list(TINY_MASK_RCNN + ["OUTPUT_DIR", output_dir] + list(opts))
    resolve_num_classes(cfg)
    return cfg


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    """detectron2's own Mask R-CNN trained for a few dozen iterations on tiny shapes."""
    out = str(tmp_path_factory.mktemp("d2_trained"))
    cfg = _cfg(
        out,
        "SOLVER.MAX_ITER", TRAIN_ITERS, "SOLVER.BASE_LR", 0.005, "SOLVER.WARMUP_ITERS", 10,
        "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 5.0,
        "SOLVER.CHECKPOINT_PERIOD", 100000,
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, os.path.join(out, "model_final.pth")


def _pair(cfg, weights, *opts):
    cfg = cfg.clone()
    cfg.merge_from_list(list(opts))
    d2 = build_model(cfg)
    DetectionCheckpointer(d2).load(weights)
    scfg = cfg.clone()
    scfg.MODEL.META_ARCHITECTURE = "ScratchMaskRCNN"
    ours = build_model(scfg)
    assert isinstance(ours, ScratchMaskRCNN)
    checkpointer = DetectionCheckpointer(ours)
    incompatible = checkpointer._load_model(checkpointer._load_file(weights))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    return d2, ours


def _inputs(cfg, names=("tiny_shapes_val", "tiny_shapes_train"), limit=12):
    inputs = []
    for name in names:
        for batch in Trainer.build_test_loader(cfg, name):
            inputs.extend(batch)
    return inputs[:limit]


def test_checkpoint_keys_are_detectron2s(trained):
    cfg, weights = trained
    d2, ours = _pair(cfg, weights)
    d2_state, our_state = d2.state_dict(), ours.state_dict()
    assert d2_state.keys() == our_state.keys()
    for k in d2_state:
        assert torch.equal(d2_state[k], our_state[k]), k


@pytest.mark.parametrize("score_thresh", [0.05, 0.0])
def test_same_predictions_as_detectron2(trained, score_thresh):
    """Same classes, boxes within 1e-3, scores within 1e-4, masks IoU > 0.99; at threshold 0 the
    full 100 detections per image, NMS and top-k included."""
    cfg, weights = trained
    d2, ours = _pair(cfg, weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", score_thresh)
    d2.eval()
    ours.eval()
    total = 0
    with torch.no_grad():
        for x in _inputs(cfg):
            ref = d2([x])[0]["instances"]
            got = ours([x])[0]["instances"]
            assert len(got) == len(ref), x["file_name"]
            total += len(ref)
            assert torch.equal(got.pred_classes, ref.pred_classes)
            assert torch.allclose(got.pred_boxes.tensor, ref.pred_boxes.tensor, atol=1e-3, rtol=0)
            assert torch.allclose(got.scores, ref.scores, atol=1e-4, rtol=0)
            inter = (got.pred_masks & ref.pred_masks).flatten(1).sum(1).float()
            union = (got.pred_masks | ref.pred_masks).flatten(1).sum(1).float()
            iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
            assert bool((iou > 0.99).all()), iou.min()
    assert total >= (12 if score_thresh > 0 else 300)  # a model that detects things


def test_same_losses_and_gradients_as_detectron2(trained):
    """Same batch, same seed: the samplers draw the same RoIs, so every loss and gradient agrees."""
    cfg, weights = trained
    d2, ours = _pair(cfg, weights)
    d2.train()
    ours.train()
    batch = next(iter(build_detection_train_loader(cfg, mapper=Trainer.build_train_mapper(cfg))))
    results = []
    for model in (d2, ours):
        torch.manual_seed(7)
        with EventStorage():
            losses = model(copy.deepcopy(batch))
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in losses.items()}, grads))
    (ref_losses, ref_grads), (our_losses, our_grads) = results
    assert ref_losses.keys() == our_losses.keys()
    for k in ref_losses:
        assert our_losses[k] == pytest.approx(ref_losses[k], rel=1e-4, abs=1e-6), k
    assert ref_grads.keys() == our_grads.keys()
    for k in ref_grads:
        assert torch.allclose(our_grads[k], ref_grads[k], rtol=1e-3, atol=1e-5), k


@pytest.mark.parametrize(
    "opts", [(), ("MODEL.ROI_BOX_HEAD.NUM_CONV", 2, "MODEL.ROI_BOX_HEAD.NORM", "GN")]
)
def test_same_seed_same_initial_weights(make_cfg, opts):
    """Built under one seed, both models start from the same weights: a training comparison
    between them differs only by the code, not by the initialisation."""
    cfg = make_cfg(*opts)
    states = []
    for arch in ("GeneralizedRCNN", "ScratchMaskRCNN"):
        c = cfg.clone()
        c.MODEL.META_ARCHITECTURE = arch
        torch.manual_seed(11)
        states.append(build_model(c).state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k

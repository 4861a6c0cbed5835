"""Trainer: the real Mask R-CNN on tiny data; resume, atomic checkpoints, NaN, bad input."""

import os
import shutil

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from maskpyramid.config import resolve_num_classes
from maskpyramid.engine import Trainer


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_continues_exactly(make_cfg, tmp_path):
    straight = make_cfg("SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2,
                        "SOLVER.STEPS", (3,), output_dir=tmp_path / "a")  # fmt: skip
    Trainer(straight).train()
    # the same run, stopped after the checkpoint of iteration 1 and resumed in a new trainer
    os.makedirs(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "model_0000001.pth", tmp_path / "b")
    (tmp_path / "b" / "last_checkpoint").write_text("model_0000001.pth")
    resumed_cfg = straight.clone()
    resumed_cfg.OUTPUT_DIR = str(tmp_path / "b")
    trainer = Trainer(resumed_cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    trainer.train()

    a, b = _load(tmp_path / "a" / "model_final.pth"), _load(tmp_path / "b" / "model_final.pth")
    assert a["iteration"] == b["iteration"] == 3
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    assert a["trainer"]["hooks"] == b["trainer"]["hooks"]  # the LR scheduler's state
    a_opt, b_opt = a["trainer"]["_trainer"]["optimizer"], b["trainer"]["_trainer"]["optimizer"]
    assert len(a_opt["state"]) == len(b_opt["state"]) > 0
    for sa, sb in zip(a_opt["state"].values(), b_opt["state"].values()):
        torch.testing.assert_close(sa["momentum_buffer"], sb["momentum_buffer"], rtol=0, atol=1e-6)
    changed = [k for k in a["model"] if not torch.equal(a["model"][k], _load(
        tmp_path / "a" / "model_0000001.pth")["model"][k])]  # fmt: skip
    assert changed, "training did not change the weights"


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    trainer = Trainer(make_cfg())
    trainer.checkpointer.save("model_0000", iteration=0)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.checkpointer.save("model_0001", iteration=1)
    monkeypatch.undo()
    files = sorted(f for f in os.listdir(tmp_path) if "checkpoint" in f or "model" in f)
    assert files == ["last_checkpoint", "model_0000.pth"]  # no partial file left behind
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000.pth"
    assert trainer.checkpointer.resume_or_load("", resume=True)["iteration"] == 0


def test_nan_loss_stops_training_with_the_iteration(make_cfg):
    trainer = Trainer(make_cfg("SOLVER.MAX_ITER", 5))
    model = trainer._trainer.model
    real_forward = model.forward

    def forward(batched_inputs):
        losses = real_forward(batched_inputs)
        if trainer.iter == 2:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    model.forward = forward
    with pytest.raises(FloatingPointError, match="iteration=2"):
        trainer.train()


def test_training_on_images_without_annotations(make_cfg, tiny_shapes):
    from detectron2.data import DatasetCatalog

    records = DatasetCatalog.get("tiny_shapes_train")[:2]
    for r in records:
        r["annotations"] = []
    DatasetCatalog.register("tiny_shapes_empty", lambda: records)
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get("tiny_shapes_empty").thing_classes = list(
        MetadataCatalog.get("tiny_shapes_train").thing_classes
    )
    cfg = make_cfg("DATASETS.TRAIN", ("tiny_shapes_empty",),
                   "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False)  # fmt: skip
    trainer = Trainer(cfg)
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER  # every iteration ran, none raised on NaN


def _instances(h, w, boxes):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, int(y0) : int(y1), int(x0) : int(x1)] = True
    inst.gt_masks = BitMasks(masks)
    return inst


def test_tiny_images_half_empty_batches_and_nan_features(make_cfg):
    cfg = make_cfg()
    model = build_model(cfg)
    batch = [
        {"image": torch.rand(3, 20, 20) * 255, "instances": _instances(20, 20, [[2, 2, 15, 15]])},
        {"image": torch.rand(3, 20, 33) * 255, "instances": _instances(20, 33, [])},
    ]
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": torch.rand(3, 20, 20) * 255}])
        nan_out = model([{"image": torch.full((3, 40, 40), float("nan"))}])
    assert outputs[0]["instances"].image_size == (20, 20)
    assert torch.isfinite(nan_out[0]["instances"].scores).all()


def test_num_classes_follow_the_dataset_and_mismatch_is_an_error(make_cfg):
    cfg = make_cfg()
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 5
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    with pytest.raises(ValueError, match="NUM_CLASSES is 80, but the training set"):
        resolve_num_classes(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    cfg.DATASETS.TEST = ("fruits_nuts",)
    from maskpyramid.data.datasets import register_fruits_nuts

    if register_fruits_nuts() is None:
        pytest.skip("fruits_nuts absent")
    with pytest.raises(ValueError, match="must share their classes"):
        resolve_num_classes(cfg)


def test_stream_resumes_at_its_position_and_shards_like_one_process(monkeypatch):
    from detectron2.utils import comm

    from maskpyramid.data.sampling import ResumableTrainingSampler

    one = ResumableTrainingSampler(16, seed=3, total_batch_size=4)
    stream = [k for _, k in zip(range(40), iter(one))]
    assert [k // 16 for k in stream] == list(range(40))  # positions
    assert sorted(k % 16 for k in stream[:16]) == list(range(16))  # a shuffled pass
    one.start_iter = 3
    assert [k for _, k in zip(range(8), iter(one))] == stream[12:20]

    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        shards.append(
            [k for _, k in zip(range(20), iter(ResumableTrainingSampler(16, 3, True, 4)))]
        )
    for it in range(10):  # iteration `it`: 2 images per rank, together the 4 of one process
        both = shards[0][2 * it : 2 * it + 2] + shards[1][2 * it : 2 * it + 2]
        assert sorted(both) == sorted(stream[4 * it : 4 * it + 4])


@pytest.mark.parametrize("clip_type", ["value", "norm"])
def test_gradient_clipping_bounds_each_parameter_and_skips_those_without_gradient(
    make_cfg, clip_type
):
    """SOLVER.CLIP_GRADIENTS clips each parameter's gradient by value (every element to
    CLIP_VALUE) or by norm (the parameter's norm to CLIP_VALUE, direction kept); a parameter that
    got no gradient this step (a MaskPyramid level without pyramids) is left alone."""
    cfg = make_cfg(
        "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type,
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 5.0, "SOLVER.BASE_LR", 0.0,
        "SOLVER.WEIGHT_DECAY", 0.0, "SOLVER.MOMENTUM", 0.0,
    )  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = Trainer.build_optimizer(cfg, model)
    large, small = model[0].weight, model[0].bias
    large.grad = torch.full_like(large, 10.0)  # norm 10 * sqrt(12) = 34.6
    small.grad = torch.tensor([0.3, -0.4, 0.0])  # norm 0.5: under either bound
    optimizer.step()
    assert model[1].weight.grad is None and model[1].bias.grad is None
    assert torch.equal(small.grad, torch.tensor([0.3, -0.4, 0.0]))
    if clip_type == "value":
        assert torch.equal(large.grad, torch.full_like(large, 5.0))
    else:
        assert torch.allclose(large.grad.norm(), torch.tensor(5.0))
        assert torch.allclose(large.grad, torch.full_like(large, 5.0 / 12**0.5))


def test_metrics_record_the_peak_memory(make_cfg, tmp_path):
    import json
    import resource

    Trainer(make_cfg("SOLVER.MAX_ITER", 3)).train()
    with open(tmp_path / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    peaks = [r["peak_memory_mib"] for r in records if "peak_memory_mib" in r]
    assert peaks, "metrics.json has no peak_memory_mib"
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # this process's peak RSS, written after the last step: hundreds of MiB, never above now
    assert 50 < peaks[-1] <= now

"""VIS_PERIOD: per-level target vs predicted pyramid masks go to the EventStorage."""

import pytest
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from maskpyramid.engine.trainer import Trainer
from tests.maskpyramid.modeling.test_meta_arch import CONFIG, TINY

OPTS = TINY + ["MODEL.MASK_PYRAMID.READOUT_FEATURES", ["p2"]]


@pytest.mark.parametrize("period, iteration, drawn", [(2, 4, True), (2, 3, False), (0, 0, False)])
def test_training_images_per_level_every_vis_period(make_cfg, period, iteration, drawn):
    cfg = make_cfg(*OPTS, "VIS_PERIOD", period, config_file=CONFIG)
    model = build_model(cfg).train()
    loader = build_detection_train_loader(cfg, mapper=Trainer.build_train_mapper(cfg))
    batch = next(iter(loader))
    with EventStorage(iteration) as storage:
        model(batch)
    names = [name for name, _, _ in storage._vis_data]
    if not drawn:
        assert names == []
        return
    assert names == [f"pyramids/{f}: target (left) vs predicted (right) masks"
                     for f in ("p6", "p5", "p4", "p3", "p2")]  # fmt: skip
    h, w = batch[0]["image"].shape[1:]
    for _, img, it in storage._vis_data:
        assert it == iteration
        # CHW RGB, the two halves side by side under their titles
        assert img.shape[0] == 3 and img.shape[2] == 2 * w + 4 and img.shape[1] > h
        assert img.dtype.name == "uint8" and img.max() > 0


def test_trainer_writes_the_images_to_tensorboard(make_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(*OPTS, "VIS_PERIOD", 1, "SOLVER.MAX_ITER", 2, config_file=CONFIG)
    Trainer(cfg).train()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert "pyramids/p3: target (left) vs predicted (right) masks" in tags
    assert len(events.Images(tags[0])) >= 1

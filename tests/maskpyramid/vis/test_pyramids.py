"""The pyramid growth viewer draws what the model's records hold, level by level."""

import importlib.util
import os

import cv2
import detectron2.data.transforms as T
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.modeling import build_model

from maskpyramid.data.mapper import MaskPyramidDatasetMapper
from maskpyramid.vis.pyramids import PANELS, palette, upsample_to_image, write_growth_views
from tests.conftest import REPO
from tests.maskpyramid.modeling.test_meta_arch import CONFIG, TINY

# the read-out level p2 too, and low thresholds: an untrained model's pyramids survive
OPTS = TINY + ["MODEL.MASK_PYRAMID.READOUT_FEATURES", ["p2"],
               "MODEL.MASK_PYRAMID.SCORE_THRESH_TEST", 0.0]  # fmt: skip


@pytest.fixture
def model_and_input(make_cfg):
    cfg = make_cfg(*OPTS, config_file=CONFIG)
    model = build_model(cfg).eval()
    record = DatasetCatalog.get("tiny_shapes_val")[1]
    mapper = MaskPyramidDatasetMapper(cfg, is_train=True)
    mapper.augmentations = T.AugmentationList(utils.build_augmentation(cfg, is_train=False))
    return cfg, model, mapper(dict(record)), utils.read_image(record["file_name"], "RGB")


def _colours_present(image, colours):
    flat = image.reshape(-1, 3)
    return {k for k, c in enumerate(colours) if (flat == c).all(1).any()}


def test_identities_drawn_are_the_surviving_pyramids_of_each_level(model_and_input, tmp_path):
    cfg, model, inputs, original = model_and_input
    paths, views, _ = write_growth_views(
        model, inputs, original, MetadataCatalog.get("tiny_shapes_val"), str(tmp_path), 0.0
    )
    with torch.no_grad():
        _, records = model.inference_with_records([inputs])
    assert [v.name for v in views] == ["p6", "p5", "p4", "p3", "p2"]
    colours = palette(max(max(v.identities, default=0) for v in views) + 20)
    seen = {}
    for view, rec in zip(views, records):
        survivors = int((rec.pyramids.batch == 0).sum())
        assert survivors > 0, f"{view.name}: the test needs surviving pyramids"
        # each surviving pyramid is one exact colour in the gallery, and no other is
        assert len(view.identities) == len(set(view.identities)) == survivors
        assert _colours_present(view.gallery, colours) == set(view.identities)
        # and has its colour in the written PNG
        png = cv2.imread(paths[view.name])[:, :, ::-1]
        assert _colours_present(png, colours) >= set(view.identities)
        assert view.num_spawned == int((rec.spawned[:, 0] == 0).sum())
        assert view.num_pruned == int(rec.num_pruned[0])
        for panel in PANELS:
            assert view.panels[panel].shape[1] == inputs["image"].shape[2]
        # a pyramid keeps its identity from level to level: its root and score do not change
        for ident, score in zip(view.identities, view.scores):
            assert seen.setdefault(ident, score) == pytest.approx(score)
    # roots spawn on the root levels only, and pyramids carry over into the next level
    assert views[-1].num_spawned == 0
    assert set(views[-1].identities) <= set().union(*(v.identities for v in views[:-1]))
    assert os.path.getsize(paths["overview"]) > 0
    assert "targets: 0 instances" not in str(views)  # this image has instances


def test_upsample_to_image_maps_cells_to_their_pixels():
    grid = np.arange(6).reshape(2, 3)
    up = upsample_to_image(grid, 4, 7, 10)  # an input smaller than the padded grid
    assert up.shape == (7, 10)
    assert up[0, 0] == 0 and up[3, 3] == 0 and up[4, 4] == 4 and up[6, 9] == 5
    assert (upsample_to_image(grid, 4, 9, 13)[8:, 12:] == 0).all()  # beyond the grid: none


def test_palette_colours_are_distinct_and_not_grey():
    colours = palette(500).astype(int)
    assert len({tuple(c) for c in colours}) == 500
    assert (colours.max(1) - colours.min(1) > 40).all()
    assert (palette(64) == palette(500)[:64]).all()  # identities keep their colours as n grows


def _tool(name):
    path = os.path.join(REPO, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_viewer_command_writes_every_level_and_names_bad_input(make_cfg, tmp_path, capsys):
    main = _tool("visualize_pyramids").main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--dataset NAME" in capsys.readouterr().out
    cfg = make_cfg(*OPTS, config_file=CONFIG)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.dump())
    weights = str(tmp_path / "model.pth")
    base = ["--config-file", str(config_file), "--output", str(tmp_path / "out")]
    assert main(base + ["--dataset", "tiny_shapes_val", "--index", "0", "2",
                        "--opts", "MODEL.WEIGHTS", weights]) == 0  # fmt: skip
    for folder in ("tiny_shapes_val_0", "tiny_shapes_val_2"):
        files = sorted(os.listdir(tmp_path / "out" / folder))
        assert files == ["overview.png", "p2.png", "p3.png", "p4.png", "p5.png", "p6.png"]
    image = DatasetCatalog.get("tiny_shapes_val")[0]["file_name"]
    assert main(base + ["--input", image, "--opts", "MODEL.WEIGHTS", weights]) == 0
    stem = os.path.splitext(os.path.basename(image))[0]
    assert os.path.isfile(tmp_path / "out" / stem / "overview.png")

    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    for args, message in [
        (["--input", str(bad), "--opts", "MODEL.WEIGHTS", weights], str(bad)),
        (["--input", image, "--opts", "MODEL.WEIGHTS", str(tmp_path / "none.pth")], "none.pth"),
        (["--dataset", "tiny_shapes_val", "--index", "99", "--opts", "MODEL.WEIGHTS", weights],
         "tiny_shapes_val has 6 images"),
        (["--dataset", "no_such_set", "--opts", "MODEL.WEIGHTS", weights], "no_such_set"),
        (["--input", str(empty), "--opts", "MODEL.WEIGHTS", weights], f"folder {empty} holds no"),
    ]:  # fmt: skip
        with pytest.raises((SystemExit, FileNotFoundError)) as e:
            main(base + args)
        assert message in str(e.value)

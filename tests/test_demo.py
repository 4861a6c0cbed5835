"""demo.py on the three models (tiny configs, random weights) and on bad input.

``main([...])`` runs in-process; errors must exit with a message naming the culprit, without a
traceback.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from tests.conftest import REPO
from tests.maskpyramid.modeling.test_meta_arch import TINY

MASK_RCNN = "configs/shapes/mask_rcnn_R_18_FPN.yaml"
SCRATCH = "configs/shapes/scratch_mask_rcnn_R_18_FPN.yaml"
MASK_PYRAMID = "configs/shapes/mask_pyramid_R_18_FPN.yaml"
# an untrained MaskPyramid scores far below the shapes config's thresholds: let it output
TINY_PYRAMID = TINY + [
    "MODEL.MASK_PYRAMID.SCORE_THRESH_TEST", 0.0, "MODEL.MASK_PYRAMID.PEAK_THRESHOLD_TEST", 0.0,
]  # fmt: skip
OPTS = {MASK_PYRAMID: TINY_PYRAMID, SCRATCH: [], MASK_RCNN: []}


def _load_demo():
    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


@pytest.fixture
def write_config(make_cfg, tmp_path):
    """write_config(config_file, *opts, weights=True) -> (config yaml, checkpoint) of a tiny
    model with random weights."""
    count = [0]

    def write(config_file, *opts, weights=True):
        count[0] += 1
        directory = tmp_path / f"model{count[0]}"
        directory.mkdir()
        cfg = make_cfg(*OPTS[config_file], *opts, config_file=config_file)
        checkpoint = ""
        if weights:
            DetectionCheckpointer(build_model(cfg), save_dir=str(directory)).save("model_final")
            checkpoint = str(directory / "model_final.pth")
        cfg.MODEL.WEIGHTS = checkpoint
        path = directory / "config.yaml"
        path.write_text(cfg.dump())
        return str(path), checkpoint

    return write


@pytest.fixture
def images(tiny_shapes, tmp_path):
    """A folder with two 64x64 images of tiny_shapes_val."""
    folder = tmp_path / "images"
    folder.mkdir()
    for record in DatasetCatalog.get("tiny_shapes_val")[:2]:
        shutil.copy(record["file_name"], folder)
    return folder


def run_demo(config, inputs, output, *args):
    return demo.main(
        ["--config-file", config, "--input", *map(str, inputs), "--output", str(output), *args]
    )


def run_failing(capsys, config, inputs, output, *args):
    """The exit status and stderr of a run that must fail without a traceback."""
    with pytest.raises(SystemExit) as info:
        run_demo(config, inputs, output, *args)
    err = capsys.readouterr().err
    assert info.value.code not in (0, None), err
    assert "Traceback" not in err
    return info.value.code, err


def read_png(path):
    return cv2.imread(str(path), cv2.IMREAD_COLOR)


@pytest.mark.parametrize("config_file", [MASK_PYRAMID, SCRATCH, MASK_RCNN])
def test_draws_one_png_per_input(write_config, images, tmp_path, config_file):
    config, _ = write_config(config_file)
    inputs = sorted(images.iterdir())
    stems = [p.stem for p in inputs]
    drawn = tmp_path / "drawn"
    assert run_demo(config, [images / "*.png"], drawn, "--confidence-threshold", "0") == 0
    blank = tmp_path / "blank"
    assert run_demo(config, [images], blank, "--confidence-threshold", "1.1") == 0
    for output in (drawn, blank):
        assert sorted(p.name for p in output.iterdir()) == [f"{s}.png" for s in stems]
    for path in inputs:
        image = read_png(path)
        assert image.shape == (64, 64, 3)
        assert read_png(drawn / f"{path.stem}.png").shape == image.shape
        assert not np.array_equal(read_png(drawn / f"{path.stem}.png"), image)  # instances
        assert np.array_equal(read_png(blank / f"{path.stem}.png"), image)  # nothing drawn


def test_mask_pyramid_draws_from_its_vis_score_thresh(write_config, images, tmp_path):
    image = read_png(sorted(images.iterdir())[0])
    name = sorted(images.iterdir())[0].stem + ".png"
    for thresh, drawn in [(0.0, True), (1.1, False)]:
        config, _ = write_config(MASK_PYRAMID, "MODEL.MASK_PYRAMID.VIS_SCORE_THRESH", thresh)
        out = tmp_path / f"out_{thresh}"
        assert run_demo(config, [images], out) == 0
        assert np.array_equal(read_png(out / name), image) != drawn


def test_duplicates_once_and_shared_stems_numbered(write_config, images, tmp_path):
    config, _ = write_config(MASK_RCNN)
    other = tmp_path / "other"
    shutil.copytree(images, other)
    first = sorted(images.iterdir())[0]
    out = tmp_path / "out"
    inputs = [first, images, images / "*.png", other]
    assert run_demo(config, inputs, out, "--confidence-threshold", "1.1") == 0
    stems = sorted(p.stem for p in images.iterdir())
    want = [f"{s}{suffix}.png" for s in stems for suffix in ("", "_1")]
    assert sorted(p.name for p in out.iterdir()) == sorted(want)
    assert np.array_equal(read_png(out / f"{first.stem}_1.png"), read_png(other / first.name))


def test_unreadable_image_is_reported_and_the_others_drawn(write_config, images, tmp_path, capsys):
    config, _ = write_config(MASK_RCNN)
    garbage = images / "broken.png"
    garbage.write_bytes(b"this is not a png")
    out = tmp_path / "out"
    status, err = run_failing(capsys, config, [images], out, "--confidence-threshold", "1.1")
    assert status == 1
    assert "1 of 3 images could not be read" in err
    assert f"{garbage}: cannot read the image" in err
    good = sorted(p.stem for p in images.iterdir() if p != garbage)
    assert sorted(p.name for p in out.iterdir()) == [f"{s}.png" for s in good]


def test_empty_folder_is_named(write_config, tmp_path, capsys):
    config, _ = write_config(MASK_RCNN, weights=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    status, err = run_failing(capsys, config, [empty], tmp_path / "out")
    assert f"folder {empty} holds no image" in err
    assert not (tmp_path / "out").exists()


def test_pattern_matching_nothing_is_named(write_config, images, tmp_path, capsys):
    config, _ = write_config(MASK_RCNN, weights=False)
    pattern = str(images / "*.jpg")
    status, err = run_failing(capsys, config, [images, pattern], tmp_path / "out")
    assert f"no image file matches {pattern}" in err


def test_missing_or_empty_checkpoint_is_named(write_config, images, tmp_path, capsys):
    config, _ = write_config(MASK_RCNN, weights=False)
    status, err = run_failing(capsys, config, [images], tmp_path / "out")
    assert "MODEL.WEIGHTS is empty: pass the trained checkpoint" in err
    missing = str(tmp_path / "run" / "model_final.pth")
    status, err = run_failing(
        capsys, config, [images], tmp_path / "out", "--opts", "MODEL.WEIGHTS", missing
    )
    assert f"MODEL.WEIGHTS {missing}: no such checkpoint file" in err


@pytest.mark.parametrize(
    "weights_of, config_file, held, this",
    [
        (MASK_PYRAMID, MASK_RCNN, "a MaskPyramid", "GeneralizedRCNN"),
        (
            MASK_RCNN,
            MASK_PYRAMID,
            "a Mask R-CNN (GeneralizedRCNN or ScratchMaskRCNN)",
            "MaskPyramid",
        ),
    ],
)
def test_checkpoint_of_another_architecture_is_named(
    write_config, images, tmp_path, capsys, weights_of, config_file, held, this
):
    _, checkpoint = write_config(weights_of)
    config, _ = write_config(config_file, weights=False)
    opts = ["--opts", "MODEL.WEIGHTS", checkpoint]
    status, err = run_failing(capsys, config, [images], tmp_path / "out", *opts)
    assert f"{checkpoint} holds the weights of {held}, not of this {this} (config {config})" in err
    assert "tensors are missing" in err


def test_checkpoint_with_a_tensor_of_another_shape_is_named(write_config, images, tmp_path, capsys):
    config, checkpoint = write_config(SCRATCH)
    state = torch.load(checkpoint)
    key = "roi_heads.box_predictor.cls_score.weight"  # as trained with 2 classes, not 5
    state["model"][key] = state["model"][key][:3]
    torch.save(state, checkpoint)
    status, err = run_failing(capsys, config, [images], tmp_path / "out")
    assert f"{checkpoint} does not fit this ScratchMaskRCNN (config {config})" in err
    assert "1 of its" in err and f"tensors have another shape, e.g. {key}" in err


def test_help_exits_0():
    proc = subprocess.run(
        [sys.executable, "demo.py", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "--confidence-threshold" in proc.stdout and "exit status" in proc.stdout

"""load_checkpoint and Predictor: an inference model gets every weight from its checkpoint, or an
error saying what the checkpoint holds."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from maskpyramid.engine import CheckpointError, Predictor, load_checkpoint
from tests.maskpyramid.modeling.test_meta_arch import TINY

MASK_RCNN = "configs/shapes/mask_rcnn_R_18_FPN.yaml"
SCRATCH = "configs/shapes/scratch_mask_rcnn_R_18_FPN.yaml"
MASK_PYRAMID = "configs/shapes/mask_pyramid_R_18_FPN.yaml"


def tiny_cfg(make_cfg, config_file, *opts):
    extra = TINY if config_file == MASK_PYRAMID else []
    return make_cfg(*extra, *opts, config_file=config_file)


def save(model, directory, name="model", **extra):
    DetectionCheckpointer(model, save_dir=str(directory)).save(name, **extra)
    return str(directory / f"{name}.pth")


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("config_file", [MASK_RCNN, MASK_PYRAMID])
def test_loads_every_tensor_and_returns_the_rest(make_cfg, tmp_path, config_file):
    cfg = tiny_cfg(make_cfg, config_file)
    trained = build_model(cfg)
    path = save(trained, tmp_path, iteration=7)
    torch.manual_seed(1)
    model = build_model(cfg)
    extra = load_checkpoint(model, path)
    assert_same_weights(model, trained)
    assert extra == {"iteration": 7}


def test_mask_rcnn_checkpoints_load_into_each_other(make_cfg, tmp_path):
    """ScratchMaskRCNN keeps GeneralizedRCNN's state-dict keys: no architecture error."""
    detectron2_model = build_model(tiny_cfg(make_cfg, MASK_RCNN))
    scratch = build_model(tiny_cfg(make_cfg, SCRATCH))
    load_checkpoint(scratch, save(detectron2_model, tmp_path))
    assert_same_weights(scratch, detectron2_model)


def test_empty_path_is_an_error(make_cfg):
    model = build_model(tiny_cfg(make_cfg, MASK_RCNN))
    with pytest.raises(CheckpointError, match=r"^MODEL.WEIGHTS is empty: pass the trained"):
        load_checkpoint(model, "")


def test_missing_file_names_key_and_path(make_cfg, tmp_path):
    model = build_model(tiny_cfg(make_cfg, MASK_RCNN))
    path = str(tmp_path / "nothing" / "model_final.pth")
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(model, path, key="--weights")
    assert "--weights" in str(info.value) and path in str(info.value)


def test_folder_is_an_error_naming_its_checkpoint(make_cfg, tmp_path):
    model = build_model(tiny_cfg(make_cfg, MASK_RCNN))
    with pytest.raises(CheckpointError, match="is a folder") as info:
        load_checkpoint(model, str(tmp_path))
    assert str(tmp_path / "model_final.pth") in str(info.value)


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_unreadable_file_names_the_file(make_cfg, tmp_path, content):
    model = build_model(tiny_cfg(make_cfg, MASK_RCNN))
    path = tmp_path / "model_final.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="torch cannot read") as info:
        load_checkpoint(model, str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [[1, 2], {"model": {"a": "b"}}], ids=["list", "strings"])
def test_file_without_a_state_dict_is_an_error(make_cfg, tmp_path, content):
    model = build_model(tiny_cfg(make_cfg, MASK_RCNN))
    path = tmp_path / "model.pth"
    torch.save(content, str(path))
    with pytest.raises(CheckpointError, match="holds no state dict") as info:
        load_checkpoint(model, str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "checkpoint_config, model_config, held, this",
    [
        (MASK_PYRAMID, MASK_RCNN, "a MaskPyramid", "GeneralizedRCNN"),
        (MASK_PYRAMID, SCRATCH, "a MaskPyramid", "ScratchMaskRCNN"),
        (
            MASK_RCNN,
            MASK_PYRAMID,
            "a Mask R-CNN (GeneralizedRCNN or ScratchMaskRCNN)",
            "MaskPyramid",
        ),
    ],
)
def test_other_architecture_is_named(
    make_cfg, tmp_path, checkpoint_config, model_config, held, this
):
    path = save(build_model(tiny_cfg(make_cfg, checkpoint_config)), tmp_path)
    model = build_model(tiny_cfg(make_cfg, model_config))
    n = len(model.state_dict())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, path, config_file="configs/x.yaml")
    message = str(info.value)
    assert message.startswith(f"{path} holds the weights of {held}, not of this {this} ")
    assert "(config configs/x.yaml)" in message
    assert f" of its {n} tensors are missing, e.g. " in message
    assert message.endswith("pass the checkpoint trained with this config")


def test_one_missing_tensor_is_an_error(make_cfg, tmp_path):
    cfg = tiny_cfg(make_cfg, MASK_PYRAMID)
    state = build_model(cfg).state_dict()
    key = sorted(k for k in state if k.startswith("score_head."))[0]
    del state[key]
    path = tmp_path / "model.pth"
    torch.save({"model": state}, str(path))
    model = build_model(cfg)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, str(path))
    message = str(info.value)
    assert f"{path} does not fit this MaskPyramid: 1 of its {len(state) + 1} tensors" in message
    assert f"are missing, e.g. {key};" in message
    assert "holds the weights of" not in message  # its own architecture


def test_one_tensor_of_another_shape_is_an_error(make_cfg, tmp_path):
    """E.g. a checkpoint trained with another number of classes."""
    model = build_model(tiny_cfg(make_cfg, MASK_RCNN))
    state = model.state_dict()
    key = "roi_heads.box_predictor.cls_score.bias"
    assert tuple(state[key].shape) == (6,)
    state[key] = torch.zeros(81)
    path = tmp_path / "model.pth"
    torch.save({"model": state}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, str(path))
    message = str(info.value)
    assert f"1 of its {len(state)} tensors have another shape, e.g. {key} (81,)" in message
    assert "(6,) in the model" in message
    assert "missing" not in message  # the misshapen tensor is reported once


def test_extra_tensors_are_fine(make_cfg, tmp_path):
    trained = build_model(tiny_cfg(make_cfg, MASK_RCNN))
    state = dict(trained.state_dict(), **{"roi_heads.extra.weight": torch.zeros(2)})
    path = tmp_path / "model.pth"
    torch.save({"model": state}, str(path))
    torch.manual_seed(1)
    model = build_model(tiny_cfg(make_cfg, MASK_RCNN))
    load_checkpoint(model, str(path))
    assert_same_weights(model, trained)


def test_url_is_passed_to_the_checkpointer(make_cfg, tmp_path, monkeypatch):
    trained = build_model(tiny_cfg(make_cfg, MASK_RCNN))
    local = save(trained, tmp_path)
    url = "https://example.com/models/model_final.pth"
    asked = []

    def get_local_path(path, **kwargs):
        asked.append(path)
        return local

    monkeypatch.setattr(PathManager, "get_local_path", get_local_path)
    torch.manual_seed(1)
    model = build_model(tiny_cfg(make_cfg, MASK_RCNN))
    load_checkpoint(model, url)
    assert asked == [url]
    assert_same_weights(model, trained)


def test_predictor_equals_the_model(make_cfg, tmp_path):
    cfg = tiny_cfg(make_cfg, MASK_RCNN, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    model = build_model(cfg).eval()
    cfg.MODEL.WEIGHTS = save(model, tmp_path)
    predictor = Predictor(cfg)
    assert predictor.model is not model
    assert (
        predictor.metadata.thing_classes == MetadataCatalog.get("tiny_shapes_train").thing_classes
    )
    image = read_image(DatasetCatalog.get("tiny_shapes_val")[0]["file_name"], format="BGR")
    got = predictor(image)["instances"]
    with torch.no_grad():
        tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        want = model([{"image": tensor, "height": 64, "width": 64}])[0]["instances"]
    assert len(want) > 0
    assert got.image_size == want.image_size == (64, 64)
    assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
    assert torch.equal(got.scores, want.scores)
    assert torch.equal(got.pred_classes, want.pred_classes)
    assert torch.equal(got.pred_masks, want.pred_masks)


def test_predictor_refuses_random_weights(make_cfg):
    with pytest.raises(CheckpointError, match="MODEL.WEIGHTS is empty"):
        Predictor(tiny_cfg(make_cfg, MASK_RCNN))

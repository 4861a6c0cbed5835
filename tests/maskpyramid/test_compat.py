"""The compatibility layer: source fixes, the _C stand-in, COCO eval routing, inertness upstream."""

import sys
import types

import numpy as np
import pytest
import torch

import maskpyramid  # noqa: F401
from maskpyramid import compat


def test_source_fixes_rewrite_exactly_what_upstream_fixed(tmp_path):
    pkg = tmp_path / "detectron2"
    (pkg / "data" / "transforms").mkdir(parents=True)
    (pkg / "model_zoo").mkdir()
    (pkg / "a.py").write_text(
        "x = np.int(3) + np.float(2)\ny = np.bool\nz = np.int64(1), np.bool_(0), np.float32\n"
    )
    (pkg / "data" / "transforms" / "transform.py").write_text("def f(interp=Image.LINEAR): pass\n")
    (pkg / "model_zoo" / "model_zoo.py").write_text(
        "import os\nimport pkg_resources\n"
        'p = pkg_resources.resource_filename(\n    "detectron2.model_zoo", '
        'os.path.join("configs", config_path)\n)\n'
    )
    changes = compat.apply_source_fixes(tmp_path)
    assert (pkg / "a.py").read_text() == (
        "x = int(3) + float(2)\ny = bool\nz = np.int64(1), np.bool_(0), np.float32\n"
    )
    assert "Image.BILINEAR" in (pkg / "data" / "transforms" / "transform.py").read_text()
    zoo = (pkg / "model_zoo" / "model_zoo.py").read_text()
    assert "pkg_resources" not in zoo and "os.path.dirname(__file__)" in zoo
    assert (pkg / "_C.py").read_text() == compat.EXTENSION_STANDIN
    assert len(changes) == 5


def test_source_fix_that_matches_nothing_is_an_error(tmp_path):
    (tmp_path / "detectron2").mkdir()
    (tmp_path / "detectron2" / "a.py").write_text("x = 1\n")
    with pytest.raises(RuntimeError, match="matched nothing"):
        compat.apply_source_fixes(tmp_path)


def test_fixed_detectron2_runs_the_code_paths_v06_broke():
    from detectron2 import model_zoo
    from detectron2.data.build import print_instances_class_histogram
    from detectron2.structures.masks import polygons_to_bitmask

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert path.endswith("mask_rcnn_R_50_FPN_1x.yaml")
    mask = polygons_to_bitmask([np.array([1.0, 1, 8, 1, 8, 8, 1, 8])], 10, 10)
    assert mask.dtype == bool and mask.sum() > 0
    dicts = [{"annotations": [{"category_id": 0, "iscrowd": 0}]}]
    print_instances_class_histogram(dicts, ["a"])


def test_extension_standin_names_feature_and_remedy():
    from detectron2 import _C
    from detectron2.layers import DeformConv, ROIAlignRotated, nms_rotated
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated
    from detectron2.utils.collect_env import collect_env_info

    assert not compat.has_compiled_extension()
    x = torch.rand(1, 2, 8, 8)
    # on CPU, v0.6 runs DeformConv on torchvision: it works; on CUDA it needs _C
    assert DeformConv(2, 2, kernel_size=3, padding=1)(x, torch.zeros(1, 18, 8, 8)).shape == x.shape
    with pytest.raises(_C.MissingExtensionError, match="deformable convolution on CUDA.*Remedy"):
        _C.deform_conv_forward(x)
    with pytest.raises(_C.MissingExtensionError, match="rotated RoIAlign.*Remedy"):
        ROIAlignRotated((2, 2), 1.0, 0)(x, torch.tensor([[0.0, 4, 4, 2, 2, 0]]))
    boxes = RotatedBoxes(torch.tensor([[5.0, 5, 4, 4, 0]]))
    with pytest.raises(_C.MissingExtensionError, match="rotated-box IoU"):
        pairwise_iou_rotated(boxes, boxes)
    with pytest.raises(Exception, match="rotated NMS.*Remedy"):
        nms_rotated(torch.tensor([[5.0, 5, 4, 4, 0]]), torch.tensor([1.0]), 0.5)
    with pytest.raises(_C.MissingExtensionError, match="fast COCO evaluation.*import maskpyramid"):
        _C.COCOevalAccumulate({}, [])
    assert "pure-Python" in collect_env_info()


def _toy_coco():
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    def rle_of(x, y, s):
        m = np.zeros((128, 128), np.uint8, order="F")
        m[y : y + s, x : x + s] = 1
        rle = mask_util.encode(m)
        rle["counts"] = rle["counts"].decode()
        return rle, float(m.sum()), [float(v) for v in mask_util.toBbox(rle)]

    rng = np.random.default_rng(0)
    images, annotations, results = [], [], []
    for image_id in range(1, 6):
        images.append({"id": image_id, "width": 128, "height": 128, "file_name": f"{image_id}.png"})
        for k in range(4):
            x, y = rng.integers(0, 60, 2).tolist()
            size = int(rng.integers(8, 64))
            rle, area, box = rle_of(x, y, size)
            common = {"image_id": image_id, "category_id": 1 + k % 2}
            annotations.append({**common, "id": len(annotations) + 1, "segmentation": rle,
                                "area": area, "bbox": box, "iscrowd": 0})  # fmt: skip
            dx, dy = rng.integers(0, 5, 2).tolist()  # a prediction a few pixels off
            rle, _, box = rle_of(x + dx, y + dy, size)
            results.append({**common, "segmentation": rle, "bbox": box, "score": rng.random()})
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    gt.createIndex()
    return gt, results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_fast_coco_eval_gives_the_official_ap(iou_type):
    from detectron2.evaluation import coco_evaluation

    gt, results = _toy_coco()
    assert coco_evaluation.COCOeval_opt.__name__ == "COCOevalFaster"
    fast = coco_evaluation._evaluate_predictions_on_coco(gt, results, iou_type, use_fast_impl=True)
    gt, results = _toy_coco()
    official = coco_evaluation._evaluate_predictions_on_coco(
        gt, results, iou_type, use_fast_impl=False
    )
    assert 0 < official.stats[0] < 1
    np.testing.assert_allclose(fast.stats, official.stats, atol=1e-12)


def test_install_is_inert_on_a_compiled_detectron2(monkeypatch):
    from detectron2.evaluation import coco_evaluation

    monkeypatch.setitem(sys.modules, "detectron2._C", types.ModuleType("detectron2._C"))
    monkeypatch.setattr(compat, "_installed", False)
    before = coco_evaluation.COCOeval_opt
    assert compat.has_compiled_extension()
    assert compat.install() is False
    assert coco_evaluation.COCOeval_opt is before


def test_built_wheel_has_model_zoo_configs_and_no_stray_packages():
    import importlib.metadata

    if compat.has_compiled_extension():
        pytest.skip("upstream detectron2: not built by tools/build_detectron2.py")
    files = importlib.metadata.files("detectron2")
    top_level = {f.parts[0] for f in files if not f.parts[0].endswith(".dist-info")}
    assert top_level == {"detectron2"}  # upstream's setup.py would also install `tools`
    configs = [f for f in files if "model_zoo/configs" in f.as_posix() and f.suffix == ".yaml"]
    assert len(configs) >= 90
    assert any(f.as_posix().endswith("projects/point_rend/point_features.py") for f in files)

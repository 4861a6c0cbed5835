"""Bad annotations are dropped with a warning naming them; bad paths fail before training."""

import json
import logging
import os
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from maskpyramid.data.datasets import (
    load_coco_instances,
    register_coco_instances_checked,
    register_fruits_nuts,
    validate_coco_annotations,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _coco(annotations):
    return {
        "images": [{"id": 7, "file_name": "a.png", "height": 32, "width": 32}],
        "categories": [{"id": 1, "name": "thing"}, {"id": 3, "name": "other"}],
        "annotations": annotations,
    }


GOOD = {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0,
        "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}  # fmt: skip
BAD = {
    11: ({"segmentation": []}, "empty or degenerate polygon"),
    12: ({"segmentation": [[1, 1, 2, 2]]}, "empty or degenerate polygon"),
    13: ({"segmentation": [[1, 1, 2, 2, 3, 3]]}, "empty or degenerate polygon"),  # collinear
    14: ({"bbox": [3, 3, 0, 4]}, "zero-area"),
    15: ({"category_id": 2}, "unknown category_id 2"),
    16: ({"image_id": 99}, "unknown image_id 99"),
}


def test_bad_annotations_are_dropped_with_a_warning_naming_each(caplog):
    anns = [dict(GOOD)] + [{**GOOD, "id": i, **change} for i, (change, _) in BAD.items()]
    multi = {**GOOD, "id": 20, "segmentation": [[1, 1, 2, 2], [1, 1, 6, 1, 6, 6, 1, 6]]}
    with caplog.at_level(logging.WARNING):
        dataset, dropped = validate_coco_annotations(_coco(anns + [multi]), "x.json")
    assert dropped == len(BAD)
    assert [a["id"] for a in dataset["annotations"]] == [1, 20]
    assert dataset["annotations"][1]["segmentation"] == [[1, 1, 6, 1, 6, 6, 1, 6]]
    for ann_id, (_, reason) in BAD.items():
        assert any(f"id={ann_id} " in r.message and reason in r.message for r in caplog.records)


def test_loading_a_json_with_bad_annotations_keeps_the_good_ones(tmp_path):
    path = tmp_path / "ann.json"
    bad = [{**GOOD, "id": i, **change} for i, (change, _) in BAD.items()]
    path.write_text(json.dumps(_coco([GOOD] + bad)))
    dicts = load_coco_instances(str(path), str(tmp_path), "bad_annotations_test")
    assert len(dicts) == 1 and [a["id"] for a in dicts[0]["annotations"]] == [1]
    assert dicts[0]["annotations"][0]["category_id"] == 0  # contiguous ids


def test_register_coco_with_wrong_paths_fails_immediately(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        register_coco_instances_checked("wrong_json", str(tmp_path / "nope.json"), str(tmp_path))
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(_coco([GOOD])))
    with pytest.raises(FileNotFoundError, match="image folder .*missing"):
        register_coco_instances_checked("wrong_root", str(path), str(tmp_path / "missing"))
    register_coco_instances_checked("right_paths", str(path), str(tmp_path))
    assert MetadataCatalog.get("right_paths").thing_classes == ["thing", "other"]
    register_coco_instances_checked("right_paths", str(path), str(tmp_path))  # idempotent
    assert "wrong_json" not in DatasetCatalog.list()


def test_train_net_rejects_a_wrong_register_coco_path_before_training(tmp_path):
    cmd = [sys.executable, "train_net.py",
           "--config-file", "configs/shapes/mask_rcnn_R_18_FPN.yaml",
           "--register-coco", "mine", str(tmp_path / "missing.json"), str(tmp_path),
           "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "missing.json not found" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_fruits_nuts_is_registered_in_place_when_shared_data_exists():
    root = register_fruits_nuts()
    if root is None:
        pytest.skip("../shared/data/fruits_nuts is absent on this machine")
    dicts = DatasetCatalog.get("fruits_nuts")
    assert len(dicts) == 18
    assert sum(len(d["annotations"]) for d in dicts) == 165
    assert MetadataCatalog.get("fruits_nuts").thing_classes == ["date", "fig", "hazelnut"]
    assert dicts[0]["file_name"].startswith(root)

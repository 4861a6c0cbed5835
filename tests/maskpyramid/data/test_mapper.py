"""A missing or corrupt image is an error that names the file and the image id."""

import pytest
from detectron2.data import DatasetCatalog

from maskpyramid.data.mapper import CheckedDatasetMapper, ImageReadError


@pytest.fixture
def record(make_cfg):
    cfg = make_cfg()
    return cfg, dict(DatasetCatalog.get("tiny_shapes_train")[0])


def test_a_readable_image_maps(record):
    cfg, rec = record
    out = CheckedDatasetMapper(cfg, is_train=True)(rec)
    assert out["image"].shape[-2:] == (64, 64) and len(out["instances"]) > 0


def test_missing_image_names_file_and_id(record, tmp_path):
    cfg, rec = record
    rec["file_name"] = str(tmp_path / "gone.png")
    with pytest.raises(ImageReadError, match=rf"id={rec['image_id']} file .*gone.png"):
        CheckedDatasetMapper(cfg, is_train=True)(rec)


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_corrupt_image_names_file_and_id(record, tmp_path, content):
    cfg, rec = record
    broken = tmp_path / "broken.png"
    broken.write_bytes(content)
    rec["file_name"] = str(broken)
    with pytest.raises(ImageReadError, match=rf"id={rec['image_id']} file .*broken.png"):
        CheckedDatasetMapper(cfg, is_train=False)(rec)


def test_truncated_image_names_file(record, tmp_path):
    cfg, rec = record
    data = open(rec["file_name"], "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    rec["file_name"] = str(truncated)
    with pytest.raises(ImageReadError, match="truncated.png"):
        CheckedDatasetMapper(cfg, is_train=True)(rec)

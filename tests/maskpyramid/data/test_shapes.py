"""Tests of the synthetic ``shapes`` dataset: determinism, annotations, difficulty, disk layout."""

import dataclasses
import fcntl
import json
import os
import threading

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from maskpyramid.data import shapes

SPEC = shapes.DEFAULT_SPEC
NUM_SAMPLE_IMAGES = 300  # rendered in memory for the statistical tests
# Enough images for generate_split to use its worker processes.
NUM_DISK_IMAGES = 2 * shapes._MIN_IMAGES_PER_WORKER
TINY_SPLITS = {"shapes_test_tiny_train": ("train", 3), "shapes_test_tiny_val": ("val", 2)}


def _has_hole(mask: np.ndarray) -> bool:
    """Whether the background around ``mask`` has a part enclosed by it."""
    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


@pytest.fixture(scope="module")
def sample():
    """Over NUM_SAMPLE_IMAGES rendered train images: facts per instance, and per image the
    number of instances and the most instances covering one pixel."""
    records, counts, coverages = [], [], []
    for index in range(NUM_SAMPLE_IMAGES):
        image, annotations = shapes.render_image(SPEC, "train", index)
        counts.append(len(annotations))
        coverages.append(np.sum([a["mask"] for a in annotations], axis=0).max())
        for annotation in annotations:
            mask = annotation["mask"]
            records.append(
                {
                    "image": index,
                    "category_id": annotation["category_id"],
                    "area": int(mask.sum()),
                    "full_area": annotation["full_area"],
                    "mean_colour": image[mask].mean(axis=0),
                    "has_hole": _has_hole(mask),
                    "touches_border": _touches_border(mask),
                }
            )
    return records, counts, coverages


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A split generated with worker processes: (root, json_file)."""
    root = tmp_path_factory.mktemp("generated")
    # Start OpenCV's thread pool in this process first: forked workers must not deadlock on it.
    cv2.GaussianBlur(np.zeros((1024, 1024, 3), np.uint8), (9, 9), 0)
    json_file = shapes.generate_split(root, "val", NUM_DISK_IMAGES, SPEC, num_workers=2)
    return root, json_file


def test_render_image_is_deterministic():
    image, annotations = shapes.render_image(SPEC, "train", 7)
    again, annotations_again = shapes.render_image(SPEC, "train", 7)
    assert image.shape == (SPEC.height, SPEC.width, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, again)
    assert [a["category_id"] for a in annotations] == [a["category_id"] for a in annotations_again]
    for a, b in zip(annotations, annotations_again):
        np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not np.array_equal(image, shapes.render_image(SPEC, "train", 8)[0])
    assert not np.array_equal(image, shapes.render_image(SPEC, "val", 7)[0])


@pytest.mark.timeout(120)
def test_generate_split_is_byte_identical(generated, tmp_path):
    root, json_file = generated
    json_again = shapes.generate_split(tmp_path, "val", NUM_DISK_IMAGES, SPEC, num_workers=0)
    with open(json_file, "rb") as f, open(json_again, "rb") as g:
        assert f.read() == g.read()
    image_dir, image_dir_again = root / "shapes" / "val", tmp_path / "shapes" / "val"
    names = sorted(os.listdir(image_dir))
    assert names == sorted(os.listdir(image_dir_again))
    assert names == [f"{i:05d}.png" for i in range(NUM_DISK_IMAGES)]
    for name in names:
        assert (image_dir / name).read_bytes() == (image_dir_again / name).read_bytes(), name
    # The PNG is lossless: it is exactly what render_image returns.
    np.testing.assert_array_equal(
        cv2.imread(str(image_dir / names[5])), shapes.render_image(SPEC, "val", 5)[0]
    )


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_json_is_valid(generated):
    _, json_file = generated
    with open(json_file) as f:
        coco = json.load(f)
    assert coco["categories"] == [
        {"id": i + 1, "name": name} for i, name in enumerate(shapes.THING_CLASSES)
    ]
    assert shapes.THING_CLASSES == ("disc", "ring", "triangle", "square", "star")
    images = {image["id"]: image for image in coco["images"]}
    assert len(images) == NUM_DISK_IMAGES
    assert all(i["height"] == SPEC.height and i["width"] == SPEC.width for i in images.values())
    annotation_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(annotation_ids)) == len(annotation_ids)

    visible = {image_id: [] for image_id in images}
    for annotation in coco["annotations"]:
        rle = annotation["segmentation"]
        assert isinstance(rle["counts"], str) and rle["size"] == [SPEC.height, SPEC.width]
        mask = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        ys, xs = np.nonzero(mask)
        assert len(ys) > 0 and annotation["area"] == len(ys)
        expected_box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        np.testing.assert_allclose(annotation["bbox"], expected_box)
        assert annotation["iscrowd"] == 0
        assert 1 <= annotation["category_id"] <= len(shapes.THING_CLASSES)
        visible[annotation["image_id"]].append(mask)
    for image_id, masks in visible.items():
        assert 1 <= len(masks) <= 15, f"image {image_id} has {len(masks)} instances"
        assert np.sum(masks, axis=0).max() == 1, f"image {image_id}: visible masks overlap"


def test_instances_per_image(sample):
    _, counts, coverages = sample
    assert min(counts) >= SPEC.min_instances == 1
    assert max(counts) <= SPEC.max_instances == 15
    assert max(counts) >= 10  # crowded images do occur
    assert max(coverages) == 1, "visible masks of an image must be disjoint"


def test_small_spec():
    small = shapes.ShapesSpec(height=64, width=64, min_radius=4.0, max_radius=30.0, max_instances=5)
    for index in range(20):
        image, annotations = shapes.render_image(small, "train", index)
        assert image.shape == (64, 64, 3)
        assert 1 <= len(annotations) <= 5
        assert all(a["mask"].shape == (64, 64) and a["mask"].any() for a in annotations)
    with pytest.raises(ValueError):
        shapes.ShapesSpec(classes=("disc", "hexagon"))


def test_rings_have_holes(sample):
    records, _, _ = sample
    ring_id = shapes.THING_CLASSES.index("ring") + 1
    # Unoccluded and uncut: the hole is surely there, whatever is seen through it.
    whole_rings = [
        r
        for r in records
        if r["category_id"] == ring_id and r["area"] == r["full_area"] and not r["touches_border"]
    ]
    assert len(whole_rings) >= 20
    assert all(r["has_hole"] for r in whole_rings)
    # Other shapes have no hole of their own (only occluders that end inside them make one).
    discs = [r for r in records if r["category_id"] == 1 and r["area"] == r["full_area"]]
    assert discs and not any(r["has_hole"] for r in discs)


def test_sizes_cover_coco_ranges(sample):
    records, _, _ = sample
    areas = np.array([r["area"] for r in records])
    small, large = areas < 32**2, areas > 96**2
    fractions = [small.mean(), (~small & ~large).mean(), large.mean()]
    assert min(fractions) >= 0.15, f"small/medium/large: {fractions}"


def test_occlusion(sample):
    records, _, _ = sample
    occluded = [r for r in records if r["area"] < r["full_area"]]
    assert len(occluded) >= 0.2 * len(records)
    # Almost hidden instances are not annotated (nor painted).
    for r in records:
        assert r["area"] >= SPEC.min_visible_pixels
        assert r["area"] >= SPEC.min_visible_fraction * r["full_area"]


def test_colour_does_not_give_the_class_away(sample):
    records, _, _ = sample
    colours = np.array([r["mean_colour"] for r in records])
    labels = np.array([r["category_id"] for r in records])
    fit = np.array([r["image"] % 2 == 0 for r in records])
    classes = np.unique(labels)
    means = np.stack([colours[fit & (labels == c)].mean(axis=0) for c in classes])
    distances = np.linalg.norm(colours[~fit][:, None] - means[None], axis=2)
    accuracy = (classes[distances.argmin(axis=1)] == labels[~fit]).mean()
    # Chance is 1 / 5; colour would make nearest-class-mean far better.
    assert accuracy < 0.4, accuracy


def _count_generate_split(monkeypatch):
    calls = []
    generate_split = shapes.generate_split

    def counting(*args, **kwargs):
        calls.append(args[1])
        return generate_split(*args, **kwargs)

    monkeypatch.setattr(shapes, "generate_split", counting)
    return calls


def test_ensure_shapes_regenerates_only_stale_data(tmp_path, monkeypatch):
    calls = _count_generate_split(monkeypatch)
    paths = shapes.ensure_shapes(tmp_path, SPEC, TINY_SPLITS)
    assert calls == ["train", "val"]
    assert paths["shapes_test_tiny_val"] == (
        str(tmp_path / "shapes" / "annotations" / "instances_val.json"),
        str(tmp_path / "shapes" / "val"),
    )
    assert sorted(os.listdir(tmp_path / "shapes" / "train")) == [
        "00000.png",
        "00001.png",
        "00002.png",
    ]

    assert shapes.ensure_shapes(tmp_path, SPEC, TINY_SPLITS) == paths
    assert len(calls) == 2, "a matching meta.json must not regenerate"

    meta_file = tmp_path / "shapes" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta["generator_version"] == shapes.GENERATOR_VERSION
    meta["generator_version"] -= 1
    meta_file.write_text(json.dumps(meta))
    shapes.ensure_shapes(tmp_path, SPEC, TINY_SPLITS)
    assert len(calls) == 4, "an older generator version must regenerate"

    shapes.ensure_shapes(tmp_path, dataclasses.replace(SPEC, seed=1), TINY_SPLITS)
    assert len(calls) == 6, "another spec must regenerate"
    assert json.loads(meta_file.read_text())["spec"]["seed"] == 1

    bigger = {**TINY_SPLITS, "shapes_test_tiny_val": ("val", 3)}
    shapes.ensure_shapes(tmp_path, dataclasses.replace(SPEC, seed=1), bigger)
    assert len(calls) == 8, "other split sizes must regenerate"


def test_interrupted_generation_never_looks_complete(tmp_path, monkeypatch):
    shapes.ensure_shapes(tmp_path, SPEC, TINY_SPLITS)
    write_image = shapes._write_image

    def crash_on_second_image(index, **kwargs):
        if index == 1:
            raise KeyboardInterrupt
        return write_image(index, **kwargs)

    monkeypatch.setattr(shapes, "_write_image", crash_on_second_image)
    with pytest.raises(KeyboardInterrupt):
        shapes.ensure_shapes(tmp_path, dataclasses.replace(SPEC, seed=1), TINY_SPLITS)
    assert not (tmp_path / "shapes" / "meta.json").exists()
    assert sorted(os.listdir(tmp_path / "shapes")) == [".lock", "annotations", "train", "val"]

    monkeypatch.setattr(shapes, "_write_image", write_image)
    calls = _count_generate_split(monkeypatch)
    shapes.ensure_shapes(tmp_path, SPEC, TINY_SPLITS)
    assert calls == ["train", "val"]


def test_ensure_shapes_waits_for_the_lock(tmp_path):
    lock_path = tmp_path / "shapes" / ".lock"
    lock_path.parent.mkdir()
    done = threading.Event()
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # another process generating
        worker = threading.Thread(
            target=lambda: (shapes.ensure_shapes(tmp_path, SPEC, TINY_SPLITS), done.set())
        )
        worker.start()
        assert not done.wait(timeout=0.5)
        assert not (tmp_path / "shapes" / "meta.json").exists()
        fcntl.flock(lock_file, fcntl.LOCK_UN)
    worker.join(timeout=60)
    assert done.is_set() and (tmp_path / "shapes" / "meta.json").exists()


@pytest.fixture
def tiny_registration(tmp_path, monkeypatch):
    """Registers TINY_SPLITS under $DETECTRON2_DATASETS=tmp_path; unregisters them after."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    yield tmp_path
    for name in TINY_SPLITS:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_register_shapes(tiny_registration):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import annotations_to_instances

    root = tiny_registration
    shapes.register_shapes(spec=SPEC, splits=TINY_SPLITS)
    shapes.register_shapes(spec=SPEC, splits=TINY_SPLITS)  # idempotent
    assert not (root / "shapes").exists(), "registering must not generate"
    assert shapes.SPLITS == {"shapes_train": ("train", 2000), "shapes_val": ("val", 300)}

    metadata = MetadataCatalog.get("shapes_test_tiny_val")
    assert metadata.thing_classes == list(shapes.THING_CLASSES)
    assert metadata.evaluator_type == "coco"
    assert metadata.json_file == str(root / "shapes" / "annotations" / "instances_val.json")
    assert metadata.image_root == str(root / "shapes" / "val")
    assert len({tuple(c) for c in metadata.thing_colors}) == len(shapes.THING_CLASSES)

    dicts = DatasetCatalog.get("shapes_test_tiny_val")
    assert len(dicts) == 2 and (root / "shapes" / "meta.json").exists()
    for record in dicts:
        assert os.path.isfile(record["file_name"])
        assert record["annotations"]
        for annotation in record["annotations"]:
            assert isinstance(annotation["segmentation"], dict)
            assert isinstance(annotation["segmentation"]["counts"], str)
        # The masks need MASK_FORMAT "bitmask".
        image_size = (record["height"], record["width"])
        instances = annotations_to_instances(record["annotations"], image_size, "bitmask")
        assert instances.gt_masks.tensor.shape == (len(record["annotations"]),) + image_size
        assert (instances.gt_masks.tensor.sum(dim=0) <= 1).all()
    assert len(DatasetCatalog.get("shapes_test_tiny_train")) == 3

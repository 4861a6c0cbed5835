"""Dataset registrations: the embedded ``shapes``, ``fruits_nuts``, and user COCO-format data.

Everything here loads through :func:`load_coco_instances`, detectron2's ``load_coco_json`` after
a validation pass that drops bad annotations with a warning naming each one (instead of crashing
the run, or silently training on a zero-area box).
"""

import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes import register_shapes

__all__ = [
    "validate_coco_annotations",
    "load_coco_instances",
    "register_coco_instances_checked",
    "register_fruits_nuts",
    "register_all",
]

logger = logging.getLogger(__name__)

# ../shared/data/fruits_nuts beside the repository (used in place, never copied), or a copy
# under $DETECTRON2_DATASETS/fruits_nuts.
_REPO = Path(__file__).resolve().parents[2]
FRUITS_NUTS_CANDIDATES = (
    Path(os.environ.get("DETECTRON2_DATASETS", "datasets")) / "fruits_nuts",
    _REPO.parent / "shared" / "data" / "fruits_nuts",
)


def _polygon_area(flat: List[float]) -> float:
    xs, ys = flat[0::2], flat[1::2]
    return 0.5 * abs(
        sum(x0 * y1 - x1 * y0 for x0, y0, x1, y1 in zip(xs, ys, xs[1:] + xs[:1], ys[1:] + ys[:1]))
    )


def _annotation_problem(ann: Dict, category_ids) -> Optional[str]:
    """Why an annotation cannot be trained on, or None."""
    if ann.get("category_id") not in category_ids:
        return f"unknown category_id {ann.get('category_id')}"
    bbox = ann.get("bbox")
    if bbox is None or len(bbox) != 4 or not (bbox[2] > 0 and bbox[3] > 0):
        return f"zero-area or malformed bbox {bbox}"
    segm = ann.get("segmentation")
    if isinstance(segm, list):  # polygons; an empty list means "no mask", which is degenerate too
        valid = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0 and _polygon_area(p) > 0]
        if not valid:
            return "empty or degenerate polygon"
        ann["segmentation"] = valid  # drop the degenerate parts of a multi-part polygon
    elif isinstance(segm, dict) and not segm.get("counts"):
        return "empty RLE"
    return None


def validate_coco_annotations(dataset: Dict, json_file: str) -> Tuple[Dict, int]:
    """Drop annotations that cannot be trained on, warning once per annotation with its id.

    Args:
        dataset: a parsed COCO instances json (modified in place).
        json_file: its path, for the messages.

    Returns:
        the dataset and the number of annotations dropped.
    """
    category_ids = {c["id"] for c in dataset.get("categories", [])}
    image_ids = {img["id"] for img in dataset.get("images", [])}
    kept, reasons = [], Counter()
    for ann in dataset.get("annotations", []):
        problem = _annotation_problem(ann, category_ids)
        if problem is None and ann.get("image_id") not in image_ids:
            problem = f"unknown image_id {ann.get('image_id')}"
        if problem is None:
            kept.append(ann)
            continue
        reasons[problem.split(" ")[0]] += 1
        logger.warning(
            f"{json_file}: dropping annotation id={ann.get('id')} "
            f"(image_id={ann.get('image_id')}): {problem}"
        )
    dropped = len(dataset.get("annotations", [])) - len(kept)
    dataset["annotations"] = kept
    if dropped:
        logger.warning(f"{json_file}: dropped {dropped} bad annotation(s): {dict(reasons)}")
    return dataset, dropped


def load_coco_instances(json_file: str, image_root: str, dataset_name: str) -> List[Dict]:
    """detectron2's ``load_coco_json`` after :func:`validate_coco_annotations`.

    A json that needs no fix is loaded as it is; otherwise a cleaned copy is written to a temporary
    file (``load_coco_json`` reads from a path), loaded, and removed.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"dataset '{dataset_name}': annotation file {json_file} not found")
    with open(json_file) as f:
        dataset = json.load(f)
    dataset, dropped = validate_coco_annotations(dataset, json_file)
    if dropped:
        fd, json_file = tempfile.mkstemp(prefix=f"{dataset_name}_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(dataset, f)
    try:
        return load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["id"])
    finally:
        if dropped:
            os.unlink(json_file)


def register_coco_instances_checked(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO-format instance dataset, checking its paths now (before any training).

    Raises:
        FileNotFoundError: the json or the image folder does not exist.
        ValueError: the json has no categories, or ``name`` is taken by another dataset.
    """
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"--register-coco {name}: annotation file {json_file} not found")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"--register-coco {name}: image folder {image_root} not found")
    with open(json_file) as f:
        categories = json.load(f).get("categories")
    if not categories:
        raise ValueError(f"--register-coco {name}: {json_file} has no 'categories'")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if getattr(meta, "json_file", None) == json_file:
            return
        raise ValueError(f"--register-coco {name}: a dataset of that name is already registered")
    DatasetCatalog.register(name, lambda: load_coco_instances(json_file, image_root, name))
    categories = sorted(categories, key=lambda c: c["id"])
    MetadataCatalog.get(name).set(
        thing_classes=[c["name"] for c in categories],
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
    )


def register_fruits_nuts() -> Optional[str]:
    """Register ``fruits_nuts`` (18 photographs, 3 classes) where its folder exists."""
    for root in FRUITS_NUTS_CANDIDATES:
        if (root / "trainval.json").is_file():
            register_coco_instances_checked(
                "fruits_nuts", str(root / "trainval.json"), str(root / "images")
            )
            return str(root)
    return None


def register_all() -> None:
    """Built-in registrations, run on ``import maskpyramid``: cheap, generates nothing."""
    register_shapes()
    register_fruits_nuts()

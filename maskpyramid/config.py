"""Config keys of the project: ``add_maskpyramid_config`` and the number-of-classes check."""

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["add_maskpyramid_config", "NUM_CLASSES_KEYS", "resolve_num_classes"]

# Where each meta-architecture reads its number of classes; projects add theirs.
NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": ("MODEL.ROI_HEADS.NUM_CLASSES",),
    "RetinaNet": ("MODEL.RETINANET.NUM_CLASSES",),
}


def add_maskpyramid_config(cfg: CfgNode) -> None:
    """Add the project's config keys and defaults to ``cfg`` (in place)."""
    # -1: take the number of classes from the training set's thing_classes (resolve_num_classes)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = -1
    cfg.MODEL.RETINANET.NUM_CLASSES = -1
    # the same configs run on a CPU machine and on a GPU machine; set it to force either
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _thing_classes(dataset_name: str):
    meta = MetadataCatalog.get(dataset_name)
    if "thing_classes" not in meta.as_dict():
        DatasetCatalog.get(dataset_name)  # loading a COCO json sets them
    classes = meta.get("thing_classes", None)
    if not classes:
        raise ValueError(f"dataset '{dataset_name}' has no thing_classes in its metadata")
    return list(classes)


def resolve_num_classes(cfg: CfgNode) -> int:
    """Make the number of classes agree with the datasets, before anything is built.

    The config's value is taken from the training set when it is -1; an explicit value that
    differs from the training set's ``thing_classes``, or test sets whose classes differ from the
    training set's, are errors (otherwise detectron2 trains, then evaluates against the wrong
    category ids).

    Returns:
        the number of classes; ``cfg`` (unfrozen) is updated in place.
    """
    keys = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE, ())
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not names:
        return -1
    reference = _thing_classes(names[0])
    for name in list(cfg.DATASETS.TRAIN[1:]) + list(cfg.DATASETS.TEST):
        classes = _thing_classes(name)
        if classes != reference:
            raise ValueError(
                f"dataset '{name}' has thing_classes {classes}, but '{names[0]}' has {reference}: "
                "DATASETS.TRAIN and DATASETS.TEST must share their classes"
            )
    for key in keys:
        node, leaf = cfg, key.split(".")
        for part in leaf[:-1]:
            node = node[part]
        value = node[leaf[-1]]
        if value == -1:
            node[leaf[-1]] = len(reference)
        elif value != len(reference):
            raise ValueError(
                f"{key} is {value}, but the training set '{names[0]}' has {len(reference)} "
                f"thing_classes {reference}. Set {key} to {len(reference)}, or to -1 to follow "
                "the dataset."
            )
    return len(reference)

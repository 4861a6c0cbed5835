#!/usr/bin/env python
"""Pyramid growth viewer: what a trained MaskPyramid did on each level, for one or more images.

For each image, writes to ``OUTPUT/<image>/`` one PNG per level (``p6.png`` ... ``p2.png``: the
roots spawned there, the surviving pyramids coloured by identity, the uncovered cells, the pruned
pyramids, the per-level targets training would use, and a gallery of every surviving pyramid with
its score) and ``overview.png`` (every level on one sheet, with the final predictions drawn by
detectron2's ``Visualizer``). Everything drawn comes from the model's own records of its growth
(``MaskPyramid.inference_with_records``). Targets need annotations: give a dataset and an index.

Usage:
  python tools/visualize_pyramids.py --config-file configs/shapes/mask_pyramid_R_18_FPN_long.yaml \\
      --dataset shapes_val --index 0 3 --output output/pyramids \\
      --opts MODEL.WEIGHTS output/mp_long/model_final.pth
  python tools/visualize_pyramids.py --config-file ... --input photo.jpg --output output/pyramids \\
      --opts MODEL.WEIGHTS ...
"""

import argparse
import copy
import logging
import os
import sys

import detectron2.data.transforms as T
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.modeling import build_model

import maskpyramid  # noqa: F401  (registers datasets and MaskPyramid)
import scratch_mask_rcnn
from maskpyramid.config import resolve_num_classes
from maskpyramid.data.files import expand_inputs, output_names
from maskpyramid.data.mapper import CheckedDatasetMapper, ImageReadError, MaskPyramidDatasetMapper
from maskpyramid.engine import build_cfg, load_checkpoint
from maskpyramid.vis.pyramids import write_growth_views

logger = logging.getLogger("maskpyramid.visualize_pyramids")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="a MaskPyramid config")  # fmt: skip
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="IMAGE",
        help="image files (no targets are drawn: they need annotations)",
    )
    source.add_argument("--dataset", metavar="NAME",
                        help="a registered dataset (e.g. shapes_val); with --index")  # fmt: skip
    parser.add_argument(
        "--index",
        nargs="+",
        type=int,
        default=[0],
        metavar="I",
        help="positions in --dataset's list of images (default: 0)",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="a folder per image is written in it"
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=None,
        metavar="T",
        help="final predictions drawn score at least this (default: "
        "MODEL.MASK_PYRAMID.VIS_SCORE_THRESH)",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config options, e.g. MODEL.WEIGHTS path/to/model_final.pth",
    )
    return parser


def _dataset_inputs(cfg, name, indices):
    """(folder name, mapped input with pyramid targets, original RGB, metadata) per index."""
    if name not in DatasetCatalog.list():
        sys.exit(f"--dataset {name}: not a registered dataset (e.g. shapes_val, shapes_train)")
    records = DatasetCatalog.get(name)
    # the training mapper (annotations and per-level targets) with the test resizing
    mapper = MaskPyramidDatasetMapper(cfg, is_train=True)
    mapper.augmentations = T.AugmentationList(utils.build_augmentation(cfg, is_train=False))
    for i in indices:
        if not -len(records) <= i < len(records):
            sys.exit(f"--index {i}: {name} has {len(records)} images")
        record = copy.deepcopy(records[i])
        yield f"{name}_{i}", mapper(record), _original(record["file_name"]), name


def _file_inputs(cfg, paths):
    mapper = CheckedDatasetMapper(cfg, is_train=False)
    for path, name in zip(paths, output_names(paths)):
        record = {"file_name": path, "image_id": path}
        yield os.path.splitext(name)[0], mapper(record), _original(path), None


def _original(path):
    try:
        return utils.read_image(path, format="RGB")
    except (OSError, SyntaxError) as e:
        raise ImageReadError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if not os.path.isfile(args.config_file):
        sys.exit(f"--config-file {args.config_file}: no such file")
    # the scratch Mask R-CNN's keys too: its configs load, to be refused by name below
    cfg = build_cfg(args.config_file, args.opts, (scratch_mask_rcnn.add_scratch_mask_rcnn_config,))
    resolve_num_classes(cfg)
    cfg.freeze()
    if cfg.MODEL.META_ARCHITECTURE != "MaskPyramid":
        sys.exit(f"{args.config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}; "
                 "the pyramid growth viewer draws a MaskPyramid")  # fmt: skip
    model = build_model(cfg).eval()
    try:
        load_checkpoint(model, cfg.MODEL.WEIGHTS, config_file=args.config_file)
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    thresh = args.confidence_threshold
    if thresh is None:
        thresh = cfg.MODEL.MASK_PYRAMID.VIS_SCORE_THRESH
    test_set = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else cfg.DATASETS.TRAIN[0]
    if args.dataset:
        inputs = _dataset_inputs(cfg, args.dataset, args.index)
    else:
        try:
            inputs = _file_inputs(cfg, expand_inputs(args.input))
        except ValueError as e:
            sys.exit(f"--input: {e}")
    try:
        for folder, mapped, original, dataset in inputs:
            metadata = MetadataCatalog.get(dataset or test_set)
            out_dir = os.path.join(args.output, folder)
            paths, views, instances = write_growth_views(
                model, mapped, original, metadata, out_dir, thresh, cfg.INPUT.FORMAT
            )
            counts = ", ".join(f"{v.name} {len(v.identities)}" for v in views)
            print(f"{folder}: pyramids per level {counts}; {len(instances)} outputs, "
                  f"{int((instances.scores >= thresh).sum())} drawn; wrote {out_dir}/ "
                  f"({', '.join(os.path.basename(p) for p in paths.values())})")  # fmt: skip
    except ImageReadError as e:
        sys.exit(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())

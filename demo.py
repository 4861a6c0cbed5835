#!/usr/bin/env python
"""Draw a trained model's instances on images: MaskPyramid, the scratch Mask R-CNN or detectron2's.

detectron2's demo/demo.py for image files, with the checks of ``maskpyramid.engine.Predictor``:
the checkpoint must hold every weight of the config's model. For example::

    python demo.py --config-file configs/shapes/mask_pyramid_R_18_FPN.yaml \\
        --input 'datasets/shapes/val/*.png' --output output/demo_vis \\
        --opts MODEL.WEIGHTS output/demo/model_final.pth MODEL.DEVICE cpu
"""

import argparse
import logging
import os
import sys
import time

import cv2
import tqdm
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

import maskpyramid  # noqa: F401  (registers datasets and models)
import scratch_mask_rcnn  # registers ScratchMaskRCNN
from maskpyramid.config import NUM_CLASSES_KEYS, resolve_num_classes
from maskpyramid.data.files import IMAGE_EXTENSIONS, expand_inputs, output_names
from maskpyramid.engine import CheckpointError, Predictor, build_cfg

# the project's config keys, and where its model reads the number of classes (as train_net.py)
ADD_CONFIGS = (scratch_mask_rcnn.add_scratch_mask_rcnn_config,)
NUM_CLASSES_KEYS.update(scratch_mask_rcnn.NUM_CLASSES_KEYS)
# the display threshold of the models other than MaskPyramid (detectron2's demo default)
RCNN_VIS_THRESH = 0.5

logger = logging.getLogger("maskpyramid.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demo.py",
        description="Draw a trained model's instances (masks, boxes, classes, scores) on images, "
        "one PNG per input image.",
        epilog="A bad input stops nothing: an image that cannot be read is reported, every other "
        "image is still drawn, and at the end every unreadable file is listed and the exit status "
        "is 1. A wrong checkpoint (MODEL.WEIGHTS empty, missing, unreadable, or of another "
        "architecture or config) stops before any image, with exit status 1; --input matching no "
        "image stops with exit status 2.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the model's config")
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="IN",
        help="image files, glob patterns (quoted, e.g. 'images/*.jpg') or folders (their "
        f"{', '.join(IMAGE_EXTENSIONS)} files); duplicates are drawn once",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder (created) for the drawings: <stem>.png per input, <stem>_1.png ... when two "
        "inputs share a stem",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=None,
        metavar="T",
        help="draw the instances scoring at least T; default: MODEL.MASK_PYRAMID.VIS_SCORE_THRESH "
        f"for MaskPyramid (whose SCORE_THRESH_TEST still bounds it from below), {RCNN_VIS_THRESH} "
        "for the Mask R-CNNs (their SCORE_THRESH_TEST is set to T)",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config options, e.g. MODEL.WEIGHTS output/x/model_final.pth MODEL.DEVICE cpu",
    )
    return parser


def _fail(message: str, status: int = 1) -> None:
    """Exit with a one-line error on stderr, without a traceback."""
    print(f"demo.py: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def setup_cfg(args):
    """The frozen config, its score thresholds set for display; and the display threshold."""
    cfg = build_cfg(args.config_file, args.opts, ADD_CONFIGS)
    threshold = args.confidence_threshold
    if cfg.MODEL.META_ARCHITECTURE == "MaskPyramid":
        # its scores are products of probabilities: its own threshold filters the outputs
        if threshold is None:
            threshold = cfg.MODEL.MASK_PYRAMID.VIS_SCORE_THRESH
    else:
        if threshold is None:
            threshold = RCNN_VIS_THRESH
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = threshold
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = threshold
        cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = threshold
    resolve_num_classes(cfg)
    cfg.freeze()
    return cfg, threshold


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="maskpyramid")
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file}: no such file")
    try:
        paths = expand_inputs(args.input)
    except ValueError as e:
        parser.error(f"--input: {e}")
    try:
        cfg, threshold = setup_cfg(args)
        predictor = Predictor(cfg, config_file=args.config_file)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        _fail(str(e).strip("'\""))

    os.makedirs(args.output, exist_ok=True)
    bad, drawn, done = [], 0, 0
    start = time.perf_counter()
    for path, name in tqdm.tqdm(
        list(zip(paths, output_names(paths))), unit="image", file=sys.stderr
    ):
        try:
            image = read_image(path, format="BGR")
        except Exception as e:  # PIL's errors of corrupt or unknown files are of many types
            bad.append(f"{path}: cannot read the image ({type(e).__name__}: {e})")
            continue
        instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        visualizer = Visualizer(
            image[:, :, ::-1], predictor.metadata, instance_mode=ColorMode.IMAGE
        )
        drawing = visualizer.draw_instance_predictions(instances).get_image()
        out = os.path.join(args.output, name)
        if not cv2.imwrite(out, drawing[:, :, ::-1]):
            _fail(f"cannot write {out}")
        drawn += len(instances)
        done += 1
    seconds = (time.perf_counter() - start) / max(done, 1)
    logger.info(
        f"{done} images, {drawn} instances drawn (score >= {threshold:g}), "
        f"{seconds:.2f} s per image, written to {args.output}"
    )
    if bad:
        _fail(
            f"{len(bad)} of {len(paths)} images could not be read (the others were drawn):\n  "
            + "\n  ".join(bad)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

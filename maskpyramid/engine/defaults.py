"""The command line and config set-up shared by ``train_net.py`` and the tools."""

import argparse
from typing import Callable, Sequence

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_maskpyramid_config, resolve_num_classes
from ..data.datasets import register_coco_instances_checked

__all__ = ["argument_parser", "build_cfg", "register_datasets_from_args", "setup"]


def argument_parser(epilog: str = None) -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` plus ``--register-coco``."""
    parser = default_argument_parser(epilog)
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format instance dataset as NAME (repeatable); then use it in "
        "DATASETS.TRAIN / DATASETS.TEST",
    )
    return parser


def register_datasets_from_args(args) -> None:
    """Register every ``--register-coco``; wrong paths fail here, before any training starts."""
    for name, json_file, image_root in args.register_coco:
        register_coco_instances_checked(name, json_file, image_root)


def build_cfg(config_file: str, opts: Sequence = (), add_configs: Sequence[Callable] = ()):
    """detectron2's config with MaskPyramid's keys (and ``add_configs``'), merged from
    ``config_file`` and ``opts`` (KEY VALUE ...); unfrozen, the number of classes not resolved.

    Args:
        add_configs: more ``add_*_config(cfg)`` functions, e.g. of projects, run before merging.
    """
    cfg = get_cfg()
    add_maskpyramid_config(cfg)
    for add_config in add_configs:
        add_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def setup(args, add_configs: Sequence[Callable] = ()):
    """Config from ``--config-file`` and ``opts``, datasets registered, classes checked.

    Args:
        add_configs: more ``add_*_config(cfg)`` functions, e.g. of projects, run before merging.
    """
    cfg = build_cfg(args.config_file, args.opts, add_configs)
    # before the datasets, whose loading and generation log through it
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="maskpyramid")
    register_datasets_from_args(args)
    resolve_num_classes(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg

"""Model loading for inference that fails loudly: ``load_checkpoint`` and ``Predictor``.

detectron2's ``DetectionCheckpointer.load`` only logs the weights a checkpoint lacks, and an empty
``MODEL.WEIGHTS`` loads nothing at all: an inference model then silently draws or evaluates
random weights. Here every tensor of the model must come from the checkpoint.
"""

import logging
import os
import re
from collections.abc import Mapping
from typing import Dict, List, Sequence, Tuple

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from torch import nn

__all__ = ["CheckpointError", "load_checkpoint", "Predictor"]

logger = logging.getLogger(__name__)

# a checkpoint's family, told by the top-level modules only it has (GeneralizedRCNN and
# ScratchMaskRCNN share their state-dict keys; MaskPyramid's modules are in modeling/meta_arch.py)
ARCHITECTURE_PREFIXES = (
    ("a Mask R-CNN (GeneralizedRCNN or ScratchMaskRCNN)", ("roi_heads.", "proposal_generator.")),
    (
        "a MaskPyramid",
        ("score_head.", "init_heads.", "grow_heads.", "class_head.", "refine_head.", "box_head."),
    ),
)
# how many missing or misshapen tensors a message names
EXAMPLES = 3
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


def _architecture(keys: Sequence[str]) -> str:
    """The family of a state dict's ``keys`` (``ARCHITECTURE_PREFIXES``), or "" when unknown."""
    for name, prefixes in ARCHITECTURE_PREFIXES:
        if any(k.startswith(prefixes) for k in keys):
            return name
    return ""


def _examples(keys: Sequence[str], n: int = EXAMPLES) -> str:
    more = ", ..." if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _reason(error: Exception, limit: int = 160) -> str:
    """The error's type and the first line of its message (torch's run to a paragraph)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(first) > limit:
        first = first[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _ordered(missing: List[str], own: Sequence[str]) -> List[str]:
    """``missing`` with the telling keys first: those of the model's own heads (``own``
    prefixes), then the others, BatchNorm's counters last."""

    def rank(k: str) -> int:
        return 2 if k.endswith("num_batches_tracked") else 0 if k.startswith(tuple(own)) else 1

    return sorted(missing, key=rank)


def _check_fit(
    path: str,
    model_name: str,
    model_keys: List[str],
    checkpoint_keys: List[str],
    missing: List[str],
    shapes: List[Tuple[str, tuple, tuple]],
    config_file: str,
) -> None:
    """Raise ``CheckpointError`` when some of the model's tensors did not load."""
    if not missing and not shapes:
        return
    this = f"this {model_name}" + (f" (config {config_file})" if config_file else "")
    held, own = _architecture(checkpoint_keys), _architecture(model_keys)
    if held and held != own:
        head = f"{path} holds the weights of {held}, not of {this}"
    else:
        head = f"{path} does not fit {this}"
    problems = []
    if missing:
        prefixes = dict(ARCHITECTURE_PREFIXES).get(own, ())
        problems.append(
            f"{len(missing)} of its {len(model_keys)} tensors are missing, "
            f"e.g. {_examples(_ordered(missing, prefixes))}"
        )
    if shapes:
        shown = [f"{k} {tuple(c)} in the checkpoint, {tuple(m)} in the model" for k, c, m in shapes]
        # after missing tensors, one example is enough
        problems.append(
            f"{len(shapes)} of its {len(model_keys)} tensors have another shape, "
            f"e.g. {_examples(shown, 1 if missing else EXAMPLES)}"
        )
    raise CheckpointError(
        f"{head}: {'; '.join(problems)}; pass the checkpoint trained with this config"
    )


def load_checkpoint(
    model: nn.Module, path: str, key: str = "MODEL.WEIGHTS", config_file: str = ""
) -> Dict:
    """Load ``path`` into ``model`` for inference; every tensor of the model must be loaded.

    Args:
        model: the built model (its class name is its META_ARCHITECTURE).
        path: a local checkpoint file, or a URL (``https://``, ``detectron2://``: fetched by the
            checkpointer as is).
        key: the config key ``path`` came from, named in the errors.
        config_file: named in the errors, when given.

    Returns:
        the checkpoint's other entries (without "model"), e.g. "iteration".

    Raises:
        CheckpointError: ``path`` is empty or a folder, torch cannot read it, or one of the
            model's parameters or buffers is missing from it or has another shape there (the
            message says which architecture the checkpoint holds, when it is another).
        FileNotFoundError: the local file ``path`` does not exist.
    """
    if not path:
        raise CheckpointError(
            f"{key} is empty: pass the trained checkpoint, e.g. {key} output/.../model_final.pth"
        )
    if not _URL.match(path):
        if os.path.isdir(path):
            raise CheckpointError(
                f"{key} {path} is a folder: pass its checkpoint file, e.g. "
                f"{key} {os.path.join(path, 'model_final.pth')}"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key} {path}: no such checkpoint file")
    checkpointer = DetectionCheckpointer(model)
    logger.info(f"Loading {key} {path}")
    local = checkpointer.path_manager.get_local_path(path)
    try:
        checkpoint = checkpointer._load_file(local)
    except Exception as e:  # pickle, zip and torch errors alike: the file is not a checkpoint
        raise CheckpointError(
            f"{key} {path}: torch cannot read this checkpoint file ({_reason(e)})"
        ) from e
    state = checkpoint.get("model") if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping) or not all(
        isinstance(v, (torch.Tensor, np.ndarray)) for v in state.values()
    ):
        raise CheckpointError(
            f"{key} {path} holds no state dict of a model (a {type(state).__name__} of other "
            "things than tensors)"
        )
    checkpoint_keys = list(state.keys())
    model_keys = list(model.state_dict().keys())
    incompatible = checkpointer._load_model(checkpoint)
    shapes = list(incompatible.incorrect_shapes)
    misshapen = {k for k, _, _ in shapes}
    # tensors of the wrong shape are not loaded, and so also reported missing
    missing = [k for k in incompatible.missing_keys if k not in misshapen]
    _check_fit(
        path, type(model).__name__, model_keys, checkpoint_keys, missing, shapes, config_file
    )
    if incompatible.unexpected_keys:
        logger.debug(
            f"{path}: {len(incompatible.unexpected_keys)} tensors this model does not use, "
            f"e.g. {_examples(incompatible.unexpected_keys)}"
        )
    return checkpoint


class Predictor(DefaultPredictor):
    """detectron2's ``DefaultPredictor`` loading its weights with ``load_checkpoint``.

    One BGR image (H, W, 3) in, the model's output dict for it out (``__call__`` is
    DefaultPredictor's). ``metadata`` is that of ``DATASETS.TEST[0]``, or of ``DATASETS.TRAIN[0]``
    when there is no test set: the class names to draw.
    """

    def __init__(self, cfg, config_file: str = ""):
        """
        Args:
            cfg: a resolved config (not modified); ``MODEL.WEIGHTS`` is the checkpoint.
            config_file: named in the checkpoint errors, when given.
        """
        self.cfg = cfg.clone()  # the model may modify it
        self.model = build_model(self.cfg)
        self.model.eval()
        names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        self.metadata = MetadataCatalog.get(names[0] if names else "__unused")
        load_checkpoint(self.model, cfg.MODEL.WEIGHTS, config_file=config_file)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT is {self.input_format}: the predictor takes RGB or BGR")

"""detectron2 v0.6 on today's libraries: every compatibility fix of the project, in one place.

detectron2 is not on PyPI; ``pb1-detectron2==0.6`` is its v0.6 source without the C++ files.
``tools/build_detectron2.py`` turns it into a pure-Python wheel, using the two build-time parts of
this module; :func:`install` is the run-time part. Each fix restores what upstream detectron2 does
after v0.6, and each is inert on an upstream detectron2 built from source (with its ``_C``).

Build time (source fixes, applied to the sdist before the wheel is made):

======================================  ======================================================
fix                                     upstream behaviour it restores
======================================  ======================================================
``np.bool/int/float/str/object`` ->     the builtin types, as upstream did when NumPy 1.24
builtin ``bool/int/float/str/object``   removed the aliases (class histogram of every train
                                        loader, polygon rasterisation, Visualizer, evaluators)
``Image.LINEAR`` -> ``Image.BILINEAR``  ``import detectron2.data`` on Pillow >= 10, which
                                        removed the alias (default arg of ``ExtentTransform``)
``pkg_resources`` -> package path       ``model_zoo.get_config_file`` without setuptools'
                                        removed ``pkg_resources``
``detectron2/_C.py`` stand-in           ``from detectron2 import _C`` succeeds (it runs at
(:data:`EXTENSION_STANDIN`)             import time of ``detectron2.layers`` and
                                        ``detectron2.evaluation``); each feature that needs
                                        compiled code raises :class:`MissingExtensionError`
                                        naming the feature and the remedy when it is used
======================================  ======================================================

Build-time rather than run-time, because these break at *import* of detectron2's own modules:
a run-time patch would have to run before any ``import detectron2.*`` in the user's program and
would put aliases back into NumPy and Pillow for everyone. Fixed in the source, the installed
detectron2 behaves like upstream whatever the import order, and nothing global is patched.

Run time (:func:`install`, called by ``import maskpyramid``; a no-op where ``_C`` is compiled):

- ``COCOEvaluator(use_fast_impl=True)`` (its default) runs on ``faster-coco-eval`` (AP identical
  to pycocotools, several times faster) instead of detectron2's compiled ``COCOeval_opt``; without
  faster-coco-eval it falls back to pycocotools' official ``COCOeval``.

Two more v0.6 gaps are closed in :mod:`maskpyramid.engine`, where the code they belong to lives:
multi-process training on CPU (v0.6's ``launch`` asserts CUDA and hard-codes NCCL;
:func:`~maskpyramid.engine.launch.launch` uses gloo without CUDA and defers to detectron2's own
``launch`` with it, and ``Trainer`` wraps CPU models in DDP with ``device_ids=None``), and
checkpoints without the optimizer state (v0.6's ``DefaultTrainer`` leaves it out, so its
``--resume`` restarts momentum from zero; ``Trainer`` saves it as upstream does now).

This module imports nothing but the standard library at its top, so that the build step can load
it before detectron2 exists.
"""

import importlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List

__all__ = [
    "SOURCE_FIXES",
    "EXTENSION_STANDIN",
    "apply_source_fixes",
    "has_compiled_extension",
    "install",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceFix:
    """A regular-expression rewrite of detectron2's v0.6 sources.

    Attributes:
        files: glob(s) relative to the unpacked sdist, e.g. ``detectron2/**/*.py``.
        pattern: regular expression to replace.
        replacement: ``re.sub`` replacement.
        restores: the upstream behaviour the fix restores (for the docs and the build log).
    """

    files: str
    pattern: str
    replacement: str
    restores: str


SOURCE_FIXES = (
    SourceFix(
        files="detectron2/**/*.py",
        # `np.int` but not `np.int64`, `np.bool_` or `np.float32`
        pattern=r"\bnp\.(bool|int|float|str|object)\b(?![_\d])",
        replacement=r"\1",
        restores="NumPy >= 1.24 removed the np.bool/int/float/str/object aliases",
    ),
    SourceFix(
        files="detectron2/data/transforms/transform.py",
        pattern=r"\bImage\.LINEAR\b",
        replacement="Image.BILINEAR",
        restores="Pillow >= 10 removed Image.LINEAR (a default argument: import-time failure)",
    ),
    SourceFix(
        files="detectron2/model_zoo/model_zoo.py",
        pattern=r"^import pkg_resources\n",
        replacement="",
        restores="setuptools >= 81 removed pkg_resources (imported by model_zoo)",
    ),
    SourceFix(
        files="detectron2/model_zoo/model_zoo.py",
        pattern=r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\",\s*"
        r"os\.path\.join\(\"configs\", config_path\)\s*\)",
        replacement='os.path.join(os.path.dirname(__file__), "configs", config_path)',
        restores="model-zoo config paths without pkg_resources",
    ),
)


def apply_source_fixes(root) -> List[str]:
    """Apply :data:`SOURCE_FIXES` to an unpacked detectron2 v0.6 source tree, in place.

    Args:
        root: folder that contains the ``detectron2`` package.

    Returns:
        one line per (fix, file) changed, for the build log.

    Raises:
        RuntimeError: a fix matched nowhere (the sdist is not the v0.6 it was written for).
    """
    root = Path(root)
    changes = []
    for fix in SOURCE_FIXES:
        hits = 0
        for path in sorted(root.glob(fix.files)):
            text = path.read_text()
            new_text, n = re.subn(fix.pattern, fix.replacement, text, flags=re.MULTILINE)
            if n:
                path.write_text(new_text)
                hits += n
                changes.append(f"{path.relative_to(root)}: {n}x {fix.restores}")
        if hits == 0:
            raise RuntimeError(
                f"compat fix {fix.pattern!r} matched nothing in {root}/{fix.files}: "
                "the detectron2 source is not the v0.6 these fixes are for"
            )
    (root / "detectron2" / "_C.py").write_text(EXTENSION_STANDIN)
    changes.append("detectron2/_C.py: pure-Python stand-in for the compiled extension")
    return changes


# Written as `detectron2/_C.py` into the pure-Python wheel. Self-contained (torch only), so that
# detectron2 does not depend on maskpyramid.
EXTENSION_STANDIN = '''\
"""Stand-in for detectron2's compiled extension: this detectron2 was built without it.

Written by maskpyramid's build step (see maskpyramid/compat.py). Everything a Mask R-CNN needs
works without it (RoIAlign, NMS and DeformConv on CPU run on torchvision); the features below
raise MissingExtensionError, naming the feature and the remedy, when they are used.
"""
import torch

PURE_PYTHON_STANDIN = True

_FAST_EVAL = "detectron2's fast COCO evaluation (COCOEvaluator(use_fast_impl=True))"
_FEATURES = {
    "deform_conv": "deformable convolution on CUDA (detectron2.layers.DeformConv)",
    "modulated_deform_conv": "modulated deformable convolution (ModulatedDeformConv)",
    "box_iou_rotated": "rotated-box IoU (detectron2.structures.pairwise_iou_rotated)",
    "roi_align_rotated": "rotated RoIAlign (detectron2.layers.ROIAlignRotated)",
    "nms_rotated": "rotated NMS (detectron2.layers.nms_rotated)",
    "COCOeval": _FAST_EVAL,
    "InstanceAnnotation": _FAST_EVAL,
    "ImageEvaluationInstance": _FAST_EVAL,
}
_REMEDY = {
    "COCOeval": "`import maskpyramid` (routes it to faster-coco-eval) or pass use_fast_impl=False",
}


class MissingExtensionError(RuntimeError):
    """A detectron2 feature that needs the compiled extension was used."""


def _error(name):
    feature = next((f for k, f in _FEATURES.items() if name.startswith(k)), "detectron2._C." + name)
    remedy = next((r for k, r in _REMEDY.items() if name.startswith(k)), None)
    remedy = remedy or "install upstream detectron2 built from source with its C++/CUDA extension"
    return MissingExtensionError(
        f"{feature} needs detectron2's compiled extension, and this detectron2 is a pure-Python "
        f"build (no detectron2._C). Remedy: {remedy}."
    )


def get_compiler_version():
    return "none (pure-Python detectron2 build)"


def get_cuda_version():
    return "none (pure-Python detectron2 build)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise _error(name)

    return missing


# v0.6 calls rotated NMS through torch.ops: give the op a body that says what is missing.
_LIBRARY = torch.library.Library("detectron2", "FRAGMENT")
try:
    _LIBRARY.define("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor")
except RuntimeError:  # already defined (e.g. a compiled extension was loaded as well)
    pass
else:

    def _nms_rotated(boxes, scores, iou_threshold):
        raise _error("nms_rotated")

    _LIBRARY.impl("nms_rotated", _nms_rotated, "CompositeExplicitAutograd")
'''


def has_compiled_extension() -> bool:
    """Whether the installed detectron2 has its compiled ``_C`` (upstream built from source)."""
    ext = importlib.import_module("detectron2._C")
    return not getattr(ext, "PURE_PYTHON_STANDIN", False)


_installed = False


def install() -> bool:
    """Apply the run-time fixes; idempotent, and a no-op on a detectron2 with compiled ``_C``.

    Returns:
        whether any fix is active.
    """
    global _installed
    if _installed:
        return True
    if has_compiled_extension():
        return False
    from detectron2.evaluation import coco_evaluation

    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        logger.warning(
            "faster-coco-eval is not installed and detectron2 has no compiled COCOeval_opt: "
            "COCOEvaluator uses pycocotools' official COCOeval (same AP, slower)."
        )
        coco_evaluation.COCOeval_opt = coco_evaluation.COCOeval
    else:

        class COCOevalFaster(COCOeval_faster):
            """faster-coco-eval with pycocotools' signature, printing its summary like it."""

            def __init__(self, cocoGt=None, cocoDt=None, iouType="segm"):
                super().__init__(cocoGt, cocoDt, iouType, print_function=print)

        coco_evaluation.COCOeval_opt = COCOevalFaster
    _installed = True
    return True

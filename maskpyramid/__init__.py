"""MaskPyramid: a detectron2 extension. Importing it registers the project's datasets and models."""

from . import compat

compat.install()  # before anything builds a COCOEvaluator; a no-op on upstream detectron2

from .config import add_maskpyramid_config  # noqa: E402
from .data import register_all  # noqa: E402

register_all()

from . import modeling  # noqa: E402  (registers META_ARCHITECTURE "MaskPyramid")

__version__ = "0.1.0"

"""MaskPyramid's model: importing it registers ``META_ARCHITECTURE: "MaskPyramid"``."""

from .meta_arch import LevelRecord, MaskPyramid

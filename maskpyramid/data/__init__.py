from .datasets import (
    load_coco_instances,
    register_all,
    register_coco_instances_checked,
    register_fruits_nuts,
)
from .mapper import CheckedDatasetMapper, ImageReadError, MaskPyramidDatasetMapper

"""Dataset mappers: detectron2's ``DatasetMapper`` with errors that name the image at fault."""

from typing import Dict

from detectron2.data import DatasetMapper

__all__ = ["ImageReadError", "CheckedDatasetMapper", "MaskPyramidDatasetMapper"]


class ImageReadError(OSError):
    """An image of the dataset is missing, unreadable or corrupt."""


class CheckedDatasetMapper(DatasetMapper):
    """``DatasetMapper`` whose image-reading failures name the file and the image id.

    A missing or corrupt image is an error, not a skip: silently training on fewer images than the
    dataset lists changes the experiment. Checkpoints survive the error, so the run continues with
    ``--resume`` once the file is fixed.
    """

    def __call__(self, dataset_dict: Dict) -> Dict:
        file_name = dataset_dict.get("file_name")
        image_id = dataset_dict.get("image_id")
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError) as e:  # PIL raises SyntaxError for some broken PNGs
            raise ImageReadError(
                f"cannot read image id={image_id} file {file_name}: {type(e).__name__}: {e}"
            ) from e


class MaskPyramidDatasetMapper(CheckedDatasetMapper):
    """Training mapper of MaskPyramid: also prepares every level's targets, once per image.

    Adds ``dataset_dict["pyramid_targets"]`` (see ``maskpyramid.modeling.targets``), computed in
    the data-loader workers, beside the model's forward pass.
    """

    def __init__(self, cfg, is_train: bool = True):
        from ..modeling.targets import TargetParams  # data does not import modeling at load

        super().__init__(cfg, is_train=is_train)
        self.target_params = TargetParams.from_config(cfg)

    def __call__(self, dataset_dict: Dict) -> Dict:
        from ..modeling.targets import prepare_pyramid_targets

        out = super().__call__(dataset_dict)
        if "instances" in out:
            try:
                out["pyramid_targets"] = prepare_pyramid_targets(
                    out["instances"], self.target_params
                )
            except Exception as e:
                raise type(e)(
                    f"pyramid targets of image id={dataset_dict.get('image_id')} "
                    f"file {dataset_dict.get('file_name')}: {e}"
                ) from e
        return out

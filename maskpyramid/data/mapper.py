"""Dataset mappers: detectron2's ``DatasetMapper`` with errors that name the image at fault."""

from typing import Dict

from detectron2.data import DatasetMapper

__all__ = ["ImageReadError", "CheckedDatasetMapper"]


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

"""Training-time images (``VIS_PERIOD`` > 0): per level, target vs predicted pyramid masks.

Like detectron2's ``GeneralizedRCNN.visualize_training``, for the first image of the batch and
through ``EventStorage.put_image`` (TensorBoard's images tab). Each level's image has the
instances' masks on that level's grid on the left and the surviving pyramids on the right, each
pixel in the colour of the most probable pyramid where it reaches 0.5: a pyramid trained on an
instance (a positive, or one teacher-forced on it) has its instance's colour, any other is grey.
"""

import numpy as np
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.utils.colormap import colormap

from .pyramids import _identity_fill, _overlay, _row, _titled, upsample_to_image

__all__ = ["put_training_images", "training_images"]

GREY = np.array([160, 160, 160], np.uint8)


def training_images(batched_inputs, records, input_format: str = "BGR"):
    """[(name, (H, W', 3) uint8 RGB image)] of the first image of the batch, one per level."""
    x = batched_inputs[0]
    image = convert_image_to_rgb(x["image"].permute(1, 2, 0), input_format).astype(np.uint8)
    h, w = image.shape[:2]
    dim = (image * 0.45).astype(np.uint8)
    targets = x["pyramid_targets"]
    colours = colormap(rgb=True, maximum=255).astype(np.uint8)
    out = []
    for rec in records:
        s = rec.stride
        tm = targets["masks"][rec.level].float().numpy()
        tc = colours[np.arange(len(tm)) % len(colours)]
        fill, where = _identity_fill(tm, tc, 0.5)
        left = _overlay(dim, upsample_to_image(fill, s, h, w), upsample_to_image(where, s, h, w))

        pyr = rec.pyramids
        sel = (pyr.batch == 0).nonzero()[:, 0]
        probs = pyr.logits[sel].detach().sigmoid().float().cpu().numpy()
        # the batch's instance index -> this image's (instances of image 0 come first)
        target = pyr.target[sel].cpu().numpy()
        pc = np.where((target >= 0)[:, None], colours[target.clip(min=0) % len(colours)], GREY)
        fill, where = _identity_fill(probs, pc.astype(np.uint8), 0.5)
        right = _overlay(dim, upsample_to_image(fill, s, h, w), upsample_to_image(where, s, h, w))
        name = f"pyramids/{rec.name}"
        out.append(
            (
                f"{name}: target (left) vs predicted (right) masks",
                _row(
                    [
                        _titled(left, f"{rec.name}: {len(tm)} instances"),
                        _titled(right, f"{rec.name}: {len(sel)} pyramids"),
                    ]
                ),
            )
        )
    return out


def put_training_images(storage, batched_inputs, records, input_format: str = "BGR") -> None:
    """``storage.put_image`` of :func:`training_images` (CHW, RGB, uint8)."""
    for name, img in training_images(batched_inputs, records, input_format):
        storage.put_image(name, img.transpose(2, 0, 1))

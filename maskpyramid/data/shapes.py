"""``shapes``: a deterministic synthetic instance-segmentation dataset in COCO format.

Each image shows 1 to 15 instances of five classes (``disc``, ``ring``, ``triangle``, ``square``,
``star``) on a textured, cluttered background. Instances are rotated, textured, coloured
independently of their class, scaled so that their areas span COCO's small, medium and large
ranges, and painted in order, so that later instances occlude earlier ones. The ground truth of an
instance is its *visible* part; instances left almost hidden are not painted at all.

Visible parts can have holes (a ring, or an object seen through a ring) and several components
(an object cut by another), which polygons cannot represent, so masks are stored as COCO
compressed RLE: train with ``cfg.INPUT.MASK_FORMAT = "bitmask"``.

Image ``i`` of a split depends only on ``(spec.seed, split, i)``, so the dataset is generated on
first use instead of being downloaded, and regenerated when :data:`GENERATOR_VERSION` or the
:class:`ShapesSpec` changes. On disk, under ``root`` (``$DETECTRON2_DATASETS``, else
``datasets``, as in detectron2)::

    shapes/<split>/<index:05d>.png
    shapes/annotations/instances_<split>.json
    shapes/meta.json        # written last: the dataset is complete when it matches

Typical use::

    register_shapes()  # instant; the data is generated when a dataset is first loaded
    cfg.DATASETS.TRAIN = ("shapes_train",)
    cfg.DATASETS.TEST = ("shapes_val",)
    cfg.INPUT.MASK_FORMAT = "bitmask"
"""

import contextlib
import fcntl
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_util

__all__ = [
    "GENERATOR_VERSION",
    "THING_CLASSES",
    "SPLITS",
    "ShapesSpec",
    "DEFAULT_SPEC",
    "render_image",
    "generate_split",
    "shapes_paths",
    "ensure_shapes",
    "register_shapes",
]

logger = logging.getLogger(__name__)

# Bump whenever a change to this module changes the generated images or annotations.
GENERATOR_VERSION = 1

THING_CLASSES = ("disc", "ring", "triangle", "square", "star")

# RGB colours used by detectron2's Visualizer, one per class.
THING_COLORS = {
    "disc": (230, 25, 75),
    "ring": (60, 180, 75),
    "triangle": (0, 130, 200),
    "square": (245, 130, 48),
    "star": (145, 30, 180),
}

# dataset name -> (split, number of images)
SPLITS = {"shapes_train": ("train", 2000), "shapes_val": ("val", 300)}

# COCO's small / medium / large boundaries, in pixels of area.
COCO_AREA_BOUNDS = (32**2, 96**2)

DATASET_DIRNAME = "shapes"
META_FILENAME = "meta.json"
LOCK_FILENAME = ".lock"

# An image needs at least one instance; a spec that leaves none visible would loop forever.
_MAX_LAYOUT_ATTEMPTS = 100

# Forking worker processes costs more than rendering a few dozen images.
_MIN_IMAGES_PER_WORKER = 32

# Explicit, so that the PNG bytes do not depend on OpenCV's defaults; RLE is the fastest here.
_PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION,
    1,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
]

# cv2 drawing takes fixed-point coordinates with this many fractional bits: sub-pixel shapes.
_SUBPIXEL_BITS = 4


@dataclass(frozen=True)
class ShapesSpec:
    """Parameters of the generator. Every field enters ``meta.json``: changing one regenerates."""

    height: int = 256  # image height, pixels
    width: int = 256  # image width, pixels
    seed: int = 0  # base seed; image i of split s is seeded by (seed, s, i)
    classes: Tuple[str, ...] = THING_CLASSES  # category_id = 1 + position in this tuple
    min_instances: int = 1  # instances placed per image (uniform), before hidden ones are dropped
    max_instances: int = 15
    # Size range: radius of the disc with the area of the whole shape, pixels. Equal areas for
    # all classes keep size from giving the class away.
    min_radius: float = 6.0
    max_radius: float = 112.0
    # Chance of a small, medium or large area (COCO's ranges; log-uniform within a range). More
    # large ones, as occlusion and the image border turn many of them into medium or hidden ones.
    size_weights: Tuple[float, float, float] = (1.0, 0.8, 2.5)
    centre_margin: float = 0.5  # centres stay this many radii inside the image, if they can
    ring_inner_ratio: Tuple[float, float] = (0.4, 0.7)  # hole radius / outer radius of a ring
    star_inner_ratio: Tuple[float, float] = (0.38, 0.55)  # inner / outer vertex radius of a star
    depth_order_jitter: float = 1.0  # painting order sorts by -log(area) + N(0, this)
    min_visible_fraction: float = 0.3  # drop instances showing less of their in-image area
    min_visible_pixels: int = 12  # ... or fewer pixels than this
    min_contrast: float = 60.0  # fill colour vs background at the centre, L2 in BGR, best effort
    colour_tries: int = 8  # colour draws to reach min_contrast before accepting the last one
    texture_amplitude: float = 40.0  # strength of object textures (noise, stripes, gradient)
    stripe_period: Tuple[float, float] = (4.0, 16.0)  # pixels
    outline_probability: float = 0.4  # chance that an object has a darker or lighter outline
    outline_tones: Tuple[float, ...] = (0.45, 1.6)  # outline colour = fill colour * one of these
    max_outline_width: int = 2  # pixels
    background_blotch_std: float = 25.0  # low-frequency colour variation of the background
    background_blotch_cells: int = 4  # blotches are a cells x cells random grid, upsampled
    clutter_items: Tuple[int, int] = (3, 10)  # unannotated lines, curves and ellipses per image
    clutter_size: Tuple[float, float] = (5.0, 25.0)  # clutter ellipse semi-axis; curve step std
    clutter_curve_points: int = 12  # vertices of a clutter curve (a random walk)
    max_clutter_width: int = 2  # of clutter lines and curves, pixels
    # Clutter ellipses are at least this elongated, so that none passes for a disc.
    clutter_elongation: Tuple[float, float] = (2.5, 6.0)
    noise_std: float = 5.0  # per-pixel Gaussian sensor noise over the whole image

    def __post_init__(self):
        unknown = set(self.classes) - set(THING_CLASSES)
        if unknown or not self.classes:
            raise ValueError(f"classes must be a non-empty subset of {THING_CLASSES}: {unknown}")
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError("need 1 <= min_instances <= max_instances")
        if not 0 < self.min_radius <= self.max_radius:
            raise ValueError("need 0 < min_radius <= max_radius")


DEFAULT_SPEC = ShapesSpec()


# ---------------------------------------------------------------------------------------------
# Shapes: full (unoccluded, in-image) masks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    """Where and how big one instance is, before occlusion."""

    shape: str
    centre: Tuple[float, float]  # (x, y), pixels
    radius: float  # circumradius, pixels
    area: float  # of the whole shape, pixels
    angle: float  # radians
    inner_ratio: float  # ring hole / star inner radius relative to ``radius``; unused otherwise


def _fixed_point(points: np.ndarray) -> np.ndarray:
    return np.round(points * (1 << _SUBPIXEL_BITS)).astype(np.int32)


def _fill_circle(canvas: np.ndarray, centre, radius: float, value: int) -> None:
    cv2.circle(
        canvas,
        tuple(int(v) for v in _fixed_point(np.asarray(centre))),
        int(_fixed_point(np.asarray(radius))),
        value,
        thickness=-1,
        lineType=cv2.LINE_8,
        shift=_SUBPIXEL_BITS,
    )


def _fill_polygon(canvas: np.ndarray, placement: _Placement, radii: np.ndarray) -> None:
    """Fills the polygon whose i-th vertex is at ``radii[i]`` from the centre, evenly spaced."""
    angles = placement.angle + np.arange(len(radii)) * (2 * math.pi / len(radii))
    vertices = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
    vertices += np.asarray(placement.centre)
    cv2.fillPoly(canvas, [_fixed_point(vertices)], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)


def _disc_mask(canvas: np.ndarray, placement: _Placement) -> None:
    _fill_circle(canvas, placement.centre, placement.radius, 1)


def _ring_mask(canvas: np.ndarray, placement: _Placement) -> None:
    _fill_circle(canvas, placement.centre, placement.radius, 1)
    _fill_circle(canvas, placement.centre, placement.radius * placement.inner_ratio, 0)


def _regular_polygon_mask(canvas: np.ndarray, placement: _Placement) -> None:
    corners = _POLYGON_CORNERS[placement.shape]
    _fill_polygon(canvas, placement, np.full(corners, placement.radius))


def _star_mask(canvas: np.ndarray, placement: _Placement) -> None:
    radii = np.tile([placement.radius, placement.radius * placement.inner_ratio], _STAR_POINTS)
    _fill_polygon(canvas, placement, radii)


_POLYGON_CORNERS = {"triangle": 3, "square": 4}
_STAR_POINTS = 5

_SHAPE_MASKS: Dict[str, Callable[[np.ndarray, _Placement], None]] = {
    "disc": _disc_mask,
    "ring": _ring_mask,
    "triangle": _regular_polygon_mask,
    "square": _regular_polygon_mask,
    "star": _star_mask,
}

# Rotating these changes nothing but the rasterisation.
_ROTATION_INVARIANT = {"disc", "ring"}


def _full_mask(spec: ShapesSpec, placement: _Placement) -> np.ndarray:
    canvas = np.zeros((spec.height, spec.width), dtype=np.uint8)
    _SHAPE_MASKS[placement.shape](canvas, placement)
    return canvas.view(bool)


# ---------------------------------------------------------------------------------------------
# Layout: which instances, in which order, and what is visible of each
# ---------------------------------------------------------------------------------------------


def _image_rng(spec: ShapesSpec, split: str, index: int) -> np.random.Generator:
    # crc32, unlike hash(), is the same in every process and Python version.
    split_id = zlib.crc32(split.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([spec.seed, split_id, index]))


def _area_per_squared_radius(shape: str, inner_ratio: float) -> float:
    """Area of a shape of circumradius 1."""
    if shape == "disc":
        return math.pi
    if shape == "ring":
        return math.pi * (1 - inner_ratio**2)
    if shape == "star":
        return _STAR_POINTS * inner_ratio * math.sin(math.pi / _STAR_POINTS)
    corners = _POLYGON_CORNERS[shape]
    return corners / 2 * math.sin(2 * math.pi / corners)


def _sample_centre(spec: ShapesSpec, length: int, radius: float, rng: np.random.Generator) -> float:
    # A large shape centred near the border would be mostly cut off, hence small or dropped.
    margin = min(radius * spec.centre_margin, length / 2)
    return rng.uniform(margin, length - margin)


def _sample_area(spec: ShapesSpec, rng: np.random.Generator) -> float:
    """Picks a COCO size range by ``spec.size_weights``, then an area log-uniformly within it.

    The ranges are clipped to the spec's radius range; those left empty are never picked.
    """
    low, high = math.pi * spec.min_radius**2, math.pi * spec.max_radius**2
    edges = (0.0,) + COCO_AREA_BOUNDS + (math.inf,)
    ranges = [(max(a, low), min(b, high)) for a, b in zip(edges[:-1], edges[1:])]
    weights = np.array([w if a < b else 0.0 for w, (a, b) in zip(spec.size_weights, ranges)])
    if not weights.any():  # min_radius == max_radius
        return low
    start, end = ranges[rng.choice(len(ranges), p=weights / weights.sum())]
    return math.exp(rng.uniform(math.log(start), math.log(end)))


def _sample_placement(spec: ShapesSpec, rng: np.random.Generator) -> _Placement:
    shape = spec.classes[rng.integers(len(spec.classes))]
    inner_range = spec.star_inner_ratio if shape == "star" else spec.ring_inner_ratio
    inner_ratio = rng.uniform(*inner_range)
    area = _sample_area(spec, rng)
    radius = math.sqrt(area / _area_per_squared_radius(shape, inner_ratio))
    centre = (
        _sample_centre(spec, spec.width, radius, rng),
        _sample_centre(spec, spec.height, radius, rng),
    )
    angle = 0.0 if shape in _ROTATION_INVARIANT else rng.uniform(0, 2 * math.pi)
    return _Placement(shape, centre, radius, area, angle, inner_ratio)


def _painting_order(
    spec: ShapesSpec, placements: List[_Placement], rng: np.random.Generator
) -> List[_Placement]:
    """Shuffles ``placements`` into painting order, larger ones tending to come first (behind).

    With a uniformly random order, large instances would hide most others and leave few large
    or small instances visible.
    """
    keys = [-math.log(p.area) + rng.normal(0, spec.depth_order_jitter) for p in placements]
    return [placements[i] for i in np.argsort(keys, kind="stable")]


def _visible_masks(full_masks: List[np.ndarray]) -> List[np.ndarray]:
    """Visible part of each mask when painted in list order (later ones on top)."""
    covered = np.zeros_like(full_masks[0]) if full_masks else None
    visible = []
    for full in reversed(full_masks):
        visible.append(full & ~covered)
        covered |= full
    return visible[::-1]


def _is_visible_enough(spec: ShapesSpec, visible_area: int, full_area: int) -> bool:
    return visible_area >= spec.min_visible_pixels and (
        visible_area >= spec.min_visible_fraction * full_area
    )


def _sample_layout(spec: ShapesSpec, rng: np.random.Generator):
    """Samples the instances of one image, dropping those that would be almost hidden.

    Returns:
        list[tuple[_Placement, np.ndarray, np.ndarray]]: (placement, full mask, visible mask) of
        each kept instance, in painting order; never empty.
    """
    for _ in range(_MAX_LAYOUT_ATTEMPTS):
        count = rng.integers(spec.min_instances, spec.max_instances + 1)
        placements = _painting_order(
            spec, [_sample_placement(spec, rng) for _ in range(count)], rng
        )
        full_masks = [_full_mask(spec, p) for p in placements]
        visible = _visible_masks(full_masks)
        keep = [
            i
            for i, (f, v) in enumerate(zip(full_masks, visible))
            if _is_visible_enough(spec, int(v.sum()), int(f.sum()))
        ]
        if keep:
            break
    else:
        raise ValueError(f"{spec} leaves no instance visible enough to annotate")
    # Dropped instances are not painted: what they occluded shows, which only adds visibility.
    full_masks = [full_masks[i] for i in keep]
    return list(zip([placements[i] for i in keep], full_masks, _visible_masks(full_masks)))


# ---------------------------------------------------------------------------------------------
# Appearance: background, clutter, object textures
# ---------------------------------------------------------------------------------------------


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _projection(x0: float, y0: float, width: int, height: int, angle: float) -> np.ndarray:
    """``x cos(angle) + y sin(angle)`` over a ``height`` x ``width`` grid with origin (x0, y0)."""
    xs = (np.arange(width, dtype=np.float32) - x0) * math.cos(angle)
    ys = (np.arange(height, dtype=np.float32) - y0) * math.sin(angle)
    return ys[:, None] + xs[None, :]


def _smooth_upsampling(cells: int, length: int) -> np.ndarray:
    """``length x cells`` weights that interpolate ``cells`` values smoothly over ``length``."""
    position = np.linspace(0, cells - 1, length, dtype=np.float32)
    left = np.minimum(position.astype(int), cells - 2) if cells > 1 else np.zeros(length, int)
    fraction = position - left
    fraction = fraction * fraction * (3 - 2 * fraction)  # smoothstep: no creases at cell edges
    weights = np.zeros((length, cells), dtype=np.float32)
    weights[np.arange(length), left] = 1 - fraction
    if cells > 1:
        weights[np.arange(length), left + 1] = fraction
    return weights


def _background(spec: ShapesSpec, rng: np.random.Generator) -> np.ndarray:
    """A linear colour gradient with low-frequency blotches. Returns HxWx3 float32 BGR."""
    angle = rng.uniform(0, 2 * math.pi)
    ramp = _projection(0, 0, spec.width, spec.height, angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    start, end = _random_colour(rng), _random_colour(rng)
    cells = spec.background_blotch_cells
    blotches = rng.normal(0, spec.background_blotch_std, size=(3, cells, cells))
    row_weights = _smooth_upsampling(cells, spec.height)
    column_weights = _smooth_upsampling(cells, spec.width)
    channels = []
    for channel in range(3):
        plane = start[channel] + ramp * (end[channel] - start[channel])
        # Separable interpolation; broadcasting rather than matmul, which may start BLAS threads.
        rows = (row_weights[:, :, None] * blotches[channel].astype(np.float32)).sum(axis=1)
        for cell in range(cells):
            plane += rows[:, cell, None] * column_weights[None, :, cell]
        channels.append(plane)
    return np.stack(channels, axis=-1)


def _draw_clutter(spec: ShapesSpec, image: np.ndarray, rng: np.random.Generator) -> None:
    """Unannotated distractors: thin lines, wiggly curves and elongated ellipses."""
    size = np.array([spec.width, spec.height])
    for _ in range(rng.integers(spec.clutter_items[0], spec.clutter_items[1] + 1)):
        colour = tuple(float(c) for c in _random_colour(rng))
        kind = rng.integers(3)
        if kind == 0:
            ends = _fixed_point(rng.uniform(0, 1, size=(2, 2)) * size)
            thickness = int(rng.integers(1, spec.max_clutter_width + 1))
            cv2.line(image, tuple(ends[0]), tuple(ends[1]), colour, thickness, shift=_SUBPIXEL_BITS)
        elif kind == 1:
            steps = rng.normal(0, spec.clutter_size[0], size=(spec.clutter_curve_points, 2))
            steps = steps.cumsum(axis=0)
            curve = _fixed_point(steps + rng.uniform(0, 1, size=2) * size)
            thickness = int(rng.integers(1, spec.max_clutter_width + 1))
            cv2.polylines(image, [curve], False, colour, thickness, shift=_SUBPIXEL_BITS)
        else:
            long_axis = rng.uniform(*spec.clutter_size)
            axes = (int(long_axis), max(1, int(long_axis / rng.uniform(*spec.clutter_elongation))))
            centre = tuple(int(c) for c in rng.uniform(0, 1, size=2) * size)
            angle = rng.uniform(0, 180)
            cv2.ellipse(image, centre, axes, angle, 0, 360, colour, thickness=-1)


def _fill_colour(
    spec: ShapesSpec, background: np.ndarray, placement: _Placement, rng: np.random.Generator
) -> np.ndarray:
    """A class-independent colour, redrawn a few times if it matches the background."""
    x = min(int(placement.centre[0]), spec.width - 1)
    y = min(int(placement.centre[1]), spec.height - 1)
    for _ in range(spec.colour_tries):
        colour = _random_colour(rng)
        if np.sqrt(np.square(colour - background[y, x]).sum()) >= spec.min_contrast:
            break
    return colour


def _tinted(fill: np.ndarray, field: np.ndarray, tint: np.ndarray) -> np.ndarray:
    """``fill + field[..., None] * tint``, an HxWx3 image from an HxW field.

    Channel by channel: broadcasting over a last axis of 3 is ~10x slower.
    """
    return np.stack([fill[c] + field * tint[c] for c in range(3)], axis=-1)


def _texture(
    spec: ShapesSpec,
    fill: np.ndarray,
    placement: _Placement,
    box: Tuple[int, int, int, int],
    rng: np.random.Generator,
) -> np.ndarray:
    """Object appearance over ``box`` (x, y, w, h): noise, stripes or a gradient on ``fill``."""
    x0, y0, w, h = box
    direction = rng.uniform(0, 2 * math.pi)
    cx, cy = placement.centre
    along = _projection(cx - x0, cy - y0, w, h, direction)
    amplitude = spec.texture_amplitude
    tint = rng.uniform(-amplitude, amplitude, size=3).astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        # Grey noise, at a third of the amplitude so that ~all of it stays within the amplitude.
        noise = rng.standard_normal((h, w), dtype=np.float32)
        return _tinted(fill, noise, np.full(3, amplitude / 3, dtype=np.float32))
    if kind == 1:
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(along * (2 * math.pi / rng.uniform(*spec.stripe_period)) + phase)
        return _tinted(fill, wave, tint)
    return _tinted(fill, along / placement.radius, tint)


def _erode(mask: np.ndarray, width: int) -> np.ndarray:
    """Binary erosion by a ``2 * width + 1`` square, the border replicated.

    The crops it is used on have a margin inside the image, so only the image border is
    replicated: a shape cut by the image border gets no outline along the cut.
    """
    eroded = mask
    for axis in (0, 1):
        padded = np.pad(eroded, [(width, width) if a == axis else (0, 0) for a in (0, 1)], "edge")
        length = eroded.shape[axis]
        eroded = np.logical_and.reduce(
            [np.take(padded, range(s, s + length), axis=axis) for s in range(2 * width + 1)]
        )
    return eroded


def _add_outline(
    spec: ShapesSpec,
    texture: np.ndarray,
    full_crop: np.ndarray,
    fill: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Paints, in place, a darker or lighter band along the inner border of the shape."""
    width = int(rng.integers(1, spec.max_outline_width + 1))
    band = full_crop & ~_erode(full_crop, width)
    tone = spec.outline_tones[rng.integers(len(spec.outline_tones))]
    texture[band] = np.clip(fill * tone, 0, 255)


def _padded_box(spec: ShapesSpec, mask: np.ndarray, margin: int) -> Tuple[int, int, int, int]:
    """Bounding box (x, y, w, h) of ``mask``, grown by ``margin`` and clipped to the image."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    x0, y0 = max(x - margin, 0), max(y - margin, 0)
    x1, y1 = min(x + w + margin, spec.width), min(y + h + margin, spec.height)
    return x0, y0, x1 - x0, y1 - y0


def _paint_instance(
    spec: ShapesSpec,
    image: np.ndarray,
    background: np.ndarray,
    instance,
    rng: np.random.Generator,
) -> None:
    placement, full, visible = instance
    box = _padded_box(spec, full, margin=spec.max_outline_width)
    x0, y0, w, h = box
    fill = _fill_colour(spec, background, placement, rng)
    texture = _texture(spec, fill, placement, box, rng)
    full_crop = full[y0 : y0 + h, x0 : x0 + w]
    if rng.uniform() < spec.outline_probability:
        _add_outline(spec, texture, full_crop, fill, rng)
    visible_crop = visible[y0 : y0 + h, x0 : x0 + w]
    np.copyto(image[y0 : y0 + h, x0 : x0 + w], texture, where=visible_crop[..., None])


def render_image(spec: ShapesSpec, split: str, index: int):
    """Renders one image of the dataset; pure (no disk access) and deterministic.

    Args:
        spec: generator parameters.
        split: split name, e.g. "train"; part of the seed.
        index: image index within the split; part of the seed.

    Returns:
        tuple[np.ndarray, list[dict]]: the HxWx3 uint8 BGR image, and one dict per instance, in
        painting order, with "category_id" (1-based, per ``spec.classes``), "mask" (HxW bool,
        the visible part; masks of one image are disjoint) and "full_area" (pixels the instance
        would cover inside the image if nothing occluded it).
    """
    rng = _image_rng(spec, split, index)
    instances = _sample_layout(spec, rng)
    background = _background(spec, rng)
    image = background.copy()
    _draw_clutter(spec, image, rng)
    for instance in instances:
        _paint_instance(spec, image, background, instance, rng)
    image += rng.standard_normal(image.shape, dtype=np.float32) * spec.noise_std
    image = np.clip(np.rint(image, out=image), 0, 255, out=image).astype(np.uint8)
    annotations = [
        {
            "category_id": spec.classes.index(placement.shape) + 1,
            "mask": visible,
            "full_area": int(full.sum()),
        }
        for placement, full, visible in instances
    ]
    return image, annotations


# ---------------------------------------------------------------------------------------------
# Writing a split
# ---------------------------------------------------------------------------------------------


def _image_filename(index: int) -> str:
    return f"{index:05d}.png"


def _coco_annotation(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.view(np.uint8)))
    return {
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()},
        "area": int(mask.sum()),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "iscrowd": 0,
    }


def _write_image(index: int, spec: ShapesSpec, split: str, image_dir: str) -> List[dict]:
    """Renders and saves image ``index``; returns its COCO annotations without ids."""
    image, annotations = render_image(spec, split, index)
    path = os.path.join(image_dir, _image_filename(index))
    if not cv2.imwrite(path, image, _PNG_PARAMS):
        raise OSError(f"Could not write {path}")
    return [dict(category_id=a["category_id"], **_coco_annotation(a["mask"])) for a in annotations]


def _map_indices(function: Callable, count: int, num_workers: Optional[int]) -> list:
    """``[function(i) for i in range(count)]``, in worker processes when that pays off."""
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1)
    num_workers = min(num_workers, count // _MIN_IMAGES_PER_WORKER)
    # Forked workers are safe because rendering uses no OpenCV function that runs on OpenCV's
    # thread pool (whose threads stay behind in the parent, deadlocking a child that uses it).
    # Daemonic processes (e.g. DataLoader workers) may not have children; fork is Unix-only.
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    if num_workers < 2 or multiprocessing.current_process().daemon or not can_fork:
        return [function(i) for i in range(count)]
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        return pool.map(function, range(count), chunksize=16)


def _replace_dir(src: str, dst: str) -> None:
    """Moves directory ``src`` to ``dst``, replacing ``dst``; never leaves ``dst`` half-written."""
    if os.path.exists(dst):
        old = f"{dst}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


def _write_json(data: dict, path: str) -> None:
    """Writes ``data`` to ``path`` atomically."""
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with open(tmp_path, "w") as f:
        json.dump(data, f)
    os.replace(tmp_path, path)


def _coco_json(spec: ShapesSpec, num_images: int, per_image: List[List[dict]]) -> dict:
    images = [
        {"id": i + 1, "file_name": _image_filename(i), "height": spec.height, "width": spec.width}
        for i in range(num_images)
    ]
    annotations = []
    for image_index, image_annotations in enumerate(per_image):
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_index + 1})
            annotations[-1].update(annotation)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(spec.classes)]
    return {
        "info": {"description": "maskpyramid synthetic shapes", "version": GENERATOR_VERSION},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _split_paths(root: str, split_name: str) -> Tuple[str, str]:
    """Returns (json_file, image_root) of a split."""
    dataset_dir = os.path.join(root, DATASET_DIRNAME)
    json_file = os.path.join(dataset_dir, "annotations", f"instances_{split_name}.json")
    return json_file, os.path.join(dataset_dir, split_name)


def generate_split(
    root: str,
    split_name: str,
    num_images: int,
    spec: ShapesSpec = DEFAULT_SPEC,
    num_workers: Optional[int] = None,
) -> str:
    """Generates one split: images ``0 .. num_images - 1`` and their COCO json.

    The images are written to a temporary folder that replaces the split's folder only once
    complete, then the json is replaced, so an interrupted run never looks complete.

    Args:
        root: dataset root; the split goes to ``<root>/shapes/<split_name>/``.
        split_name: split, e.g. "train" (not a dataset name such as "shapes_train").
        num_images: number of images.
        spec: generator parameters.
        num_workers: worker processes; None for up to 2 (as many as CPUs), 0 or 1 for none.

    Returns:
        str: path of the COCO json file, ``<root>/shapes/annotations/instances_<split>.json``.
    """
    json_file, image_dir = _split_paths(os.fspath(root), split_name)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    tmp_dir = f"{image_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        write = partial(_write_image, spec=spec, split=split_name, image_dir=tmp_dir)
        per_image = _map_indices(write, num_images, num_workers)
        _replace_dir(tmp_dir, image_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _write_json(_coco_json(spec, num_images, per_image), json_file)
    return json_file


# ---------------------------------------------------------------------------------------------
# The dataset on disk: generation on first use, registration with detectron2
# ---------------------------------------------------------------------------------------------


def _resolve_root(root: Optional[str]) -> str:
    if root is None:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    # Absolute, so that registered paths survive a change of working directory.
    return os.path.abspath(root)


def shapes_paths(
    root: Optional[str] = None, splits: Mapping = SPLITS
) -> Dict[str, Tuple[str, str]]:
    """Where each split is (or will be) on disk; generates nothing.

    Args:
        root: dataset root; None for ``$DETECTRON2_DATASETS``, else "datasets".
        splits: dataset name -> (split, number of images), like :data:`SPLITS`.

    Returns:
        dict[str, tuple[str, str]]: dataset name -> (json_file, image_root).
    """
    root = _resolve_root(root)
    return {name: _split_paths(root, split) for name, (split, _) in splits.items()}


def _expected_meta(spec: ShapesSpec, splits: Mapping) -> dict:
    meta = {
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "splits": {name: {"split": s, "num_images": n} for name, (s, n) in splits.items()},
    }
    # As read back from json: tuples become lists.
    return json.loads(json.dumps(meta))


def _is_current(dataset_dir: str, meta: dict, paths: Dict[str, Tuple[str, str]]) -> bool:
    """Whether a complete dataset generated with ``meta`` is on disk."""
    try:
        with open(os.path.join(dataset_dir, META_FILENAME)) as f:
            if json.load(f) != meta:
                return False
    except (OSError, ValueError):
        return False
    return all(os.path.isfile(j) and os.path.isdir(d) for j, d in paths.values())


@contextlib.contextmanager
def _exclusive_lock(path: str):
    """Holds an exclusive ``flock`` on ``path``: one generating process per dataset folder."""
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _check_splits(splits: Mapping) -> None:
    folders = [split for split, _ in splits.values()]
    if len(set(folders)) != len(folders):
        raise ValueError(f"Two datasets would share a split folder: {dict(splits)}")


def ensure_shapes(
    root: Optional[str] = None,
    spec: ShapesSpec = DEFAULT_SPEC,
    splits: Mapping = SPLITS,
    num_workers: Optional[int] = None,
) -> Dict[str, Tuple[str, str]]:
    """Generates the dataset unless a complete one with the same version and spec is on disk.

    Safe to call from several processes at once: one generates while the others wait on
    ``<root>/shapes/.lock``, then find the dataset complete.

    Args:
        root: dataset root; None for ``$DETECTRON2_DATASETS``, else "datasets".
        spec: generator parameters.
        splits: dataset name -> (split, number of images), like :data:`SPLITS`.
        num_workers: worker processes, as in :func:`generate_split`.

    Returns:
        dict[str, tuple[str, str]]: dataset name -> (json_file, image_root).
    """
    _check_splits(splits)
    root = _resolve_root(root)
    dataset_dir = os.path.join(root, DATASET_DIRNAME)
    meta = _expected_meta(spec, splits)
    paths = shapes_paths(root, splits)
    # Lock-free fast path: meta.json is written last, so a matching one means complete data.
    if _is_current(dataset_dir, meta, paths):
        return paths
    os.makedirs(dataset_dir, exist_ok=True)
    with _exclusive_lock(os.path.join(dataset_dir, LOCK_FILENAME)):
        if not _is_current(dataset_dir, meta, paths):
            _generate_all(dataset_dir, root, spec, splits, meta, num_workers)
    return paths


def _generate_all(
    dataset_dir: str,
    root: str,
    spec: ShapesSpec,
    splits: Mapping,
    meta: dict,
    num_workers: Optional[int],
) -> None:
    """Generates every split, then writes ``meta``: the mark of a complete dataset."""
    meta_file = os.path.join(dataset_dir, META_FILENAME)
    # Invalidate first: data half-replaced by a crash below must not pass for the old dataset.
    if os.path.exists(meta_file):
        os.remove(meta_file)
    logger.info(f"Generating the shapes dataset in {dataset_dir} ...")
    start = time.perf_counter()
    for split, num_images in splits.values():
        generate_split(root, split, num_images, spec, num_workers=num_workers)
    _write_json(meta, meta_file)
    total = sum(n for _, n in splits.values())
    logger.info(
        f"Generated {total} shapes images in {time.perf_counter() - start:.1f} s: {dict(splits)}"
    )


def _load_split(name: str, root: str, spec: ShapesSpec, splits: Mapping) -> List[dict]:
    from detectron2.data.datasets import load_coco_json

    json_file, image_root = ensure_shapes(root, spec, splits)[name]
    return load_coco_json(json_file, image_root, name)


def register_shapes(
    root: Optional[str] = None, spec: ShapesSpec = DEFAULT_SPEC, splits: Mapping = SPLITS
) -> None:
    """Registers the shapes splits with detectron2; instant, the data is generated on first load.

    Names already registered are left as they are, so calling this twice is harmless.

    Args:
        root: dataset root; None for ``$DETECTRON2_DATASETS`` (read now), else "datasets".
        spec: generator parameters.
        splits: dataset name -> (split, number of images); :data:`SPLITS` registers
            "shapes_train" (2000 images) and "shapes_val" (300 images).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    _check_splits(splits)
    root = _resolve_root(root)
    registered = set(DatasetCatalog.list())
    for name, (json_file, image_root) in shapes_paths(root, splits).items():
        if name in registered:
            continue
        DatasetCatalog.register(name, partial(_load_split, name, root, spec, splits))
        MetadataCatalog.get(name).set(
            thing_classes=list(spec.classes),
            thing_colors=[list(THING_COLORS[c]) for c in spec.classes],
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(spec.classes))},
            evaluator_type="coco",
            json_file=json_file,
            image_root=image_root,
        )

"""The pyramid growth viewer: what each level of MaskPyramid's growth did, for one image.

Everything drawn comes from the model's own records (:meth:`MaskPyramid.inference_with_records`,
one :class:`~maskpyramid.modeling.meta_arch.LevelRecord` per level) and, when the image has
annotations, from the per-level targets that training would use (``MaskPyramidDatasetMapper``).

Per level, five panels at the model's input size and a gallery:
- ``roots``: the roots spawned on this level (filled in their pyramid's colour when it survives
  the level, hollow white when it was pruned or capped);
- ``pyramids``: the surviving pyramids, each pixel in the colour of the most probable one where
  that probability is at least ``MASK_THRESHOLD``;
- ``uncovered``: the cells no pyramid covered with probability ``LOW_THRESHOLD`` before roots
  spawned (``SPAWN_MODE`` uncovered / both), else the cells the survivors leave uncovered;
- ``pruned``: the highest probability of the pyramids pruned or capped on this level;
- ``targets``: the instances' masks on this level's grid and their positive roots;
- the gallery: one tile per surviving pyramid, its probability map in its colour, framed in
  that colour, with its score (the root score the pruning ranks by).

A pyramid keeps its colour from level to level: its identity is its root (image, root level,
root cell, pseudo or not). Colours are exact in the gallery's frames (no blending), so the number
of identities drawn can be counted back from the image.
"""

import colorsys
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.utils.colormap import colormap

__all__ = [
    "IdentityColours",
    "LevelView",
    "draw_levels",
    "level_sheet",
    "overview_sheet",
    "palette",
    "trace_growth",
    "upsample_to_image",
    "write_growth_views",
]

PANELS = ("roots", "pyramids", "uncovered", "pruned", "targets")
TITLE_HEIGHT = 18
TILE = 64  # gallery tile side, pixels
WHITE = (255, 255, 255)


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB colours, pairwise distinct, none grey (so none is the text's white or the
    background's black): golden-ratio hues over three saturation / value tiers."""
    out, seen, k = [], set(), 0
    while len(out) < n:
        hue = (k * 0.618033988749895) % 1.0
        sat, val = ((0.95, 1.0), (0.6, 0.85), (0.8, 0.65))[(k // 7) % 3]
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, sat, val))
        k += 1
        if rgb not in seen and max(rgb) - min(rgb) > 40:
            seen.add(rgb)
            out.append(rgb)
    return np.array(out, dtype=np.uint8).reshape(n, 3)


class IdentityColours:
    """A colour per pyramid identity, kept across levels (first seen, first numbered)."""

    def __init__(self):
        self.index: Dict[Tuple, int] = {}
        self._colours = palette(64)

    def __call__(self, keys: Sequence[Tuple]) -> List[int]:
        for k in keys:
            self.index.setdefault(k, len(self.index))
        if len(self.index) > len(self._colours):
            self._colours = palette(2 * len(self.index))
        return [self.index[k] for k in keys]

    def colour(self, identity: int) -> Tuple[int, int, int]:
        return tuple(int(c) for c in self._colours[identity])


def identity_keys(pyr, image: int = 0) -> List[Tuple]:
    """The identity of each pyramid of ``image``: (root level, root x and y, pseudo)."""
    sel = pyr.batch == image
    roots = (pyr.roots[sel] * 2).round().long().tolist()  # half-pixel centres, exactly
    levels = pyr.root_level[sel].tolist()
    pseudo = pyr.pseudo[sel].tolist()
    return [(lv, x, y, p) for lv, (x, y), p in zip(levels, roots, pseudo)]


def upsample_to_image(grid: np.ndarray, stride: int, height: int, width: int) -> np.ndarray:
    """A level-grid map (hl, wl, ...) at the input's pixels (height, width, ...): cell (i, j)
    covers pixels [i s, (i + 1) s) x [j s, (j + 1) s) (the grid covers the padded input)."""
    up = np.repeat(np.repeat(grid, stride, axis=0), stride, axis=1)
    if up.shape[0] < height or up.shape[1] < width:
        pad = [(0, max(0, height - up.shape[0])), (0, max(0, width - up.shape[1]))]
        up = np.pad(up, pad + [(0, 0)] * (up.ndim - 2))
    return up[:height, :width]


def _put_text(img: np.ndarray, text: str, org: Tuple[int, int], scale: float = 0.4) -> None:
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, WHITE, 1, cv2.LINE_AA)


def _titled(img: np.ndarray, title: str) -> np.ndarray:
    """``img`` under a strip with ``title``, its font shrunk to fit the width."""
    strip = np.zeros((TITLE_HEIGHT, img.shape[1], 3), dtype=np.uint8)
    (width, _), _ = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    _put_text(strip, title, (3, TITLE_HEIGHT - 5), 0.4 * min(1.0, (img.shape[1] - 6) / width))
    return np.concatenate([strip, img], 0)


def _overlay(image: np.ndarray, colours: np.ndarray, mask: np.ndarray, alpha=0.55) -> np.ndarray:
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colours[mask]
    return out.round().clip(0, 255).astype(np.uint8)


def _outline(img: np.ndarray, region: np.ndarray, colour) -> None:
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(img, contours, -1, colour, 1)


@dataclass
class LevelView:
    """One level of one image's growth, drawn (RGB uint8 images)."""

    name: str
    stride: int
    identities: List[int]  # colour identity of each surviving pyramid, by score
    scores: List[float]  # their scores
    num_spawned: int
    num_pruned: int
    panels: Dict[str, np.ndarray] = field(default_factory=dict)  # PANELS, at the input size
    titles: Dict[str, str] = field(default_factory=dict)  # what each panel shows, counted
    gallery: Optional[np.ndarray] = None


def trace_growth(model, inputs: Dict):
    """Run ``model`` (a MaskPyramid) on one mapped input, keeping the pruned pyramids' masks.

    Returns (Instances of the image at its original size, the records of every level)."""
    if not hasattr(model, "inference_with_records"):
        raise TypeError(
            f"the pyramid growth viewer needs a MaskPyramid, not a {type(model).__name__} "
            "(MODEL.META_ARCHITECTURE)"
        )
    kept = model.record_pruned
    model.record_pruned = True
    try:
        with torch.no_grad():
            results, records = model.inference_with_records([inputs])
    finally:
        model.record_pruned = kept
    return results[0]["instances"], records


def _identity_fill(probs: np.ndarray, colours: np.ndarray, threshold: float):
    """(H, W, 3) colour of the most probable pyramid per pixel, and where it reaches
    ``threshold``; ``probs`` (N, H, W), ``colours`` (N, 3)."""
    if not len(probs):
        h, w = probs.shape[1:]
        return np.zeros((h, w, 3), np.uint8), np.zeros((h, w), bool)
    best = probs.argmax(0)
    return colours[best], probs.max(0) >= threshold


def _gallery(probs, identities, scores, colours_of, width) -> np.ndarray:
    """One tile per pyramid: its probability map in its colour, a frame of exactly that colour
    and its score; ``probs`` (N, h, w) at the input size."""
    if not len(identities):
        strip = np.zeros((TITLE_HEIGHT + 4, width, 3), np.uint8)
        _put_text(strip, "no surviving pyramid on this level", (3, TITLE_HEIGHT - 3))
        return strip
    h, w = probs.shape[1:]
    scale = (TILE - 4) / max(h, w)
    th, tw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    cell_w, cell_h = TILE + 6, TILE + 4 + TITLE_HEIGHT
    cols = max(1, width // cell_w)
    rows = -(-len(identities) // cols)
    out = np.zeros((rows * cell_h, width, 3), np.uint8)
    for k, (p, ident, score) in enumerate(zip(probs, identities, scores)):
        colour = np.array(colours_of(ident), np.float32)
        tile = cv2.resize(p.astype(np.float32), (tw, th), interpolation=cv2.INTER_NEAREST)
        y, x = (k // cols) * cell_h, (k % cols) * cell_w
        framed = np.zeros((th + 4, tw + 4, 3), np.uint8)
        framed[:] = colour
        framed[2:-2, 2:-2] = (tile[..., None] * colour).round().astype(np.uint8)
        out[y : y + th + 4, x : x + tw + 4] = framed
        _put_text(out, f"#{ident} {score:.2f}", (x, y + th + 4 + TITLE_HEIGHT - 5), 0.35)
    return out


def draw_levels(
    image: np.ndarray,
    records,
    mask_threshold: float = 0.5,
    low_threshold: float = 0.1,
    targets: Optional[Dict] = None,
    colours: Optional[IdentityColours] = None,
    root_levels: Optional[int] = None,
) -> List[LevelView]:
    """Draw every level of one image's growth.

    Args:
        image: (H, W, 3) uint8 RGB, the model's input (after its resizing, before padding).
        records: the model's level records of a batch of this one image.
        mask_threshold, low_threshold: MODEL.MASK_PYRAMID.MASK_THRESHOLD and LOW_THRESHOLD.
        targets: the image's ``pyramid_targets`` (``MaskPyramidDatasetMapper``), or None.
        root_levels: how many levels spawn roots (the others are read-out levels).
    """
    colours = colours or IdentityColours()
    h, w = image.shape[:2]
    dim = (image * 0.45).astype(np.uint8)
    instance_colours = colormap(rgb=True, maximum=255).astype(np.uint8)
    views = []
    for rec in records:
        s = rec.stride
        pyr = rec.pyramids
        sel = (pyr.batch == 0).nonzero()[:, 0]
        probs = pyr.logits[sel].sigmoid().float().cpu().numpy()  # (N, hl, wl)
        scores = pyr.scores[sel].float().cpu().tolist()
        idents = colours(identity_keys(pyr))
        order = sorted(range(len(idents)), key=lambda k: -scores[k])
        idents, scores, probs = [idents[k] for k in order], [scores[k] for k in order], probs[order]
        up = upsample_to_image(probs.transpose(1, 2, 0), s, h, w).transpose(2, 0, 1)
        rgb = np.array([colours.colour(i) for i in idents], np.uint8).reshape(-1, 3)
        view = LevelView(rec.name, s, idents, scores, 0, int(rec.num_pruned[0]))

        # roots spawned here: filled in their pyramid's colour when it survived
        spawned = rec.spawned[rec.spawned[:, 0] == 0][:, 1:].tolist()
        alive_ids = set(idents)
        survivors = {
            (k[1], k[2]): i
            for k, i in colours.index.items()
            if k[0] == rec.level and i in alive_ids
        }
        panel = dim.copy()
        radius = int(min(6, max(2, s // 4)))
        alive = 0
        for r, c in spawned:
            centre = (int((c + 0.5) * s), int((r + 0.5) * s))
            ident = survivors.get(((2 * c + 1) * s, (2 * r + 1) * s))
            if ident is not None:
                alive += 1
                cv2.circle(panel, centre, radius, colours.colour(ident), -1)
            else:
                cv2.circle(panel, centre, radius, WHITE, 1)
        view.num_spawned = len(spawned)
        view.panels["roots"] = panel
        view.titles["roots"] = (
            f"roots: {len(spawned)} spawned, {alive} alive"
            if len(spawned) or root_levels is None or rec.level < root_levels
            else "roots: none (read-out level)"
        )

        fill, where = _identity_fill(up, rgb, mask_threshold)
        panel = _overlay(image, fill, where)
        for p, c in zip(up, rgb):
            _outline(panel, p >= mask_threshold, tuple(int(v) for v in c))
        view.panels["pyramids"] = panel
        view.titles["pyramids"] = f"pyramids: {len(idents)} survive"

        if rec.uncovered is not None:
            unc = rec.uncovered[0].cpu().numpy()
            what = "uncovered before spawning"
        else:
            unc = probs.max(0) < low_threshold if len(probs) else np.ones(probs.shape[1:], bool)
            what = f"left uncovered (< {low_threshold:g})"
        unc_up = upsample_to_image(unc, s, h, w)
        red = np.zeros_like(image)
        red[..., 0] = 255
        view.panels["uncovered"] = _overlay(dim, red, unc_up, 0.6)
        view.titles["uncovered"] = f"{int(unc.sum())} cells {what}"

        panel = dim.copy()
        if rec.pruned_masks is not None:
            pm = rec.pruned_masks[rec.pruned_batch == 0].sigmoid().float().cpu().numpy()
            if len(pm):
                heat = upsample_to_image(pm.max(0), s, h, w)
                magenta = np.zeros_like(image)
                magenta[..., 0] = magenta[..., 2] = 255
                panel = _overlay(dim, magenta, heat >= low_threshold, 0.3)
                panel = _overlay(panel, magenta, heat >= mask_threshold, 0.5)
        view.panels["pruned"] = panel
        view.titles["pruned"] = f"pruned or capped: {view.num_pruned}"

        panel = dim.copy()
        if targets is not None and rec.level < len(targets["masks"]):
            tm = targets["masks"][rec.level].float().cpu().numpy()
            pos = targets["positives"][rec.level].cpu().numpy()
            ic = instance_colours[np.arange(len(tm)) % len(instance_colours)]
            if len(tm):
                fill, where = _identity_fill(tm, ic, 0.5)
                panel = _overlay(dim, upsample_to_image(fill, s, h, w),
                                 upsample_to_image(where, s, h, w), 0.6)  # fmt: skip
            rows, cols = np.nonzero(pos >= 0)
            for r, c in zip(rows, cols):
                centre = (int((c + 0.5) * s), int((r + 0.5) * s))
                cv2.circle(panel, centre, radius, tuple(int(v) for v in ic[pos[r, c]]), -1)
                cv2.circle(panel, centre, radius, WHITE, 1)
            title = f"targets: {len(tm)} instances, {len(rows)} positives"
        else:
            title = "targets: no annotations"
        view.panels["targets"] = panel
        view.titles["targets"] = title
        view.gallery = _gallery(up, idents, scores, colours.colour, w * len(PANELS))
        views.append(view)
    return views


def _row(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    height = max(i.shape[0] for i in images)
    padded = [np.pad(i, ((0, height - i.shape[0]), (0, gap), (0, 0))) for i in images]
    return np.concatenate(padded, 1)[:, :-gap]


def _column(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    width = max(i.shape[1] for i in images)
    padded = [np.pad(i, ((0, gap), (0, width - i.shape[1]), (0, 0))) for i in images]
    return np.concatenate(padded, 0)[:-gap]


def level_sheet(view: LevelView) -> np.ndarray:
    """A level's PNG: its five panels in a row, the gallery of its pyramids below."""
    head = _row([_titled(view.panels[p], view.titles[p]) for p in PANELS])
    title = np.zeros((TITLE_HEIGHT + 4, head.shape[1], 3), np.uint8)
    text = (
        f"level {view.name} (stride {view.stride}): {len(view.identities)} pyramids survive, "
        f"{view.num_spawned} roots spawned, {view.num_pruned} pruned; gallery: each survivor's "
        "mask probability, #identity score"
    )
    _put_text(title, text, (3, 15), 0.45)
    return _column([title, head, view.gallery])


def overview_sheet(views: Sequence[LevelView], first_row: Sequence[Tuple[str, np.ndarray]],
                   width: int = 200) -> np.ndarray:  # fmt: skip
    """All levels on one sheet: ``first_row`` ((title, image) pairs, e.g. the input and the final
    predictions), then a row of the five panels per level, each scaled to ``width`` pixels."""

    def fit(img):
        scale = width / img.shape[1]
        return cv2.resize(img, (width, max(1, int(round(img.shape[0] * scale)))),
                          interpolation=cv2.INTER_AREA)  # fmt: skip

    rows = [_row([_titled(fit(img), title) for title, img in first_row])]
    for v in views:
        rows.append(_row([_titled(fit(v.panels[p]), f"{v.name} {v.titles[p]}") for p in PANELS]))
    return _column(rows)


def _write_png(path: str, rgb: np.ndarray) -> str:
    if not cv2.imwrite(path, rgb[:, :, ::-1]):
        raise OSError(f"cannot write {path}")
    return path


def write_growth_views(
    model, inputs: Dict, original: np.ndarray, metadata, out_dir: str, score_thresh: float,
    input_format: str = "BGR",
) -> Tuple[Dict[str, str], List[LevelView], object]:  # fmt: skip
    """Run the model on one mapped input and write ``<level>.png`` per level and
    ``overview.png`` to ``out_dir``.

    Args:
        inputs: the mapped input (``image`` (C, H, W) in ``input_format``, ``height``, ``width``,
            and ``pyramid_targets`` when the image has annotations).
        original: (H0, W0, 3) uint8 RGB image at its original size (the final predictions are
            drawn on it with detectron2's ``Visualizer``).
        score_thresh: the predictions drawn score at least this.
    Returns:
        ({name: path}, the level views, the Instances predicted).
    """
    from detectron2.data.detection_utils import convert_image_to_rgb
    from detectron2.utils.visualizer import ColorMode, Visualizer

    instances, records = trace_growth(model, inputs)
    mp = model.mp
    image = convert_image_to_rgb(inputs["image"].permute(1, 2, 0), input_format)
    image = np.ascontiguousarray(image.astype(np.uint8))
    views = draw_levels(
        image,
        records,
        mp.MASK_THRESHOLD,
        mp.LOW_THRESHOLD,
        inputs.get("pyramid_targets"),
        root_levels=model.n_root,
    )
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for view in views:
        paths[view.name] = _write_png(os.path.join(out_dir, f"{view.name}.png"), level_sheet(view))
    shown = instances.to("cpu")
    shown = shown[shown.scores >= score_thresh]
    vis = Visualizer(original, metadata, instance_mode=ColorMode.IMAGE)
    predicted = vis.draw_instance_predictions(shown).get_image()
    first = [
        ("input", np.ascontiguousarray(original)),
        (f"predictions: {len(shown)} scoring >= {score_thresh:g}", predicted),
    ]
    paths["overview"] = _write_png(
        os.path.join(out_dir, "overview.png"), overview_sheet(views, first)
    )
    return paths, views, instances

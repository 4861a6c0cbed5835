"""Gaussian position maps: what tells the pyramids of one image apart.

``g(x) = exp(-ln2 * (|x - mu| / rho)^2)`` is 1 at the root ``mu`` and 1/2 at distance ``rho``.
Maps are evaluated at the cell centres of each pyramid's window (image coordinates), so they are
exact at any window size and position; nothing is pooled or interpolated.
"""

import math

import torch

__all__ = [
    "cell_centres",
    "window_cell_centres",
    "gaussian_map",
    "position_channels",
    "offset_channels",
]

_LN2 = math.log(2.0)


def cell_centres(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Coordinates of the cell centres of ``size x size`` windows over ``boxes`` (N, 4), in the
    boxes' units: (N, 2, size), x then y. Cell ``u`` of a window ``[x0, x1]`` is centred at
    ``x0 + (u + 0.5) (x1 - x0) / size``."""
    t = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
    lo = boxes[:, :2, None]  # (N, 2, 1): x0, y0
    return lo + t * (boxes[:, 2:, None] - lo)


def window_cell_centres(boxes: torch.Tensor, size: int):
    """``cell_centres`` as (xs, ys), each (N, size)."""
    centres = cell_centres(boxes, size)
    return centres[:, 0], centres[:, 1]


def gaussian_map(xs, ys, centres: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """(N, H, W) Gaussians with half maximum at radius ``rho`` (N,) around ``centres`` (N, 2),
    at the points ``xs`` (N, W) x ``ys`` (N, H)."""
    dx2 = ((xs - centres[:, 0, None]) / rho[:, None]) ** 2  # (N, W)
    dy2 = ((ys - centres[:, 1, None]) / rho[:, None]) ** 2
    return torch.exp(-_LN2 * (dy2[:, :, None] + dx2[:, None, :]))


def _gaussian(offsets: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """``gaussian_map`` of a square window from the (N, 2, S) offsets of its cells' x and y
    to the centres: both in one operation each."""
    d2 = (offsets / rho[:, None, None]) ** 2  # (N, 2, S): x, y
    return torch.exp(-_LN2 * (d2[:, 1, :, None] + d2[:, 0, None, :]))


def position_channels(
    boxes: torch.Tensor,
    size: int,
    roots: torch.Tensor,
    root_strides: torch.Tensor,
    rho: float,
    point: bool = True,
) -> torch.Tensor:
    """The position map (rho in cells of the root's level) and a sharp root point, (N, 2, S, S)
    (with ``point`` False, the position map alone, (N, 1, S, S)).

    The root point is the same Gaussian with a quarter-cell radius: the "position indicator
    point" of the log, 1 at the root cell's centre and about 0 one cell away.
    """
    offsets = cell_centres(boxes, size) - roots[:, :, None]  # (N, 2, S)
    strides = root_strides.to(boxes.dtype)
    maps = [_gaussian(offsets, rho * strides)]
    if point:
        maps.append(_gaussian(offsets, 0.25 * strides))
    return torch.stack(maps, 1)


def offset_channels(
    boxes: torch.Tensor, size: int, roots: torch.Tensor, root_strides: torch.Tensor, scale: float
) -> torch.Tensor:
    """Relative coordinates ``(x - root) / (scale * root stride)``, (N, 2, S, S): unlike the
    Gaussian, they do not fade away from the root (CondInst's relative coordinates)."""
    xs, ys = window_cell_centres(boxes, size)
    norm = (scale * root_strides.to(boxes.dtype))[:, None]
    dx = (xs - roots[:, 0, None]) / norm  # (N, S)
    dy = (ys - roots[:, 1, None]) / norm
    n = boxes.shape[0]
    return torch.stack(
        [dx[:, None, :].expand(n, size, size), dy[:, :, None].expand(n, size, size)], 1
    )

"""Gaussian position maps: what tells the pyramids of one image apart.

``g(x) = exp(-ln2 * (|x - mu| / rho)^2)`` is 1 at the root ``mu`` and 1/2 at distance ``rho``.
Maps are evaluated at the cell centres of each pyramid's window (image coordinates), so they are
exact at any window size and position; nothing is pooled or interpolated.
"""

import math

import torch

__all__ = ["window_cell_centres", "gaussian_map", "position_channels", "offset_channels"]

_LN2 = math.log(2.0)


def window_cell_centres(boxes: torch.Tensor, size: int):
    """Image coordinates of the cell centres of ``size x size`` windows over ``boxes`` (N, 4).

    Returns (xs, ys), each (N, size): cell ``u`` of a window ``[x0, x1]`` is centred at
    ``x0 + (u + 0.5) (x1 - x0) / size``.
    """
    t = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
    xs = boxes[:, 0, None] + t[None] * (boxes[:, 2] - boxes[:, 0])[:, None]
    ys = boxes[:, 1, None] + t[None] * (boxes[:, 3] - boxes[:, 1])[:, None]
    return xs, ys


def gaussian_map(xs, ys, centres: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """(N, S, S) Gaussians with half maximum at radius ``rho`` (N,) around ``centres`` (N, 2)."""
    dx2 = ((xs - centres[:, 0, None]) / rho[:, None]) ** 2  # (N, S)
    dy2 = ((ys - centres[:, 1, None]) / rho[:, None]) ** 2
    return torch.exp(-_LN2 * (dy2[:, :, None] + dx2[:, None, :]))


def position_channels(
    boxes: torch.Tensor, size: int, roots: torch.Tensor, root_strides: torch.Tensor, rho: float
) -> torch.Tensor:
    """The position map (rho in cells of the root's level) and a sharp root point, (N, 2, S, S).

    The root point is the same Gaussian with a quarter-cell radius: the "position indicator
    point" of the log, 1 at the root cell's centre and about 0 one cell away.
    """
    xs, ys = window_cell_centres(boxes, size)
    strides = root_strides.to(boxes.dtype)
    wide = gaussian_map(xs, ys, roots, rho * strides)
    point = gaussian_map(xs, ys, roots, 0.25 * strides)
    return torch.stack([wide, point], 1)


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

"""RoIAlign as one weighted gather-sum (``embedding_bag``), equal to torchvision's kernel.

Semantics (torchvision's ``roi_align`` CPU/CUDA kernel, which detectron2's ``ROIAlign`` calls):

* a RoI ``(b, x1, y1, x2, y2)`` is scaled by ``spatial_scale``; with ``aligned=True`` 0.5 is
  subtracted afterwards (pixel centres), with ``aligned=False`` the RoI width and height are
  clamped to at least 1;
* the RoI is split into ``PH x PW`` bins of size ``bin_h = roi_h / PH``, ``bin_w = roi_w / PW``;
  each bin averages a ``gy x gx`` grid of bilinear samples, where ``gy = gx = sampling_ratio``
  if it is positive, else (adaptive) ``gy = ceil(roi_h / PH)`` and ``gx = ceil(roi_w / PW)``
  per RoI; the average divides by ``max(gy * gx, 1)``, so an empty grid gives 0;
* sample ``iy`` of bin ``ph`` lies at ``y = y1 + ph * bin_h + (iy + 0.5) * bin_h / gy`` (``x``
  alike); a sample with ``y < -1`` or ``y > H`` (or ``x`` outside ``[-1, W]``) contributes 0;
  otherwise ``y = max(y, 0)``, ``y_low = floor(y)``, and if ``y_low >= H - 1`` then
  ``y_low = y_high = H - 1`` and ``y = y_low``, else ``y_high = y_low + 1``; with
  ``ly = y - y_low`` the taps are ``(y_low, 1 - ly)`` and ``(y_high, ly)``. The bilinear weight
  of a tap is the product of its y and x weights.

Design: the features are laid out channels-last and flattened into a ``(rows, C)`` table (all
images; for the multi-level pooler of :mod:`.poolers` all levels concatenated), so that every
tap is one table row. Each output bin ``(roi, ph, pw)`` is one *bag* of (row, weight) entries
whose weighted sum is the bin's value, and the whole RoIAlign is a single
``F.embedding_bag(idx, table, offsets, mode="sum", per_sample_weights=w)``; its backward (a
weighted scatter-add into the table) is the input gradient, so no custom autograd is needed for
it. RoIs carry no gradient (as in torchvision).

The entries are built without any per-RoI Python loop, from the separability of the weights
(``w = w_y * w_x / count``):

* every bin row ``(roi, ph)`` and bin column ``(roi, pw)`` (a "line") gets its samples: only
  those that can fall in ``[-1, H]`` (resp. ``[-1, W]``) are enumerated, found in closed form
  and made exact by evaluating the kernel's own expression at the window ends, so RoIs far
  outside or much larger than the map cost no more than the map itself;
* the 2 taps of each sample become *slots* (pixel, weight); adjacent samples of a line share
  pixels (always so with adaptive sampling, where samples are at most one pixel apart), and the
  taps are then merged per pixel: about ``b + 2`` slots instead of ``2 * ceil(b)`` for a bin of
  ``b`` pixels, which makes ``embedding_bag`` 2-3x smaller for typical RoIs (same sum, up to
  rounding);
* a bag is the outer product of the y slots of its row and the x slots of its column, expanded
  with two ``repeat_interleave`` of variable counts (adaptive sampling gives every RoI its own
  grid) and plain ``index_select`` gathers; no integer division touches the entry domain, and
  entries are int32 whenever the table and the entry count allow.

Robustness: all index tensors live on the input's device, and the only host synchronisation is
one ``.tolist()`` of the entry counts. RoIs with non-finite coordinates, an out-of-range batch
index, or a sampling grid of more than ``MAX_GRID`` points along an axis (far beyond the range
where torchvision's int32 sample count is meaningful) pool to zeros, as do zero-size (adaptive)
and negative-size RoIs. An empty RoI list gives a ``(0, C, PH, PW)`` output that still
backpropagates (a zero gradient). Coordinates are computed in the RoIs' dtype (float32 at
least); the tap weights are cast to the features' dtype.
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MAX_GRID",
    "Bags",
    "bilinear_bags",
    "pool_bags",
    "roi_align",
    "roi_align_bins_exact",
    "ROIAlign",
]

# Largest number of samples per RoI along one axis; RoIs needing more pool to zeros.
MAX_GRID = 2**24

OutputSize = Union[int, Sequence[int]]


def _pair(output_size: OutputSize) -> Tuple[int, int]:
    """``(PH, PW)`` from an int or a pair of ints."""
    if isinstance(output_size, int):
        return output_size, output_size
    if len(output_size) != 2:
        raise ValueError(f"output_size must be an int or (height, width), got {output_size!r}")
    return int(output_size[0]), int(output_size[1])


def coord_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype RoI coordinates are computed in: float64 stays, anything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Bags(NamedTuple):
    """Arguments of one ``embedding_bag``: bag ``(r, ph, pw)`` is ``r * PH * PW + ph * PW + pw``.

    ``idx`` are table rows, ``offsets`` the first entry of every bag (``R * PH * PW`` of them)
    and ``weights`` the per-entry weights (in the coordinate dtype).
    """

    idx: Tensor
    offsets: Tensor
    weights: Tensor


def _exclusive_cumsum(counts: Tensor) -> Tensor:
    return torch.cumsum(counts, 0) - counts


def _take(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` for 1-D tensors (``index_select`` is much faster than indexing)."""
    return values.index_select(0, index)


def _sample(base: Tensor, i: Tensor, bin_size: Tensor, grid: Tensor) -> Tensor:
    """Sample ``i`` of a bin, with the kernel's expression and order:
    ``base + ((i + 0.5) * bin_size) / grid``."""
    return base + (i + 0.5) * bin_size / grid


def _pixel_taps(t: Tensor, size: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernel's bilinear taps of positions ``t`` on an axis of ``size`` (int64) pixels.

    Returns ``valid`` (``-1 <= t <= size``), the low and high pixel (always in
    ``[0, size)``) and the weight ``frac`` of the high pixel (``1 - frac`` for the low one).
    """
    valid = (t >= -1.0) & (t <= size.to(t.dtype))
    t = torch.where(valid, t, torch.zeros_like(t)).clamp(min=0)
    low = t.floor().long()
    top = low >= size - 1
    low = torch.where(top, size - 1, low)
    t = torch.where(top, low.to(t.dtype), t)
    return valid, low, low + (~top).long(), t - low


class _AxisPlan(NamedTuple):
    """Samples and taps of every bin-row ``(roi, ph)`` and bin-column ``(roi, pw)``.

    All fields are 1-D over these "lines" (``R * PH`` y lines, then ``R * PW`` x lines). Line
    ``e`` enumerates its samples ``first .. first + n - 1`` (``2 * n`` taps), which become
    ``k`` *slots* (pixel, weight): if ``merged``, the pixels ``c_lo .. c_lo + k - 1`` with the
    weights of all taps on each pixel added up, else the ``2 * n`` taps themselves.
    """

    base: Tensor
    bin_size: Tensor
    grid: Tensor
    size: Tensor
    first: Tensor
    n: Tensor
    merged: Tensor
    c_lo: Tensor
    k: Tensor


def _axis_plan(base: Tensor, bin_size: Tensor, grid: Tensor, size: Tensor) -> _AxisPlan:
    """Closed-form :class:`_AxisPlan` of lines with bin start ``base`` (no tap enumerated yet).

    Sample ``i < grid`` of a line is at ``t(i) = base + (i + 0.5) * bin_size / grid``,
    monotonic in ``i``, so its valid samples (``-1 <= t <= size``) form an interval. A window
    around it is solved for in closed form with 2 samples of slack, and its ends are then made
    exact by evaluating the kernel's expression at the 4 samples at either end (if that fails,
    only for absurd coordinates, the window is kept and every tap still tested). Adjacent samples
    (spacing <= 1 pixel, always so with adaptive sampling) share pixels: when the pixel range
    of the valid samples is no longer than their ``2 * n`` taps, the taps are merged per pixel,
    which divides the number of ``embedding_bag`` entries by up to ~4.
    """
    dt = base.dtype
    b, g, size_f = bin_size, grid, size.to(dt)
    flat = b == 0
    safe_b = torch.where(flat, torch.ones_like(b), b)
    a1 = (-1.0 - base) * g / safe_b - 0.5
    a2 = (size_f - base) * g / safe_b - 0.5
    # 2 samples of slack: the 4 candidates below still hold the exact end when ``a`` is off by
    # up to one sample (|a| ~ 1e6 in float32)
    lo = torch.floor(torch.minimum(a1, a2)) - 2
    hi = torch.ceil(torch.maximum(a1, a2)) + 2
    lo = torch.where(flat, torch.zeros_like(lo), torch.nan_to_num(lo, nan=0.0))
    hi = torch.where(flat, g - 1, torch.nan_to_num(hi, nan=-1.0))
    lo = torch.minimum(lo.clamp(min=0), g)
    hi = torch.minimum(hi.clamp(min=-1), g - 1)

    # exact ends: the first valid sample from either end of the window, among 4
    steps = torch.arange(4, dtype=dt, device=base.device)
    cand = torch.cat([lo[:, None] + steps, hi[:, None] - steps], dim=1)
    t = _sample(base[:, None], cand, b[:, None], g[:, None])
    valid = (t >= -1.0) & (t <= size_f[:, None]) & (cand >= lo[:, None]) & (cand <= hi[:, None])
    valid = valid.view(-1, 2, 4)
    found = valid.any(2)
    d = valid.to(torch.int8).argmax(2).to(dt)
    first = torch.where(found[:, 0], lo + d[:, 0], lo)
    last = torch.where(found[:, 1], hi - d[:, 1], hi)
    n = (last - first + 1).clamp(min=0)
    exact = found.all(1)
    # no valid sample although every sample of the window was tested
    none = (~found[:, 0] & (hi - lo < 4)) | (~found.any(1) & (hi - lo < 8))
    n = torch.where(none, torch.zeros_like(n), n).long()

    ends = torch.stack([first, last], dim=1)
    valid_e, low_e, high_e, _ = _pixel_taps(
        _sample(base[:, None], ends, b[:, None], g[:, None]), size[:, None]
    )
    c_lo = low_e.amin(1)
    m = high_e.amax(1) - c_lo + 1
    merged = exact & valid_e.all(1) & (n >= 1) & (m <= 2 * n)
    k = torch.where(merged, m, 2 * n)
    return _AxisPlan(base, bin_size, grid, size, first, n, merged, c_lo, k)


def _axis_slots(plan: _AxisPlan, num_taps: int, num_slots: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Enumerate the taps of a plan and reduce them to its slots.

    Returns, for the ``num_slots`` slots in ``(line, slot)`` order: the pixel (int64, in
    ``[0, size)``), the weight (0 for samples outside ``[-1, size]``), and the owning line.
    """
    device, dt = plan.base.device, plan.base.dtype
    taps = 2 * plan.n
    tap_off, slot_off = _exclusive_cumsum(taps), _exclusive_cumsum(plan.k)

    owner = torch.repeat_interleave(taps, output_size=num_taps)
    j = torch.arange(num_taps, device=device) - _take(tap_off, owner)
    i = _take(plan.first, owner) + (j >> 1).to(dt)
    t = _sample(_take(plan.base, owner), i, _take(plan.bin_size, owner), _take(plan.grid, owner))
    valid, low, high, frac = _pixel_taps(t, _take(plan.size, owner))
    is_high = (j & 1).bool()
    pixel = torch.where(is_high, high, low)
    weight = torch.where(is_high, frac, 1.0 - frac) * valid
    last_slot = _take(plan.k, owner) - 1
    in_range = torch.minimum((pixel - _take(plan.c_lo, owner)).clamp(min=0), last_slot)
    slot = _take(slot_off, owner) + torch.where(_take(plan.merged, owner), in_range, j)
    slot_weight = weight.new_zeros(num_slots).index_add_(0, slot, weight)

    slot_owner = torch.repeat_interleave(plan.k, output_size=num_slots)
    s = torch.arange(num_slots, device=device) - _take(slot_off, slot_owner)
    tap_pixel = _take(pixel, _take(tap_off, slot_owner) + s)
    merged_pixel = _take(plan.c_lo, slot_owner) + s
    slot_pixel = torch.where(_take(plan.merged, slot_owner), merged_pixel, tap_pixel)
    return slot_pixel, slot_weight, slot_owner


def bilinear_bags(
    boxes: Tensor,
    scale: Union[float, Tensor],
    height: Tensor,
    width: Tensor,
    row_base: Tensor,
    output_size: OutputSize,
    sampling_ratio: int,
    aligned: bool,
    valid: Optional[Tensor] = None,
) -> Bags:
    """The ``embedding_bag`` arguments of RoIAlign for ``R`` RoIs with per-RoI parameters.

    Pixel ``(y, x)`` of a RoI's feature map is table row ``row_base + y * width + x``, so one
    table may hold several images and several levels (see :class:`.poolers.ROIPooler`).

    Args:
        boxes: ``(R, 4)`` float ``(x1, y1, x2, y2)`` in input coordinates; its dtype is the
            coordinate dtype. Not differentiated.
        scale: ``spatial_scale``, a float or an ``(R,)`` tensor (per-RoI level scale).
        height, width: ``(R,)`` int64 size of each RoI's feature map.
        row_base: ``(R,)`` int64 table row of pixel (0, 0) of each RoI's feature map.
        output_size: ``PH`` or ``(PH, PW)``.
        sampling_ratio: samples per bin along each axis; ``<= 0`` for adaptive.
        aligned: torchvision's ``aligned``.
        valid: optional ``(R,)`` bool; ``False`` RoIs pool to zeros (e.g. a bad batch index).

    Returns:
        :class:`Bags` with ``R * PH * PW`` bags; indices are int32 when they fit, else int64.
    """
    PH, PW = _pair(output_size)
    boxes = boxes.detach()
    device, cdt = boxes.device, boxes.dtype
    R = boxes.shape[0]
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=cdt, device=device)
    scale = scale.detach().to(cdt)
    offset = 0.5 if aligned else 0.0
    x1 = boxes[:, 0] * scale - offset
    y1 = boxes[:, 1] * scale - offset
    x2 = boxes[:, 2] * scale - offset
    y2 = boxes[:, 3] * scale - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / PW, roi_h / PH
    if sampling_ratio > 0:
        grid_y = torch.full((R,), float(sampling_ratio), dtype=cdt, device=device)
        grid_x = grid_y
    else:
        grid_y = torch.ceil(roi_h / PH)
        grid_x = torch.ceil(roi_w / PW)
    ok = torch.isfinite(torch.stack([x1, y1, x2, y2, roi_w, roi_h, bin_w, bin_h])).all(0)
    ok &= (grid_y >= 1) & (grid_x >= 1) & (grid_y <= MAX_GRID) & (grid_x <= MAX_GRID)
    ok &= (height > 0) & (width > 0)
    if valid is not None:
        ok &= valid
    zero = torch.zeros((), dtype=cdt, device=device)
    x1, y1 = torch.where(ok, x1, zero), torch.where(ok, y1, zero)
    bin_w, bin_h = torch.where(ok, bin_w, zero), torch.where(ok, bin_h, zero)
    grid_y, grid_x = torch.where(ok, grid_y, zero), torch.where(ok, grid_x, zero)
    count = (grid_y * grid_x).clamp(min=1.0)
    row_base = torch.where(ok, row_base, torch.zeros_like(row_base))
    height = torch.where(ok, height, torch.ones_like(height))
    width = torch.where(ok, width, torch.ones_like(width))

    # lines: the R * PH bin rows (r, ph), then the R * PW bin columns (r, pw)
    def lines(per_roi_y: Tensor, per_roi_x: Tensor) -> Tensor:
        per_y = per_roi_y[:, None].expand(R, PH).reshape(-1)
        return torch.cat([per_y, per_roi_x[:, None].expand(R, PW).reshape(-1)])

    ph = torch.arange(PH, dtype=cdt, device=device)
    pw = torch.arange(PW, dtype=cdt, device=device)
    bins = lines(bin_h, bin_w)
    base = lines(y1, x1) + torch.cat([ph.repeat(R), pw.repeat(R)]) * bins  # y1 + ph * bin_h
    plan = _axis_plan(base, bins, lines(grid_y, grid_x), lines(height, width))
    num_y_lines = R * PH
    slot_off = _exclusive_cumsum(plan.k)
    # bag (r, ph, pw) = the y slots of line (r, ph) times the x slots of line (r, pw)
    bag_ky = plan.k[:num_y_lines].view(R, PH, 1).expand(R, PH, PW).reshape(-1)
    bag_kx = plan.k[num_y_lines:].view(R, 1, PW).expand(R, PH, PW).reshape(-1)
    bag_sizes = bag_ky * bag_kx
    last_row = (row_base + height * width).amax() if R else torch.zeros((), device=device)
    # the one host synchronisation: all sizes at once
    sizes = [bag_sizes.sum(), bag_ky.sum(), 2 * plan.n.sum(), plan.k.sum(), last_row]
    total, num_rows, num_taps, num_slots, rows = (
        torch.stack([v.long() for v in sizes]).cpu().tolist()
    )
    itype = torch.int32 if max(total, rows) < 2**31 else torch.int64

    # y slots become table offsets row_base + y * width and take the 1 / count; x slots are
    # pixel columns
    pixel, weight, owner = _axis_slots(plan, num_taps, num_slots)
    ones = torch.ones_like(width)
    value = _take(lines(row_base, ones - 1), owner) + pixel * _take(lines(width, ones), owner)
    value = value.to(itype)
    weight = weight / _take(lines(count, torch.ones_like(count)), owner)

    # level 1: one element per (bag, y slot)
    bag_of_row = torch.repeat_interleave(bag_ky, output_size=num_rows)
    y_line = torch.div(bag_of_row, PW, rounding_mode="floor")  # (r, ph) of the bag
    y_pos = _take(slot_off, y_line) - _take(_exclusive_cumsum(bag_ky), bag_of_row)
    y_pos += torch.arange(num_rows, device=device)
    row_value, row_weight = _take(value, y_pos), _take(weight, y_pos)
    row_kx = _take(bag_kx, bag_of_row)
    # an entry's x slot is its entry number plus the shift of its level-1 element
    bag_x0 = slot_off[num_y_lines:].view(R, 1, PW).expand(R, PH, PW).reshape(-1)
    x_shift = (_take(bag_x0, bag_of_row) - _exclusive_cumsum(row_kx)).to(itype)

    # level 2: one entry per (bag, y slot, x slot)
    entry_row = torch.repeat_interleave(row_kx.to(itype), output_size=total)
    x_pos = torch.arange(total, dtype=itype, device=device)
    x_pos += _take(x_shift, entry_row)
    idx = _take(row_value, entry_row)
    idx += _take(value, x_pos)
    weights = _take(row_weight, entry_row)
    weights *= _take(weight, x_pos)
    return Bags(idx, _exclusive_cumsum(bag_sizes).to(itype), weights)


def pool_bags(
    table: Tensor, bags: Optional[Bags], num_rois: int, output_size: OutputSize
) -> Tensor:
    """``(R, C, PH, PW)`` contiguous output of one ``embedding_bag`` over a ``(rows, C)`` table.

    ``bags`` may be None when ``num_rois`` is 0.
    """
    PH, PW = _pair(output_size)
    C = table.shape[1]
    if num_rois == 0 or bags is None:
        # no bags: keep the output attached to the graph (a zero gradient)
        empty = table[:0].reshape(0, 1, 1, C).expand(0, PH, PW, C)
        return empty.permute(0, 3, 1, 2).contiguous()
    out = F.embedding_bag(
        bags.idx,
        table,
        bags.offsets,
        mode="sum",
        per_sample_weights=bags.weights.to(table.dtype),
    )
    return out.view(num_rois, PH, PW, C).permute(0, 3, 1, 2).contiguous()


class _ChannelsLastTable(torch.autograd.Function):
    """Concatenated channels-last copy of NCHW maps, and back for the gradient.

    Both directions copy image by image as 2-D transposes, which take PyTorch's blocked
    transpose kernel (a 4-D permuted copy is several times slower on CPU).
    """

    @staticmethod
    def forward(ctx, *features: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shapes = [f.shape for f in features]
        C = features[0].shape[1]
        rows = sum(f.shape[0] * f.shape[2] * f.shape[3] for f in features)
        table = features[0].new_empty((rows, C))
        start = 0
        for f in features:
            n, c, h, w = f.shape
            for i in range(n):
                dst = table[start : start + h * w]
                if f[i].is_contiguous():
                    dst.copy_(f[i].view(c, h * w).t())
                else:
                    dst.view(h, w, c).copy_(f[i].permute(1, 2, 0))
                start += h * w
        return table

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, ...]:  # type: ignore[override]
        grads, start = [], 0
        for n, c, h, w in ctx.shapes:
            g = grad.new_empty((n, c, h, w))
            for i in range(n):
                g[i].view(c, h * w).copy_(grad[start : start + h * w].t())
                start += h * w
            grads.append(g)
        return tuple(grads)


def channels_last_table(features: Sequence[Tensor]) -> Tensor:
    """``(rows, C)`` table of NCHW feature maps (same N and C): rows of map ``l`` follow all rows
    of maps ``< l``, in ``(n, y, x)`` order.

    A view for a single channels-last map; else one transposing copy (and one back for the
    gradient, which comes out contiguous NCHW).
    """
    if len(features) == 1:
        f = features[0]
        if f.permute(0, 2, 3, 1).is_contiguous():
            return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    return _ChannelsLastTable.apply(*features)


def rois_from_boxes(boxes: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """``(K, 5)`` RoIs from a ``(K, 5)`` tensor or a list of per-image ``(L, 4)`` boxes."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"rois must be a Tensor[K, 5], got shape {tuple(boxes.shape)}")
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError("rois must be a Tensor[K, 5] or a list of Tensor[L, 4]")
    for b in boxes:
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"per-image boxes must be Tensor[L, 4], got {tuple(b.shape)}")
    if not boxes:
        return torch.zeros((0, 5))
    ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)


def roi_align(
    input: Tensor,
    rois: Union[Tensor, List[Tensor]],
    output_size: OutputSize,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign with the signature and semantics of ``torchvision.ops.roi_align``.

    Args:
        input: ``(N, C, H, W)`` float features.
        rois: ``(K, 5)`` ``(batch_index, x1, y1, x2, y2)``, or a list of ``N`` per-image
            ``(L, 4)`` boxes. Coordinates are computed in its dtype (at least float32).
        output_size: ``PH`` or ``(PH, PW)``.
        spatial_scale: scale from box coordinates to ``input`` pixels.
        sampling_ratio: samples per bin along each axis; ``<= 0`` for adaptive
            (``ceil(roi_size / output_size)``).
        aligned: shift the scaled boxes by -0.5 (pixel centres); if False, RoI sizes are
            clamped to at least 1 (legacy).

    Returns:
        ``(K, C, PH, PW)`` contiguous, differentiable with respect to ``input``.
    """
    if input.dim() != 4:
        raise ValueError(f"input must be NCHW, got shape {tuple(input.shape)}")
    rois = rois_from_boxes(rois).to(input.device)
    rois = rois.to(coord_dtype(rois.dtype))
    N, C, H, W = input.shape
    R = rois.shape[0]
    batch = rois[:, 0].detach()
    valid = torch.isfinite(batch) & (batch >= 0) & (batch < N)
    batch = torch.where(valid, batch, torch.zeros_like(batch)).long()
    height = torch.full((R,), H, dtype=torch.long, device=input.device)
    width = torch.full((R,), W, dtype=torch.long, device=input.device)
    bags = bilinear_bags(
        rois[:, 1:],
        spatial_scale,
        height,
        width,
        batch * (H * W),
        output_size,
        sampling_ratio,
        aligned,
        valid,
    )
    return pool_bags(channels_last_table([input]), bags, R, output_size)


def roi_align_bins_exact(
    input: Tensor,
    rois: Tensor,
    bins: Tuple[Tensor, Tensor, Tensor],
    output_size: OutputSize,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """``(K, C)`` values of the output bins ``bins = (roi, ph, pw)`` (each ``(K,)`` long) of
    :func:`roi_align`, with torchvision's arithmetic in its order: per sample, the four taps'
    weighted sum; samples accumulated row by row in float32; then divided by their count.

    :func:`roi_align` sums the same terms in another order (one weighted bag per bin), which can
    differ from torchvision by a few float32 ulps. That matters only where a value is compared
    with a threshold, as mask targets are with 0.5 (at a tie, torchvision gives exactly 0.5 and
    the bag sum may give 0.49999997), so only the few bins near the threshold are recomputed
    here. On CPU it is bit-exact with torchvision's kernel. The loop is over sample slots of a
    bin (at most the largest grid of the selected RoIs), vectorised over the bins. Not
    differentiated (targets only).
    """
    PH, PW = _pair(output_size)
    r, ph, pw = bins
    K = r.shape[0]
    N, C, H, W = input.shape
    if K == 0:
        return input.new_zeros((0, C))
    f = coord_dtype(rois.dtype)
    roi = rois.detach().to(f)[r]
    offset = 0.5 if aligned else 0.0
    x1 = roi[:, 1] * spatial_scale - offset
    y1 = roi[:, 2] * spatial_scale - offset
    roi_w = roi[:, 3] * spatial_scale - offset - x1
    roi_h = roi[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / PW, roi_h / PH
    if sampling_ratio > 0:
        grid_y = torch.full_like(roi_h, float(sampling_ratio))
        grid_x = grid_y
    else:
        grid_y, grid_x = torch.ceil(roi_h / PH), torch.ceil(roi_w / PW)
    batch = roi[:, 0]
    ok = torch.isfinite(torch.stack([x1, y1, roi_w, roi_h, batch])).all(0)
    ok &= (batch >= 0) & (batch < N) & (grid_y <= MAX_GRID) & (grid_x <= MAX_GRID)
    zero = torch.zeros((), dtype=f, device=roi.device)
    grid_y, grid_x = torch.where(ok, grid_y, zero), torch.where(ok, grid_x, zero)
    batch = torch.where(ok, batch, zero).long()
    count = (grid_y * grid_x).clamp(min=1.0)
    row = y1 + ph.to(f) * bin_h  # roi_start + ph * bin_size, as torchvision adds it
    col = x1 + pw.to(f) * bin_w
    values = input.detach().to(f)
    acc = torch.zeros((K, C), dtype=f, device=roi.device)
    max_y, max_x = (int(v) for v in torch.stack([grid_y.max(), grid_x.max()]).tolist())

    def taps(t: Tensor, size: int):
        t = t.clamp(min=0)
        low = t.floor().long()
        top = low >= size - 1
        low = torch.where(top, size - 1, low)
        high = torch.where(top, size - 1, low + 1)
        t = torch.where(top, low.to(f), t)
        frac = t - low.to(f)
        return low, high, frac, 1.0 - frac

    for iy in range(max_y):
        y = row + (iy + 0.5) * bin_h / grid_y
        in_y = (iy < grid_y) & (y >= -1.0) & (y <= H)  # False for NaN (grids of 0 samples)
        y_low, y_high, ly, hy = taps(torch.where(in_y, y, zero), H)
        for ix in range(max_x):
            x = col + (ix + 0.5) * bin_w / grid_x
            live = in_y & (ix < grid_x) & (x >= -1.0) & (x <= W)
            x_low, x_high, lx, hx = taps(torch.where(live, x, zero), W)
            val = (
                (hy * hx)[:, None] * values[batch, :, y_low, x_low]
                + (hy * lx)[:, None] * values[batch, :, y_low, x_high]
                + (ly * hx)[:, None] * values[batch, :, y_high, x_low]
                + (ly * lx)[:, None] * values[batch, :, y_high, x_high]
            )
            acc = acc + torch.where(live[:, None], val, torch.zeros_like(val))
    return (acc / count[:, None]).to(input.dtype)


class ROIAlign(nn.Module):
    """detectron2's ``ROIAlign`` layer (same constructor, forward and repr) on :func:`roi_align`.

    Args:
        output_size: ``(PH, PW)`` or an int.
        spatial_scale: scale from box coordinates to feature pixels.
        sampling_ratio: samples per bin along each axis; 0 for adaptive.
        aligned: if True (default, detectron2's "ROIAlignV2"), pixel centres are at +0.5.
    """

    def __init__(
        self,
        output_size: OutputSize,
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = True,
    ):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """``input`` NCHW features, ``rois`` ``(K, 5)`` ``(batch_index, x1, y1, x2, y2)``.

        As in detectron2, the RoIs are cast to the features' dtype (float32 at least).
        """
        if rois.dim() != 2 or rois.size(1) != 5:
            raise ValueError(f"rois must be a Tensor[K, 5], got shape {tuple(rois.shape)}")
        if input.is_quantized:
            input = input.dequantize()
        return roi_align(
            input,
            rois.to(dtype=coord_dtype(input.dtype)),
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.aligned,
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, "
            f"aligned={self.aligned})"
        )

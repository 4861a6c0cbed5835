"""Non-maximum suppression in plain PyTorch: greedy NMS (equal to `torchvision.ops.nms`),
class-aware greedy NMS and YOLACT's Fast NMS.

Boxes are ``(x1, y1, x2, y2)``. The IoU of a pair is computed as torchvision's CPU kernel does, in
the boxes' dtype (half and bfloat16 in float32, integers in float64)::

    area = (x2 - x1) * (y2 - y1)
    inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))
    iou = inter / (area_i + area_j - inter)

and a box is suppressed when ``iou > iou_threshold``, compared as that kernel does (in float64),
so that the kept indices are bit-for-bit those of torchvision's CPU kernel, tied scores, IoUs
exactly at the threshold and zero-area boxes included.

Greedy NMS is exact, without a Python loop over boxes: the boxes, sorted once by decreasing score
(stable), are processed in blocks of ``_BLOCK``. For each block,

(a) the boxes suppressed by a box kept in an earlier block are found from their max IoU with the
    kept boxes (one blocked IoU computation, in chunks of ``_CHUNK`` kept boxes);
(b) the greedy order among the remaining boxes of the block is resolved with the fixed-point
    (Jacobi) iteration ``keep <- ~any_i(keep[i] & S[i, j])``, ``S`` the strictly upper-triangular
    "IoU > threshold" matrix of the block, restricted to the few boxes that have such an IoU with
    another one. It converges to the greedy result in at most one iteration per box of the longest
    suppression chain (usually a handful).

Max IoUs (``amax``) replace ``(iou > thr).any()``, several times slower on CPU; NaN IoUs (0 / 0,
between zero-area boxes) become -inf there: never ``> thr``, like NaN. The class-aware variants
process the boxes grouped by class (by decreasing score inside a class), so that a box is only
compared with nearby boxes of the same ordering, and pairs of different classes are masked out.
The same code runs on CPU and CUDA.
"""

import bisect
import functools
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["nms", "batched_nms", "fast_nms"]

# Boxes per block of the greedy loop, and rows per chunk of the IoU computations: a chunk's
# temporaries are 6 x _CHUNK x _BLOCK values, reused (tuned on CPU for N = 1000 and 6000).
_BLOCK = 512
_CHUNK = 256


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS, equal to `torchvision.ops.nms`.

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``.
        scores: ``[N]`` scores.
        iou_threshold: boxes whose IoU with a kept, higher-scored box is ``> iou_threshold`` are
            discarded.

    Returns:
        int64 indices of the kept boxes, by decreasing score (ties: lower index first).
    """
    _check(boxes, scores)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    return order[_greedy(_prepare(boxes, order), iou_threshold)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Class-aware greedy NMS: `nms` run separately on the boxes of each value of ``idxs``.

    Boxes of different ``idxs`` never suppress each other (no coordinate-offset trick: the result
    is exactly that of one `nms` per class).

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``.
        scores: ``[N]`` scores.
        idxs: ``[N]`` integer class (or image) of each box.
        iou_threshold: as in `nms`.

    Returns:
        int64 indices of the kept boxes, by decreasing score (ties: lower index first).
    """
    return _class_aware(boxes, scores, idxs, iou_threshold, _greedy, -1)


def fast_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, top_k: int = -1
) -> Tensor:
    """Class-aware Fast NMS of YOLACT (Bolya et al., 2019).

    Inside each class, a box is discarded when its IoU with any higher-scored box of its class is
    ``> iou_threshold``, even when that box is itself discarded; the kept boxes are therefore a
    subset of those of `batched_nms`. Computed from the upper triangle of the per-class IoU
    matrices, in blocks, with no loop over boxes or classes.

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``.
        scores: ``[N]`` scores.
        idxs: ``[N]`` integer class of each box.
        iou_threshold: as in `nms`.
        top_k: if ``>= 0``, only the ``top_k`` highest-scored boxes of each class are considered;
            the others are discarded (as in YOLACT). ``-1``: all boxes.

    Returns:
        int64 indices of the kept boxes, by decreasing score (ties: lower index first).
    """
    return _class_aware(boxes, scores, idxs, iou_threshold, _fast, top_k)


def _class_aware(boxes, scores, idxs, iou_threshold: float, resolve, top_k: int) -> Tensor:
    """Boxes grouped by class (by decreasing score inside one), at most ``top_k`` per class when
    ``top_k >= 0``, resolved by ``resolve`` (`_greedy` or `_fast`); kept indices by score."""
    _check(boxes, scores, idxs)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    by_score, order, cls = _class_order(scores, idxs)
    if top_k >= 0:
        first, _ = _class_runs(cls)
        selected = torch.arange(cls.shape[0], device=cls.device) - first < top_k
        order, cls = order[selected], cls[selected]
        if order.shape[0] == 0:
            return order
    keep = resolve(_prepare(boxes, order, cls), iou_threshold)
    return _in_score_order(order[keep], by_score)


def _check(boxes: Tensor, scores: Tensor, idxs: Optional[Tensor] = None) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must be [{boxes.shape[0]}], got {tuple(scores.shape)}")
    if idxs is not None and idxs.shape != boxes.shape[:1]:
        raise ValueError(f"idxs must be [{boxes.shape[0]}], got {tuple(idxs.shape)}")


class _Boxes:
    """Boxes in processing order: ``p`` = ``[4, N]`` rows (x2, y2, -x1, -y1), so that one
    ``minimum`` of two boxes gives min(x2), min(y2), -max(x1), -max(y1), or for the class-aware
    variants ``[6, N]`` rows (x2, y2, c, -x1, -y1, -c) where ``c`` = ``2 ** 64`` x the rank of the
    box's class (see `_Workspace.iou`); ``area`` = ``[N]``; ``cls`` = ``[N]`` sorted classes."""

    def __init__(self, p: Tensor, area: Tensor, cls: Optional[Tensor]):
        self.p, self.area, self.cls = p, area, cls

    def __len__(self) -> int:
        return self.area.shape[0]

    def take(self, idx: Tensor) -> "_Boxes":
        cls = None if self.cls is None else self.cls.index_select(0, idx)
        return _Boxes(self.p.index_select(1, idx), self.area.index_select(0, idx), cls)

    def range(self, s: int, e: int) -> "_Boxes":
        e = min(e, len(self))
        cls = None if self.cls is None else self.cls.narrow(0, s, e - s)
        return _Boxes(self.p.narrow(1, s, e - s), self.area.narrow(0, s, e - s), cls)


def _prepare(boxes: Tensor, order: Tensor, cls: Optional[Tensor] = None) -> _Boxes:
    """The boxes ``boxes[order]`` (of sorted classes ``cls``), in the dtype of the IoUs."""
    boxes = boxes.detach()
    if not boxes.is_floating_point():
        boxes = boxes.double()
    elif boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()
    x1, y1, x2, y2 = boxes[order].t()
    area = (x2 - x1) * (y2 - y1)
    if cls is None:
        return _Boxes(torch.stack([x2, y2, -x1, -y1]), area, None)
    rank = torch.cumsum(_first_of_class(cls), 0).to(boxes.dtype).mul_(2.0**64)
    return _Boxes(torch.stack([x2, y2, rank, -x1, -y1, -rank]), area, cls)


def _threshold(iou_threshold: float, dtype: torch.dtype) -> float:
    """The threshold ``t`` of ``dtype`` such that ``iou > t`` iff ``iou > iou_threshold`` in
    float64 (torchvision compares in double): the largest value of ``dtype`` <= the threshold."""
    t = torch.tensor(float(iou_threshold), dtype=torch.float64).to(dtype)
    if t.item() > iou_threshold:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return t.item()


def _class_order(scores: Tensor, idxs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(by_score, order, cls)``: indices sorting the boxes by decreasing score (ties: by index),
    indices sorting them by class then as ``by_score``, and the sorted classes."""
    by_score = torch.sort(scores.detach(), descending=True, stable=True).indices
    cls, by_class = torch.sort(idxs[by_score], stable=True)
    return by_score, by_score[by_class], cls


def _in_score_order(kept: Tensor, by_score: Tensor) -> Tensor:
    """The indices ``kept`` in the order of ``by_score``."""
    mask = torch.zeros(by_score.shape[0], dtype=torch.bool, device=kept.device)
    mask[kept] = True
    return by_score[mask[by_score]]


def _first_of_class(cls: Tensor) -> Tensor:
    """Whether each position of sorted ``cls`` is the first of its class."""
    is_first = torch.ones_like(cls, dtype=torch.bool)
    is_first[1:] = cls[1:] != cls[:-1]
    return is_first


def _class_runs(cls: Tensor) -> Tuple[Tensor, Tensor]:
    """For each position of sorted ``cls``: first and one-past-last position of its class."""
    n = cls.shape[0]
    is_first = _first_of_class(cls)
    starts = is_first.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([n])])
    run = torch.cumsum(is_first, 0) - 1
    return starts[run], ends[run]


def _blocks(cls: Optional[Tensor], n: int) -> List[Tuple[int, int, int, int]]:
    """``(start, end, first, same_end)`` of each block: ``first`` is the first position of the
    class of the block's first box, ``[start, same_end)`` the block's boxes of that class (the only
    ones that earlier blocks can suppress: the boxes are grouped by class)."""
    starts = list(range(0, n, _BLOCK))
    ends = [min(s + _BLOCK, n) for s in starts]
    if cls is None:
        return [(s, e, 0, e) for s, e in zip(starts, ends)]
    first, last = _class_runs(cls)
    at = torch.tensor(starts, device=cls.device)
    firsts, lasts = first[at].tolist(), last[at].tolist()
    return [(s, e, f, min(t, e)) for s, e, f, t in zip(starts, ends, firsts, lasts)]


@functools.lru_cache(maxsize=16)
def _lower(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[n, n]``: -inf on and below the diagonal, 0 above (added to the diagonal chunks of a
    block)."""
    ar = torch.arange(n, device=device)
    return torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(
        ar[:, None] >= ar[None, :], float("-inf")
    )


class _Workspace:
    """The blocked IoU computations of one call, with scratch space reused by all its blocks.
    NaN IoUs are replaced by -inf (never ``> thr``, like NaN, but harmless to ``amax``)."""

    def __init__(self, boxes: _Boxes, iou_threshold: float):
        dtype, device = boxes.area.dtype, boxes.area.device
        self.thr = _threshold(iou_threshold, dtype)
        size = (boxes.p.shape[0] + 2) * _CHUNK * min(len(boxes), _BLOCK)
        self.buf = torch.empty(size, dtype=dtype, device=device)
        self.views: Dict[Tuple[int, int], Tuple[Tensor, ...]] = {}  # (A, B): scratch views
        self.lower = _lower(_CHUNK, dtype, device)

    def iou(self, a: _Boxes, b: _Boxes, mask: Optional[Tensor] = None) -> Tensor:
        """``[A, B]`` IoUs (``A <= _CHUNK``, ``B <= _BLOCK``), in the scratch space; ``mask`` is
        added to the first ``A`` columns.

        With classes, ``w`` gets ``min(c) - max(c)`` added: exactly 0 for two boxes of a class
        (their IoU is unchanged) and ``<= -2 ** 64`` otherwise, so that the IoU of boxes of
        different classes is 0 (or -inf), and not a candidate of suppression."""
        na, nb = len(a), len(b)
        views = self.views.get((na, nb))
        if views is None:
            k = a.p.shape[0] // 2
            m = self.buf.narrow(0, 0, (2 * k + 2) * na * nb).view(2 * k + 2, na, nb)
            views = (m[: 2 * k], m[:k], m[k : 2 * k], m[:2], *m[:3], *m[-2:], m[-2, :, :na])
            self.views[na, nb] = views
        m, hi, neg_lo, wh, w, h, c, inter, union, diagonal = views
        # min(x2) - max(x1), min(y2) - max(y1) [, min(c) - max(c)]
        torch.minimum(a.p.unsqueeze(2), b.p.unsqueeze(1), out=m)
        hi.add_(neg_lo)
        if m.shape[0] == 6:
            w.add_(c)
        wh.clamp_(min=0)
        torch.mul(w, h, out=inter)
        torch.add(a.area.unsqueeze(1), b.area.unsqueeze(0), out=union).sub_(inter)
        iou = inter.div_(union)
        if mask is not None:
            diagonal.add_(mask)
        inf = float("inf")
        return iou.nan_to_num_(nan=-inf, posinf=inf, neginf=-inf)

    def max_iou(self, a: _Boxes, b: _Boxes) -> Tensor:
        """``[B]`` max IoU of each box of ``b`` with the boxes of ``a`` (classes ignored)."""
        out = torch.full_like(b.area, float("-inf"))
        for i in range(0, len(a), _CHUNK):
            torch.maximum(out, self.iou(a.range(i, i + _CHUNK), b).amax(0), out=out)
        return out

    def block_max_iou(self, b: _Boxes) -> Tuple[Tensor, Tensor]:
        """For a block of ``n <= _BLOCK`` boxes: max IoU of each box with the later and with the
        earlier boxes of its class."""
        n = len(b)
        row_max = torch.empty_like(b.area)
        col_max = torch.full_like(b.area, float("-inf"))
        cls = None if b.cls is None else b.cls.tolist()
        for i in range(0, n, _CHUNK):
            j = min(i + _CHUNK, n)
            # Only the columns up to the last class of the rows (the classes are sorted).
            w = n if cls is None else bisect.bisect_right(cls, cls[j - 1], j)
            iou = self.iou(b.range(i, j), b.range(i, w), self.lower[: j - i, : j - i])
            torch.amax(iou, 1, out=row_max[i:j])
            torch.maximum(col_max[i:w], iou.amax(0), out=col_max[i:w])
        return row_max, col_max

    def suppresses(self, b: _Boxes, rows: Tensor, cols: Tensor) -> Tensor:
        """``[R, C]`` bool: whether box ``rows[i]`` of ``b`` suppresses its box ``cols[j]``
        (``rows[i] < cols[j]``, same class, IoU > thr)."""
        out = torch.empty(rows.shape[0], cols.shape[0], dtype=torch.bool, device=rows.device)
        a, c = b.take(rows), b.take(cols)
        for i in range(0, len(a), _CHUNK):
            torch.gt(self.iou(a.range(i, i + _CHUNK), c), self.thr, out=out[i : i + _CHUNK])
        out &= rows.unsqueeze(1) < cols.unsqueeze(0)
        if b.cls is not None:
            out &= a.cls.unsqueeze(1) == c.cls.unsqueeze(0)
        return out

    def candidates(self, b: _Boxes) -> Tuple[Tensor, Tensor]:
        """The boxes of block ``b`` that can suppress (rows) and be suppressed (cols) by another
        box of the block."""
        row_max, col_max = self.block_max_iou(b)
        return (row_max > self.thr).nonzero().squeeze(1), (col_max > self.thr).nonzero().squeeze(1)


def _greedy(boxes: _Boxes, iou_threshold: float) -> Tensor:
    """Bool mask of the boxes kept by greedy NMS (the boxes in processing order: by decreasing
    score inside a class, grouped by class)."""
    n = len(boxes)
    ws = _Workspace(boxes, iou_threshold)
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.area.device)
    for s, e, first, same_end in _blocks(boxes.cls, n):
        block, pos = boxes.range(s, e), None
        if first < s:
            # (a) Boxes suppressed by a kept box of an earlier block (of the same class).
            kept = keep[first:s].nonzero().squeeze(1) + first
            dead = ws.max_iou(boxes.take(kept), boxes.range(s, same_end)) > ws.thr
            if bool(dead.any()):
                alive = torch.ones(e - s, dtype=torch.bool, device=keep.device)
                alive[: same_end - s] = ~dead
                pos = alive.nonzero().squeeze(1)
                block = block.take(pos)
        # (b) Greedy among the remaining boxes of the block: the fixed point of
        # keep = ~any_i(keep_i & S_ij), S restricted to the few boxes that can suppress (rows) or
        # be suppressed (cols) inside the block.
        rows, cols = ws.candidates(block)
        cur = torch.ones(len(block), dtype=torch.bool, device=keep.device)
        if rows.numel() > 0 and cols.numel() > 0:
            sup = ws.suppresses(block, rows, cols).float()  # 0/1: the sums are exact
            while True:
                new = torch.ones_like(cur)
                new[cols] = (cur[rows].float() @ sup) == 0
                if torch.equal(new, cur):
                    break
                cur = new
        if pos is None:
            keep[s:e] = cur
        else:
            keep[s + pos] = cur
    return keep


def _fast(boxes: _Boxes, iou_threshold: float) -> Tensor:
    """Bool mask of the boxes kept by Fast NMS (the boxes in processing order: by decreasing
    score inside a class, grouped by class)."""
    n = len(boxes)
    ws = _Workspace(boxes, iou_threshold)
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.area.device)
    for s, e, first, same_end in _blocks(boxes.cls, n):
        block = boxes.range(s, e)
        rows, cols = ws.candidates(block)
        drop = torch.zeros(e - s, dtype=torch.bool, device=keep.device)
        if rows.numel() > 0 and cols.numel() > 0:
            drop[cols] = ws.suppresses(block, rows, cols).any(0)
        if first < s:
            earlier = boxes.range(first, s)
            drop[: same_end - s] |= ws.max_iou(earlier, boxes.range(s, same_end)) > ws.thr
        keep[s:e] = ~drop
    return keep

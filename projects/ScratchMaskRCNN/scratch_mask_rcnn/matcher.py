"""IoU matcher: each prediction gets its best ground truth and a label from IoU thresholds."""

from typing import Sequence, Tuple

import torch

__all__ = ["Matcher"]


class Matcher:
    """Assign each of N predictions (anchors, proposals) to one of M ground-truth boxes.

    Equal to detectron2's ``Matcher``: with ``thresholds=[0.3, 0.7]`` and ``labels=[0, -1, 1]``,
    IoU < 0.3 is negative (0), [0.3, 0.7) ignored (-1), >= 0.7 positive (1).

    Args:
        thresholds: increasing IoU thresholds splitting [0, 1] into len(thresholds) + 1 intervals.
        labels: the label of each interval, in {-1, 0, 1}.
        allow_low_quality_matches: also make positive every prediction whose IoU with some ground
            truth is the highest that ground truth has (ties included): every ground truth gets at
            least one positive (the RPN rule of Faster R-CNN).
    """

    def __init__(
        self, thresholds: Sequence[float], labels: Sequence[int], allow_low_quality_matches=False
    ):
        thresholds = [float(t) for t in thresholds]
        if thresholds != sorted(thresholds) or not thresholds or thresholds[0] <= 0:
            raise ValueError(f"IOU_THRESHOLDS must be increasing and positive, got {thresholds}")
        if len(labels) != len(thresholds) + 1 or any(label not in (-1, 0, 1) for label in labels):
            raise ValueError(
                f"IOU_LABELS {list(labels)} must be len(IOU_THRESHOLDS) + 1 values in {{-1, 0, 1}}"
            )
        self.thresholds = [-float("inf")] + thresholds + [float("inf")]
        self.labels = [int(label) for label in labels]
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            quality: (M, N) non-negative match quality (IoU) of ground truth x prediction.

        Returns:
            matches (N,) int64: index of the matched ground truth (0 when there is none);
            labels (N,) int8: -1 ignore, 0 negative, 1 positive.
        """
        if quality.dim() != 2:
            raise ValueError(
                f"Matcher expects an (M, N) quality matrix, got {tuple(quality.shape)}"
            )
        n = quality.shape[1]
        if quality.numel() == 0:
            matches = torch.zeros(n, dtype=torch.int64, device=quality.device)
            return matches, torch.full(
                (n,), self.labels[0], dtype=torch.int8, device=quality.device
            )
        values, matches = quality.max(dim=0)
        labels = torch.ones(n, dtype=torch.int8, device=quality.device)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            labels[(values >= low) & (values < high)] = label
        if self.allow_low_quality_matches:
            best = quality.max(dim=1, keepdim=True).values
            labels[(quality == best).any(dim=0)] = 1
        return matches, labels

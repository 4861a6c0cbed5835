"""Balanced sampler: a fixed budget of labelled examples with at most a fraction of positives."""

from typing import Tuple

import torch

__all__ = ["sample_balanced"]


def sample_balanced(
    labels: torch.Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random positives and negatives, like detectron2's ``subsample_labels``.

    Args:
        labels: (N,) with -1 = ignore, ``bg_label`` = negative, anything else = positive.
        num_samples: the budget (RPN 256, RoI head 512 by default).
        positive_fraction: at most ``int(num_samples * positive_fraction)`` positives (RPN 0.5,
            RoI head 0.25); the rest of the budget is filled with negatives.

    Returns:
        (pos_idx, neg_idx): indices into ``labels``; as many as there are when there are fewer.
        The draws consume the global RNG exactly as detectron2's do.
    """
    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    perm_pos = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    perm_neg = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    return positive[perm_pos], negative[perm_neg]

"""A training stream that ``--resume`` continues exactly, and that N processes split like one.

detectron2's ``TrainingSampler`` restarts its shuffle on resume, and augmentation draws from each
loader worker's global RNG, so a resumed run sees other images and other flips than the run it
continues. Here every sample carries its position in one global, seeded stream:

- :class:`ResumableTrainingSampler` yields ``position * size + index``; rank ``r`` of ``W`` takes
  positions ``r, r + W, ...`` starting at ``start_iter * total_batch_size``, so iteration ``i``
  uses positions ``[i * B, (i + 1) * B)`` whatever the number of processes or loader workers.
- :class:`PositionedDataset` decodes that into the dataset dict plus its position, and
  :class:`SeededMapper` seeds ``random``, NumPy and torch from ``(seed, position)`` before calling
  the real mapper, so augmentation depends on the sample's position only.

With ``DATALOADER.ASPECT_RATIO_GROUPING`` and images of several aspect ratios, batches are formed
from a buffer, so a resumed run is exact only in which samples and augmentations are drawn, not
in how they are grouped into batches.
"""

import itertools
import random
from typing import Dict, Optional

import numpy as np
import torch
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

__all__ = ["ResumableTrainingSampler", "PositionedDataset", "SeededMapper"]

_POSITION_KEY = "_stream_position"


class ResumableTrainingSampler(Sampler):
    """Infinite shuffled stream of ``position * size + index``, sharded by rank."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, total_batch_size: int = 1):
        """
        Args:
            size: number of samples in the dataset.
            seed: seed of the shuffle, the same on every rank.
            shuffle: shuffle each pass over the dataset (else ``0..size-1`` repeated).
            total_batch_size: images per iteration over all ranks, to turn ``start_iter`` into a
                stream position.
        """
        if size <= 0:
            raise ValueError("ResumableTrainingSampler: the training set is empty")
        self._size = size
        self.seed = int(seed)
        self._shuffle = shuffle
        self._total_batch_size = total_batch_size
        self.start_iter = 0
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()

    def _global_stream(self):
        g = torch.Generator()
        g.manual_seed(self.seed)
        for epoch in itertools.count():
            if self._shuffle:
                order = torch.randperm(self._size, generator=g).tolist()
            else:
                order = range(self._size)
            base = epoch * self._size
            for offset, index in enumerate(order):
                yield (base + offset) * self._size + index

    def __iter__(self):
        start = self.start_iter * self._total_batch_size + self._rank
        yield from itertools.islice(self._global_stream(), start, None, self._world_size)


class PositionedDataset(Dataset):
    """Decodes the sampler's ``position * size + index`` into a dict that knows its position."""

    def __init__(self, dataset: Dataset):
        self._dataset = dataset

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, key: int) -> Dict:
        position, index = divmod(int(key), len(self._dataset))
        record = self._dataset[index]
        record[_POSITION_KEY] = position
        return record


class SeededMapper:
    """Calls ``mapper`` with every RNG seeded from ``(seed, stream position)``."""

    def __init__(self, mapper, seed: int):
        self._mapper = mapper
        self.seed = int(seed)

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        position = dataset_dict.pop(_POSITION_KEY, None)
        if position is not None:
            state = np.random.SeedSequence([self.seed, position]).generate_state(2)
            np.random.seed(int(state[0]))
            random.seed(int(state[1]))
            torch.manual_seed(int(state[1]))
        return self._mapper(dataset_dict)

"""Fixtures of the MaskPyramid tests (the shared ones are in tests/conftest.py)."""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def same_random_state():
    """Every test starts from the same random state, whatever ran before it: detectron2's
    TrainingSampler draws its shuffling seed from NumPy's global generator, so a test's batches
    would otherwise depend on the tests that ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

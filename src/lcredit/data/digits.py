"""scikit-learn's 8×8 handwritten digits: a small real image task that needs no network."""
import numpy as np
import torch

from typing import Annotated

from lcredit.data import Task
from lcredit.options import Range, Seed, checked


@checked("data")
def digits(test_fraction: Annotated[float, Range(0.0, 1.0, lo_open=True)] = 0.2,
           split_seed: Seed = 0) -> Task:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.from_numpy(np.random.RandomState(split_seed).permutation(len(x)))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Task("digits", x[train], y[train], x[test], y[test], 10)

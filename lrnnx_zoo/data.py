"""Real data sets that ship inside installed packages, so nothing is downloaded at run time.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images from UCI), read pixel
  by pixel in row-major order as a 64-step sequence of one feature in [0, 1]; 10 classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class Split:
    """A deterministic train/test split: which seed and sizes, recorded in configs and model cards."""

    seed: int = 0
    n_test: int = 360

    def indices(self, n: int) -> Tuple[Tensor, Tensor]:
        if not 0 < self.n_test < n:
            raise ValueError(f"n_test must lie in (0, {n}), got {self.n_test}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[self.n_test:], perm[: self.n_test]


def load_digits_sequences(split: Split = Split()) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits as sequences.  Returns x_train (n, 64, 1), y_train (n,), x_test, y_test (float32 / int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is an extra: say which one
        raise ImportError("the digits data set ships with scikit-learn: pip install 'lrnnx-zoo[data]'") from exc
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 64, 1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    train, test = split.indices(len(y))
    return x[train], y[train], x[test], y[test]

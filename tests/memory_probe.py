"""An exact, allocator-free bound on a computation's memory: the largest tensor any op produced."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Inside ``with LargestTensor() as seen:``, ``seen.numel`` is the most elements any op's output had
    (a broadcast copy or a stacked intermediate shows here whatever the allocator or machine does)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out

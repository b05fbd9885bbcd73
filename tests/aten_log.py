"""The aten ops a block of code dispatches: what the op-count tests assert on (a copy too many, a
stack where a view would do, an exp in the wrong precision), instead of timing it."""

from __future__ import annotations

import collections
from typing import Any, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AtenLog(TorchDispatchMode):
    """Inside ``with AtenLog() as log:``, ``log.calls`` lists (op, dtype of its first argument or None)
    for every aten op run, in order. Only the dtype is kept, not the tensors: holding them would keep
    memory alive that the code under test expects to be freed."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Tuple[Any, Optional[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args else None
        self.calls.append((func, first.dtype if isinstance(first, torch.Tensor) else None))
        return func(*args, **(kwargs or {}))

    @property
    def names(self) -> List[str]:
        """The ops' names, e.g. "aten.copy_.default", in order."""
        return [str(func) for func, _ in self.calls]

    def counts(self) -> "collections.Counter[str]":
        """How many times each op ran, by name."""
        return collections.Counter(self.names)

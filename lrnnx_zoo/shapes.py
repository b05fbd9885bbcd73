"""Shape arithmetic without importing torch's symbolic-shape machinery, and size checks.

``torch.broadcast_shapes`` imports ``torch._refs`` and with it sympy on its first call: 0.45-0.6 s
of a model's first forward here (a 16k-parameter forecaster's took 650 ms, 20 ms of it compute).
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

import torch


def broadcast_shape(*shapes: Sequence[int]) -> torch.Size:
    """The shape that tensors of ``shapes`` broadcast to (NumPy's rule: align the trailing axes;
    each axis is 1 or the same size). Raises ValueError naming the shapes when they do not broadcast.
    Under torch.compile it is torch's own (sympy is loaded there anyway, and sizes may be symbolic)."""
    if torch.compiler.is_compiling():
        return torch.broadcast_shapes(*shapes)
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for axis, size in enumerate(shape, start=rank - len(shape)):
            size = int(size)
            if size < 0:
                raise ValueError(f"a shape cannot have negative sizes, got {tuple(shape)}")
            if size != 1 and out[axis] not in (1, size):
                raise ValueError(f"shapes {', '.join(str(tuple(s)) for s in shapes)} do not broadcast: axis "
                                 f"{axis - rank} has sizes {out[axis]} and {size}")
            if size != 1:
                out[axis] = size
    return torch.Size(out)


def positive_int(value: Any) -> Optional[int]:
    """``value`` as an int if it is a positive integer (Python or numpy; not a bool), else None, for
    callers that raise their own error naming what the number is (a batch, a chunk's steps)."""
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if number >= 1 and not isinstance(value, bool) else None

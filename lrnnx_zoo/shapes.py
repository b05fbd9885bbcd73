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


def integer(value: Any) -> Optional[int]:
    """``value`` as a Python int if it is an integer: an int, a numpy integer or a 0-dim integer tensor
    (what a sweep over ``np.arange`` or ``np.random.choice`` hands over); None for anything else, bools
    (Python, numpy or tensor) and whole floats such as 64.0 included."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(value: Any) -> Optional[int]:
    """``value`` as a Python int if it is a positive :func:`integer`, else None, for callers that raise
    their own error naming what the number is (a batch, a chunk's steps, a layer's width)."""
    number = integer(value)
    return number if number is not None and number >= 1 else None


def stream_rows(index: Any, batch: int, who: str, device: Any = None) -> Optional[torch.Tensor]:
    """The rows of a batch of ``batch`` streams that a fork continues (``fork_cache`` of the layers
    and of SequenceModel, ``OnnxStreamer.copy``): None for all of them, else a (B',) long tensor of
    rows in [0, batch) on ``device``.

    index: None; a 1-D sequence, array or tensor of row numbers in [-batch, batch) (row b of the
    fork continues row index[b]: rows may repeat, for beams, or be left out); or a 1-D bool mask of
    length ``batch`` (the rows kept, in order). Anything else is refused naming ``who``."""
    if index is None:
        return None
    if not isinstance(index, torch.Tensor):
        try:
            index = torch.as_tensor(index)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{who}: index must be None, a 1-D sequence or tensor of row numbers, or a bool mask of "
                            f"the batch ({batch} rows), got {type(index).__name__}") from None
    if index.dim() != 1 or (index.dtype == torch.bool and index.shape[0] != batch):
        raise ValueError(f"{who}: index must be 1-D (row numbers, or a bool mask of the batch's {batch} rows), got "
                         f"shape {tuple(index.shape)}" + (" of bools" if index.dtype == torch.bool else ""))
    if index.dtype == torch.bool:
        index = index.nonzero().squeeze(1)
    elif index.numel() and (index.is_floating_point() or index.is_complex()):   # ([] reads as float32)
        raise TypeError(f"{who}: index must hold integers (row numbers) or bools (a mask), got {index.dtype}")
    if index.numel() == 0:
        raise ValueError(f"{who}: index selects no row, and a stream holds at least one (the batch has {batch})")
    if bool((index < -batch).any()) or bool((index >= batch).any()):
        raise IndexError(f"{who}: index must hold rows in [-{batch}, {batch}) of the batch of {batch}, got "
                         f"{index.tolist()}")
    return index.to(device=device, dtype=torch.long) % batch

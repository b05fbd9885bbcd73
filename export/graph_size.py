"""The weights a chunk graph will hold, known before the work of building it.

A chunk form's matrices grow as the chunk T squared (a per-channel form holds T (T + 2N) floats per
channel), so a chunk graph's weights are a T^2 + b T + c bytes, found exactly from the chunk modules
of 1, 2 and 3 steps. The exporters check a chunk against what can hold it before they build it:
an ONNX file (protobuf stops at 2 GiB), and for every format this machine's memory, since building
the chunk forms and tracing them peaks at several times their weights.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Tuple

from torch import nn

from .chunk_graph import ChunkModule
from .step_graph import ExportError, StepModule

#: Peak resident memory of building and tracing a chunk graph, in multiples of its weights, with a
#: margin: building the chunk module alone rose 5.1-5.9x its weights for per-channel and dense-form
#: graphs of 0.26-1 GB (d_model=64, T=300-1000; session 25), the forecaster's whole export at chunk=3000
#: (3.5 GB of weights) peaked at 12.5 GB (session 24).
BUILD_PEAK = 8


def tensor_bytes(module: nn.Module, skip: Iterable[nn.Module] = ()) -> int:
    """Bytes of ``module``'s parameters and buffers, each tensor once, leaving out those of ``skip``."""
    left_out = {id(t) for m in skip for t in (*m.parameters(), *m.buffers())}
    seen = {id(t): t for t in (*module.parameters(), *module.buffers()) if id(t) not in left_out}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _weight_bytes(module: ChunkModule) -> Tuple[int, int]:
    """(bytes of the chunk forms' weights, bytes of the graph's other weights; the step module's forms
    are not in the graph)."""
    def size(prefix: str) -> int:
        named = list(module.named_parameters()) + list(module.named_buffers())
        return sum(t.numel() * t.element_size() for name, t in named if name.startswith(prefix))
    forms = size("forms.")
    return forms, size("") - forms - size("step.forms.")


def chunk_graph_bytes(step: StepModule) -> Callable[[int], float]:
    """T -> the bytes of weights a chunk graph of T steps of ``step`` holds (module docstring): the chunk
    forms' and the rest's together (a mean-pooled model's step counts grow with T too)."""
    s1, s2, s3 = (sum(_weight_bytes(ChunkModule(step, t))) for t in (1, 2, 3))
    a = (s3 - 2 * s2 + s1) / 2
    b = s2 - s1 - 3 * a
    c = s1 - a - b
    return lambda t: a * t * t + b * t + c


def _largest_chunk(total: Callable[[int], float], limit: float, T: int) -> int:
    """The largest t <= T with total(t) <= limit (total grows with t), 0 if none."""
    fits, lo, hi = 0, 1, T
    while lo <= hi:
        mid = (lo + hi) // 2
        if total(mid) <= limit:
            fits, lo = mid, mid + 1
        else:
            hi = mid - 1
    return fits


def check_chunk_under(total: Callable[[int], float], T: int, limit: float, over: str, none_fits: str) -> None:
    """Raise an ExportError unless a chunk graph of T steps (``total``: :func:`chunk_graph_bytes`) holds at
    most ``limit`` bytes of weights; the message says what the weights are ``over`` and names the
    largest chunk within the limit, or ``none_fits``."""
    if total(T) <= limit:
        return
    fits = _largest_chunk(total, limit, T)
    advice = f"chunk={fits} fits" if fits >= 1 else none_fits
    raise ExportError(f"a chunk graph of {T} steps per call holds {readable_size(total(T))} of weights, {over}; "
                      f"its chunk forms' matrices grow as the chunk squared: {advice}")


def readable_size(n: float) -> str:
    """Bytes as MB, or GB from 10 GB on ("38.7 GB", not "3.865e+04 MB")."""
    return f"{n / 1e9:.3g} GB" if n >= 1e10 else f"{n / 1e6:.4g} MB"


def physical_memory() -> Optional[int]:
    """This machine's physical memory in bytes, or None where the OS does not say (os.sysconf)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_chunk_in_memory(step: StepModule, T: int, total: Optional[Callable[[int], float]] = None) -> None:
    """Refuse a chunk graph of T steps whose build would need more than this machine's memory
    (:data:`BUILD_PEAK` times its weights), before it is built: at chunk=10000 the forecaster's chunk
    graph holds 39 GB of weights, and a TorchScript or torch.export build ran until the machine ran
    out of memory. ``total``: :func:`chunk_graph_bytes` of ``step`` if already found. The machine's
    physical memory, not a container's limit (which os.sysconf does not see)."""
    memory = physical_memory()
    if memory is None:
        return
    check_chunk_under(total or chunk_graph_bytes(step), T, memory / BUILD_PEAK,
                      f"and building it takes about {BUILD_PEAK}x that, more than this machine's "
                      f"{readable_size(memory)} of memory", "the model alone is too large for it")

"""S4's initializers: the HiPPO measures whose normal-plus-low-rank factors start a kernel.

Each is registered as the initializer ("s4", measure), so ``create_layer("s4", H, measure=...)``,
``HippoSSKernel(..., measure=...)`` and FFTConv's s4 kernel find them through the registry, and a
plugin adds a measure the same way (``registry.add_initializer("s4", "mine", fn)``). The contract:

    fn(N, rank=1, **measure_args) -> (w, P, B)
        w: (N/2,) complex  eigenvalues of the normal part, one per conjugate pair ([S4] Sec. 3.2)
        P: (rank, N/2) complex  the low-rank term in the same eigenbasis
        B: (N/2,) complex  the input matrix in that eigenbasis

so that the continuous system is A = V (diag(w) - P^H P) V^H over the full (conjugate-closed)
state, as :func:`lrnnx_zoo.hippo.nplr` returns it. ``measure_args`` are the layer's.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from lrnnx_zoo import hippo
from lrnnx_zoo.registry import initial_values, list_initializers

__all__ = ["NPLR_MEASURES", "nplr_initializer", "measure_factors"]

#: The HiPPO measures with NPLR structure (``random`` and ``diagonal`` have none: S4D covers them).
NPLR_MEASURES = ("legs", "legt", "fourier", "lagt", "tlagt", "glagt")
_WITHOUT_NPLR = ("random", "diagonal")

Initializer = Callable[..., Tuple[Tensor, Tensor, Tensor]]


def nplr_initializer(measure: str) -> Initializer:
    """The registered initializer of a built-in HiPPO ``measure``: ``hippo.nplr`` in float64."""
    def init(N: int, rank: int = 1, **measure_args: Any) -> Tuple[Tensor, Tensor, Tensor]:
        w, P, B, _ = hippo.nplr(measure, N, rank=rank, dtype=torch.float64, **measure_args)
        return w, P, B
    init.__name__ = init.__qualname__ = f"init_{measure}"
    init.__doc__ = f"NPLR factors (w, P, B) of the HiPPO-{measure} matrix, N states, rank ``rank``."
    return init


def measure_factors(measure: str, N: int, rank: int, measure_args: Optional[Dict[str, Any]] = None
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """(w (N/2,), P (rank, N/2), B (N/2,)) complex128 from the initializer ("s4", measure); a
    RegistryError listing the registered measures if there is none, and a ValueError that says
    what was expected if it returns something else (a plugin's measure failed deep inside the
    kernel's generation otherwise)."""
    if measure in _WITHOUT_NPLR and f"s4.{measure}" not in list_initializers("s4"):
        known = ", ".join(name.split(".", 1)[1] for name in list_initializers("s4"))
        raise ValueError(f"HiPPO measure {measure!r} has no normal-plus-low-rank structure, so S4 cannot start from "
                         f"it; S4's measures: {known}. For a diagonal system use the S4D family "
                         f"(create_layer('s4d', ..., init='random'), or kernel_type='s4d' in fftconv)")
    M = N // 2
    out = initial_values("s4", measure, "(w, P, B)", [(M,), (rank, M), (M,)], f"N={N}, rank={rank}", N, rank=rank,
                         **(measure_args or {}))
    w, P, B = (t.detach().to(torch.complex128) for t in out)
    # (not on the meta device, where a layer is built without data: nothing to check there)
    if w.device.type != "meta" and not all(bool(torch.isfinite(t).all()) for t in (w, P, B)):
        raise ValueError(f"the s4 initializer {measure!r} returned non-finite values")
    return w, P, B

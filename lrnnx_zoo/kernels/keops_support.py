"""Lazy detection of a working pykeops installation.

pykeops JIT-compiles every formula with the system C++ compiler the first time it is used, so
"importable" is not the same as "usable": a missing compiler or broken cache only shows up when a
kernel is built. :func:`keops_available` therefore compiles and runs one tiny complex reduction
(the same kind of formula the Cauchy/Vandermonde kernels use) and caches the verdict for the
process, per device type: a pykeops that builds CPU kernels may still lack the CUDA libraries
for GPU kernels ("CUDA libraries not found ... Switching to CPU only"), so "cuda" is probed on
the GPU itself. Nothing here imports pykeops at module import time, so ``import lrnnx_zoo``
never pays for (or prints) the pykeops start-up.

Set ``LRNNX_ZOO_DISABLE_KEOPS=1`` to force the pure-torch code paths.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Dict, Iterator, Optional, Union

if TYPE_CHECKING:
    import torch

__all__ = [
    "DISABLE_ENV_VAR",
    "keops_available",
    "keops_unavailable_reason",
    "require_keops",
    "quiet_keops",
    "reset_keops_cache",
]

DISABLE_ENV_VAR = "LRNNX_ZOO_DISABLE_KEOPS"

# Per device type ("cpu", "cuda"): absent until that probe has run; then True/False for the rest
# of the process.
_AVAILABLE: Dict[str, bool] = {}
_REASON: Dict[str, Optional[str]] = {}
#: The device types pykeops computes on (its "CPU" and "GPU" backends).
KEOPS_DEVICE_TYPES = ("cpu", "cuda")


def _device_type(device: Union[str, "torch.device", None]) -> str:
    """"cpu", "cuda", ... from a torch.device, a device string ("cuda:1") or None (the CPU)."""
    if device is None:
        return "cpu"
    return str(getattr(device, "type", device)).split(":")[0]


def _disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def quiet_keops() -> Iterator[None]:
    """Silence pykeops while compiling: its banner and build log go to the C-level fds 1/2.

    Redirects file descriptors (not just ``sys.stdout``) because the compiler subprocess and the
    C++ loader write there directly. If the fds cannot be duplicated (e.g. an embedded
    interpreter), it degrades to a no-op rather than failing.
    """
    saved: list[tuple[int, int]] = []
    devnull = None
    try:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
    except OSError:
        pass
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if devnull is not None:
            os.close(devnull)


def _probe(device_type: str = "cpu") -> tuple[bool, Optional[str]]:
    """Build and run ``sum_j v_j / (z_i - w_j)`` on 3 x 4 complex points on ``device_type`` (its
    keops backend: "CPU" or "GPU"); compare with torch."""
    if device_type not in KEOPS_DEVICE_TYPES:
        return False, f"pykeops computes on {' and '.join(KEOPS_DEVICE_TYPES)} only, not on {device_type!r}"
    try:
        import torch

        with quiet_keops():
            import pykeops

            was_verbose = getattr(pykeops, "verbose", None)
            if hasattr(pykeops, "set_verbose"):
                pykeops.set_verbose(False)
            try:
                from pykeops.torch import Genred

                fn = Genred(
                    "ComplexDivide(v, z - w)",
                    ["v = Vj(2)", "z = Vi(2)", "w = Vj(2)"],
                    reduction_op="Sum",
                    axis=1,
                )
                dev = torch.device(device_type)
                v = torch.tensor([1.0 + 0.5j, -0.25 + 1.0j, 0.5 - 0.5j, 2.0 + 0.0j], device=dev)
                w = torch.tensor([-0.5 + 1.0j, -0.5 - 1.0j, -1.0 + 0.25j, -2.0 + 0.0j], device=dev)
                z = torch.tensor([0.0 + 1.0j, 1.0 + 0.0j, 0.5 - 2.0j], device=dev)
                out = fn(torch.view_as_real(v), torch.view_as_real(z), torch.view_as_real(w),
                         backend="GPU" if device_type == "cuda" else "CPU")
            finally:
                if was_verbose is not None and hasattr(pykeops, "set_verbose"):
                    pykeops.set_verbose(was_verbose)
        got = torch.view_as_complex(out.reshape(3, 2).contiguous())
        ref = (v[None, :] / (z[:, None] - w[None, :])).sum(-1)
        if not torch.allclose(got, ref, rtol=1e-4, atol=1e-5):
            return False, (f"pykeops test kernel returned wrong values "
                           f"({got.tolist()} vs {ref.tolist()})")
        return True, None
    # A failing build can surface as any exception, even SystemExit from a subprocess wrapper.
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        msg = str(exc).strip().splitlines()
        detail = msg[-1] if msg else ""
        return False, f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def keops_available(device: Union[str, "torch.device", None] = "cpu") -> bool:
    """True if pykeops can compile and run a complex Genred kernel on ``device``'s type (default
    the CPU; pass the tensors' device, e.g. ``v.device``, to ask about the GPU).

    The first call per device type may take several seconds (one kernel compilation); the
    verdict is cached. Returns False, without importing pykeops, when ``LRNNX_ZOO_DISABLE_KEOPS=1``.
    Never raises.
    """
    if _disabled_by_env():
        # Not cached: the env var is a live switch, so unsetting it re-enables the probe.
        return False
    kind = _device_type(device)
    if kind not in _AVAILABLE:
        _AVAILABLE[kind], _REASON[kind] = _probe(kind)
    return _AVAILABLE[kind]


def auto_may_use_keops(device: Union[str, "torch.device", None] = "cpu") -> bool:
    """Whether an "auto" backend may pick keops: :func:`keops_available`, and no torch.func transform
    or forward-mode AD running, which pykeops's autograd (an old-style Function without a jvp) cannot
    join; the torch backends can."""
    from ..base import forward_ad_active, func_transforms_active   # here: this module does not import torch
    return not (func_transforms_active() or forward_ad_active()) and keops_available(device)


def keops_unavailable_reason(device: Union[str, "torch.device", None] = "cpu") -> Optional[str]:
    """Why :func:`keops_available` is False for ``device`` (runs the probe if needed); None when it is True."""
    if _disabled_by_env():
        return f"disabled by the environment variable {DISABLE_ENV_VAR}=1"
    if keops_available(device):
        return None
    return _REASON.get(_device_type(device)) or "unknown reason"


def require_keops(what: str, device: Union[str, "torch.device", None] = "cpu") -> None:
    """Raise ``RuntimeError`` unless pykeops is usable on ``device``'s type.

    Args:
        what: the feature that needs keops, e.g. ``'cauchy_conj(backend="keops")'``.
        device: where the feature's tensors are (default the CPU).
    """
    if keops_available(device):
        return
    where = "" if _device_type(device) == "cpu" else f" on {_device_type(device)}"
    raise RuntimeError(
        f"{what} requires pykeops, but it is not usable here{where}: {keops_unavailable_reason(device)}. "
        "Fix: install pykeops (`pip install pykeops`) and a working C++ compiler (g++ or clang, "
        f"plus Python headers), unset {DISABLE_ENV_VAR}, or pass backend=\"torch\" to use the "
        "pure-PyTorch implementation."
    )


def reset_keops_cache() -> None:
    """Forget the cached probe results (for tests that toggle the environment)."""
    _AVAILABLE.clear()
    _REASON.clear()

"""Lazy detection of a working pykeops installation.

pykeops JIT-compiles every formula with the system C++ compiler the first time it is used, so
"importable" is not the same as "usable": a missing compiler or broken cache only shows up when a
kernel is built. :func:`keops_available` therefore compiles and runs one tiny complex reduction
(the same kind of formula the Cauchy/Vandermonde kernels use) and caches the verdict for the
process. Nothing here imports pykeops at module import time, so ``import lrnnx_zoo`` never pays
for (or prints) the pykeops start-up.

Set ``LRNNX_ZOO_DISABLE_KEOPS=1`` to force the pure-torch code paths.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

__all__ = [
    "DISABLE_ENV_VAR",
    "keops_available",
    "keops_unavailable_reason",
    "require_keops",
    "quiet_keops",
    "reset_keops_cache",
]

DISABLE_ENV_VAR = "LRNNX_ZOO_DISABLE_KEOPS"

# None until the probe has run; then True/False for the rest of the process.
_AVAILABLE: Optional[bool] = None
_REASON: Optional[str] = None


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


def _probe() -> tuple[bool, Optional[str]]:
    """Build and run ``sum_j v_j / (z_i - w_j)`` on 3 x 4 complex points; compare with torch."""
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
                v = torch.tensor([1.0 + 0.5j, -0.25 + 1.0j, 0.5 - 0.5j, 2.0 + 0.0j])
                w = torch.tensor([-0.5 + 1.0j, -0.5 - 1.0j, -1.0 + 0.25j, -2.0 + 0.0j])
                z = torch.tensor([0.0 + 1.0j, 1.0 + 0.0j, 0.5 - 2.0j])
                out = fn(torch.view_as_real(v), torch.view_as_real(z), torch.view_as_real(w),
                         backend="CPU")
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


def keops_available() -> bool:
    """True if pykeops can compile and run a complex Genred kernel on this machine.

    The first call may take several seconds (one kernel compilation); the verdict is cached.
    Returns False, without importing pykeops, when ``LRNNX_ZOO_DISABLE_KEOPS=1``. Never raises.
    """
    global _AVAILABLE, _REASON
    if _disabled_by_env():
        # Not cached: the env var is a live switch, so unsetting it re-enables the probe.
        return False
    if _AVAILABLE is None:
        _AVAILABLE, _REASON = _probe()
    return _AVAILABLE


def keops_unavailable_reason() -> Optional[str]:
    """Why :func:`keops_available` is False (runs the probe if needed); None when it is True."""
    if _disabled_by_env():
        return f"disabled by the environment variable {DISABLE_ENV_VAR}=1"
    if keops_available():
        return None
    return _REASON or "unknown reason"


def require_keops(what: str) -> None:
    """Raise ``RuntimeError`` unless pykeops is usable.

    Args:
        what: the feature that needs keops, e.g. ``'cauchy_conj(backend="keops")'``.
    """
    if keops_available():
        return
    raise RuntimeError(
        f"{what} requires pykeops, but it is not usable here: {keops_unavailable_reason()}. "
        "Fix: install pykeops (`pip install pykeops`) and a working C++ compiler (g++ or clang, "
        f"plus Python headers), unset {DISABLE_ENV_VAR}, or pass backend=\"torch\" to use the "
        "pure-PyTorch implementation."
    )


def reset_keops_cache() -> None:
    """Forget the cached probe result (for tests that toggle the environment)."""
    global _AVAILABLE, _REASON
    _AVAILABLE = None
    _REASON = None

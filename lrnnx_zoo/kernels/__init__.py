"""Compute kernels for SSM convolution kernels, each with a pure-torch and a pykeops backend.

Submodules (imported on demand; none of them imports pykeops at import time):

* :mod:`.cauchy` - Cauchy sums ``sum_n v_n / (z_l - w_n)`` (S4's generating function).
* :mod:`.vandermonde` - Vandermonde sums ``sum_n v_n exp(l log_lam_n)`` (S4D's kernel).
* :mod:`.keops_support` - lazy detection of a usable pykeops (``keops_available`` etc.).
"""

from .keops_support import keops_available, keops_unavailable_reason, require_keops

__all__ = ["keops_available", "keops_unavailable_reason", "require_keops"]

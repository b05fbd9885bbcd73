"""HiPPO transition matrices, their normal-plus-low-rank (NPLR) form, and dense-SSM utilities.

References:
    [HiPPO]  Gu, Dao, Ermon, Rudra, Ré. "HiPPO: Recurrent Memory with Optimal Polynomial
             Projections", NeurIPS 2020.
    [S4]     Gu, Goel, Ré. "Efficiently Modeling Long Sequences with Structured State Spaces",
             ICLR 2022.
    [HTTYH]  Gu, Johnson, Timalsina, Rudra, Ré. "How to Train Your HiPPO: State Space Models with
             Generalized Orthogonal Basis Projections", ICLR 2023.

Every measure defines a continuous-time system  x'(t) = A x(t) + B u(t)  ([S4] eq. 1) whose state
x(t) holds the coefficients of an online projection of the input history onto an orthogonal basis.

Conventions used throughout this module:

* ``transition`` returns ``(A, B)`` as torch float64 tensors, ``A: (N, N)``, ``B: (N,)``.
* ``rank_correction`` returns a real ``P: (rank, N)`` such that the *normal part*
  ``M = A + P^T P`` is normal; for every supported measure ``M = c I + S`` with ``S`` real
  skew-symmetric and ``c`` a real scalar ([S4] Theorem 1).
* ``nplr`` diagonalises ``M`` unitarily and keeps one eigenvalue of each conjugate pair
  ([S4] Sec. 3.2-3.3). With the half-size factors ``w: (N/2,)``, ``P: (rank, N/2)``,
  ``B: (N/2,)``, ``V: (N, N/2)``, re-expand with conjugates::

      V_full = cat([V, V.conj()], -1)          # (N, N), unitary
      w_full = cat([w, w.conj()])              # (N,)
      P_full = cat([P, P.conj()], -1)          # (rank, N)
      B_full = cat([B, B.conj()])              # (N,)
      A = V_full @ (diag(w_full) - P_full.mT @ P_full.conj()) @ V_full.mH      # real up to rounding
      B_original = V_full @ B_full = 2 Re(V @ B)

  i.e. ``P = (V^H P_real^T)^T`` and ``B = V^H B_real``: everything is expressed in the eigenbasis.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Literal, Optional, Union, overload

import torch
from torch import Tensor

from .discretization import bilinear_dense
from .kernels.cauchy import cauchy_conj  # noqa: F401  (seed API: the S4 helpers' Cauchy kernel lives here too)
from .shapes import broadcast_shape, integer

__all__ = [
    "cauchy_conj",
    "MEASURES",
    "NPLR_MEASURES",
    "transition",
    "rank_correction",
    "nplr",
    "bilinear",
    "power",
    "krylov",
    "LinearActivation",
    "TransposedLinear",
    "Activation",
    "get_initializer",
]

#: The S4 helpers DESIGN.md lists beside the HiPPO ones, defined by the S4 plugin
#: (``lrnnx_zoo.plugins.s4``) and importable from here too, on first use (the core imports no plugin).
_S4_HELPERS = ("LinearActivation", "TransposedLinear", "Activation", "get_initializer")


def __getattr__(name: str) -> Any:
    if name in _S4_HELPERS:
        from lrnnx_zoo.plugins.s4 import nn as s4_nn
        return getattr(s4_nn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Measures accepted by :func:`transition`.
MEASURES = ("legt", "legs", "glagt", "lagt", "tlagt", "fourier", "random", "diagonal")
#: Measures whose A is normal plus low rank (accepted by :func:`rank_correction` / :func:`nplr`
#: with a nonzero correction). ``glagt`` only qualifies with ``alpha == 0``.
NPLR_MEASURES = ("legt", "legs", "glagt", "lagt", "tlagt", "fourier")

# Minimum rank of the correction that makes A + P^T P normal.
_MIN_RANK = {"legs": 1, "legt": 2, "fourier": 1, "lagt": 1, "tlagt": 1, "glagt": 1,
             "random": 0, "diagonal": 0}

def default_rank(measure: str) -> int:
    """The low-rank correction's rank that S4 kernels take when given none: the measure's minimum for
    a normal A + P^T P (2 for legt), at least 1, and 1 for a measure HiPPO does not know (a plugin's
    initializer, checked where it is looked up). ``rank=1`` was the default for every measure, and
    ``measure="legt"`` failed with it."""
    return max(1, _MIN_RANK.get(measure, 1)) if isinstance(measure, str) else 1


_ARGS = {  # allowed measure_args and their defaults
    "legt": {}, "legs": {}, "fourier": {},
    "lagt": {"beta": 1.0}, "tlagt": {"beta": 1.0}, "glagt": {"alpha": 0.0, "beta": 0.01},
    "random": {"seed": None}, "diagonal": {"seed": None},
}


def _check_int(name: str, value: Any) -> int:
    """``value`` as a Python int (numpy integers count, :func:`~lrnnx_zoo.shapes.integer`); a TypeError
    naming ``name`` unless it is an integer (not a bool): a float N or rank was taken until torch.zeros
    refused it, with no word of which argument."""
    number = integer(value)
    if number is None:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return number


def _check_square(who: str, A: Any) -> None:
    if not isinstance(A, Tensor) or A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        got = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"{who} needs a square matrix A (..., N, N), got {got}")


def _check_like_A(who: str, A: Tensor, **tensors: Any) -> None:
    """A ValueError / TypeError naming ``who`` unless each given tensor is a tensor of A's dtype whose
    dimension -1 (``b``, ``c``, ``B``) or -2 (``v``: one vector per column) is A's N: mismatches
    failed in torch as "mat1 and mat2 shapes cannot be multiplied" or "expected m1 and m2 to have the
    same dtype", and a list as "'list' object has no attribute 'shape'"."""
    N = A.shape[-1]
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{who} needs {name} to be a torch.Tensor, got {type(t).__name__}")
        axis = -2 if name == "v" else -1
        if t.dim() < -axis or t.shape[axis] != N:
            want = "(..., N, L)" if name == "v" else "(..., N)"
            raise ValueError(f"{who} needs {name} {want} for A (..., N, N) with N={N}, got {name} {tuple(t.shape)}")
        if t.dtype != A.dtype:
            raise TypeError(f"{who} needs {name} of A's dtype {A.dtype}, got {t.dtype}; cast one of them")


def _check_elements(who: str, shape: tuple, **given: int) -> None:
    """A ValueError naming ``who`` and ``given`` when a tensor of ``shape`` it would build holds more
    than :data:`~lrnnx_zoo.base.MAX_TENSOR_ELEMENTS` elements (the layers' own bound)."""
    from .base import MAX_TENSOR_ELEMENTS     # (base imports this module's importers)
    count = math.prod(shape)
    if count > MAX_TENSOR_ELEMENTS:
        shown = ", ".join(f"{k}={v}" for k, v in given.items())
        raise ValueError(f"{who} with {shown} builds a tensor {tuple(shape)} of {count:.3g} elements, more than "
                         f"the {MAX_TENSOR_ELEMENTS:.0e} this library allows one tensor; check the sizes")


def _check_real_dtype(dtype: Any) -> None:
    """A TypeError unless dtype is a real floating torch.dtype: torch.long truncated sqrt(n + 1/2) to
    integers, and "float32" failed on a missing attribute."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a real floating torch.dtype (torch.float32 or torch.float64), got {dtype!r}")


def _check_measure(measure: str, measure_args: dict) -> dict:
    if measure not in _ARGS:
        raise ValueError(f"unknown HiPPO measure {measure!r}; valid measures: {', '.join(MEASURES)}")
    unknown = set(measure_args) - set(_ARGS[measure])
    if unknown:
        allowed = ", ".join(_ARGS[measure]) or "none"
        raise TypeError(f"measure {measure!r} got unexpected arguments {sorted(unknown)}; "
                        f"allowed: {allowed}")
    args = {**_ARGS[measure], **measure_args}
    for name in ("alpha", "beta"):
        value = args.get(name)
        if name in args and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                             or not math.isfinite(value)):
            raise TypeError(f"measure {measure!r} needs {name} to be a finite real number, got {value!r}")
    # the decay rate of the measure's A (lagt: beta; tlagt / glagt: (1 + beta) / 2) must be > 0: else
    # an unstable A came back, or S4 failed with a bare "math domain error" taking sqrt(beta / 2)
    if measure == "lagt" and not args["beta"] > 0:
        raise ValueError(f"measure 'lagt' needs beta > 0 (A = -beta tril(1) decays at rate beta), got {args['beta']}")
    if measure in ("tlagt", "glagt") and not args["beta"] > -1:
        raise ValueError(f"measure {measure!r} needs beta > -1 (its A decays at (1 + beta) / 2), got {args['beta']}")
    return args


def _generator(seed: Optional[int]) -> Optional[torch.Generator]:
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed))


def transition(measure: str, N: int, **measure_args) -> tuple[Tensor, Tensor]:
    """Continuous-time HiPPO matrices ``(A, B)`` for ``x' = A x + B u`` ([S4] eq. 1).

    Returns torch float64 tensors ``A: (N, N)``, ``B: (N,)``. Index ``n`` is the row, ``k`` the
    column; ``D = diag(sqrt(2n+1))``.

    Measures:

    * ``legs`` (scaled Legendre, [HiPPO] Theorem 2, [S4] eq. 2)::

          A_nk = -sqrt(2n+1) sqrt(2k+1)  (n > k),   -(n+1)  (n = k),   0  (n < k)
          B_n  = sqrt(2n+1)

    * ``legt`` (translated Legendre on a sliding window; [HiPPO] Theorem 1, LMU form)::

          A_nk = -1/2 sqrt(2n+1) sqrt(2k+1) * (1 if n >= k else (-1)^(n-k))
          B_n  =  1/2 sqrt(2n+1)

      This is ``T A_LMU T^{-1}``, ``T B_LMU`` with ``T = diag((-1)^n / sqrt(2n+1))`` for the LMU
      matrices (Voelker et al. 2019) with window theta = 2, i.e. the theta = 1 matrices halved:
      the normalisation used by the S4 reference implementation.
    * ``lagt`` (Laguerre, exponentially decaying measure ``beta exp(-beta y)``, [HiPPO] Theorem 1)::

          A = -beta * tril(ones(N, N)),   B = beta * ones(N)

      ``beta = 1`` is [HiPPO]'s LagT; other beta rescale time (x'(t) at rate beta).
    * ``tlagt`` (tilted Laguerre: kernel ``L_n(y) exp(-gamma y)``, gamma = (1 + beta)/2)::

          A = -gamma I - strict_tril(ones(N, N)),   B = ones(N)

      ``beta = 1`` (no tilt) coincides with ``lagt(beta=1)``.
    * ``glagt`` (generalized Laguerre ``L_n^(alpha)``, tilted as ``tlagt``, orthonormalised with
      ``h_n = sqrt(Gamma(n+alpha+1) / n!)``, [HiPPO] Appendix D.2)::

          A_nk = (-gamma [n = k] - [n > k]) h_k / h_n,   B_n = binom(n+alpha, n) / h_n

      derived from ``d/dy L_n^(alpha) = -sum_{k<n} L_k^(alpha)`` and
      ``L_n^(alpha)(0) = binom(n+alpha, n)`` (any constant input gain is left to C).
    * ``fourier`` (FouT in [HTTYH]; window [t-1, t], basis ``1, sqrt2 cos(2 pi m y),
      sqrt2 sin(2 pi m y)`` laid out as ``[c_0, cos_1, sin_1, cos_2, sin_2, ...]`` truncated to N)::

          A = S - B B^T,   S[cos_m, sin_m] = -2 pi m,   S[sin_m, cos_m] = 2 pi m
          B = [1, sqrt2, 0, sqrt2, 0, ...]

      The ``-B B^T`` term replaces the unknown u(t-1) by its reconstruction from the state.
    * ``random``: ``A_nk ~ N(0, 1/N)``, ``B_n ~ N(0, 1)`` (optional ``seed``).
    * ``diagonal``: ``A = -diag(exp(g))``, ``g_n ~ N(0, 1)``; ``B_n ~ N(0, 1)`` (optional ``seed``).

    Args:
        measure: one of :data:`MEASURES`.
        N: state size.
        **measure_args: ``beta`` for lagt/tlagt (default 1.0), ``alpha``/``beta`` for glagt
            (defaults 0.0 / 0.01), ``seed`` for random/diagonal.

    Raises:
        ValueError: unknown measure (the message lists the valid ones) or N < 1.
        TypeError: an argument the measure does not take.
    """
    args = _check_measure(measure, measure_args)
    N = _check_int("N", N)
    if N < 1:
        raise ValueError(f"N must be positive, got {N}")
    _check_elements("transition", (N, N), N=N)      # N=2**20 asked the allocator for 8.8 TB
    f64 = torch.float64
    n = torch.arange(N, dtype=f64)
    row, col = n[:, None], n[None, :]
    r = torch.sqrt(2 * n + 1)

    if measure == "legs":
        A = -r[:, None] * r[None, :] * (row > col)
        A = A - torch.diag(n + 1)
        B = r.clone()
    elif measure == "legt":
        # (-1)^(n-k) via parity: exact and avoids float powers of negative numbers.
        sign = torch.where((row - col) % 2 == 0, 1.0, -1.0).to(f64)
        pattern = torch.where(row >= col, torch.ones((), dtype=f64), sign)
        A = -0.5 * r[:, None] * pattern * r[None, :]
        B = 0.5 * r
    elif measure == "lagt":
        beta = float(args["beta"])
        A = -beta * torch.tril(torch.ones(N, N, dtype=f64))
        B = beta * torch.ones(N, dtype=f64)
    elif measure == "tlagt":
        gamma = (1.0 + float(args["beta"])) / 2
        A = -gamma * torch.eye(N, dtype=f64) - torch.tril(torch.ones(N, N, dtype=f64), -1)
        B = torch.ones(N, dtype=f64)
    elif measure == "glagt":
        alpha, beta = float(args["alpha"]), float(args["beta"])
        if alpha <= -1:
            raise ValueError(f"glagt needs alpha > -1, got {alpha}")
        gamma = (1.0 + beta) / 2
        A = -gamma * torch.eye(N, dtype=f64) - torch.tril(torch.ones(N, N, dtype=f64), -1)
        # binom(n + alpha, n) and h_n^2 = Gamma(n+alpha+1)/Gamma(n+1), in log space for large N.
        log_binom = torch.lgamma(n + alpha + 1) - torch.lgamma(n + 1) - math.lgamma(alpha + 1)
        log_h = 0.5 * (torch.lgamma(n + alpha + 1) - torch.lgamma(n + 1))
        h = torch.exp(log_h)
        A = A * h[None, :] / h[:, None]
        B = torch.exp(log_binom - log_h)
    elif measure == "fourier":
        A, B = _fourier(N)
    elif measure == "random":
        g = _generator(args["seed"])
        A = torch.randn(N, N, dtype=f64, generator=g) / math.sqrt(N)
        B = torch.randn(N, dtype=f64, generator=g)
    else:  # diagonal
        g = _generator(args["seed"])
        A = -torch.diag(torch.exp(torch.randn(N, dtype=f64, generator=g)))
        B = torch.randn(N, dtype=f64, generator=g)
    return A.contiguous(), B.contiguous()


def _fourier(N: int) -> tuple[Tensor, Tensor]:
    f64 = torch.float64
    B = torch.zeros(N, dtype=f64)
    B[0] = 1.0
    B[1::2] = math.sqrt(2.0)  # cosines sit at odd indices, sines (value 0 at y=0) at even > 0
    S = torch.zeros(N, N, dtype=f64)
    for i in range(1, N - 1, 2):
        m = (i + 1) // 2
        S[i, i + 1] = -2 * math.pi * m
        S[i + 1, i] = 2 * math.pi * m
    return S - torch.outer(B, B), B


def rank_correction(measure: str, N: int, rank: int = 1, dtype: torch.dtype = torch.float,
                    **measure_args) -> Tensor:
    """Low-rank ``P: (rank, N)`` (real, ``dtype``) with ``A + P^T P`` normal ([S4] Theorem 1).

    Closed forms (A as in :func:`transition`; rows beyond the minimal rank are zero):

    * ``legs``: ``P_n = sqrt(n + 1/2)``;  ``A + P^T P = -I/2 + skew``.
    * ``legt``: rank >= 2; ``P_0 = sqrt(n + 1/2) [n even]``, ``P_1 = sqrt(n + 1/2) [n odd]``,
      because ``A + A^T = -D (e e^T + o o^T) D`` (e, o: even/odd indicators);
      ``A + P^T P`` is skew.
    * ``fourier``: ``P = B``;  ``A + P^T P = S`` (skew).
    * ``lagt``: ``P_n = sqrt(beta/2)``;  ``A + P^T P = -(beta/2) I + skew``.
    * ``tlagt`` / ``glagt`` (alpha = 0 only): ``P_n = sqrt(1/2)``;
      ``A + P^T P = -(beta/2) I + skew``.
    * ``random`` / ``diagonal``: zeros (no normal-plus-low-rank structure is claimed).

    Raises:
        ValueError: unknown measure, ``rank`` below the measure's minimum (legt needs 2), or
            glagt with alpha != 0 (its orthonormalisation destroys the NPLR structure).
    """
    args = _check_measure(measure, measure_args)
    rank = _check_int("rank", rank)
    _check_real_dtype(dtype)
    need = _MIN_RANK[measure]
    if rank < max(need, 0) or rank < 0:
        raise ValueError(f"measure {measure!r} needs rank >= {need} for a normal A + P^T P, "
                         f"got rank={rank}")
    f64 = torch.float64
    n = torch.arange(N, dtype=f64)
    if measure == "legs":
        rows = [torch.sqrt(n + 0.5)]
    elif measure == "legt":
        p = torch.sqrt(n + 0.5)
        even = (torch.arange(N) % 2 == 0).to(f64)
        rows = [p * even, p * (1 - even)]
    elif measure == "fourier":
        rows = [_fourier(N)[1]]
    elif measure == "lagt":
        rows = [torch.full((N,), math.sqrt(float(args["beta"]) / 2), dtype=f64)]
    elif measure in ("tlagt", "glagt"):
        if measure == "glagt" and float(args["alpha"]) != 0.0:
            raise ValueError("glagt with alpha != 0 has no normal-plus-low-rank form "
                             "(its diagonal rescaling h_k/h_n breaks it); use alpha=0")
        rows = [torch.full((N,), math.sqrt(0.5), dtype=f64)]
    else:
        rows = []
    P = torch.zeros(rank, N, dtype=f64)
    if rows:
        P[: len(rows)] = torch.stack(rows)
    return P.to(dtype)


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return dtype
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _skew_eig_half(S: Tensor) -> tuple[Tensor, Tensor]:
    """Half spectrum of a real skew-symmetric ``S: (N, N)`` (N even).

    Returns ``lam: (N/2,)`` (>= 0, ascending) and ``V: (N, N/2)`` with ``S V = i V diag(lam)`` and
    ``[V, conj(V)]`` unitary. ``-iS`` is Hermitian, so ``eigh`` gives orthonormal eigenvectors
    directly (a general ``eig`` would not, for clustered eigenvalues). Eigenvectors for ``-lam``
    are taken as ``conj`` of those for ``lam``; the null space (eigenvectors of a real
    matrix with real eigenvalue) is given a real orthonormal basis and paired as (a + i b)/sqrt2.
    """
    N = S.shape[-1]
    cdt = _complex_of(S.dtype)
    lam, U = torch.linalg.eigh(-1j * S.to(cdt))
    tol = 1e3 * N * torch.finfo(S.dtype).eps * max(1.0, float(lam.abs().max()))
    pos = lam > tol
    zero = lam.abs() <= tol
    n_zero = int(zero.sum())
    if n_zero % 2 or int(pos.sum()) * 2 + n_zero != N:
        raise RuntimeError("skew-symmetric spectrum is not symmetric; cannot pair conjugates")
    halves_lam, halves_V = [], []
    if n_zero:
        Z = U[:, zero]
        # The null space of a real matrix is closed under conjugation, so Re/Im of any complex
        # basis span it over R; the SVD extracts an orthonormal real basis of it.
        Q = torch.linalg.svd(torch.cat([Z.real, Z.imag], dim=-1), full_matrices=False)[0]
        Q = Q[:, :n_zero]
        m = n_zero // 2
        halves_V.append((Q[:, :m] + 1j * Q[:, m:]) / math.sqrt(2.0))
        halves_lam.append(torch.zeros(m, dtype=S.dtype))
    halves_lam.append(lam[pos])
    halves_V.append(U[:, pos])
    return torch.cat(halves_lam), torch.cat(halves_V, dim=-1)


def nplr(measure: str, N: int, rank: int = 1, dtype: torch.dtype = torch.float,
         diagonalize_precision: bool = True,
         **measure_args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normal-plus-low-rank factors of a HiPPO matrix, halved over conjugate pairs ([S4] Sec. 3.2).

    With ``M = A + P^T P = c I + S`` (``P`` from :func:`rank_correction`, ``S`` skew), ``S`` is
    unitarily diagonalised; since A is real the spectrum is closed under conjugation and only
    the eigenvalues with ``Im >= 0`` are kept, sorted by increasing imaginary part.

    Returns (complex dtype matching ``dtype``: complex64 for float32, complex128 for float64):
        w: (N/2,) eigenvalues ``c + i lam`` of the normal part.
        P: (rank, N/2) low-rank term in the eigenbasis, ``P = (V^H P_real^T)^T``.
        B: (N/2,) input matrix in the eigenbasis, ``B = V^H B_real``.
        V: (N, N/2) eigenvectors; ``[V, conj(V)]`` is unitary.

    Rebuild (see module docstring)::

        A = V_full (diag(w_full) - P_full^T conj(P_full)) V_full^H

    with ``X_full = cat([X, conj(X)], -1)`` for V, w, P.

    Args:
        measure, N, rank, **measure_args: as in :func:`transition` / :func:`rank_correction`.
            N must be even.
        dtype: real dtype selecting the output precision.
        diagonalize_precision: eigendecompose in float64 (recommended) instead of ``dtype``.

    Raises:
        ValueError: odd N, or a measure without NPLR structure (random, diagonal).

    Computed on the CPU and returned on the default device (:func:`torch.get_default_device`): the
    eigendecomposition's checks and conjugate pairing read values, which a model built under
    ``torch.device("meta")`` (deferred initialisation, then ``load_state_dict(..., assign=True)``)
    does not have ("Tensor.item() cannot be called on meta tensors" for S4 and S4D-LegS).
    """
    _check_real_dtype(dtype)
    with torch.device("cpu"):
        w, P, B, V = _nplr(measure, N, rank, dtype, diagonalize_precision, **measure_args)
    device = torch.get_default_device()
    return w.to(device), P.to(device), B.to(device), V.to(device)


def _nplr(measure: str, N: int, rank: int, dtype: torch.dtype, diagonalize_precision: bool,
          **measure_args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`nplr` on the default device (the caller's choice)."""
    N = _check_int("N", N)
    rank = _check_int("rank", rank)    # before the cache, which takes rank=True for rank=1
    if N % 2:
        raise ValueError(f"nplr keeps one of each conjugate pair and needs an even N, got {N}")
    args = _check_measure(measure, measure_args)
    if measure not in NPLR_MEASURES:
        raise ValueError(f"measure {measure!r} has no normal-plus-low-rank structure; nplr supports "
                         f"{', '.join(NPLR_MEASURES)}")
    work = torch.float64 if diagonalize_precision else dtype
    key = (measure, N, rank, work, tuple(sorted(args.items())))
    try:
        hash(key)
    except TypeError:         # an unhashable measure argument: computed every time
        w, P_half, B_half, V = _nplr_work(measure, N, rank, work, args)
    else:
        w, P_half, B_half, V = _nplr_cached(*key)
    cdt = _complex_of(dtype)
    # copies: the cached factors stay as computed whatever a caller does with its tensors
    return w.to(cdt, copy=True), P_half.to(cdt, copy=True), B_half.to(cdt, copy=True), V.to(cdt, copy=True)


def _nplr_uncached(measure: str, N: int, rank: int, work: torch.dtype, items: tuple) -> tuple[Tensor, ...]:
    return _nplr_work(measure, N, rank, work, dict(items))


#: Each layer of a model builds the same HiPPO factors; the eigendecomposition is O(N^3) (1.1 s at
#: N=1024 here, once per layer before). A few recent (measure, N, rank, precision, args) are kept,
#: on the CPU: V is N x N/2 complex (8 MiB at N=1024).
_nplr_cached = functools.lru_cache(maxsize=4)(_nplr_uncached)


def _nplr_work(measure: str, N: int, rank: int, work: torch.dtype, measure_args: dict) -> tuple[Tensor, ...]:
    """(w, P, B, V) of :func:`nplr` in the working precision ``work``, on the CPU."""
    A, B = transition(measure, N, **measure_args)
    P = rank_correction(measure, N, rank=rank, dtype=torch.float64, **measure_args)
    M = (A + P.mT @ P).to(work)
    c = M.diagonal().mean()
    S = M - c * torch.eye(N, dtype=work)
    # Every supported measure has normal part cI + skew; check rather than trust the algebra.
    asym = (S + S.mT).abs().max() / M.abs().max().clamp_min(1.0)
    if asym > 100 * torch.finfo(work).eps * N:
        raise RuntimeError(f"A + P^T P for {measure!r} is not c I + skew (asymmetry {asym:.2e})")
    lam, V = _skew_eig_half(0.5 * (S - S.mT))
    w = torch.complex(torch.full_like(lam, float(c)), lam)
    V_h = V.mH
    P_half = (V_h @ P.to(V.dtype).mT).mT
    B_half = V_h @ B.to(V.dtype)
    return w, P_half, B_half, V


# ---------------------------------------------------------------------------------------------
# dense discretisation and powers
# ---------------------------------------------------------------------------------------------


def bilinear(dt: Union[float, Tensor], A: Tensor, B: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Bilinear (Tustin) discretisation of a dense system ([S4] eq. 3).

    ``dA = (I - dt/2 A)^{-1} (I + dt/2 A)``,  ``dB = (I - dt/2 A)^{-1} dt B``.

    Args:
        dt: step size, a float or tensor broadcastable to the batch shape ``(...,)``.
        A: (..., N, N).
        B: (..., N) or None.

    Returns:
        dA: (..., N, N) and dB: (..., N) (None if B is None). The seed's argument order for
        :func:`lrnnx_zoo.discretization.bilinear_dense` (``linalg.solve``, better conditioned
        than forming the inverse).
    """
    _check_square("bilinear", A)
    _check_like_A("bilinear", A, B=B)
    if not isinstance(dt, Tensor):
        if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not (math.isfinite(dt) and dt > 0):
            raise ValueError(f"bilinear needs dt to be a finite number > 0 (or a tensor of them), got {dt!r}")
    return bilinear_dense(A, B, dt)


@overload
def power(L: int, A: Tensor, v: None = None) -> Tensor: ...
@overload
def power(L: int, A: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


def power(L: int, A: Tensor, v: Optional[Tensor] = None) -> Tensor | tuple[Tensor, Tensor]:
    """``A^L`` by repeated squaring, optionally with the scan ``sum_{l<L} A^l v[..., l]``.

    Args:
        L: non-negative exponent.
        A: (..., N, N).
        v: optional (..., N, L): one vector per power; ``v[..., l]`` is multiplied by ``A^l``.
            (For a constant vector pass ``u[..., None].expand(..., N, L)``.)

    Returns:
        ``A^L: (..., N, N)``; with ``v`` also ``s: (..., N)`` where ``s = sum_l A^l v[..., l]``
        (batch dims of A and v broadcast). Both use O(log L) matmuls: the scan pairs neighbours,
        ``sum_l A^l v_l = sum_m (A^2)^m (v_{2m} + A v_{2m+1})``, halving the length each round
        while A is squared - the same squares the power needs.
    """
    L = _check_int("L", L)            # 2.5 failed on a slice, True was taken as 1
    if L < 0:
        raise ValueError(f"L must be non-negative, got {L}")
    _check_square("power", A)
    _check_like_A("power", A, v=v)
    N = A.shape[-1]
    result: Optional[Tensor] = None
    if v is not None and v.shape[-1] != L:
        raise ValueError(f"v must have last dim L={L}, got shape {tuple(v.shape)}")
    cur, k = A, L
    while True:
        if k & 1:
            result = cur if result is None else cur @ result
        if v is not None and v.shape[-1] > 1:
            if v.shape[-1] % 2:
                v = torch.nn.functional.pad(v, (0, 1))
            v = v[..., 0::2] + cur @ v[..., 1::2]
        k >>= 1
        if k == 0 and (v is None or v.shape[-1] <= 1):
            break
        cur = cur @ cur
    if result is None:
        result = torch.eye(N, dtype=A.dtype, device=A.device).expand_as(A).clone()
    if v is None:
        return result
    if v.shape[-1] == 0:
        s = torch.zeros(broadcast_shape(A.shape[:-1], v.shape[:-1]), dtype=v.dtype,
                        device=v.device)
    else:
        s = v[..., 0]
    return result, s


@overload
def krylov(L: int, A: Tensor, b: Tensor, c: Optional[Tensor] = None,
           return_power: Literal[False] = False) -> Tensor: ...
@overload
def krylov(L: int, A: Tensor, b: Tensor, c: Optional[Tensor], return_power: Literal[True]) -> tuple[Tensor, Tensor]: ...
@overload
def krylov(L: int, A: Tensor, b: Tensor, c: Optional[Tensor] = None, *,
           return_power: Literal[True]) -> tuple[Tensor, Tensor]: ...
@overload
def krylov(L: int, A: Tensor, b: Tensor, c: Optional[Tensor] = None,
           return_power: bool = False) -> Tensor | tuple[Tensor, Tensor]: ...


def krylov(L: int, A: Tensor, b: Tensor, c: Optional[Tensor] = None,
           return_power: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Krylov sequence ``K = [b, A b, ..., A^{L-1} b]`` by doubling ([S4] eq. 5 kernel).

    The block ``[b, ..., A^{2^j - 1} b]`` is extended by ``A^{2^j}`` times itself, so only
    O(log L) matrix products are needed.

    Args:
        L: number of terms.
        A: (..., N, N).
        b: (..., N).
        c: optional (..., N); batch dims broadcast with those of A and b.
        return_power: also return ``A^{L-1}``, the highest power in the sequence (the seed API's
            meaning; ``power(L, A)`` gives ``A^L``). L must then be >= 1.

    Returns:
        ``K: (..., N, L)`` with ``K[..., l] = A^l b``; with ``c``: ``(..., L)`` with entries
        ``c^T A^l b`` (no conjugation); plus ``A^{L-1}: (..., N, N)`` if ``return_power``.
    """
    L = _check_int("L", L)
    if L < 0 or (return_power and L < 1):
        raise ValueError(f"L must be >= {1 if return_power else 0}, got {L}")
    _check_square("krylov", A)
    _check_like_A("krylov", A, b=b, c=c)
    # the doubling's last block holds up to 2L columns: L=2**30 at N=4 ran for minutes toward 32 GB
    _check_elements("krylov", broadcast_shape(A.shape[:-1], b.shape) + (2 * L,), L=L)
    K = b[..., None]
    cur = A
    while K.shape[-1] < L:
        K = torch.cat([K, cur @ K], dim=-1)
        if K.shape[-1] < L:
            cur = cur @ cur
    K = K[..., :L]
    out = K if c is None else (c[..., None, :] @ K)[..., 0, :]
    if return_power:
        return out, power(L - 1, A)
    return out

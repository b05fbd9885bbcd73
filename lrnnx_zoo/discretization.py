"""Discretization of continuous-time linear systems  x'(t) = A x(t) + B u(t).

Every method maps (A, B, dt) to (A_bar, B_bar) such that  x_k = A_bar x_{k-1} + B_bar u_k.
Diagonal systems take A as a (complex) tensor of eigenvalues; dense systems take A as (..., N, N).

- ``zoh`` (zero-order hold, S4D paper eq. 4):   A_bar = exp(dt A),   B_bar = A^{-1} (exp(dt A) - I) B
- ``bilinear`` (Tustin, S4 paper eq. 3):        A_bar = (I - dt/2 A)^{-1} (I + dt/2 A),
                                                 B_bar = (I - dt/2 A)^{-1} dt B
- ``dirac`` (input as an impulse at each sample): A_bar = exp(dt A),   B_bar = B
- ``async`` (event-driven, per-step dt_k; LTV only): A_bar_k = exp(dt_k A), B_bar_k = dt_k B
- ``no_discretization`` (the parameters are already discrete, as in LRU): A_bar = A, B_bar = B

Resampling already-discrete diagonal systems (:func:`zoh_resample_diag`): a pole lam read as the ZOH
sampling at step dt of a continuous pole a = log(lam) / dt (the principal logarithm, Im in (-pi, pi]:
the lowest-frequency system with those samples, as MATLAB's d2c) is sampled again at dt / rate:
log lam' = log(lam) / rate,  B' = B (lam' - 1) / (lam - 1)  (ZOH above: B_d = (e^{a dt} - 1) / a B_c).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .shapes import broadcast_shape

METHODS = ("zoh", "bilinear", "dirac", "async", "no_discretization")

DiscretizeFn = Callable[[Tensor, Optional[Tensor], Tensor], "tuple[Tensor, Optional[Tensor]]"]


def _scale(B: Optional[Tensor], factor: Tensor) -> Optional[Tensor]:
    return None if B is None else factor * B


def zoh_diag(A: Tensor, B: Optional[Tensor], dt: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Zero-order hold for diagonal A.  A: (..., N) complex, B: (..., N) or None, dt broadcastable."""
    dtA = dt * A
    A_bar = torch.exp(dtA)
    # (exp(dtA) - 1) / A, written with expm1 so that eigenvalues near 0 keep their precision;
    # at exactly 0 its limit dt (a safe denominator keeps NaN out of the unused branch's gradient).
    zero = A == 0
    ratio = torch.expm1(dtA) / torch.where(zero, torch.ones_like(A), A)
    return A_bar, _scale(B, torch.where(zero, dt * torch.ones_like(dtA), ratio))


def valid_rate(rate: object) -> bool:
    """Whether ``rate`` is a finite number > 0 (not a bool). Comparisons, not math.isfinite (NaN fails
    both): under torch.compile(dynamic=True) a float default argument (rate=1.0) arrives symbolic, and
    math.isfinite of it broke the graph at every kernel."""
    try:
        return not isinstance(rate, bool) and 0 < rate < math.inf      # type: ignore[operator]
    except (TypeError, ValueError, RuntimeError):     # not a number; a tensor of several values
        return False


def principal_log(log_lam: Tensor) -> Tensor:
    """The principal logarithm of exp(log_lam): Re kept, Im wrapped into (-pi, pi].  log_lam: (...) complex.

    Im - 2 pi ceil((Im - pi) / (2 pi)): one subtraction of a multiple of 2 pi, so an Im already in
    (-pi, pi] comes back bit for bit (atan2(sin, cos) would round it)."""
    turns = torch.ceil((log_lam.imag - math.pi) / (2 * math.pi))
    return torch.complex(log_lam.real, log_lam.imag - 2 * math.pi * turns)


def zoh_resample_diag(log_lam: Tensor, B: Optional[Tensor], rate: float) -> tuple[Tensor, Optional[Tensor]]:
    """A discrete diagonal system read as the ZOH sampling (:func:`zoh_diag`) at step dt of a
    continuous one, sampled again at dt / ``rate`` (rate samples per old sample).

    With a = principal_log(log lam) / dt (the band-limited continuous pole) and B = (e^{a dt} - 1) / a B_c:

        log lam' = principal_log(log lam) / rate,      B' = B expm1(log lam') / expm1(log lam)

    (dt cancels). expm1 keeps a slow pole's ratio exact: (lam' - 1) / (lam - 1) at |1 - lam| = 1e-6
    loses ~1e-10 to cancellation in float64. The new phase may be negative (a phase in (pi, 2 pi) is
    the negative frequency phase - 2 pi) or, for rate < 1, beyond pi: a mode above the new Nyquist
    frequency, which later samples cannot tell from its principal alias.

    Args:
        log_lam: (..., N) complex, log of the poles (any branch: only exp(log_lam) is read).
        B: input matrix broadcastable against log_lam (e.g. (..., H, N) for (N,) poles), or None.
        rate: a finite number > 0 (0 and NaN gave non-finite poles, -1 an unstable |lam'| = 5.8).
    Returns:
        (log lam', B'): log_lam's shape and the broadcast shape, complex128 (computed in float64).
    """
    if not valid_rate(rate):
        raise ValueError(f"zoh_resample_diag needs rate to be a finite number > 0, got {rate!r}")
    log_lam = principal_log(log_lam.to(torch.complex128))
    new = log_lam / rate
    if B is None:
        return new, None
    return new, B.to(torch.complex128) * (torch.expm1(new) / torch.expm1(log_lam))


def bilinear_diag(A: Tensor, B: Optional[Tensor], dt: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Bilinear transform for diagonal A.  A: (..., N), B: (..., N) or None."""
    denom = 1.0 - 0.5 * dt * A
    return (1.0 + 0.5 * dt * A) / denom, _scale(B, dt / denom)


def dirac_diag(A: Tensor, B: Optional[Tensor], dt: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Impulse-input discretization for diagonal A: the state jumps by B u_k at each sample.
    A: (..., N) complex, B: (..., N) or None, dt broadcastable: A_bar = exp(dt A), B_bar = B."""
    return torch.exp(dt * A), B


def async_diag(A: Tensor, B: Optional[Tensor], dt: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Event-driven discretization with a per-step dt_k (arXiv:2404.18508): dt: (..., L, 1)."""
    return torch.exp(dt * A), _scale(B, dt)


def identity(A: Tensor, B: Optional[Tensor], dt: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Parameters that are already discrete (LRU) pass through unchanged."""
    return A, B


def _dt_matrix(dt, A: Tensor) -> Tensor:
    """dt of shape (...) as (..., 1, 1), so it scales whole matrices."""
    dt = torch.as_tensor(dt, dtype=A.real.dtype, device=A.device)
    return dt.reshape(dt.shape + (1, 1))


#: 1 / k! for the degree-12 Taylor polynomial of :func:`matrix_exp`.
_TAYLOR = [1.0 / math.factorial(k) for k in range(13)]


def matrix_exp(X: Tensor) -> Tensor:
    """exp(X) for X: (..., n, n).

    Under eager autograd by scaling and squaring: Y = X / 2^s with ||Y||_1 <= 1/2 over the batch, the
    degree-12 Taylor polynomial of exp(Y) (remainder below 3e-14 relative; Paterson-Stockmeyer: the
    powers Y..Y^4, then Horner in Y^4, 6 products), squared s times. Autograd then differentiates
    matrix products, where torch's matrix_exp backward exponentiates a 2n x 2n block matrix: at
    (128, 65, 65) float64 (an S4 zoh layer's discretisation, H=128, N=64) forward 38 -> 31 ms, backward
    232 -> 51 ms, values and gradients within 3e-14 relative of torch's. Elsewhere (no autograd,
    torch.func transforms, compiled graphs, meta, non-finite or empty X) torch.linalg.matrix_exp.
    """
    from .base import func_transforms_active          # (base imports this module)
    if (not (X.requires_grad and torch.is_grad_enabled()) or X.numel() == 0 or X.is_meta
            or torch.compiler.is_compiling() or func_transforms_active()):
        return torch.linalg.matrix_exp(X)
    norm = X.detach().abs().sum(-2).amax().item()                 # the largest 1-norm in the batch
    if not math.isfinite(norm):
        return torch.linalg.matrix_exp(X)
    s = max(0, math.ceil(math.log2(2 * norm))) if norm > 0 else 0
    Y = X / 2 ** s
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device).expand_as(X)
    powers = [eye, Y]
    for _ in range(3):
        powers.append(powers[-1] @ Y)
    result = _TAYLOR[12] * eye
    for j in (2, 1, 0):
        chunk = sum(_TAYLOR[4 * j + i] * powers[i] for i in range(4))
        result = chunk + powers[4] @ result
    for _ in range(s):
        result = result @ result
    return result


def zoh_dense(A: Tensor, B: Optional[Tensor], dt: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Zero-order hold for dense A: (..., N, N), B: (..., N) or (..., N, M), dt: (...,).

    Uses the block-matrix exponential  exp([[A, B], [0, 0]] dt) = [[A_bar, B_bar], [0, I]]
    (Van Loan 1978), which stays exact when A is singular.
    """
    N = A.shape[-1]
    vec = B is not None and B.dim() == A.dim() - 1
    Bm = None if B is None else (B.unsqueeze(-1) if vec else B)
    M = 0 if Bm is None else Bm.shape[-1]
    dt = _dt_matrix(dt, A)
    block = A.new_zeros(broadcast_shape(A.shape[:-2], dt.shape[:-2]) + (N + M, N + M))
    block[..., :N, :N] = A * dt
    if Bm is not None:
        block[..., :N, N:] = Bm * dt
    E = matrix_exp(block)
    A_bar = E[..., :N, :N]
    if Bm is None:
        return A_bar, None
    B_bar = E[..., :N, N:]
    return A_bar, (B_bar.squeeze(-1) if vec else B_bar)


def bilinear_dense(A: Tensor, B: Optional[Tensor], dt: Union[float, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Bilinear transform for dense A: (..., N, N), B: (..., N) or None, dt: a float or (...,)."""
    N = A.shape[-1]
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    dt = _dt_matrix(dt, A)
    left = eye - 0.5 * dt * A
    A_bar = torch.linalg.solve(left, eye + 0.5 * dt * A)
    if B is None:
        return A_bar, None
    vec = B.dim() == A.dim() - 1
    rhs = (B.unsqueeze(-1) if vec else B) * dt
    B_bar = torch.linalg.solve(left, rhs)
    return A_bar, (B_bar.squeeze(-1) if vec else B_bar)


def dirac_dense(A: Tensor, B: Optional[Tensor], dt: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Impulse-input discretization for dense A: (..., N, N), B: (..., N), (..., N, M) or None,
    dt: a float or (...,): A_bar = exp(dt A), B_bar = B (returned as given)."""
    return torch.linalg.matrix_exp(A * _dt_matrix(dt, A)), B


def async_dense(A: Tensor, B: Optional[Tensor], dt: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Event-driven discretization for dense A (arXiv:2404.18508): A: (..., N, N), B: (..., N),
    (..., N, M) or None, dt: (...,), one step per leading index (e.g. A: (L, N, N) and dt: (L,) for
    L events): A_bar = exp(dt A), B_bar = dt B, both of A's and B's shapes."""
    A_bar, _ = dirac_dense(A, None, dt)
    dt = torch.as_tensor(dt, dtype=A.dtype, device=A.device)
    return A_bar, None if B is None else B * dt.reshape(dt.shape + (1,) * (B.dim() - dt.dim()))


_DIAGONAL = {"zoh": zoh_diag, "bilinear": bilinear_diag, "dirac": dirac_diag,
             "async": async_diag, "no_discretization": identity}
_DENSE = {"zoh": zoh_dense, "bilinear": bilinear_dense, "dirac": dirac_dense,
          "async": async_dense, "no_discretization": identity}


def get_discretization(method: Optional[str], structure: str = "diagonal") -> Optional[DiscretizeFn]:
    """Return the discretization function ``fn(A, B, dt) -> (A_bar, B_bar)``.

    ``method`` is one of :data:`METHODS` or None (the layer discretizes itself);
    ``structure`` is ``"diagonal"`` (A holds eigenvalues) or ``"dense"`` (A is a matrix).
    """
    if method is None:
        return None
    table = {"diagonal": _DIAGONAL, "dense": _DENSE}.get(structure)
    if table is None:
        raise ValueError(f"structure must be 'diagonal' or 'dense', got {structure!r}")
    if method not in table:
        raise ValueError(f"unknown discretization {method!r}; expected one of {', '.join(METHODS)} or None")
    return table[method]


def discretize(method: str, A: Tensor, B: Optional[Tensor], dt: Tensor,
               structure: str = "diagonal") -> tuple[Tensor, Optional[Tensor]]:
    """Discretize (A, B) with step ``dt`` by ``method``; see the module docstring for the formulas."""
    fn = get_discretization(method, structure)
    assert fn is not None
    return fn(A, B, dt)

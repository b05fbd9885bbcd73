"""Step modes of the NPLR system: dense, linear (DPLR bilinear step) and diagonal.

All three are exact re-expressions of one discretised system, built in float64 and handed out as
real :class:`~lrnnx_zoo.step_forms.StepForm` modules (ONNX has no complex dtype):

* dense:    ``ChannelDenseStepForm`` on the real coordinates r = [Re x, Im x] of
            :mod:`plugins.s4.dense`: r' = A_bar_r r + b_bar_r u, O(N^2) per step.
* linear:   ``ChannelDPLRStepForm`` (core step_forms), the bilinear step in NPLR form ([S4] Sec. 3.3,
            Theorem 2): x' = A1 (A0 x + 2 B u) with A0 = 2/dt + A and A1 = (2/dt - A)^{-1} by
            Woodbury, O(N r) per step. Bilinear only (exp(dt A) has no NPLR form).
* diagonal: ``ChannelDiagonalStepForm`` in the eigenbasis of the *discretised* dense A_bar_r
            (eig in float64), with B and C rotated into it; O(N) per step. The eigenbasis of
            HiPPO matrices is exponentially ill-conditioned (LegS: cond(V) ~ 1e15 at N=64), so the
            builder predicts the float32 error and refuses above a tolerance.

State layouts (per batch row): dense ``[h][Re x_h (M), Im x_h (M)]`` (H*N floats); linear and
diagonal the channels-last modal layout of ``step_forms.pack_modes``, of x (linear) or of
z = V^{-1} r, the eigen-coordinates (diagonal).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from lrnnx_zoo.kernels.vandermonde import vandermonde_torch
from lrnnx_zoo.step_forms import ChannelDenseStepForm, ChannelDiagonalStepForm, ChannelDPLRStepForm

from . import dense

__all__ = ["ChannelDPLRStepForm", "dense_form", "linear_form", "diagonal_form", "DiagonalAccuracyError"]


# ---------------------------------------------------------------------------------------------
# builders: float64 (w, P, B, C, dt) of one rate -> real step forms
# ---------------------------------------------------------------------------------------------

def dense_form(A_bar: Tensor, b_bar: Tensor, c: Tensor, D: Optional[Tensor] = None) -> ChannelDenseStepForm:
    """Dense real form. A_bar: (H, N, N), b_bar: (H, N), c: (Ch, H, N) real coordinates (float64)."""
    return ChannelDenseStepForm(A_bar, b_bar, c, None if D is None else D.double())


def linear_form(w: Tensor, P: Tensor, B: Tensor, C: Tensor, dt: Tensor, D: Optional[Tensor] = None
                ) -> ChannelDPLRStepForm:
    """Bilinear NPLR step x' = A1 (A0 x + 2 B u)  ([S4] Theorem 2).

    A0 = 2/dt I + A:  d0 = 2/dt + w,  U0 = P,  G0 = 2 conj P   (A x = w x - P 2Re(conj P . x)).
    A1 = (2/dt I - A)^{-1} = (D^{-1} + P_full Q^T)^{-1} with D = diag(1/(2/dt - w)):
    Woodbury gives A1 v = D v - D P (I + Q^T D P)^{-1} Q^T D v, where on the halved state
    Q^T D v = 2 Re(conj P . (d v)) and (I + Q^T D P)_{rs} = delta_rs + 2 Re(sum_n conj P_rn d_n P_sn)
    (a real r x r matrix M). So d1 = d, G1 = 2 conj(P) d, U1 = M^{-T} (d P).

    Args: w (H, M), P (r, H, M), B (H, M), C (Ch, H, M) true output matrix, dt (H,), all float64/complex128.
    """
    Ph = P.transpose(0, 1)                                                   # (H, r, M)
    two_dt = (2 / dt).unsqueeze(-1)
    d = 1 / (two_dt - w)
    dP = d.unsqueeze(-2) * Ph                                                # (H, r, M)
    Mw = torch.eye(P.shape[0], dtype=dt.dtype, device=dt.device) \
        + 2 * (Ph.conj().unsqueeze(-2) * dP.unsqueeze(-3)).sum(-1).real       # (H, r, r)
    U1 = torch.linalg.solve(Mw.transpose(-1, -2).to(Ph.dtype), dP)                     # (H, r, M)
    return ChannelDPLRStepForm(two_dt + w, Ph, 2 * Ph.conj(), 2 * B, d, U1, 2 * Ph.conj() * d.unsqueeze(-2),
                               2 * C, None if D is None else D.double())


class DiagonalAccuracyError(ValueError):
    """The diagonal form of this system cannot reach the requested accuracy in its storage precision.

    Raised with the predicted error, the tolerance and the eigenvectors V (H, N, N), the message (which
    names V's condition number) is written when shown: "auto" mode catches it and builds another
    form, and the condition numbers cost 0.12 s per S4 layer at H=128, N=64 (a fifth of the step
    form's build) for a message nobody read."""

    def __init__(self, message: Optional[str] = None, *, error: float = math.nan, tol: float = math.nan,
                 V: Optional[Tensor] = None, precision: torch.dtype = torch.float32) -> None:
        super().__init__(message)
        self.error, self.tol, self.V, self.precision = error, tol, V, precision

    def __str__(self) -> str:
        if self.V is None:
            return super().__str__()
        off = (f"off by ~{self.error:.1e} relative" if math.isfinite(self.error) else
               "off by an amount it cannot predict (poles that round to zero)")
        return (f"the diagonal step mode would be {off} in {self.precision} (tolerance "
                f"{self.tol:.0e}): the "
                f"eigenvectors of the discretised A are ill-conditioned (cond {float(torch.linalg.cond(self.V).max()):.1e}), "
                f"as for HiPPO LegS/LegT/LagT matrices beyond N~8, whose modes cancel by many orders of magnitude. "
                f"Use mode='linear' (exact, O(N) per step) or mode='dense', or pass tol=math.inf to build it anyway")


def diagonal_form(A_bar: Tensor, b_bar: Tensor, c: Tensor, D: Optional[Tensor] = None, tol: float = 1e-4,
                  check_length: int = 1024, precision: torch.dtype = torch.float32
                  ) -> Tuple[ChannelDiagonalStepForm, float, Tensor]:
    """Diagonal form from the eigendecomposition of the discretised A_bar_r (float64).

    A_bar = V diag(lam) V^{-1};  z = V^{-1} r;  b' = V^{-1} b_bar,  c' = c V, so y = Re(c' . z').
    Returns (form, predicted error, V (H, N, N)).

    The predicted relative error (returned) of the form stored in ``precision`` (float32 or
    float64) is the larger of
    (i) the kernel error of the rounded (lam, b', c') over ``check_length`` steps against the exact
        dense kernel, and (ii) the rounding of the state, amplified by the cancellation among the
        modes: eps * sum_n |c'_n b'_n| sum_l |lam_n|^(2l) / ||K||_2 per channel.
    Both depend only on the eigenvalues and residues c'_n b'_n, which every diagonal realisation
    shares. Calibrated on LegS/LegT/LagT/Fourier systems at L=1024: (ii) bounds the measured step
    error within a factor 2-10.

    Raises:
        DiagonalAccuracyError: if the prediction exceeds ``tol`` (``tol=math.inf`` skips the check).
    """
    if A_bar.shape[0] > 1 and not math.isinf(tol):
        # One channel first: the prediction is the worst channel's, so one that fails decides, and
        # HiPPO systems (LegS, N=64) fail in every channel: "auto" then spends 1/H of the
        # eigendecompositions (0.3 s per layer at H=128) before it builds the linear form.
        diagonal_form(A_bar[:1], b_bar[:1], c[:, :1], None, tol, check_length, precision)
    # A channel whose entries are all tiny (zoh at dt ~ 300: 1e-149 .. 1e-138) is scaled by a power of
    # two first: LAPACK's eig of it corrupted the heap and aborted the process ("double free or
    # corruption"), or failed to converge. Others are not (a scale changes eig's rounding).
    top = A_bar.abs().amax((-2, -1), keepdim=True)
    exponent = torch.frexp(top.clamp_min(1e-300))[1] - 1
    exponent = torch.where(top < 2.0 ** -64, exponent, torch.zeros_like(exponent))
    scale = torch.ldexp(torch.ones_like(top), exponent)
    try:
        lam, V = torch.linalg.eig(A_bar / scale)                              # (H, N), (H, N, N)
        lam = lam * scale[..., 0]
    except RuntimeError as exc:     # LinAlgError: no convergence (a nearly defective A_bar, e.g. zoh at dt ~ 300)
        if math.isinf(tol):
            raise
        raise DiagonalAccuracyError(f"the eigendecomposition of A_bar failed ({exc}); no diagonal form",
                                    tol=tol, precision=precision) from exc
    b_d = torch.linalg.solve(V, b_bar.to(V.dtype).unsqueeze(-1)).squeeze(-1)   # (H, N)
    c_d = (c.to(V.dtype).unsqueeze(-2) @ V).squeeze(-2)                        # (Ch, H, N)
    form = ChannelDiagonalStepForm(lam, b_d, c_d, None if D is None else D.double())
    if math.isinf(tol):
        return form, float("nan"), V
    err = diagonal_error(A_bar, b_bar, c, lam, b_d, c_d, check_length, precision)
    if not err <= tol:      # NaN too: poles that round to 0 (zoh, dt ~ 100) have no log, and passed as NaN > tol
        # was False: a float64 Fourier S4 at dt=200 streamed 7.7e10 off its forward
        raise DiagonalAccuracyError(error=err, tol=tol, V=V, precision=precision)
    return form, err, V


@torch.no_grad()
def diagonal_error(A_bar: Tensor, b_bar: Tensor, c: Tensor, lam: Tensor, b_d: Tensor, c_d: Tensor, L: int,
                   precision: torch.dtype = torch.float32) -> float:
    """Predicted relative error of a diagonal form stored in ``precision`` (see :func:`diagonal_form`)."""
    ref = dense.two_level_kernel(A_bar, b_bar, c, L)                              # (Ch, H, L) float64
    cdtype = torch.complex128 if precision == torch.float64 else torch.complex64
    r32 = lambda t: t.to(cdtype).to(torch.complex128)                            # noqa: E731 - rounding as stored
    lam32, v32 = r32(lam), r32(c_d) * r32(b_d)
    K = vandermonde_torch(v32, torch.log(lam32).expand_as(v32), L, conj=False).real
    scale = ref.abs().amax().clamp_min(1e-300)
    kernel_err = float((K - ref).abs().amax() / scale)
    mag2 = lam.abs().clamp(max=1.0).square()
    steps = torch.where(mag2 < 1, (1 - mag2 ** L) / (1 - mag2).clamp_min(1e-300), torch.full_like(mag2, float(L)))
    norm = ref.square().sum(-1).sqrt()                                            # (Ch, H)
    norm = norm.clamp_min(1e-3 * float(norm.max()) + 1e-300)
    state_err = float((torch.finfo(precision).eps * ((c_d * b_d).abs() * steps).sum(-1) / norm).amax())
    return max(kernel_err, state_err)

"""S4 Algorithm 1: the bilinear NPLR kernel from its truncated generating function.

For one channel with  A = Lambda - P Q^*  (Q = conj P, conjugate-pair halving as in
:mod:`plugins.s4.dense`) and the bilinear discretisation ([S4] eq. 3), the kernel
K_l = C^T A_bar^l B_bar (l < L) has the truncated generating function (Algorithm 1, step 1)

    K^(z) = sum_{l<L} K_l z^l = C~^T (I - A_bar z)^{-1} B_bar  at z^L = 1,   C~ = (I - A_bar^L)^T C.

Inserting the bilinear A_bar, B_bar:

    K^(z) = 2/(1+z) C~^T (g(z) - A)^{-1} B,    g(z) = 2/dt (1-z)/(1+z),

and Woodbury (step 3) reduces the resolvent of Lambda - P Q^* to Cauchy sums over Lambda
(step 2):  k_ab = sum_n a_n b_n / (g - lambda_n)  for a in {C~, Q}, b in {B, P}:

    K^(z) = 2/(1+z) [k00 - k01 (I + k11)^{-1} k10].

Evaluated at the roots of unity z_k = exp(-2 pi i k/L), K^ is the DFT of K, so K = irfft (step 4);
K is real, so only the L/2+1 non-redundant nodes are computed. Two rewrites keep the Cauchy nodes
shared by all channels and finite:

* g(z_k) = (2/dt) zeta_k with zeta_k = i tan(pi k/L); hence 1/(g - lambda) = (dt/2)/(zeta - lambda dt/2):
  the Cauchy sums use nodes zeta_k and poles lambda dt/2, and 2/(1+z) k = dt/(1+z) S.
* z = -1 (k = L/2, even L) is the pole of g; there K^(-1) = (dt/2) C~^T B directly
  (the resolvent factor ((1-z) - dt/2 (1+z) A)^{-1} becomes I/2).

State passing uses the same sums: the zero-input response from x_{-1}, y_l = C^T A_bar^{l+1} x_{-1},
has generating function 2/(1+z) C~^T (g - A)^{-1} s with s = x/dt + A x/2, i.e. B replaced by s.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["bilinear_kernel", "apply_A", "REFINE_AMPLIFICATION"]

Cauchy = Callable[[Tensor, Tensor, Tensor], Tensor]

#: Where the Woodbury correction k01 (I + k11)^{-1} k10 is this many times larger than the kernel
#: sample it leaves, float32 loses ~log10 of it in digits (measured: a channel's relative error is
#: at most ~1e-7 times this amplification), and those channels are recomputed in float64. Poles on
#: the imaginary axis (the Fourier measure) amplify by up to ~3e4 and moved float32 kernels by up
#: to 1e-3 per channel (2.1e-4 of the whole kernel at N=4, L=64); LegS stays below ~90 at any
#: length and never pays; LegT channels reach ~2e3 at N=64 and the worst of them are refined.
REFINE_AMPLIFICATION = 200.0


def apply_A(w: Tensor, P: Tensor, x: Tensor) -> Tensor:
    """A x in the halved basis:  w x - sum_r P_r 2 Re(conj(P_r) . x).   w: (H, M), P: (r, H, M), x: (..., H, M)."""
    rho = 2 * (P.conj() * x.unsqueeze(-3)).sum(-1).real          # (..., r, H)
    return w * x - (rho.unsqueeze(-1) * P).sum(-3)


def _nodes(L: int, real_dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor]:
    """zeta_k = i tan(pi k/L) and 1/(1+z_k) for k < ceil(L/2), formed in float64."""
    k = torch.arange((L + 1) // 2, dtype=torch.float64, device=device)
    theta = math.pi * k / L
    zeta = torch.complex(torch.zeros_like(theta), torch.tan(theta))
    # 1 + exp(-2i theta) = 2 cos(theta) exp(-i theta)
    inv_1pz = torch.polar(0.5 / torch.cos(theta), theta)
    cdt = torch.complex128 if real_dtype == torch.float64 else torch.complex64
    return zeta.to(cdt), inv_1pz.to(cdt)


def bilinear_kernel(w: Tensor, P: Tensor, B: Tensor, Ct: Tensor, dt: Tensor, L: int, cauchy: Cauchy,
                    state: Optional[Tensor] = None, exact: Optional[Sequence[Tensor]] = None,
                    refine: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """Algorithm 1 for H channels.

    Args:
        w: (H, M) eigenvalues of the normal part.  P: (r, H, M).  B: (H, M).
        Ct: (C, H, M) C~ for length L (step 1).  dt: (H,) real step.  L: kernel length.
        cauchy: a ``("cauchy", name)`` backend, ``fn(v (..., M), z (K,), w (..., M)) -> (..., K)``.
        state: (Bs, H, M) x_{-1}, or None.
        exact: (w, P, B, Ct, dt) formed in float64 from the same parameters, for the channels a
            float32 evaluation cannot resolve (:data:`REFINE_AMPLIFICATION`); None: the float32
            inputs cast up (then dt's float32 rounding, which moves poles sitting 1e-7 from a node
            by as much as their distance, stays in).
        refine: False keeps every channel in the inputs' precision.
    Returns:
        K: (C, H, L) real;  K_state: (Bs, C, H, L) real or None.
    """
    C, r = Ct.shape[0], P.shape[0]
    # Channel-major layout (H first) keeps the Cauchy output and the irfft input contiguous.
    half = (dt / 2)[:, None, None]                                # (H, 1, 1)
    right = [B.unsqueeze(0), P]
    if state is not None:
        s = state.to(w.dtype) / dt.unsqueeze(-1) + apply_A(w, P, state.to(w.dtype)) / 2   # (Bs, H, M)
        right.append(s)
    left = torch.cat([Ct, P.conj()], dim=0).transpose(0, 1)       # (H, C + r, M)
    right_t = torch.cat(right, dim=0).transpose(0, 1)             # (H, 1 + r + Bs, M)
    v = left.unsqueeze(2) * right_t.unsqueeze(1)                  # (H, C + r, 1 + r + Bs, M)
    zeta, inv_1pz = _nodes(L, dt.dtype, dt.device)
    S = cauchy(v, zeta, (w * half.squeeze(-1)).unsqueeze(1).unsqueeze(1))   # (H, C + r, 1 + r + Bs, K)

    S_c, S_q = S[:, :C], S[:, C:]                                 # rows C~ / rows Q
    S01, S11 = S_c[:, :, 1:1 + r], S_q[:, :, 1:1 + r]             # (H, C, r, K), (H, r, r, K)
    if state is None:                                             # the B (and s) columns
        lhs, rhs = S_c[:, :, :1], S_q[:, :, :1]                   # C~^T R B: (H, C, 1, K);  Q^T R B
    else:
        cols = [0] + list(range(1 + r, S.shape[2]))
        lhs, rhs = S_c[:, :, cols], S_q[:, :, cols]               # C~^T R [B, s]: (H, C, 1+Bs, K);  Q^T R [B, s]
    h = half.to(S.dtype)                                          # R = (dt/2) S, so k = h S
    if r == 1:
        corr = S01[:, :, :1] * (h * rhs[:, 0] / (1 + h * S11[:, 0, :1])).unsqueeze(1)
    else:
        eye = torch.eye(r, dtype=S.dtype, device=S.device)
        hh = h.unsqueeze(-1)                                      # (H, 1, 1, 1)
        Mw = eye + hh * S11.permute(0, 3, 1, 2)                   # (H, K, r, r): I + k11 (rows Q, cols P)
        X = torch.linalg.solve(Mw, hh * rhs.permute(0, 3, 1, 2))  # (H, K, r, 1 + Bs)
        corr = torch.einsum("hcsk,hksj->hcjk", S01, X)
    resolvent = lhs - corr
    redo = _ill_conditioned(corr, resolvent) if refine else None
    Khat = resolvent * (dt.unsqueeze(-1) * inv_1pz)[:, None, None]        # dt/(1+z) [...]: (H, C, 1+Bs, K)
    if L % 2 == 0:                                                # Nyquist node z = -1
        num = torch.cat(right[:1] + right[2:], dim=0).transpose(0, 1)      # (H, 1 + Bs, M): [B, s]
        nyq = dt[:, None, None] * (left[:, :C].unsqueeze(2) * num.unsqueeze(1)).sum(-1).real   # (H, C, 1 + Bs)
        Khat = torch.cat([Khat, nyq.to(Khat.dtype).unsqueeze(-1)], dim=-1)
    K = torch.fft.irfft(Khat, n=L, dim=-1)                        # (H, C, 1 + Bs, L)
    if redo is not None:                                          # float64 for the channels float32 cannot resolve
        c128 = torch.complex128
        w64, P64, B64, Ct64, dt64 = exact if exact is not None else (w, P, B, Ct, dt)
        K64, K64_state = bilinear_kernel(w64[redo].to(c128), P64[:, redo].to(c128), B64[redo].to(c128),
                                         Ct64[:, redo].to(c128), dt64[redo].double(), L, cauchy,
                                         None if state is None else state[:, redo].to(c128))
        parts = [K64.transpose(0, 1).unsqueeze(2)] + ([] if state is None else [K64_state.permute(2, 1, 0, 3)])
        K = K.index_copy(0, redo, torch.cat(parts, dim=2).to(K.dtype))     # back in K's (H, C, 1 + Bs, L) layout
    K_state = K[:, :, 1:].permute(2, 1, 0, 3) if state is not None else None
    return K[:, :, 0].transpose(0, 1).contiguous(), K_state


def _ill_conditioned(corr: Tensor, resolvent: Tensor) -> Optional[Tensor]:
    """Indices of the channels whose float32 Woodbury step cancels more than REFINE_AMPLIFICATION
    allows (max over nodes of |correction| / max |result|), or None. corr, resolvent: (H, ...).

    The choice depends on the values, so it is skipped where values are not known: while
    torch.compile traces (a compiled S4 kernel stays float32 throughout) and on the meta device."""
    if corr.dtype != torch.complex64 or corr.numel() == 0 or corr.device.type == "meta" \
            or torch.compiler.is_compiling():
        return None
    with torch.no_grad():
        amp = corr.abs().flatten(1).amax(1) / resolvent.abs().flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny)
        redo = (amp > REFINE_AMPLIFICATION).nonzero().flatten()
    return redo if redo.numel() else None

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

from lrnnx_zoo.base import vmap_active

__all__ = ["bilinear_kernel", "apply_A", "REFINE_AMPLIFICATION"]

Cauchy = Callable[[Tensor, Tensor, Tensor], Tensor]

#: Where the Woodbury correction k01 (I + k11)^{-1} k10 at a node is this many times larger than
#: the channel's largest kernel sample, float32 loses ~log10 of it in digits (measured: a channel's
#: relative error is at most ~1e-7 times this amplification), and that (channel, node) entry is
#: recomputed in float64. Poles on the imaginary axis (the Fourier measure) amplify by up to ~3e4 at
#: the nodes next to each pole and moved float32 kernels by up to 1e-3 per channel (2.1e-4 of the
#: whole kernel at N=4, L=64). Gradients are more sensitive than values (squared denominators), so
#: the bar is low: at 200 Fourier's w gradient stayed 7e-4 and LegS's log_dt gradient 8e-4 off at
#: H=32, N=64, L=4096; at 20 they are 2.5e-5 and 5.5e-5, refining 0.4% and 0.01% of the nodes.
REFINE_AMPLIFICATION = 20.0


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
                    state: Optional[Tensor] = None, exact: Optional[Callable[[], Sequence[Tensor]]] = None,
                    refine: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """Algorithm 1 for H channels.

    Args:
        w: (H, M) eigenvalues of the normal part.  P: (r, H, M).  B: (H, M).
        Ct: (C, H, M) C~ for length L (step 1).  dt: (H,) real step.  L: kernel length.
        cauchy: a ``("cauchy", name)`` backend, ``fn(v (..., M), z (K,), w (..., M)) -> (..., K)``.
        state: (Bs, H, M) x_{-1}, or None.
        exact: returns (w, P, B, Ct, dt) formed in float64 from the same parameters, for the
            nodes a float32 evaluation cannot resolve (:data:`REFINE_AMPLIFICATION`); called only
            when there are some. None: the float32 inputs cast up (then dt's float32 rounding,
            which moves poles sitting 1e-7 from a node by as much as their distance, stays in).
        refine: False keeps every node in the inputs' precision.
    Returns:
        K: (C, H, L) real;  K_state: (Bs, C, H, L) real or None.
    """
    C, r = Ct.shape[0], P.shape[0]
    # Channel-major layout (H first) keeps the Cauchy output and the irfft input contiguous.
    half = (dt / 2)[:, None, None]                                # (H, 1, 1)
    left, right_t, num = _numerators(w, P, B, Ct, dt, state)
    v = left.unsqueeze(2) * right_t.unsqueeze(1)                  # (H, C + r, 1 + r + Bs, M)
    zeta, inv_1pz = _nodes(L, dt.dtype, dt.device)
    S = cauchy(v, zeta, (w * half.squeeze(-1)).unsqueeze(1).unsqueeze(1))   # (H, C + r, 1 + r + Bs, K)
    lhs, corr = _woodbury(S, C, r, half)
    resolvent = lhs - corr                                        # (k00 - k01 (I + k11)^{-1} k10) / h
    if refine:
        resolvent = _refine_nodes(resolvent, corr, exact or (lambda: (w, P, B, Ct, dt)), state, L)
    Khat = resolvent * (dt.unsqueeze(-1) * inv_1pz)[:, None, None]        # dt/(1+z) [...]: (H, C, 1+Bs, K)
    if L % 2 == 0:                                                # Nyquist node z = -1
        nyq = dt[:, None, None] * (left[:, :C].unsqueeze(2) * num.unsqueeze(1)).sum(-1).real   # (H, C, 1 + Bs)
        Khat = torch.cat([Khat, nyq.to(Khat.dtype).unsqueeze(-1)], dim=-1)
    K = torch.fft.irfft(Khat, n=L, dim=-1)                        # (H, C, 1 + Bs, L)
    K_state = K[:, :, 1:].permute(2, 1, 0, 3) if state is not None else None
    return K[:, :, 0].transpose(0, 1).contiguous(), K_state


def _numerators(w: Tensor, P: Tensor, B: Tensor, Ct: Tensor, dt: Tensor, state: Optional[Tensor]
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """Rows [C~; Q] (H, C + r, M), columns [B; P; s] (H, 1 + r + Bs, M) of the Cauchy numerators,
    and [B; s] (H, 1 + Bs, M) for the Nyquist node. With a state x_{-1}: s = x/dt + A x/2."""
    right = [B.unsqueeze(0), P]
    if state is not None:
        x = state.to(w.dtype)
        right.append(x / dt.unsqueeze(-1) + apply_A(w, P, x) / 2)  # (Bs, H, M)
    left = torch.cat([Ct, P.conj()], dim=0).transpose(0, 1)
    right_t = torch.cat(right, dim=0).transpose(0, 1)
    return left, right_t, torch.cat(right[:1] + right[2:], dim=0).transpose(0, 1)


def _woodbury(S: Tensor, C: int, r: int, half: Tensor) -> Tuple[Tensor, Tensor]:
    """From the Cauchy sums S (X, C + r, 1 + r + Bs, K) of rows [C~; Q] and columns [B; P; s]:
    lhs = C~^T R [B, s] / h and the Woodbury correction corr = S01 (I + h S11)^{-1} h S10, both
    (X, C, 1 + Bs, K), with R = h S, h = dt/2 (``half``: (X, 1, 1) real)."""
    S_c, S_q = S[:, :C], S[:, C:]                                 # rows C~ / rows Q
    S01, S11 = S_c[:, :, 1:1 + r], S_q[:, :, 1:1 + r]             # (X, C, r, K), (X, r, r, K)
    cols = [0] + list(range(1 + r, S.shape[2]))                   # the B (and s) columns
    lhs, rhs = S_c[:, :, cols], S_q[:, :, cols]                   # C~^T R [B, s] / h;  Q^T R [B, s] / h
    h = half.to(S.dtype)
    if r == 1:
        return lhs, S01[:, :, :1] * (h * rhs[:, 0] / (1 + h * S11[:, 0, :1])).unsqueeze(1)
    eye = torch.eye(r, dtype=S.dtype, device=S.device)
    hh = h.unsqueeze(-1)                                          # (X, 1, 1, 1)
    Mw = eye + hh * S11.permute(0, 3, 1, 2)                       # (X, K, r, r): I + k11 (rows Q, cols P)
    X = torch.linalg.solve(Mw, hh * rhs.permute(0, 3, 1, 2))      # (X, K, r, 1 + Bs)
    return lhs, torch.einsum("hcsk,hksj->hcjk", S01, X)


def _refine_nodes(resolvent: Tensor, corr: Tensor, exact: Callable[[], Sequence[Tensor]], state: Optional[Tensor],
                  L: int) -> Tensor:
    """``resolvent`` (H, C, 1 + Bs, K) with its ill-conditioned (channel, node) entries
    (:func:`_ill_conditioned`) recomputed in float64 from ``exact()`` = (w, P, B, Ct, dt): the
    Cauchy sums of those entries directly (a few nodes per channel: poles sit near a handful of
    nodes each), then the same Woodbury step. Differentiable, like the rest."""
    pairs = _ill_conditioned(corr, resolvent)
    if pairs is None:
        return resolvent
    hi, ki = pairs
    hs, at = torch.unique(hi, return_inverse=True)       # the channels involved, and each pair's among them
    c128 = torch.complex128
    w, P, B, Ct, dt = exact()
    w, P, B, Ct, dt = w[hs].to(c128), P[:, hs].to(c128), B[hs].to(c128), Ct[:, hs].to(c128), dt[hs].double()
    left, right_t, _ = _numerators(w, P, B, Ct, dt, None if state is None else state[:, hs].to(c128))
    v = left[at].unsqueeze(2) * right_t[at].unsqueeze(1)                   # (n, C + r, 1 + r + Bs, M)
    z = _nodes(L, torch.float64, dt.device)[0][ki][:, None, None, None]    # (n, 1, 1, 1)
    lam = (w * (dt / 2)[:, None])[at][:, None, None, :]                    # (n, 1, 1, M) poles
    S = (v / (z - lam) + v.conj() / (z - lam.conj())).sum(-1, keepdim=True)  # (n, C + r, 1 + r + Bs, 1)
    lhs, corr64 = _woodbury(S, Ct.shape[0], P.shape[0], (dt / 2)[at][:, None, None])
    out = resolvent.clone()
    out[hi, :, :, ki] = (lhs - corr64)[..., 0].to(out.dtype)
    return out


def _ill_conditioned(corr: Tensor, resolvent: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """(channel, node) indices where the float32 Woodbury correction exceeds REFINE_AMPLIFICATION
    times the largest result of its output and column (so its rounding would show in the kernel),
    or None.
    corr, resolvent: (H, C, 1 + Bs, K).

    The choice depends on the values, so it is skipped where values are not known or not one per
    call: while torch.compile traces (a compiled S4 kernel stays float32 throughout), under
    torch.func.vmap (an ensemble's models would each pick their own nodes: nonzero has no batching
    rule) and on the meta device."""
    if corr.dtype != torch.complex64 or corr.numel() == 0 or corr.device.type == "meta" \
            or torch.compiler.is_compiling() or vmap_active():
        return None
    with torch.no_grad():
        # per output (c) and column (B, each state): a state's column is 1/dt larger than B's and
        # would hide B's ill-conditioned nodes behind its own scale
        # magnitudes as max(|re|, |im|) (within sqrt 2 of |z|, without complex abs's hypot: 1.4 vs 2.4 ms here)
        scale = torch.view_as_real(resolvent).abs().amax(dim=(-2, -1)).unsqueeze(-1)          # (H, C, 1+Bs, 1)
        big = torch.view_as_real(corr).abs().amax(-1)                                         # (H, C, 1+Bs, K)
        bad = (big > REFINE_AMPLIFICATION * scale.clamp_min(torch.finfo(torch.float32).tiny)).flatten(1, 2).any(1)
        hi, ki = bad.nonzero(as_tuple=True)                                                   # bad: (H, K)
    return (hi, ki) if hi.numel() else None

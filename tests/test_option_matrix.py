"""Option combinations of the LTI layers, checked against an independent float64 recurrence.

Each family's discretised system is rebuilt here, in float64, from the layer's own parameters with
formulas written out in this file (zoh / bilinear of a diagonal or dense A, the LRU's exponential
parameterisation, S4's dense NPLR matrix with its plain C recovered from C~), and then run as a
direct loop  h_t = A_bar h_{t-1} + B_bar u_t,  y_t = Re(C h_t) + D u_t.  Every evaluation mode of
the layers (FFT convolution, blocked inference convolution, step forms, scan, chunked state
passing) over products of their options is compared with that loop.

Tolerances. float32 layers against the float64 loop: 2e-5 relative to max|y| (or of the state).
At the short lengths used here (L <= 70) a float32 FFT convolution rounds to ~eps * log2(n) *
||K||_1 / max|y|, below 1e-6, and a float32 recurrence accumulates ~L * eps; a wrong term (channel
order, lag, conjugate, rate, state) errs at O(1e-2..1). S4's Cauchy / Woodbury kernel is the
exception with 1e-4: its float32 Woodbury step cancels by up to REFINE_AMPLIFICATION (20, see
plugins/s4/generating.py) before a node is refined, i.e. ~20 * log2(L) * eps. float64 layers
against the loop: 1e-9 (the same sums in another order; the zoh Van Loan exponential and S4's
C~ <-> C solve lose a few digits to conditioning).
"""

from __future__ import annotations

import copy
import itertools
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor

import lrnnx_zoo
from lrnnx_zoo.kernels import keops_support
from lrnnx_zoo.plugins.fftconv import FFTConvLayer, FFTConvS4, pack_state
from lrnnx_zoo.plugins.lru import LRU, LRUKernel
from lrnnx_zoo.plugins.s4 import S4, S4Layer, SSKernelNPLR
from lrnnx_zoo.plugins.s4d import S4D, S4DKernel

F32_TOL, S4_F32_TOL, F64_TOL = 2e-5, 1e-4, 1e-9
HAS_KEOPS = keops_support.keops_available()


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = (torch.view_as_real(t.detach()) if t.is_complex() else t.detach() for t in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


# -- the independent float64 systems -----------------------------------------------------------
# A system is (A_bar, B_bar, C): A_bar (H, N) diagonal or (H, N, N) dense, B_bar (H, N),
# C (Ch, H, N), all complex128, with y[c, h] = Re(C[c, h] . h_t[h]); the loop adds D u itself.

def zoh(A: Tensor, B: Tensor, dt: Tensor) -> Tuple[Tensor, Tensor]:
    """Diagonal zero-order hold: exp(dt A), (exp(dt A) - 1) / A * B.  A, B: (H, N), dt: (H, 1)."""
    return torch.exp(dt * A), (torch.exp(dt * A) - 1) / A * B


def bilinear(A: Tensor, B: Tensor, dt: Tensor) -> Tuple[Tensor, Tensor]:
    """Diagonal bilinear transform: (1 + dt A / 2) / (1 - dt A / 2), dt B / (1 - dt A / 2)."""
    return (1 + dt * A / 2) / (1 - dt * A / 2), dt * B / (1 - dt * A / 2)


def s4d_system(k: S4DKernel, rate: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """S4D: A = -exp(A_real_log) + i A_imag, dt = exp(log_dt) / rate; the conjugate half of the
    state doubles the output: y = 2 Re(C h)."""
    p = {n: t.detach().double() for n, t in k.named_parameters()}
    A = torch.complex(-torch.exp(p["A_real_log"]), p["A_imag"])
    B, C = torch.view_as_complex(p["B"]), torch.view_as_complex(p["C"])
    dt = (torch.exp(p["log_dt"]) / rate)[:, None]
    A_bar, B_bar = (zoh if k.discretization == "zoh" else bilinear)(A, B, dt)
    return A_bar, B_bar, 2 * C


def lru_kernel_system(k: LRUKernel) -> Tuple[Tensor, Tensor, Tensor]:
    """LRUKernel: lam = exp(-exp(nu_log) + i exp(theta_log)), B_bar = gamma B, y = Re(C h)."""
    p = {n: t.detach().double() for n, t in k.named_parameters()}
    lam = torch.exp(torch.complex(-torch.exp(p["nu_log"]), torch.exp(p["theta_log"])))
    return lam, torch.view_as_complex(p["B"]) * torch.exp(p["gamma_log"]), torch.view_as_complex(p["C"])


def s4_system(k: SSKernelNPLR, rate: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """S4 in the full conjugate-pair basis h = [x, conj x] (N = 2M complex states):
    A = diag([w, conj w]) - sum_r p_r p_r^H with p_r = [P_r, conj P_r], B = [B, conj B], and the
    plain C from the stored C~ = (I - A_bar^L)^T C (A_bar at rate 1), y = Re([C, conj C] . h)."""
    t = {n: v.detach().double() for n, v in itertools.chain(k.named_parameters(), k.named_buffers())
         if v.is_floating_point()}
    cx = lambda v: torch.view_as_complex(v.contiguous())          # noqa: E731
    w, P, B, Ct = cx(t["w"]), cx(t["P"]), cx(t["B"]), cx(t["C"])
    w = torch.complex(w.real.clamp(max=-1e-4), w.imag)            # the layer's stability clamp
    rep = k.d_model // w.shape[0]                                  # channel h uses row h % S
    w, P, B = w.repeat(rep, 1), P.repeat(1, rep, 1), B.repeat(rep, 1)
    full = lambda v: torch.cat([v, v.conj()], -1)                  # noqa: E731
    Pf = full(P)                                                   # (r, H, N)
    A = torch.diag_embed(full(w)) - torch.einsum("rhi,rhj->hij", Pf, Pf.conj())
    dt = torch.exp(t["log_dt"])
    A_bar, B_bar = dense_discretize(A, full(B), dt / rate, k.discretization)
    C, L = full(Ct), int(k.L)
    if L:                                                          # C^T = C~^T (I - A_bar^L)^{-1}
        A1 = A_bar if rate == 1.0 else dense_discretize(A, full(B), dt, k.discretization)[0]
        F = torch.eye(A.shape[-1], dtype=A.dtype) - torch.linalg.matrix_power(A1, L)
        C = torch.linalg.solve(F.transpose(-1, -2).unsqueeze(0), C.unsqueeze(-1)).squeeze(-1)
    return A_bar, B_bar, C


def dense_discretize(A: Tensor, B: Tensor, dt: Tensor, method: str) -> Tuple[Tensor, Tensor]:
    """A: (H, N, N), B: (H, N), dt: (H,): bilinear, or zoh by the Van Loan block exponential."""
    H, N = B.shape
    dt = dt[:, None, None]
    if method == "bilinear":
        eye = torch.eye(N, dtype=A.dtype)
        return (torch.linalg.solve(eye - dt / 2 * A, eye + dt / 2 * A),
                torch.linalg.solve(eye - dt / 2 * A, dt[..., 0] * B))
    M = torch.zeros(H, N + 1, N + 1, dtype=A.dtype)                # exp([[A, B], [0, 0]] dt)
    M[:, :N, :N], M[:, :N, N] = A * dt, B * dt[..., 0]
    E = torch.linalg.matrix_exp(M)
    return E[:, :N, :N], E[:, :N, N]


def full_s4_state(x: Tensor) -> Tensor:
    """S4's kernel state x (B, H, M) -> h = [x, conj x] (B, H, N)."""
    return torch.cat([x, x.conj()], -1).to(torch.complex128)


def run(system: Tuple[Tensor, Tensor, Tensor], u: Tensor, h0: Optional[Tensor] = None,
        D: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The direct loop: u (Bs, H, L) -> y (Bs, Ch, H, L) float64 and the last state (Bs, H, N)."""
    A_bar, B_bar, C = system
    u = u.detach().double()
    Bs, H, L = u.shape
    h = torch.zeros(Bs, *B_bar.shape, dtype=torch.complex128) if h0 is None else h0.to(torch.complex128)
    ys = []
    for t in range(L):
        Ah = (A_bar @ h.unsqueeze(-1)).squeeze(-1) if A_bar.dim() == 3 else A_bar * h
        h = Ah + B_bar * u[:, :, t, None]
        ys.append((C.unsqueeze(0) * h.unsqueeze(1)).sum(-1).real)            # (Bs, Ch, H)
    y = torch.stack(ys, -1) if ys else torch.zeros(Bs, C.shape[0], H, 0, dtype=torch.float64)
    if D is not None:
        y = y + D.detach().double()[None, :, :, None] * u.unsqueeze(1)
    return y, h


def system_of(kernel, rate: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    if isinstance(kernel, S4DKernel):
        return s4d_system(kernel, rate)
    if isinstance(kernel, LRUKernel):
        assert rate == 1.0
        return lru_kernel_system(kernel)
    return s4_system(kernel, rate)


def impulse_response(system: Tuple[Tensor, Tensor, Tensor], length: int) -> Tensor:
    """K (Ch, H, length) float64: the loop's output for a unit impulse at t = 0."""
    H = system[1].shape[0]
    delta = torch.zeros(1, H, length, dtype=torch.float64)
    delta[..., 0] = 1.0
    return run(system, delta)[0][0]


def direct_conv(u: Tensor, K: Tensor) -> Tensor:
    """y[b, c, h, t] = sum_{j <= t, j < Lk} K[c, h, j] u[b, h, t - j], as a sum over lags (float64).
    u: (Bs, H, L), K: (Ch, H, Lk) -> (Bs, Ch, H, L)."""
    Bs, H, L = u.shape
    y = torch.zeros(Bs, K.shape[0], H, L, dtype=torch.float64)
    for j in range(min(K.shape[-1], L)):
        y[..., j:] += K[None, :, :, j, None] * u[:, None, :, :L - j]
    return y


def flip_valid(u: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """u (Bs, ..., L) with each row's first lengths[b] steps reversed (all of them without lengths)."""
    if lengths is None:
        return u.flip(-1)
    out = u.clone()
    for b, n in enumerate(lengths.tolist()):
        out[b, ..., :n] = u[b, ..., :n].flip(-1)
    return out


def masked(u: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """u (Bs, H, L) float64 with the steps past lengths[b] zeroed."""
    u = u.detach().double()
    if lengths is None:
        return u
    return u * (torch.arange(u.shape[-1])[None, :] < lengths[:, None]).double()[:, None]


def tolerance(kind: str, dtype: torch.dtype) -> float:
    return F64_TOL if dtype == torch.float64 else (S4_F32_TOL if kind == "s4" else F32_TOL)


# -- the option matrix -----------------------------------------------------------------------
# The whole product is large (FFTConvS4 alone: ~10^5 combinations) and was run in full while
# auditing (LRNNX_ZOO_FULL_MATRIX=1 runs it again; minutes to hours). By default each test runs a
# fixed, seeded sample that still takes every value of every option, listed in its parametrisation.
FULL = bool(os.environ.get("LRNNX_ZOO_FULL_MATRIX"))


def option_sample(options: Dict[str, Sequence[Any]], n: int, seed: int) -> List[Dict[str, Any]]:
    """n combinations of ``options`` drawn with a fixed seed (every value of each option drawn
    independently; then each value not drawn yet gets a combination of its own), or all of them
    with LRNNX_ZOO_FULL_MATRIX."""
    if FULL:
        return [dict(zip(options, values)) for values in itertools.product(*options.values())]
    rng = random.Random(seed)
    draw = lambda: {k: rng.choice(list(v)) for k, v in options.items()}      # noqa: E731
    picked = [draw() for _ in range(n)]
    for name, values in options.items():
        for v in values:
            if not any(c[name] == v for c in picked):
                picked.append({**draw(), name: v})
    return picked


def ids(combos: List[Dict[str, Any]]) -> List[str]:
    return ["-".join(f"{k}={getattr(v, '__name__', None) or str(v).replace('torch.', '')}" for k, v in c.items())
            for c in combos]


KINDS = ("s4d", "lru", "s4")
BACKENDS = {"s4d": (None, "torch", "keops"), "lru": (None, "torch", "keops"), "s4": (None, "torch", "keops")}
KERNEL_OPTIONS = {"s4d": [dict(init=i, discretization=d) for i in ("lin", "inv", "legs", "real", "random")
                          for d in ("zoh", "bilinear")],
                  "lru": [dict(), dict(r_min=0.5, r_max=0.99), dict(max_phase=0.1)],
                  "s4": [dict(measure=m, rank=r, discretization=d) for m, r in (("legs", 1), ("legt", 2),
                         ("fourier", 1), ("lagt", 1), ("legs", 3)) for d in ("bilinear", "zoh")] + [dict(n_ssm=1)]}


def kernel_kwargs(kind: str, backend: Optional[str], which: int) -> Dict[str, Any]:
    kw = dict(KERNEL_OPTIONS[kind][which % len(KERNEL_OPTIONS[kind])])
    if backend == "keops" and not HAS_KEOPS:
        pytest.skip(f"pykeops unusable here: {keops_support.keops_unavailable_reason()}")
    if backend is not None:
        kw["backend"] = backend
    return kw


FFT_OPTIONS = dict(kind=KINDS, channels=(1, 2, 3), bidirectional=(False, True), transposed=(True, False),
                   swap=(False, True), L=(1, 2, 7, 13, 64), l_max=(None, 5, 40), batch=(1, 2), rate=(1.0, 0.5, 2.0),
                   lengths=(False, True), grad=(False, True), H=(1, 3), d_state=(2, 4),
                   dtype=(torch.float32, torch.float64), backend=(None, "torch", "keops"), kernel_options=(0, 1, 2, 3))
FFT_COMBOS = [c for c in option_sample(FFT_OPTIONS, 90, 0) if not (c["kind"] == "lru" and c["rate"] != 1.0)]


@pytest.mark.parametrize("c", FFT_COMBOS, ids=ids(FFT_COMBOS))
def test_fftconv_block_matches_the_loop(c):
    """FFTConvS4 (both convolution paths: blocked inference and autograd) against the loop's
    kernel convolved by a sum over lags: causal part, skip D, reverse direction within each
    sequence's length (bidirectional), finite window (l_max < L), sampling rate, channel order."""
    torch.manual_seed(0)
    kind, C, L, Bs, H = c["kind"], c["channels"], c["L"], c["batch"], c["H"]
    m = FFTConvS4(H, l_max=c["l_max"], channels=C, swap_channels=c["swap"], transposed=c["transposed"],
                  kernel_type=kind, bidirectional=c["bidirectional"], d_state=c["d_state"],
                  **kernel_kwargs(kind, c["backend"], c["kernel_options"])).eval().to(c["dtype"])
    u = torch.randn(Bs, H, L, dtype=c["dtype"])
    lengths = torch.tensor([max(L - 1 - b, 0) for b in range(Bs)]) if c["lengths"] else None
    x = (u if c["transposed"] else u.transpose(1, 2)).clone().requires_grad_(c["grad"])
    with torch.set_grad_enabled(c["grad"]):
        y = m(x, rate=c["rate"], lengths=lengths)[0].detach()
    y = y if c["transposed"] else y.transpose(1, 2)
    y = y.reshape(Bs, H, C, L).transpose(1, 2) if c["swap"] else y.reshape(Bs, C, H, L)

    uu = masked(u, lengths)
    K = impulse_response(system_of(m.kernel, c["rate"]), L if c["l_max"] is None else min(c["l_max"], L))
    ref = direct_conv(uu, K[:C]) + m.D.detach().double()[None, :, :, None] * uu.unsqueeze(1)
    if c["bidirectional"]:                        # y[t] += sum_{j >= t} K1[j - t] u[j], within each length
        ref = ref + flip_valid(direct_conv(flip_valid(uu, lengths), K[C:]), lengths)
    assert rel_err(y, ref) < tolerance(kind, c["dtype"])


def kernel_state_as_full(kind: str, s: Tensor) -> Tensor:
    """A kernel's state (Bs, H, S) as the loop's h: S4 keeps x of h = [x, conj x]."""
    return full_s4_state(s) if kind == "s4" else s.to(torch.complex128)


STATE_OPTIONS = dict(kind=KINDS, channels=(1, 2, 3), H=(1, 3), d_state=(2, 4, 6),
                     dtype=(torch.float32, torch.float64), chunks=((7,), (1, 1, 5), (3, 0, 4), (13, 1), (2, 11)),
                     l_max=(None, 16), batch=(1, 2), step_state=("kernel", "packed"),
                     backend=(None, "torch", "keops"), kernel_options=(0, 1, 2, 3))
STATE_COMBOS = option_sample(STATE_OPTIONS, 30, 1)


@pytest.mark.parametrize("c", STATE_COMBOS, ids=ids(STATE_COMBOS))
def test_fftconv_state_passing_and_steps_match_the_loop(c):
    """From a non-zero state, chunked forward(x, state) (chunks of 0, 1 and more samples) and then
    step() in the kernel's or the packed state format continue the loop's outputs and states."""
    torch.manual_seed(0)
    kind, C, H, Bs, dtype = c["kind"], c["channels"], c["H"], c["batch"], c["dtype"]
    m = FFTConvS4(H, l_max=c["l_max"], channels=C, kernel_type=kind, d_state=c["d_state"],
                  **kernel_kwargs(kind, c["backend"], c["kernel_options"])).eval().to(dtype)
    system = system_of(m.kernel)
    warm, u, u_step = (torch.randn(Bs, H, n, dtype=dtype) for n in (3, sum(c["chunks"]), 5))
    with torch.no_grad():
        s = m(warm, state=m.default_state(Bs))[1]
    h = kernel_state_as_full(kind, s)
    assert rel_err(h, run(system, warm)[1]) < tolerance(kind, dtype)
    y_ref, h_ref = run(system, u, h, D=m.D)
    ys, t0 = [], 0
    with torch.no_grad():
        for n in c["chunks"]:
            y, s = m(u[..., t0:t0 + n], state=s)
            ys.append(y)
            t0 += n
    assert rel_err(torch.cat(ys, -1), y_ref.flatten(1, 2)) < tolerance(kind, dtype)
    assert rel_err(kernel_state_as_full(kind, s), h_ref) < tolerance(kind, dtype)

    y_ref, h_ref = run(system, u_step, h_ref, D=m.D)
    with torch.no_grad():
        m.setup_step()
        st = s if c["step_state"] == "kernel" else pack_state(m._step, s, m.kernel)
        ys = []
        for t in range(u_step.shape[-1]):
            y, st = m.step(u_step[..., t], st)
            ys.append(y)
    assert rel_err(torch.stack(ys, -1), y_ref.flatten(1, 2)) < tolerance(kind, dtype)
    if c["step_state"] == "kernel":
        assert rel_err(kernel_state_as_full(kind, st), h_ref) < tolerance(kind, dtype)


def test_s4_state_passing_over_an_empty_chunk_keeps_the_state():
    # An empty chunk of a stream (nothing arrived yet) failed in S4's state passing with
    # "IndexError: index -1 is out of bounds for dimension 2 with size 0" (the s4d and lru
    # kernels returned the state unchanged).
    torch.manual_seed(0)
    for m in (FFTConvS4(2, kernel_type="s4", d_state=4).eval(), S4(2, d_state=4, activation=None).eval()):
        with torch.no_grad():
            s = m(torch.randn(1, 2, 5), state=m.default_state(1))[1]
            y, s_next = m(torch.randn(1, 2, 0), state=s)
        assert y.shape[-1] == 0
        torch.testing.assert_close(s_next, s, rtol=0, atol=0)


# -- the seed-style S4 block -------------------------------------------------------------------
def s4_block_reference(m: S4, u: Tensor, rate: float, lengths: Optional[Tensor]) -> Tensor:
    """The S4 block's SSM outputs (Bs, C*H, L), float64, before its activation: causal part with
    a kernel of round(l_max * rate) samples (at least one), skip D, and for a bidirectional block
    the strictly anti-causal sum_j K1[j] u[t + 1 + j] within each sequence's length."""
    C, L = m.channels, u.shape[-1]
    uu = masked(u, lengths)
    Lk = L if m.L is None else min(L, max(1, round(m.L * rate)))
    K = impulse_response(s4_system(m.kernel, rate), Lk)
    y = direct_conv(uu, K[:C]) + m.D.detach().double()[None, :, :, None] * uu.unsqueeze(1)
    if m.bidirectional:
        rev = flip_valid(direct_conv(flip_valid(uu, lengths), K[C:]), lengths)     # sum_{j >= t}
        shifted = torch.zeros_like(rev)
        for b in range(u.shape[0]):
            n = L if lengths is None else int(lengths[b])
            shifted[b, ..., :max(n - 1, 0)] = rev[b, ..., 1:n]
        y = y + shifted
    return y.reshape(u.shape[0], C * m.h, L)


S4_BLOCK_OPTIONS = dict(channels=(1, 2, 3), bidirectional=(False, True), transposed=(True, False), H=(1, 3),
                        d_state=(2, 4), L=(1, 2, 7, 13), l_max=(None, 1, 5, 40), batch=(1, 2), rate=(1.0, 0.3, 2.0),
                        lengths=(False, True), grad=(False, True), dtype=(torch.float32, torch.float64),
                        discretization=("bilinear", "zoh"), backend=("torch", "keops"))
S4_BLOCK_COMBOS = option_sample(S4_BLOCK_OPTIONS, 30, 2)


@pytest.mark.parametrize("c", S4_BLOCK_COMBOS, ids=ids(S4_BLOCK_COMBOS))
def test_s4_block_matches_the_loop(c):
    torch.manual_seed(0)
    L, Bs, H = c["L"], c["batch"], c["H"]
    if c["backend"] == "keops" and not HAS_KEOPS:
        pytest.skip("pykeops unusable here")
    m = S4(H, d_state=c["d_state"], l_max=c["l_max"], channels=c["channels"], bidirectional=c["bidirectional"],
           activation=None, transposed=c["transposed"], discretization=c["discretization"],
           backend=c["backend"]).eval().to(c["dtype"])
    u = torch.randn(Bs, H, L, dtype=c["dtype"])
    lengths = torch.tensor([max(L - 1 - b, 0) for b in range(Bs)]) if c["lengths"] else None
    x = (u if c["transposed"] else u.transpose(1, 2)).clone().requires_grad_(c["grad"])
    with torch.set_grad_enabled(c["grad"]):
        y = m(x, rate=c["rate"], lengths=lengths)[0].detach()
    ref = s4_block_reference(m, u, c["rate"], lengths)
    linear = copy.deepcopy(m.output_linear).double()
    with torch.no_grad():
        ref = linear(ref) if c["transposed"] else linear(ref.transpose(1, 2))
    assert rel_err(y, ref) < tolerance("s4", c["dtype"])


def test_s4_block_kernel_shorter_than_a_sample_keeps_its_first_tap():
    # l_max=1 at rate 0.3 asked for round(0.3) = 0 kernel samples: the convolution failed with
    # "Kf must be (C, H=2, n // 2 + 1=3) for n=4 >= L=5" (inference) or "start (0) + length (5)
    # exceeds dimension size (4)" (training). A window shorter than a sample keeps lag 0.
    torch.manual_seed(0)
    m = S4(2, d_state=4, l_max=1, activation=None).eval()
    u = torch.randn(2, 2, 5)
    K0 = impulse_response(s4_system(m.kernel, 0.3), 1)
    ref = m.output_linear.double()((K0[0, :, :1] + m.D.detach().double()[0, :, None]) * u.double())
    m.float()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            y = m(u, rate=0.3)[0]
        assert rel_err(y, ref) < S4_F32_TOL


def test_s4_block_state_passing_at_another_rate_names_the_rate():
    # With a state, l_max=10 and rate 0.5, an input of 8 samples was refused as "l_max=10 < L=8".
    m = S4(2, d_state=4, l_max=10)
    with pytest.raises(ValueError, match=r"state passing runs the system at rate 1 .* got rate=0.5"):
        m(torch.randn(1, 2, 8), rate=0.5, state=m.default_state(1))
    with pytest.raises(ValueError, match=r"l_max=10 < L=11"):
        m(torch.randn(1, 2, 11), state=m.default_state(1))

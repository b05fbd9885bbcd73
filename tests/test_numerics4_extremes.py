"""Extreme but legal hyperparameters, fuzzed against float64 (session numerics4): what the option
matrix, the random configurations and numerics3 did not reach.

Each test here failed before its fix; tolerances are stated per test."""

from __future__ import annotations

import copy
import math
from typing import Optional, Tuple

import pytest
import torch
from torch import Tensor

from lrnnx_zoo.kernels.cauchy import cauchy_conj_torch
from lrnnx_zoo.kernels.cauchy_shared import cauchy_conj_shared
from lrnnx_zoo.plugins.s4 import S4Layer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = (torch.view_as_real(t.detach()) if t.is_complex() else t.detach() for t in (a, b))
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


# -- Cauchy gradients at a pole next to a node -----------------------------------------------------
def _cauchy_grads(fn, dtype: torch.dtype, scale: float, forward_mode: bool = False) -> torch.Tensor:
    """d/dw of a weighted conjugate-pair Cauchy sum over S4's nodes i tan(pi k / L), for poles
    w * scale (the S4 pole w dt / 2): its gradient, or (forward_mode) its jvp along w."""
    L = 9
    k = torch.arange((L + 1) // 2, dtype=torch.float64)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    z = torch.complex(torch.zeros_like(k), torch.tan(math.pi * k / L)).to(cdt)
    w = (torch.tensor([[-1.0 + 0.0j, -0.5 + 3j]], dtype=torch.complex128) * scale).to(cdt)
    v = torch.tensor([[0.7 - 0.2j, 0.3 + 1j]], dtype=cdt).expand(2, 2)   # two rows: the shared path
    g = torch.linspace(-1, 1, z.shape[0], dtype=torch.float64).to(cdt)
    if forward_mode:
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            out = fn(v, z, fwAD.make_dual(w, torch.ones_like(w) * scale))
            return fwAD.unpack_dual((out * g).real.sum()).tangent
    w.requires_grad_(True)
    (fn(v, z, w) * g).real.sum().backward()
    return w.grad


@pytest.mark.parametrize("fn", [cauchy_conj_torch, cauchy_conj_shared], ids=["torch", "shared"])
@pytest.mark.parametrize("forward_mode", [False, True], ids=["backward", "jvp"])
def test_cauchy_pole_gradient_does_not_overflow_float32(fn, forward_mode):
    """A pole 5e-11 from the node 0 (S4's Re w clamped at -1e-4, dt = 1e-6): the pole factor
    q = 1/|w|^2 = 4e20 is a float32 number, q^2 = 1.6e41 is not, but the gradient (1e20) is. The
    backward formed q^2 first and gave NaN; float32 must match float64 to 1e-5 (a few float32
    roundings of a sum of 4 well-conditioned terms)."""
    ref = _cauchy_grads(fn, torch.float64, 5e-11, forward_mode)
    got = _cauchy_grads(fn, torch.float32, 5e-11, forward_mode)
    assert torch.isfinite(torch.view_as_real(got) if got.is_complex() else got).all(), got
    assert rel(got, ref) < 1e-5


def test_s4_float32_gradients_are_finite_at_a_tiny_step():
    """S4 Fourier (its DC pole w = 0 is clamped to Re w = -1e-4) at dt = 1e-6, bilinear: the float32
    log_dt and w gradients were NaN (float64: 8.4e-10 and 9.6e-8, matching finite differences), and
    AdamW then made every weight NaN. Each float32 gradient must be finite and within 2e-2 of
    float64 relative to that parameter's largest gradient (measured 1.3e-3 for log_dt, 7e-3 for w:
    these pole gradients are differences of terms 1e20 times larger, conditioning float32 cannot
    beat), and the loss finite after a few optimiser steps."""
    torch.manual_seed(145)
    m = S4Layer(1, d_state=2, measure="fourier", discretization="bilinear", dt_min=1e-6, dt_max=1e-6)
    m64 = copy.deepcopy(m).double()
    x = torch.randn(1, 17, 1)
    weights = torch.linspace(-1, 1, 17).reshape(1, 17, 1)
    for mod in (m, m64):
        (mod(x.to(mod.D.dtype)) * weights.to(mod.D.dtype)).sum().backward()
    for (name, p), p64 in zip(m.named_parameters(), m64.parameters()):
        assert torch.isfinite(p.grad).all(), name
        assert rel(p.grad, p64.grad) < 2e-2, name
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        ((m(x) - x.flip(1)) ** 2).mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())


# -- chunk forms keep a float64 form's precision ---------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [("lru", dict(r_min=0.99999, r_max=1.0)),
                                          ("s4d", dict(dt_min=1e-6, dt_max=1e-4)),
                                          ("s4", dict(dt_min=1.0, dt_max=10.0)),
                                          ("fftconv", dict(kernel_type="s4", channels=2))])
def test_chunk_form_of_a_float64_form_runs_in_float64(name, kwargs):
    """chunk_form(form, T) of a float64 step form (built inside step_form_dtype(float64)) stored its matrices in torch's default float32
    and failed on a float64 chunk ("expected scalar type Float but found Double"). Chunks of a
    float64 stream must match the float64 forward to 1e-10 of max|y| (float64 rounding over 60
    steps, as test_numerics3_float64)."""
    import lrnnx_zoo
    from lrnnx_zoo.chunk_forms import chunk_form
    from lrnnx_zoo.step_forms import step_form_dtype
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer(name, 3, d_state=4, **kwargs).double().eval()
    x = torch.randn(2, 60, 3, dtype=torch.float64)
    with torch.no_grad():
        ref = layer(x)
        with step_form_dtype(torch.float64):       # (a layer's step_form() is built in the build dtype)
            form = layer.step_form()
        chunk = chunk_form(form, 20)               # outside it: the form's dtype
        s = torch.zeros(2, chunk.state_size, dtype=torch.float64)
        ys = []
        for c in range(3):
            y, s = chunk(x[:, 20 * c:20 * (c + 1)], s)
            ys.append(y)
    assert rel(torch.cat(ys, 1), ref) < 1e-10


# -- LRU step form: poles next to the unit circle ----------------------------------------------------
def test_lru_step_form_splits_poles_too_slow_for_one_rounding():
    """LRU with r in [0.99999, 1] (|lam| within 1e-5 of 1: memories of 1e5 - 2e7 steps): the fused
    float32 step form rounded each pole once inside its matrix, an error ~6e-8 that grows linearly
    over the mode's memory (16,384 steps: 2.1e-4 of max|y| from the float64 forward; 65,536: 1.1e-3,
    the same with float64 arithmetic on the rounded matrix, so the pole, not the matmul). The form
    now defaults to the unfused one with hi + lo poles there: within 2e-5 (measured 5.1e-6; the
    "Long streams" bound for slow modes in docs/semantics.md). An LRU of ordinary poles keeps the fused form."""
    from lrnnx_zoo.plugins.lru import LRU
    form, y, ref = _slow_lru_stream(chunk=None)
    assert not form.fused
    assert rel(y, ref) < 2e-5
    assert LRU(2, 4, r_min=0.9, r_max=0.999).step_form().fused


def _slow_lru_stream(chunk: Optional[int]) -> Tuple[torch.nn.Module, Tensor, Tensor]:
    """An LRU with r in [0.99999, 1] streamed over 16,384 steps by its step form (chunk None) or its
    chunk form of ``chunk`` steps: (the form, its float32 outputs, the float64 forward's)."""
    from lrnnx_zoo.chunk_forms import chunk_form
    from lrnnx_zoo.plugins.lru import LRU
    torch.manual_seed(0)
    lru = LRU(2, 4, r_min=0.99999, r_max=1.0).eval()
    x = torch.randn(1, 16384, 2)
    with torch.no_grad():
        ref = copy.deepcopy(lru).double()(x.double())
        form = lru.step_form() if chunk is None else chunk_form(lru.step_form(), chunk)
        s, ys, step = torch.zeros(1, form.state_size), [], chunk or 1
        for t in range(0, x.shape[1], step):
            y, s = form(x[:, t] if chunk is None else x[:, t:t + step], s)
            ys.append(y.unsqueeze(1) if chunk is None else y)
    return form, torch.cat(ys, 1), ref


# -- S4 measures whose normal part the stability clamp would change -----------------------------------
@pytest.mark.parametrize("measure, args", [("tlagt", {"beta": -0.5}), ("glagt", {"alpha": 0.0, "beta": -0.5})])
def test_s4_refuses_a_measure_its_stability_clamp_would_change(measure, args):
    """tlagt / glagt accept beta in (-1, 0) (A decays at (1 + beta) / 2 > 0), but their normal part then
    has Re w = -beta / 2 > 0, which the kernel clamps to -1e-4 at every evaluation: the layer ran another
    system (the slowest pole of A at -0.435 instead of -0.184, silently). Now a ValueError naming the
    measure and the fix; beta = 0 and the default arguments still build."""
    with pytest.raises(ValueError, match=r"stability clamp.*beta >= 0"):
        S4Layer(2, d_state=8, measure=measure, measure_args=args)
    S4Layer(2, d_state=8, measure=measure, measure_args={**args, "beta": 0.0})
    S4Layer(2, d_state=8, measure=measure)


def test_lru_chunk_form_carries_split_poles_across_chunks():
    """The chunk form of that LRU (unfused, hi + lo poles) formed lam^{t+1} in float64 and rounded the
    carried power lam^T once: its error returned every chunk, 3.8e-5 of max|y| from the float64 forward
    at 16,384 steps in chunks of 4 (2.1e-4 at 65,536), against the step form's 5e-6. The carried powers
    are now hi + lo, the lo parts added to the small terms first: 1.6e-6 (65,536 steps: 3.4e-6). Bound
    1e-5: the step form's own, halved."""
    from lrnnx_zoo.chunk_forms import chunk_form
    from lrnnx_zoo.plugins.lru import LRU
    chunks, y, ref = _slow_lru_stream(chunk=4)
    assert chunks.W_lo is not None
    assert rel(y, ref) < 1e-5
    assert chunk_form(LRU(2, 4, r_min=0.9, r_max=0.999).step_form(), 4).W_lo is None     # ordinary poles: as before

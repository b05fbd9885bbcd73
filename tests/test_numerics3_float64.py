"""float64 end to end, and extreme but legal parameters: convolution mode, step mode and prefill
(then steps) are one system in every family, backend and step mode.

An audit found no disagreement here (largest seen: 4e-14 of max|y| for S4 bilinear at dt = 1e3,
6e-14 for S4 Fourier at N = 64); these pin it. Tolerances, relative to max|y|: float64 1e-10 (the
modes differ by rounding, ~1e-15 per operation over at most a few hundred steps, and an ill-
conditioned kernel multiplies that by ~100); float32 1e-4, the bound the layers' own tests use
(float32 rounding of states and kernels, ~1e-7 per step, over 257 steps).
"""

from __future__ import annotations

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.kernels.keops_support import keops_available
from lrnnx_zoo.plugins.s4 import S4

KEOPS = keops_available()
CONFIGS = [("lru", {"backend": "fft"}), ("lru", {"backend": "scan"}),
           ("s4d", {"backend": "torch"}), ("s4d", {"backend": "torch", "discretization": "bilinear"}),
           ("s4d", {"backend": "keops"}),
           ("s4", {"backend": "torch"}), ("s4", {"backend": "keops"}), ("s4", {"discretization": "zoh"}),
           ("fftconv", {"backend": "torch"}), ("fftconv", {"kernel_type": "lru", "backend": "keops"}),
           ("fftconv", {"kernel_type": "s4", "backend": "torch", "channels": 2})]
IDS = [n + "-" + "-".join(str(v) for v in kw.values()) for n, kw in CONFIGS]


def _skip_without_keops(kw: dict) -> None:
    if kw.get("backend") == "keops" and not KEOPS:
        pytest.skip("pykeops cannot compile on this machine")


@torch.no_grad()
def three_modes(layer: torch.nn.Module, x: torch.Tensor) -> tuple:
    """(forward(x), x stepped from a zero state, prefill of the first half then steps): (B, L, H) each."""
    y = layer(x)
    cache = layer.allocate_inference_cache(x.shape[0])
    stepped = torch.stack([layer.step(x[:, t], cache)[0] for t in range(x.shape[1])], 1)
    k = x.shape[1] // 2 + 1
    head, cache = layer.prefill(x[:, :k])
    tail = [layer.step(x[:, t], cache)[0] for t in range(k, x.shape[1])]
    return y, stepped, torch.cat([head] + [t.unsqueeze(1) for t in tail], 1)


def assert_modes_agree(layer: torch.nn.Module, x: torch.Tensor, tol: float) -> None:
    y, stepped, prefilled = three_modes(layer, x)
    scale = y.abs().max().clamp_min(1e-30)
    assert torch.isfinite(y).all()
    for name, other in (("step", stepped), ("prefill", prefilled)):
        assert other.dtype == y.dtype == x.dtype
        err = float((other - y).abs().max() / scale)
        assert err < tol, f"{name} is {err:.1e} of max|y| from forward"


@pytest.mark.parametrize("L", [1, 7, 30])
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_float64_layers_agree_across_modes(name, kw, L):
    _skip_without_keops(kw)
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer(name, 3, d_state=4, **kw).double()
    assert_modes_agree(layer, torch.randn(2, L, 3, dtype=torch.float64), 1e-10)


@pytest.mark.parametrize("mode", ["dense", "linear", "diagonal"])
def test_float64_s4_step_modes_agree_with_the_convolution(mode):
    torch.manual_seed(0)
    m = S4(3, d_state=6, transposed=True, activation=None).double()
    x = torch.randn(2, 3, 40, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        m.setup_step(mode)
        state = m.default_state(2)
        steps = []
        for t in range(x.shape[-1]):
            out, state = m.step(x[:, :, t], state)
            steps.append(out)
    assert state.dtype == torch.complex128
    assert float((torch.stack(steps, -1) - y).abs().max() / y.abs().max()) < 1e-10


EXTREMES = [(name, dict(kw, dt_min=dt, dt_max=dt)) for dt in (1e-6, 1e3)
            for name, kw in (("s4d", {}), ("s4d", {"discretization": "bilinear"}), ("s4", {}),
                             ("s4", {"discretization": "zoh"}), ("fftconv", {"kernel_type": "s4"}))] + \
           [("lru", {"r_min": 0.999999}), ("lru", {"r_max": 1e-6})]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("name,kw", EXTREMES, ids=[n + "-" + "-".join(str(v) for v in kw.values()) for n, kw in EXTREMES])
def test_extreme_timescales_agree_across_modes(name, kw, dtype, tol):
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer(name, 2, d_state=4, **kw).to(dtype)
    assert_modes_agree(layer, torch.randn(2, 50, 2, dtype=dtype), tol)


SMALLEST = [("lru", {"d_state": 1}), ("s4d", {"d_state": 2}), ("s4", {"d_state": 2}),
            ("fftconv", {"d_state": 2}), ("fftconv", {"kernel_type": "s4", "d_state": 2})]


@pytest.mark.parametrize("L", [1, 2, 241, 257])     # 241 and 257: a prime on each side of 2**8
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("name,kw", SMALLEST, ids=[n + "-" + "-".join(str(v) for v in kw.values()) for n, kw in SMALLEST])
def test_one_channel_smallest_state_agrees_across_modes(name, kw, dtype, tol, L):
    torch.manual_seed(0)
    layer = lrnnx_zoo.create_layer(name, 1, **kw).to(dtype)
    assert_modes_agree(layer, torch.randn(2, L, 1, dtype=dtype), tol)

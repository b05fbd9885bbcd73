"""One rule for the dtype of a next state, in every family, kernel backend and state-passing path.

The rule (``lrnnx_zoo.ssm_kernel.passed_state_dtype``): a next state comes back in the dtype of the
state passed in, made complex when the kernel's state is complex (a real float64 state: complex128);
the arithmetic runs in the layer's precision (or wider). Before, a complex128 state to a float32
layer came back complex64 from ``FFTConvS4.forward`` and complex128 from ``step`` with the s4d and
lru kernels, the other way round with the s4 kernel; a float64 state in a float32 layer's cache
failed in the LRU's matmul and S4's dense form and was promoted by the other forms.
"""

from __future__ import annotations

import pytest
import torch

import lrnnx_zoo
from lrnnx_zoo.convolution import FFTConvS4
from lrnnx_zoo.kernels.keops_support import keops_available
from lrnnx_zoo.plugins.s4 import S4

BACKENDS = ["torch"] + (["keops"] if keops_available() else [])
KERNELS = [("s4d", {}), ("lru", {}), ("s4", {}), ("s4", {"discretization": "zoh"})]
# (layer dtype, complex state dtype): a wider state than the layer, and a narrower one
MIXED = [(torch.float32, torch.complex128), (torch.float64, torch.complex64)]
H, N, L, BATCH = 3, 4, 9, 2
# The states are compared with those of a stream in the layer's own dtype: float32 rounding of an
# O(1) state over L=9 steps is ~1e-6; 1e-5 relative to the largest entry leaves room, and a state
# computed wrongly (e.g. imaginary parts lost) is O(1) off.
TOL = 1e-5


def _block(kernel: str, kw: dict, backend: str, dtype: torch.dtype) -> FFTConvS4:
    torch.manual_seed(0)
    return FFTConvS4(H, kernel_type=kernel, d_state=N, backend=backend, **kw).to(dtype)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.to(torch.complex128), b.to(torch.complex128)
    return bool((a - b).abs().max() <= TOL * b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel,kw", KERNELS, ids=[k + "-".join(kw.values()) for k, kw in KERNELS])
@pytest.mark.parametrize("layer_dtype,state_dtype", MIXED, ids=["f32-layer-c128-state", "f64-layer-c64-state"])
def test_fftconv_next_state_keeps_the_dtype_it_came_in(kernel, kw, backend, layer_dtype, state_dtype):
    m = _block(kernel, kw, backend, layer_dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, H, L, generator=g, dtype=layer_dtype)
    s0 = torch.randn(m.default_state(BATCH).shape, generator=g, dtype=state_dtype)
    with torch.no_grad():
        _, own = m(x, state=s0.to(m.default_state(0).dtype))         # the same stream in the layer's dtype
        _, s_fwd = m(x, state=s0)
        s_step = s0
        for t in range(L):
            _, s_step = m.step(x[:, :, t], s_step)
    assert s_fwd.dtype == state_dtype and s_step.dtype == state_dtype
    assert _close(s_fwd, own) and _close(s_step, own)


@pytest.mark.parametrize("kernel,kw", KERNELS, ids=[k + "-".join(kw.values()) for k, kw in KERNELS])
@pytest.mark.parametrize("layer_dtype,state_real", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_fftconv_real_states_come_back_in_their_precision(kernel, kw, layer_dtype, state_real):
    # a real kernel-layout state is read as complex of its own precision; a packed one stays packed
    m = _block(kernel, kw, "torch", layer_dtype)
    x = torch.randn(BATCH, H, dtype=layer_dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        m.setup_step()
        zeros = torch.zeros(m.default_state(BATCH).shape, dtype=state_real)
        _, s_kernel = m.step(x, zeros)
        _, s_fwd = m(x.unsqueeze(-1), state=zeros)
        _, s_packed = m.step(x, torch.zeros(BATCH, m._step.state_size, dtype=state_real))
        _, own = m.step(x, m.default_state(BATCH))
    want = torch.promote_types(state_real, torch.complex64)
    assert s_kernel.dtype == want and s_fwd.dtype == want and s_packed.dtype == state_real
    assert _close(s_kernel, own) and _close(s_fwd, own)


@pytest.mark.parametrize("mode", ["dense", "linear", "diagonal"])
@pytest.mark.parametrize("layer_dtype,state_dtype", MIXED, ids=["f32-layer-c128-state", "f64-layer-c64-state"])
def test_s4_block_step_keeps_the_states_dtype(mode, layer_dtype, state_dtype):
    torch.manual_seed(0)
    m = S4(H, d_state=N, transposed=True).to(layer_dtype)
    m.setup_step(mode)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, H, dtype=layer_dtype, generator=g)
    s0 = torch.randn(m.default_state(BATCH).shape, generator=g, dtype=state_dtype)
    with torch.no_grad():
        _, s1 = m.step(x, s0)
        _, own = m.step(x, s0.to(m.default_state(0).dtype))
    assert s1.dtype == state_dtype and _close(s1, own)


LAYERS = [("lru", {}), ("s4d", {}), ("s4", {}), ("s4", {"discretization": "zoh"}), ("fftconv", {}),
          ("fftconv", {"kernel_type": "lru"})]


@pytest.mark.parametrize("name,kw", LAYERS, ids=[n + "-".join(kw.values()) for n, kw in LAYERS])
@pytest.mark.parametrize("layer_dtype,state_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_layer_step_with_a_state_of_another_dtype_in_its_cache(name, kw, layer_dtype, state_dtype):
    # The LRU failed ("expected m1 and m2 to have the same dtype"), S4's dense (zoh) form too; the
    # diagonal forms returned float64 for a float32 state.
    torch.manual_seed(0)
    m = lrnnx_zoo.create_layer(name, H, d_state=N, **kw).to(layer_dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(BATCH, H, generator=g, dtype=state_dtype)
    s0 = torch.randn(BATCH, m.allocate_inference_cache(1)["lrnn_state"].shape[1], generator=g, dtype=state_dtype)
    with torch.no_grad():
        cache, own = m.allocate_inference_cache(BATCH), m.allocate_inference_cache(BATCH)
        cache["lrnn_state"], own["lrnn_state"] = s0, s0.to(layer_dtype)
        y, _ = m.step(x, cache)
        y_own, _ = m.step(x.to(layer_dtype), own)
    assert y.dtype == state_dtype and cache["lrnn_state"].dtype == state_dtype
    assert _close(y, y_own) and _close(cache["lrnn_state"], own["lrnn_state"])


@pytest.mark.parametrize("layer_dtype,state_dtype", MIXED, ids=["f32-layer-c128-state", "f64-layer-c64-state"])
def test_lru_final_state_keeps_the_initial_states_dtype(layer_dtype, state_dtype):
    torch.manual_seed(0)
    m = lrnnx_zoo.create_layer("lru", H, d_state=N).to(layer_dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(BATCH, L, H, generator=g, dtype=layer_dtype)
    s0 = torch.randn(BATCH, N, generator=g, dtype=state_dtype)
    with torch.no_grad():
        s1 = m.final_state(x, s0)
        own = m.final_state(x, s0.to(torch.promote_types(layer_dtype, torch.complex64)))
    assert s1.dtype == state_dtype and _close(s1, own)

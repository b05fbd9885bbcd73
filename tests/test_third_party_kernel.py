"""A third-party SSM kernel, registered as ("ssm_kernel", name) by a plugin in code, is wrapped by
FFTConv with no change to lrnnx-zoo: forward against a float64 loop of its recurrence, inference
(cached spectrum, blocked convolution) against training, state passing, and the step form.

Tolerance: 1e-5 of max|y| in float32 (a 300-step real recurrence; the paths differ by rounding)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import lrnnx_zoo
from lrnnx_zoo.plugins.fftconv import FFTConvS4
from lrnnx_zoo.ssm_kernel import SSMKernel
from lrnnx_zoo.step_forms import ChannelDiagonalStepForm


class DecayKernel(SSMKernel):
    """H x S real decays per channel:  x'[h, s] = a[h, s] x[h, s] + u[h],  y[c, h] = sum_s c[c, h, s] x'[h, s]."""

    def __init__(self, d_model: int, d_state: int = 4, channels: int = 1) -> None:
        super().__init__()
        self.d_model, self.d_state, self.channels = d_model, d_state, channels
        self.logit = nn.Parameter(torch.randn(d_model, d_state))
        self.c = nn.Parameter(torch.randn(channels, d_model, d_state) / d_state)

    def forward(self, L, rate=1.0, state=None):
        if rate != 1.0:
            raise ValueError("DecayKernel has no dt: rate must be 1")
        def compute():
            a = torch.sigmoid(self.logit)
            powers = a.unsqueeze(-1) ** torch.arange(L, dtype=a.dtype)          # (H, S, L)
            return torch.einsum("chs,hsl->chl", self.c, powers)
        K = self.cached_kernel(("decay", L), compute)
        if state is None:
            return K, None
        a = torch.sigmoid(self.logit)
        powers = a.unsqueeze(-1) ** torch.arange(1, L + 1, dtype=a.dtype)       # zero-input response
        return K, torch.einsum("chs,bhs,hsl->bchl", self.c, state, powers)

    def default_state(self, *batch_shape):
        return torch.zeros(*batch_shape, self.d_model, self.d_state)

    def forward_state(self, u, state):
        a = torch.sigmoid(self.logit)
        for t in range(u.shape[-1]):
            state = a * state + u[..., t, None]
        return state

    def step_form(self):
        a = torch.sigmoid(self.logit).detach().double()
        return ChannelDiagonalStepForm(a.to(torch.complex128), torch.ones_like(a, dtype=torch.complex128),
                                       self.c.detach().double().to(torch.complex128))


def _plugin() -> types.ModuleType:
    mod = types.ModuleType("decay_kernel_plugin")

    @lrnnx_zoo.hookimpl
    def lrnnx_zoo_register_kernel_backends(registry):
        registry.add_backend("ssm_kernel", "decay_test", DecayKernel)
    mod.lrnnx_zoo_register_kernel_backends = lrnnx_zoo_register_kernel_backends
    return mod


@pytest.fixture
def decay_registered():
    lrnnx_zoo.register_plugin(_plugin(), "decay-test")
    try:
        yield
    finally:
        lrnnx_zoo.unregister_plugin("decay-test")


@torch.no_grad()
def _loop(m: FFTConvS4, u: torch.Tensor) -> torch.Tensor:
    """float64 recurrence of the kernel plus the block's skip D.  u: (B, H, L) -> (B, C, H, L)."""
    a = torch.sigmoid(m.kernel.logit).double()
    c, D = m.kernel.c.double(), m.D.double()
    x = torch.zeros(u.shape[0], *a.shape, dtype=torch.float64)
    ys = []
    for t in range(u.shape[-1]):
        x = a * x + u[..., t, None].double()
        ys.append(torch.einsum("chs,bhs->bch", c, x) + D * u[:, None, :, t].double())
    return torch.stack(ys, -1)


def test_fftconv_wraps_a_third_party_kernel(decay_registered):
    assert "ssm_kernel.decay_test" in lrnnx_zoo.list_backends("ssm_kernel")
    torch.manual_seed(0)
    m = FFTConvS4(6, kernel_type="decay_test", d_state=4, channels=2).eval()
    u = torch.randn(3, 6, 300)
    ref = _loop(m, u).reshape(3, 12, 300)
    scale = ref.abs().max()
    with torch.no_grad():
        y_inference, _ = m(u)                             # cached spectrum, blocked convolution
    y_training = m(u)[0].detach()
    assert float((y_inference.double() - ref).abs().max() / scale) < 1e-5
    assert float((y_training.double() - ref).abs().max() / scale) < 1e-5
    # state passing: [u1; u2] == u1, then u2 from the carried state
    with torch.no_grad():
        y1, s = m(u[..., :120], state=m.default_state(3))
        y2, _ = m(u[..., 120:], state=s)
        ys = []
        m.setup_step()
        state = m.default_state(3)
        for t in range(300):
            y_t, state = m.step(u[..., t], state)
            ys.append(y_t)
    assert float((torch.cat([y1, y2], -1).double() - ref).abs().max() / scale) < 1e-5
    assert float((torch.stack(ys, -1).double() - ref).abs().max() / scale) < 1e-5

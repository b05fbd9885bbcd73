"""LTI_LRNN's derived recurrent interface (allocate_inference_cache / step) for layers that the
built-in families do not cover: here, a layer whose coefficients are fixed buffers."""

from __future__ import annotations

from typing import Optional, Tuple

import pytest
import torch
from torch import Tensor

from lrnnx_zoo import LTI_LRNN
from lrnnx_zoo.step_forms import ChannelDenseStepForm, StepFormError


class FixedDecay(LTI_LRNN):
    """x_k = a x_{k-1} + (1 - a) u_k, y_k = x_k per channel, with a fixed (non-trained) decay a."""

    def __init__(self, d_model: int, decay: float = 0.75) -> None:
        super().__init__("no_discretization")
        self.d_model = d_model
        self.register_buffer("a", torch.full((d_model,), decay))

    def discretize(self) -> Tuple[Tensor, Tensor, Tensor]:
        return self.a, 1 - self.a, torch.ones_like(self.a)

    def compute_kernel(self, L: int) -> Tensor:
        a, b, c = self.discretize()
        return c * b * a ** torch.arange(L, dtype=a.dtype)[:, None]                   # (L, H)

    def forward(self, x: Tensor, integration_timesteps: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError("only the recurrent interface is exercised here")

    def step_form(self) -> ChannelDenseStepForm:
        a, b, c = (t.double() for t in self.discretize())
        return ChannelDenseStepForm(a[:, None, None], b[:, None], c[None, :, None])


def test_a_layer_without_parameters_steps_in_its_buffers_dtype():
    # The cache used to take its dtype from the first parameter only, so a float64 layer whose
    # coefficients are buffers got a float32 step form and state.
    layer = FixedDecay(3).double()
    cache = layer.allocate_inference_cache(2)
    assert cache["lrnn_state"].dtype == torch.float64
    assert all(t.dtype == torch.float64 for t in cache["step_form"].buffers())
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    x = torch.zeros(2, 3, dtype=torch.float64)
    for t in range(5):
        x = 0.75 * x + 0.25 * u[:, t]         # 0.75 is exact in float32 and float64
        y, cache = layer.step(u[:, t], cache)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, x, rtol=0, atol=1e-15)


def test_default_dtype_without_any_tensor():
    class Empty(FixedDecay):
        def __init__(self) -> None:
            LTI_LRNN.__init__(self, "no_discretization")
            self.d_model = 2

        def discretize(self) -> Tuple[Tensor, Tensor, Tensor]:
            a = torch.full((2,), 0.5)
            return a, 1 - a, torch.ones_like(a)

    cache = Empty().allocate_inference_cache(1)
    assert cache["lrnn_state"].dtype == torch.get_default_dtype()


def test_a_step_form_returning_no_tensor_state_is_refused_when_the_cache_is_made():
    # Detaching the stepped state (so a stream keeps no autograd history) read state.requires_grad
    # of whatever a third-party step form returned: a list failed with AttributeError, later the
    # next step's "'lrnn_state' must have shape"; now the form's trial step says it at once.
    class ListState(torch.nn.Module):
        state_size, d_input, d_output = 3, 3, 3

        def forward(self, u: Tensor, s: Tensor):
            return u, [s]

    class Odd(FixedDecay):
        def step_form(self) -> torch.nn.Module:
            return ListState()

    with pytest.raises(StepFormError, match=r"Odd.step_form\(\) must return a form whose forward\(u, s\) returns "
                                            r"\(y, s_next\), two tensors; it returned a tuple of Tensor, list"):
        Odd(3).allocate_inference_cache(1)

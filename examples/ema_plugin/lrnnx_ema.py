"""lrnnx_ema: a complete lrnnx-zoo plugin, an exponential moving average (EMA) per channel.

    x_k = a x_{k-1} + (1 - a) u_k,   y_k = x_k,   a = sigmoid(logit) in (0, 1), one per channel,

is the state-space system A = a, B = 1 - a, C = 1, D = 0 with one real state per channel, and
its convolution kernel is K_l = (1 - a) a^l.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

import lrnnx_zoo
from lrnnx_zoo.base import LTI_LRNN, check_sizes, mask_padding
from lrnnx_zoo.convolution import causal_conv
from lrnnx_zoo.registry import Registry
from lrnnx_zoo.step_forms import ChannelDenseStepForm


def flat_init(d_model: int, decay: float = 0.9) -> Tensor:
    """Every channel starts with the same decay: logits (d_model,)."""
    return torch.full((d_model,), decay).logit()


class EMA(LTI_LRNN):
    """Per-channel exponential moving average, (B, L, H) -> (B, L, H), with a learned decay.

    Args:
        d_model: channels H.
        d_state: checked and otherwise unused (an EMA has one state per channel); every
            registered layer takes it, as any layer is built with create_layer(name, H, d_state=N).
        init: name of an initializer registered for "ema" (see the hooks below).
    """

    def __init__(self, d_model: int, d_state: int = 1, init: str = "flat") -> None:
        super().__init__(discretization="no_discretization")  # A and B are discrete already
        check_sizes("EMA", d_model=d_model, d_state=d_state)   # a clear ValueError for 0, -1, 2.0
        self.d_model = d_model                                 # check_input() and step() read it
        # A Parameter (or a buffer, if fixed), so .to() / .double() and gradients reach it.
        self.logit = nn.Parameter(lrnnx_zoo.get_initializer("ema", init)(d_model))

    def discretize(self, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """A_bar = a, B_bar = 1 - a, C = 1, each (H,), in ``dtype`` (default the parameter's)."""
        a = torch.sigmoid(self.logit.to(dtype or self.logit.dtype))
        return a, 1 - a, torch.ones_like(a)

    def compute_kernel(self, L: int) -> Tensor:
        """K_l = C B_bar A_bar^l: (L, H)."""
        a, b, c = self.discretize()
        return c * b * a ** torch.arange(L, dtype=a.dtype, device=a.device)[:, None]

    def forward(self, x: Tensor, integration_timesteps: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, H) -> y: (B, L, H); ``lengths`` (B,): valid steps of a padded batch."""
        # shape/dtype checks, zeros past each length; integration_timesteps refused (one fixed step)
        x = self.prepare_input(x, lengths, integration_timesteps)
        y = causal_conv(x, self.compute_kernel(x.shape[1]), dim=-2)   # time is dim -2 of both
        return mask_padding(y, lengths)              # zeros after each length

    def step_form(self) -> ChannelDenseStepForm:
        """The recurrence as a real step module: u (B, H), state (B, H) -> y (B, H), state'.

        Built from the float64 discretisation; the form stores it in the dtype the caller asks
        for (allocate_inference_cache: the parameters'), so a float64 layer steps in float64.
        """
        a, b, c = self.discretize(torch.float64)
        return ChannelDenseStepForm(a[:, None, None], b[:, None], c[None, :, None])  # 1x1 per channel


@lrnnx_zoo.hookimpl
def lrnnx_zoo_register_layers(registry: Registry) -> None:
    registry.add_layer("ema", EMA)


@lrnnx_zoo.hookimpl
def lrnnx_zoo_register_initializers(registry: Registry) -> None:
    registry.add_initializer("ema", "flat", flat_init)

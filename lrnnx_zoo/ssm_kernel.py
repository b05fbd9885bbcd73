"""The SSM kernel interface: what a family hands to FFT convolution (``FFTConvS4``, S4 layers).

A kernel owns the parameters of H single-input systems (one per channel) with ``channels``
outputs each, and evaluates them three ways that must agree:

- ``forward(L, rate, state)`` -> K: (C, H, L), the convolution kernel  K[c, h, l] = C_c A_bar^l B_bar,
  and, given a state (B, H, S), K_state: (B, C, H, L), the zero-input response from that state;
- ``forward_state(u, state)`` -> the state after consuming u: (B, H, L) (state passing);
- ``step_form()`` -> a real :class:`~lrnnx_zoo.step_forms.StepForm` mapping (B, H) -> (B, C*H),
  output channel-major, i.e. y.reshape(B, C, H).

``rate`` is the relative sampling rate: the step becomes dt / rate, so a kernel at rate 0.5
equals the kernel of the same system with dt doubled (each sample covers twice the time).
Kernels without a dt (already-discrete parameterisations) accept only rate 1.

Families register kernel classes as backends of kind "ssm_kernel", so FFT convolution can wrap
any of them by name: ``registry.add_backend("ssm_kernel", "s4d", S4DKernel)``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Optional, Tuple

from torch import Tensor, nn

from .step_forms import StepForm


class SSMKernel(nn.Module):
    """Abstract per-channel SSM kernel. Constructor convention: ``cls(d_model, d_state, channels=1, **kw)``.

    Attributes:
        d_model: H channels.  d_state: N (the family's meaning, e.g. real states).  channels: C outputs.
    """

    d_model: int
    d_state: int
    channels: int

    @abstractmethod
    def forward(self, L: int, rate: float = 1.0, state: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """K: (C, H, L) real; K_state: (B, C, H, L) real if ``state`` is given, else None."""

    @abstractmethod
    def default_state(self, *batch_shape: int) -> Tensor:
        """A zero state of shape (*batch_shape, H, S)."""

    @abstractmethod
    def forward_state(self, u: Tensor, state: Tensor) -> Tensor:
        """The state after u: (B, H, L), starting from ``state``: (B, H, S)."""

    @abstractmethod
    def step_form(self) -> StepForm:
        """The discretised system as a real step module (B, H) -> (B, C*H)."""

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

import hashlib
from abc import abstractmethod
from typing import Any, Callable, Optional, Tuple

import torch
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
    #: Reuse the last kernel in inference (no autograd) while its key and every parameter and
    #: buffer are unchanged (checked by content, so edits through ``.data`` are seen too).
    cache_inference_kernel: bool = True

    def cached_kernel(self, key: Tuple[Any, ...], compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, or its last result when called again in inference with the same key
        (e.g. (L, rate)) and the same parameter contents. Under autograd it always computes.

        Generating a kernel costs H*N*L work whatever the batch, as much as several FFT round
        trips of the input (benchmarks/bench_layers.py), and evaluation calls repeat it unchanged.
        """
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if grad or not self.cache_inference_kernel:
            return compute()
        full_key = key + (self.fingerprint(),)
        hit = self.__dict__.get("_kernel_cache")
        # The cached tensor is handed out as is (a copy would cost a kernel's worth of memory at
        # the peak); its version counter tells if a caller has since changed it in place.
        if hit is not None and hit[0] == full_key and hit[1]._version == hit[2]:
            return hit[1]
        K = compute()
        self.__dict__["_kernel_cache"] = (full_key, K, K._version)
        return K

    def fingerprint(self) -> Tuple[str, ...]:
        """Content hash of every parameter and buffer, with their dtypes and devices."""
        h = hashlib.blake2b(digest_size=16)
        tensors = list(self.named_parameters()) + list(self.named_buffers())
        for name, t in tensors:
            h.update(name.encode())
            h.update(t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return (h.hexdigest(),) + tuple(sorted({f"{t.dtype}@{t.device}" for _, t in tensors}))

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

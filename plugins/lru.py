"""Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long
Sequences", arXiv:2303.06349).

    x_k = diag(lam) x_{k-1} + (gamma * B) u_k,     y_k = Re(C x_k) + D * u_k        (eq. 6)

with the exponential parameterisation lam = exp(-exp(nu_log) + i exp(theta_log)) (sec. 3.2),
the ring initialisation |lam| ~ U[r_min, r_max] in area, arg(lam) ~ U[0, max_phase] (Lemma 3.2),
and the normalisation gamma = sqrt(1 - |lam|^2) (sec. 3.3). The parameters are already discrete,
so the discretization is ``no_discretization``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from lrnnx_zoo import hookimpl
from lrnnx_zoo.base import LTI_LRNN, mask_padding
from lrnnx_zoo.modal import final_state, modal_auto, modal_fft, modal_scan, powers
from lrnnx_zoo.registry import get_backend, get_initializer
from lrnnx_zoo.step_forms import DiagonalStepForm


def ring_init(d_state: int, r_min: float = 0.0, r_max: float = 1.0, max_phase: float = 2 * math.pi,
              generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Eigenvalues uniform on the ring r_min <= |lam| <= r_max, phase in [0, max_phase] (Lemma 3.2).

    Returns (nu_log, theta_log): (N,) each, with lam = exp(-exp(nu_log) + i exp(theta_log)).
    """
    u1 = torch.rand(d_state, generator=generator, dtype=torch.float64)
    u2 = torch.rand(d_state, generator=generator, dtype=torch.float64)
    # |lam|^2 uniform in [r_min^2, r_max^2]; clamp keeps log finite when r_min = 0 or r_max = 1.
    r2 = (u1 * (r_max ** 2 - r_min ** 2) + r_min ** 2).clamp(1e-12, 1 - 1e-7)
    nu = -0.5 * torch.log(r2)
    theta = (max_phase * u2).clamp_min(1e-12)
    return torch.log(nu).float(), torch.log(theta).float()


class LRU(LTI_LRNN):
    """Linear Recurrent Unit on (B, L, H) sequences.

    Args:
        d_model: H, input and output width.
        d_state: N, number of complex modes.
        r_min, r_max: radius range of the eigenvalues at initialisation.
        max_phase: phase range of the eigenvalues at initialisation.
        init: registered LRU initializer (default "ring").
        backend: "fft", "scan" or "auto" (kernel backends of kind "modal").
    """

    def __init__(self, d_model: int, d_state: int = 64, r_min: float = 0.0, r_max: float = 1.0,
                 max_phase: float = 2 * math.pi, init: str = "ring", backend: str = "auto") -> None:
        super().__init__("no_discretization")
        if not (0.0 <= r_min < r_max <= 1.0):
            raise ValueError(f"LRU needs 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
        self.d_model, self.d_state = d_model, d_state
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        self.backend = backend
        get_backend("modal", backend)  # fail now, with the list of names, not at the first forward
        nu_log, theta_log = get_initializer("lru", init)(d_state, r_min, r_max, max_phase)
        self.nu_log = nn.Parameter(nu_log)
        self.theta_log = nn.Parameter(theta_log)
        # Glorot-like scale so that ||B u|| ~ ||u|| before the gamma normalisation.
        self.B_re = nn.Parameter(torch.randn(d_state, d_model) / math.sqrt(2 * d_model))
        self.B_im = nn.Parameter(torch.randn(d_state, d_model) / math.sqrt(2 * d_model))
        self.C_re = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(d_state))
        self.C_im = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(d_state))
        self.D = nn.Parameter(torch.randn(d_model))
        lam_abs = torch.exp(-torch.exp(nu_log))
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - lam_abs ** 2).clamp_min(1e-6)))

    def log_lambda(self) -> Tensor:
        """log lam: (N,) complex = -exp(nu_log) + i exp(theta_log)."""
        return torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log))

    def discretize(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(lam (N,), gamma * B (N, H), C (H, N)), all complex. The parameters are discrete already."""
        B = torch.complex(self.B_re, self.B_im) * torch.exp(self.gamma_log).unsqueeze(-1)
        return torch.exp(self.log_lambda()), B, torch.complex(self.C_re, self.C_im)

    def compute_kernel(self, L: int, Lambda: Optional[Tensor] = None,
                       B_complex: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Powers lam^l, l < L: (L, N), and the normalised input matrix gamma * B: (N, H)."""
        _, B_norm, _ = self.discretize()
        log_lam = self.log_lambda() if Lambda is None else torch.log(Lambda)
        return powers(log_lam, L), (B_norm if B_complex is None else B_complex)

    def forward(self, x: Tensor, integration_timesteps: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None, initial_state: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, H) -> y: (B, L, H). ``initial_state``: (B, N) complex, or None for zeros."""
        self.check_input(x, lengths)
        _, B, C = self.discretize()
        run = get_backend("modal", self.backend)
        y = run(x, self.log_lambda(), B, C, initial_state) + self.D * x
        return mask_padding(y, lengths)

    def final_state(self, x: Tensor, initial_state: Optional[Tensor] = None) -> Tensor:
        """The state after the last step of x: (B, L, H) -> (B, N) complex."""
        _, B, _ = self.discretize()
        return final_state(x, self.log_lambda(), B, initial_state)

    @torch.no_grad()
    def step_form(self) -> DiagonalStepForm:
        lam = torch.exp(self.log_lambda().to(torch.complex128))
        B = torch.complex(self.B_re.double(), self.B_im.double()) * torch.exp(self.gamma_log.double()).unsqueeze(-1)
        C = torch.complex(self.C_re.double(), self.C_im.double())
        return DiagonalStepForm(lam, B, C, self.D.double())

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, backend={self.backend!r}"


@hookimpl
def lrnnx_zoo_register_layers(registry) -> None:
    registry.add_layer("lru", LRU)


@hookimpl
def lrnnx_zoo_register_initializers(registry) -> None:
    registry.add_initializer("lru", "ring", ring_init)


@hookimpl
def lrnnx_zoo_register_kernel_backends(registry) -> None:
    registry.add_backend("modal", "fft", modal_fft)
    registry.add_backend("modal", "scan", modal_scan)
    registry.add_backend("modal", "auto", modal_auto)

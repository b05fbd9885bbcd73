"""Small modules around the S4 convolution, under the standalone-S4 names.

``Activation``, ``get_initializer``, ``TransposedLinear``, ``LinearActivation`` and ``DropoutNd``
(dropout with one mask per (batch, channel), shared over time: ``tie_dropout``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["Activation", "get_initializer", "TransposedLinear", "LinearActivation", "DropoutNd", "ACTIVATIONS"]

_IDENTITY = (None, "id", "identity", "linear")
ACTIVATIONS = ("id", "identity", "linear", "tanh", "relu", "gelu", "elu", "swish", "silu", "glu", "sigmoid", "softplus")


def Activation(activation: Optional[str] = None, dim: int = -1) -> nn.Module:
    """The activation module named ``activation`` (None: identity). ``glu`` halves ``dim``."""
    if isinstance(dim, bool) or not isinstance(dim, int):   # dim='a' failed at the first forward
        raise TypeError(f"Activation needs dim to be an int (the axis a GLU halves), got {dim!r}")
    table = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "swish": nn.SiLU, "silu": nn.SiLU,
             "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}
    if activation in _IDENTITY:
        return nn.Identity()
    if activation == "glu":
        return nn.GLU(dim=dim)
    if activation in table:
        return table[activation]()
    raise ValueError(f"unknown activation {activation!r}; valid: None, {', '.join(ACTIVATIONS)}")


def get_initializer(name: str, activation: Optional[str] = None) -> Callable[[Tensor], Tensor]:
    """In-place weight initializer ``name`` (uniform, normal, xavier, zero, one) with the gain of ``activation``.

    uniform / normal are Kaiming (He) initialisations; gelu / swish / silu use ReLU's gain
    (they are close to it), identity-like activations the linear gain.
    """
    if activation in _IDENTITY + ("modrelu", "glu"):     # a GLU's value half is linear
        nonlinearity = "linear"
    elif activation in ("relu", "tanh", "sigmoid"):
        nonlinearity = activation
    elif activation in ("gelu", "swish", "silu"):
        nonlinearity = "relu"
    else:
        raise ValueError(f"get_initializer: no gain known for activation {activation!r}; use one of None, "
                         f"relu, tanh, sigmoid, gelu, swish, silu")
    inits = {
        "uniform": functools.partial(nn.init.kaiming_uniform_, nonlinearity=nonlinearity),
        "normal": functools.partial(nn.init.kaiming_normal_, nonlinearity=nonlinearity),
        "xavier": nn.init.xavier_normal_,
        "zero": functools.partial(nn.init.constant_, val=0.0),
        "one": functools.partial(nn.init.constant_, val=1.0),
    }
    if name not in inits:
        raise ValueError(f"unknown initializer {name!r}; valid: {', '.join(inits)}")
    return inits[name]


class TransposedLinear(nn.Module):
    """Linear map on the second-to-last axis: (..., d_input, L) -> (..., d_output, L).

    Initialised like ``nn.Linear`` (Kaiming-uniform weight, bias uniform in +-1/sqrt(d_input)); the
    parameters have nn.Linear's shapes, so transposed and untransposed layers share state dicts.
    """

    trains_like_network = True      # lr and weight decay of a dense layer, not ssm_lr (training.param_groups)

    def __init__(self, d_input: int, d_output: int, bias: bool = True, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_output, d_input, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if bias:
            bound = 1 / math.sqrt(d_input)
            self.bias = nn.Parameter(torch.empty(d_output, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        d_output, d_input = self.weight.shape
        return f"in_features={d_input}, out_features={d_output}, bias={self.bias is not None}"

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_input, L) -> (..., d_output, L)."""
        # bmm against the broadcast weight: matmul(2-D, 3-D) would copy x to (B*L, d_in) and back
        x3 = x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])      # explicit sizes: L or B may be 0
        W = self.weight.expand(x3.shape[0], -1, -1)
        if self.bias is None:
            y = torch.bmm(W, x3)
        else:                                   # bias folded into the GEMM: one pass over the output
            y = torch.baddbmm(self.bias[:, None].expand(x3.shape[0], -1, x3.shape[-1]), W, x3)
        return y.reshape(*x.shape[:-2], self.weight.shape[0], x.shape[-1])


def LinearActivation(d_input: int, d_output: int, bias: bool = True, zero_bias_init: bool = False,
                     transposed: bool = False, initializer: Optional[str] = None, activation: Optional[str] = None,
                     activate: bool = False, weight_norm: bool = False, **kwargs) -> nn.Module:
    """A linear layer (``TransposedLinear`` if ``transposed``), optionally followed by ``activation``.

    With ``activation="glu"`` the linear layer outputs 2 * d_output features for the GLU to halve.
    ``initializer`` names a :func:`get_initializer` scheme; ``weight_norm`` wraps it in weight
    normalisation. The activation is appended only if ``activate``. ``kwargs`` go to the linear
    class (nn.Linear's device, dtype; TransposedLinear takes those two).
    """
    if activation not in ("modrelu",):       # a gain get_initializer knows, not a module of Activation's
        Activation(activation)              # a typo ("rellu") passed where activate=False
    if activation == "glu":
        d_output *= 2
    # kwargs (nn.Linear's device, dtype) go to either class: transposed, they were dropped silently
    lin: nn.Module = (TransposedLinear if transposed else nn.Linear)(d_input, d_output, bias=bias, **kwargs)
    if initializer is not None:
        get_initializer(initializer, activation)(lin.weight)
    if bias and zero_bias_init:
        nn.init.zeros_(lin.bias)
    if weight_norm:
        lin = nn.utils.parametrizations.weight_norm(lin)
    if activate and activation is not None:
        return nn.Sequential(lin, Activation(activation, dim=-2 if transposed else -1))
    return lin


class DropoutNd(nn.Module):
    """Dropout with one mask per (batch, channel), shared along the trailing (time) axes."""

    def __init__(self, p: float = 0.5, transposed: bool = True) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p, self.transposed = p, transposed

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, D, L, ...) if ``transposed`` else (B, L, D) -> the same shape, each (b, d) slice
        zeroed with probability p or scaled by 1 / (1 - p) as a whole; x itself in eval mode or at p = 0."""
        if not self.training or self.p == 0:
            return x
        y = x if self.transposed else x.transpose(-1, -2)              # (B, D, L...)
        mask = torch.rand(*y.shape[:2], *([1] * (y.dim() - 2)), device=x.device) >= self.p
        y = y * mask.to(y.dtype) / (1 - self.p)
        return y if self.transposed else y.transpose(-1, -2)

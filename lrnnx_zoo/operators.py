"""Registers the library's ``torch.library`` operators (``lrnnx_zoo::*``) with torch, by importing the
modules that define them.

A program exported from a model with ``torch.export.export(model, (x,))`` calls them (LRU's
``chunked_scan``, the convolutions' ``channel_conv`` / ``blocked_conv``, S4's ``shared_cauchy``), and
``torch.export.load`` of its .pt2 fails ("We failed to resolve torch.ops.lrnnx_zoo...") in a process
where they are not registered. ``import lrnnx_zoo`` imports this module when torch is already imported
(``import torch`` first); otherwise ``import lrnnx_zoo.operators`` before loading such a program.
"""

from __future__ import annotations

from typing import Tuple

from . import convolution, scan, ssm_kernel  # noqa: F401  (each defines operators on import)
from .kernels import cauchy_shared  # noqa: F401

#: The operators this module registers (each ``torch.ops.lrnnx_zoo.<name>``).
NAMES: Tuple[str, ...] = ("blocked_conv", "blocked_conv_backward", "cached_spectrum", "channel_conv",
                          "chunked_scan", "shared_cauchy", "shared_cauchy_backward")

__all__ = ["NAMES"]

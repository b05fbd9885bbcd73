"""What a type checker may assume of a registered layer and of its step form.

The registry takes any ``nn.Module`` subclass as a layer (``Registry.add_layer``), so nothing here is a
base class a plugin must inherit: at run time ``Layer`` and ``StepFormModule`` *are* ``nn.Module``
(``isinstance(create_layer(...), Layer)`` holds for every layer). For type checkers they are
``nn.Module`` subclasses that also declare the interface DESIGN.md and the README's "Writing a plugin"
promise for every registered layer, so that ``create_layer(...).step(x_t, cache)`` type-checks (typed as
a bare ``nn.Module``, each of these calls failed mypy with '"Tensor" not callable').
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from torch import nn

__all__ = ["Layer", "StepFormModule"]

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    class StepFormModule(nn.Module):
        """A layer's recurrence, ``layer.step_form()``: u (B, H), s (B, state_size) -> (y (B, H), s_next)."""

        state_size: int

        def __call__(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]: ...

        def forward(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]: ...

    class Layer(nn.Module):
        """A registered layer (``create_layer``): x (B, L, H) -> y (B, L, H), and a stream of steps."""

        def __call__(self, x: Tensor, integration_timesteps: Optional[Tensor] = None,
                     lengths: Optional[Tensor] = None, **kwargs: Any) -> Tensor: ...

        def forward(self, x: Tensor, integration_timesteps: Optional[Tensor] = None,
                    lengths: Optional[Tensor] = None, **kwargs: Any) -> Tensor: ...

        def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1,
                                     dtype: Optional[torch.dtype] = None, **kwargs: Any) -> Dict[str, Any]:
            """A cache for ``step`` from a zero state: {"state": (B, ...), ...}."""

        def step(self, x: Tensor, inference_cache: Dict[str, Any], **kwargs: Any) -> Tuple[Tensor, Dict[str, Any]]:
            """x_t (B, H) -> (y_t (B, H), the cache after the step)."""

        def prefill(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Any]]:
            """x (B, L, H) -> (forward's y (B, L, H), the cache after each sequence's last valid step)."""

        def step_form(self) -> StepFormModule:
            """The recurrence as a real step module (:class:`StepFormModule`)."""
else:
    Layer = nn.Module
    StepFormModule = nn.Module

"""Calls that torch.compile runs eagerly, outside its graphs (``torch.compiler.disable``).

Imported only where torch.compile is in use (while dynamo traces, or once torch._dynamo is loaded),
by a local import at the call: applying ``torch.compiler.disable`` imports torch._dynamo and sympy,
which an eager first forward must not pay (650 ms; tests/test_runtime.py).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

__all__ = ["allocate_inference_cache"]


@torch.compiler.disable
def allocate_inference_cache(layer: nn.Module, batch_size: int, dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """``layer.allocate_inference_cache(batch_size, dtype=dtype)``, eagerly: building a step form
    depends on values (S4's diagonal form's accuracy check picks the form) and makes modules, and
    traced by dynamo a compiled prefill broke its graph ~18 times per S4 block (eigendecompositions,
    module construction, the step-form dtype's context variable). Untraced, a compiled prefill breaks
    once per block, here, and its convolution and state passing compile."""
    return layer.allocate_inference_cache(batch_size, dtype=dtype)

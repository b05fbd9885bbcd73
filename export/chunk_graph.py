"""The chunk graph of a causal SequenceModel: T steps per call, the step graph's state.

``build_chunk_module(model, T)`` returns one real-valued ``nn.Module``

    forward(x: (B, T, d_input), state: (B, state_size)) -> (y: (B, T, d_output), state': (B, state_size))

equal to T calls of the step module (:mod:`~lrnnx_zoo.export.step_graph`) with the same packed
state, so streams can move between a chunk graph and a step graph at any chunk boundary. Each
layer runs its step form's chunk form (:func:`lrnnx_zoo.chunk_forms.chunk_form`: one batched
matmul for per-channel LTI forms, T unrolled steps for any other form); the encoder, norms,
mix, decoder and poolings are per-step maps applied to the T steps at once (mean pooling's
compensated running mean steps through the chunk, as the step graph does).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lrnnx_zoo.chunk_forms import chunk_form, check_chunk
from lrnnx_zoo.models import SequenceModel

from .step_graph import StepModule, build_step_module
from .validate import DEFAULT_BATCH, DEFAULT_LENGTH, check_validation_input, default_sequence


class ChunkModule(nn.Module):
    """(x (B, T, d_input), state) -> (y (B, T, d_output), state') for a whole SequenceModel.

    Attributes: those of :class:`~lrnnx_zoo.export.step_graph.StepModule` (state_size,
    state_layout, d_input, d_output, pooling), and ``chunk`` = T.
    """

    def __init__(self, step: StepModule, T: int, closed: Optional[bool] = None) -> None:
        super().__init__()
        self.step = step
        self.chunk = check_chunk(T)
        self.forms = nn.ModuleList(chunk_form(f, self.chunk, closed) for f in step.forms)
        self.state_size, self.state_layout = step.state_size, step.state_layout
        self.d_input, self.d_model, self.d_output, self.pooling = step.d_input, step.d_model, step.d_output, step.pooling

    def forward(self, x: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """T steps: x (B, T, d_input), state (B, state_size) -> y (B, T, d_output), state'."""
        step, batch, T = self.step, x.shape[0], self.chunk
        # per-step maps see (B * T, width), what they see in a step, batch rows apart
        h = step.encoder(x.reshape(batch * T, self.d_input))
        new_states = []
        for block, form, (off, size) in zip(step.blocks, self.forms, step.slices):
            z, s = form(block.norm(h).reshape(batch, T, self.d_model), state[:, off:off + size])
            new_states.append(s)
            h = h + block.mix(z.reshape(batch * T, -1))
        h = step.norm(h)
        if self.pooling == "mean":
            h = h.reshape(batch, T, self.d_model)
            pool, means = state[:, step.pool_offset:], []
            for t in range(T):
                mean, pool = step.pool_step(h[:, t], pool)
                means.append(mean)
            h = torch.stack(means, 1).reshape(batch * T, self.d_model)
            new_states.append(pool)
        y = step.decoder(h).reshape(batch, T, self.d_output)
        return y, torch.cat(new_states, dim=1)

    def zero_state(self, batch: int = 1) -> Tensor:
        """The initial state, (batch, state_size) zeros (the step graph's)."""
        return self.step.zero_state(batch)

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}, state_size={self.state_size}"


@torch.no_grad()
def build_chunk_module(model: SequenceModel, T: int, closed: Optional[bool] = None) -> ChunkModule:
    """The float32 chunk module of a causal SequenceModel: T steps per call (see the module
    docstring). ``closed=False`` unrolls every layer's step (a reference). Raises ExportError
    where :func:`~lrnnx_zoo.export.step_graph.build_step_module` does."""
    T = check_chunk(T)
    return ChunkModule(build_step_module(model), T, closed).eval().requires_grad_(False)


def chunk_validation_input(x: Optional[Tensor], T: int, d_input: int, batch: Optional[int] = None) -> Tensor:
    """The validation input of a chunk graph: ``x`` (checked) when its length is a multiple of T, the
    default sequence lengthened to the next multiple of T for None (validate.default_sequence), else a
    ValueError saying so."""
    if x is None:
        length = -(-DEFAULT_LENGTH // T) * T
        return default_sequence(d_input, length=length, batch=batch or DEFAULT_BATCH)
    if x.shape[1] % T:
        raise ValueError(f"a chunk graph of {T} steps per call is validated chunk by chunk: the validation input's "
                         f"length must be a multiple of {T}, got {x.shape[1]}")
    return x


def chunk_metadata(T: Optional[int]) -> Dict[str, str]:
    """The metadata entry of a chunk graph ({"chunk": "T"}; {} for a step graph)."""
    return {} if T is None else {"chunk": str(T)}


def chunked(step: StepModule, validation_input: Any, T: Optional[int], batch: Optional[int] = None
            ) -> Tuple[Union[StepModule, ChunkModule], Optional[Tensor]]:
    """What an exporter traces and validates with, from the caller's ``validation_input`` (checked
    here: :func:`~lrnnx_zoo.export.validate.check_validation_input`): (step, x) for T None, else the
    chunk module of T steps and :func:`chunk_validation_input`. The default sequence is made here
    too, at the chunk's length: made for a fixed batch before the chunk was known, its 256 steps
    were refused as not a multiple of the chunk, as if the caller had passed them."""
    if T is None:
        return step, check_validation_input(validation_input, step.d_input, batch)
    x = None if validation_input is None else check_validation_input(validation_input, step.d_input, batch)
    return ChunkModule(step, T).eval().requires_grad_(False), chunk_validation_input(x, T, step.d_input, batch)

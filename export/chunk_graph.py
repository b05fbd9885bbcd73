"""The chunk graph of a causal SequenceModel: T steps per call, the step graph's state.

``build_chunk_module(model, T)`` returns one real-valued ``nn.Module``

    forward(x: (B, T, d_input), state: (B, state_size)) -> (y: (B, T, d_output), state': (B, state_size))

equal to T calls of the step module (:mod:`~lrnnx_zoo.export.step_graph`) with the same packed
state, so streams can move between a chunk graph and a step graph at any chunk boundary. Each
layer runs its step form's chunk form (:func:`lrnnx_zoo.chunk_forms.chunk_form`: one batched
matmul for per-channel LTI forms, T unrolled steps for any other form); the encoder, norms,
mix, decoder and poolings are per-step maps applied to the T steps at once (mean pooling's
compensated running mean and count over the chunk in closed form, :meth:`ChunkModule.pool_chunk`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lrnnx_zoo.chunk_forms import chunk_form, check_chunk
from lrnnx_zoo.models import SequenceModel, fast_two_sum
from lrnnx_zoo.step_forms import step_form_dtype

from .step_graph import ExportError, StepModule, build_step_module
from .validate import DEFAULT_BATCH, DEFAULT_LENGTH, check_validation_input, check_validation_memory, default_sequence


class ChunkModule(nn.Module):
    """(x (B, T, d_input), state) -> (y (B, T, d_output), state') for a whole SequenceModel.

    Attributes: those of :class:`~lrnnx_zoo.export.step_graph.StepModule` (state_size,
    state_layout, d_input, d_output, pooling), and ``chunk`` = T.
    """

    def __init__(self, step: StepModule, T: int, closed: Optional[bool] = None) -> None:
        super().__init__()
        self.step = step
        self.chunk = check_chunk(T)
        # the step module's precision, float32, whatever torch's default dtype (which chunk forms
        # store in otherwise: under torch.set_default_dtype(torch.float64) the export failed in a matmul)
        with step_form_dtype(torch.float32):
            self.forms = nn.ModuleList(_checked_chunk_form(f, self.chunk, closed, owner, step.d_model)
                                       for f, owner in zip(step.forms, step.form_owners))
        counts = torch.arange(1, self.chunk + 1, dtype=torch.float32).reshape(1, -1, 1)     # steps into the chunk
        self.register_buffer("counts", counts if step.pooling == "mean" else None)
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
            h = h + block.mix(z.reshape(batch * T, z.shape[-1]))     # (a -1 failed at batch 0)
        h = step.norm(h)
        if self.pooling == "mean":
            h, pool = self.pool_chunk(h.reshape(batch, T, self.d_model), state[:, step.pool_offset:])
            h = h.reshape(batch * T, self.d_model)
            new_states.append(pool)
        y = step.decoder(h).reshape(batch, T, self.d_output)
        return y, torch.cat(new_states, dim=1)

    def pool_chunk(self, h: Tensor, pool: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean pooling over a chunk: h (B, T, d_model), pool (B, 2 d_model + 2) the step graph's pool
        state -> (the mean after each step (B, T, d_model), the next pool state).

        T of the step graph's updates (:meth:`StepModule.pool_step`) at once, each from the chunk's
        first mean m (count c, rounding carries e_m, e_c) rather than from the step before:

            c_t = c + e_c + t (Fast2Sum: exact, as T single steps give it),
            m_t = m + (sum_{j <= t} (h_j - m) / c_t + e_m) (Fast2Sum; e_m of the last step carries on)

        a handful of nodes whatever T (stepped, the running mean unrolled ~17 nodes per step: 1162
        nodes at T=64, exported by the dynamo exporter in 19 s, T=300 in 261 s). The partial sums
        round differently from the step graph's updates: within float32 rounding of the mean."""
        d = self.d_model
        carry, count_carry = pool[:, :d].unsqueeze(1), pool[:, d:d + 1].unsqueeze(1)
        mean, count = pool[:, d + 1:2 * d + 1].unsqueeze(1), pool[:, 2 * d + 1:2 * d + 2].unsqueeze(1)
        counts, count_carries = fast_two_sum(count, self.counts + count_carry)         # (B, T, 1)
        means, carries = fast_two_sum(mean, torch.cumsum(h - mean, 1) / counts + carry)
        last = torch.cat([carries, count_carries, means, counts], 2)[:, -1]
        return means, last

    def zero_state(self, batch: int = 1) -> Tensor:
        """The initial state, (batch, state_size) zeros (the step graph's)."""
        return self.step.zero_state(batch)

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}, state_size={self.state_size}"


def _checked_chunk_form(form: nn.Module, T: int, closed: Optional[bool], owner: str, width: int) -> nn.Module:
    """``form``'s chunk form for T steps, tried once from zeros at batch 2: an ExportError naming the
    layer unless it maps (u (B, T, d_in), s (B, state_size)) to (y (B, T, d_out), s_T) in float32. A
    plugin form's own ``chunk_form(T)`` returning None, a function or y of one step failed as
    "'NoneType' object has no attribute 'modules'", "is not a Module subclass" or inside the exporter."""
    who = f"{owner}.step_form().chunk_form({T})"
    try:
        chunked_form = chunk_form(form, T, closed)
    except Exception as exc:
        raise ExportError(f"{who} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(chunked_form, nn.Module):
        raise ExportError(f"{who} must return an nn.Module (u (B, {T}, d_input), s (B, state_size)) -> "
                          f"(y (B, {T}, d_output), s_T); it returned {type(chunked_form).__name__}")
    d_in, d_out, size = (getattr(form, a, width) for a in ("d_input", "d_output", "state_size"))
    want = ((2, T, d_out), (2, size))
    try:
        out = chunked_form(torch.zeros(2, T, d_in, dtype=torch.float32), torch.zeros(2, size, dtype=torch.float32))
    except Exception as exc:
        raise ExportError(f"{who} must return a module that runs on zeros u (2, {T}, {d_in}) and s (2, {size}); it "
                          f"raised {type(exc).__name__}: {exc}") from exc
    shapes = (tuple(tuple(t.shape) for t in out) if isinstance(out, (tuple, list)) and len(out) == 2 and
              all(isinstance(t, Tensor) for t in out) else None)
    if shapes != want or any(t.dtype != torch.float32 for t in out):
        got = (f"y {shapes[0]} and s_T {shapes[1]} of {out[0].dtype} and {out[1].dtype}" if shapes is not None
               else f"a {type(out).__name__}")
        raise ExportError(f"{who} must return a module whose forward(u (2, {T}, {d_in}), s (2, {size})) returns y "
                          f"{want[0]} and s_T {want[1]} in float32; it returned {got}")
    return chunked_form


@torch.no_grad()
def build_chunk_module(model: SequenceModel, T: int, closed: Optional[bool] = None) -> ChunkModule:
    """The float32 chunk module of a causal SequenceModel: T steps per call (see the module
    docstring). ``closed=False`` unrolls every layer's step (a reference). Raises ExportError
    where :func:`~lrnnx_zoo.export.step_graph.build_step_module` does."""
    T = check_chunk(T)
    return ChunkModule(build_step_module(model), T, closed).eval().requires_grad_(False)


def padded_length(length: int, T: Optional[int]) -> int:
    """``length`` steps rounded up to a whole number of chunks of T (unchanged for a step graph, T None)."""
    return length if T is None else -(-length // T) * T


def chunk_validation_input(x: Optional[Tensor], T: int, d_input: int, batch: Optional[int] = None) -> Tensor:
    """The validation input of a chunk graph: ``x`` (checked) when its length is a multiple of T, the
    default sequence lengthened to the next multiple of T for None (validate.default_sequence), else a
    ValueError saying so."""
    if x is None:
        return default_sequence(d_input, length=padded_length(DEFAULT_LENGTH, T), batch=batch or DEFAULT_BATCH)
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
    were refused as not a multiple of the chunk, as if the caller had passed them. At a fixed batch its
    memory is checked first (:func:`~lrnnx_zoo.export.validate.check_validation_memory`: batch=10**6);
    the dynamic batch's default is DEFAULT_BATCH sequences."""
    if validation_input is None and batch is not None:
        check_validation_memory(step, batch, padded_length(DEFAULT_LENGTH, T), step.state_size,
                                "a validation_input of fewer steps")
    if T is None:
        return step, check_validation_input(validation_input, step.d_input, batch)
    x = None if validation_input is None else check_validation_input(validation_input, step.d_input, batch)
    return ChunkModule(step, T).eval().requires_grad_(False), chunk_validation_input(x, T, step.d_input, batch)

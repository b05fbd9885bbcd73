"""Chunk forms: T steps of a step form at once, for streams that arrive in frames.

A step form (:mod:`lrnnx_zoo.step_forms`) maps (u_t (B, d_in), s) -> (y_t (B, d_out), s'). Its
chunk form maps (u (B, T, d_in), s) -> (y (B, T, d_out), s_T) with the same packed state, so a
stream can switch between the two at any chunk boundary. At batch 1 a step graph's time is
per-node overhead and elementwise passes over the state (docs/performance.md, "Step graphs"); a chunk form
pays them once per T steps.

For a linear time-invariant system x_t = A x_{t-1} + B u_t, y_t = C x_t + D u_t, unrolling T
steps from x_{-1} gives (the block form of the recurrence, e.g. the "chunked" evaluation of
[S4] Sec. 3 / [Mamba-2] Sec. 6, here for one channel's small state):

    y_t     = sum_{j <= t} K_{t-j} u_j + C A^{t+1} x_{-1},      K_0 = C B + D,  K_l = C A^l B
    x_{T-1} = sum_j A^{T-1-j} B u_j + A^T x_{-1}

i.e. one matrix per channel, [y; x_{T-1}] = [[Toeplitz(K), O], [I, A^T]] [u; x_{-1}], with
O[t] = C A^{t+1} and I[:, j] = A^{T-1-j} B. Per-channel forms (one input per channel, as in S4D,
S4 and FFTConv kernels; the form declares ``channel_layout``) become one batched matmul over the
channels: :class:`ChannelChunkForm`. Its matrices come from the step form itself, probed in
float64 (its float32 buffers widened, and a pole kept as hi + lo summed back to full precision),
with the powers of A formed in float64 and rounded once. Any other form runs its step T times
(:class:`LoopChunkForm`): the same results, without the speed.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import reference_tensor
from .convolution import lower_toeplitz
from .hippo import krylov, power as matrix_power
from .shapes import positive_int
from .step_forms import (DiagonalStepForm, SequentialStepForm, StepForm, chosen_build_dtype, is_step_form,
                         poles_need_split, register_split, rotate, run_parts, step_form_dtype, stored, stored_split)

#: Bytes of probe states :func:`channel_system` runs through a form at once.
_PROBE_BYTES = 8 * 2**20

#: ``channel_layout`` values: how a per-channel form packs its state (batch, S) with S = H * n:
#: "last" as (batch, n, H) (channel last), "first" as (batch, H, n).
CHANNEL_LAYOUTS = ("last", "first")


def check_chunk(T: object) -> int:
    """T as a positive int (numpy ints too), else a ValueError saying what was expected."""
    value = positive_int(T)
    if value is None:
        raise ValueError(f"chunk must be a positive int (steps per chunk), got {T!r}")
    return value


def _to_channels(s: Tensor, H: int, layout: str) -> Tensor:
    """A packed state (batch, H * n) -> (H, n, batch)."""
    batch, n = s.shape[0], s.shape[1] // H       # n given: a -1 beside a batch of 0 is ambiguous
    if layout == "last":
        return s.reshape(batch, n, H).permute(2, 1, 0)
    return s.reshape(batch, H, n).permute(1, 2, 0)


def _from_channels(x: Tensor, layout: str) -> Tensor:
    """(H, n, batch) -> the packed state (batch, H * n)."""
    H, n, batch = x.shape
    if layout == "last":
        return x.permute(2, 1, 0).reshape(batch, n * H)
    return x.permute(2, 0, 1).reshape(batch, H * n)


@torch.no_grad()
def channel_system(form: nn.Module) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-channel system of a per-channel step form, read off the form in float64.

    The form must declare ``channel_layout`` (:data:`CHANNEL_LAYOUTS`) and be linear, time-invariant
    and separable by channel: input channel h drives only its own n = state_size / H states and
    outputs y[c, h] (output flattened channel-major, (batch, Ch * H)). One call with n + 1 probes
    (each state basis vector in every channel at once, and a unit input) gives

        A: (H, n, n), B: (H, n), CA: (Ch, H, n) = C A, K0: (Ch, H) = C B + D,

    since the form returns y = C x' + D u of its new state x' = A x + B u.
    """
    layout = getattr(form, "channel_layout", None)
    if layout not in CHANNEL_LAYOUTS:
        raise ValueError(f"channel_system needs a step form with channel_layout in {CHANNEL_LAYOUTS}, "
                         f"got {type(form).__name__} with channel_layout={layout!r}")
    H, S = int(form.d_input), int(form.state_size)
    if S % H or form.d_output % H:
        raise ValueError(f"{type(form).__name__}: state_size={S} and d_output={form.d_output} must be multiples "
                         f"of d_input={H} for a per-channel form")
    n, Ch = S // H, form.d_output // H
    wide = copy.deepcopy(form).double()           # hi + lo pole pairs sum back to the full pole
    f64 = torch.float64
    dev = next((t.device for t in wide.buffers()), torch.device("cpu"))
    # The probes go through the form in groups of at most _PROBE_BYTES of state: all n + 1 at once
    # made every pass of the form over the state (n + 1) x S floats: 1.16 GB at d_model=256, N=256
    # for a 134 MB A (S4D), where each probe's results depend on its own row only.
    group = max(1, _PROBE_BYTES // (8 * S))
    x = torch.empty(H, n, n + 1, dtype=f64, device=dev)
    y = torch.empty(n + 1, Ch, H, dtype=f64, device=dev)
    for k0 in range(0, n + 1, group):
        k1 = min(n + 1, k0 + group)
        basis = torch.eye(n, dtype=f64, device=dev)[k0:min(k1, n)]                     # (probe k, state i)
        s = torch.cat([_from_channels(basis.unsqueeze(-1).expand(-1, n, H).permute(2, 1, 0), layout),
                       torch.zeros(k1 - k0 - basis.shape[0], S, dtype=f64, device=dev)])   # e_k in every channel
        u = torch.zeros(k1 - k0, H, dtype=f64, device=dev)
        if k1 == n + 1:
            u[-1] = 1                                                                  # the unit input
        y_k, s_next = wide(u, s)
        x[:, :, k0:k1] = _to_channels(s_next, H, layout)
        y[k0:k1] = y_k.reshape(k1 - k0, Ch, H)
    A, B = x[:, :, :n], x[:, :, n]
    return A, B, y[:n].permute(1, 2, 0), y[n]


def rotation_parts(A: Tensor, AT: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """For per-channel A: (H, n, n) acting on [Re x; Im x] as a diagonal complex system (nonzero
    only at (i, i) and (i, i +- n/2)), A^T's two parts as (H, n) rows: x' = re * x + im * swap(x)
    with swap exchanging the halves. None when A has any other nonzero entry (then neither has
    this form). Products of such matrices keep the pattern exactly, so A's zeros decide."""
    n = A.shape[-1]
    if n % 2:
        return None
    eye = torch.eye(n, dtype=torch.bool, device=A.device)
    cross = eye.roll(n // 2, dims=1)                          # (i, (i + n/2) mod n)
    # nonzeros counted, not gathered: A[:, ~(eye | cross)] copied almost all of A (134 MB at H = n = 256)
    if int(torch.count_nonzero(A)) != int(torch.count_nonzero(A[:, eye | cross])):
        return None
    return AT[:, eye], AT[:, cross]


class ChannelChunkForm(StepForm):
    """T steps of a per-channel LTI step form as one batched matmul over channels (module docstring).

    Args:
        form: a step form with ``channel_layout`` (:func:`channel_system` reads its system).
        T: steps per chunk.
    forward(u: (B, T, H), s: (B, S)) -> (y: (B, T, Ch * H), s': (B, S)), the form's state layout.
    Buffers (float64-built, stored in the build dtype): ``W_out`` (H, Ch * T, T + n) maps
    [u; x] to the chunk's outputs; ``W_state`` (H, n, T + n) to the next state's change x' - x, or for a diagonal
    system (:func:`rotation_parts`) ``W_state`` (H, n, T) maps u and A^T applies elementwise.
    """

    def __init__(self, form: nn.Module, T: int) -> None:
        super().__init__()
        T = check_chunk(T)
        A, B, CA, K0 = channel_system(form)
        H, n = B.shape
        Ch = CA.shape[0]
        self.T, self.H, self.n, self.channels, self.layout = T, H, n, Ch, form.channel_layout
        self.state_size, self.d_input, self.d_output = int(form.state_size), H, int(form.d_output)
        # A^k B and C A^{k+1} for k < T from the powers A^k, each dropped once used: keeping all T + 1
        # (H, n, n) float64 powers (and a stacked copy) made the build peak at 630x the chunk's weights
        # (S4D d_model=64, N=256, T=48: 4.5 GB for 7.2 MB; a review)
        # A diagonal system on [Re x; Im x] (:func:`rotation_parts`) keeps its powers as their two
        # (H, n) parts, O(H n) a power: the dense (H, n, n) powers, O(H n^3) a product, took the chunk
        # build of a 2-block d_model=256, N=256 S4D at T=32 to 89 s and +1.4 GB (no chunk: 2 s, 0.14 GB)
        rotation = rotation_parts(A, A)
        if rotation is None:
            # Krylov blocks by doubling, O(log T) products: forming each power A^k, an O(H n^3) product
            # a step, made an S4 chunk build (d_model=128, N=64) take 6.2 s at T=128
            AkB = krylov(T, A, B).transpose(1, 2)                                      # (H, T, n): A^k B
            free = krylov(T, A.transpose(-1, -2), CA).transpose(-1, -2)                # (Ch, H, T, n): C A^{t+1}
            power = matrix_power(T, A)                                                 # A^T
        else:
            # A^k[i, i] = diag[i], A^k[i, i + n/2 mod n] = cross[i]; rolling by n/2 pairs i with i + n/2
            (d, c), h = rotation, n // 2
            diag, cross = torch.ones_like(d), torch.zeros_like(c)
            AkB_list, CAk = [], []
            for _ in range(T):
                AkB_list.append(diag * B + cross * B.roll(h, 1))
                CAk.append(CA * diag + (CA * cross).roll(h, -1))
                diag, cross = d * diag + c * cross.roll(h, 1), d * cross + c * diag.roll(h, 1)
            rotation = diag, cross                                                     # A^T's parts
            AkB, free = torch.stack(AkB_list, 1), torch.stack(CAk, 2)                  # (H, T, n), (Ch, H, T, n)
        # x_{T-1}'s input columns A^{T-1-j} B, and the kernel's taps K_l = (C A) A^{l-1} B for l >= 1
        taps = torch.einsum("chn,hkn->chk", CA, AkB[:, :T - 1])                       # (Ch, H, T - 1): K_1..K_{T-1}
        toeplitz = lower_toeplitz(torch.cat([K0.unsqueeze(-1), taps], -1))            # (Ch, H, T, T)
        top = torch.cat([toeplitz, free], -1).permute(1, 0, 2, 3).reshape(H, Ch * T, T + n)
        inputs = AkB.flip(1).transpose(1, 2)                                           # (H, n, T)
        self.register_buffer("W_out", stored(top))              # y from [u; x]: (H, Ch T, T + n)
        if rotation is None:
            # A dense A^T: x_next = x + [inputs, A^T - I] [u; x] in one matmul too, A^T - I formed
            # before rounding like the dense step form's A - I: a slow system's A^T is close to I and
            # rounded once it lost the digits of A^T - I every chunk (S4 LegS N=64, dt 1e-5, 16384
            # steps: 3.8e-5 of max|y| from float64 at T=1, 4.5e-6 at T=4, the step graph 3.5e-7).
            eye = torch.eye(n, dtype=A.dtype, device=A.device)
            self.register_buffer("W_state", stored(torch.cat([inputs, power - eye], -1)))      # (H, n, T + n)
            self.rotation = False
        else:
            # A diagonal system on [Re x; Im x]: A^T is a rotation as well, applied elementwise. As an
            # (n, n) block it was half of the chunk's matrices, which at batch 1 are read from memory
            # once per call: a 4-block d_model=128 S4D at T=32, batch 1, 26 -> 16 us per step (busy
            # machine, as the A/B of one run). Kept as hi + lo like the step
            # forms' poles (stored_split): rounded once, a pole's error returns every chunk.
            self.register_buffer("W_state", stored(inputs))                                 # (H, n, T)
            register_split(self, "trans_re", rotation[0].reshape(H, 2, n // 2, 1))        # (H, 2, n/2, 1)
            register_split(self, "trans_im", rotation[1].reshape(H, 2, n // 2, 1))
            self.rotation = True

    def forward(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        batch = u.shape[0]
        x = _to_channels(s, self.H, self.layout)                                       # (H, n, batch)
        u = u.permute(2, 1, 0)                                                         # (H, T, batch)
        v = torch.cat([u, x], 1)                                                       # (H, T + n, batch)
        y = (self.W_out @ v).reshape(self.H, self.channels, self.T, batch).permute(3, 2, 1, 0)
        if not self.rotation:
            x_next = x + self.W_state @ v
        else:                               # A^T x + inputs, on the halves [Re x; Im x] (step_forms.rotate)
            pairs = (self.H, 2, self.n // 2, batch)
            x_next = rotate(x.reshape(pairs), self.trans_re, self.trans_im, self.trans_re_lo, self.trans_im_lo,
                            (self.W_state @ u).reshape(pairs)).reshape(self.H, self.n, batch)
        return y.reshape(batch, self.T, self.d_output), _from_channels(x_next, self.layout)

    def extra_repr(self) -> str:
        return f"T={self.T}, " + super().extra_repr()


class DiagonalChunkForm(StepForm):
    """T steps of a :class:`~lrnnx_zoo.step_forms.DiagonalStepForm` (modes shared by all inputs, as
    in LRU): the input projection for all T steps at once, each mode's recurrence over the chunk
    as one small matmul, the readout for all T steps at once.

    Per mode m (complex), X_t = lam^{t+1} x_{-1} + sum_{j <= t} lam^{t-j} U_j with U = B u: as reals,
    [Re X; Im X] = [[Re L, -Im L, Re p, -Im p], [Im L, Re L, Im p, Re p]] [Re U; Im U; Re x; Im x]
    with L[t, j] = lam^{t-j} (t >= j) and p[t] = lam^{t+1}: ``W`` (M, 2T, 2T + 2). The chunk's last
    state is X_{T-1}. The unfused form reads y_t = X_t R + u_t D; the fused one y_t = X_{t-1} (P R) +
    u_t (Q R + S), the blocks of its matrix, read as stored. lam is read as the form holds it (hi + lo
    unfused, one rounding fused) and its powers formed in float64, rounded once.
    forward(u: (B, T, H_in), s: (B, 2M)) -> (y: (B, T, H_out), s': (B, 2M)).
    """

    def __init__(self, form: nn.Module, T: int) -> None:
        super().__init__()
        T = check_chunk(T)
        M = form.M
        wide = copy.deepcopy(form).double()
        if form.fused:
            W = wide.W
            lam = torch.complex(torch.diagonal(W[:M, :M]), torch.diagonal(W[:M, M:2 * M]))
            Q, R, S = W[2 * M:, :2 * M], W[:2 * M, 2 * M:], W[2 * M:, 2 * M:]
        else:
            re = wide.lam_re[0] + (0 if wide.lam_re_lo is None else wide.lam_re_lo[0])
            im = wide.lam_im[1] + (0 if wide.lam_im_lo is None else wide.lam_im_lo[1])
            lam, Q, R, S = torch.complex(re, im), wide.B_pair, wide.C_pair, wide.D
        self.T, self.M, self.reads_previous = T, M, bool(form.fused)
        self.state_size, self.d_input, self.d_output = int(form.state_size), form.d_input, form.d_output
        lam = lam.to(torch.complex128)
        # lam^0 .. lam^T by products (a pole of 0 has no logarithm), T roundings of float64
        pw = torch.cat([torch.ones_like(lam).unsqueeze(1), torch.cumprod(lam.unsqueeze(1).expand(M, T), 1)], 1)
        L = lower_toeplitz(pw[:, :T])                                                        # (M, T, T)
        p = pw[:, 1:].unsqueeze(-1)                                                          # (M, T, 1)
        top = torch.cat([L.real, -L.imag, p.real, -p.imag], -1)
        bottom = torch.cat([L.imag, L.real, p.imag, p.real], -1)
        W = torch.cat([top, bottom], 1)                                                      # (M, 2T, 2T + 2)
        # The carried powers lam^{t+1} (the last two columns) as hi + lo where the form keeps its poles
        # so (unfused and poles_need_split): rounded once, lam^T's error returned every chunk, and a
        # pole within 1e-5 of the circle drifted to 2.1e-4 of max|y| over 65,536 steps in chunks of 4.
        split = not form.fused and poles_need_split(lam)
        carried, carried_lo = stored_split(W[..., 2 * T:]) if split else (None, None)
        self.register_buffer("W", stored(W) if carried_lo is None else torch.cat([stored(W[..., :2 * T]), carried], -1))
        self.register_buffer("W_lo", carried_lo)                                             # (M, 2T, 2) or None
        self.register_buffer("Q", stored(Q))                                                 # (H_in, 2M)
        self.register_buffer("R", stored(R))                                                 # (2M, H_out)
        self.register_buffer("S", None if S is None else stored(S))                         # (H_in, H_out)

    def forward(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        batch, T, M = u.shape[0], self.T, self.M
        U = (u @ self.Q).reshape(batch, T, 2, M).permute(3, 2, 1, 0).reshape(M, 2 * T, batch)
        x = s.reshape(batch, 2, M).permute(2, 1, 0)                                          # (M, 2, batch)
        if self.W_lo is None:
            X = self.W @ torch.cat([U, x], 1)
        else:       # the lo parts join the small terms first, where their bits survive (step_forms.rotate)
            X = (self.W[..., :2 * T] @ U + self.W_lo @ x) + self.W[..., 2 * T:] @ x
        X = X.reshape(M, 2, T, batch).permute(3, 2, 1, 0).reshape(batch, T, 2 * M)
        read = torch.cat([s.unsqueeze(1), X[:, :-1]], 1) if self.reads_previous else X
        y = read @ self.R
        if self.S is not None:
            y = y + u @ self.S
        return y, X[:, -1]

    def extra_repr(self) -> str:
        return f"T={self.T}, " + super().extra_repr()


class LoopChunkForm(StepForm):
    """T steps of any step form, one after another (a form without a closed chunk form)."""

    def __init__(self, form: nn.Module, T: int) -> None:
        super().__init__()
        self.T = check_chunk(T)
        self.form = form
        # widths as the form declares them: optional for a plugin's own form (docs/plugins.md, "The layer contract")
        self.state_size = int(form.state_size)
        self.d_input, self.d_output = getattr(form, "d_input", None), getattr(form, "d_output", None)

    def forward(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        ys = []
        for t in range(self.T):
            y, s = self.form(u[:, t], s)
            ys.append(y)
        return torch.stack(ys, 1), s


class PointwiseChunk(nn.Module):
    """A stateless per-step map (a Linear, an activation) applied to every step of a chunk:
    (B, T, d) flattened to (B * T, d) so that it sees what it sees in a step."""

    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.part = part

    def forward(self, u: Tensor) -> Tensor:
        y = self.part(u.reshape(-1, u.shape[-1]))
        return y.reshape(u.shape[0], u.shape[1], y.shape[-1])


class SequentialChunkForm(StepForm):
    """The chunk form of a :class:`~lrnnx_zoo.step_forms.SequentialStepForm`: its parts' chunk
    forms and pointwise maps in order, on the same packed state."""

    def __init__(self, form: SequentialStepForm, T: int) -> None:
        super().__init__()
        self.T = check_chunk(T)
        self.parts = nn.ModuleList(chunk_form(p, T) if is_step_form(p) else PointwiseChunk(p)
                                   for p in form.parts)
        self.offsets: List[Tuple[int, int]] = list(form.offsets)
        self.state_size, self.d_input, self.d_output = form.state_size, form.d_input, form.d_output

    def forward(self, u: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        return run_parts(self.parts, self.offsets, u, s)


def chunk_form(form: nn.Module, T: int, closed: Optional[bool] = None) -> StepForm:
    """The chunk form of ``form`` for T steps: (u (B, T, d_in), s) -> (y (B, T, d_out), s_T).

    A per-channel LTI form (``channel_layout``) gets :class:`ChannelChunkForm`, a
    DiagonalStepForm :class:`DiagonalChunkForm`, a SequentialStepForm its parts' chunk forms, a
    form with a ``chunk_form(T)`` method what it returns, any other form :class:`LoopChunkForm`
    (T steps unrolled: the same results). ``closed=False`` forces the loop, e.g. as a reference for
    a closed form (None and True: the closed form where there is one).

    The matrices are stored in the dtype of an enclosing :func:`~lrnnx_zoo.step_forms.step_form_dtype`,
    else in the form's own (:func:`~lrnnx_zoo.base.reference_tensor`'s dtype): a float64 form's chunk
    form was stored in torch's default float32, and failed on float64 input ("expected scalar type Float").
    """
    T = check_chunk(T)
    if chosen_build_dtype() is not None:
        return _chunk_form(form, T, closed)
    with step_form_dtype(reference_tensor(form).dtype):
        return _chunk_form(form, T, closed)


def _chunk_form(form: nn.Module, T: int, closed: Optional[bool]) -> StepForm:
    """:func:`chunk_form` in the build dtype chosen."""
    if closed is False:
        return LoopChunkForm(form, T)
    if isinstance(form, SequentialStepForm):
        return SequentialChunkForm(form, T)
    if isinstance(form, DiagonalStepForm):
        return DiagonalChunkForm(form, T)
    if getattr(form, "channel_layout", None) in CHANNEL_LAYOUTS:
        return ChannelChunkForm(form, T)
    own = getattr(form, "chunk_form", None)          # a third-party form's own closed chunk form
    return own(T) if callable(own) else LoopChunkForm(form, T)

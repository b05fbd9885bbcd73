"""Recurrent (step) modes of an NPLR kernel: building the real step forms and stepping with them.

A mixin for :class:`~plugins.s4.kernel.SSKernelNPLR`, which provides ``dense_system()``,
``output_matrix()``, ``continuous()``, ``discretization``, ``d_model``, ``d_state``, ``channels``.
All modes run the system at rate 1 with the plain C (recovered from the stored C~ in float64).

States:
- the kernel state (``default_state``) is x in the NPLR basis, (B, H, N/2) complex: what state
  passing (``forward(state=...)``, ``forward_state``) and the dense / linear step modes use;
- the diagonal step mode keeps z = V^{-1} [Re x, Im x] in the eigenbasis of A_bar, (B, H, N) complex.
``pack_state`` / ``unpack_state`` map the kernel state to and from the real (B, state_size) state
of the step form built last by ``step_form`` (the hook FFTConvS4 uses).
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from lrnnx_zoo.base import check_floating, current_form, lasting_tensors, unchanged, weights_and_versions
from lrnnx_zoo.ssm_kernel import check_batch_shape, passed_state_dtype
from lrnnx_zoo.step_forms import StepForm, build_dtype, pack_modes, step_form_dtype, unpack_modes

from . import dense
from .step import DiagonalAccuracyError, dense_form, diagonal_form, linear_form

__all__ = ["StepModes", "STEP_MODES"]

STEP_MODES = ("dense", "linear", "diagonal")


class StepModes:
    """Step modes "dense", "linear" (bilinear DPLR step) and "diagonal" (see plugins.s4.step)."""

    _step_mode: Optional[str] = None
    _stepper: Optional[StepForm] = None  # kept out of the module tree (not in state_dict); _apply moves it
    _basis: Optional[Tensor] = None      # eigenvectors V (H, N, N) of the last diagonal form built
    _built: Optional[str] = None         # the mode of the last form built (its state layout)

    @torch.no_grad()
    def step_form(self, mode: str = "auto", D: Optional[Tensor] = None, tol: Optional[float] = None) -> StepForm:
        """The discretised system (rate 1) as a real StepForm (B, H) -> (B, C*H), with optional skip D (C, H).

        mode: "dense" (ChannelDenseStepForm), "linear" (ChannelDPLRStepForm; bilinear only),
        "diagonal" (ChannelDiagonalStepForm; refused when its predicted error in the dtype it is built
        in (:func:`~lrnnx_zoo.step_forms.step_form_dtype`) exceeds ``tol``, default 1e-4), or "auto":
        diagonal when its predicted float32 error is below ``tol`` (default 5e-5; the prediction
        overestimates the measured error 2-10x), else linear (bilinear) or dense (zoh).
        """
        # NaN switched the accuracy check off (err > nan is False): a diagonal form 198% off was taken
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0):
            raise ValueError(f"step_form / setup_step need tol to be a number > 0 (the largest predicted relative "
                             f"error of a diagonal form; math.inf skips the check) or None, got {tol!r}")
        if mode not in STEP_MODES + ("auto",):
            raise ValueError(f"step mode must be one of {STEP_MODES + ('auto',)}, got {mode!r}")
        if mode == "linear" and self.discretization != "bilinear":
            raise ValueError("the linear (DPLR) step is the bilinear step; with zoh use mode='dense' or 'diagonal'")
        # a solve with I - A_bar^L: computed once, also when "auto" falls back; from the stored C~, as a
        # copy loaded from the state_dict has it (a running stream keeps its form: restated_since)
        C = self.output_matrix()
        self._basis, self._built = None, None
        A_bar = b_bar = None
        if mode in ("auto", "diagonal"):
            A_bar, b_bar = self.dense_system()
            try:
                limit = (1e-4 if mode == "diagonal" else 5e-5) if tol is None else tol
                # Asked for, the form is judged in the precision it is stored in (a float64 LegS N=6 form
                # is 8e-15 off, and was refused as "off by ~3.5e-04"); "auto" judges it in float32 whatever
                # the dtype, so a float64 layer keeps the exact linear / dense form where float32 would not do.
                precision = build_dtype() if mode == "diagonal" else torch.float32
                form, _, V = diagonal_form(A_bar, b_bar, dense.output_row(C), D, tol=limit, precision=precision)
                return self._built_form(form, "diagonal", V)
            except DiagonalAccuracyError:
                if mode == "diagonal":
                    raise
            mode = "linear" if self.discretization == "bilinear" else "dense"
        if mode == "linear":
            w, P, B, _, dt = self.continuous(double=True)
            return self._built_form(linear_form(w, P, B, C, dt, D), "linear")
        if A_bar is None:
            A_bar, b_bar = self.dense_system()
        return self._built_form(dense_form(A_bar, b_bar, dense.output_row(C), D), "dense")

    def _built_form(self, form: StepForm, built: str, basis: Optional[Tensor] = None) -> StepForm:
        """Remember the state layout of the form just built, on the kernel (the last built: setup_step
        and :meth:`step` use it) and on the form itself, so that :meth:`pack_state` given the form
        packs for that form even after another one was built (FFTConvS4 and the S4 layer keep theirs;
        a user's kernel.step_form('dense') in between made them pack in the dense layout)."""
        self._basis, self._built = basis, built
        object.__setattr__(form, "_nplr_layout", (built, basis))
        return form

    def _apply(self, fn, recurse=True):
        """Module._apply (behind .to(), .cuda(), .double(), ...), also taking the step form
        and eigenbasis, kept out of the module tree, to the parameters' new device: left behind,
        the next step() after model.cuda() failed with a device mismatch. Their dtype stays (run
        setup_step again after a dtype change, to build them in the new precision). A move gives the
        weights new data, not new values: a form current before it stands for them after it too (else
        step() rebuilt it on the new device and compared it with the moved one, element by element)."""
        setup = self.__dict__.get("_stepper_setup")
        current = self._stepper is not None and setup is not None and unchanged(setup[2])
        out = super()._apply(fn, recurse)
        device = self.log_dt.device
        if self._stepper is not None:
            self._stepper.to(device)
        if current:
            object.__setattr__(self, "_stepper_setup", (*setup[:2], weights_and_versions(self)))
        if self._basis is not None:
            object.__setattr__(self, "_basis", self._basis.to(device))
        return out

    def setup_step(self, mode: str = "dense", tol: Optional[float] = None) -> None:
        """Freeze the current parameters into the step form of ``mode`` for :meth:`step`
        (call again after the parameters change or a dtype change; a device move takes it along).
        "diagonal" changes the state layout of :meth:`default_state` / :meth:`step` to
        eigen-coordinates (B, H, N)."""
        with lasting_tensors(), step_form_dtype(self._real_dtype):   # kept: no inference tensors
            form = self.step_form(mode, tol=tol)
        object.__setattr__(self, "_stepper", form)
        object.__setattr__(self, "_stepper_setup", (self._built, tol, weights_and_versions(self)))
        self._step_mode = self._built     # with "auto", the state layout follows the form chosen

    def default_state(self, *batch_shape: int) -> Tensor:
        """Zero state (*batch_shape, H, N/2) complex (NPLR basis, x_{-1}); after
        ``setup_step("diagonal")``: (*batch_shape, H, N) eigen-coordinates."""
        batch_shape = check_batch_shape(type(self).__name__, batch_shape)
        n = self.d_state if self._step_mode == "diagonal" else self.d_state // 2
        return torch.zeros(*batch_shape, self.d_model, n, dtype=self.state_dtype, device=self.log_dt.device)

    def step(self, u: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """One step with the form of :meth:`setup_step`.  u: (B, H), state like :meth:`default_state`
        -> y: (B, C, H) (no skip term), next state in the same layout and dtype
        (:func:`~lrnnx_zoo.ssm_kernel.passed_state_dtype`; the step runs in the form's precision)."""
        if self._stepper is None:
            raise RuntimeError("call setup_step(mode) before step(), and again after loading weights "
                               "(load_state_dict); modes: " + ", ".join(STEP_MODES))
        # first: a cast (.double()) gave the tensors new data, and current_form would rebuild the form in the new dtype
        built = next(self._stepper.buffers()).dtype
        if built != self._real_dtype:
            raise RuntimeError(f"the step form was built in {built} and the kernel now holds {self._real_dtype} "
                               f"parameters: call setup_step({self._step_mode!r}) again after a dtype change")
        mode, tol, weights = self._stepper_setup
        form, weights = current_form(
            self, self._stepper, weights, lambda: self.step_form(mode, tol=tol), self._real_dtype,
            lambda: f"{type(self).__name__}.step: its weights changed since setup_step() (an optimiser step or an "
            f"in-place edit), so the step form is stale; call setup_step({mode!r}) again and restart from "
            f"default_state(batch)")
        object.__setattr__(self, "_stepper", form)
        object.__setattr__(self, "_stepper_setup", (mode, tol, weights))
        who = f"{type(self).__name__}.step"
        H, n = self.d_model, (self.d_state if self._step_mode == "diagonal" else self.d_state // 2)
        if (not isinstance(u, Tensor) or u.dim() != 2 or u.shape[1] != H or not isinstance(state, Tensor)
                or state.shape != (u.shape[0], H, n)):
            # These failed inside the step form (reshape, broadcast and matmul errors).
            shape = lambda t: tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__     # noqa: E731
            raise ValueError(f"{who} expects u of shape (batch, H={H}) and a state of shape (batch, {H}, {n}) "
                             f"(default_state(batch)), got u {shape(u)} and state {shape(state)}")
        # e.g. torch.zeros(B, H, n): to_real below failed on it ("imag is not implemented for ... non-complex
        # dtypes"). The next state comes back in its dtype (complex), as from every kernel (passed_state_dtype)
        state = state.to(passed_state_dtype(state))
        if u.dtype != built:
            check_floating(u, who, autocast_hint=False)
            raise TypeError(f"{who}: the step form holds {built}, got u of {u.dtype}; convert u (u.to({built})) "
                            f"or the module (.to({u.dtype})) and call setup_step again")
        Bsz = u.shape[0]
        if self._step_mode == "dense":
            y, s = self._stepper(u, dense.to_real(state).reshape(Bsz, -1).to(u.dtype))
            nxt = dense.from_real(s.reshape(Bsz, self.d_model, self.d_state))
        else:                   # linear: x, diagonal: eigen-coordinates, both in the modal layout
            y, s = self._stepper(u, pack_modes(state).to(u.dtype))
            nxt = unpack_modes(s, self.d_model).reshape(state.shape)
        return y.reshape(Bsz, self.channels, self.d_model), nxt.to(state.dtype)

    def _layout(self, form: Optional[StepForm], device: torch.device) -> Tuple[Optional[str], Optional[Tensor]]:
        """(mode, eigenbasis) of ``form`` (as :meth:`_built_form` tagged it), else of the form built last."""
        built, basis = getattr(form, "_nplr_layout", None) or (self._built, self._basis)
        return built, (None if basis is None else basis.to(device))

    def pack_state(self, state: Tensor, form: Optional[StepForm] = None) -> Tensor:
        """Kernel state (B, H, N/2) -> real state (B, state_size) of ``form`` (default: the form built last)."""
        Bsz = state.shape[0]
        built, basis = self._layout(form, state.device)
        if built == "linear":                                                 # [Re x; Im x], channels last
            return pack_modes(state).to(self._real_dtype)
        r = dense.to_real(state)                                              # (B, H, N)
        if basis is None:                                                     # dense: [h][Re x, Im x]
            return r.reshape(Bsz, -1).to(self._real_dtype)
        z = dense.solve_per_channel(basis, r)                                 # V^{-1} r
        return pack_modes(z).to(self._real_dtype)

    def unpack_state(self, s: Tensor, form: Optional[StepForm] = None) -> Tensor:
        """Inverse of :meth:`pack_state`: (B, state_size) -> (B, H, N/2) (:attr:`state_dtype`)."""
        Bsz, H, N = s.shape[0], self.d_model, self.d_state
        built, basis = self._layout(form, s.device)
        if built == "linear":
            return unpack_modes(s, H).to(self.state_dtype)
        if basis is None:
            return dense.from_real(s.reshape(Bsz, H, N)).to(self.state_dtype)
        z = unpack_modes(s, H).to(basis.dtype)
        r = dense.per_channel(basis, z).real
        return dense.from_real(r).to(self.state_dtype)

    @property
    def _real_dtype(self) -> torch.dtype:
        return torch.float64 if self.state_dtype == torch.complex128 else torch.float32

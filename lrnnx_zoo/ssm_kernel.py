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
Kernels without a dt (already-discrete parameterisations) read their poles as the zero-order-hold
sampling of a continuous system (LRUKernel, :func:`~lrnnx_zoo.discretization.zoh_resample_diag`),
or accept only rate 1.

Families register kernel classes as backends of kind "ssm_kernel", so FFT convolution can wrap
any of them by name: ``registry.add_backend("ssm_kernel", "s4d", S4DKernel)``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from abc import abstractmethod
from typing import Any, Callable, ContextManager, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .base import (contents_equal, needs_autograd, operator_body, plain_settings, reference_tensor, right_aligned,
                   tensor_attributes, version_of as _version, without_autocast)
from .discretization import valid_rate
from .shapes import integer
from .step_forms import ChannelDenseStepForm, ChannelDiagonalStepForm, StepForm


def check_batch_shape(who: str, batch_shape: Tuple[Any, ...]) -> Tuple[int, ...]:
    """The batch sizes of a default_state as Python ints (numpy integers count, :func:`~lrnnx_zoo.shapes.integer`);
    a ValueError naming ``who`` unless each is an integer >= 0 (default_state(2.0) failed inside
    torch.zeros: "takes 1 positional argument but 3 were given")."""
    sizes = tuple(integer(b) for b in batch_shape)
    if any(b is None or b < 0 for b in sizes):
        raise ValueError(f"{who}.default_state(*batch_shape) needs batch sizes that are integers >= 0, got "
                         f"{batch_shape!r}")
    return sizes  # type: ignore[return-value]


def check_rate(rate: Any, who: str) -> float:
    """``rate`` as a float; a ValueError naming ``who`` unless it is a finite number > 0. The kernel
    uses dt / rate: rate 0 gave inf or NaN kernels, a negative rate a growing (unstable) one, silently.
    A 0-dim tensor is taken as its value (a window's tap count rounds l_max * rate, which a tensor
    refused, and a kernel cache keyed on a tensor never hit)."""
    if not valid_rate(rate):
        raise ValueError(f"{who} needs rate, the input's relative sampling rate (the kernel uses dt / rate), to be "
                         f"a finite number > 0, got {rate!r}")
    return float(rate)


def passed_state_dtype(state: Tensor) -> torch.dtype:
    """The dtype a kernel's next state comes back in, given the state it was passed: that state's,
    made complex (a real (B, H, S) state of a kernel whose state is complex is read as complex of
    its precision). The rule of every state-passing path (``forward(state=...)``, ``forward_state``,
    ``step``) whatever the kernel's own precision, which the arithmetic uses: the families
    disagreed (a complex128 state to a float32 s4d kernel came back complex64 from forward and
    complex128 from step, from the s4 kernel the other way round)."""
    return torch.promote_types(state.dtype, torch.complex64)


def final_kernel_state(kernel: "SSMKernel", u: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    """The kernel's state (B, H, S) after u: (B, L, H) from its zero state, at step ``lengths[b]``
    of each sequence (L when None): ``forward_state`` of the right-aligned input
    (:func:`~lrnnx_zoo.base.right_aligned`). What a layer's ``final_step_state`` packs (prefill)."""
    u = right_aligned(u, lengths).transpose(1, 2)
    return kernel.forward_state(u, kernel.default_state(u.shape[0]).to(u.device))


def kernel_final_step_state(kernel: "SSMKernel", form: nn.Module, u: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """:func:`final_kernel_state` packed into ``form``'s state (B, state_size) (:func:`pack_kernel_state`):
    the ``final_step_state`` (prefill) of a layer whose step form is its kernel's."""
    return pack_kernel_state(form, final_kernel_state(kernel, u, lengths), kernel)


def pack_kernel_state(form: nn.Module, state: Tensor, kernel: Optional["SSMKernel"] = None) -> Tensor:
    """A kernel's state (B, H, S) as its step form's real state (B, state_size).

    - :class:`~lrnnx_zoo.step_forms.ChannelDiagonalStepForm`: its ``pack`` of x: (B, H, S) complex
      (or real, for a real diagonal system: zero imaginary parts);
    - :class:`~lrnnx_zoo.step_forms.ChannelDenseStepForm`: channel by channel, [Re x[h], Im x[h]]
      for a complex state (n = 2S per channel) or x[h] for a real one (n = S).
    A kernel with another layout provides ``pack_state(state, form)`` / ``unpack_state(s, form)`` itself.
    """
    if kernel is not None and hasattr(kernel, "pack_state"):
        return kernel.pack_state(state, form)
    B = state.shape[0]
    if isinstance(form, ChannelDiagonalStepForm):
        return form.pack(state).to(form.lam_re.dtype)
    if isinstance(form, ChannelDenseStepForm):
        if state.is_complex():
            return torch.cat([state.real, state.imag], -1).reshape(B, -1).to(form.B.dtype)
        return state.reshape(B, -1).to(form.B.dtype)
    raise TypeError(f"cannot map a kernel state of shape {tuple(state.shape)} onto a {type(form).__name__}: "
                    f"pass the step form's real state of shape (batch, {form.state_size}) instead, or give "
                    f"the kernel pack_state/unpack_state methods")


def unpack_kernel_state(form: nn.Module, s: Tensor, like: Tensor, kernel: Optional["SSMKernel"] = None) -> Tensor:
    """Inverse of :func:`pack_kernel_state`: s: (B, state_size) -> a state shaped and typed like ``like``."""
    if kernel is not None and hasattr(kernel, "unpack_state"):
        return kernel.unpack_state(s, form).to(like.dtype)      # a kernel's unpack gives its own dtype
    B = s.shape[0]
    if isinstance(form, ChannelDiagonalStepForm):
        x = form.unpack(s, form.H)
        return (x if like.is_complex() else x.real).reshape(like.shape).to(like.dtype)  # real: Im stays 0
    if isinstance(form, ChannelDenseStepForm):
        if like.is_complex():
            x = s.reshape(B, form.H, 2, -1)
            return torch.complex(x[:, :, 0], x[:, :, 1]).reshape(like.shape).to(like.dtype)
        return s.reshape(like.shape).to(like.dtype)
    raise TypeError(f"cannot map a {type(form).__name__} state back to the kernel's layout")


#: Every live kernel (:meth:`SSMKernel.__new__`), for the cached-spectrum operator, which is called
#: with a kernel's tensors (an operator takes tensors and numbers, not modules) and finds the kernel
#: that holds them (:func:`_kernel_holding`).
_KERNELS: "weakref.WeakSet[SSMKernel]" = weakref.WeakSet()
#: The kernel last found for each set of storages (their data pointers), checked before use.
_BY_STORAGE: "Dict[Tuple[int, ...], weakref.ref]" = {}
_KERNELS_LOCK = threading.Lock()      # a kernel made in one thread while another searches


class _OperatorFlag(threading.local):
    """Per thread: whether it runs a kernel for a compiled graph. ``active`` is a class attribute, so
    every thread has it from the start: an instance attribute appeared at the operator's first run,
    and dynamo, which had guarded on its absence, compiled every graph again at its second call."""
    active = False


_OPERATOR = _OperatorFlag()


def in_graph_operator() -> bool:
    """Whether this thread runs a kernel for a compiled graph (inside ``lrnnx_zoo::cached_spectrum``):
    eager code there, but under a graph's rules, so it writes no parameter or buffer (S4's C~ for a
    longer length is computed and not stored, as in a traced kernel); the operator declares none."""
    return _OPERATOR.active


class _KeepFlag(threading.local):
    """Per thread: whether kernels must leave their stored state as it is (:func:`stored_state_kept`);
    a class attribute, as :class:`_OperatorFlag`'s."""
    active = False


_KEEP = _KeepFlag()


def keeping_stored_state() -> bool:
    """Whether this thread's kernel calls run inside :func:`stored_state_kept`."""
    return _KEEP.active


@contextlib.contextmanager
def stored_state_kept() -> Iterator[None]:
    """Inside: kernels leave what they store as it is (S4 extends no stored C~ and length in place for a
    longer input; it computes C~ for that input on the call). A layer's calls without autograd run
    inside (:meth:`SSMKernel.spectrum`, :func:`kept_in_inference`): one evaluation or serving request
    longer than the training length made S4 run Algorithm 1 at that length in every later call (the
    shipped digits-s4 after one 16384-step evaluation: a 64-step evaluation 21 -> 427 ms, a training
    step 51 -> 1459 ms, 1.1 GB more at the peak)."""
    before = _KEEP.active
    _KEEP.active = True
    try:
        yield
    finally:
        _KEEP.active = before


def kept_in_inference(module: nn.Module, *inputs: Tensor) -> ContextManager[None]:
    """:func:`stored_state_kept` for a call of ``module`` on ``inputs`` without autograd
    (:func:`~lrnnx_zoo.base.needs_autograd`), else nothing: training extends as before. Nothing
    while compiling: a graph writes no stored state anyway, and the flag would be one more guard."""
    if torch.compiler.is_compiling() or needs_autograd(module, *inputs):
        return contextlib.nullcontext()
    return stored_state_kept()


@contextlib.contextmanager
def _graph_operator() -> Iterator[None]:
    before = in_graph_operator()
    _OPERATOR.active = True
    try:
        yield
    finally:
        _OPERATOR.active = before


def _versions(value: Any) -> Any:
    """The version counters of a cached tensor, or of each tensor of a cached tuple."""
    return tuple(_version(t) for t in value) if isinstance(value, tuple) else _version(value)


#: The inference kernel cache keeps, per kind (:func:`_kind`), the two most recent entries, and older
#: ones while the kind's entries hold at most this many bytes (and number at most KERNEL_CACHE_ENTRIES):
#: with two, evaluation cycling three lengths (a validation set's buckets) regenerated the kernel at
#: every call (B=4, H=64, N=64, L ~ 1000: S4 zoh 2.2 -> 20 ms a call, S4D 1.9 -> 5.1 ms). Per layer, so
#: small: a 12-block model keeps at most 192 MB more than the two newest spectra of each block.
KERNEL_CACHE_BYTES = 16 << 20
KERNEL_CACHE_ENTRIES = 8


def _nbytes(value: Any) -> int:
    """Bytes of a cached tensor, or of each tensor of a cached tuple."""
    parts = value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in parts if isinstance(t, Tensor))


def _kind(key: Tuple[Any, ...]) -> Any:
    """The kind of a :meth:`SSMKernel.cached_kernel` key, of which the most recent are kept
    (:data:`KERNEL_CACHE_BYTES`): kernels ((L, rate)) and spectra are one kind, a key starting with
    another string its own."""
    return key[0] if key and isinstance(key[0], str) and key[0] != "spectrum" else "kernel"


#: One level of :func:`_layout`: an owner (a weak reference to a module, whose attributes are read afresh: a
#: strong one from the kernel's own cache made every kernel a reference cycle, freed only by the garbage
#: collector; or one of its parameter, buffer and submodule dicts), its keys, the ids of its values, and the
#: values (held, so that no new object takes one of their ids: a float setting replaced may reuse the memory).
_Level = Tuple[Any, Tuple[str, ...], Tuple[int, ...], Tuple[Any, ...]]


def _module_attributes(module: nn.Module) -> Dict[str, Any]:
    """A copy of ``module``'s attributes without its kernel cache (replaced at every new result). A copy:
    another thread may add an attribute meanwhile."""
    attributes = vars(module).copy()
    attributes.pop("_kernel_cache", None)
    return attributes


def _layout(module: nn.Module) -> Tuple[_Level, ...]:
    """Where everything :meth:`SSMKernel._watched` and :meth:`SSMKernel._settings` read sits: for
    ``module`` and each submodule, its attributes, then its parameters, buffers and submodules (the
    dicts its attributes hold), each as (owner, keys, ids of the values, the values)."""
    levels: List[_Level] = []
    for sub in module.modules():
        attributes = _module_attributes(sub)
        values = tuple(attributes.values())
        levels.append((weakref.ref(sub), tuple(attributes), tuple(map(id, values)), values))
        for slot in ("_parameters", "_buffers", "_modules"):
            owned = dict(attributes.get(slot) or {})
            values = tuple(owned.values())
            levels.append((attributes.get(slot), tuple(owned), tuple(map(id, values)), values))
    return tuple(levels)


def _same_layout(layout: Tuple[_Level, ...]) -> bool:
    """Whether every level of ``layout`` (:func:`_layout`) holds the same keys and the same objects now.
    Then ``_watched()`` and ``_settings()`` would give what they gave when it was taken (the same tensors,
    and the same immutable plain values); a dict level is read only after its module's attributes showed
    that it is still the one they hold. ~1 us a level."""
    for owner, keys, ids, _ in layout:
        if isinstance(owner, weakref.ref):
            module = owner()
            if module is None:
                return False
            now = _module_attributes(module)
        else:
            now = dict(owner or {})
        if tuple(map(id, now.values())) != ids or tuple(now) != keys:
            return False
    return True


def _placement(t: Tensor) -> Tuple[Any, ...]:
    """What a probe's views of ``t`` (:func:`_probe`) stand for: t's data pointer, dtype, shape,
    strides, device and lazy conjugate / negative bits. Equal, t's data lies where the views read, laid out
    as when they were made; ``p.data = ...``, ``set_``, a resized storage change it. Checked before the views
    are read (a numpy view keeps a raw pointer, which a resized storage leaves dangling)."""
    return (t.data_ptr(), t.dtype, t.shape, t.stride(), t.device, t.is_conj(), t.is_neg())


#: Tensors of at most this many bytes are compared at a hit as bytes (:func:`_probe`): a copy and a memcmp,
#: 0.07 / 1.3 us for 512 B / 32 kB where numpy's elementwise comparison takes 1.2 / 2.2 us; past it numpy is faster.
PROBE_BYTES_COPIED = 64 << 10


def _arrays_equal(a: Any, b: Any) -> bool:
    """Whether two numpy arrays of one shape hold the same elements (vectorised)."""
    return bool((a == b).all())


def _bytes_equal(a: Any, b: bytes) -> bool:
    """Whether numpy array ``a`` holds the bytes ``b``."""
    return a.tobytes() == b


#: One watched tensor's probe: the tensor, its :func:`_placement`, views of its memory and of its copy, and
#: the function comparing them.
_Probe = Tuple[Tensor, Tuple[Any, ...], Any, Any, Callable[[Any, Any], bool]]


def _probe(t: Tensor, copy: Tensor) -> _Probe:
    """How a hit compares ``t`` with ``copy`` (``t.detach().clone()``): through views made once, of
    their memory as 64-bit integers (contiguous, a multiple of 8 bytes) or bytes (contiguous), on CPU as numpy
    arrays, compared as bytes up to :data:`PROBE_BYTES_COPIED`, else elementwise (vectorised: S4D's H=128,
    N=64 parameters in ~4 us where torch.equal took ~16 us element by element); off CPU with torch.equal.
    Bit for bit: NaNs equal themselves, 0.0 differs from -0.0. A non-contiguous or lazily conjugated tensor
    is compared by value, with torch.equal."""
    where = _placement(t)
    if t.is_contiguous() and copy.is_contiguous() and not (t.is_conj() or t.is_neg()) and t.numel() > 0:
        size = t.element_size()
        wide = t.numel() * size % 8 == 0 and t.storage_offset() * size % 8 == 0 and copy.storage_offset() == 0
        for bits in ((torch.int64, torch.uint8) if wide else (torch.uint8,)):
            try:
                live, saved = t.detach().view(-1).view(bits), copy.view(-1).view(bits)
            except (RuntimeError, TypeError):       # not a multiple of 8 bytes; a dtype without a view
                continue
            if live.device.type == "cpu":
                if live.numel() * live.element_size() <= PROBE_BYTES_COPIED:
                    return t, where, live.numpy(), saved.numpy().tobytes(), _bytes_equal
                return t, where, live.numpy(), saved.numpy(), _arrays_equal
            return t, where, live, saved, torch.equal
    return t, where, t.detach(), copy, torch.equal


def _probes_equal(probes: Tuple[_Probe, ...]) -> Optional[bool]:
    """Whether every probed tensor (:func:`_probe`) still equals its copy; None if one no longer reads the
    memory its probe views (:func:`_placement`)."""
    for t, where, live, saved, equal in probes:
        if _placement(t) != where:
            return None
        if not equal(live, saved):
            return False
    return True


#: The methods whose results :func:`_layout` stands for: a kernel overriding one compares by value at every call.
_LAYOUT_READERS = ("_watched", "_tensors", "_settings", "named_parameters", "named_buffers", "named_modules",
                   "modules")


class _Snapshot(NamedTuple):
    """What :meth:`SSMKernel.cached_kernel`'s results were computed from (:meth:`SSMKernel._snapshot`)."""
    #: :meth:`SSMKernel._settings`
    settings: Tuple[Tuple[str, Any], ...]
    #: (name, copy) of each :meth:`SSMKernel._watched` tensor
    copies: List[Tuple[str, Tensor]]
    #: :func:`_layout`, taken first
    layout: Tuple[_Level, ...]
    #: :func:`_probe` of each watched tensor; None where one has no memory to point at
    probes: Optional[Tuple[_Probe, ...]]


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

    def __new__(cls, *args: Any, **kwargs: Any) -> "SSMKernel":
        self = super().__new__(cls)        # copies too: deepcopy and unpickling call __new__
        with _KERNELS_LOCK:
            _KERNELS.add(self)
        return self

    def sharing_dense_work(self, L: int) -> ContextManager[None]:
        """A scope in which the kernel may reuse work between its step form and a state passing of
        L steps, as a prefill needs both (S4 overrides it: one discretisation and one chain of
        squares of its dense A_bar); the parameters must not change within. Default: nothing shared."""
        return contextlib.nullcontext()

    def cached_kernel(self, key: Tuple[Any, ...], compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, or its earlier result when called again in inference with the same key
        (e.g. (L, rate)), the same parameter contents and the same settings (:meth:`_settings`:
        discretization, backend, ... need not be in the key). Under autograd it always computes.

        Generating a kernel costs H*N*L work whatever the batch, as much as several FFT round
        trips of the input (benchmarks/bench_layers.py), and evaluation calls repeat it unchanged.
        The most recent results of each kind (:func:`_kind`) are kept, two at least and more while they
        hold at most :data:`KERNEL_CACHE_BYTES`: kernels and their spectra
        (:meth:`spectrum`) are one kind; a key whose first item is another string (S4's output matrix,
        its dense system) is its own, so that a prefill's dense work does not evict the forward's spectrum.
        ``compute()`` returns a tensor or a tuple of tensors (S4's dense system, a kernel's modes), each
        checked by its own version counter. It runs with torch.autocast off: a kernel cached inside an autocast region is reused
        outside it, and one whose matmuls had run in bfloat16 (S4D's: outputs 2.5e-3 off) stayed in
        every float32 evaluation after the region until the weights changed.
        """
        if needs_autograd(self) or not self.cache_inference_kernel or torch.compiler.is_compiling():
            return compute()      # a graph holds no state across calls (the spectrum: see spectrum())
        # Thread safety (one model serving several threads): the cache is an immutable pair
        # (snapshot, entries), entries a tuple of (key, tensor, version), read once per call and
        # replaced whole by one attribute assignment. A shared dict here was evicted by two threads
        # at once (KeyError) and iterated while another changed it (RuntimeError); a lost update
        # now only costs a recomputation.
        cache = self.__dict__.get("_kernel_cache")
        same = None if cache is None else self._same_contents(cache[0])
        if not same:
            cache = self._renewed(cache if same is None else None)
            self.__dict__["_kernel_cache"] = cache
        # A cached tensor is handed out as is (a copy would cost a kernel's worth of memory at
        # the peak); its version counter tells if a caller has since changed it in place.
        for i, (k, K, version) in enumerate(cache[1]):
            if k == key and _versions(K) == version:
                if i != len(cache[1]) - 1:      # most recently used last (a repeated call republishes nothing)
                    self._publish(cache, key, (key, K, version))
                return K
        with without_autocast(reference_tensor(self).device.type):
            K = compute()
        self._publish(cache, key, (key, K, _versions(K)))
        return K

    def _publish(self, cache: Tuple[Any, Tuple[Any, ...]], key: Tuple[Any, ...],
                 entry: Optional[Tuple[Any, Tensor, Optional[int]]]) -> None:
        """Replace ``key``'s entry of the cache now published (``entry`` last; None: drop it), keeping
        the most recent of its kind (:data:`KERNEL_CACHE_BYTES`), if that cache is still for ``cache``'s
        snapshot (else the parameters changed meanwhile, and the newer cache stays)."""
        now = self.__dict__.get("_kernel_cache")
        if now is None or now[0] is not cache[0]:
            return
        kept = tuple(e for e in now[1] if e[0] != key)
        if entry is not None:
            kind = _kind(key)
            same = [e for e in kept if _kind(e[0]) == kind]          # oldest first
            chosen, total = [entry], _nbytes(entry[1])
            for e in reversed(same):            # the newest older ones, while they fit
                size = _nbytes(e[1])
                if len(chosen) >= 2 and (len(chosen) >= KERNEL_CACHE_ENTRIES or total + size > KERNEL_CACHE_BYTES):
                    break
                chosen.append(e)
                total += size
            kept = tuple(e for e in kept if _kind(e[0]) != kind) + tuple(reversed(chosen))
        self.__dict__["_kernel_cache"] = (now[0], kept)

    def spectrum(self, L: int, n: int, rate: float = 1.0) -> Tensor:
        """rfft of the length-L kernel at transform size n: (C, H, n // 2 + 1) complex, cached
        like the kernel in inference (it is what :func:`~lrnnx_zoo.convolution.blocked_channel_conv`
        consumes, and costs C*H transforms, 1/B of the input's, on every uncached call).

        The spectrum replaces the kernel in the cache, and is transformed 16 channels at a time,
        so its generation holds the kernel, the spectrum and one block's padded copy at most.

        In a compiled inference graph this is one operator, ``lrnnx_zoo::cached_spectrum``, which
        runs this method eagerly, cache included, and hands the graph a copy (the compiler may reuse
        an operator's output buffer once it is dead, which would overwrite the cached one). Not in
        torch.export, whose program must stand alone (the operator finds its kernel among this
        process's live ones). Traced, the graph generated the kernel at every call: S4D's compiled
        forward took 8.5 ms against eager's 6.0, S4's 13.3 against 5.7, at (8, 1024, 128), one thread.
        """
        # Not from inside the operator: inductor's freezing folds it at compile time, while compiling.
        if (torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not in_graph_operator()
                and self.cache_inference_kernel and not needs_autograd(self)):
            tensors = [t for _, t in self._tensors()]
            if tensors:
                return _cached_spectrum_op(tensors, L, n, rate, self.channels, self.d_model, self.state_dtype)
        def compute() -> Tensor:
            K = self.checked_forward(L=L, rate=rate)[0]
            self._forget(K)
            Kf = torch.empty(*K.shape[:-1], n // 2 + 1, dtype=torch.promote_types(K.dtype, torch.complex64),
                             device=K.device)
            for h0 in range(0, K.shape[1], 16):
                Kf[:, h0:h0 + 16] = torch.fft.rfft(K[:, h0:h0 + 16], n=n)
            return Kf
        with kept_in_inference(self):       # an inference spectrum stores no longer length
            return self.cached_kernel(("spectrum", L, n, rate), compute)

    def __getstate__(self) -> dict:
        """The module's state without the inference kernel cache, for pickling and copy.deepcopy:
        a whole-module torch.save after an evaluation forward held the cached spectrum and a snapshot
        of the weights (S4D, H=32, N=16, L=4096: 1.1 MB for 6 kB of weights), and every deepcopy
        duplicated them. A copy builds its own cache at its first forward."""
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k != "_kernel_cache"}

    def _forget(self, T: Tensor) -> None:
        """Drop cache entries holding T (a kernel superseded by its spectrum). Nothing while compiling:
        a compiled graph caches nothing (:meth:`cached_kernel`), and reading the cache that eager
        calls filled made the graph guard on its entries (a recompile when eager calls changed them)."""
        if torch.compiler.is_compiling():
            return
        cache = self.__dict__.get("_kernel_cache")
        if cache is not None:
            for key in [k for k, t, _ in cache[1] if t is T]:
                self._publish(cache, key, None)

    @property
    def state_dtype(self) -> torch.dtype:
        """complex128 for a float64 kernel, else complex64: the dtype of :meth:`default_state`."""
        real = next((t.dtype for _, t in self._tensors() if t.is_floating_point()), torch.get_default_dtype())
        return torch.complex128 if real == torch.float64 else torch.complex64

    def _tensors(self) -> list:
        return list(self.named_parameters()) + list(self.named_buffers())

    def _settings(self) -> Tuple[Tuple[str, Any], ...]:
        """Plain public attributes (discretization, backend, ...): a change to any of them
        invalidates the cache like a change of parameters."""
        return plain_settings(self)

    def _watched(self) -> list:
        """(name, tensor) of what a cached result depends on: every parameter and buffer, and the public
        tensor attributes (:func:`~lrnnx_zoo.base.tensor_attributes`: the weight torch.nn.utils.prune
        applies, recomputed by a forward pre-hook; modes kept against its unchanged parameters were
        built from the weight before the hook ran and handed to later step forms, 4e-3 off forward)."""
        return self._tensors() + [(f"{i}:{name}", t) for i, (_, name, t) in enumerate(tensor_attributes(self))]

    def _renewed(self, cache: Optional[Tuple["_Snapshot", Tuple[Any, ...]]]) -> Tuple["_Snapshot", Tuple[Any, ...]]:
        """A cache for the kernel as it is now: the layout (:func:`_layout`, first: a change after it is seen
        at the next call), the settings, and every parameter, buffer and tensor attribute (:meth:`_watched`).
        Equal in settings, names and values to ``cache``'s snapshot (a parameter replaced by an equal one, a
        tensor attribute recomputed by prune's hook, a new private attribute), ``cache``'s results are kept
        with its copies and the probes that still apply (:func:`_probe`); else the snapshot holds new copies
        (kilobytes: the kernel they generate is larger) and no results. Values are compared through a probe
        that still applies, else by :func:`~lrnnx_zoo.base.contents_equal`: a pruned S4D kernel (H=128, N=64),
        whose hook makes one new tensor a call, takes ~the 80 us a hit took before probes, not 174."""
        layout = _layout(self)
        watched, settings = self._watched(), self._settings()
        old = None if cache is None else cache[0]
        same = (old is not None and settings == old.settings
                and [n for n, _ in watched] == [n for n, _ in old.copies])
        before: List[Optional[_Probe]] = [None] * len(watched)
        if same and old.probes is not None:
            before = [b if b[0] is t and _placement(t) == b[1] else None for (_, t), b in zip(watched, old.probes)]
        same = same and all(contents_equal((t,), (c,)) if b is None else b[4](b[2], b[3])
                            for (_, t), (_, c), b in zip(watched, old.copies, before))
        if not same:
            cache, before = None, [None] * len(watched)
        copies = old.copies if same else [(name, t.detach().clone()) for name, t in watched]
        probes: Optional[Tuple[_Probe, ...]] = None
        # the layout covers what these read as defined here; an override may read elsewhere (a global flag)
        if all(getattr(type(self), m) is getattr(SSMKernel, m) for m in _LAYOUT_READERS):
            try:
                probes = tuple(_probe(t, c) if b is None else b for (_, t), (_, c), b in zip(watched, copies, before))
            except (RuntimeError, TypeError, ValueError):   # a tensor without memory of its own to point at
                pass
        return _Snapshot(settings, copies, layout, probes), (() if cache is None else cache[1])

    def _same_contents(self, snapshot: "_Snapshot") -> Optional[bool]:
        """Whether the settings and every watched tensor are still the snapshot's, decided at a hit without
        gathering them again: while the layout is the snapshot's (:func:`_same_layout`: the same attributes,
        parameters, buffers and submodules, by identity), so are the watched tensors and the settings, and only
        their contents are compared, bit for bit (:func:`_probe`; S4D at H=128, N=64: 46 -> 17 us a call).
        None where that cannot decide (a layout changed, a tensor's data replaced): cached_kernel then compares
        by value (:meth:`_renewed`)."""
        if snapshot.probes is None or not _same_layout(snapshot.layout):
            return None
        return _probes_equal(snapshot.probes)

    @torch.no_grad()
    def resample_(self, rate: float) -> None:
        """Make this kernel, in place, the same continuous-time system sampled at ``rate``: from now
        on ``forward(L)`` equals the old ``forward(L, rate)``, and the step form and state passing
        follow. Done on the step itself, log dt <- log dt - log(rate) (dt' = dt / rate), so every
        evaluation path (kernel, spectrum, step form, state passing) and the saved weights see it.

        A kernel whose parameters are already discrete (one pole per sample, no ``log_dt``) has no
        timescale here: a NotImplementedError says so, unless it overrides this (LRUKernel: its poles
        read as a zero-order-hold sampling). Kernels storing something else that depends on dt
        override it too (S4's C~)."""
        rate = check_rate(rate, f"{type(self).__name__}.resample_")
        log_dt = getattr(self, "log_dt", None)
        if not isinstance(log_dt, Tensor):
            raise NotImplementedError(
                f"{type(self).__name__} has no timescale to resample: expected a continuous-time kernel with a "
                f"log_dt parameter, got one whose parameters are already discrete (one pole per sample). "
                f"Retrain it on data at the new sampling rate, or give {type(self).__name__} a resample_(rate) method")
        # in float64, rounded once to log_dt's precision
        log_dt.copy_((log_dt.to(torch.float64) - math.log(rate)).to(log_dt.dtype))

    @abstractmethod
    def forward(self, L: int, rate: float = 1.0, state: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """K: (C, H, L) real; K_state: (B, C, H, L) real if ``state`` is given, else None."""

    def checked_forward(self, L: int, rate: float = 1.0,
                        state: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """``self(L=L, rate=rate, state=state)`` held to :meth:`forward`'s shapes: a kernel of a plugin
        returning L - 1 taps was taken as given (the block's output silently off its step form), and K
        alone or transposed failed in the convolution ("start (0) + length (4) exceeds dimension size")."""
        out = self(L=L, rate=rate, state=state)
        C, H = getattr(self, "channels", None), getattr(self, "d_model", None)
        want = (C, H, L)

        def fits(t: Any, lead: int) -> bool:
            return (isinstance(t, Tensor) and t.dim() == 3 + lead and
                    all(w is None or w == g for w, g in zip(want, t.shape[lead:])))
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and fits(out[0], 0)
                and (out[1] is None if state is None else fits(out[1], state.dim() - 2))):
            got = (", ".join(f"{tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__ for t in out)
                   if isinstance(out, (tuple, list)) else type(out).__name__)
            raise TypeError(f"{type(self).__name__}.forward(L={L}, rate, state) must return (K (C={C}, H={H}, L={L}) "
                            f"(its channels, d_model), K_state (batch, C, H, L) given a state, else None); it "
                            f"returned {got}")
        return out[0], out[1]

    @abstractmethod
    def default_state(self, *batch_shape: int) -> Tensor:
        """A zero state of shape (*batch_shape, H, S)."""

    @abstractmethod
    def forward_state(self, u: Tensor, state: Tensor) -> Tensor:
        """The state after u: (B, H, L), starting from ``state``: (B, H, S)."""

    @abstractmethod
    def step_form(self) -> StepForm:
        """The discretised system as a real step module (B, H) -> (B, C*H)."""


def _kernel_holding(tensors: List[Tensor]) -> Optional[SSMKernel]:
    """The live kernel whose parameters and buffers are ``tensors`` (the same storages, in order), or None.
    Looked up by the storages first: searching every live kernel took 120 us with 48 of them, per layer
    and call (a compiled 24-layer model's inference 11.4 ms against eager's 8.2 at L=256)."""
    where = tuple(t.data_ptr() for t in tensors)
    ref = _BY_STORAGE.get(where)
    kernel = None if ref is None else ref()
    if kernel is not None and _holds(kernel, where):
        return kernel
    with _KERNELS_LOCK:
        kernels = list(_KERNELS)
        if len(_BY_STORAGE) > 2 * len(kernels) + 16:        # forget entries of kernels since freed or moved
            _BY_STORAGE.clear()
    for kernel in kernels:
        if _holds(kernel, where):
            _BY_STORAGE[where] = weakref.ref(kernel)
            return kernel
    return None


def _holds(kernel: SSMKernel, where: Tuple[int, ...]) -> bool:
    own = kernel._tensors()
    return len(own) == len(where) and all(t.data_ptr() == p for (_, t), p in zip(own, where))


@torch.library.custom_op("lrnnx_zoo::cached_spectrum", mutates_args=())
def _cached_spectrum_op(tensors: List[Tensor], L: int, n: int, rate: float, C: int, H: int,
                        dtype: torch.dtype) -> Tensor:
    """:meth:`SSMKernel.spectrum` of the kernel holding ``tensors`` (its parameters and buffers, which
    are graph inputs: a number identifying the kernel would be a constant the graph is guarded on,
    and every layer of a model compiled a graph of its own), eager, through the kernel cache, under
    :func:`in_graph_operator`: a copy of the (C, H, n // 2 + 1) spectrum."""
    kernel = _kernel_holding(tensors)
    if kernel is None:
        raise RuntimeError("lrnnx_zoo::cached_spectrum: no SSM kernel holds the tensors this compiled graph passes "
                           "(the graph was handed copies of a kernel's weights); set cache_inference_kernel = False on "
                           "the kernels before compiling, so that the graph generates the kernels itself")
    with operator_body(), _graph_operator():
        Kf = kernel.spectrum(L, n, rate)
    expected = (C, H, n // 2 + 1)
    if tuple(Kf.shape) != expected or Kf.dtype != dtype:
        raise RuntimeError(f"{type(kernel).__name__}.spectrum gave {tuple(Kf.shape)} {Kf.dtype}, but a compiled graph "
                           f"expects (channels, d_model, n // 2 + 1) = {expected} {dtype} (its kernel's channels, "
                           f"d_model and state_dtype); give the kernel attributes that describe its spectrum")
    return Kf.clone()


@_cached_spectrum_op.register_fake
def _cached_spectrum_fake(tensors: List[Tensor], L: int, n: int, rate: float, C: int, H: int,
                          dtype: torch.dtype) -> Tensor:
    return tensors[0].new_empty((C, H, n // 2 + 1), dtype=dtype)

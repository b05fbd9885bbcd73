"""The backbone: encoder -> n residual blocks around any registered layer -> pooling -> decoder.

    h_0 = W_enc u + b_enc
    h_{i+1} = h_i + Dropout(Post(Act(Layer_i(Norm_i(h_i)))))       (pre-norm residual block)
    y = W_dec Pool(Norm_f(h_n)) + b_dec

Post is a linear map, a GLU (linear to 2H, then a * sigmoid(b)) or nothing. Every part is
per-time-step except the layers, so the model streams with one state per layer (``step``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import Tensor, nn

from .base import (cache_owner, check_dense, check_floating, check_lengths, check_not_traced, check_parameters_for,
                   check_stream_batch, lengths_tensor, refuse_torchscript,
                   float32_under_autocast, made_by, mask_padding, stream_rows, valid_steps, values_only)
from .hub_save import HubMixin, resampled_info
from .registry import create_layer
from .shapes import positive_int
from .ssm_kernel import check_rate
from .thread_warnings import this_threads_warnings

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}
NORMS = ("layer", "batch", "none")
POSTS = ("glu", "linear", "none")
POOLINGS = (None, "mean", "last")
# Refuse configs describing more parameters than this before allocating anything: a typo such as
# d_model=10**9 would otherwise exhaust memory instead of raising.
MAX_PARAMETERS = 10**9
SIZE_KWARGS = ("d_state", "channels", "l_max", "rank")  # integer sizes layers take; l_max may be None
# d_state values of the stand-in layers ModelConfig.layer_shapes builds: three, so a size that does not
# follow d_state on a line is seen and left out; small, so their initialisation costs nothing
PROBE_STATES = (8, 16, 32)
#: The ModelConfig fields a trained model can change without touching its backbone's weights
#: (:meth:`SequenceModel.reconfigure`, ``from_pretrained(..., d_output=5)``): the encoder's input
#: width, the decoder's output width, the pooling (no weights) and the blocks' dropout (no weights).
ADAPTABLE = ("d_input", "d_output", "pooling", "dropout")


class ReinitializedWeightsWarning(UserWarning):
    """Some of a checkpoint's tensors were not loaded: the head its new sizes replace starts from a
    fresh initialisation (``from_pretrained(..., d_output=5)``, ``train(..., init_from=...)``) and
    needs training."""


def check_adaptation(changes: Dict[str, Any], who: str = "SequenceModel.reconfigure") -> None:
    """Refuse, before anything is loaded or built, a change of a field outside :data:`ADAPTABLE`:
    the backbone's weights (d_model, n_layers, the layer and its arguments, norm, activation, post)
    cannot fill another backbone, and loading part of them would leave a model half pretrained
    and half random. A TypeError for a name no ModelConfig field has."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(k for k in changes if k not in fields)
    if unknown:
        raise TypeError(f"{who} got unexpected keyword argument(s) {unknown}; it changes the ModelConfig fields "
                        f"{list(ADAPTABLE)}")
    backbone = sorted(k for k in changes if k not in ADAPTABLE)
    if backbone:
        raise ValueError(f"{who} cannot change {', '.join(backbone)}: {'it shapes' if len(backbone) == 1 else 'they shape'} "
                         f"the backbone whose weights a checkpoint holds, so no weights would fit (nothing was loaded "
                         f"or changed). "
                         f"Only {', '.join(ADAPTABLE)} can change on a trained model; for another backbone build "
                         f"SequenceModel(ModelConfig(...)) and train it")


def ignoring_warnings() -> contextlib.AbstractContextManager[None]:
    """Ignore the warnings the calling thread raises inside, for ModelConfig's probes (a plugin's warning
    about sizes the caller did not ask for), without touching the process's warnings filters as
    ``warnings.catch_warnings`` would (:func:`~lrnnx_zoo.thread_warnings.this_threads_warnings`):
    other threads' warnings are filtered and shown as usual meanwhile (they were ignored too)."""
    return this_threads_warnings()


def _short(value: Any) -> str:
    """A value for a message, an int of 16 digits or more as its power of ten (a config.json's 10**400
    as 1e+400: its 401 digits were printed, and formatting it as a float raised OverflowError)."""
    return f"1e+{len(str(abs(value))) - 1}" if isinstance(value, int) and abs(value) >= 10 ** 15 else str(value)


def _listed(names: List[str], limit: int = 8, sep: str = ", ") -> str:
    """The first ``limit`` names and how many more, for messages (a config may have thousands of blocks)."""
    return sep.join(names[:limit]) + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def _fits(given: Any, own: Tensor) -> bool:
    """Whether torch's load_state_dict takes ``given`` for the model's ``own`` tensor without a size error:
    the same shape, a (1,) tensor for a 0-d one (torch's compatibility with 0.3), anything for a lazy
    parameter not yet initialised, and anything not a tensor (torch's own error says what it got)."""
    if not isinstance(given, Tensor) or nn.parameter.is_lazy(own):
        return True
    return given.shape == own.shape or (own.dim() == 0 and tuple(given.shape) == (1,))


def _filled_by_torch(model: nn.Module, metadata: Optional[Dict[str, Any]]) -> Set[str]:
    """The state names torch's load_state_dict fills in itself when missing: the ``num_batches_tracked``
    of each batch norm that tracks running statistics, where the state dict's ``_metadata`` gives that
    module no version >= 2 (none at all for a plain dict, as from safetensors)."""
    filled: Set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            version = (metadata or {}).get(name, {}).get("version")
            if version is None or version < 2:
                filled.add(f"{name}.num_batches_tracked" if name else "num_batches_tracked")
    return filled


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`SequenceModel`; serialises to JSON.

    Args:
        layer: registered layer name (see ``lrnnx_zoo.list_layers()``).
        d_input, d_output: widths of the input features and of the decoder's output.
        d_model: width inside the blocks; n_layers: number of blocks.
        layer_kwargs: extra arguments of the layer (``d_state``, ``init``, ...).
        norm: "layer", "batch" or "none"; activation: key of ACTIVATIONS; post: "glu", "linear", "none".
        dropout: inside blocks; pooling: None (sequence to sequence), "mean" or "last".
    """

    layer: str
    d_input: int
    d_output: int
    d_model: int = 64
    n_layers: int = 4
    layer_kwargs: Dict[str, Any] = field(default_factory=dict)
    norm: str = "layer"
    activation: str = "gelu"
    post: str = "glu"
    dropout: float = 0.0
    pooling: Optional[str] = None

    def __post_init__(self) -> None:
        # numpy and 0-d tensor scalars (a sweep's np.int64(64), np.float32(0.99)) as Python numbers: the
        # config saves as JSON, and a fresh model gets the values a loaded one gets
        for name in ("d_input", "d_output", "d_model", "n_layers", "dropout"):
            setattr(self, name, _python_scalars(getattr(self, name)))
        self._check_types()
        self.layer_kwargs = _python_scalars(self.layer_kwargs)
        checks = [("norm", self.norm, NORMS), ("activation", self.activation, tuple(ACTIVATIONS)),
                  ("post", self.post, POSTS), ("pooling", self.pooling, POOLINGS)]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {value!r}")
        for name in ("d_input", "d_output", "d_model", "n_layers"):
            _check_size(f"ModelConfig.{name}", getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must lie in [0, 1), got {self.dropout}")
        if self.norm == "layer" and self.d_model == 1:
            # a LayerNorm over one feature maps it to 0 and outputs its bias: the model ignored its input
            raise ValueError("ModelConfig: norm='layer' with d_model=1 normalises each step's one feature to 0, "
                             "so every block would see its norm's bias instead of its input; use d_model >= 2, "
                             "or norm='batch' or 'none'")
        if "d_model" in self.layer_kwargs:     # failed in create_layer: "got multiple values for 'd_model'"
            raise ValueError(f"ModelConfig.layer_kwargs holds d_model={self.layer_kwargs['d_model']!r}; the layer's "
                             f"width is the model's: set ModelConfig.d_model instead")
        for key in SIZE_KWARGS:
            value = self.layer_kwargs.get(key)
            if value is not None or (key != "l_max" and key in self.layer_kwargs):
                _check_size(f"ModelConfig.layer_kwargs[{key!r}]", value)
        self._check_budget()

    def _check_types(self) -> None:
        """JSON configs can hold anything: name the field, the expected type and the value given."""
        for name, expected, ok in (("layer", "a str (a registered layer name)", isinstance(self.layer, str)),
                                   ("layer_kwargs", "a dict of layer arguments", isinstance(self.layer_kwargs, dict)),
                                   ("dropout", "a float", _is_real(self.dropout))):
            if not ok:
                value = getattr(self, name)
                raise TypeError(f"ModelConfig.{name} must be {expected}, got {value!r} ({type(value).__name__})")

    def parameter_estimate(self) -> int:
        """A rough upper estimate of the parameter count (block maps, layer state, kernel taps): per
        block 3 d_model^2 for its maps (the GLU's 2 d_model^2, and room for a layer's own d_model^2;
        4 d_model^2 refused 0.54e9-parameter models as 1.1e9, an audit), fftconv's channel mix, the
        layer's state matrices and kernel taps."""
        kw = self.layer_kwargs
        state = kw.get("d_state") or 64
        channels = kw.get("channels") or 1
        taps = kw.get("l_max") or 0
        rank = kw.get("rank") or 0      # S4's low-rank correction P: (rank, d_model, d_state / 2) complex
        mixed = channels * (2 if kw.get("bidirectional") is True else 1)    # fftconv mixes these back to d_model
        mix = mixed * self.d_model if mixed > 1 else 0
        per_block = self.d_model * (3 * self.d_model + mix + (4 * channels + rank) * state + channels * taps)
        return self.n_layers * per_block + self.d_model * (self.d_input + self.d_output + 4)

    def sizes(self) -> str:
        """The sizes that set what building costs, for messages: "d_input=1, ..., d_state=64"."""
        sizes = ", ".join(f"{k}={_short(getattr(self, k))}" for k in ("d_input", "d_output", "d_model", "n_layers"))
        return sizes + "".join(f", {k}={_short(self.layer_kwargs[k])}" for k in SIZE_KWARGS if self.layer_kwargs.get(k))

    def backbone_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """{state name: shape} of the encoder and decoder, known without building the model:
        encoder.weight (d_model, d_input), encoder.bias (d_model,), and the decoder's likewise."""
        return {"encoder.weight": (self.d_model, self.d_input), "encoder.bias": (self.d_model,),
                "decoder.weight": (self.d_output, self.d_model), "decoder.bias": (self.d_output,)}

    def state_names(self) -> Optional[Tuple[List[str], List[str]]]:
        """The names of the model's state (its state_dict keys), known without building it at its
        sizes, as (names outside the blocks, names inside each block without its "blocks.i." prefix),
        from stand-ins of one block at two small sizes (d_model 4 and 6, d_state likewise, the other
        size arguments clamped to PROBE_STATES[0]). None when they disagree (a layer whose names follow
        its sizes, a plugin's perhaps: nothing can be said without building it) or cannot be built
        (building the model will say why)."""
        found = []
        for size in (4, 6):
            kw = dict(self.layer_kwargs)
            for name in SIZE_KWARGS:
                if isinstance(kw.get(name), int) and not isinstance(kw.get(name), bool):
                    kw[name] = size if name == "d_state" else min(kw[name], PROBE_STATES[0])
            small = dataclasses.replace(self, d_model=size, n_layers=1, layer_kwargs=kw,
                                        d_input=min(self.d_input, 2), d_output=min(self.d_output, 2))
            # the global generator forked (not the meta device, which draws nothing: its first op imports
            # torch's symbolic shapes and sympy, 0.6 s more on a process's first load, tests/test_runtime.py)
            with torch.random.fork_rng(devices=[]), ignoring_warnings():
                try:
                    found.append(list(SequenceModel(small).state_dict()))
                except (TypeError, ValueError, LookupError, RuntimeError):
                    return None
        if found[0] != found[1]:
            return None
        keys = found[0]
        return ([k for k in keys if not k.startswith("blocks.")],
                [k[len("blocks.0."):] for k in keys if k.startswith("blocks.0.")])

    def layer_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """{state name inside a block's layer: shape} of the layers' d_state-sized tensors, known without
        initialising a layer of this d_state (S4's and S4D-LegS's HiPPO initialisation is O(d_state^3):
        a minute at d_state=3000), so a checkpoint's weights can be compared with it first.

        Layers of the small d_state values PROBE_STATES are built (the other arguments as given), and
        each shape whose sizes follow d_state on a line through all three is carried over to this
        d_state; shapes that do not, or not to whole numbers, are left out. Empty when d_state is not
        past the probes (building is cheap then) or a probe cannot be built."""
        state = self.layer_kwargs.get("d_state")
        if not isinstance(state, int) or state <= max(PROBE_STATES):
            return {}
        probes = []
        # the probes must not draw from the RNG a model built next would use, nor warn the caller
        # (a seed another thread sets meanwhile is undone by the fork: README, long-running processes)
        with torch.random.fork_rng(devices=[]), ignoring_warnings():
            for n in PROBE_STATES:
                try:
                    layer = create_layer(self.layer, self.d_model, **{**self.layer_kwargs, "d_state": n})
                except (TypeError, ValueError, LookupError, RuntimeError):   # building will say what is wrong
                    return {}
                probes.append({k: tuple(v.shape) for k, v in layer.state_dict().items()})
        shapes: Dict[str, Tuple[int, ...]] = {}
        for name, first in probes[0].items():
            found = [p.get(name) for p in probes]
            if any(s is None or len(s) != len(first) for s in found):
                continue
            sizes = [_on_line(PROBE_STATES, column, state) for column in zip(*found)]
            if None not in sizes:
                shapes[name] = tuple(sizes)
        return shapes

    def _check_budget(self) -> None:
        estimate = self.parameter_estimate()
        if estimate > MAX_PARAMETERS:
            about = f"{estimate:.2g}" if estimate < 10 ** 15 else _short(estimate)
            raise ValueError(f"ModelConfig sizes ({self.sizes()}) describe about {about} parameters, more "
                             f"than the {MAX_PARAMETERS:.0e} lrnnx-zoo builds; check these sizes")

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (config.json's "model" section; :meth:`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelConfig":
        """A config from :meth:`to_dict`'s dict; ValueError naming unknown or missing keys (values
        are checked as the constructor checks them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; expected a subset of {sorted(names)}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"ModelConfig keys {missing} are missing; required: {required}")
        return cls(**data)

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON with sorted keys (stable text for diffs and digests)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _on_line(xs: Tuple[int, ...], ys: Tuple[int, ...], x: int) -> Optional[int]:
    """y at ``x`` on the line through the points (xs, ys), when they lie on one and y is a whole
    number >= 0; else None. Integer arithmetic: no rounding decides a size."""
    (x0, x1, *rest), (y0, y1, *more) = xs, ys
    if any((y - y0) * (x1 - x0) != (y1 - y0) * (xi - x0) for xi, y in zip(rest, more)):
        return None
    rise = (y1 - y0) * (x - x0)
    if rise % (x1 - x0):
        return None
    y = y0 + rise // (x1 - x0)
    return y if y >= 0 else None


def _python_scalars(value: Any) -> Any:
    """``value`` with numpy scalars and 0-d arrays / tensors (also inside dicts, lists and tuples) as
    Python numbers; anything else as it is."""
    if isinstance(value, dict):
        return {k: _python_scalars(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_python_scalars(v) for v in value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):   # np.float32(1), tensor(1.)
        return value.item()
    return value


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_size(name: str, value: Any) -> None:
    """A TypeError naming ``name`` unless value is an int (not a bool), a ValueError unless it is >= 1."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class GLU(nn.Module):
    """Linear H -> 2H followed by a * sigmoid(b) (Dauphin et al. 2017)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 2 * d)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.glu(self.linear(x), dim=-1)


def _norm(kind: str, d: int) -> nn.Module:
    return {"layer": lambda: nn.LayerNorm(d), "batch": lambda: _BatchNormLast(d), "none": nn.Identity}[kind]()


class _BatchNormLast(nn.BatchNorm1d):
    """BatchNorm over the feature axis of (..., H) inputs; in eval mode an affine map per step.

    Given ``lengths`` in training, the batch statistics come from the valid steps only (padding
    moved them: logits changed by 1.2 between padding of 0 and 5) and padded steps come out zero.
    """

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        if x.dim() == 2:
            return super().forward(x)
        if lengths is not None and self.training and x.dim() == 3:
            valid = valid_steps(lengths, x.shape[1], x.device)
            out = x.new_zeros(x.shape)
            out[valid] = super().forward(x[valid])
            return out
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


def _normalize(norm: nn.Module, h: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """norm(h), telling a batch norm which steps are padding."""
    return norm(h, lengths) if isinstance(norm, _BatchNormLast) else norm(h)


class Block(nn.Module):
    """Pre-norm residual block around one sequence layer (module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = _norm(cfg.norm, cfg.d_model)
        self.layer = create_layer(cfg.layer, cfg.d_model, **cfg.layer_kwargs)
        self.activation = ACTIVATIONS[cfg.activation]()
        self.post = {"glu": lambda: GLU(cfg.d_model), "linear": lambda: nn.Linear(cfg.d_model, cfg.d_model),
                     "none": nn.Identity}[cfg.post]()
        self.dropout = nn.Dropout(cfg.dropout)

    def mix(self, z: Tensor) -> Tensor:
        """The per-step part after the layer: activation, post map, dropout."""
        return self.dropout(self.post(self.activation(z)))

    def forward(self, h: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        return h + self.mix(layer_output(self.layer, self.layer(_normalize(self.norm, h, lengths), lengths=lengths),
                                         h, "forward"))

    def prefill(self, h: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Any]]:
        """:meth:`forward`, and the layer's cache after h (:func:`prefill_layer`)."""
        z, cache = prefill_layer(self.layer, _normalize(self.norm, h, lengths), lengths)
        return h + self.mix(layer_output(self.layer, z, h, "prefill")), cache


def layer_output(layer: nn.Module, z: Any, h: Tensor, what: str) -> Tensor:
    """z, the output of ``layer``'s ``what`` on an input shaped like h, checked to be a tensor of
    h's shape (every layer maps (B, L, d_model) to itself, and a step (B, d_model) to itself). A
    plugin layer returning (y, state), as the seed's S4 does, failed in the block's activation
    ("gelu(): argument 'input' must be Tensor, not tuple"), and one returning (B, d_model, L) in
    the next Linear, or not at all where L == d_model."""
    # The dtype too, outside autocast (where a layer may hand back float32 for a bfloat16 h): a float64
    # z in a float32 model failed in the block's Linear ("expected m1 and m2 to have the same dtype").
    if isinstance(z, Tensor) and z.shape == h.shape and (
            z.dtype == h.dtype or (z.is_floating_point() and torch.is_autocast_enabled(h.device.type))):
        return z
    shape = "(batch, length, d_model)" if h.dim() == 3 else "(batch, d_model)"
    if isinstance(z, Tensor) and z.shape == h.shape:
        raise TypeError(f"{type(layer).__name__}.{what} must give a tensor of its input's dtype ({h.dtype}) to "
                        f"SequenceModel, got {z.dtype} (a registered layer computes in its input's dtype; see the "
                        f"README's 'Writing a plugin')")
    got = f"a tensor of shape {tuple(z.shape)}" if isinstance(z, Tensor) else f"a {type(z).__name__}"
    raise TypeError(f"{type(layer).__name__}.{what} must give a tensor of its input's shape {shape} = "
                    f"{tuple(h.shape)} to SequenceModel, got {got} (a registered layer maps (B, L, H) to (B, L, H); "
                    f"see the README's 'Writing a plugin')")


def stream_method(layer: nn.Module, name: str, index: Optional[int] = None) -> Callable[..., Any]:
    """``layer``'s streaming method ``name`` (allocate_inference_cache, step), or a TypeError naming
    the layer (blocks.{index}.layer) and the two ways to give it one (a bare AttributeError before)."""
    method = getattr(layer, name, None)
    if not callable(method):
        where = type(layer).__name__ if index is None else f"blocks.{index}.layer ({type(layer).__name__})"
        raise TypeError(f"{where} has no {name}(), so the model cannot stream "
                        f"(step, prefill, export); subclass lrnnx_zoo.LTI_LRNN and give it a step_form(), or give the "
                        f"layer allocate_inference_cache, step and prefill of its own (README, 'Writing a plugin')")
    return method


def running_mean_step(mean: Tensor, carry: Tensor, h: Tensor, count: Any) -> Tuple[Tensor, Tensor]:
    """One update of mean pooling's running mean over a stream: the mean of the first ``count``
    steps from that of the first count - 1 and step ``count``'s h, all (B, d) (count: a number or
    (B, 1)). Returns (mean', carry').

    mean' = mean + (h - mean) / count, summed by Fast2Sum: ``carry`` holds what rounding cut off
    the previous update and is added to this one, since (h - mean) / count falls below the mean's
    last bit as the count grows (float32 rounding put the mean 1.4e-4 off its float64 value after
    3e6 steps, 1.2e-3 after 1e7; with the carry 1e-7). A mean, not a sum divided by the count, so
    that a count rounded to float32 (past 2**24) only weights the update by 1 +- 6e-8. The exported
    step graph and SequenceModel.step both run this."""
    return fast_two_sum(mean, (h - mean) / count + carry)


def running_count_step(count: Tensor, carry: Tensor) -> Tuple[Tensor, Tensor]:
    """The step count of a float32 stream state advanced by one, exactly: the count is
    ``count + carry``, both (B, 1) floats; returns (count', carry'), count' the count rounded to the
    state's precision (what :func:`running_mean_step` divides by) and carry' what rounding cut off.

    Fast2Sum again: a float32 count alone stops growing at 2**24 (count + 1 rounds back to it), 17
    minutes of 16 kHz audio, after which the running mean became an exponential average over the
    last ~1.7e7 steps. With the carry the count stays exact to 2**48 steps; below 2**24 the carry is
    0 and count' is count + 1, as before."""
    return fast_two_sum(count, 1.0 + carry)


def fast_two_sum(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """(s, e) with s = a + b rounded and e what the rounding cut off (Fast2Sum, exact for |a| >= |b|):
    the next update adds e back. Plain ops, so the step graphs export it as they are."""
    s = a + b
    return s, b - (s - a)


def _cloned(cache: Any) -> Any:
    """A copy of a stream cache of unknown layout: its tensors cloned (autograd history kept, which
    copy.deepcopy refuses), dicts, lists and tuples rebuilt, anything else shared."""
    if isinstance(cache, Tensor):
        return cache.clone()
    if isinstance(cache, dict):
        return {k: _cloned(v) for k, v in cache.items()}
    if isinstance(cache, (list, tuple)) and type(cache) in (list, tuple):
        return type(cache)(_cloned(v) for v in cache)
    return cache


def prefill_layer(layer: nn.Module, x: Tensor, lengths: Optional[Tensor]) -> Tuple[Tensor, Dict[str, Any]]:
    """``layer.prefill(x, lengths)`` (every LTI layer has it: one convolution-mode pass and its state
    at the end); for a layer without it, its forward and a cache stepped through x (sequences of
    one length only: a stepped cache holds the state after the whole padded input)."""
    if hasattr(layer, "prefill"):
        return layer.prefill(x, lengths=lengths)
    if lengths is not None and bool((lengths_tensor(lengths) != x.shape[1]).any()):
        raise ValueError(f"{type(layer).__name__} has no prefill(x, lengths), so its state is found by stepping "
                         f"through x, which needs sequences of one length; got lengths {lengths_tensor(lengths).tolist()} "
                         f"for length {x.shape[1]}. Prefill each length separately")
    y = layer(x, lengths=lengths)
    cache = stream_method(layer, "allocate_inference_cache")(x.shape[0])
    for t in range(x.shape[1]):
        _, stepped = layer.step(x[:, t], cache)     # what the step returns: a tensor cache is replaced
        cache = cache if stepped is None else stepped
    return y, cache


class SequenceModel(HubMixin, nn.Module):
    """Sequence model on any registered layer.

    forward: x (B, L, d_input) -> (B, L, d_output), or (B, d_output) with pooling.
    step:    x_t (B, d_input) -> y_t (B, d_output); with mean pooling y_t is the decoder of the
             running mean, so the last step's output equals forward's pooled output.
    """

    def __init__(self, config: Union[ModelConfig, Dict[str, Any]]) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        if not isinstance(config, ModelConfig):       # None failed on a missing attribute
            raise TypeError(f"SequenceModel needs a ModelConfig (or its dict), got {config!r} ({type(config).__name__})")
        self.config = config
        self.encoder = nn.Linear(config.d_input, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = _norm(config.norm, config.d_model)
        self.decoder = nn.Linear(config.d_model, config.d_output)

    @property
    def bidirectional(self) -> bool:
        """Whether any block's layer reads future inputs (such a model cannot step or export)."""
        return any(getattr(b.layer, "bidirectional", False) for b in self.blocks)

    def at_rate(self, rate: float) -> "SequenceModel":
        """A copy of this model for inputs sampled at ``rate`` relative to the data it was made for
        (rate 2: twice the samples per unit time, e.g. 16 kHz audio for a model of 8 kHz audio;
        rate 0.5: half). This model is unchanged.

        Each layer keeps its continuous-time system and samples it with the step dt / rate
        (:meth:`~lrnnx_zoo.base.LTI_LRNN.resample_`): a layer's kernel at rate 1 is then this
        model's kernel at ``rate``, and forward, prefill, step, save_pretrained and every export
        run at that rate with no other change. A window counted in samples (fftconv's l_max) keeps
        its duration, round(l_max * rate) samples, in the copy's config. The LRU's per-sample poles
        are read as the zero-order-hold sampling of a continuous system (principal logarithm) and
        sampled again (:meth:`~lrnnx_zoo.plugins.lru.LRU.resample_`; at rate < 1 a mode above the new
        Nyquist frequency folds back). A layer the zoo cannot resample (one with neither a ``resample_`` of
        its own nor an SSM kernel with a timescale) raises NotImplementedError. rate 1 gives an equal copy.

        Provenance: the copy's ``checkpoint_info`` keeps the task and dataset but not the metrics,
        command and notes (they are the original's, at its rate); its ``resampled`` record says
        from what and at which rate, and goes into a saved config.json, card and export.
        """
        rate = check_rate(rate, "SequenceModel.at_rate")
        model = copy.deepcopy(self)
        if rate == 1.0:
            return model
        changes: Dict[str, Any] = {}
        for i, block in enumerate(model.blocks):
            resample = getattr(block.layer, "resample_", None)
            if not callable(resample):      # a plugin layer of its own making (no LTI_LRNN): an AttributeError
                raise NotImplementedError(
                    f"blocks.{i}.layer ({type(block.layer).__name__}) has no resample_(rate), so the model cannot "
                    f"run at another rate: give the layer one (README, 'Writing a plugin'), or retrain it on data "
                    f"at that rate")
            changes.update(resample(rate))
        model.config = dataclasses.replace(model.config, layer_kwargs={**model.config.layer_kwargs, **changes})
        model.checkpoint_info = resampled_info(self, model, rate)
        return model

    def reconfigure(self, **changes: Any) -> List[str]:
        """Adapt this model, in place, to a task of another input width, output width, pooling or
        dropout, keeping the backbone's (pretrained) weights: the supported way to fine-tune a loaded
        checkpoint on another task, with ``model.config`` kept in step (what config.json records and
        ``from_pretrained`` rebuilds; :meth:`save_pretrained` refuses a model whose modules disagree).

        Keywords (any of :data:`ADAPTABLE`): ``d_output`` (a new decoder, nn.Linear(d_model, d_output),
        initialised afresh from torch's global generator), ``d_input`` (a new encoder likewise),
        ``pooling`` (None, "mean" or "last"; no weights) and ``dropout`` (every block's; no weights).
        A value equal to the current one changes nothing. Other fields raise a ValueError before
        anything changes (:func:`check_adaptation`).

        Returns the state names that were initialised afresh (e.g. ["decoder.weight", "decoder.bias"]).
        ``checkpoint_info`` follows: the metrics, command and notes of the run that made the weights
        no longer describe a model of another head or pooling and are left out; after a change of
        d_input or d_output so are its task and dataset (another task's data); a ``base_model``
        record says where the backbone came from and what changed, and goes into a saved config.json
        and card. A dropout change alone keeps everything (the eval-mode model is the same)."""
        check_adaptation(changes)
        from .hub_save import adapted_info, weights_changed
        # before the head changes: whether the backbone still is the recorded checkpoint's
        stale = bool(set(changes) - {"dropout"}) and weights_changed(self, self.checkpoint_info or {})
        new = dataclasses.replace(self.config, **changes)      # values checked as ModelConfig checks them
        old = self.config
        changed = {k: [getattr(old, k), getattr(new, k)] for k in ADAPTABLE if getattr(old, k) != getattr(new, k)}
        ref = self.encoder.weight
        fresh: List[str] = []
        for name, size_changed, make in (
                ("encoder", new.d_input != old.d_input, lambda: nn.Linear(new.d_input, new.d_model)),
                ("decoder", new.d_output != old.d_output, lambda: nn.Linear(new.d_model, new.d_output))):
            if size_changed:
                setattr(self, name, make().to(device=ref.device, dtype=ref.dtype))
                fresh += [f"{name}.{k}" for k in getattr(self, name).state_dict()]
        for block in self.blocks:
            block.dropout.p = new.dropout
        self.config = new
        if set(changed) - {"dropout"}:
            self.checkpoint_info = adapted_info(self, changed, fresh, stale)
        return fresh

    def config_mismatches(self, sizes_only: bool = False) -> List[str]:
        """How this model's modules disagree with ``self.config`` (what a saved config.json records and
        ``from_pretrained`` rebuilds), one phrase each; [] when they agree. A module replaced by hand
        (``model.decoder = nn.Linear(64, 5)``) without changing the config is the usual cause:
        :meth:`reconfigure` changes both together. ``sizes_only``: the encoder's, the decoder's and the
        block count alone, what a step graph's sizes are read from (an exporter streams the blocks it
        finds, a layer swapped into one by hand included)."""
        cfg, found = self.config, []
        for name, want in (("encoder", (cfg.d_input, cfg.d_model)), ("decoder", (cfg.d_model, cfg.d_output))):
            module = getattr(self, name, None)
            # for the sizes any Linear will do: one under weight_norm (a ParametrizedLinear) exports and
            # streams as it runs; a checkpoint rebuilds a plain nn.Linear, so a save wants that type
            if not isinstance(module, nn.Linear) or not (sizes_only or type(module) is nn.Linear):
                found.append(f"{name} is a {type(module).__name__}, the config's model has nn.Linear{want}")
            elif (module.in_features, module.out_features) != want:
                found.append(f"{name} is Linear({module.in_features} -> {module.out_features}), the config's "
                             f"model has Linear({want[0]} -> {want[1]}) (d_input={cfg.d_input}, "
                             f"d_model={cfg.d_model}, d_output={cfg.d_output})")
        if len(self.blocks) != cfg.n_layers:
            found.append(f"{len(self.blocks)} blocks, config n_layers={cfg.n_layers}")
        if sizes_only:
            return found
        rates = sorted({b.dropout.p for b in self.blocks if isinstance(b.dropout, nn.Dropout)} - {cfg.dropout})
        if rates:
            found.append(f"blocks with dropout {', '.join(map(str, rates))}, config dropout={cfg.dropout}")
        kinds = {type(b.activation) for b in self.blocks} - {ACTIVATIONS[cfg.activation]}
        if kinds:
            found.append(f"blocks with activation {', '.join(sorted(k.__name__ for k in kinds))}, config "
                         f"activation={cfg.activation!r}")
        if not found:       # the names a model of the config holds, from small stand-ins (ModelConfig.state_names)
            try:
                names = cfg.state_names()
            except (TypeError, ValueError):     # a config edited by hand past its checks: its users say what
                names = None
            if names is not None:
                top, per_block = names
                want = set(top) | {f"blocks.{i}.{k}" for i in range(cfg.n_layers) for k in per_block}
                have = set(self.state_dict())
                if have != want:
                    extra, missing = sorted(have - want), sorted(want - have)
                    found.append("state names differ from the config's model ("
                                 + "; ".join(([f"not in it: {_listed(extra)}"] if extra else [])
                                             + ([f"missing: {_listed(missing)}"] if missing else [])) + ")")
        return found

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, checked first: torch copies every tensor that fits before it
        raises about the others (missing or unexpected keys under ``strict``, a shape that differs),
        which left a model with more blocks or another d_model half loaded after the error. Here
        such a state dict raises the same RuntimeError before anything is copied.

        What torch itself accepts is let through to it: a batch norm's ``num_batches_tracked`` missing
        from a state dict of before its version 2 (no ``_metadata``, or an older one), a (1,) tensor for
        a 0-d one, an uninitialised (lazy) parameter. With a load pre-hook (it may rename keys) nothing is
        checked first; with a load post-hook (it may forgive missing or unexpected keys) only the shapes."""
        hooked = any(m._load_state_dict_pre_hooks for m in self.modules())     # they may rename keys
        if not hooked and hasattr(state_dict, "keys"):
            own = self.state_dict()
            given = set(state_dict.keys())
            wrong = [f"{k}: given {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
                     for k in sorted(given & set(own)) if not _fits(state_dict[k], own[k])]
            forgiving = not strict or any(m._load_state_dict_post_hooks for m in self.modules())
            filled = _filled_by_torch(self, getattr(state_dict, "_metadata", None))
            missing, unexpected = ([], []) if forgiving else (sorted(set(own) - given - filled), sorted(given - set(own)))
            if wrong or missing or unexpected:
                parts = ([f"missing keys {_listed(missing)}"] if missing else []) + \
                        ([f"unexpected keys {_listed(unexpected)}"] if unexpected else []) + \
                        ([f"shapes that differ: {_listed(wrong, sep='; ')}"] if wrong else [])
                raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__} ({self.config.sizes()}): "
                                   + "; ".join(parts) + ". Nothing was loaded. A model of another backbone cannot take "
                                   "these weights; for another head use model.reconfigure(d_output=...) on the "
                                   "model they came from")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, d_input) -> (B, L, d_output), or (B, d_output) with pooling.

        ``lengths``: (B,) valid steps of a padded batch; each sequence gets its own outputs, zeros
        after its length (unpooled), or the mean / last of its valid steps (pooled).
        """
        x = self._check_sequence(x, lengths)
        return self._readout(self._features(x, lengths), lengths)

    if TYPE_CHECKING:  # nn.Module types its __call__ as (...) -> Any; this one gives forward's outputs
        __call__ = forward

    def prefill(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Any]]:
        """Read a prompt in convolution mode and return the cache that :meth:`step` continues from.

        x: (B, L, d_input) -> (y, cache): y = ``forward(x, lengths)``, and the cache of
        :meth:`allocate_inference_cache` (B) after each sequence's last valid step (L, or
        ``lengths[b]``): every layer's state (:meth:`~lrnnx_zoo.base.LTI_LRNN.prefill`, one pass
        over x, not L steps) and the running mean of mean pooling. Steps from it continue the
        sequences as if they had been stepped through; to continue in ONNX Runtime, pack it with
        ``lrnnx_zoo.export.state_from_cache``. Eval mode, as for :meth:`step`.
        """
        x = self._check_sequence(x, lengths)
        check_stream_batch(x, "SequenceModel.prefill")
        for i, block in enumerate(self.blocks):      # named before the forward runs
            if not callable(getattr(block.layer, "prefill", None)):
                stream_method(block.layer, "allocate_inference_cache", i), stream_method(block.layer, "step", i)
        cache = self._model_cache(x.shape[0], layers=[None] * len(self.blocks))     # the layers' come from prefill
        h = self._features(x, lengths, cache["layers"])
        if lengths is None:       # the step count, each sequence's (B, 1) (_model_cache)
            cache["t"] = cache["t"] + h.shape[1]
        else:                     # integers (a float32 count stopped growing at 2**24 steps), a copy:
            cache["t"] = torch.as_tensor(lengths, device=h.device).unsqueeze(-1).to(torch.long, copy=True)
        if self.config.pooling != "mean":     # the running mean only feeds mean pooling's steps
            return self._readout(h, lengths), cache
        mean = self._pooled(h, lengths, "mean")    # _check_sequence refused empty sequences
        # The running mean in the model's dtype, as step keeps it: under autocast h is half precision,
        # and a bfloat16 mean made every later step refuse the cache as made for another dtype
        dtype = self.encoder.weight.dtype
        kept = mean if h.dtype == dtype else self._pooled(h.to(dtype), lengths, "mean")
        cache["pool_mean"] = values_only(kept) if kept.requires_grad else kept    # values (LTI_LRNN.prefill)
        return self.decoder(mean), cache

    def __prepare_scriptable__(self) -> "SequenceModel":
        # torch.jit.script calls this first: it failed on a layer's source with "Unknown type annotation"
        raise refuse_torchscript("SequenceModel")

    def _check_sequence(self, x: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """x checked (and a half input under autocast made float32) for forward and prefill."""
        check_not_traced("SequenceModel")
        cfg = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"SequenceModel expects a torch.Tensor of shape (batch, length, d_input={cfg.d_input}), "
                            f"got {type(x).__name__}")
        check_dense(x, "SequenceModel")
        if x.dim() != 3 or x.shape[-1] != cfg.d_input:
            raise ValueError(f"SequenceModel expects x of shape (batch, length, d_input={cfg.d_input}), "
                             f"got {tuple(x.shape)}")
        if x.dtype != self.encoder.weight.dtype:
            x = float32_under_autocast(x)   # under autocast a half input is fine: the encoder casts it
        self._check_input_dtype(x, "SequenceModel")
        # Checked here, not only in the layers: masking the encoder's output with a wrong number of
        # lengths failed first, in a broadcast ("The size of tensor a (3) must match ..."). The values
        # come back (None without lengths, or while torch.compile traces: .item() broke its graph).
        steps = check_lengths(lengths, x.shape[0], x.shape[1])
        empty = x.shape[1] == 0 if steps is None else bool((steps == 0).any())
        if cfg.pooling is not None and x.shape[0] and empty:
            # An empty sequence has no mean or last step: "last" raised an IndexError, "mean" returned
            # NaN (length 0) or the decoder's bias (a length of 0).
            raise ValueError(f"pooling={cfg.pooling!r} needs at least one valid step per sequence, got x of "
                             f"length {x.shape[1]}" + ("" if steps is None else f" and lengths {steps.tolist()}"))
        return x

    def _features(self, x: Tensor, lengths: Optional[Tensor], caches: Optional[List[Dict[str, Any]]] = None) -> Tensor:
        """The normalised features before pooling, (B, L, d_model); given ``caches`` (one per block),
        each block prefills and leaves its layer's cache there."""
        # Padding is zeroed at the door (the layers zero theirs too), so a NaN there reaches nothing:
        # before the encoder too, else its weight's gradient summed 0 * NaN and one step made it NaN
        h = mask_padding(self.encoder(mask_padding(x, lengths)), lengths)
        for i, block in enumerate(self.blocks):
            if caches is None:
                h = block(h, lengths)
            else:
                h, caches[i] = block.prefill(h, lengths)
        return _normalize(self.norm, h, lengths)

    def _readout(self, h: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """Pooling and decoder: h (B, L, d_model) -> (B, L, d_output), or (B, d_output) pooled."""
        if self.config.pooling is None:
            return mask_padding(self.decoder(h), lengths)        # zeros after each length, like a layer
        return self.decoder(self._pooled(h, lengths, self.config.pooling))

    @staticmethod
    def _pooled(h: Tensor, lengths: Optional[Tensor], pooling: str) -> Tensor:
        """h (B, L, d_model) -> (B, d_model): the mean over, or the last of, each sequence's valid steps."""
        if pooling == "mean":
            if lengths is None:
                return h.mean(1)
            lengths = torch.as_tensor(lengths, device=h.device)
            return mask_padding(h, lengths).sum(1) / lengths.clamp_min(1).unsqueeze(-1).to(h.dtype)
        if lengths is None:
            return h[:, -1]
        # as int64: int8 / int16 indices failed in torch's indexing, and uint8 ones were read as a mask
        idx = (torch.as_tensor(lengths, device=h.device).long() - 1).clamp_min(0)
        return h[torch.arange(h.shape[0], device=h.device), idx]

    # -- streaming ---------------------------------------------------------------------------
    def allocate_inference_cache(self, batch_size: int, dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
        """Per-layer caches plus the pooling state (running mean and step count).

        The layers' step forms are computed from the parameters now: after the parameters change
        (an optimiser step, load_state_dict), allocate a new cache. ``dtype``: None or the model's own;
        another raises TypeError, as the encoder and decoder would mix precisions (convert the model
        with ``.double()`` to step in float64; a single layer's cache may take another dtype).
        """
        rows = positive_int(batch_size)
        if rows is None:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        batch_size = rows
        ref = self.encoder.weight
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"allocate_inference_cache needs dtype to be a floating torch.dtype or None, got {dtype!r}")
        if dtype is not None and dtype != ref.dtype:
            raise TypeError(f"this model holds {ref.dtype} parameters; a {dtype} cache would mix precisions. "
                            f"Convert the model instead (model.to({dtype}))")
        cache = self._model_cache(batch_size, [])
        cache["layers"] = [stream_method(b.layer, "allocate_inference_cache", i)(batch_size, dtype=ref.dtype)
                           for i, b in enumerate(self.blocks)]
        return cache

    def _model_cache(self, batch_size: int, layers: List[Any]) -> Dict[str, Any]:
        """The cache of :meth:`step` around the layers' caches: the pooling state and the step count."""
        if self.bidirectional:
            raise ValueError("a bidirectional model sees the future and cannot run step by step")
        zeros = self.encoder.weight.new_zeros(batch_size, self.config.d_model)
        # The count as a (B, 1) long tensor, not a Python int: torch.compile specialised on an int,
        # so a compiled step retraced at every step (dynamic=False: 8 graphs, then eager from the
        # recompile limit on; by default a second graph, and a third after a prefill with lengths).
        steps = torch.zeros(batch_size, 1, dtype=torch.long, device=zeros.device)
        return {"layers": layers, "pool_mean": zeros, "pool_carry": zeros.clone(), "t": steps, "model": cache_owner(self)}

    def step(self, x: Tensor, cache: Dict[str, Any]) -> Tuple[Tensor, Dict[str, Any]]:
        """One time step: x (B, d_input) -> y (B, d_output). ``cache``: from this model's
        :meth:`allocate_inference_cache` (made after its last parameter change).

        Modes: in eval mode every part is a per-step map and the steps reproduce :meth:`forward`.
        In training mode dropout draws a fresh mask per step (as forward draws one per element);
        a model with ``norm="batch"`` refuses to step in training mode, because batch norm there
        normalises with the statistics of the whole (batch, length) input, which no single step
        sees (a step would use one step's batch statistics and overwrite the running ones).
        The cache holds values without autograd history (an LTI_LRNN's state and the pooling
        state; a layer with its own ``step`` keeps what its cache holds), so a stream runs in
        constant memory with or without ``torch.no_grad()``, and gradients do not flow back across
        steps (train with :meth:`forward`).
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"SequenceModel.step expects a torch.Tensor of shape (batch, d_input="
                            f"{self.config.d_input}), got {type(x).__name__}")
        if x.dim() != 2 or x.shape[-1] != self.config.d_input:
            raise ValueError(f"SequenceModel.step expects x of shape (batch, d_input={self.config.d_input}), "
                             f"got {tuple(x.shape)}")
        self._check_input_dtype(x, "SequenceModel.step", autocast_hint=False)
        # (the norms where the model puts them, not a walk over every module: 20 us of each step)
        norms = [(f"blocks.{i}.norm", b.norm) for i, b in enumerate(self.blocks)] + [("norm", self.norm)]
        training_norms = [name for name, m in norms if isinstance(m, _BatchNormLast) and m.training]
        if training_norms:
            raise RuntimeError(
                f"SequenceModel.step cannot run batch norm in training mode ({', '.join(training_norms[:3])}"
                f"{', ...' if len(training_norms) > 3 else ''}): training-mode batch norm normalises with the "
                f"statistics of the whole (batch, length) input, which one step does not see, and would "
                f"overwrite the running statistics. Call model.eval() to step with the running statistics")
        if not isinstance(cache, dict) or not made_by(self, cache.get("model")) or len(cache["layers"]) != len(self.blocks):
            raise ValueError("SequenceModel.step needs a cache from this model's allocate_inference_cache(batch_size); "
                             "this one was made by another model, copied apart from this one, or altered (copy a "
                             "model and its cache together: copy.deepcopy((model, cache)))")
        ref = self.encoder.weight
        made = cache["pool_mean"]
        if (made.dtype, made.device) != (ref.dtype, ref.device):
            # Its step forms hold the old dtype's matrices: float32 ones silently rounded a float64
            # model's steps, and an LRU failed inside matmul ("expected m1 and m2 to have the same dtype").
            raise ValueError(f"SequenceModel.step got a cache made for {made.dtype} on {made.device}, but the model "
                             f"now holds {ref.dtype} on {ref.device} (converted or moved since); call "
                             f"allocate_inference_cache(batch_size) again after .to() / .double() / .float()")
        if x.shape[0] != made.shape[0]:     # else the first layer named its own (batch, d_model) input
            raise ValueError(f"SequenceModel.step expects x of shape (batch={made.shape[0]}, d_input="
                             f"{self.config.d_input}), the batch size of its cache, got {tuple(x.shape)}; call "
                             f"allocate_inference_cache({x.shape[0]}) for another batch size")
        h = self.encoder(x)
        # Each block steps a copy of its (dict) cache, written back once every block has stepped: a
        # later block refusing (its weights changed) left the earlier ones advanced, and a retry stepped
        # them twice (0.037 off forward from then on, silently). A third-party layer's cache of another
        # kind (a tensor, say) is stepped as it is and replaced by the one its step returns, also once
        # every block has stepped (that one was dropped: a layer returning its next state instead of
        # writing it in place streamed 0.54 off forward, silently).
        stepped = []
        for i, (block, layer_cache) in enumerate(zip(self.blocks, cache["layers"])):
            layer = block.layer                # (one module attribute lookup a block: this runs every step)
            is_dict = isinstance(layer_cache, dict)
            out = stream_method(layer, "step", i)(block.norm(h), dict(layer_cache) if is_dict else layer_cache)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"blocks.{i}.layer ({type(layer).__name__}).step must return (y, cache), got "
                                f"{type(out).__name__}")
            z, layer_next = out
            stepped.append(layer_next)
            h = h + block.mix(layer_output(layer, z, h, "step"))
        for i, (layer_cache, layer_next) in enumerate(zip(cache["layers"], stepped)):
            if isinstance(layer_cache, dict) and isinstance(layer_next, dict):
                layer_cache.update(layer_next)
            elif not isinstance(layer_cache, dict) and layer_next is not None:
                cache["layers"][i] = layer_next
        h = self.norm(h)
        cache["t"] = cache["t"] + 1      # not in place: the count may be a view of the caller's lengths
        if self.config.pooling == "mean":
            # the running mean as the exported step graph keeps it; the cache keeps values only, as
            # the layers keep their states (LTI_LRNN.step)
            h, carry = running_mean_step(cache["pool_mean"], cache["pool_carry"], h, cache["t"])
            cache["pool_mean"], cache["pool_carry"] = values_only(h), values_only(carry)
        return self.decoder(h), cache

    def fork_cache(self, cache: Dict[str, Any], index: Any = None) -> Dict[str, Any]:
        """A stream that goes on from ``cache`` on its own: stepping the fork leaves ``cache`` as it
        is, and the other way round (beam search, several continuations of one prefilled prompt).

        index: None (every row), or the rows the fork continues: a 1-D sequence or tensor of row
        numbers (row b of the fork goes on from row index[b]; rows may repeat or be left out), or a
        1-D bool mask of the batch (the rows kept). Returns a cache of this model with one row per
        index entry, or per True entry of a mask.

        Each layer forks its own cache (:meth:`~lrnnx_zoo.base.LTI_LRNN.fork_cache`: the state
        copied, the step form shared), and the pooling state and step counts are copied. A
        third-party layer without ``fork_cache`` has its cache's tensors cloned and other objects
        shared (index None; a cache holding other state that steps change gives its layer a
        ``fork_cache``), or is named (an index: only the layer knows which tensors are per row).
        """
        who = "SequenceModel.fork_cache"
        if not isinstance(cache, dict) or not made_by(self, cache.get("model")) or len(cache["layers"]) != len(self.blocks):
            raise ValueError(f"{who} needs a cache from this model's allocate_inference_cache(batch_size) or prefill; "
                             f"this one was made by another model, copied apart from this one, or altered")
        batch = cache["pool_mean"].shape[0]
        rows = stream_rows(index, batch, who, cache["pool_mean"].device)
        layers = []
        for i, (block, layer_cache) in enumerate(zip(self.blocks, cache["layers"])):
            fork = getattr(block.layer, "fork_cache", None)
            if fork is not None:
                layers.append(fork(layer_cache, rows))
            elif rows is None:
                layers.append(_cloned(layer_cache))
            else:
                raise TypeError(f"{who}: block {i}'s {type(block.layer).__name__} has no fork_cache(cache, index), "
                                f"so which of its cache's tensors hold one row per stream is unknown; fork every "
                                f"row (index=None), or give the layer a fork_cache")
        forked = self._model_cache(batch if rows is None else rows.numel(), layers)
        for key in ("pool_mean", "pool_carry", "t"):
            forked[key] = cache[key].clone() if rows is None else cache[key].index_select(0, rows)
        return forked

    def _check_input_dtype(self, x: Tensor, who: str, autocast_hint: bool = True) -> None:
        # the model's own dtype first: a .half() model was told to convert a half input to float32,
        # then a float32 input to half, in a circle (a dtype audit); its device with the same look
        check_parameters_for(self, x, who)
        check_floating(x, who, autocast_hint)
        if x.dtype != self.encoder.weight.dtype:     # nn.Linear would fail with "mat1 and mat2 ..."
            raise TypeError(f"{who}: the model holds {self.encoder.weight.dtype} parameters, got a {x.dtype} "
                            f"input; convert one to the other (x.to({self.encoder.weight.dtype}) or "
                            f"model.to({x.dtype}))")

    def num_parameters(self) -> int:
        """The number of parameter elements (trainable or not; buffers excluded)."""
        return sum(p.numel() for p in self.parameters())


"""Named training recipes: plain frozen dataclasses holding a model config, data, optimiser and seed.

A recipe is data, not code: ``lrnnx_zoo.training.train`` interprets it.  Look one up with
:func:`get_recipe`, change a field with ``dataclasses.replace`` (or :func:`override`), and list
them with :func:`list_recipes` / ``lrnnx-zoo recipes``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

DATASETS = ("digits", "sunspots")
#: The params each data set takes (see :class:`DataSpec`); the int ones with their least value.
DATA_PARAMS = {"digits": ("seed", "n_test", "augment"),
               "sunspots": ("n_train", "n_val", "window", "warmup", "train_stride", "target")}
INT_DATA_PARAMS = {"seed": 0, "n_test": 1, "n_train": 1, "n_val": 1, "window": 1, "warmup": 0, "train_stride": 1}
SEED_MAX = 2**32 - 1  # seeds are ints in [0, SEED_MAX]: the engine derives other seeds from them


def _describe(value: Any) -> str:
    """``value`` as an error message shows it: its repr and type."""
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    """``value`` if it is an int (not a bool) in [minimum, maximum]; else TypeError/ValueError naming ``name``."""
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int {bounds}, got {_describe(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an int {bounds}, got {value}")
    return int(value)


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed: an int in [0, SEED_MAX]."""
    return check_int(name, value, 0, SEED_MAX)


#: The largest learning rate an OptimSpec takes. AdamW's first step moves a weight by lr / (1 - beta1)
#: = 10 lr, a float32 number: from lr ~ 3.4e37 on its step raised "value cannot be converted to type
#: float without overflow" (a traceback mid-run, not an error before training starts).
MAX_LEARNING_RATE = 1e30


def check_real(name: str, value: Any, *, positive: bool, at_most: Optional[float] = None) -> float:
    """``value`` if it is a finite real number (not a bool), > 0 when ``positive`` else >= 0, and
    ``<= at_most`` if given."""
    expected = "a finite number " + ("> 0" if positive else ">= 0")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {_describe(value)}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if at_most is not None and value > at_most:
        raise ValueError(f"{name} must be {expected} and at most {at_most:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DataSpec:
    """Which data set and how it is split.

    name: "digits" (classification) or "sunspots" (next-step forecasting).
    params: for digits ``{"seed", "n_test"}`` (a :class:`lrnnx_zoo.data.Split`) and optionally
        ``"augment": "shift"`` (random +-1 pixel shifts of the 8x8 image); for sunspots the
        arguments of :func:`lrnnx_zoo.data.load_forecast_series` (``n_train``, ``n_val``,
        ``window``, ``warmup``, ``train_stride``, ``target``).
    """

    name: str
    params: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"DataSpec.name must be one of {DATASETS}, got {self.name!r}")
        self._check_params()

    def _check_params(self) -> None:
        """Name the key and what it takes: a misspelt key was "Split.__init__() got an unexpected
        keyword argument", a str size "'<' not supported between instances of 'int' and 'str'"."""
        if not isinstance(self.params, Mapping):
            raise TypeError(f"DataSpec.params must be a dict, got {_describe(self.params)}")
        allowed = DATA_PARAMS[self.name]
        unknown = sorted(map(str, set(self.params) - set(allowed)))
        if unknown:
            raise ValueError(f"DataSpec({self.name!r}) params {unknown} are not known; expected keys among {allowed}")
        for key, value in self.params.items():
            if key in INT_DATA_PARAMS:
                check_int(f"DataSpec({self.name!r}) params[{key!r}]", value, INT_DATA_PARAMS[key],
                          SEED_MAX if key == "seed" else None)

    @property
    def task(self) -> str:
        return "sequence-classification" if self.name == "digits" else "time-series-forecasting"

    def to_dict(self) -> Dict[str, Any]:
        """Recorded in checkpoints as dataset["spec"], so evaluation can rebuild the exact split."""
        return {"name": self.name, "params": dict(self.params)}


@dataclass(frozen=True)
class OptimSpec:
    """AdamW with a linear warmup then cosine decay to zero, stepped once per optimiser step.

    ssm_lr: learning rate of the sequence layers' state-space parameters (A, B, C, D, dt, ...),
        which get no weight decay; None means ``lr``.  (S4-style models train better with a
        smaller, undecayed rate on them.)  ``torch.nn`` modules inside a layer (FFTConv's channel
        mix) train like the rest of the network.  Weight decay applies to matrices, never to
        biases or norms.
    batch_size: the global batch, split evenly across ranks under torchrun.
    grad_clip: max global gradient norm, or None.
    """

    lr: float = 3e-3
    weight_decay: float = 0.01
    ssm_lr: Optional[float] = 1e-3
    epochs: int = 30
    batch_size: int = 64
    warmup_steps: int = 100
    grad_clip: Optional[float] = 1.0

    def __post_init__(self) -> None:
        # kept as the Python numbers the checks return: a sweep's np.float64 / np.int64 made the card's
        # command "not reproducible" (its repr is no Python literal) and the run record unwritable as JSON
        checked = {"lr": check_real("OptimSpec.lr", self.lr, positive=True, at_most=MAX_LEARNING_RATE),
                   "weight_decay": check_real("OptimSpec.weight_decay", self.weight_decay, positive=False),
                   "epochs": check_int("OptimSpec.epochs", self.epochs, 1),
                   "batch_size": check_int("OptimSpec.batch_size", self.batch_size, 1),
                   "warmup_steps": check_int("OptimSpec.warmup_steps", self.warmup_steps, 0)}
        if self.ssm_lr is not None:
            checked["ssm_lr"] = check_real("OptimSpec.ssm_lr (or None)", self.ssm_lr, positive=True,
                                           at_most=MAX_LEARNING_RATE)
        if self.grad_clip is not None:
            checked["grad_clip"] = check_real("OptimSpec.grad_clip (or None)", self.grad_clip, positive=True)
        for name, value in checked.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training run.

    model: keyword arguments of :class:`lrnnx_zoo.ModelConfig` (d_input/d_output included).
    max_steps: stop after this many optimiser steps (None: run all epochs); for smoke tests.
    """

    name: str
    description: str
    model: Dict[str, Any]
    data: DataSpec
    optim: OptimSpec = OptimSpec()
    seed: int = 0
    max_steps: Optional[int] = None

    def __post_init__(self) -> None:
        check_seed(self.seed, "Recipe.seed")
        if self.max_steps is not None:
            check_int("Recipe.max_steps (or None)", self.max_steps, 1)
        for name, expected_type in (("model", Mapping), ("data", DataSpec), ("optim", OptimSpec)):
            value = getattr(self, name)
            if not isinstance(value, expected_type):
                raise TypeError(f"Recipe.{name} must be a {expected_type.__name__}, got {_describe(value)}")

    @property
    def task(self) -> str:
        return self.data.task


def _digits(layer: str, layer_kwargs: Dict[str, Any], **optim: Any) -> Dict[str, Any]:
    model = dict(layer=layer, d_input=1, d_output=10, d_model=64, n_layers=4, layer_kwargs=layer_kwargs,
                 norm="layer", activation="gelu", post="glu", dropout=0.1, pooling="mean")
    return dict(model=model, data=DataSpec("digits", {"seed": 0, "n_test": 360, "augment": "shift"}),
                optim=OptimSpec(**{"lr": 3e-3, "weight_decay": 0.05, "ssm_lr": 1e-3, "epochs": 40,
                                   "batch_size": 64, "warmup_steps": 100, "grad_clip": 1.0, **optim}))


_RECIPES: List[Recipe] = [
    Recipe("digits-lru", "LRU classifier on 64-step digit pixel sequences (mean pooling)",
           **_digits("lru", {"d_state": 64, "r_min": 0.5, "r_max": 0.99})),
    Recipe("digits-s4d", "S4D-LegS classifier on 64-step digit pixel sequences (mean pooling)",
           **_digits("s4d", {"d_state": 64, "init": "legs"})),
    Recipe("digits-s4", "S4 (NPLR) classifier on 64-step digit pixel sequences (mean pooling)",
           **_digits("s4", {"d_state": 64})),
    Recipe("digits-fftconv", "FFTConv classifier on 64-step digit pixel sequences: S4 (NPLR) kernel with "
                             "2 channels mixed by a linear map (mean pooling)",
           **_digits("fftconv", {"d_state": 64, "kernel_type": "s4", "channels": 2})),
    Recipe("forecast-sunspots-s4d",
           "Causal S4D next-month forecaster of monthly sunspot numbers; small enough to stream on edge devices",
           model=dict(layer="s4d", d_input=1, d_output=1, d_model=32, n_layers=3,
                      layer_kwargs={"d_state": 32, "init": "legs", "dt_min": 1e-3, "dt_max": 1e-1},
                      norm="layer", activation="gelu", post="glu", dropout=0.25, pooling=None),
           # Predicting the change from the last value, with heavy dropout and few epochs, is what
           # kept validation error low: the 1950s cycle peaks above anything in training.
           data=DataSpec("sunspots", {"n_train": 2412, "n_val": 360, "window": 128, "warmup": 64,
                                      "train_stride": 4, "target": "delta"}),
           optim=OptimSpec(lr=3e-3, weight_decay=0.1, ssm_lr=1e-3, epochs=15, batch_size=32,
                           warmup_steps=50, grad_clip=1.0)),
    Recipe("digits-tiny", "Smoke test: a one-block S4D on digits for a few steps (tests, CI)",
           model=dict(layer="s4d", d_input=1, d_output=10, d_model=8, n_layers=1, layer_kwargs={"d_state": 8},
                      norm="layer", post="linear", dropout=0.0, pooling="mean"),
           data=DataSpec("digits", {"seed": 0, "n_test": 360}),
           optim=OptimSpec(lr=1e-2, weight_decay=0.01, ssm_lr=None, epochs=1, batch_size=32, warmup_steps=2),
           max_steps=8),
]
RECIPES: Dict[str, Recipe] = {r.name: r for r in _RECIPES}


class UnknownRecipeError(KeyError):
    """A recipe name that is not in :data:`RECIPES`."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def list_recipes() -> List[str]:
    """Names of all recipes."""
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    """A private copy of the recipe called ``name`` (a deep copy: changing its dicts, or those of a model
    trained from it, leaves the registry alone); an unknown name is an error that lists the known ones."""
    if not isinstance(name, str):
        raise TypeError(f"a recipe name must be a str, got {_describe(name)}")
    try:
        return copy.deepcopy(RECIPES[name])
    except KeyError:
        raise UnknownRecipeError(f"unknown recipe {name!r}; available recipes: {', '.join(list_recipes())}. "
                                 f"Run `lrnnx-zoo recipes` to see what each one trains.") from None


#: The layer keyword every registered layer takes (the layer contract), so the one a recipe's
#: layer_kwargs keep when :func:`override` swaps in another layer; the rest are its own family's.
SHARED_LAYER_KWARGS = ("d_state",)


def override(recipe: Recipe, *, seed: Optional[int] = None, epochs: Optional[int] = None,
             batch_size: Optional[int] = None, max_steps: Optional[int] = None,
             layer: Optional[str] = None, layer_kwargs: Optional[Mapping[str, Any]] = None) -> Recipe:
    """A copy of ``recipe`` with the given fields replaced (None keeps the recipe's value).

    ``layer``: train this registered layer (a plugin's, say) in place of the recipe's own. Of the
    recipe's ``layer_kwargs`` only those every layer takes (``d_state``) carry over: the others belong
    to the recipe's family (S4D's ``init="legs"``, the LRU's ``r_min``) and would be refused by
    another. The description says what was swapped, so the model card does not name the old family.
    ``layer_kwargs``: keyword arguments for the layer, added to (and overriding) those kept.
    """
    optim = recipe.optim
    if epochs is not None or batch_size is not None:
        optim = dataclasses.replace(optim, epochs=optim.epochs if epochs is None else epochs,
                                    batch_size=optim.batch_size if batch_size is None else batch_size)
    model, description = recipe.model, recipe.description
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"override(layer=...) takes a registered layer's name (a str), got {_describe(layer)}; "
                        f"`lrnnx-zoo layers` lists them")
    if layer_kwargs is not None and not isinstance(layer_kwargs, Mapping):
        raise TypeError(f"override(layer_kwargs=...) takes a dict of the layer's keyword arguments, "
                        f"got {_describe(layer_kwargs)}")
    if layer is not None or layer_kwargs is not None:
        old_layer, old_kwargs = model.get("layer"), dict(model.get("layer_kwargs") or {})
        kwargs = old_kwargs
        if layer is not None and layer != old_layer:
            kwargs = {k: v for k, v in old_kwargs.items() if k in SHARED_LAYER_KWARGS}
            description = f"{description}; layer {layer!r} in place of {old_layer!r}"
        kwargs = {**kwargs, **copy.deepcopy(dict(layer_kwargs or {}))}
        model = {**model, "layer": old_layer if layer is None else layer, "layer_kwargs": kwargs}
    return dataclasses.replace(recipe, optim=optim, seed=recipe.seed if seed is None else seed,
                               max_steps=recipe.max_steps if max_steps is None else max_steps,
                               model=model, description=description)

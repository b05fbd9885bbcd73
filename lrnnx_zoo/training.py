"""The training engine: ``train(recipe)`` -> (model, metrics), deterministic per seed, optionally
distributed under ``torchrun``, writing a Hub-format checkpoint when given a directory.

Determinism: the seed fixes the initial weights (``torch.manual_seed``), the per-epoch shuffle
and the augmentation (their own ``torch.Generator``s), and deterministic algorithms are requested.
The global generators are forked for the run, so the caller's random stream is left as it was.

Distributed (``torchrun --nproc_per_node=N``; WORLD_SIZE/RANK/LOCAL_RANK set): every rank draws
the same global batch of ``batch_size`` examples and takes its contiguous 1/N slice, so each rank's
loss is a mean over an equal-size shard and DDP's gradient average is the mean over the global
batch: N processes give the weights of 1 process (to float rounding).  The last partial batch of
an epoch is dropped (always, also with one process) so every step has a full global batch.
Only rank 0 prints and writes the checkpoint.  The equivalence is exact (to rounding) for
recipes without dropout; with dropout each rank draws its own masks, so runs agree only in
distribution.

Long runs: ``checkpoint_every`` writes training snapshots beside the checkpoint (rank 0, into
``out_dir/training_state``, see :mod:`lrnnx_zoo.training_state`), ``resume`` continues an
interrupted run from one (the same weights and metrics as the uninterrupted run, bit for bit), and
``init_from`` starts from a checkpoint's weights (fine-tuning).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import pprint
import shlex
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, ParamSpec, Tuple, TypeVar, Union

import torch
from torch import Tensor, nn

from .data import augment_digit_shifts
from .base import check_flags
from .models import ModelConfig, SequenceModel, _python_scalars
from .optim import check_optim_values, grouped_parameters
from .recipes import DataSpec, OptimSpec, Recipe, check_int, check_seed, get_recipe, override
from .registry import check_layer_arguments, get_layer_class
from .wording import given, name

if TYPE_CHECKING:  # training_state imports this module
    from .training_state import RunStart, Saver


class TrainingSetupError(ValueError):
    """A run that cannot train as asked, found before training starts (the CLI reports it as a usage error)."""


class BatchExceedsDataError(TrainingSetupError):
    """A global batch larger than the training set: no full batch, so no optimiser step."""

    def __init__(self, batch_size: int, n_train: int) -> None:
        self.batch_size, self.n_train = batch_size, n_train
        super().__init__(self.message("batch_size"))

    def message(self, name: str) -> str:
        """The message, with the batch size called ``name`` (the CLI says --batch-size)."""
        return (f"{name} {self.batch_size} exceeds the {self.n_train} training examples: no full batch, "
                f"so no optimiser step; expected a {name} <= {self.n_train}")


class MissingDependencyError(ImportError):
    """An optional package the run needs is not installed; the message says what to install."""


class TrainingDivergedError(RuntimeError):
    """The gradients became NaN or infinite: the run stops before the optimiser step that would write
    them into every weight (AdamW spreads a NaN gradient to its parameter, which no later step undoes),
    and no checkpoint is written."""


class EpochsNotReachedWarning(UserWarning):
    """max_steps ends a run before its last epoch starts, so part of ``epochs`` (e.g. a ``--epochs``
    given on the command line) has no effect on it."""


class ResumeNotExactWarning(UserWarning):
    """A run resumed on another number of processes or another device than its snapshot was written
    on: it goes on, but matches the uninterrupted run only to float rounding (dropout masks differ)."""


# -- data ------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    """Tensors for one task.  Classification: x (n, L, 1), y (n,) int64.  Forecasting: x, y
    (n, L, 1) and mask_test (n, L) bool marking the scored predictions."""

    task: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mask_test: Optional[Tensor]
    card: Dict[str, Any]  # the "dataset" entry of the model card
    augment: Optional[str] = None
    target: str = "next"  # forecasting: what y holds, see lrnnx_zoo.data.to_level


def load_task_data(recipe: Recipe) -> TaskData:
    """Load the data a recipe names, with its split recorded for the model card."""
    return load_data(recipe.data)


def load_data(spec: DataSpec) -> TaskData:
    """Load a data set by its spec; the card records the spec so the split can be rebuilt."""
    from . import data as D
    params = dict(spec.params)
    if spec.name == "digits":
        augment = params.pop("augment", None)
        if augment not in (None, "shift"):
            raise ValueError(f"digits augment must be None or 'shift', got {augment!r}")
        split = D.Split(**params)
        x_tr, y_tr, x_te, y_te = D.load_digits_sequences(split)
        card = {"name": "digits", "source": "scikit-learn bundled (UCI optical recognition of handwritten digits)",
                "split": {"seed": split.seed, "n_train": len(y_tr), "n_test": len(y_te)},
                "format": "8x8 images read row-major as 64-step sequences, pixels / 16", "spec": spec.to_dict()}
        if augment:
            card["augmentation"] = "random shifts of +-1 pixel per axis (training only)"
        return TaskData(spec.task, x_tr, y_tr, x_te, y_te, None, card, augment)
    split_keys = {"n_train", "n_val"}
    split = D.TimeSplit(**{k: v for k, v in params.items() if k in split_keys})
    fd = D.load_forecast_series(spec.name, split=split,
                                **{k: v for k, v in params.items() if k not in split_keys})
    return TaskData(spec.task, fd.x_train, fd.y_train, fd.x_test, fd.y_test, fd.mask_test,
                    {**fd.info, "spec": spec.to_dict()}, target=fd.target)


# -- distributed -----------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: What torchrun sets for each process and env:// rendezvous reads besides WORLD_SIZE.
RENDEZVOUS_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def launcher_int(name: str, default: int) -> int:
    """The integer environment variable ``name`` that torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK), or
    ``default`` where it is unset or empty; a TrainingSetupError naming it where it is no integer
    (``WORLD_SIZE=abc`` was a bare int() ValueError traceback; a bad RANK one after training had run)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise TrainingSetupError(f"environment variable {name} is {text!r}; expected an integer (torchrun sets "
                                 f"it for each process), or unset it to train in one process") from None


def setup_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist
    world = launcher_int("WORLD_SIZE", 1)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world <= 1:
        return DistInfo(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    missing = [n for n in RENDEZVOUS_ENV if not os.environ.get(n, "").strip()]
    if missing and not dist.is_initialized():
        # a WORLD_SIZE left in the environment (a scheduler's, another job's) without torchrun's other
        # variables: torch's rendezvous failed in a 30-line ValueError traceback
        raise TrainingSetupError(f"WORLD_SIZE={world} says this is one of {world} processes, but "
                                 f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set, as torchrun "
                                 f"sets them: launch it with torchrun (python -m torch.distributed.run), or unset "
                                 f"WORLD_SIZE to train in one process")
    launcher_int("RANK", 0)
    local_rank = launcher_int("LOCAL_RANK", 0)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), dev, owns)


def global_batches(n: int, batch_size: int, epoch: int, seed: int) -> Iterator[Tensor]:
    """Example indices of each global batch of one epoch; the last partial batch is dropped.

    The permutation depends only on (seed, epoch), so every rank draws the same global batches.
    """
    if n < batch_size:
        raise ValueError(f"the training set has {n} examples, fewer than one batch of {batch_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start:start + batch_size]


def check_device(device: Any, cli: bool = False) -> Optional[str]:
    """``device`` as a string if this torch can train on it (None: pick CUDA when available); a bad
    name is a TrainingSetupError, a CUDA device on a CPU-only torch too. ``cli``: the advice names
    the ``--device`` flag (it said "use device='cpu' or None" on the command line)."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be None, a str such as 'cpu' or 'cuda:0', or a torch.device; "
                        f"got {device!r} ({type(device).__name__})")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TrainingSetupError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cpu":
        return str(dev)
    if dev.type != "cuda":
        raise TrainingSetupError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    _check_cuda_index(dev, device, cli)
    return str(dev)


def _check_cuda_index(dev: torch.device, given: Any, cli: bool = False) -> None:
    if not torch.cuda.is_available():
        why = "is built without CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
        advice = "use --device cpu, or leave --device out" if cli else "use device='cpu' or None"
        raise TrainingSetupError(f"device {str(given)!r} asked for a GPU, but this torch ({torch.__version__}) {why}; "
                                 f"{advice}")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise TrainingSetupError(f"device {str(given)!r}: expected an index in [0, {count - 1}] "
                                 f"({count} GPU{'s' if count > 1 else ''} visible)")


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous, equal share [rank * B/N, (rank + 1) * B/N) of a global batch of B."""
    if batch_size % world_size:
        raise ValueError(f"the global batch size ({batch_size}) must be divisible by the number of "
                         f"processes ({world_size}); pick --batch-size as a multiple of {world_size}")
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


# -- optimisation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    """How many optimiser steps a run takes: ``total`` of the ``full`` that its epochs hold."""

    steps_per_epoch: int
    full: int
    total: int

    @property
    def cut_short(self) -> bool:
        """Whether max_steps ends the run before its epochs do."""
        return self.total < self.full


def plan_steps(n_train: int, optim: OptimSpec, max_steps: Optional[int]) -> StepPlan:
    """The step plan of a run, or a TrainingSetupError if it would take no optimiser step."""
    if optim.batch_size > n_train:
        raise BatchExceedsDataError(optim.batch_size, n_train)
    steps_per_epoch = n_train // optim.batch_size
    full = steps_per_epoch * optim.epochs
    return StepPlan(steps_per_epoch, full, full if max_steps is None else min(full, max_steps))


def unreached_epochs(optim: OptimSpec, plan: StepPlan, max_steps: Optional[int]) -> Optional[str]:
    """Why some of ``optim.epochs`` never run (max_steps ends the run before they start), or None.

    E.g. a recipe with max_steps=8 ignores ``--epochs 3``: the run is the same 8 steps either way.
    """
    reached = -(-plan.total // plan.steps_per_epoch)          # epochs that take at least one step
    if reached >= optim.epochs:
        return None
    never = f"epoch {optim.epochs}" if reached + 1 == optim.epochs else f"epochs {reached + 1} to {optim.epochs}"
    # in the caller's words: Python keywords, or the flags under `lrnnx-zoo train` (lrnnx_zoo.wording)
    return (f"{given('epochs', optim.epochs)} asks for {plan.full} optimiser steps ({plan.steps_per_epoch} per "
            f"epoch), but {given('max_steps', max_steps)} ends the run after {plan.total}, in epoch {reached}: "
            f"{never} never run. Raise {name('max_steps')} to {plan.full} to train every epoch, or ask for "
            f"{_plural(reached, 'epoch')} ({given('epochs', reached)})")


def param_groups(model: nn.Module, lr: float, weight_decay: float, ssm_lr: Optional[float]) -> List[Dict[str, Any]]:
    """AdamW groups: decayed matrices; undecayed biases/norms; the sequence layers' state-space
    parameters at ``ssm_lr`` without decay.  A parameter's record ({"lr", "weight_decay"}, the S4
    ``register`` convention, see :mod:`lrnnx_zoo.optim`) overrides those defaults for that parameter.

    ``model``: a :class:`SequenceModel`, a module holding one or more (your own network around it),
    or a bare layer (``create_layer``).  Its sequence layers are each block's layer and every
    :class:`~lrnnx_zoo.base.LRNN` in it (it read ``model.blocks``: anything else raised AttributeError).
    A layer's state-space parameters are those its own classes hold (A, B, C, D, dt, ...); the ones
    held by ``torch.nn`` building blocks inside it (e.g. FFTConv's channel-mixing ``nn.Linear``), or
    by a module class marked ``trains_like_network = True`` (S4's ``TransposedLinear``), train like
    the rest of the network.  Pass the result to the optimiser: ``torch.optim.AdamW(param_groups(...))``
    (every group sets its own lr and weight_decay, so the optimiser's own arguments do not apply)."""
    check_optim_values("param_groups", lr=lr, weight_decay=weight_decay, ssm_lr=ssm_lr)
    layer_params = {id(p) for layer in sequence_layers(model) for p in ssm_parameters(layer)}
    layer_lr = ssm_lr if ssm_lr is not None else lr

    def default(p: nn.Parameter) -> Tuple[float, float]:
        if id(p) in layer_params:
            return layer_lr, 0.0
        return lr, weight_decay if p.dim() >= 2 else 0.0
    return grouped_parameters(model, default)


def sequence_layers(model: nn.Module) -> List[nn.Module]:
    """The sequence layers in ``model`` (itself included): each block's ``layer`` (any registered
    layer), every :class:`~lrnnx_zoo.base.LRNN`, and every module whose class says it is one with
    ``sequence_layer = True`` (the seed-style ``S4`` and ``FFTConvS4``, whose D, A, B, C and dt were
    decayed at the network's lr)."""
    from .base import LRNN
    from .models import Block
    return [m.layer if isinstance(m, Block) else m for m in model.modules()
            if isinstance(m, (Block, LRNN)) or getattr(m, "sequence_layer", False)]


def ssm_parameters(layer: nn.Module) -> List[nn.Parameter]:
    """The parameters of ``layer`` held by its own (non-``torch.nn``) modules: what ``ssm_lr`` and
    the no-decay rule of :func:`param_groups` apply to. A parameter under ``torch.nn.utils.parametrize``
    (its ``original``, kept in a torch.nn ParametrizationList) belongs to the module parametrized: it
    was decayed at the network's lr (an audit)."""
    from torch.nn.utils import parametrize
    found = []
    for module in layer.modules():
        if _is_torch_building_block(module):
            continue
        found += module.parameters(recurse=False)
        if parametrize.is_parametrized(module):
            found += [p for plist in module.parametrizations.values() for p in plist.parameters(recurse=False)]
    return found


def _is_torch_building_block(module: nn.Module) -> bool:
    """An ``nn.Linear``, norm, convolution, ... (or a subclass of one, not any ``nn.Module``), or a
    module whose class says it is one with ``trains_like_network = True``."""
    # torch.nn.utils.parametrize swaps a parametrized module's class for a subclass it defines: that
    # class says nothing of what the module is
    return getattr(module, "trains_like_network", False) or any(
        cls is not nn.Module and cls.__module__.startswith("torch.nn.") and cls.__module__ != "torch.nn.utils.parametrize"
        for cls in type(module).__mro__)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear 0 -> 1 over ``warmup`` steps, then cosine 1 -> 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def batch_loss(model: nn.Module, task: str, x: Tensor, y: Tensor) -> Tensor:
    """Mean loss over the batch (cross-entropy, or MSE over every position for forecasting)."""
    out = model(x)
    if task == "sequence-classification":
        return nn.functional.cross_entropy(out, y)
    return nn.functional.mse_loss(out, y)


# -- evaluation ------------------------------------------------------------------------------------
@dataclass
class MetricSums:
    """Running sums of a task's test metrics, kept in float64 (Python floats) so that adding many
    batches does not drift the way float32 sums do; :meth:`result` turns them into means.

    Classification counts examples, correct predictions and the summed cross-entropy; forecasting
    counts the scored positions and sums the squared / absolute errors of the model and of the naive
    last-value forecast, all in normalised units.
    """

    task: str
    target: str = "next"
    count: int = 0
    correct: int = 0
    loss: float = 0.0
    sq: float = 0.0
    abs: float = 0.0
    naive_sq: float = 0.0
    naive_abs: float = 0.0

    def add(self, out: Tensor, x: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> None:
        """Add one batch: model outputs ``out`` for inputs ``x`` with targets ``y`` (and, for
        forecasting, ``mask`` (n, L) bool marking the scored positions; None scores all)."""
        from .data import to_level
        out = torch.as_tensor(out).detach().to("cpu", torch.float64)
        if self.task == "sequence-classification":
            y = y.to("cpu")
            if out.dim() != 2 or len(out) != len(y) or (len(y) and int(y.max()) >= out.shape[1]):
                raise ValueError(f"classification needs one row of class scores per sequence, ({len(y)}, classes >= "
                                 f"{int(y.max()) + 1 if len(y) else 1}) (a model with pooling), got {tuple(out.shape)}")
            self.count += len(y)
            self.correct += int((out.argmax(-1) == y).sum())
            self.loss += nn.functional.cross_entropy(out, y, reduction="sum").item()
            return
        x, y = x.to("cpu", torch.float64), y.to("cpu", torch.float64)
        if out.shape != y.shape:
            raise ValueError(f"forecasting needs one output per input step, {tuple(y.shape)} (a model without "
                             f"pooling, d_output={y.shape[-1]}), got {tuple(out.shape)}")
        true = to_level(x, y, self.target)
        err = (to_level(x, out, self.target) - true).squeeze(-1)
        naive = (x - true).squeeze(-1)           # the last value as the forecast of the next one
        if mask is not None:
            err, naive = err[mask], naive[mask]
        self.count += err.numel()
        self.sq += err.pow(2).sum().item()
        self.abs += err.abs().sum().item()
        self.naive_sq += naive.pow(2).sum().item()
        self.naive_abs += naive.abs().sum().item()

    def result(self) -> Dict[str, float]:
        """The metrics (see :func:`score`); NaN when nothing was scored."""
        def mean(total: float) -> float:
            return total / self.count if self.count else float("nan")
        if self.task == "sequence-classification":
            return {"test_accuracy": mean(self.correct), "test_loss": mean(self.loss)}
        return {"test_mse": mean(self.sq), "test_mae": mean(self.abs),
                "naive_test_mse": mean(self.naive_sq), "naive_test_mae": mean(self.naive_abs)}


@torch.no_grad()
def evaluate(model: SequenceModel, data: TaskData, batch_size: int = 256) -> Dict[str, float]:
    """Test metrics of ``model`` on ``data`` (see :func:`score`), summed batch by batch in float64.

    The model runs in eval mode and is put back in the mode it was in, also when a batch fails.
    The (float32) inputs are given to it in its own dtype: a float64 model (trained in float64, or
    ``.double()``) is evaluated in float64 (it raised a dtype TypeError, also in ``lrnnx-zoo evaluate``).
    A bidirectional model (``model.bidirectional``) is refused on forecasting data with a ValueError:
    it reads the input of step t + 1, which is step t's target. ``batch_size``: an int >= 1 (a negative
    one returned NaN metrics, 0 failed as "range() arg 3 must not be zero").
    """
    check_int("evaluate's batch_size", batch_size, 1)
    if data.task != "sequence-classification" and getattr(model, "bidirectional", False):
        # it scored as a forecast what it had read: a bidirectional forecaster's test MSE (see FUTURE_INPUTS)
        raise ValueError(f"{type(model).__name__} has a layer with {FUTURE_INPUTS}")
    was_training = model.training
    model.eval()
    try:
        ref = next(model.parameters())
        sums = MetricSums(data.task, data.target)
        for i in range(0, len(data.x_test), batch_size):
            x = data.x_test[i:i + batch_size]
            mask = None if data.mask_test is None else data.mask_test[i:i + batch_size]
            sums.add(model(x.to(ref.device, ref.dtype)), x, data.y_test[i:i + batch_size], mask)
        return sums.result()
    finally:
        model.train(was_training)


def score(out: Tensor, data: TaskData) -> Dict[str, float]:
    """Metrics of test outputs, however they were computed (PyTorch forward, a streamed graph).

    Classification (out: (n, classes)): test_accuracy, test_loss. Forecasting (out: (n, L, 1),
    normalised units, scored positions only): test_mse, test_mae and the naive last-value
    forecast's naive_test_mse, naive_test_mae.  Computed in float64 (see :class:`MetricSums`).
    """
    sums = MetricSums(data.task, data.target)
    sums.add(out, data.x_test, data.y_test, data.mask_test)
    return sums.result()


def checkpoint_data(info: Dict[str, Any]) -> TaskData:
    """Rebuild the evaluation split a checkpoint records (``checkpoint_info["dataset"]["spec"]``)."""
    dataset = info.get("dataset")
    dataset = dataset if isinstance(dataset, dict) else {}      # save_pretrained(dataset="name") records a str
    spec = dataset.get("spec")
    split = dataset.get("split") or {}
    if spec is None and dataset.get("name") == "digits" and {"seed", "n_test"} <= set(split):
        spec = {"name": "digits", "params": {"seed": split["seed"], "n_test": split["n_test"]}}  # older records
    if not isinstance(spec, dict) or "name" not in spec:
        # (checkpoints of the first releases' train wrote none: "written by train have one" misled there)
        raise ValueError("this checkpoint records no data spec (dataset.spec) to rebuild its evaluation split from: "
                         "checkpoints that `lrnnx-zoo train` writes have one (older ones may not), while "
                         "save_pretrained records one only from a dataset= dict holding it, as train's do. "
                         "Evaluate it on its data in Python: "
                         "lrnnx_zoo.training.evaluate(model, data) with data a lrnnx_zoo.training.TaskData")
    try:
        return load_data(DataSpec(spec["name"], spec.get("params", {})))
    except ImportError as exc:      # e.g. the digits need scikit-learn, an extra a plain install lacks
        _raise_missing_dependency(exc)
        raise


# -- the loop --------------------------------------------------------------------------------------
#: Held while a run has the process's deterministic-algorithms setting and global random generators
#: (_deterministic, _private_rng: each puts back what it found). Two runs in two threads of one process
#: that overlapped without nesting put back each other's: deterministic mode stayed on for good and the
#: caller's generator was left in a run's seeded stream. Runs in one process take turns.
TRAIN_LOCK = threading.RLock()


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Ask for deterministic kernels (warn instead of fail where an op has none), then restore. A
    caller's strict setting (``use_deterministic_algorithms(True)``) is kept: it was relaxed to
    warnings for the run (global-modes audit)."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_before or not before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_before)


def _private_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Fork torch's global generators (CPU, and ``device``'s if CUDA) for the run, which seeds them
    (weights, dropout): the caller's stream goes on where it was.  It restarted from the run's seed,
    so a random search drawing its next learning rate after each train() drew the same one each time."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _training_grad_mode(run: Callable[_P, _R]) -> Callable[_P, _R]:
    """``run`` (``train``) with gradients on and inference mode off, whatever the caller's mode, and
    refused under a caller's ``torch.autocast``. Under ``torch.no_grad()`` or ``torch.inference_mode()``
    (an evaluation harness's) the first step failed with "element 0 of tensors does not require grad";
    under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the run trained in bfloat16, silently, to other
    weights than its card's command gives (digits-tiny: test loss 2.412 against 2.394)."""
    @functools.wraps(run)
    def in_grad_mode(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        on = [kind for kind in ("cpu", "cuda") if torch.is_autocast_enabled(kind)]
        if on:
            raise TrainingSetupError(f"train runs a recipe in the precision its card records, but was called inside "
                                     f"torch.autocast (enabled for {', '.join(on)}), which would train it in half "
                                     f"precision to other weights than its command gives; call train outside the "
                                     f"autocast region")
        with torch.inference_mode(False), torch.enable_grad():
            return run(*args, **kwargs)
    return in_grad_mode


def reproduce_command(recipe: Recipe, out_dir: str, init_from: Optional[str] = None, processes: int = 1) -> str:
    """A shell command that reproduces a run of ``recipe`` in ``processes`` processes, writing to
    ``out_dir`` (starting from the checkpoint ``init_from``, if given).

    The ``lrnnx-zoo train`` line when it is exact: the registered recipe of that name, changed only
    in what the CLI has flags for (seed, epochs, batch size, max steps, the layer and its keyword
    arguments), is this recipe (the
    description aside, which does not change the run).  Otherwise (a recipe of another name, another
    learning rate, model or data, or a max_steps the CLI cannot lift) a Python snippet that rebuilds
    the recipe field by field and trains it.  The line of a run in several processes launches them
    with torchrun (``python -m lrnnx_zoo``: torchrun runs a module, not the ``lrnnx-zoo`` script), since
    one process sums the batch in another order and trains other last bits.
    """
    cli = _cli_command(recipe, out_dir, init_from)
    if cli is None:
        return _python_command(recipe, out_dir, init_from)
    if processes > 1:
        cli = f"torchrun --nproc_per_node={processes} -m lrnnx_zoo{cli[len('lrnnx-zoo'):]}"
    return cli


def _cli_command(recipe: Recipe, out_dir: str, init_from: Optional[str] = None) -> Optional[str]:
    """The ``lrnnx-zoo train`` line that reproduces ``recipe``, or None when the CLI cannot express it."""
    try:
        base = get_recipe(recipe.name)
    except KeyError:                    # UnknownRecipeError: not a registered name
        return None
    layer = recipe.model.get("layer")
    swapped = layer if layer != base.model.get("layer") else None
    kwargs = dict(recipe.model.get("layer_kwargs") or {})
    # --layer-kwargs with the whole dict when the flags alone would give other ones: it overrides every key
    if override(base, layer=swapped).model.get("layer_kwargs") == kwargs:
        given = None
    else:
        given = kwargs
    try:
        made = override(base, seed=recipe.seed, epochs=recipe.optim.epochs, batch_size=recipe.optim.batch_size,
                        max_steps=recipe.max_steps,   # max_steps None keeps the registered one: no flag lifts it
                        layer=swapped, layer_kwargs=given)
        as_flag = None if given is None else json.dumps(given, sort_keys=True)
        if as_flag is not None and json.loads(as_flag) != given:    # a tuple, say: JSON gives it back as a list
            return None
    except (TypeError, ValueError):    # a layer name or kwargs the flags cannot carry
        return None
    if dataclasses.replace(made, description=recipe.description) != recipe:
        return None
    cmd = f"lrnnx-zoo train {shlex.quote(recipe.name)} --out {shlex.quote(out_dir)} --seed {recipe.seed}"
    if recipe.optim.epochs != base.optim.epochs:
        cmd += f" --epochs {recipe.optim.epochs}"
    if recipe.optim.batch_size != base.optim.batch_size:
        cmd += f" --batch-size {recipe.optim.batch_size}"
    if recipe.max_steps != base.max_steps:
        cmd += f" --max-steps {recipe.max_steps}"
    if swapped is not None:
        cmd += f" --layer {shlex.quote(swapped)}"
    if as_flag is not None:
        cmd += f" --layer-kwargs {shlex.quote(as_flag)}"
    if init_from is not None:
        cmd += f" --init-from {shlex.quote(init_from)}"
    return cmd


def _python_command(recipe: Recipe, out_dir: str, init_from: Optional[str] = None) -> str:
    """A ``python - <<'EOF'`` heredoc (no shell quoting needed) that rebuilds ``recipe`` from its repr
    and trains it; if the repr does not rebuild an equal recipe (a value that is no Python literal),
    a comment saying so instead of a command that would train something else."""
    from . import recipes as R
    text = pprint.pformat(recipe, width=100, sort_dicts=False)
    try:
        names = {"__builtins__": {}, "Recipe": R.Recipe, "DataSpec": R.DataSpec, "OptimSpec": R.OptimSpec}
        exact = eval(text, names) == recipe
    except Exception:                   # any failure to rebuild means: not reproducible this way
        exact = False
    if not exact:
        return (f"# not reproducible from a command: recipe {recipe.name!r} holds values that are not "
                f"Python literals; it was: {recipe!r}")
    code = ("from lrnnx_zoo.recipes import DataSpec, OptimSpec, Recipe\n"
            "from lrnnx_zoo.training import train\n\n"
            "recipe = " + text.replace("\n", "\n" + " " * len("recipe = ")) + "\n"
            f"train(recipe, out_dir={str(out_dir)!r}"
            + ("" if init_from is None else f", init_from={init_from!r}") + ")\n")
    return f"python - <<'EOF'\n{code}EOF"


@_training_grad_mode
def train(recipe: Recipe | str, out_dir: Optional[Union[str, os.PathLike]] = None, seed: Optional[int] = None,
          progress: bool = True, device: Optional[str] = None,
          command: Optional[str] = None, *, checkpoint_every: Union[int, str, None] = None,
          resume: Union[bool, str, os.PathLike] = False,
          init_from: Optional[Union[str, os.PathLike]] = None) -> Tuple[SequenceModel, Dict[str, float]]:
    """Train ``recipe`` (a :class:`Recipe` or its name) and return (model in eval mode, test metrics).

    seed overrides the recipe's seed.  With ``out_dir`` rank 0 writes the checkpoint there with
    ``model.save_pretrained`` (config, safetensors weights, model card with metrics and the
    command that reproduces it; ``command`` overrides the one derived from the recipe).  The model
    carries the same record as ``model.checkpoint_info`` (as a loaded one does), so a later
    ``save_pretrained(DIR)`` or ``push_to_hub(REPO)`` writes the complete card too.

    Checked before training starts: a wrong type is a TypeError; an unusable device, an ``out_dir``
    the checkpoint could not be saved into (a file, an export folder, no write permission; an existing
    checkpoint folder is replaced, as by ``save_pretrained``), or a run that would take no optimiser
    step (batch_size above the training set size), a :class:`TrainingSetupError` (a ValueError); a
    missing optional package for the data a :class:`MissingDependencyError`.  When max_steps ends the
    run before its last epoch starts, an :class:`EpochsNotReachedWarning` says so (rank 0, before training).
    Gradients that turn NaN or infinite (a learning rate too high) stop the run with a
    :class:`TrainingDivergedError` that names the step; nothing is saved.  The run computes gradients
    also when called under ``torch.no_grad()`` or ``torch.inference_mode()``, and is refused (a
    TrainingSetupError) inside ``torch.autocast``, which would change its weights.

    Snapshots and resuming (see :mod:`lrnnx_zoo.training_state`): ``checkpoint_every=N`` makes rank 0
    write a training snapshot (weights, optimiser, schedule, random generators, step) every N optimiser
    steps, ``checkpoint_every="epoch"`` at the end of every epoch, into ``out_dir/training_state``
    (the newest two are kept).  ``resume=True`` continues the run (and its snapshots, every
    ``checkpoint_every`` steps as before unless given anew) from the newest snapshot in
    ``out_dir``, ``resume=PATH`` from a snapshot folder (or the newest in a ``training_state`` folder
    or run folder); every rank resumes from the one rank 0 picked, and the result is the weights and
    metrics of the uninterrupted run, bit for bit.  A snapshot of another recipe, seed, number of
    epochs, ... or another ``init_from`` is refused naming the differences, a damaged one naming the
    older intact snapshot if one is left (:class:`~lrnnx_zoo.training_state.SnapshotError`, a
    TrainingSetupError).  A fresh run into an ``out_dir`` that holds snapshots is refused: resume it,
    or remove ``out_dir/training_state``.

    ``init_from`` (a checkpoint folder, shipped name or Hub id, as ``from_pretrained`` takes) starts
    from those weights instead of random ones (fine-tuning); its model must be the recipe's (dropout
    aside), else a TrainingSetupError names what differs.  The card's notes and command record it.
    """
    recipe = _as_recipe(recipe)
    from .hub_save import check_command
    check_command(command)      # the card's, written after the run: an int failed there, the run lost
    check_flags("train", progress=progress)     # progress="no" was read for its truth: a bar
    if torch.get_default_dtype() not in (torch.float32, torch.float64):
        # the model is built in it: the first step failed, advising .float() and an autocast train refuses
        raise TrainingSetupError(f"train builds the model in torch's default dtype, {torch.get_default_dtype()}, but the "
                                 f"layers compute in float32 or float64: call torch.set_default_dtype(torch.float32) "
                                 f"(or float64) first")
    if seed is not None:
        recipe = dataclasses.replace(recipe, seed=check_seed(seed))
    device = check_device(device)
    _check_out_dir(out_dir)
    _check_model_saves(recipe, out_dir)
    _check_layer_arguments(recipe)
    from . import training_state as TS
    every = TS.check_checkpoint_every(checkpoint_every, out_dir)
    TS.check_resume(resume, out_dir)
    init = TS.initial_weights(init_from, recipe)
    data = _load_training_data(recipe)
    _check_model_fits_data(recipe, data)
    plan = plan_steps(len(data.x_train), recipe.optim, recipe.max_steps)
    dist_info = setup_distributed(device)
    unreached = unreached_epochs(recipe.optim, plan, recipe.max_steps)
    if unreached and dist_info.is_main:               # once, not once per rank
        warnings.warn(unreached, EpochsNotReachedWarning, stacklevel=2)
    try:
        _check_shares(recipe.optim, dist_info)
        start = TS.starting_point(recipe, plan, out_dir, resume, init, dist_info)
        if every is None and out_dir is not None:      # resumed: snapshots as the run took them before
            every = start.record.get("checkpoint_every")
        saver = None if every is None else TS.Saver(every, out_dir, start.run, start.init_record, dist_info)
        with TRAIN_LOCK, _deterministic(), _private_rng(dist_info.device):
            model, metrics, seconds, steps = _run(recipe, data, plan, dist_info, progress, start, saver)
        notes = training_notes(recipe, plan, steps, seconds, dist_info.world_size, _device_name(model))
        notes += start.notes(plan.total)
        source = start.init_record["source"] if start.init_record else None
        meta = dict(task=recipe.task, dataset=data.card, metrics=metrics, notes=notes,
                    command=command or reproduce_command(recipe, "DIR" if out_dir is None else str(out_dir), source,
                                                         dist_info.world_size))
        _save(model, out_dir, meta, dist_info)
        model.checkpoint_info = _checkpoint_info(model, recipe, out_dir, meta)
        if dist_info.owns_group:
            # Every rank done with the group before any tears it down. Once (one run in hundreds, on a
            # loaded machine; not reproduced in 8 runs under load since) a torchrun child died at exit
            # with gloo's "terminate called without an active exception" after a successful run.
            torch.distributed.barrier()
    finally:
        if dist_info.owns_group:
            torch.distributed.destroy_process_group()
    return model, metrics


def _save(model: SequenceModel, out_dir: Optional[str], meta: Dict[str, Any], di: DistInfo) -> None:
    """Rank 0 saves the checkpoint (if ``out_dir``); see :func:`on_rank_0`."""
    def save() -> None:
        if out_dir is not None:
            model.save_pretrained(out_dir, **meta)
    on_rank_0(save, di, "save the checkpoint")


def on_rank_0(action: Callable[[], None], di: DistInfo, what: str) -> None:
    """Run ``action`` (a write) on rank 0 only; with several processes, no rank goes on before it has,
    and when it fails every rank raises (the others an OSError "rank 0 could not {what} (...)"; they
    failed with gloo's "Connection closed by peer" when rank 0 left, or waited on nccl)."""
    failure: Optional[BaseException] = None
    if di.is_main:
        try:
            action()
        except Exception as exc:          # told to the other ranks, then raised here as it was
            failure = exc
    if di.world_size > 1:
        told = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        torch.distributed.broadcast_object_list(told, src=0)     # also the barrier before anyone goes on
        if told[0] is not None and failure is None:
            raise OSError(f"rank 0 could not {what} ({told[0]})")
    if failure is not None:
        raise failure


def _as_recipe(recipe: Any) -> Recipe:
    """A private copy of ``recipe`` (a Recipe or a registered name): the run never shares its dicts."""
    if isinstance(recipe, str):
        return get_recipe(recipe)
    if isinstance(recipe, Recipe):
        return copy.deepcopy(recipe)
    raise TypeError(f"train expects a Recipe or a recipe name (str), got {recipe!r} ({type(recipe).__name__})")


def _check_out_dir(out_dir: Any) -> None:
    """Refuse an ``out_dir`` the checkpoint could not be saved into, before any training: a run that
    cannot save is lost.  Same rules as ``save_pretrained`` (:func:`lrnnx_zoo.hub_save.check_save_target`):
    a new folder or an lrnnx-zoo checkpoint folder (replaced atomically) is fine; a file, an export
    folder, another library's model folder or an unwritable place is a TrainingSetupError."""
    if out_dir is None:
        return
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be None or a folder path (str or os.PathLike), "
                        f"got {out_dir!r} ({type(out_dir).__name__})")
    if not hasattr(SequenceModel, "save_pretrained"):
        raise RuntimeError("SequenceModel.save_pretrained is not available (lrnnx_zoo.hub not installed); "
                           "train without out_dir or install a complete lrnnx-zoo")
    from .hub import CheckpointError
    from .hub_save import check_save_target
    try:
        check_save_target(out_dir, what="out_dir")
    except (CheckpointError, PermissionError) as exc:
        raise TrainingSetupError(str(exc)) from exc


def _check_model_saves(recipe: Recipe, out_dir: Any) -> None:
    """With ``out_dir``, refuse before training a recipe model whose config.json cannot be written (a
    value JSON cannot hold, e.g. an object in layer_kwargs): the save after training failed on it."""
    if out_dir is None:
        return
    from .hub_save import model_config_json
    try:
        model_config_json(ModelConfig(**recipe.model))
    except (TypeError, ValueError) as exc:
        raise TrainingSetupError(f"recipe {recipe.name!r}: its model's config.json could not be written into "
                                 f"out_dir after training: {exc}") from exc


def _check_layer_arguments(recipe: Recipe) -> None:
    """Refuse, before the data loads, layer_kwargs the recipe's layer does not take (a keyword of another
    family after ``override(layer=...)``, a typo in ``--layer-kwargs``): the build after loading raised a
    TypeError traceback from inside the model's constructor. An unknown layer is left to the build,
    which names the ones registered."""
    m = recipe.model
    kwargs = m.get("layer_kwargs") or {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        return                                             # ModelConfig's own checks name it
    try:
        check_layer_arguments(m.get("layer"), m.get("d_model"), **kwargs)
    except TypeError as exc:
        raise TrainingSetupError(f"recipe {recipe.name!r}: {exc}") from exc
    except (KeyError, LookupError):
        return


def _check_shares(optim: OptimSpec, di: DistInfo) -> None:
    """Refuse a global batch that the processes cannot share equally, before any training (it was a
    ValueError traceback from every rank once the model was built)."""
    try:
        rank_slice(optim.batch_size, di.rank, di.world_size)
    except ValueError as exc:
        raise TrainingSetupError(str(exc)) from None


#: Why a forecaster may not read future inputs: the target of step t is the input of step t + 1.
FUTURE_INPUTS = ("bidirectional=True, but a next-step forecaster may not read future inputs: the target of step t "
                 "(z_{t+1}) is the input of step t + 1, so its test metrics would not be forecasts")


def _reads_ahead(layer: Any, layer_kwargs: Dict[str, Any]) -> bool:
    """Whether the recipe's layer will be bidirectional: its ``bidirectional`` keyword as the layer will
    read it (np.True_ too; a non-bool is the layer's own TypeError), else the layer class's default for
    it, or its class attribute (a plugin layer bidirectional by default was caught only by evaluate,
    after the whole run). An unknown layer is left to the model's build, which names it."""
    if "bidirectional" in layer_kwargs:
        return _python_scalars(layer_kwargs["bidirectional"]) is True
    try:
        cls = get_layer_class(layer)
        default = inspect.signature(cls).parameters.get("bidirectional")
    except (KeyError, LookupError, TypeError, ValueError):
        return False
    if default is not None and default.default is not inspect.Parameter.empty:
        return default.default is True
    return getattr(cls, "bidirectional", False) is True


def _check_model_fits_data(recipe: Recipe, data: TaskData) -> None:
    """Raise a TrainingSetupError, before any step, unless the recipe's model takes the data's input and
    gives the outputs its task scores. A classifier with fewer outputs than classes failed in the
    first step ("Target 6 is out of bounds"), one without pooling on the target's shape; a forecaster
    with pooling or another output width trained on a broadcast MSE and failed at evaluation, after
    the whole run, saving nothing; a bidirectional forecaster (``layer_kwargs`` bidirectional=True) read
    step t + 1's input, step t's target, and its card reported that as a forecast's test error."""
    m = recipe.model
    d_in, task = data.x_train.shape[-1], data.task
    problems = []
    if m.get("d_input") != d_in:
        problems.append(f"d_input={m.get('d_input')}, but the data's sequences have {d_in} feature(s) per step")
    if task == "sequence-classification":
        classes = int(data.y_train.max()) + 1 if data.y_train.numel() else 0
        if m.get("pooling") is None:
            problems.append("pooling=None, but classification needs one output per sequence (pooling 'mean' or 'last')")
        if m.get("d_output", 0) < classes:
            problems.append(f"d_output={m.get('d_output')}, but the data has {classes} classes")
    else:
        if m.get("pooling") is not None:
            problems.append(f"pooling={m.get('pooling')!r}, but forecasting needs one output per step (pooling=None)")
        if m.get("d_output") != data.y_train.shape[-1]:
            problems.append(f"d_output={m.get('d_output')}, but the forecast targets have {data.y_train.shape[-1]} "
                            f"value(s) per step")
        if _reads_ahead(m.get("layer"), m.get("layer_kwargs") or {}):
            problems.append(FUTURE_INPUTS)
    if problems:
        raise TrainingSetupError(f"recipe {recipe.name!r}'s model does not fit its {task} data: "
                                 + "; ".join(problems) + ". Fix the recipe's model")


def _load_training_data(recipe: Recipe) -> TaskData:
    """The recipe's data; a missing third-party package becomes a MissingDependencyError."""
    try:
        return load_task_data(recipe)
    except ImportError as exc:
        _raise_missing_dependency(exc)
        raise


def _raise_missing_dependency(exc: ImportError) -> None:
    """Raise a MissingDependencyError saying what to install if a third-party package's absence
    caused ``exc``; return otherwise (a broken import of our own is re-raised as it was)."""
    missing = _missing_module(exc)
    if missing is not None:
        hint = str(exc) if "pip install" in str(exc) else f"{exc}; install it with: pip install {missing}"
        raise MissingDependencyError(hint) from exc


def _missing_module(exc: Optional[BaseException]) -> Optional[str]:
    """The top-level name of the third-party module whose absence caused ``exc``, if one did."""
    while exc is not None:
        name = getattr(exc, "name", None)
        if isinstance(exc, ModuleNotFoundError) and name and not name.startswith("lrnnx_zoo"):
            return name.split(".")[0]
        exc = exc.__cause__ or exc.__context__
    return None


def _run(recipe: Recipe, data: TaskData, plan: StepPlan, di: DistInfo, progress: bool,
         start: Optional["RunStart"] = None,
         saver: Optional["Saver"] = None) -> Tuple[SequenceModel, Dict[str, float], float, int]:
    """The loop itself: returns (model, test metrics, training seconds, optimiser steps taken), from
    ``start`` (random weights by default) and writing snapshots with ``saver``."""
    from .training_state import RunStart, model_state, restore
    opt_spec = recipe.optim
    start = start or RunStart(run={})
    torch.manual_seed(recipe.seed)  # initial weights and dropout masks
    model = SequenceModel(ModelConfig(**recipe.model)).to(di.device)     # recipe: train's private copy
    if start.snapshot is not None:
        model.load_state_dict(model_state(start.tensors))
    elif start.weights is not None:
        # init_from's weights over the seeded model: a head of another size than the checkpoint's is
        # left out of them (training_state.initial_weights) and keeps the seed's initialisation
        model.load_state_dict({**model.state_dict(), **start.weights})
    net: nn.Module = model
    if di.rank > 0:  # distinct dropout masks per rank; rank 0 keeps the single-process stream
        torch.manual_seed(recipe.seed + 1_000_003 * di.rank)
    if di.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    mine = rank_slice(opt_spec.batch_size, di.rank, di.world_size)
    optimizer = torch.optim.AdamW(param_groups(model, opt_spec.lr, opt_spec.weight_decay, opt_spec.ssm_lr))
    n, total = len(data.x_train), plan.total
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(opt_spec.warmup_steps, total))
    aug_gen = torch.Generator().manual_seed(recipe.seed + 1)
    if start.snapshot is not None:
        restore(start, optimizer, schedule, aug_gen, di, recipe.seed)
    step, before = start.step, float(start.record.get("seconds", 0.0))
    show = progress and di.is_main and sys.stderr.isatty()
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=step, desc=recipe.name, disable=not show, dynamic_ncols=True)
    began = time.perf_counter()
    model.train()
    dtype = model.encoder.weight.dtype
    first_epoch, done_in_it = divmod(step, plan.steps_per_epoch)   # a resumed run skips the batches it took
    rates = schedule.get_last_lr()
    for epoch in range(first_epoch, opt_spec.epochs):
        if step >= total:
            break
        batches = global_batches(n, opt_spec.batch_size, epoch, recipe.seed)
        for idx in itertools.islice(batches, done_in_it if epoch == first_epoch else 0, None):
            if step >= total:
                break
            x, y = data.x_train[idx], data.y_train[idx]
            if data.augment == "shift":
                x = augment_digit_shifts(x, aug_gen)  # on the global batch, so every rank draws alike
            # in the model's dtype (float64 under torch.set_default_dtype(torch.float64), which the
            # layers follow; the recipes' data are float32, and the first batch was refused), as evaluate does
            x = x[mine].to(di.device, dtype)
            y = y[mine].to(di.device, dtype if y.is_floating_point() else None)
            loss = batch_loss(net, data.task, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # After DDP's all-reduce the gradients, so their norm and this check, agree on every rank.
            norm = nn.utils.clip_grad_norm_(model.parameters(), opt_spec.grad_clip or math.inf)
            rates = schedule.get_last_lr()      # this step's (after it, the schedule has moved on)
            if not torch.isfinite(norm):
                raise TrainingDivergedError(diverged_message(recipe, plan, step, epoch, float(norm), loss.item(),
                                                             rates, saver))
            optimizer.step()
            schedule.step()
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            if saver is not None and saver.due(step, plan):
                saver.write(step, plan, model, optimizer, schedule, aug_gen,
                            before + time.perf_counter() - began, start.resumed_at)
    bar.close()
    seconds = before + time.perf_counter() - began
    model.eval()
    metrics = evaluate(model, data)
    broken = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if broken:      # the last update diverged: no gradient after it to catch it; its outputs are NaN
        raise TrainingDivergedError(last_step_diverged_message(recipe, step, broken, rates, saver))
    if di.is_main and progress:
        print(f"{recipe.name}: {step} steps in {seconds:.0f} s; " +
              ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), file=sys.stderr)
    return model, metrics, seconds, step


def diverged_message(recipe: Recipe, plan: StepPlan, step: int, epoch: int, norm: float, loss: float,
                     rates: List[float], saver: Optional["Saver"] = None) -> str:
    """Why a run stopped at 0-based ``step`` (in 0-based ``epoch``) with a non-finite gradient norm,
    and what to change; ``rates``: the learning rates of that step, one per parameter group."""
    return (f"training diverged at optimiser step {step + 1} of {plan.total} (epoch {epoch + 1}): the gradient norm "
            f"is {norm} (batch loss {loss:.4g}); stopped before that step would write it into the weights; "
            + _what_is_left(saver) + _rates_advice(recipe, rates, "This step's"))


def last_step_diverged_message(recipe: Recipe, steps: int, broken: Dict[str, float], rates: List[float],
                               saver: Optional["Saver"] = None) -> str:
    """Why a run whose last optimiser step (``steps`` taken) left weights with non-finite test metrics
    ``broken`` stopped before saving them."""
    shown = ", ".join(f"{k}={v}" for k, v in broken.items())
    return (f"training diverged at its last optimiser step ({steps}): the weights it wrote give {shown} on the "
            f"test split (outputs NaN or infinite); " + _what_is_left(saver) + _rates_advice(recipe, rates, "The last step's"))


def _what_is_left(saver: Optional["Saver"]) -> str:
    """What a diverged run leaves: nothing, or the snapshots it wrote before, which replay it."""
    from .training_state import list_snapshots, snapshot_root
    held = [] if saver is None else list_snapshots(snapshot_root(saver.out_dir))
    if not held:
        return "nothing was saved. "
    return (f"the checkpoint was not written, and the training snapshots in {held[-1][1].parent} (newest: step "
            f"{held[-1][0]}) stay, but they replay this run bit for bit, so resuming one diverges again: start "
            f"anew with other settings. ")


def _rates_advice(recipe: Recipe, rates: List[float], whose: str) -> str:
    o = recipe.optim
    return (f"{whose} learning rate{'s were' if len(set(rates)) > 1 else ' was'} "
            f"{', '.join(f'{r:.3g}' for r in sorted(set(rates)))} "
            f"(lr={o.lr}, ssm_lr={o.ssm_lr}, {o.warmup_steps} warmup steps, grad_clip={o.grad_clip}): "
            f"lower lr / ssm_lr or lengthen the warmup")


def _plural(n: int, singular: str, plural: Optional[str] = None) -> str:
    """``n`` and the noun that agrees with it: 1 epoch, 2 epochs."""
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def schedule_note(optim: OptimSpec, plan: StepPlan, steps: int) -> str:
    """How long the run was and how its learning rate moved (see :func:`warmup_cosine`), saying so
    when max_steps cut it short and when the warmup outlasted the run (no cosine decay at all)."""
    warmup = optim.warmup_steps
    if warmup >= plan.total:            # every step was a warmup step: the rate only ever rose
        peak = plan.total / (warmup + 1)   # the factor of the last step, (total - 1 + 1) / (warmup + 1)
        lr = (f"{_plural(warmup, 'warmup step')} that outlast the run's {_plural(plan.total, 'optimiser step')}: "
              f"the rate rose linearly to {peak:.1%} of lr and never decayed (no cosine phase)")
    else:
        lead = "cosine decay (no warmup)" if warmup == 0 else f"{_plural(warmup, 'warmup step')} then cosine decay"
        lr = f"{lead} to zero at step {plan.total}" if plan.cut_short else lead
    epochs = _plural(optim.epochs, "epoch")
    if plan.cut_short:
        return (f"{lr}, cut short by max_steps: {steps} of the {plan.full} "
                f"optimiser steps that {epochs} ({plan.steps_per_epoch} per epoch) would take")
    return f"{lr}, {epochs} ({_plural(steps, 'optimiser step')})"


def training_notes(recipe: Recipe, plan: StepPlan, steps: int, seconds: float, world_size: int,
                   device_name: str) -> str:
    """The model card's notes: the recipe, its optimiser and schedule, and where it ran."""
    o = recipe.optim
    notes = (f"Recipe {recipe.name!r}: {recipe.description}. AdamW lr={o.lr} (state-space parameters "
             f"{o.ssm_lr if o.ssm_lr is not None else o.lr}, no decay), weight decay {o.weight_decay}, "
             f"{schedule_note(o, plan, steps)}, global batch {o.batch_size}, "
             f"grad clip {o.grad_clip}, seed {recipe.seed}; {seconds:.0f} s of training on "
             f"{_plural(world_size, 'process', 'processes')}, torch {torch.__version__}, {device_name}.")
    if recipe.task == "time-series-forecasting":
        notes += (" Forecast metrics are over the test targets in normalised units z (multiply an MSE by "
                  "std^2 for the series' own units); naive_* is the last-value forecast on the same targets.")
    return notes


def _checkpoint_info(model: SequenceModel, recipe: Recipe, out_dir: Optional[str],
                     meta: Dict[str, Any]) -> Dict[str, Any]:
    """What ``from_pretrained`` attaches to a loaded model (config.json's dict plus "source"), for a
    freshly trained one: ``save_pretrained`` / ``push_to_hub`` / export read their card from it."""
    from .hub import STATE_DIGEST_KEY, state_digest, weights_digest
    from .hub_save import checkpoint_config
    source: Dict[str, Any] = {"type": "trained", "recipe": recipe.name}
    saved: Dict[str, Any] = {}
    if out_dir is not None:   # where rank 0 saved it: what from_pretrained(out_dir) would record
        source = {"type": "local", "path": str(Path(out_dir).expanduser().resolve())}
        saved = {STATE_DIGEST_KEY: state_digest(model.state_dict())}   # what the file holds: hashed, not copied
    return {**checkpoint_config(model, **meta), **saved, "source": source, "weights_digest": weights_digest(model)}


def _device_name(model: nn.Module) -> str:
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    n = torch.get_num_threads()
    return f"CPU ({n} thread{'s' if n > 1 else ''})"

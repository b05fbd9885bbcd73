"""Training-state snapshots: what ``train(..., checkpoint_every=...)`` writes and ``resume=`` reads.

A snapshot is everything a run needs to go on exactly where it stopped: the model weights, the
AdamW state, the LR schedule, the random generators (torch's global CPU one of every rank, CUDA's
when training on a GPU, the augmentation generator) and the step counter; the per-epoch shuffle is
a function of (seed, epoch), so the step says where in which epoch the run was.  Resumed, a run
gives the weights and metrics of the run that was never interrupted, bit for bit.

Layout, beside the checkpoint in the run's ``out_dir`` (``from_pretrained``, ``evaluate`` and
``export`` read only config.json / model.safetensors / README.md, and ``push_to_hub`` uploads only
those)::

    out_dir/training_state/step-00000120/state.safetensors   named tensors (no pickle)
                                        /state.json          counters, optimiser groups, schedule,
                                                             the run it belongs to, the tensors' sha256

Each snapshot folder is written as a hidden sibling and renamed into place when complete
(:func:`lrnnx_zoo.folder_swap.replaced_folder`), so a kill during a save leaves the previous
snapshots as they were; the newest :data:`KEEP` are kept.

The second half is what :func:`lrnnx_zoo.training.train` does around these files: checking its
``checkpoint_every`` / ``resume`` / ``init_from`` arguments, picking the snapshot (rank 0, for every
rank), :class:`Saver` writing them, :func:`restore` putting a run back as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import __version__, wording
from .folder_swap import remove_entry, replaced_folder
from .hub_save import write_safetensors
from .models import ADAPTABLE, ModelConfig, ReinitializedWeightsWarning, SequenceModel
from .recipes import Recipe
from .training import (DistInfo, ResumeNotExactWarning, StepPlan, TrainingSetupError, _plural,
                       on_rank_0)

SNAPSHOT_DIR = "training_state"
TENSORS_NAME = "state.safetensors"
STATE_NAME = "state.json"
FORMAT = "lrnnx-zoo-training-state"
FORMAT_VERSION = 1
KEEP = 2  # snapshots kept: the newest, and one to fall back on should the newest be damaged
_NAME = re.compile(r"step-(\d+)")
#: state.json holds counters, the recipe and the optimiser's groups: a few kB. A larger one is not read.
MAX_RECORD_BYTES = 16 << 20
#: Recipe fields a user can set, for telling them how to make a resumed run match its snapshot: as
#: `lrnnx-zoo train` flags, or as keywords of lrnnx_zoo.recipes.override from Python
_FLAGS = {"seed": "--seed", "optim.epochs": "--epochs", "optim.batch_size": "--batch-size",
          "max_steps": "--max-steps"}
_OVERRIDE_KEYWORDS = {"seed": "seed", "optim.epochs": "epochs", "optim.batch_size": "batch_size",
                      "max_steps": "max_steps"}


class SnapshotError(TrainingSetupError):
    """A training snapshot that cannot be resumed: missing, damaged, or written by another run."""


# -- where snapshots live ----------------------------------------------------------------------
def snapshot_root(out_dir: Union[str, Path]) -> Path:
    """The folder holding a run's snapshots: ``out_dir/training_state``."""
    return Path(out_dir).expanduser() / SNAPSHOT_DIR


def list_snapshots(root: Path) -> List[Tuple[int, Path]]:
    """(step, folder) of every snapshot under ``root``, oldest first (hidden half-written ones skipped)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def snapshot_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


# -- packing a run's state into named tensors + JSON --------------------------------------------
def pack(model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, aug_gen: torch.Generator,
         cpu_states: List[Tensor], cuda_states: Optional[List[Tensor]]) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """(tensors, JSON record) of a run's state.  Optimiser state dicts nest {param index: {name: value}};
    they are flattened to tensors ``optimizer.state.{index}.{name}`` and JSON for non-tensor values.
    ``cpu_states`` / ``cuda_states``: torch's global generator states, one per rank (uint8 tensors)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    plain: Dict[str, Dict[str, Any]] = {}
    for index, values in opt["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.state.{index}.{name}"] = value
            else:
                plain.setdefault(str(index), {})[name] = value
    tensors["rng.augment"] = aug_gen.get_state()
    for rank, state in enumerate(cpu_states):
        tensors[f"rng.cpu.{rank}"] = state
    for rank, state in enumerate(cuda_states or []):
        tensors[f"rng.cuda.{rank}"] = state
    # safetensors refuses tensors sharing storage; the file must not alias live parameters either
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    record = {"optimizer": {"param_groups": opt["param_groups"], "state": plain},
              "schedule": schedule.state_dict(), "world_size": len(cpu_states)}
    return tensors, record


def model_state(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def optimizer_state(tensors: Dict[str, Tensor], record: Dict[str, Any]) -> Dict[str, Any]:
    """The optimiser state dict :func:`pack` flattened, rebuilt for ``optimizer.load_state_dict``."""
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer.state."):
            index, name = key[len("optimizer.state."):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, values in record["optimizer"]["state"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": record["optimizer"]["param_groups"]}


def rng_state(tensors: Dict[str, Tensor], kind: str, rank: int) -> Optional[Tensor]:
    """The saved global generator state of ``kind`` ("cpu" or "cuda") for ``rank``, if saved."""
    return tensors.get(f"rng.{kind}.{rank}")


# -- writing ------------------------------------------------------------------------------------
def write_snapshot(root: Path, step: int, tensors: Dict[str, Tensor], record: Dict[str, Any]) -> Path:
    """Write snapshot ``step`` under ``root`` atomically, then drop all but the newest :data:`KEEP`."""
    folder = snapshot_folder(root, step)
    if folder.is_symlink():
        # the entry is replaced, not the folder a link there points to: replaced_folder writes through a
        # link, and a planted step-N link to ~/Documents had that folder replaced by the snapshot
        folder.unlink()
    with replaced_folder(folder, keep=lambda entry: False) as tmp:
        write_safetensors(tensors, tmp / TENSORS_NAME, {"format": FORMAT})
        record = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
                  "torch_version": torch.__version__, "step": step, **record,
                  "sha256": _sha256(tmp / TENSORS_NAME)}
        (tmp / STATE_NAME).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n", encoding="utf-8",
                                      newline="\n")
    prune(root, KEEP)
    return folder


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` snapshots, and half-written hidden folders a kill left.
    A snapshot is renamed to a hidden name before it is removed, so a kill halfway through never
    leaves a partial folder under a snapshot's name."""
    for _, folder in list_snapshots(root)[:-keep]:
        doomed = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        folder.rename(doomed)
        remove_entry(doomed)                 # a link is unlinked (rmtree refused it, and it stayed), never followed
    for leftover in root.glob(".step-*"):
        remove_entry(leftover)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- reading ------------------------------------------------------------------------------------
def read_snapshot(folder: Path, max_bytes: Optional[int] = None) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """(tensors, record) of the snapshot in ``folder``; a SnapshotError saying what is wrong with a
    damaged one (a missing or truncated file, unreadable JSON, tensors whose sha256 differs).
    Neither file is read when larger than it can be: state.json than :data:`MAX_RECORD_BYTES`, the
    tensors than ``max_bytes`` (:func:`snapshot_bound` of the run's model; None: unbounded)."""
    import safetensors.torch

    state_file, tensors_file = folder / STATE_NAME, folder / TENSORS_NAME
    if not folder.is_dir():
        raise SnapshotError(f"there is no snapshot at {folder}: expected a folder step-NNNNNNNN holding "
                            f"{STATE_NAME} and {TENSORS_NAME}")
    for path in (state_file, tensors_file):
        if not path.is_file():
            raise SnapshotError(f"the snapshot {folder} is damaged: {path.name} is missing")
    # both were read whole: a 3 GB (sparse) state.json exhausted the memory before any check
    for path, limit, usual in ((state_file, MAX_RECORD_BYTES, "lrnnx-zoo writes a few kB"),
                               (tensors_file, max_bytes, "this run's model's weights and AdamW state")):
        size = path.stat().st_size
        if limit is not None and size > limit:
            raise SnapshotError(f"the snapshot {folder} is damaged: {path.name} is {size / 1e6:.1f} MB, expected at "
                                f"most {limit / 1e6:.1f} MB ({usual}); it is not read")
    try:
        record = json.loads(state_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:     # RecursionError: nested too deeply
        raise SnapshotError(f"the snapshot {folder} is damaged: {STATE_NAME} is not readable JSON "
                            f"({exc or type(exc).__name__})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SnapshotError(f"{folder} is not an lrnnx-zoo training snapshot: its {STATE_NAME} has no "
                            f"\"format\": {FORMAT!r}")
    if record.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"the snapshot {folder} has format version {record.get('format_version')!r}; this "
                            f"lrnnx-zoo {__version__} reads version {FORMAT_VERSION}: resume it with the lrnnx-zoo "
                            f"{record.get('library_version')} that wrote it")
    data = tensors_file.read_bytes()        # hashed and parsed from one read
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.get("sha256"):
        raise SnapshotError(f"the snapshot {folder} is damaged: {TENSORS_NAME} has sha256 {digest[:16]}..., "
                            f"{STATE_NAME} records {str(record.get('sha256'))[:16]}... (truncated or changed "
                            "after it was written)")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:        # safetensors raises its own error types for a bad header
        raise SnapshotError(f"the snapshot {folder} is damaged: {TENSORS_NAME} cannot be read ({exc})") from None
    return tensors, record


def locate(resume: Union[bool, str, Path], out_dir: Optional[Union[str, Path]]) -> Path:
    """The snapshot folder ``resume`` names: True is the newest in ``out_dir``; a path is a snapshot
    folder, a ``training_state`` folder or a run's ``out_dir`` (their newest)."""
    if resume is True:
        given, root = wording.name("out_dir"), snapshot_root(out_dir)          # type: ignore[arg-type]
    else:
        path = Path(resume).expanduser()                           # type: ignore[arg-type]
        if (path / STATE_NAME).is_file() or _NAME.fullmatch(path.name):
            return path
        given = wording.given("resume", str(resume))
        root = path / SNAPSHOT_DIR if (path / SNAPSHOT_DIR).is_dir() else path
    found = list_snapshots(root)
    if not found:
        raise SnapshotError(f"no training snapshot to resume from in {root} ({given}): expected folders "
                            f"step-NNNNNNNN written by a run with {wording.name('checkpoint_every')}; start the run "
                            f"without {wording.name('resume')}, or pass the folder that holds them")
    return found[-1][1]


def snapshot_bound(recipe: Recipe, world_size: int = 1) -> int:
    """The most bytes a snapshot's tensors of ``recipe``'s model may take, known before it is built: the
    weights and AdamW's two moments are 24 bytes per parameter in float64; 64 per parameter of
    :meth:`ModelConfig.parameter_estimate` leaves room for buffers and layers it undercounts (the
    shipped recipes' float32 snapshots are 1/5 of it), plus 64 MiB per process for the generators."""
    return 64 * ModelConfig(**recipe.model).parameter_estimate() + (64 << 20) * max(world_size, 1)


def load(folder: Path, max_bytes: Optional[int] = None) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """:func:`read_snapshot`, and for a damaged snapshot an error that names the newest older one
    that is intact, if there is one, and how to resume from it."""
    try:
        return read_snapshot(folder, max_bytes)
    except SnapshotError as exc:
        older = [p for step, p in reversed(list_snapshots(folder.parent)) if p.name < folder.name]
        for candidate in older:
            try:
                read_snapshot(candidate, max_bytes)
            except SnapshotError:
                continue
            raise SnapshotError(f"{exc}. The older snapshot {candidate} is intact: resume from it with "
                                f"{wording.given('resume', str(candidate))}") from None
        raise SnapshotError(f"{exc}; no older intact snapshot is left beside it: start the run again "
                            f"without {wording.name('resume')}") from None


# -- which run a snapshot belongs to -------------------------------------------------------------
def run_record(recipe: Recipe, steps_per_epoch: int, total: int) -> Dict[str, Any]:
    """What a snapshot must share with the run resuming it: the recipe (its description aside) with
    its seed, and the step plan (which the data's size decides too).  JSON-normalised, so a recipe
    compares equal to its own record read back."""
    fields = dataclasses.asdict(recipe)
    fields.pop("description")
    return json.loads(json.dumps({"recipe": fields, "steps_per_epoch": steps_per_epoch, "total_steps": total},
                                 default=repr))


def check_same_run(folder: Path, recorded: Dict[str, Any], current: Dict[str, Any]) -> None:
    """Refuse a snapshot from another recipe, seed or configuration, naming each difference (the
    recipe's fields; the step plan only when the recipes agree, as it follows from them)."""
    differ = _differences(recorded.get("recipe", {}), current["recipe"])
    if not differ:
        differ = _differences({k: v for k, v in recorded.items() if k != "recipe"},
                              {k: v for k, v in current.items() if k != "recipe"})
    if not differ:
        return
    shown = "; ".join(f"{k} is {was!r} there, {now!r} in this run" for k, was, now in differ)
    fix = _matching_settings(differ) or "resume with the same recipe and settings "
    raise SnapshotError(f"the snapshot {folder} belongs to another run: {shown}. A resumed run must be the run "
                        f"that was interrupted: {fix}to continue it, or train into another {wording.name('out_dir')} "
                        "to start anew")


def check_same_dtype(folder: Path, tensors: Dict[str, Tensor]) -> None:
    """Refuse a snapshot whose weights are of another float dtype than the model this run builds (the
    default dtype's): loading cast them, and the optimiser's moments, without a word (a float64 run
    resumed in a float32 session went on in float32 and saved a float32 checkpoint)."""
    kinds = {v.dtype for v in model_state(tensors).values() if v.is_floating_point()}
    now = torch.get_default_dtype()
    if not kinds or kinds == {now}:
        return
    was = ", ".join(sorted(str(k).replace("torch.", "") for k in kinds))
    raise SnapshotError(f"the snapshot {folder} holds {was} weights, but this run builds "
                        f"{str(now).replace('torch.', '')} ones (torch.get_default_dtype()): resuming would cast the "
                        f"weights and optimiser state and go on in another precision. Continue it under "
                        f"torch.set_default_dtype(torch.{was.split(', ')[0]}), as it started, or train into another "
                        f"{wording.name('out_dir')} to start anew")


def _matching_settings(differ: List[Tuple[str, Any, Any]]) -> Optional[str]:
    """How to make this run match the snapshot's recorded values, when settings a user can pass
    cover every difference: the train command's flags (``pass --seed 0 ``), or from Python the
    recipe copy that has them (``use lrnnx_zoo.recipes.override(recipe, seed=0) ``); else None."""
    if not all(k in _FLAGS and was is not None for k, was, _ in differ):
        return None
    if wording.in_command_line():
        return f"pass {' '.join(f'{_FLAGS[k]} {was}' for k, was, _ in differ)} "
    keywords = ", ".join(f"{_OVERRIDE_KEYWORDS[k]}={was!r}" for k, was, _ in differ)
    return f"train lrnnx_zoo.recipes.override(recipe, {keywords}) "


def _differences(recorded: Dict[str, Any], current: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(dotted key, recorded value, current value) for each leaf that differs; "(absent)" for a missing one."""
    was, now = flatten(recorded), flatten(current)
    return [(k, was.get(k, "(absent)"), now.get(k, "(absent)")) for k in sorted(set(was) | set(now))
            if was.get(k, "(absent)") != now.get(k, "(absent)")]


def flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a.b": leaf} for nested dicts {"a": {"b": leaf}} (an empty dict is a leaf)."""
    if isinstance(value, dict):
        out: Dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


# -- the run around the files: where it starts, when it writes, fine-tuning --------------------------
def check_checkpoint_every(value: Any, out_dir: Any) -> Union[int, str, None]:
    """``checkpoint_every`` if usable: None, a positive int (optimiser steps) or "epoch"; it needs an
    ``out_dir`` to write the snapshots into."""
    if value is None:
        return None
    if value != "epoch":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"checkpoint_every must be None, a positive int (optimiser steps) or 'epoch', "
                            f"got {value!r} ({type(value).__name__})")
        if value < 1:
            raise ValueError(f"checkpoint_every must be a positive number of optimiser steps or 'epoch', got {value}")
    if out_dir is None:
        raise TrainingSetupError("checkpoint_every writes training snapshots into out_dir/training_state, but "
                                 "no out_dir was given; pass out_dir (--out)")
    return value


def check_resume(resume: Any, out_dir: Any) -> None:
    """A usable ``resume``; and a fresh run must not write into a folder holding another run's snapshots
    (a later resume would continue that run, and the checkpoint would sit beside snapshots it is not of)."""
    if resume is False or resume is None:
        held = list_snapshots(snapshot_root(out_dir)) if out_dir is not None else []
        if held:
            root = snapshot_root(out_dir)
            raise TrainingSetupError(f"{wording.name('out_dir')} {out_dir} holds training snapshots of an earlier "
                                     f"run (the newest at step {held[-1][0]}, in {root}): pass "
                                     f"{wording.given('resume', True)} to continue that run, or remove {root} to "
                                     "start anew")
        return
    if resume is True:
        if out_dir is None:
            raise TrainingSetupError("resume=True continues from the newest snapshot in out_dir, but no out_dir "
                                     "was given; pass out_dir (--out), or resume=PATH of a snapshot")
        return
    if isinstance(resume, bytes) or not isinstance(resume, (str, os.PathLike)):
        raise TypeError(f"resume must be a bool or the path of a snapshot (or of the folder holding them), "
                        f"got {resume!r} ({type(resume).__name__})")
    if not os.fspath(resume).strip():    # `--resume ""` (an unset variable) trained from scratch
        raise TrainingSetupError(f"{wording.name('resume')} got an empty path; pass a snapshot (or the folder "
                                 f"holding them), or {wording.given('resume', True)} for the newest in "
                                 f"{wording.name('out_dir')}")
    if out_dir is not None:
        # another run's snapshot resumed into a folder holding snapshots: the new run wrote its own over
        # them and pruned beside them, mixing two runs (a later resume=True picked the other run's step)
        root = Path(snapshot_root(out_dir)).resolve()
        held = list_snapshots(snapshot_root(out_dir))
        source = Path(resume).expanduser().resolve()
        if held and not (source == root or root in source.parents or source == root.parent):
            raise TrainingSetupError(f"{wording.name('out_dir')} {out_dir} holds training snapshots of a run (the "
                                     f"newest at step {held[-1][0]}, in {root}), and resuming {resume} there would "
                                     f"write this run's snapshots among them: pass another "
                                     f"{wording.name('out_dir')}, or {wording.given('resume', True)} to continue "
                                     f"the run it holds")


def initial_weights(init_from: Any, recipe: Recipe) -> Optional[Tuple[Dict[str, Tensor], Dict[str, Any]]]:
    """(state dict, record of where it came from) of ``init_from``'s checkpoint, after checking its
    backbone is the recipe model's; None without init_from. Dropout and pooling are the recipe's to
    choose; where the recipe's d_input or d_output differs (another task), the encoder / decoder
    tensors are left out of the state dict (the run keeps the recipe's seeded initialisation for
    them), the record's "reinitialized" names them and a ReinitializedWeightsWarning says so."""
    if init_from is None:
        return None
    if isinstance(init_from, bytes) or not isinstance(init_from, (str, os.PathLike)):
        raise TypeError(f"init_from must be a checkpoint folder, shipped name or Hub repo id (str or os.PathLike), "
                        f"got {init_from!r} ({type(init_from).__name__})")
    from .hub import CheckpointError, _outside_package, from_pretrained, loadable_source
    try:
        with torch.random.fork_rng(devices=[]):          # building the model draws; the caller's stream stays
            source = from_pretrained(init_from)
    except CheckpointError as exc:
        raise TrainingSetupError(f"{wording.given('init_from', os.fspath(init_from))}: {exc}") from exc
    check_same_model(os.fspath(init_from), source.config, recipe)
    info = source.checkpoint_info
    where = info["source"]
    record = {"source": loadable_source(where) or os.fspath(init_from), "commit": where.get("commit"),
              "weights_digest": info["weights_digest"]}
    state = source.state_dict()
    # the head the recipe's task needs, where it has another size than the checkpoint's
    want = ModelConfig(**recipe.model).backbone_shapes()
    fresh = sorted(k for k, shape in want.items() if tuple(state[k].shape) != shape)
    if fresh:
        record["reinitialized"] = fresh
        sizes = ", ".join(f"{k} {getattr(source.config, k)} -> {recipe.model[k]}" for k in ("d_input", "d_output")
                          if getattr(source.config, k) != recipe.model[k])
        warnings.warn(f"{wording.given('init_from', os.fspath(init_from))}: {', '.join(fresh)} are not loaded but "
                      f"initialised from the recipe's seed ({sizes}, recipe {recipe.name!r}); the backbone's weights "
                      f"are loaded", ReinitializedWeightsWarning, stacklevel=_outside_package())
    return {k: v for k, v in state.items() if k not in fresh}, record


def check_same_model(given: str, config: ModelConfig, recipe: Recipe) -> None:
    """Refuse initial weights of another model than the recipe's, naming each field that differs."""

    def architecture(c: ModelConfig) -> Dict[str, Any]:
        fields = c.to_dict()
        for name in ADAPTABLE:      # the head's sizes, pooling and dropout: the recipe's task decides them
            fields.pop(name)
        fields["layer"] = fields["layer"].rpartition(":")[2]      # "plugin:family" names the family too
        return flatten(fields)
    want, got = architecture(ModelConfig(**recipe.model)), architecture(config)
    differ = [k for k in sorted(set(want) | set(got)) if want.get(k, "(absent)") != got.get(k, "(absent)")]
    if differ:
        shown = "; ".join(f"{k} is {got.get(k, '(absent)')!r} there, {want.get(k, '(absent)')!r} in the recipe"
                          for k in differ)
        raise TrainingSetupError(f"{wording.given('init_from', given)} holds another model than recipe "
                                 f"{recipe.name!r} trains: "
                                 f"{shown}. Expected a checkpoint of the recipe's backbone (its {', '.join(ADAPTABLE)} "
                                 "may differ: a head of another size starts afresh): start from a checkpoint of "
                                 "that backbone, or use a recipe with that model")


@dataclass
class RunStart:
    """Where a run starts: random weights, ``init_from``'s weights, or a snapshot (and its tensors)."""

    run: Dict[str, Any]                              # what a snapshot of this run records (training_state.run_record)
    weights: Optional[Dict[str, Tensor]] = None      # init_from's state dict, for a fresh run
    init_record: Optional[Dict[str, Any]] = None     # init_from's source and weights digest
    snapshot: Optional[Path] = None
    tensors: Dict[str, Tensor] = dataclasses.field(default_factory=dict)
    record: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.record.get("step", 0))

    @property
    def resumed_at(self) -> List[int]:
        """The steps this run was resumed at, this time included."""
        return list(self.record.get("resumed_at") or []) + ([self.step] if self.snapshot is not None else [])

    def notes(self, total: Optional[int] = None) -> str:
        """What the card's notes add: the initial weights, the steps the run was resumed at (``total``: the
        run's last step; a resume from it trained nothing, and was no interruption)."""
        text = ""
        if self.init_record:
            init = self.init_record
            at = f" at commit {init['commit']}" if init.get("commit") else ""
            text += (f" Fine-tuned: started from the weights of {init['source']}{at} (weights digest "
                     f"{init['weights_digest'][:16]}), not from random ones.")
            if init.get("reinitialized"):       # a head of another size than the checkpoint's
                text += (f" Its {', '.join(init['reinitialized'])} did not fit this model and started from the "
                         f"seed's initialisation instead.")
        interrupted = [s for s in self.resumed_at if total is None or s < total]
        if interrupted:
            steps = ", ".join(map(str, interrupted))
            text += f" Interrupted and resumed from its training snapshot{'s' if len(interrupted) > 1 else ''} " \
                    f"at step {steps}."
        if total is not None and total in self.resumed_at:
            text += f" Reloaded from its training snapshot of the last step ({total}): no step was trained again."
        return text


def starting_point(recipe: Recipe, plan: StepPlan, out_dir: Optional[str], resume: Any,
                   init: Optional[Tuple[Dict[str, Tensor], Dict[str, Any]]], di: DistInfo) -> RunStart:
    """The run's start; with ``resume`` the snapshot rank 0 picks and checks, read by every rank."""
    run = run_record(recipe, plan.steps_per_epoch, plan.total)
    weights, init_record = init if init is not None else (None, None)
    if not resume:
        return RunStart(run, weights, init_record)

    def pick() -> Tuple[Path, Dict[str, Tensor], Dict[str, Any]]:
        folder = locate(resume, out_dir)
        tensors, record = load(folder, snapshot_bound(recipe, di.world_size))
        check_same_run(folder, record.get("run", {}), run)
        check_same_dtype(folder, tensors)
        return folder, tensors, record
    folder, tensors, record = picked_on_rank_0(pick, di)
    init_record = same_init(folder, record.get("init_from"), init_record)
    warn_if_not_exact(folder, record, di)
    return RunStart(run, None, init_record, folder, tensors, record)


def picked_on_rank_0(pick: Callable[[], Tuple[Path, Dict[str, Tensor], Dict[str, Any]]],
                     di: DistInfo) -> Tuple[Path, Dict[str, Tensor], Dict[str, Any]]:
    """Rank 0 picks the snapshot; the others read the one it names (and check it is the same file:
    every process must see the same out_dir) or raise its error."""
    if di.world_size == 1:
        return pick()
    picked, failure = None, None
    if di.is_main:
        try:
            picked = pick()
        except Exception as exc:          # told to the other ranks, then raised here as it was
            failure = exc
    told = [None if picked is None else (str(picked[0]), picked[2]["sha256"]),
            None if failure is None else (isinstance(failure, TrainingSetupError), str(failure))]
    torch.distributed.broadcast_object_list(told, src=0)
    if failure is not None:
        raise failure
    if told[1] is not None:
        setup_error, message = told[1]
        raise SnapshotError(message) if setup_error else OSError(f"rank 0 could not read the snapshot ({message})")
    if picked is not None:
        return picked
    folder, digest = Path(told[0][0]), told[0][1]
    tensors, record = read_snapshot(folder)
    if record["sha256"] != digest:
        raise SnapshotError(f"rank {di.rank} reads another snapshot at {folder} than rank 0 (sha256 "
                            f"{record['sha256'][:16]}..., not {digest[:16]}...): every process must see the "
                            "same out_dir, e.g. on a shared file system")
    return folder, tensors, record


def same_init(folder: Path, recorded: Optional[Dict[str, Any]],
              given: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The initial weights' record of a resumed run: the snapshot's; an ``init_from`` given to the resumed
    run must name the same weights (by digest: a path may be spelt another way)."""
    if given is None:
        return recorded                  # the run goes on as it started, and its card says so
    if recorded is None:
        raise SnapshotError(f"the snapshot {folder} belongs to a run that started from random weights, but "
                            f"{wording.given('init_from', given['source'])} was given: drop "
                            f"{wording.name('init_from')} to continue it")
    if recorded.get("weights_digest") != given["weights_digest"]:
        raise SnapshotError(f"the snapshot {folder} belongs to a run that started from {recorded.get('source')!r} "
                            f"(weights digest {str(recorded.get('weights_digest'))[:16]}), but "
                            f"{wording.given('init_from', given['source'])} holds other weights "
                            f"({given['weights_digest'][:16]}): drop {wording.name('init_from')} to continue the "
                            "run as it started")
    return recorded


def warn_if_not_exact(folder: Path, record: Dict[str, Any], di: DistInfo) -> None:
    """Warn (rank 0) when a snapshot is resumed on another setup than it was written on: another number
    of processes, device or torch, or on the CPU another number of torch threads (it decides the order
    of float sums: digits-tiny on 1 and 2 threads ends on other weights).  A snapshot that records no
    thread count (written before it was recorded) is not checked for it."""
    if not di.is_main:
        return
    was = {"processes": record.get("world_size"), "device": record.get("device"),
           "threads": record.get("threads"), "torch": record.get("torch_version")}
    now = {"processes": di.world_size, "device": di.device.type,
           "threads": torch.get_num_threads() if di.device.type == "cpu" else None, "torch": torch.__version__}
    differ = [k for k in was if was[k] != now[k] and (k in ("processes", "device") or None not in (was[k], now[k]))]
    if differ:
        warnings.warn(f"the snapshot {folder} was written by {_setup(was, differ)}, this run has {_setup(now, differ)}: "
                      "it goes on, but matches the uninterrupted run only to float rounding (and dropout masks "
                      "differ); resume as the run started for the same weights bit for bit",
                      ResumeNotExactWarning, stacklevel=4)   # train()'s caller


def _setup(setup: Dict[str, Any], differ: List[str]) -> str:
    """The setup as a warning names it, e.g. "2 processes on cpu", with the thread count and the torch
    version where ``differ`` names them."""
    text = f"{_plural(setup['processes'] or 0, 'process', 'processes')} on {setup['device']}"
    if "threads" in differ:
        text += f" with {_plural(setup['threads'], 'thread')} each"
    return text + (f", torch {setup['torch']}" if "torch" in differ else "")


@dataclass
class Saver:
    """Writes the snapshots of one run: every ``every`` optimiser steps, or at each epoch's end."""

    every: Union[int, str]
    out_dir: str
    run: Dict[str, Any]
    init_record: Optional[Dict[str, Any]]
    di: DistInfo

    def due(self, step: int, plan: StepPlan) -> bool:
        return step % (plan.steps_per_epoch if self.every == "epoch" else int(self.every)) == 0

    def write(self, step: int, plan: StepPlan, model: SequenceModel, optimizer: torch.optim.Optimizer,
              schedule: Any, aug_gen: torch.Generator, seconds: float, resumed_at: List[int]) -> None:
        """Rank 0 writes snapshot ``step``, with every rank's global generator states."""
        di = self.di
        cpu = gathered(torch.get_rng_state(), di)
        cuda = gathered(torch.cuda.get_rng_state(di.device), di) if di.device.type == "cuda" else None

        def write() -> None:
            tensors, record = pack(model, optimizer, schedule, aug_gen, cpu, cuda)
            record.update(epoch=step // plan.steps_per_epoch, batch_in_epoch=step % plan.steps_per_epoch,
                          total_steps=plan.total, run=self.run, init_from=self.init_record,
                          device=di.device.type, threads=torch.get_num_threads(), seconds=seconds,
                          resumed_at=resumed_at,
                          checkpoint_every=self.every)
            write_snapshot(snapshot_root(self.out_dir), step, tensors, record)
        on_rank_0(write, di, "write the training snapshot")


def gathered(state: Tensor, di: DistInfo) -> List[Tensor]:
    """Every rank's ``state`` (on each rank; rank 0 writes them), in rank order."""
    if di.world_size == 1:
        return [state]
    states: List[Any] = [None] * di.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def restore(start: RunStart, optimizer: torch.optim.Optimizer, schedule: Any, aug_gen: torch.Generator,
            di: DistInfo, seed: int) -> None:
    """Put the optimiser, schedule and generators back as the snapshot has them (the weights are loaded
    before DistributedDataParallel copies rank 0's to the others).  A rank the snapshot has no generator
    state for (more processes than wrote it) draws from a seed of its rank and the step."""
    optimizer.load_state_dict(optimizer_state(start.tensors, start.record))
    schedule.load_state_dict(start.record["schedule"])
    aug_gen.set_state(start.tensors["rng.augment"])
    cpu = rng_state(start.tensors, "cpu", di.rank)
    if cpu is not None:
        torch.set_rng_state(cpu)
    else:
        torch.manual_seed(seed + 1_000_003 * di.rank + start.step)
    cuda = rng_state(start.tensors, "cuda", di.rank) if di.device.type == "cuda" else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, di.device)

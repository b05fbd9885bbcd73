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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import __version__
from .folder_swap import replaced_folder
from .hub_save import write_safetensors
from .recipes import Recipe
from .training import TrainingSetupError

SNAPSHOT_DIR = "training_state"
TENSORS_NAME = "state.safetensors"
STATE_NAME = "state.json"
FORMAT = "lrnnx-zoo-training-state"
FORMAT_VERSION = 1
KEEP = 2  # snapshots kept: the newest, and one to fall back on should the newest be damaged
_NAME = re.compile(r"step-(\d+)")
#: CLI flags that set a recipe field, for telling a user how to make a resumed run match its snapshot
_FLAGS = {"seed": "--seed", "optim.epochs": "--epochs", "optim.batch_size": "--batch-size",
          "max_steps": "--max-steps"}


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
    with replaced_folder(folder, keep=lambda entry: False) as tmp:
        write_safetensors(tensors, tmp / TENSORS_NAME, {"format": FORMAT})
        record = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
                  "torch_version": torch.__version__, "step": step, **record,
                  "sha256": _sha256(tmp / TENSORS_NAME)}
        (tmp / STATE_NAME).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    prune(root, KEEP)
    return folder


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` snapshots, and half-written hidden folders a kill left.
    A snapshot is renamed to a hidden name before it is removed, so a kill halfway through never
    leaves a partial folder under a snapshot's name."""
    for _, folder in list_snapshots(root)[:-keep]:
        doomed = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for leftover in root.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- reading ------------------------------------------------------------------------------------
def read_snapshot(folder: Path) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """(tensors, record) of the snapshot in ``folder``; a SnapshotError saying what is wrong with a
    damaged one (a missing or truncated file, unreadable JSON, tensors whose sha256 differs)."""
    import safetensors.torch

    state_file, tensors_file = folder / STATE_NAME, folder / TENSORS_NAME
    if not folder.is_dir():
        raise SnapshotError(f"there is no snapshot at {folder}: expected a folder step-NNNNNNNN holding "
                            f"{STATE_NAME} and {TENSORS_NAME}")
    for path in (state_file, tensors_file):
        if not path.is_file():
            raise SnapshotError(f"the snapshot {folder} is damaged: {path.name} is missing")
    try:
        record = json.loads(state_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"the snapshot {folder} is damaged: {STATE_NAME} is not readable JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SnapshotError(f"{folder} is not an lrnnx-zoo training snapshot: its {STATE_NAME} has no "
                            f"\"format\": {FORMAT!r}")
    if record.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"the snapshot {folder} has format version {record.get('format_version')!r}; this "
                            f"lrnnx-zoo {__version__} reads version {FORMAT_VERSION}: resume it with the lrnnx-zoo "
                            f"{record.get('library_version')} that wrote it")
    digest = _sha256(tensors_file)
    if digest != record.get("sha256"):
        raise SnapshotError(f"the snapshot {folder} is damaged: {TENSORS_NAME} has sha256 {digest[:16]}..., "
                            f"{STATE_NAME} records {str(record.get('sha256'))[:16]}... (truncated or changed "
                            "after it was written)")
    try:
        tensors = safetensors.torch.load_file(str(tensors_file))
    except Exception as exc:        # safetensors raises its own error types for a bad header
        raise SnapshotError(f"the snapshot {folder} is damaged: {TENSORS_NAME} cannot be read ({exc})") from None
    return tensors, record


def locate(resume: Union[bool, str, Path], out_dir: Optional[Union[str, Path]]) -> Path:
    """The snapshot folder ``resume`` names: True is the newest in ``out_dir``; a path is a snapshot
    folder, a ``training_state`` folder or a run's ``out_dir`` (their newest)."""
    if resume is True:
        given, root = "out_dir", snapshot_root(out_dir)          # type: ignore[arg-type]
    else:
        path = Path(resume).expanduser()                           # type: ignore[arg-type]
        if (path / STATE_NAME).is_file() or _NAME.fullmatch(path.name):
            return path
        given, root = f"resume={str(resume)!r}", path / SNAPSHOT_DIR if (path / SNAPSHOT_DIR).is_dir() else path
    found = list_snapshots(root)
    if not found:
        raise SnapshotError(f"no training snapshot to resume from in {root} ({given}): expected folders "
                            f"step-NNNNNNNN written by a run with checkpoint_every (--checkpoint-every); "
                            "start the run without resume (--resume), or pass the folder that holds them")
    return found[-1][1]


def load(folder: Path) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """:func:`read_snapshot`, and for a damaged snapshot an error that names the newest older one
    that is intact, if there is one, and how to resume from it."""
    try:
        return read_snapshot(folder)
    except SnapshotError as exc:
        older = [p for step, p in reversed(list_snapshots(folder.parent)) if p.name < folder.name]
        for candidate in older:
            try:
                read_snapshot(candidate)
            except SnapshotError:
                continue
            raise SnapshotError(f"{exc}. The older snapshot {candidate} is intact: resume from it with "
                                f"resume={str(candidate)!r} (--resume {candidate})") from None
        raise SnapshotError(f"{exc}; no older intact snapshot is left beside it: start the run again "
                            "without resume") from None


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
    flags = [f"{_FLAGS[k]} {was}" for k, was, _ in differ if k in _FLAGS and was is not None]
    fix = f"pass {' '.join(flags)} " if len(flags) == len(differ) else "resume with the same recipe and settings "
    raise SnapshotError(f"the snapshot {folder} belongs to another run: {shown}. A resumed run must be the run "
                        f"that was interrupted: {fix}to continue it, or train into another out_dir to start anew")


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

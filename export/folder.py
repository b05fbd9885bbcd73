"""A deployable export folder (Hub repo layout) and its upload.

``export_folder(src, out_dir, format=...)`` writes:

- the graph: ``model.onnx`` | ``model.ts`` | ``model.pt2`` (validated before it is written);
- ``step_form.safetensors``: the step module's weights (state_dict), for auditing or porting to another
  runtime (not a torch loader's input: some layers pick their step form from their weights, so a module
  built from the config alone may hold other tensors; rebuild from the source checkpoint instead);
- ``config.json``: source checkpoint, format, state layout and sizes, opset, validation report,
  latency;
- ``README.md``: a card saying how it was made and how to run it.

``push_to_hub="namespace/name"`` then uploads those files in one commit with ``HfApi``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

import lrnnx_zoo
from lrnnx_zoo.hub import EXPORT_KIND, WEIGHTS_NAME, peek_config
from lrnnx_zoo.chunk_forms import check_chunk
from lrnnx_zoo.folder_swap import replaced_folder
from lrnnx_zoo.hub_save import (check_repo_id, check_save_target, created_repo, publishing,
                               undoing_a_new_repo, write_safetensors)
from lrnnx_zoo.ssm_kernel import check_rate
from lrnnx_zoo.utf8 import printable
from lrnnx_zoo.wording import in_command_line, name

from .card import build_card
from .latency import onnx_latency, torch_latency
from .chunk_graph import padded_length
from .graph_size import check_chunk_in_memory
from .onnx_export import check_graph_size, to_onnx
from .options import CLI_FLAGS  # noqa: F401  (how the CLI spells export_folder's arguments; here for callers)
from .options import DEFAULT_STEPS, FOLDER_VALIDATION_LENGTH, GRAPH_FILES, check_format_options
from .paths import as_path, check_output
from .provenance import Source, family_of, load_source, source_of
from .result import ExportResult
from .runtime import check_batch
from .step_graph import build_step_module, reusing_step_module
from .torchscript_export import load_torch_export, load_torchscript, to_torch_export, to_torchscript
from .validate import DEFAULT_BATCH, check_validation_memory, default_sequence

WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "step_form.safetensors", "config.json", "README.md"


@dataclasses.dataclass
class FolderExport:
    """What :func:`export_folder` wrote (and pushed).

    Attributes:
        folder: the output folder; files: the files written there.
        result: the exporter's :class:`ExportResult` (validation, quantization, graph stats).
        latency: per-step latency of the written artifact (median over ``latency_steps``).
        config: the config.json contents; commit: the Hub commit info when pushed.
    """

    folder: Path
    files: List[str]
    result: ExportResult
    latency: Optional[Dict[str, Any]]
    config: Dict[str, Any]
    commit: Any = None


def _measure(fmt: str, path: Path, result: ExportResult, steps: int, batch: Optional[int]) -> Dict[str, Any]:
    """Per-step latency at batch 1, or at the batch a graph is fixed to."""
    if fmt == "onnx":
        return onnx_latency(path, batch=batch or 1, steps=steps)
    loaded = load_torchscript(path) if fmt == "torchscript" else load_torch_export(path)
    chunk = result.metadata.get("lrnnx_zoo.chunk")
    return torch_latency(loaded, result.d_input, result.state_size, batch=batch or 1, steps=steps, runtime=fmt,
                         chunk=int(chunk) if chunk else None)


def _config(model: torch.nn.Module, info: Dict[str, Any], fmt: str, result: ExportResult, opset: Optional[int],
            batch: Optional[int], quantize: Optional[str], latency: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    b = batch or "batch"       # the graph's first dimension: fixed, or named "batch"
    chunk = result.metadata.get("lrnnx_zoo.chunk")
    t = [int(chunk)] if chunk else []          # a chunk graph's steps per call
    return {
        "library": "lrnnx-zoo", "library_version": lrnnx_zoo.__version__, "kind": EXPORT_KIND,
        # what a .ts / .pt2 needs to load (the card says it; an .onnx names its onnxruntime instead)
        **({"torch_version": torch.__version__.split("+")[0]} if fmt != "onnx" else {}),
        "format": fmt, "file": GRAPH_FILES[fmt], "weights": WEIGHTS_FILE,
        "source": source_of(info), "source_checkpoint": _without_local_path(info.get("source")),
        "family": family_of(model, info), "model": model.config.to_dict(),
        "task": info.get("task"), "dataset": info.get("dataset"), "metrics": info.get("metrics"),
        **({"resampled": info["resampled"]} if info.get("resampled") else {}),
        "inputs": {"x": [b, *t, result.d_input], "state": [b, result.state_size]},
        "outputs": {"y": [b, *t, result.d_output], "state_out": [b, result.state_size]},
        "chunk": int(chunk) if chunk else None,
        "state_size": result.state_size, "d_input": result.d_input, "d_output": result.d_output,
        "state_layout": result.state_layout, "pooling": model.config.pooling,
        "opset": opset if fmt == "onnx" else None, "batch": batch or "dynamic",
        "quantization": result.quantization if quantize else None,
        "validation": result.validation.to_dict() if result.validation is not None else None,
        "latency": latency, "graph": result.graph,
    }


def export_folder(src: Source, out_dir: Union[str, Path], format: str = "onnx", quantize: Optional[str] = None,
                  push_to_hub: Optional[str] = None, batch: Optional[int] = None, opset: Optional[int] = None,
                  validation_input: Optional[torch.Tensor] = None, latency_steps: int = DEFAULT_STEPS,
                  token: Optional[Union[str, bool]] = None, private: bool = False,
                  revision: Optional[str] = None, validation_length: int = FOLDER_VALIDATION_LENGTH,
                  rate: Optional[float] = None, chunk: Optional[int] = None) -> FolderExport:
    """Export ``src`` (model, folder, shipped name or Hub id) into ``out_dir`` and optionally push it.

    Args:
        format: "onnx", "torchscript" or "torch-export".
        quantize: "int8" (ONNX only) or None.
        push_to_hub: Hub repo id to upload the folder to (created if missing).
        batch: fixed batch size (ONNX / torch-export); None for dynamic.
        opset: ONNX opset (ONNX only; default 20, see onnx_export.DEFAULT_OPSET).
        validation_input: (B, L, d_input) sequence for validation (default: random normal, 2 (or the
            fixed batch) x ``validation_length``).
        validation_length: steps of the default validation sequence (default 4096,
            :data:`FOLDER_VALIDATION_LENGTH`); ignored when ``validation_input`` is given.
        latency_steps: steps timed at batch 1 (or the fixed batch) for config.json (0 skips the measurement).
        token, private: for the upload; revision: of a Hub source checkpoint.
        rate: export the model for inputs sampled at this rate relative to its data (2: twice the
            samples per unit time): ``model.at_rate(rate)``, recorded in config.json and the card.
        chunk: write a chunk graph of this many steps per call (:mod:`~lrnnx_zoo.export.chunk_graph`);
            the default validation sequence is lengthened to a multiple of it.
    """
    out = check_arguments(out_dir, format, quantize, opset, batch, latency_steps, push_to_hub,
                          validation_length=validation_length, rate=rate, chunk=chunk)
    replaced, target = check_destination(out, format)
    files = [GRAPH_FILES[format], WEIGHTS_FILE, CONFIG_FILE, CARD_FILE]
    model, info = load_source(src, revision=revision, token=token)
    if rate is not None:
        model, info = load_source(model.at_rate(rate))
    step = build_step_module(model)         # for the chunk check here and the weights file below
    if chunk is not None:
        # before the validation sequence, a multiple of the chunk: at chunk=1e12 it asked for 8 TB
        # ahead of the exporters' own checks (a raw RuntimeError), at 1e8 for 1 GB
        if format == "onnx":
            check_graph_size(step, chunk)            # one file's 2 GiB, then the machine's memory
        else:
            check_chunk_in_memory(step, chunk)
    if validation_input is None:
        length = padded_length(validation_length, chunk)
        # before the sequence is allocated: --batch 1000000 died in the allocator
        check_validation_memory(step, batch or DEFAULT_BATCH, length, step.state_size,
                                f"a shorter {name('validation_length')} (now {validation_length})")
        validation_input = default_sequence(model.config.d_input, length=length, batch=batch or DEFAULT_BATCH)
    # written into a hidden sibling and swapped in whole: a failed or interrupted export leaves the
    # folder as it was, and an earlier export's graph in another format does not outlive its config
    with replaced_folder(target, keep=lambda entry: entry not in files and entry != replaced) as staging, \
            reusing_step_module(model, step):          # the exporter's own build would be this one again
        graph_path = staging / GRAPH_FILES[format]
        if format == "onnx":
            result = to_onnx(model, graph_path, opset=opset, batch=batch, quantize=quantize,
                             validation_input=validation_input, chunk=chunk)
            opset = result.graph["opset"]
        elif format == "torchscript":
            result = to_torchscript(model, graph_path, validation_input=validation_input, chunk=chunk)
        else:
            result = to_torch_export(model, graph_path, batch=batch, validation_input=validation_input, chunk=chunk)
        latency = _measure(format, graph_path, result, latency_steps, batch) if latency_steps > 0 else None

        tensors = {k: v.detach().contiguous().clone() for k, v in step.state_dict().items()}
        write_safetensors(tensors, staging / WEIGHTS_FILE, dict(result.metadata))
        config = _config(model, info, format, result, opset, batch, quantize, latency)
        # "\n" on every platform, as a checkpoint's files (hub_save._write_checkpoint)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8", newline="\n")
        # (a local source's folder name that is no UTF-8 is written escaped; config.json keeps it as JSON does)
        (staging / CARD_FILE).write_text(printable(build_card(config)), encoding="utf-8", newline="\n")
    result = dataclasses.replace(result, path=str(out / GRAPH_FILES[format]))   # not the staging copy
    commit = upload_folder(out, push_to_hub, files, token=token, private=private) if push_to_hub else None
    return FolderExport(folder=out, files=files, result=result, latency=latency, config=config, commit=commit)


def check_arguments(out_dir: Any, format: str, quantize: Optional[str] = None, opset: Optional[int] = None,
                    batch: Optional[int] = None, latency_steps: int = DEFAULT_STEPS,
                    push_to_hub: Optional[str] = None,
                    validation_length: int = FOLDER_VALIDATION_LENGTH, rate: Optional[float] = None,
                    chunk: Optional[int] = None) -> Path:
    """Refuse arguments :func:`export_folder` cannot honour before any work, naming them as the
    caller wrote them: Python keywords (``format='onnx'``), or inside
    ``lrnnx_zoo.wording.command_line(CLI_FLAGS)`` the CLI's flags (``--format onnx``; it printed
    "out_dir ... is a file" for ``--out``). Returns out_dir as a Path."""
    check_format_options(format, quantize, opset, batch)
    if isinstance(latency_steps, bool) or not isinstance(latency_steps, int) or latency_steps < 0:
        raise ValueError(f"{name('latency_steps')} must be an int >= 0 (0 skips the measurement), got {latency_steps!r}")
    if isinstance(validation_length, bool) or not isinstance(validation_length, int) or validation_length < 1:
        raise ValueError(f"{name('validation_length')} must be an int >= 1 (steps streamed to validate the graph), "
                         f"got {validation_length!r}")
    if rate is not None:
        try:
            check_rate(rate, name("rate"))
        except ValueError:
            raise ValueError(f"{name('rate')} must be a finite number > 0, the inputs' sampling rate relative to the "
                             f"model's data (2: twice the samples per unit time), got {rate!r}") from None
    if chunk is not None:
        try:
            check_chunk(chunk)
        except ValueError:
            raise ValueError(f"{name('chunk')} must be a positive int (steps per call of a chunk graph), "
                             f"got {chunk!r}") from None
    if push_to_hub is not None:
        check_repo_id(push_to_hub, name("push_to_hub"))
    try:
        check_batch(batch)
    except ValueError:
        raise ValueError(f"{name('batch')} must be a positive int{'' if in_command_line() else ' or None (dynamic)'}, "
                         f"got {batch!r}") from None
    out = as_path(out_dir, name("out_dir"))   # what check_save_target writes to: check that folder, not "./~/..."
    check_output(out, name("out_dir"), folder=True)
    return out


def check_destination(out: Path, fmt: str) -> Tuple[Optional[str], Path]:
    """(the earlier export's graph file that the export replaces, the folder it writes): ``out`` must
    be new, empty of our file names, or an earlier export, and writable."""
    what = name("out_dir")
    replaced = _check_not_overwriting(out, fmt, what)
    return replaced, check_save_target(out, what, refuse_foreign=False)    # _check_not_overwriting decided


def _check_not_overwriting(out: Path, fmt: str, what: str = "out_dir") -> Optional[str]:
    """Refuse an ``out`` whose config.json / README.md / graph / weights would be overwritten but do
    not come from an earlier export: exporting into a checkpoint folder replaced its config.json and
    card, and the checkpoint no longer loaded. Re-exporting over an export folder is fine; returns
    the graph file that earlier export's config names (replaced too, whatever its format)."""
    if not out.is_dir():
        return None
    earlier = _export_config(out / CONFIG_FILE)
    if earlier is not None:
        graph = earlier.get("file")
        return graph if graph in GRAPH_FILES.values() else None
    ours = [GRAPH_FILES[fmt], WEIGHTS_FILE, CONFIG_FILE, CARD_FILE]
    clashing = [f for f in ours if (out / f).exists()]
    if not clashing:
        return None
    holds = ("an lrnnx-zoo checkpoint" if (out / WEIGHTS_NAME).is_file()
             else "files that `lrnnx-zoo export` did not write")
    raise FileExistsError(f"{what} {out} holds {holds}; exporting there would overwrite {', '.join(clashing)}. "
                          f"Export into another folder, e.g. {out / 'export'}")


def _export_config(path: Path) -> Optional[Dict[str, Any]]:
    """The config.json of an earlier export at ``path``, or None (missing, unreadable, not an export's)."""
    config = peek_config(path)
    return config if config is not None and config.get("kind") == EXPORT_KIND else None


def upload_folder(folder: Path, repo_id: str, files: List[str], token: Optional[Union[str, bool]] = None,
                  private: bool = False) -> Any:
    """Create ``repo_id`` if needed and upload ``files`` of ``folder`` in one commit, deleting the
    repo's graph files of other formats in the same commit; returns the CommitInfo."""
    from huggingface_hub import HfApi

    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot upload {folder}: missing {missing}; run export_folder first")
    api = HfApi(token=token)  # endpoint from HF_ENDPOINT
    kept = f"the export is complete in {folder}"
    # the export's files only: `hf upload REPO DIR` took everything in DIR (the user's own files beside
    # the export, a .env, files that links there point to)
    include = " ".join(f"--include {shlex.quote(f)}" for f in files)
    # a repo this call created is deleted again if the push fails or is stopped before its commit
    with undoing_a_new_repo(token), publishing(
            "upload to", repo_id, f"{kept}; push it again with huggingface_hub's upload_folder("
            f"allow_patterns={files!r}) or `hf upload {shlex.quote(repo_id)} {shlex.quote(os.fspath(folder))} . "
            f"{include}`"):
        repo_id = created_repo(api, repo_id, private)
        _check_repo_not_overwriting(api, repo_id, kept)
        # a graph of another format from an earlier push would no longer match config.json
        stale = [g for g in GRAPH_FILES.values() if g not in files]
        return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), allow_patterns=files,
                                 delete_patterns=stale,
                                 commit_message=f"Upload lrnnx-zoo {lrnnx_zoo.__version__} step graph")


def _check_repo_not_overwriting(api: Any, repo_id: str, kept: str) -> None:
    """Refuse to push into a repo whose config.json is not an earlier export's (an lrnnx-zoo checkpoint,
    another library's model): the upload replaced its config.json and README.md, and the checkpoint
    in it no longer loaded. The Hub mirror of :func:`_check_not_overwriting`."""
    from lrnnx_zoo.hub_save import HubPublishError, OversizedRepoConfig, kept_sentence, repo_config_file

    try:
        local = repo_config_file(api, repo_id)
        foreign = local is not None and _export_config(local) is None
    except OversizedRepoConfig:     # far larger than any export's config.json
        foreign = True
    if foreign:
        raise HubPublishError(f"refusing to upload to {repo_id!r}: its {CONFIG_FILE} does not come from "
                              f"`lrnnx-zoo export` (an lrnnx-zoo checkpoint, or another model), and the export's "
                              f"{CONFIG_FILE} and {CARD_FILE} would replace it. Push to another repo, e.g. "
                              f"{repo_id + '-export'!r}. {kept_sentence(kept)}")


def _without_local_path(source: Any) -> Any:
    """A checkpoint's source record without the folder path a shipped or Hub checkpoint was read from
    (the cache or the package's folder on the exporting machine: /home/<user>/..., which the config
    published the folder with); a local checkpoint keeps its path, what loads it again."""
    if isinstance(source, dict) and (source.get("name") or source.get("repo_id")) and "path" in source:
        return {k: v for k, v in source.items() if k != "path"}
    return source

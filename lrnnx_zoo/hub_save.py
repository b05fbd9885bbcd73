"""Saving checkpoints in Hub format, atomically, and pushing them to the Hub.

The loading half (resolving names, strict reads, shipped checkpoints) is :mod:`lrnnx_zoo.hub`;
this module adds what writes: ``checkpoint_config``, ``save_checkpoint`` (a temporary sibling
folder swapped in only when complete), ``upload_checkpoint`` and the :class:`HubMixin` that gives
:class:`~lrnnx_zoo.models.SequenceModel` its ``save_pretrained`` / ``push_to_hub`` /
``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import email.utils
import functools
import json
import math
import os
import re
import stat
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Literal, Optional, Union, overload

from . import __version__
from .folder_swap import replaced_folder
from .hub import (CARD_NAME, CHECKPOINT_FILES, CONFIG_NAME, EXPORT_KIND, FORMAT_VERSION, LIBRARY, WEIGHTS_NAME,
                  MAX_CONFIG_BYTES, CheckpointError, PathLike, bounded_hub_requests, from_pretrained, hub_constants,
                  hub_timeout, loadable_source, path_trouble, STATE_DIGEST_KEY, library_field, peek_config,
                  shipped_checkpoints, state_digest, this_threads_hook, transfers_in_this_thread, unexpected_answer,
                  weights_changed)
from .registry import extra_plugins, get_registry, layer_owners
from .utf8 import home_trouble, printable
from .wording import add_note

if TYPE_CHECKING:  # models.py imports this module for HubMixin
    from huggingface_hub import CommitInfo

    from .models import SequenceModel


# -- saving ------------------------------------------------------------------------------------
def json_ready(value: Any, where: str, finite: bool = False) -> Any:
    """``value`` with numpy scalars and one-element tensors/arrays turned into Python numbers, and
    non-finite floats into None (strict JSON has no NaN/Infinity), so config.json stays standard JSON;
    anything else JSON cannot hold is a TypeError naming ``where`` (e.g. ``metrics['acc']``).
    ``finite``: a non-finite float is a ValueError instead (a model config's value, which None would change)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v, f"{where}[{k!r}]", finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, f"{where}[{i}]", finite) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if finite and not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number to be saved in JSON, got {value!r}")
        return value if math.isfinite(value) else None
    if _holds_one_number(value):
        return json_ready(value.item(), where, finite)
    raise TypeError(f"{where} must be JSON data (str, number, bool, None, list, dict, or a one-element "
                    f"tensor/array), got {value!r} ({type(value).__name__})")


def _holds_one_number(value: Any) -> bool:
    """numpy scalars and arrays (a ``size`` attribute) or torch tensors (a ``numel()`` method) of one element."""
    numel = getattr(value, "numel", None)
    count = numel() if callable(numel) else getattr(value, "size", None)
    return count == 1 and callable(getattr(value, "item", None))


def write_safetensors(tensors: Dict[str, Any], path: Path, metadata: Dict[str, str]) -> None:
    """safetensors.torch.save_file, its header rewritten with sorted keys (:func:`_sort_header`), then
    the permissions the user's umask grants (as for the other files written beside it): safetensors
    writes through a private temp file, so mode 0600."""
    import safetensors.torch

    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    _sort_header(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header, in place, with its keys sorted: safetensors writes the
    metadata from a hash map, in an order that changes from process to process, so the same weights
    saved twice gave different bytes (and sha256s: every re-push uploaded the weights again). Same
    length, same entries, same data offsets; left as written if sorting would change the length."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        text = raw.rstrip(b" ")                     # the header is padded with spaces to 8-byte alignment
        ordered = json.dumps(json.loads(text), separators=(",", ":"), sort_keys=True,
                             ensure_ascii=False).encode("utf-8")
        if len(ordered) == len(text) and ordered != text:
            f.seek(8)
            f.write(ordered)


def check_command(command: Any) -> None:
    """Raise a TypeError unless ``command`` is None or a str: the card shows it as a shell line."""
    if command is not None and not isinstance(command, str):
        raise TypeError(f"command must be a str (the shell command that made the model), got {command!r} "
                        f"({type(command).__name__})")


def checkpoint_config(model: "SequenceModel", *, task: Any = None, dataset: Any = None,
                      metrics: Optional[Dict[str, Any]] = None, command: Optional[str] = None,
                      notes: Optional[str] = None, resampled: Optional[Dict[str, Any]] = None,
                      base_model: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The config.json dict for ``model`` (a SequenceModel) with the given provenance; ``resampled``
    (:func:`resampled_info`'s record) and ``base_model`` (:func:`adapted_info`'s) only when set."""
    check_command(command)
    layer = model.config.layer
    prefix, _, family = layer.rpartition(":")
    owners = layer_owners(layer)
    name = owners[0] if owners else (prefix or None)
    info = get_registry().plugins.get(name) if name else None
    extras = extra_plugins(layer, model)   # loading needs them too; the key only when used
    return {"format_version": FORMAT_VERSION, "library": LIBRARY, "library_version": __version__,
            "family": family,
            "plugin": {"name": name, "distribution": info.distribution if info else None,
                       "version": info.version if info else None},
            **({"extra_plugins": extras} if extras else {}),
            "model": model_config_json(model.config), "task": json_ready(task, "task"),
            "dataset": json_ready(dataset, "dataset"), "metrics": json_ready(metrics, "metrics"),
            "command": json_ready(command, "command"), "notes": json_ready(notes, "notes"),
            **({"resampled": json_ready(resampled, "resampled", finite=True)} if resampled else {}),
            **({"base_model": json_ready(base_model, "base_model")} if base_model else {})}


def model_config_json(config: Any) -> Dict[str, Any]:
    """``config`` (a ModelConfig) as the dict config.json holds; a value JSON cannot hold (an object,
    NaN) is a TypeError / ValueError naming its field. It was json.dumps' "Object of type Tensor is not
    JSON serializable", naming nothing, and under ``train(out_dir=...)`` only after the training."""
    return json_ready(config.to_dict(), "ModelConfig", finite=True)


def _check_loadable_size(config: Dict[str, Any], text: str) -> None:
    """Refuse a config.json larger than from_pretrained reads (:data:`~lrnnx_zoo.hub.MAX_CONFIG_BYTES`),
    naming its largest fields: a save of a 17 MB ``task`` replaced a good checkpoint with one that
    its own loader refused."""
    size = len(text.encode("utf-8"))
    if size <= MAX_CONFIG_BYTES:
        return
    fields = sorted(((len(json.dumps(v)), k) for k, v in config.items()), reverse=True)[:3]
    raise ValueError(f"this checkpoint's {CONFIG_NAME} would be {size / 1e6:.1f} MB, more than the "
                     f"{MAX_CONFIG_BYTES / 1e6:.0f} MB from_pretrained reads; its largest fields: "
                     + ", ".join(f"{k} ({n / 1e6:.1f} MB)" for n, k in fields)
                     + ". Keep the metadata (task, dataset, metrics, notes) short; nothing was written")


def _write_checkpoint(model: "SequenceModel", folder: Path, config: Dict[str, Any], name: str,
                      load_as: Optional[str] = None, revision: Optional[str] = None) -> None:
    """Write the three files into ``folder`` (a fresh temporary folder; replaced_folder flushes them)."""
    from .hub_card import build_card

    # clone: safetensors refuses tensors that share storage, and the file must not alias live params
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    # the digest of what the file holds: loading checks it (a damaged copy loaded silently)
    config = {**config, STATE_DIGEST_KEY: state_digest(tensors)}
    text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    _check_loadable_size(config, text)
    # newline="\n": text mode on Windows wrote "\r\n", so the same model saved there and elsewhere gave two
    # config.json files (a re-push uploaded it again; the card, written by huggingface_hub, kept "\n")
    (folder / CONFIG_NAME).write_text(text, encoding="utf-8", newline="\n")
    write_safetensors(tensors, folder / WEIGHTS_NAME,
                      {"format": "pt", "library": LIBRARY, "family": config["family"]})
    card = build_card(config, name, sum(p.numel() for p in model.parameters()), load_as, revision)
    # A lone surrogate ("\ud800", valid in JSON, in a loaded config's notes) is no UTF-8: written as
    # its escape, as config.json writes it, where saving failed with a bare UnicodeEncodeError
    card.content = printable(card.content)
    card.save(folder / CARD_NAME)


def check_save_target(save_directory: PathLike, what: str = "save_directory", refuse_foreign: bool = True) -> Path:
    """The folder a save into ``save_directory`` writes (a symlink's target), after checking it can be
    written: not a file, and writable if it exists, else its parent writable (an existing folder
    under a read-only parent is updated in place, see :func:`lrnnx_zoo.folder_swap.replaced_folder`); with ``refuse_foreign`` (checkpoints) also not a folder whose config.json belongs to
    something else (an export folder, another library's model: saving would replace it and its
    README.md). Saving over an lrnnx-zoo checkpoint is fine: it is replaced atomically. Raises
    CheckpointError or PermissionError naming the folder the caller gave, as the argument ``what``
    (e.g. "out_dir", "--out")."""
    if not isinstance(save_directory, (str, os.PathLike)):     # pathlib's own TypeError named no argument
        raise TypeError(f"{what} must be a folder path (str or os.PathLike), got {save_directory!r} "
                        f"({type(save_directory).__name__})")
    home = home_trouble(save_directory)
    if home:
        raise CheckpointError(f"cannot save into {what}: {home}")
    given = Path(save_directory).expanduser().absolute()
    trouble = path_trouble(given)
    if trouble:
        raise CheckpointError(f"cannot save into {what} {given}: the path cannot be looked up, {trouble}")
    target = given.resolve() if given.is_symlink() else given  # save through the link, keep the link
    shown = str(given) if target == given else f"{given} (a link to {target})"
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{what} {shown} is a file; pass a folder (it is created if missing)")
    if target.exists() and Path.cwd().resolve().is_relative_to(target.resolve()):   # also via ".." or a link
        raise CheckpointError(f"cannot save over {shown}: it holds the current working directory, and saving "
                              "swaps the folder; write to a subfolder instead")
    foreign = _foreign_config(target / CONFIG_NAME) if refuse_foreign else None
    if foreign:
        raise CheckpointError(f"{what} {shown} holds {foreign}; saving a checkpoint there would overwrite its "
                              f"{CONFIG_NAME} and {CARD_NAME}. Expected a new folder or an lrnnx-zoo checkpoint "
                              f"folder; save into another folder, e.g. {given / 'checkpoint'}")
    if refuse_foreign and not (target / CONFIG_NAME).exists():
        # no checkpoint here: a README.md or model.safetensors is the user's own, which the save replaced
        # (a project's README.md became the model card, no copy kept)
        theirs = [f for f in (CARD_NAME, WEIGHTS_NAME) if (target / f).exists()]
        if theirs:
            raise CheckpointError(f"{what} {shown} holds {' and '.join(theirs)} but no checkpoint's {CONFIG_NAME}; "
                                  f"saving a checkpoint there would replace {'them' if len(theirs) > 1 else 'it'}. "
                                  f"Save into another folder, e.g. {given / 'checkpoint'}, or move "
                                  f"{'them' if len(theirs) > 1 else 'it'} away first")
    if target.exists() and not os.access(target, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot save into {shown}: the folder is not writable by this user "
                              f"(mode {stat.filemode(target.stat().st_mode)}); make it writable or save elsewhere")
    ancestor = nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise CheckpointError(f"cannot save into {shown}: {ancestor} is a file, expected a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK) and not target.is_dir():   # an existing folder is updated in place
        where = "its parent folder" if ancestor == target.parent else "the nearest existing folder above it"
        raise PermissionError(f"cannot save into {shown}: {where} {ancestor} is not writable by this user, so "
                              "the folder cannot be created there; make it writable or save elsewhere")
    return target


def _foreign_config(path: Path) -> Optional[str]:
    """What ``path`` (a config.json) belongs to, if a save must not overwrite it: an export folder
    (the mirror of export refusing to overwrite a checkpoint) or another library's model; None for
    none, an lrnnx-zoo checkpoint's, or one that is not readable JSON (a damaged checkpoint, which a
    save repairs)."""
    config = peek_config(path)
    if config is None:
        return None
    if config.get("kind") == EXPORT_KIND:
        return "an export (a step graph written by `lrnnx-zoo export`)"
    if config.get("library") != LIBRARY:
        return f"another model's {CONFIG_NAME} ({library_field(config)}, not {LIBRARY!r})"
    return None


def nearest_existing(path: Path) -> Path:
    """path, or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def save_checkpoint(model: "SequenceModel", save_directory: PathLike, *, name: Optional[str] = None,
                    revision: Optional[str] = None, **meta: Any) -> Path:
    """Atomically write ``model`` as a checkpoint folder (see :meth:`HubMixin.save_pretrained`).
    ``name``: the Hub repo it goes to (the card's title, and what its card loads, at ``revision``);
    None: a local checkpoint, titled by its folder's name and loaded by its path.

    A symlinked ``save_directory`` is saved into its target (the link stays); saving over an existing
    folder keeps its permission bits. Its callers (:meth:`HubMixin.save_pretrained`, :func:`push_checkpoint`)
    have refused a model whose modules disagree with its config (:func:`check_config_matches`) before
    creating a Hub repo; a check here ran it a second time per save."""
    target = check_save_target(save_directory)
    config = checkpoint_config(model, **meta)
    title = name or Path(save_directory).expanduser().name or target.name
    with replaced_folder(target, keep=lambda entry: entry not in CHECKPOINT_FILES) as tmp:
        _write_checkpoint(model, tmp, config, title, name or _load_path(save_directory, target), revision)
    return target


def check_config_matches(model: "SequenceModel") -> None:
    """Refuse, before anything is written or uploaded, a model whose modules disagree with its config
    (:meth:`~lrnnx_zoo.models.SequenceModel.config_mismatches`): config.json records the config, so
    the checkpoint would not load (a decoder replaced by hand: "decoder.weight file (5, 64) vs config
    (10, 64)"), or would load as another model (a dropout or activation changed by hand)."""
    found = model.config_mismatches()
    if not found:
        return
    cfg, fix = model.config, {}
    # the fields a module set by hand implies, for the message: a Linear into / out of d_model
    for name, field, inner, outer in (("encoder", "d_input", "out_features", "in_features"),
                                      ("decoder", "d_output", "in_features", "out_features")):
        module = getattr(model, name, None)
        size = getattr(module, outer, None)
        if getattr(module, inner, None) == cfg.d_model and size != getattr(cfg, field):
            fix[field] = size
    rates = {b.dropout.p for b in model.blocks if hasattr(getattr(b, "dropout", None), "p")}
    if len(rates) == 1 and rates != {cfg.dropout}:
        fix["dropout"] = rates.pop()
    shown = ", ".join(f"{k}={v!r}" for k, v in fix.items()) or "d_output=..."
    if fix or any(f.startswith(("encoder", "decoder")) for f in found):
        way_out = (f"Change a head with model.reconfigure({shown}) (or load with lrnnx_zoo.from_pretrained(NAME, "
                   f"{shown})), which replaces the modules and the config together"
                   + (f"; to keep the modules you set, update the config: model.config = "
                      f"dataclasses.replace(model.config, {shown})" if fix else ""))
    else:   # a layer, activation or block count set by hand, which no reconfigure changes (it said d_output=...)
        way_out = ("Build the model from a config that names them (ModelConfig's layer, layer_kwargs, activation, "
                   "dropout, n_layers), load these weights into it with load_state_dict, and save that one")
    raise CheckpointError(
        f"cannot save this model: its modules disagree with model.config, which config.json records and "
        f"from_pretrained rebuilds, so the checkpoint would not load as this model: {'; '.join(found)}. Nothing "
        f"was written. {way_out}")


def _load_path(save_directory: PathLike, target: Path) -> str:
    """What a local checkpoint's card gives from_pretrained: the path as the caller gave it, marked as a
    path ("./NAME") where it is a bare name (the card said from_pretrained("digits-lru") for a run saved
    to runs/digits-lru, which elsewhere loads the shipped model); a shipped checkpoint, its name."""
    if shipped_checkpoints().get(target.name) == target:
        return target.name
    text = os.fspath(save_directory)
    return text if os.sep in text or (os.altsep and os.altsep in text) or text.startswith("~") else f"./{text}"


class HubPublishError(RuntimeError):
    """Creating a Hub repo or uploading to it failed; the message says why and what was kept."""


#: The path of huggingface_hub's commit request (``POST {endpoint}/api/models/{ns}/{name}/commit/{rev}``):
#: the one request that publishes a push's files; those before it upload them out of sight.
_COMMIT_PATH = re.compile(r"/api/(?:models|datasets|spaces)/[^/]+/[^/]+/commit/")


@contextlib.contextmanager
def publishing(action: str, repo_id: str, kept: str = "nothing was uploaded") -> Iterator[None]:
    """Run Hub writes with bounded request timeouts, their files uploaded in this thread (a Ctrl-C stops
    an upload at once: :func:`~lrnnx_zoo.hub.transfers_in_this_thread`), and turn their failures into one
    :class:`HubPublishError` that names the action, the repo, the endpoint, the cause and its fix
    (huggingface_hub raises bare transport errors, e.g. ``ConnectError: Connection refused``).
    ``kept`` says what the user still has (a saved folder, an export). A KeyboardInterrupt goes on,
    saying whether anything was committed: nothing, unless the commit's request had been sent; so
    does the CLI's :class:`~lrnnx_zoo.training_cli.Terminated` (SIGTERM, SIGHUP). Inside
    :func:`undoing_a_new_repo` the note is kept for it too: a repo the push created is deleted again
    only while nothing of the push may have been committed."""
    constants = hub_constants()
    from huggingface_hub.errors import HfHubHTTPError, HTTPError
    from huggingface_hub.utils import get_session

    from .training_cli import Terminated

    where = f"{action} {repo_id!r} on the Hub at {constants.ENDPOINT}"
    committing = []

    def note_commit(request: Any) -> None:
        if request.method == "POST" and _COMMIT_PATH.search(request.url.path):
            committing.append(request.url.path)
    with this_threads_hook("request", note_commit) as session, bars_this_thread_opens() as bars:
        try:
            with bounded_hub_requests(), transfers_in_this_thread():
                yield
        except (KeyboardInterrupt, Terminated) as stop:
            _close_bars(bars)
            # the CLI prints it after "interrupted" or "terminated by SIGTERM"; a script's traceback ends with it
            if committing:
                done = f"the commit to {repo_id!r} was under way, and may have been made: see the repo's history"
            elif get_session() is not session:      # replaced meanwhile (on an SSL error): its requests went unseen
                done = (f"whether anything was committed to {repo_id!r} is not known (huggingface_hub renewed its "
                        f"connection meanwhile): see the repo's history")
            else:
                done = f"nothing was committed to {repo_id!r}"
            stop.args = (f"{done}; {kept}",)
            raise
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            fix = ("log in (`hf auth login`) or pass token= with write access to that namespace"
                   if status in (401, 403) else "the Hub's message says why")
            raise HubPublishError(f"could not {where}: HTTP {status}: {reason}; {fix}. {kept_sentence(kept)}") from exc
        except HTTPError as exc:  # transport: refused, unresolvable host, timed out
            raise HubPublishError(
                f"could not {where}: the Hub could not be reached ({type(exc).__name__}: {exc}; each request waits "
                f"at most {hub_timeout():g} s, set by HF_HUB_ETAG_TIMEOUT); check your connection, or HF_ENDPOINT. "
                f"{kept_sentence(kept)}") from exc
        except (json.JSONDecodeError, KeyError) as exc:
            # an answer no Hub gives: an HTML page for a commit (a captive portal), a 409 without a body
            raise HubPublishError(f"could not {where}: the server answered something a Hub does not send "
                                  f"({unexpected_answer(exc)}); check HF_ENDPOINT, or a proxy or captive portal "
                                  f"between you and the Hub. {kept_sentence(kept)}") from exc
        finally:
            push = _PUSH.get()
            if push is not None and (committing or get_session() is not session):
                push.maybe_committed = True     # sent, or maybe sent through a renewed client: never undone


_bars_lock = threading.Lock()
_recording_bars = threading.local()


@contextlib.contextmanager
def bars_this_thread_opens() -> Iterator["weakref.WeakSet[Any]"]:
    """While inside, the progress bars (tqdm's, huggingface_hub's among them) that the calling thread
    opens are added to the set it yields; bars other threads open meanwhile are not (an application's
    own bar, another push's). tqdm keeps one process-wide set of open bars, which says nothing of who
    opened them: its ``__new__`` is wrapped once, for good (restoring it could undo another thread's
    wrapping), to note each new bar in the sets of its thread's open contexts."""
    from tqdm import tqdm
    with _bars_lock:
        if not getattr(tqdm.__new__, "notes_thread", False):
            tqdm.__new__ = staticmethod(_noting_thread(tqdm.__new__))
    opened: "weakref.WeakSet[Any]" = weakref.WeakSet()     # a bar dropped by its owner is no longer ours to close
    sets = getattr(_recording_bars, "sets", None)
    if sets is None:
        sets = _recording_bars.sets = []
    sets.append(opened)
    try:
        yield opened
    finally:
        sets.remove(opened)


def _noting_thread(new: Callable[..., Any]) -> Callable[..., Any]:
    """tqdm's ``__new__`` (``new``), adding each bar it makes to the sets of
    :func:`bars_this_thread_opens` open in the calling thread."""
    @functools.wraps(new)
    def noted(cls: type, *args: Any, **kwargs: Any) -> Any:
        bar = new(cls, *args, **kwargs)
        for opened in getattr(_recording_bars, "sets", ()):
            opened.add(bar)
        return bar
    noted.notes_thread = True   # type: ignore[attr-defined]
    return noted


def _close_bars(bars: Iterable[Any]) -> None:
    """Close ``bars`` (those an interrupted upload opened; a bar closed already is left as it is), as
    they close when done. huggingface_hub closes its bar of the file in flight (``tqdm_stream_file``)
    only when the upload ends well: after a Ctrl-C, what was said next ("lrnnx-zoo push: interrupted:
    nothing was committed ...") went on the bar's line, and at exit the bar printed itself again."""
    for bar in list(bars):
        bar.close()


def check_repo_id(repo_id: Any, what: str = "repo_id") -> None:
    """Raise a ValueError naming ``what`` unless ``repo_id`` can name a Hub repo: checked before a
    save or an export, not after it, when the upload would fail (huggingface_hub's environment too:
    see :func:`~lrnnx_zoo.hub.hub_constants`)."""
    hub_constants()
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{what} must be a Hub repo id, 'name' or 'namespace/name' (letters, digits, '-', '_' "
                         f"and '.'), got {repo_id!r}") from None


def create_repo(repo_id: str, *, token: Optional[str] = None, private: bool = False,
                kept: str = "nothing was uploaded") -> str:
    """Create ``repo_id`` on the Hub if needed; returns its full id ("name" without a namespace is
    created under the token's user, and that is where files must go and what the card must name)."""
    hub_constants()                       # a bad HF_HUB_ETAG_TIMEOUT named, not a bare int() error
    from huggingface_hub import HfApi

    with publishing("create", repo_id, kept):
        return created_repo(HfApi(token=token), repo_id, private)  # endpoint: HF_ENDPOINT


def created_repo(api: Any, repo_id: str, private: bool = False) -> str:
    """``api.create_repo(repo_id, exist_ok=True)``'s full id. Inside :func:`undoing_a_new_repo` it notes
    whether this request made the repo (the Hub answered its creation with 200, not with 409 for one
    that existed), which exist_ok's answer does not say, and the Hub's time of that answer (its Date)."""
    answers = []

    def note_creation(response: Any) -> None:
        request = response.request
        if request.method == "POST" and request.url.path.endswith("/api/repos/create"):
            answers.append((response.status_code, response.headers.get("date")))
    with this_threads_hook("response", note_creation):
        full_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    push = _PUSH.get()
    if push is not None and answers and 200 <= answers[-1][0] < 300:
        push.created, push.created_when = full_id, _http_date(answers[-1][1])
    return full_id


def _http_date(text: Optional[str]) -> Optional[datetime.datetime]:
    """An HTTP Date header's time (UTC), or None where it is missing or not a date."""
    try:
        return email.utils.parsedate_to_datetime(text) if text else None
    except (TypeError, ValueError):
        return None


#: Seconds by which a new repo's first commit may come before the Hub's answer to its creation (the
#: answer's Date has whole seconds; a slow create): an older first commit is another's repo.
CREATION_SLACK = 60.0


#: Seconds the deletion of a failed push's new repo may take in all (its four requests), so that a
#: Ctrl-C still returns promptly; a second Ctrl-C ends it sooner.
UNDO_SECONDS = 3.0


@dataclasses.dataclass
class _Push:
    """What :func:`undoing_a_new_repo` learns of the push it wraps."""
    token: Any
    created: Optional[str] = None       # the full id of the repo this push created
    created_when: Optional[datetime.datetime] = None   # the Hub's Date on the answer that created it
    maybe_committed: bool = False       # a commit's request went out (or may have, unseen)


_PUSH: contextvars.ContextVar[Optional[_Push]] = contextvars.ContextVar("lrnnx_zoo_push", default=None)


@contextlib.contextmanager
def undoing_a_new_repo(token: Any = None) -> Iterator[None]:
    """Around a whole push (create the repo, save, upload): if it fails or is stopped (Ctrl-C, the CLI's
    SIGTERM / SIGHUP) after creating its repo, one that did not exist before, and before any commit of
    its own could have been made, delete that repo again while it holds only its creation's commit
    (the Hub's .gitattributes): a stray empty repo, public unless private=True, was left behind. The
    error goes on, saying what became of the repo (:func:`_delete_new_repo`). A repo that existed
    before is never deleted, nor a branch the push made in one. Nested uses belong to the outermost."""
    if _PUSH.get() is not None:
        yield
        return
    push = _Push(token)
    reset = _PUSH.set(push)
    try:
        yield
    except BaseException as exc:
        if push.created is not None and not push.maybe_committed and not isinstance(exc, GeneratorExit):
            _say_also(exc, _delete_new_repo(push.created, token, push.created_when))
        raise
    finally:
        _PUSH.reset(reset)


def _delete_new_repo(repo_id: str, token: Any, created_when: Optional[datetime.datetime]) -> str:
    """Delete ``repo_id``, which this push created and committed nothing to, if its history is still
    its creation's one commit (no file but .gitattributes, made at ``created_when``, the Hub's time of
    the answer that created it, within :data:`CREATION_SLACK`), with every branch on it and no tag or
    pull request (so that another process's push meanwhile is never deleted), within
    :data:`UNDO_SECONDS`. Returns what became of it, as a clause for the push's error."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .training_cli import Terminated

    api = HfApi(token=token)
    deleting = False
    try:
        with _within(UNDO_SECONDS):
            history = api.list_repo_commits(repo_id)
            refs = api.list_repo_refs(repo_id, include_pull_requests=True)
            root = history[0].commit_id if len(history) == 1 else None
            # the one commit must be the creation's too, made then and holding no file: a proxy or mirror
            # answering 200 to the create of an existing repo made it look new, and a squashed one
            # (super_squash_history) has one commit, holding its files
            made_then = (root is not None and created_when is not None and history[0].created_at
                         >= created_when - datetime.timedelta(seconds=CREATION_SLACK))
            if (not made_then or refs.tags or refs.pull_requests
                    or any(b.target_commit != root for b in refs.branches)
                    or set(api.list_repo_files(repo_id, revision=root)) - {".gitattributes"}):
                return (f"the repo {repo_id!r} this push created was kept: it holds commits, files or refs this "
                        "push did not make")
            deleting = True
            api.delete_repo(repo_id)
    except (KeyboardInterrupt, Terminated):
        why = "deleting it was interrupted"
    except HfHubHTTPError as exc:
        deleting = False        # the Hub answered, refusing: not deleted
        status = getattr(getattr(exc, "response", None), "status_code", None)
        why = f"deleting it failed: HTTP {status}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    except Exception as exc:    # unreachable, the time bound
        why = f"deleting it failed: {type(exc).__name__}: {exc}"
    else:
        return f"the empty repo {repo_id!r} this push created was deleted"
    fate = "may have been left" if deleting else "was left"
    return (f"the repo {repo_id!r} this push created, empty but for the Hub's .gitattributes, {fate} ({why}); "
            f"if it is still empty, delete it with `{_delete_command(repo_id)}`")


def _delete_command(repo_id: str) -> str:
    """The installed huggingface_hub CLI's command that deletes ``repo_id``: `hf repos delete` (2.x);
    `hf repo delete` (1.x, which has no `hf repos`)."""
    import importlib.util
    group = "repos" if importlib.util.find_spec("huggingface_hub.cli.repos") is not None else "repo"
    return f"hf {group} delete {repo_id}"


@contextlib.contextmanager
def _within(seconds: float) -> Iterator[None]:
    """While inside, this thread's huggingface_hub requests end ``seconds`` from now: each waits at
    most the time left, and one sent later raises TimeoutError."""
    end = time.monotonic() + seconds

    def cap(request: Any) -> None:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"it took more than {seconds:g} s")
        limits = dict(request.extensions.get("timeout") or {})
        request.extensions["timeout"] = {k: left if limits.get(k) is None else min(limits[k], left)
                                         for k in ("connect", "read", "write", "pool")}
    with this_threads_hook("request", cap):
        yield


def _say_also(exc: BaseException, clause: str) -> None:
    """Add ``clause`` to ``exc``'s message: to a push's interrupt as a clause of its own (the CLI prints
    it after "interrupted"), to a HubPublishError as its last sentence; to any other error as a note
    (Python >= 3.11; 3.10's exceptions have no notes, and the error goes on without it)."""
    from .training_cli import Terminated

    if isinstance(exc, (KeyboardInterrupt, Terminated)):
        exc.args = ("; ".join(a for a in (str(exc), clause) if a),)
    elif isinstance(exc, HubPublishError) and len(exc.args) == 1:
        exc.args = (f"{exc} {kept_sentence(clause)}",)
    else:
        add_note(exc, kept_sentence(clause))


def upload_checkpoint(folder: Path, repo_id: str, *, token: Optional[str] = None, private: bool = False,
                      commit_message: Optional[str] = None, revision: Optional[str] = None,
                      kept: Optional[str] = None) -> CommitInfo:
    """Create ``repo_id`` if needed (and branch ``revision``) and upload the checkpoint files in one commit.
    A failure is a :class:`HubPublishError` ending with ``kept`` (default: where the files are); a repo it
    created is deleted again when nothing was committed (:func:`undoing_a_new_repo`)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    kept = kept or f"the checkpoint files are in {folder}"
    message = commit_message or f"Upload lrnnx-zoo {__version__} checkpoint"
    with undoing_a_new_repo(token):
        repo_id = create_repo(repo_id, token=token, private=private, kept=kept)
        with publishing("upload to", repo_id, kept):
            _check_repo_holds_no_other_model(api, repo_id, revision, kept)    # before a new branch is made
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=list(CHECKPOINT_FILES),
                                     commit_message=message, revision=revision)


class OversizedRepoConfig(Exception):
    """A repo's config.json larger than any lrnnx-zoo config (:data:`~lrnnx_zoo.hub.MAX_CONFIG_BYTES`):
    :func:`repo_config_file` does not download it. Its message says what the repo holds, in words."""


def repo_config_file(api: Any, repo_id: str, revision: Optional[str] = None) -> Optional[Path]:
    """The local copy of ``repo_id``'s config.json (at ``revision``; a branch not made yet starts
    from main, so main's), or None when it has none: what a push checks before it replaces a repo's
    config.json and card. One the listing says is larger than
    :data:`~lrnnx_zoo.hub.MAX_CONFIG_BYTES` raises :class:`OversizedRepoConfig` instead of being downloaded
    (a push into a repo with a 3 GB config.json fetched it all, to refuse it afterwards)."""
    from huggingface_hub.errors import RevisionNotFoundError
    try:
        entries = list(api.list_repo_tree(repo_id, revision=revision))     # the root: config.json's size
    except RevisionNotFoundError:
        if revision in (None, "main"):
            raise
        return repo_config_file(api, repo_id, None)     # create_branch will start it from main
    config = next((e for e in entries if getattr(e, "path", None) == CONFIG_NAME), None)
    if config is None or not hasattr(config, "size"):  # none, or a folder of that name
        return None
    if isinstance(config.size, int) and config.size > MAX_CONFIG_BYTES:
        raise OversizedRepoConfig(f"a {CONFIG_NAME} of {config.size / 1e6:.0f} MB (an lrnnx-zoo one is a few kB; "
                                  "it was not downloaded)")
    return Path(api.hf_hub_download(repo_id, CONFIG_NAME, revision=revision))


def kept_sentence(kept: str) -> str:
    """``kept`` (what the user still has) as the closing sentence of an error message."""
    return f"{kept[:1].upper() + kept[1:]}."


def _check_repo_holds_no_other_model(api: Any, repo_id: str, revision: Optional[str], kept: str) -> None:
    """Refuse to upload a checkpoint over a repo (at ``revision``) whose config.json is an export's or
    another library's: the upload replaced its config.json and card and left its other files (a step
    graph, another model's weights) beside them. The Hub mirror of :func:`check_save_target`."""
    try:
        config = repo_config_file(api, repo_id, revision)
        foreign = None if config is None else _foreign_config(config)
    except OversizedRepoConfig as exc:
        foreign = str(exc)
    if foreign:
        where = repo_id if revision in (None, "main") else f"{repo_id}@{revision}"
        raise HubPublishError(f"refusing to upload a checkpoint to {where!r}: it holds {foreign}, and the "
                              f"checkpoint's {CONFIG_NAME} and {CARD_NAME} would replace it. Expected a new repo "
                              f"or an lrnnx-zoo checkpoint's; push to another repo, e.g. {repo_id + '-checkpoint'!r}. "
                              f"{kept_sentence(kept)}")


def push_checkpoint(model: "SequenceModel", repo_id: str, *, token: Optional[str] = None, private: bool = False,
                    commit_message: Optional[str] = None, revision: Optional[str] = None,
                    kept: str = "the model in memory is unchanged (save_pretrained(DIR) keeps a local copy)") -> Any:
    """:meth:`HubMixin.push_to_hub`, with ``kept`` (what the user still has when it fails) given by
    the caller: `lrnnx-zoo push` has no model in memory to speak of, but the checkpoint it loaded."""
    import tempfile
    check_config_matches(model)      # before the repo is created
    meta = model._provenance()
    with undoing_a_new_repo(token):
        repo_id = create_repo(repo_id, token=token, private=private, kept=kept)   # its full id, for the card
        with tempfile.TemporaryDirectory(prefix="lrnnx-zoo-push-") as tmp:
            folder = save_checkpoint(model, Path(tmp) / "checkpoint", name=repo_id, revision=revision, **meta)
            return upload_checkpoint(folder, repo_id, token=token, private=private,
                                     commit_message=commit_message, revision=revision, kept=kept)


#: config.json's provenance fields, which save_pretrained / push_to_hub write into the card
#: ("resampled" only for a model made by SequenceModel.at_rate, "base_model" for one adapted by
#: SequenceModel.reconfigure).
PROVENANCE_KEYS = ("task", "dataset", "metrics", "command", "notes", "resampled", "base_model")
#: Those that describe the run that made the weights: stale once the weights change.
RUN_KEYS = ("metrics", "command", "notes")


def resampled_info(original: Any, model: Any, rate: float) -> Dict[str, Any]:
    """The ``checkpoint_info`` of ``model``, ``original`` resampled at ``rate`` (SequenceModel.at_rate).

    The original's task and dataset (the data's meaning is unchanged) and source are kept; what
    describes the run that made the original's weights (metrics, command, notes) is not this
    model's, and is dropped. A ``resampled`` record says from what and at which rate:
    {"rate": total rate, "from": what from_pretrained loads (None: in memory, or changed since it
    was loaded), "from_metrics"},
    composed over successive resamplings of unchanged weights (rates multiply). ``weights_digest``
    is the new weights', so a save keeps this record until they change again."""
    from .hub import weights_digest

    info = dict(getattr(original, "checkpoint_info", None) or {})
    changed = weights_changed(original, info)
    earlier = info.get("resampled") if not changed else None
    if isinstance(earlier, dict):
        record = {**earlier, "rate": earlier["rate"] * rate}
    else:
        # weights changed since they were loaded (fine-tuned): no checkpoint holds them, as in memory
        origin = None if changed else loadable_source(info.get("source"))
        record = {"rate": rate, "from": origin, "from_metrics": None if changed else info.get("metrics")}
    kept = {k: v for k, v in info.items() if k not in RUN_KEYS and k != "weights_digest"}
    return {**kept, **{k: None for k in RUN_KEYS}, "resampled": record, "weights_digest": weights_digest(model)}


def adapted_info(model: Any, changes: Dict[str, Any], fresh: List[str], stale: bool) -> Dict[str, Any]:
    """The ``checkpoint_info`` of ``model`` after :meth:`~lrnnx_zoo.models.SequenceModel.reconfigure`
    changed ``changes`` ({field: [old, new]}) and initialised the tensors ``fresh`` afresh; ``stale``:
    its weights had changed since ``checkpoint_info`` was recorded (fine-tuned before), so no
    checkpoint holds its backbone.

    The run that made the weights measured another model (another head or pooling), so its metrics,
    command and notes are dropped; after a change of d_input or d_output its task and dataset too
    (``lrnnx-zoo evaluate`` would rebuild the old task's data). A ``base_model`` record says where
    the backbone came from: {"from": what from_pretrained loads (None: in memory, or changed since
    it was loaded), "from_metrics", "changes", "reinitialized"}; successive changes fold into one
    record. ``weights_digest`` is the new weights', so the record stays until they change again; no
    ``source``, as no checkpoint holds the adapted model until it is saved."""
    from .hub import weights_digest

    info = dict(getattr(model, "checkpoint_info", None) or {})
    earlier = info.get("base_model")
    record: Dict[str, Any]
    if isinstance(earlier, dict):
        before = dict(earlier.get("changes") or {})
        merged = {k: [before.get(k, v)[0], v[1]] for k, v in changes.items()}
        record = {**earlier, "changes": {**before, **merged},
                  "reinitialized": sorted(set(earlier.get("reinitialized") or []) | set(fresh))}
    else:
        origin = None if stale else loadable_source(info.get("source"))
        record = {"from": origin, "from_metrics": info.get("metrics") if origin else None,
                  "changes": changes, "reinitialized": fresh}
    dropped = set(RUN_KEYS) | ({"task", "dataset"} if {"d_input", "d_output"} & set(record["changes"]) else set())
    kept = {k: v for k, v in info.items() if k not in dropped and k not in ("weights_digest", "source")}
    # no "source": no checkpoint holds this model (an export names it in memory, adapted from the record's).
    # A model on the meta device (built there, to be materialised and loaded later) has no values to
    # fingerprint: weights_digest raised after the modules and config had changed, leaving it half adapted
    meta = any(t.is_meta for t in model.state_dict().values())
    return {**kept, **{k: None for k in dropped}, "base_model": record,
            "weights_digest": None if meta else weights_digest(model)}


def stale_note(info: Dict[str, Any], dropped: Any) -> str:
    """The card's note that ``dropped`` fields of ``info`` (checkpoint_info) were left out because
    the weights changed since it was recorded; names the origin and the metrics it had."""
    source = info.get("source")
    if isinstance(source, dict) and source.get("type") == "trained":
        origin = f"recipe {source.get('recipe')!r} trained them"
    else:
        where = loadable_source(source)
        origin = f"they were loaded from {where}" if where else "they were recorded"
    metrics = info.get("metrics")
    fields = []
    for key in dropped:
        if key == "metrics" and isinstance(metrics, dict) and metrics:   # say what they were
            key += " (" + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items()) + ")"
        fields.append(key)
    listed = fields[0] if len(fields) == 1 else ", ".join(fields[:-1]) + " and " + fields[-1]
    verb = "describes" if len(fields) == 1 and dropped[0] == "command" else "describe"
    return (f"These weights changed (e.g. fine-tuning) after {origin}, so that run's {listed} no longer "
            f"{verb} them and {'was' if verb == 'describes' else 'were'} left out; the task and dataset above "
            "are that run's. Pass metrics= (and command=, notes=) to save_pretrained to record this model's own.")


class HubMixin:
    """save_pretrained / push_to_hub / from_pretrained for :class:`~lrnnx_zoo.models.SequenceModel`."""

    #: The loaded checkpoint's config.json plus "source" and "weights_digest" (set by from_pretrained,
    #: ``lrnnx_zoo.training.train`` and ``at_rate``); None for a model built in code.
    checkpoint_info: Optional[Dict[str, Any]] = None

    # What it returns follows push_to_hub (a checker saw Path | CommitInfo, so `path / "config.json"` failed)
    @overload
    def save_pretrained(self, save_directory: PathLike, *, task: Any = None, dataset: Any = None,
                        metrics: Optional[Dict[str, Any]] = None, command: Optional[str] = None,
                        notes: Optional[str] = None, push_to_hub: Literal[False] = False,
                        repo_id: Optional[str] = None) -> Path: ...

    @overload
    def save_pretrained(self, save_directory: PathLike, *, task: Any = None, dataset: Any = None,
                        metrics: Optional[Dict[str, Any]] = None, command: Optional[str] = None,
                        notes: Optional[str] = None, push_to_hub: Literal[True],
                        repo_id: Optional[str] = None) -> CommitInfo: ...

    @overload
    def save_pretrained(self, save_directory: PathLike, *, task: Any = None, dataset: Any = None,
                        metrics: Optional[Dict[str, Any]] = None, command: Optional[str] = None,
                        notes: Optional[str] = None, push_to_hub: bool = False,
                        repo_id: Optional[str] = None) -> Union[Path, CommitInfo]: ...

    def save_pretrained(self, save_directory: PathLike, *, task: Any = None, dataset: Any = None,
                        metrics: Optional[Dict[str, Any]] = None, command: Optional[str] = None,
                        notes: Optional[str] = None, push_to_hub: bool = False,
                        repo_id: Optional[str] = None) -> Union[Path, CommitInfo]:
        """Write config.json, model.safetensors and README.md into ``save_directory``.

        Atomic: the files are written into a temporary sibling folder that replaces the old one only
        once complete, so an interrupted save leaves any previous checkpoint there intact. Other
        files already in the folder are kept. ``task`` (str or dict), ``dataset`` (dict: name,
        source, split), ``metrics`` (name -> number), ``command`` (reproduces the model) and
        ``notes`` go into config.json and the card. With ``push_to_hub=True`` the folder is then
        uploaded to ``repo_id`` (default: the folder name) and the commit info is returned;
        otherwise the folder's path.

        A field left None comes from ``self.checkpoint_info`` (set by from_pretrained and by
        ``lrnnx_zoo.training.train``), so re-saving a trained or loaded model keeps its card; pass
        an empty value (``metrics={}``, ``command=""``) to leave one out.
        """
        check_config_matches(self)      # before a Hub repo is created, too
        meta = self._provenance(task=task, dataset=dataset, metrics=metrics, command=command, notes=notes)
        if not push_to_hub:
            return save_checkpoint(self, save_directory, name=repo_id, **meta)
        local = Path(save_directory).expanduser().absolute()
        check_repo_id(repo_id or local.name, "repo_id" if repo_id else "repo_id (the folder's name, as none was given)")
        repo_id = repo_id or local.name
        with undoing_a_new_repo():
            try:                # the card names the repo the files land in: its full id, from the Hub
                repo_id = create_repo(repo_id, kept=f"the checkpoint was saved to {local}")
            except HubPublishError:
                save_checkpoint(self, save_directory, name=repo_id, **meta)     # the local half still happens
                raise
            folder = save_checkpoint(self, save_directory, name=repo_id, **meta)
            return upload_checkpoint(folder, repo_id)

    def push_to_hub(self, repo_id: str, *, token: Optional[str] = None, private: bool = False,
                    commit_message: Optional[str] = None, revision: Optional[str] = None) -> CommitInfo:
        """Upload this model to the Hub repo ``repo_id`` (created if needed); returns the CommitInfo.

        Task, dataset, metrics, command and notes come from ``self.checkpoint_info`` (set by
        from_pretrained and by ``lrnnx_zoo.training.train``), except metrics, command and notes
        once the weights changed since (fine-tuning): those are left out and the card says so. To
        publish new ones use ``save_pretrained(DIR, ..., push_to_hub=True)``.
        """
        return push_checkpoint(self, repo_id, token=token, private=private, commit_message=commit_message,
                               revision=revision)

    def _provenance(self, **given: Any) -> Dict[str, Any]:
        """The card's fields (PROVENANCE_KEYS): those ``given`` as not None, the others from
        ``self.checkpoint_info`` (None where it has none).

        If the weights changed since checkpoint_info was recorded (its ``weights_digest``: e.g. the
        loaded model was fine-tuned), what describes that run (metrics, command, notes) is left
        out unless given, and the notes say so; task and dataset are kept."""
        info = getattr(self, "checkpoint_info", None) or {}
        changed = weights_changed(self, info)
        meta, dropped = {}, []
        for key in PROVENANCE_KEYS:
            if given.get(key) is not None:
                meta[key] = given[key]
            elif changed and key in RUN_KEYS:
                meta[key] = None
                if info.get(key):
                    dropped.append(key)
            else:
                meta[key] = info.get(key)
        if dropped:
            notes = str(meta["notes"] or "").rstrip()
            meta["notes"] = (notes + ("" if not notes or notes.endswith((".", "!", "?")) else ".") + " "
                             + stale_note(info, dropped)).lstrip()
        return meta

    @classmethod
    def from_pretrained(cls, name_or_path: PathLike, revision: Optional[str] = None,
                        cache_dir: Optional[PathLike] = None, local_files_only: bool = False,
                        token: Optional[Union[str, bool]] = None, **changes: Any) -> "SequenceModel":
        """Same as :func:`lrnnx_zoo.from_pretrained`."""
        return from_pretrained(name_or_path, revision, cache_dir, local_files_only, token, **changes)

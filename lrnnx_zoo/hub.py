"""Checkpoints in Hugging Face Hub format: the format, loading (a local folder, a checkpoint shipped
with the package, a Hub repo) and the list of shipped models. Saving and pushing: :mod:`lrnnx_zoo.hub_save`.

A checkpoint is a folder (or a Hub repo) holding exactly:

- ``config.json``: format version, library version, layer family, the plugin that provides it,
  the :class:`~lrnnx_zoo.models.ModelConfig`, and provenance (task, dataset, metrics, command);
- ``model.safetensors``: the ``state_dict``; pickled weights are never loaded;
- ``README.md``: the model card (see :mod:`lrnnx_zoo.hub_card`).

huggingface_hub does the transport (``snapshot_download`` with its cache, revisions and offline
mode; ``HfApi.create_repo``/``upload_folder``) and the card metadata. We do not use its
``ModelHubMixin``: it writes ``__init__`` kwargs as the config, makes a generic card, knows nothing
of shipped checkpoints, and loads with ``strict=False``, which silently keeps random weights for
any key the file lacks. Here loading is strict and every refusal says what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import fnmatch
import functools
import itertools
import json
import math
import os
import re
import stat
import sys
import threading
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from . import __version__
from .registry import (DISABLE_AUTOLOAD_ENV, PluginVersionWarning, autoload_note, extra_plugin_changes, get_registry,
                       layer_owners, missing_extra_plugins, plugin_change, release_of, unloaded_plugin_remedy)
from .utf8 import home_trouble, openable
from .wording import given, in_command_line

if TYPE_CHECKING:  # models.py imports this module for HubMixin
    from .models import SequenceModel

FORMAT_VERSION = 1
LIBRARY = "lrnnx-zoo"
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
EXPORT_KIND = "step-graph"  # config.json "kind" of a folder written by `lrnnx-zoo export`
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or trusted; the message says what to do."""


# -- shipped checkpoints -----------------------------------------------------------------------
def checkpoints_root() -> Optional[Path]:
    """Folder of the installed ``lrnnx_zoo.checkpoints`` package (None if it is not installed)."""
    try:
        return Path(str(resources.files("lrnnx_zoo.checkpoints")))
    except ModuleNotFoundError:
        return None


def shipped_checkpoints() -> Dict[str, Path]:
    root = checkpoints_root()
    if root is None or not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / CONFIG_NAME).is_file()}


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Names of the checkpoints shipped with the package, filtered by ``pattern``: an fnmatch
    wildcard (``"digits-*"``), or without wildcards a substring (``"s4d"``); pass a name to
    :func:`from_pretrained`."""
    names = list(shipped_checkpoints())
    if pattern is not None and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return [n for n in names if pattern is None or fnmatch.fnmatchcase(n, pattern)]


# -- resolving a name to a folder --------------------------------------------------------------
def resolve_checkpoint(name_or_path: PathLike, revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                       local_files_only: bool = False, token: Optional[Union[str, bool]] = None,
                       need_weights: bool = True) -> Tuple[Path, Dict[str, Any]]:
    """Find a checkpoint folder: a local folder, else a shipped model, else a Hub repo (downloaded).

    Returns (folder, source) where source records where it came from (and the resolved commit).
    With ``need_weights`` False a Hub repo's config.json and card are downloaded, not its weights
    (what `lrnnx-zoo info` shows needs no more).
    """
    if isinstance(name_or_path, bytes) or not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"from_pretrained expects a shipped name, a folder path or a Hub repo id (str or "
                        f"os.PathLike), got {name_or_path!r} ({type(name_or_path).__name__})")
    text = os.fspath(name_or_path)
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a str (a branch, tag or commit id) or None for main, got {revision!r} "
                        f"({type(revision).__name__})")
    if revision is not None and not revision.strip():
        raise CheckpointError(f"revision={revision!r} is empty; pass a branch, tag or commit id, or None for main")
    if revision is not None and any(part in (".", "..") for part in revision.split("/")):
        # a URL path drops dot segments: ".." loaded main and recorded revision '..' (an audit)
        raise CheckpointError(f"revision={revision!r} has a '.' or '..' segment, which no branch, tag or commit "
                              f"id has; pass one, or None for main")
    if not str(text).strip():       # Path("") is the working directory: never what an empty name meant
        raise CheckpointError("from_pretrained got an empty name; pass a shipped name (lrnnx-zoo models), "
                              "a checkpoint folder or a Hub repo id")
    home = home_trouble(text)
    if home:        # no shipped name or Hub repo id starts with "~"
        raise CheckpointError(f"no checkpoint {text!r}: {home}")
    path = Path(text).expanduser()
    trouble = path_trouble(path)
    if trouble:
        shown = text if len(text) <= 80 else f"{text[:60]}...({len(text)} characters)"
        raise CheckpointError(f"no checkpoint {shown!r}: the path cannot be looked up, {trouble}; pass a "
                              f"shipped name (lrnnx-zoo models), a checkpoint folder or a Hub repo id")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(_pickle_message(str(path)))
        raise CheckpointError(f"from_pretrained expects a checkpoint folder ({', '.join(CHECKPOINT_FILES)}), "
                              f"got the file {path}; pass its folder {path.parent} instead")
    shipped = shipped_checkpoints()
    local = path.is_dir() or text in shipped
    if local and revision is not None:
        raise CheckpointError(f"revision={revision!r} applies to Hub repos, but {text!r} is a local or shipped "
                              "checkpoint; drop revision or pass a Hub repo id")
    if path.is_dir():
        if text in shipped and path.resolve() != shipped[text].resolve():
            _check_not_shadowing(path, text, shipped[text])
        return path, {"type": "local", "path": str(path.resolve())}
    if text in shipped:
        return shipped[text], {"type": "shipped", "name": text, "path": str(shipped[text])}
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(text)
    except Exception:
        raise CheckpointError(f"no checkpoint {text!r}: it is not an existing folder, not a shipped model "
                              f"({_known(text, shipped)}), and not a valid Hub repo id ('namespace/name'); "
                              "check the path") from None
    if "/" not in text:
        # huggingface_hub accepts "name" as a repo id, but on the Hub only a few legacy models of other
        # libraries live without a namespace: every repo created there (push_to_hub("name") too) is
        # "user/name". Asking the Hub would cost a round trip, or a timeout offline, for the same answer.
        raise CheckpointError(f"no checkpoint {text!r}: it is not an existing folder, not a shipped model "
                              f"({_known(text, shipped)}), and not a Hub repo id (those are 'namespace/name')")
    return _download(text, revision, cache_dir, local_files_only, token, list(shipped), need_weights)


def path_trouble(path: Union[str, os.PathLike]) -> Optional[str]:
    """Why ``path`` cannot be looked up at all, or None (missing is fine: callers say so themselves).
    Python's exists() / is_file() raised these as tracebacks (OSError: File name too long) or, for
    a symlink loop, resolve() a RuntimeError."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return "a name in it is longer than the file system allows (usually 255 bytes a name)"
        if exc.errno == errno.ELOOP:
            return "it goes round a loop of symbolic links"
    except ValueError:                          # an embedded NUL byte
        return "it holds a NUL character"
    return None


def close_names(name: str, shipped: List[str]) -> List[str]:
    """Shipped names, and checkpoint folders beside where ``name`` points, that look like a mistyped
    ``name``, best first: those containing it, then the close spellings (the best and any nearly as close)."""
    path = Path(name).expanduser()
    try:
        beside = [e for e in itertools.islice(path.parent.iterdir(), 1000) if (e / CONFIG_NAME).is_file()]
    except (OSError, ValueError):                          # no such folder, or not a path at all
        beside = []
    typed = path.name.lower()
    # what is shown (a folder as typed, with the OS's separators) -> what is compared; shipped names
    # have no folder part, so "org/name" or "runs/name" is no typo of one ("name/" may be)
    candidates = {n: n.lower() for n in shipped if len(path.parts) == 1}
    candidates.update({str(path.parent / e.name): e.name.lower() for e in beside})
    containing = [shown for shown, key in candidates.items() if len(typed) >= 3 and typed in key]
    scores = {shown: difflib.SequenceMatcher(None, typed, key).ratio() for shown, key in candidates.items()}
    best = max(scores.values(), default=0.0)
    close = sorted((s for s in scores if scores[s] >= max(0.8, best - 0.05)), key=lambda s: -scores[s])
    return list(dict.fromkeys(containing + close))


def _known(name: str, shipped: List[str]) -> str:
    """What an error about ``name`` says of the shipped models: the ones (and checkpoint folders)
    it may have meant, else all of them."""
    close = close_names(name, list(shipped))
    if close:
        return f"did you mean {'one of ' if len(close) > 1 else ''}{', '.join(map(repr, close))}?"
    return ", ".join(shipped) or "none installed"


# -- bounded Hub requests ----------------------------------------------------------------------
DEFAULT_HUB_TIMEOUT = 10.0
TIMEOUT_ENV_VARS = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")


def hub_constants() -> Any:
    """``huggingface_hub.constants``, which reads HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT with
    int() when first imported: a CheckpointError naming the variable where one holds no whole number
    (``HF_HUB_ETAG_TIMEOUT=2.5`` failed every Hub load and push as "invalid literal for int() with base
    10: '2.5'", naming no variable), not that ValueError."""
    try:
        from huggingface_hub import constants
    except ValueError as exc:
        bad = []
        for name in TIMEOUT_ENV_VARS:
            try:
                int(os.environ.get(name, "0"))
            except ValueError:
                bad.append(f"{name}={os.environ[name]!r}")
        if not bad:
            raise
        raise CheckpointError(f"huggingface_hub cannot start with {', '.join(bad)}: it takes a whole number of "
                              f"seconds there (e.g. {DEFAULT_HUB_TIMEOUT:g}); set one, or unset it for "
                              f"{DEFAULT_HUB_TIMEOUT:g}") from exc
    return constants


def hub_timeout() -> float:
    """Seconds one Hub request may wait for the server: the first positive number among the env vars
    HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT (read now, so a changed environment counts), else 10."""
    for name in TIMEOUT_ENV_VARS:
        try:
            seconds = float(os.environ.get(name, ""))
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds > 0:
            return seconds
    return DEFAULT_HUB_TIMEOUT


def _timeout_filler(seconds: float) -> Callable[[Any], None]:
    """An httpx request hook giving every timeout the request left unset (None) ``seconds``."""
    def fill(request: Any) -> None:
        limits = dict(request.extensions.get("timeout") or {})
        phases = ("connect", "read", "write", "pool")
        if any(limits.get(k) is None for k in phases):
            request.extensions["timeout"] = {k: seconds if limits.get(k) is None else limits[k] for k in phases}
    return fill


#: What a Hub server's commit ids and ETags may hold: huggingface_hub 2.x writes files at cache paths
#: built from them, so "../../x" placed a server-chosen file outside the cache.
_SAFE_ID = re.compile(r"[0-9A-Za-z_-]+")
_COMMIT_ID = re.compile(r"[0-9a-f]{40}")


def _unsafe_path_values(response: Any) -> List[str]:
    """The values of a Hub response that huggingface_hub turns into cache paths (commit id and
    ETag headers; a repo's ``sha`` in an API answer) that are not plain ids: ["name: value", ...]."""
    bad = []
    for name in ("x-repo-commit", "etag", "x-linked-etag"):
        value = response.headers.get(name)
        if value is not None:
            plain = value.strip()
            plain = plain[2:] if plain.startswith("W/") else plain
            if not _SAFE_ID.fullmatch(plain.strip('"')):
                bad.append(f"{name}: {value!r}")
    if "/api/" in str(response.request.url) and "json" in response.headers.get("content-type", ""):
        response.read()
        try:
            data = response.json()
        except ValueError:
            data = None
        sha = data.get("sha") if isinstance(data, dict) else None
        if sha is not None and not (isinstance(sha, str) and _COMMIT_ID.fullmatch(sha)):
            bad.append(f"sha: {sha!r}")
    return bad


def _refuse_unsafe_paths(response: Any) -> None:
    """A response hook: refuse a Hub answer whose ids would become paths outside the cache."""
    bad = _unsafe_path_values(response)
    if bad:
        raise CheckpointError(f"the Hub at {response.request.url.host} answered ids that are not plain ids "
                              f"({'; '.join(bad)}); huggingface_hub would write files at paths built from them, "
                              f"outside its cache. Nothing was loaded; check HF_ENDPOINT (a mirror or proxy)")


#: The rate a Hub answer's body must keep up after a grace of :func:`hub_timeout` seconds
#: (:func:`_paced_body`; bytes per second; LRNNX_ZOO_HUB_MIN_RATE sets it, 0 for no floor).
DEFAULT_HUB_MIN_RATE = 16 * 1024
HUB_MIN_RATE_ENV = "LRNNX_ZOO_HUB_MIN_RATE"


def hub_min_rate() -> float:
    """Bytes per second a Hub download must keep up after a grace of :func:`hub_timeout` seconds: the
    env var LRNNX_ZOO_HUB_MIN_RATE when it is a number >= 0 (0: no floor), else 16 KiB/s."""
    try:
        rate = float(os.environ.get(HUB_MIN_RATE_ENV, ""))
    except ValueError:
        return DEFAULT_HUB_MIN_RATE
    return rate if math.isfinite(rate) and rate >= 0 else DEFAULT_HUB_MIN_RATE


class TrickledDownloadError(CheckpointError):
    """A Hub server sent a file's bytes slower than :func:`hub_min_rate` (:func:`_paced_body`)."""


def _paced_body(grace: float, rate: float) -> Callable[[Any], None]:
    """A response hook that cuts off a body falling behind ``rate`` bytes/s with ``grace`` seconds to
    spare: after t seconds of reading it must have received ``rate * (t - grace)`` bytes (so an early
    stall of up to ``grace`` seconds is made up by a link faster than the floor). httpx's timeouts
    bound each wait for the next bytes, so a server sending a byte every few seconds held a download
    for as long as it liked (a 1 kB config.json at one byte per 9 s: 2.5 hours). Plain-HTTP bodies
    only: huggingface_hub fetches Xet-backed files with hf_xet, outside its httpx session."""
    def paced(inner: Any, url: Any) -> Any:
        # the stream's own base class (httpx's or httpx2's SyncByteStream, or a custom client's):
        # httpx refuses to iterate a body that is not one
        base = next((c for c in type(inner).__mro__ if c.__name__ == "SyncByteStream"), None)
        if base is None:
            return inner

        class PacedStream(base):  # type: ignore[misc, valid-type]
            def __iter__(self) -> Iterator[bytes]:
                start, received = time.monotonic(), 0
                for chunk in inner:
                    received += len(chunk)
                    elapsed = time.monotonic() - start
                    if received < rate * (elapsed - grace):
                        raise TrickledDownloadError(
                            f"the Hub at {url.host} sent {url.path.rsplit('/', 1)[-1]!r} at {received / elapsed:.0f} "
                            f"bytes/s over {elapsed:.0f} s ({received} bytes), behind the {rate:g} bytes/s a "
                            f"download must keep up after {grace:g} s; nothing was loaded. Try again, check "
                            f"HF_ENDPOINT, or lower {HUB_MIN_RATE_ENV} (bytes/s, 0 for no floor) on a slow connection")
                    yield chunk

            def close(self) -> None:
                inner.close()
        return PacedStream()

    def pace(response: Any) -> None:
        if not response.is_stream_consumed:
            response.stream = paced(response.stream, response.request.url)
    return pace


#: How many :func:`hub_timeout` periods an answer's status line and headers may take in all, from the
#: first wait for the answer: each wait is bounded by the timeout, so a server sending a header byte
#: every few seconds held a download forever (a per-wait timeout never fires on a trickle).
HEADER_DEADLINE_PERIODS = 2.0

_header_deadline = threading.local()


class _HeaderDeadlineStream:
    """A network stream whose reads, while this thread's request is waiting for its answer's headers,
    wait no later than the deadline a request hook set (:func:`_set_header_deadline`)."""

    def __init__(self, inner: Any, timeout_error: type) -> None:
        self._inner, self._timeout_error = inner, timeout_error

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        deadline = getattr(_header_deadline, "at", None)
        if deadline is None:
            return self._inner.read(max_bytes, timeout)
        if deadline[0] is None:     # the first wait for the answer: an upload's body is sent by now
            deadline = _header_deadline.at = (time.monotonic() + deadline[1], deadline[1])
        left = deadline[0] - time.monotonic()
        if left <= 0:
            raise self._late(deadline[1])
        try:
            return self._inner.read(max_bytes, left if timeout is None else min(timeout, left))
        except self._timeout_error:
            if time.monotonic() >= deadline[0]:
                raise self._late(deadline[1]) from None
            raise

    def _late(self, seconds: float) -> Exception:
        return self._timeout_error(
            f"its answer's status line and headers were not complete after {seconds:g} s "
            f"({HEADER_DEADLINE_PERIODS:g} x HF_HUB_ETAG_TIMEOUT): a server or proxy sending them a few bytes at a "
            f"time")

    def start_tls(self, *args: Any, **kwargs: Any) -> "_HeaderDeadlineStream":
        return _HeaderDeadlineStream(self._inner.start_tls(*args, **kwargs), self._timeout_error)

    def __getattr__(self, name: str) -> Any:      # write, close, get_extra_info
        return getattr(self._inner, name)


class _HeaderDeadlineBackend:
    """A network backend handing out :class:`_HeaderDeadlineStream` s around another backend's."""

    def __init__(self, inner: Any, timeout_error: type) -> None:
        self.inner, self.timeout_error = inner, timeout_error

    def connect_tcp(self, *args: Any, **kwargs: Any) -> _HeaderDeadlineStream:
        return _HeaderDeadlineStream(self.inner.connect_tcp(*args, **kwargs), self.timeout_error)

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> _HeaderDeadlineStream:
        return _HeaderDeadlineStream(self.inner.connect_unix_socket(*args, **kwargs), self.timeout_error)

    def __getattr__(self, name: str) -> Any:      # sleep
        return getattr(self.inner, name)


def _watch_headers(client: Any) -> bool:
    """Give every connection pool of an httpx client (its transport and mounted proxies) the header
    deadline's backend; False where the client is not built that way (a custom client factory), which
    then keeps the per-wait timeouts only. The wrapper is inert outside :func:`bounded_hub_requests`."""
    transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
    watched = False
    for pool in (getattr(t, "_pool", None) for t in transports if t is not None):
        # the read timeout of the pool's own library (httpcore2 under huggingface_hub 2.x), which
        # the client maps to its timeout error
        library = sys.modules.get(type(pool).__module__.split(".")[0])
        timeout_error = getattr(library, "ReadTimeout", None)
        if not hasattr(pool, "_network_backend") or not isinstance(timeout_error, type):
            continue
        if not isinstance(pool._network_backend, _HeaderDeadlineBackend):
            pool._network_backend = _HeaderDeadlineBackend(pool._network_backend, timeout_error)
        watched = True
    return watched


def _set_header_deadline(seconds: float) -> Callable[[Any], None]:
    """A request hook arming this thread's header deadline: ``seconds`` from the first read of the
    answer (not from the request's start, which an upload's body may take minutes to follow); the
    response hook :func:`_clear_header_deadline` ends it once the headers are in."""
    def arm(request: Any) -> None:
        _header_deadline.at = (None, seconds)
    return arm


def _clear_header_deadline(response: Any = None) -> None:
    _header_deadline.at = None


@contextlib.contextmanager
def this_threads_hook(kind: str, hook: Callable[[Any], None]) -> Iterator[Any]:
    """While inside, ``hook`` sees the calling thread's huggingface_hub requests (``kind`` "request") or
    answers ("response"), and no other thread's: the client is the process's, shared by every thread
    (another thread's commit is not this push's). Yields the session it is on; removed on exit."""
    from huggingface_hub.utils import get_session

    session, this_thread = get_session(), threading.get_ident()

    def own(event: Any) -> None:
        if threading.get_ident() == this_thread:
            hook(event)
    hooks = session.event_hooks[kind]
    hooks.append(own)
    try:
        yield session
    finally:
        if own in hooks:
            hooks.remove(own)


@contextlib.contextmanager
def bounded_hub_requests() -> Iterator[float]:
    """While inside, no huggingface_hub request waits forever for a silent server (each wait for a
    connection or the next bytes is bounded), a server that trickles bytes over plain HTTP is cut off
    (an answer's headers must be complete :data:`HEADER_DEADLINE_PERIODS` x :func:`hub_timeout` seconds
    after the first wait for them, :func:`_watch_headers`; a body must keep up :func:`hub_min_rate` after
    :func:`hub_timeout` seconds, :func:`_paced_body`), and no answer's ids become paths outside the
    cache (:func:`_refuse_unsafe_paths`).

    huggingface_hub 2.x sends some requests (``repo_info`` inside ``snapshot_download``, tree
    listings) with ``timeout=None``, so a server that accepts the connection and never answers
    hangs the caller. A request hook on its shared session fills in :func:`hub_timeout` for every
    unset timeout; explicit timeouts are kept, and the hook is removed on exit.
    """
    from huggingface_hub.utils import get_session

    seconds, session = hub_timeout(), get_session()
    hooks, answers = session.event_hooks["request"], session.event_hooks["response"]
    timeouts, rate = _timeout_filler(seconds), hub_min_rate()
    arm = _set_header_deadline(HEADER_DEADLINE_PERIODS * seconds) if _watch_headers(session) else None
    pace = _paced_body(seconds, rate) if rate > 0 else None
    ours = [h for h in (timeouts, arm) if h is not None]
    ended = [_clear_header_deadline] if arm else []
    theirs = [h for h in (pace, _refuse_unsafe_paths) if h is not None]   # paced first: the second reads API answers
    hooks.extend(ours)
    answers[:0] = ended         # before any hook that reads a body, which the deadline must not cut
    answers.extend(theirs)
    try:
        yield seconds
    finally:
        _clear_header_deadline()
        for hook_list, added in ((hooks, ours), (answers, ended + theirs)):
            for hook in added:
                if hook in hook_list:
                    hook_list.remove(hook)


def _download(repo_id: str, revision: Optional[str], cache_dir: Optional[PathLike], local_files_only: bool,
              token: Optional[Union[str, bool]], shipped: List[str], need_weights: bool = True
              ) -> Tuple[Path, Dict[str, Any]]:
    """Download a Hub checkpoint config.json first: another library's repo (a config.json beside
    hundreds of MB of model.safetensors) is refused on its config before its weights are fetched.
    The weights (unless ``need_weights`` is False) and the card then come from the commit the first
    download resolved, so a push in between cannot pair one commit's config with another's weights."""
    constants = hub_constants()
    online = not (local_files_only or constants.HF_HUB_OFFLINE)
    # The files' sizes first: a 400 MB config.json or card, or weights far larger than the config's
    # model, were downloaded in full and only then refused (or kept: a card is not read to load)
    sizes, listed = _repo_file_sizes(repo_id, revision, token) if online else ({}, None)
    _check_size(repo_id, CONFIG_NAME, sizes, MAX_CONFIG_BYTES, "a config")
    folder = _fetch(repo_id, revision, [CONFIG_NAME], cache_dir, local_files_only, token, shipped)
    commit = folder.name if len(folder.name) == 40 else None
    if listed and commit and commit != listed:
        # pushed to since the listing: its sizes are another commit's, and compared with this one's
        # files they refused them as cut short
        sizes, _ = _repo_file_sizes(repo_id, commit, token)
        _check_size(repo_id, CONFIG_NAME, sizes, MAX_CONFIG_BYTES, "a config")
    folder = _fetch_whole(folder, [CONFIG_NAME], sizes, repo_id, commit or revision, cache_dir, token, shipped)
    _check_snapshot(folder, [CONFIG_NAME], repo_id, commit or revision, local_files_only, token)
    config = read_config(folder, need_weights=False)
    if online:
        # offline, that snapshot folder is all the cache has of this commit: nothing more to fetch
        card = [CARD_NAME] if sizes.get(CARD_NAME, 0) <= MAX_CARD_BYTES else []
        if need_weights:
            _check_size(repo_id, WEIGHTS_NAME, sizes, _weights_bound(config), "the weights of its config's model")
        else:       # `lrnnx-zoo info` reads the card: say why it is not fetched
            _check_size(repo_id, CARD_NAME, sizes, MAX_CARD_BYTES, "a model card")
        rest = [WEIGHTS_NAME] + card if need_weights else card
        folder = _fetch(repo_id, commit or revision, rest, cache_dir, local_files_only, token, shipped)
        folder = _fetch_whole(folder, rest, sizes, repo_id, commit or revision, cache_dir, token, shipped)
    if need_weights:
        _check_snapshot(folder, [CONFIG_NAME, WEIGHTS_NAME], repo_id, commit or revision, local_files_only, token)
    source = {"type": "hub", "repo_id": repo_id, "revision": revision or "main", "commit": commit,
              "path": str(folder)}
    return folder, source


#: A model card larger than this is not downloaded (lrnnx-zoo's are a few kB).
MAX_CARD_BYTES = 16 << 20
#: Room for a weights file's header beyond its tensors (names, shapes, metadata).
WEIGHTS_HEADER_BYTES = 100 << 20


def _repo_file_sizes(repo_id: str, revision: Optional[str],
                     token: Optional[Union[str, bool]]) -> Tuple[Dict[str, int], Optional[str]]:
    """({file name: bytes}, commit id) of a Hub repo at ``revision``, from one metadata request (({},
    None) when the server gives no sizes or the request fails: the download that follows says what is
    wrong; None for a commit id that is not one)."""
    from huggingface_hub import HfApi
    try:
        with bounded_hub_requests():
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token)
    except CheckpointError:         # an answer that would write outside the cache
        raise
    except Exception:               # noqa: BLE001 - only a pre-check: snapshot_download reports the failure
        return {}, None
    sha = getattr(info, "sha", None)
    sizes = {f.rfilename: int(f.size) for f in (info.siblings or []) if isinstance(getattr(f, "size", None), int)}
    return sizes, (sha if isinstance(sha, str) and _COMMIT_ID.fullmatch(sha) else None)


def _weights_bound(config: Dict[str, Any]) -> Optional[int]:
    """The most bytes a weights file of ``config``'s model may hold (float64 values of its upper parameter
    estimate, and a header), or None when the config cannot say (loading will report why)."""
    from .models import ModelConfig
    try:
        return 8 * ModelConfig.from_dict(config["model"]).parameter_estimate() + WEIGHTS_HEADER_BYTES
    except (TypeError, ValueError, LookupError, OverflowError):
        return None


def _check_size(repo_id: str, name: str, sizes: Dict[str, int], limit: Optional[int], what: str) -> None:
    """Refuse to download ``name`` from ``repo_id`` when the Hub says it is larger than ``limit`` bytes."""
    size = sizes.get(name)
    if size is not None and limit is not None and size > limit:
        raise CheckpointError(f"Hub repo {repo_id!r}: {name} is {size / 1e6:.3g} MB, more than {what} holds "
                              f"({limit / 1e6:.3g} MB at most); it was not downloaded")


def _fetch_whole(folder: Path, files: List[str], sizes: Dict[str, int], repo_id: str, revision: Optional[str],
                 cache_dir: Optional[PathLike], token: Optional[Union[str, bool]], shipped: List[str]) -> Path:
    """``folder`` once every one of ``files`` in it has the size the repo's listing gives (``sizes``):
    a file that does not is downloaded again, once. A body cut short with a matching Content-Length
    passed huggingface_hub's checks and stayed in the cache, so every later load failed on the
    truncated file, also after the server was fixed."""
    def short(folder: Path) -> List[str]:
        return [f for f in files if f in sizes and (folder / f).is_file() and (folder / f).stat().st_size != sizes[f]]
    again = short(folder)
    if not again:
        return folder
    folder = _fetch(repo_id, revision, again, cache_dir, False, token, shipped, force=True)
    still = short(folder)
    if still:
        got = ", ".join(f"{f}: {(folder / f).stat().st_size:,} bytes, listed as {sizes[f]:,}" for f in still)
        raise CheckpointError(f"could not download {repo_id!r}: the Hub at its endpoint sent files of other sizes than "
                              f"its listing gives, twice ({got}); nothing was loaded. Try again, or check HF_ENDPOINT "
                              f"(a mirror or proxy)")
    return folder


_in_caller = threading.local()
_in_caller_lock = threading.Lock()
#: Where huggingface_hub finds the pooled map it transfers files with, and the names it calls it by
#: (2.x's own, 1.x's tqdm's): snapshot_download's module imports it; 2.x's LFS upload
#: (_commit_api._upload_lfs_files) imports it from utils when called, 1.x's from tqdm with the module.
_POOLED_MAPS = (("huggingface_hub._snapshot_download", ("hf_thread_map", "thread_map")),
                ("huggingface_hub._commit_api", ("hf_thread_map", "thread_map")),
                ("huggingface_hub.utils", ("hf_thread_map",)))


def _map_in_caller(pooled: Callable[..., List[Any]]) -> Callable[..., List[Any]]:
    """``pooled`` (a thread-pool map huggingface_hub transfers files with), mapping in the calling
    thread, one item after another, while this thread is inside :func:`transfers_in_this_thread`, and in
    the pool otherwise (another library's transfers, another thread's)."""
    @functools.wraps(pooled)
    def mapped(fn: Callable[[Any], Any], iterable: Iterable[Any], *args: Any, **kwargs: Any) -> List[Any]:
        if not getattr(_in_caller, "active", False):
            # the caller's arguments as given: tqdm's thread_map (1.x) takes an omitted tqdm_class for
            # its own bar, an explicit None for a class to call
            return pooled(fn, iterable, *args, **kwargs)
        from huggingface_hub.utils import tqdm as hub_tqdm
        kwargs.pop("max_workers", None)
        bar_class = kwargs.pop("tqdm_class", None) or hub_tqdm
        items = list(iterable)
        kwargs.setdefault("total", len(items))
        results = []
        with bar_class(**kwargs) as bar:    # "Fetching N files", "Upload N LFS files", as before
            for item in items:
                results.append(fn(item))
                bar.update(1)
        return results
    mapped.in_caller = True     # type: ignore[attr-defined]
    return mapped


@contextlib.contextmanager
def transfers_in_this_thread() -> Iterator[bool]:
    """While inside, ``snapshot_download`` and an upload's LFS files (``upload_folder``,
    ``create_commit``) called from this thread move their files in this thread, one after another;
    True when both do (False: a huggingface_hub without the maps it wraps).

    huggingface_hub moves them with a pool of threads, whose shutdown waits for the file in flight: a
    Ctrl-C (or the CLI's SIGTERM) returned only once that file had arrived or failed (a 47.5 kB
    model.safetensors downloaded at 2 kB/s: 23 s after the Ctrl-C; an export's two graph and weights
    files uploaded at 2 kB/s: 83 s, the workers retrying on; hundreds of MB on a slow link: minutes).
    In the calling thread the KeyboardInterrupt ends the transfer at once. A download's file in
    progress is deleted by huggingface_hub 2.x (``<etag>.<random>.incomplete``, never taken for the
    blob) and downloaded again by the next call; an upload stops before its commit, which is what
    publishes files, so the repo is left as it was and the next push uploads them again. A
    checkpoint holds one weights file (uploaded in the caller already), an export two, which now go one
    after the other: as fast where the link's total rate is the limit, up to twice as long where each
    connection has its own (two 2 MB files at 4 MB/s a connection: 0.82 s -> 1.37 s). Other threads'
    calls (another library's) keep the pool."""
    import importlib
    found = set()
    with _in_caller_lock:       # wrapped once, for good: restoring it could undo another thread's wrapping
        for module_name, names in _POOLED_MAPS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:     # a huggingface_hub laid out otherwise: its transfers keep the pool
                continue
            for name in names:
                pooled = getattr(module, name, None)
                if callable(pooled):
                    if not getattr(pooled, "in_caller", False):
                        setattr(module, name, _map_in_caller(pooled))
                    found.add(module_name)
    wrapped = "huggingface_hub._snapshot_download" in found and len(found) > 1
    before = getattr(_in_caller, "active", False)
    _in_caller.active = True
    try:
        yield wrapped
    finally:
        _in_caller.active = before


def _fetch(repo_id: str, revision: Optional[str], files: List[str], cache_dir: Optional[PathLike],
           local_files_only: bool, token: Optional[Union[str, bool]], shipped: List[str], force: bool = False) -> Path:
    """The cache's snapshot folder of ``repo_id`` at ``revision``, with those of ``files`` the repo
    holds downloaded into it, in this thread (:func:`transfers_in_this_thread`: a Ctrl-C stops it at
    once); huggingface_hub's errors become CheckpointErrors that say what to do."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        with bounded_hub_requests() as seconds, transfers_in_this_thread():
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                          local_files_only=local_files_only, allow_patterns=files,
                                          force_download=force,
                                          library_name=LIBRARY, library_version=__version__,
                                          etag_timeout=seconds))
    except GatedRepoError as exc:       # a RepositoryNotFoundError too, but the repo is there
        raise CheckpointError(
            f"Hub repo {repo_id!r} is gated: its owners grant access on its page at {constants.ENDPOINT}/{repo_id}; "
            f"once granted, {_token_advice()}") from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"no checkpoint {repo_id!r}: not a local folder, not a shipped model ({_known(repo_id, shipped)}), "
            f"and the Hub at {constants.ENDPOINT} has no such repo (if it is private or gated, {_token_advice()})"
        ) from exc
    except RevisionNotFoundError as exc:
        main = "leave --revision out for main" if in_command_line() else "revision=None for main"
        raise CheckpointError(f"Hub repo {repo_id!r} has no revision {revision or 'main'!r}; pass a branch, tag or "
                              f"commit id that exists ({main})") from exc
    except LocalEntryNotFoundError as exc:
        where = (f"{repo_id!r} is not a local folder or a shipped model ({_known(repo_id, shipped)}), and as a "
                 f"Hub id it is not in the Hub cache at revision {revision or 'main'}")   # it may be a typo, not a Hub id
        if local_files_only or constants.HF_HUB_OFFLINE:
            why = given("local_files_only", True) if local_files_only else "offline mode (HF_HUB_OFFLINE)"
            cache = ("set HF_HUB_CACHE to the cache that holds it" if in_command_line()
                     else "pass cache_dir= where it is cached")
            raise CheckpointError(f"{where}, which {why} forbids downloading; download it once online, or "
                                  f"{cache}") from exc
        if _http_status(exc.__cause__) is not None:     # reached, and it said no (500, 403, ...)
            raise CheckpointError(f"{repo_id!r} is not a local folder or a shipped model "
                                  f"({_known(repo_id, shipped)}), and {_refusal(exc.__cause__, repo_id)}") from exc
        raise CheckpointError(f"{repo_id!r} is not a local folder or a shipped model ({_known(repo_id, shipped)}), "
                              f"and the Hub at {constants.ENDPOINT} could not be reached ({exc.__cause__ or exc}; "
                              f"each wait for a connection or an answer is at most {hub_timeout():g} s, set by HF_HUB_ETAG_TIMEOUT); "
                              "check the name, or your connection / HF_ENDPOINT") from exc
    except CheckpointError:         # our own hooks' (unsafe ids, a trickle): already worded
        raise
    except HfHubHTTPError as exc:   # huggingface_hub re-raises a 401 as it came
        raise CheckpointError(f"could not download {repo_id!r}: {_refusal(exc, repo_id)}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        # an answer no Hub gives: a captive portal's HTML page (JSONDecodeError), a listing without
        # "path" (KeyError), a size in the terabytes (huggingface_hub's "install hf_xet" ValueError)
        raise CheckpointError(f"could not download {repo_id!r}: the server at {constants.ENDPOINT} answered "
                              f"something a Hub does not send ({unexpected_answer(exc)}); nothing was loaded. "
                              f"Check HF_ENDPOINT, or a proxy or captive portal between you and the Hub") from exc
    except HTTPError as exc:        # the transport's own: a connection dropped mid-request or mid-download
        raise CheckpointError(f"could not download {repo_id!r}: the connection to the Hub at {constants.ENDPOINT} "
                              f"failed ({type(exc).__name__}: {exc}); nothing was loaded. Try again, or check your "
                              f"connection / HF_ENDPOINT") from exc
    except OSError as exc:          # the cache cannot be written: a file in its place, no permission
        cache = cache_dir or constants.HF_HUB_CACHE
        if _cache_writable(Path(cache)) and not isinstance(exc, (PermissionError, FileExistsError, NotADirectoryError)):
            # the cache is fine: the download itself failed (a size the server announced and did not
            # send was blamed on the cache, advising another one)
            said = " ".join(str(exc).split())     # huggingface_hub's message spans lines
            raise CheckpointError(f"could not download {repo_id!r}: {said}; nothing was loaded. Try again, or check "
                                  f"HF_ENDPOINT (a mirror or proxy)") from exc
        fix = "set HF_HUB_CACHE to a writable folder" if in_command_line() else ("pass cache_dir= a writable "
                                                                                  "folder, or set HF_HUB_CACHE")
        raise CheckpointError(f"cannot use the Hub cache at {cache} to download {repo_id!r} ({exc}); {fix}") from exc


def unexpected_answer(exc: BaseException) -> str:
    """An exception from reading a malformed Hub answer, in one short line."""
    said = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {said[:200]}" if said else type(exc).__name__


def _cache_writable(cache: Path) -> bool:
    """Whether files can be made in ``cache`` (or, not made yet, in its nearest existing parent)."""
    while not cache.exists() and cache.parent != cache:
        if cache.is_symlink() or cache.parent.is_file():
            return False
        cache = cache.parent
    return cache.is_dir() and os.access(cache, os.W_OK | os.X_OK)


def _check_snapshot(folder: Path, needed: List[str], repo_id: str, revision: Optional[str], local_files_only: bool,
                    token: Optional[Union[str, bool]]) -> None:
    """Raise unless the snapshot ``folder`` of ``repo_id`` at ``revision`` holds ``needed``: offline,
    saying what the cache lacks; online, naming what the repo holds (no config.json, pickled weights)."""
    from huggingface_hub import constants
    if all((folder / f).is_file() for f in needed):
        return
    where = revision or "main"
    if local_files_only or constants.HF_HUB_OFFLINE:
        # a snapshot folder from an earlier download of single files: the repo may well hold the rest
        cached = _listing(folder)
        missing = [f for f in needed if f not in cached]
        why = given("local_files_only", True) if local_files_only else "offline mode (HF_HUB_OFFLINE)"
        raise CheckpointError(
            f"the Hub cache holds, of {repo_id!r} at {where}, only {', '.join(cached) or 'nothing'}: "
            f"{' and '.join(missing)} was not downloaded, and {why} forbids downloading it; load it once online "
            "to complete the cache")
    files = _remote_files(repo_id, revision, token)
    _check_present(f"Hub repo {repo_id!r} at {where}", files if files is not None else _listing(folder))


def _http_status(exc: Any) -> Optional[int]:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _refusal(exc: Any, repo_id: str) -> str:
    """What the Hub answered (an HfHubHTTPError), worded for an error message, with the fix."""
    from huggingface_hub import constants
    status = _http_status(exc)
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if status in (401, 403):
        return (f"the Hub at {constants.ENDPOINT} refused access to {repo_id!r} (HTTP {status}: {reason}); if it "
                f"is private or gated, {_token_advice()}")
    return (f"the Hub at {constants.ENDPOINT} answered HTTP {status} ({reason}); try again later, or check "
            "HF_ENDPOINT")


def _token_advice() -> str:
    """How to give the Hub a token with read access, in the caller's words (the CLI has no token flag)."""
    if in_command_line():
        return "log in with `hf auth login` (or set HF_TOKEN) with read access"
    return "pass token= with read access (or log in: `hf auth login`)"


def loadable_source(source: Any) -> Optional[str]:
    """What to pass to from_pretrained to load a recorded source again: the ``source`` dict that
    :func:`resolve_checkpoint` returns (shipped name, Hub repo id, folder path), or its one-line
    description ("shipped:NAME", "hf://REPO@REV", a path); None for an in-memory model and for
    "local:NAME" (a folder's name without its path, as exported graphs describe a local checkpoint)."""
    if isinstance(source, dict):
        return source.get("name") or source.get("repo_id") or source.get("path")
    if not isinstance(source, str) or source.startswith(("in-memory", "local:")):   # local: a folder's name only
        return None
    if source.startswith("shipped:"):
        return source[len("shipped:"):]
    if source.startswith("hf://"):
        return source[len("hf://"):].split("@")[0]
    return source


def _check_not_shadowing(path: Path, name: str, shipped: Path) -> None:
    """A local folder named like a shipped model wins the lookup; if it is no checkpoint, say so and
    say how to reach the shipped one instead of reporting what the folder lacks."""
    try:
        read_config(path)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{name!r} names both the folder {path.resolve()} and a shipped model; the local folder shadows "
            f"the shipped one and is not a loadable checkpoint: {exc}. To load the shipped model, pass its "
            f"path: from_pretrained({str(shipped)!r}), or run from another directory") from exc


def _remote_files(repo_id: str, revision: Optional[str], token: Any) -> Optional[List[str]]:
    from huggingface_hub import HfApi
    try:
        with bounded_hub_requests():
            return HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except Exception:  # only used to word an error; the cached listing is the fallback
        return None


def _listing(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _pickle_message(file: str, where: str = "") -> str:
    return (f"refusing to load {file}{where}: pickled weights ({Path(file).suffix}) can run arbitrary code when "
            "loaded. " + _conversion_advice())


def _conversion_advice() -> str:
    return ("lrnnx-zoo loads only model.safetensors. If you trust the file, convert it once: "
            "`sd = torch.load(PATH, weights_only=True); safetensors.torch.save_file(sd, 'model.safetensors')`, "
            "or rebuild the model and call model.save_pretrained(DIR)")


def _check_present(where: str, files: List[str]) -> None:
    """Raise if config.json or model.safetensors is missing from ``files``, naming what is there."""
    listed = ", ".join(files) or "nothing"
    if CONFIG_NAME not in files:
        raise CheckpointError(f"{where} has no {CONFIG_NAME}, so it is not an lrnnx-zoo checkpoint; it holds: "
                              f"{listed}. Save checkpoints with model.save_pretrained(DIR)")
    if WEIGHTS_NAME not in files:
        pickles = [f for f in files if Path(f).suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(_pickle_message(pickles[0], f" in {where}") + f"; it holds: {listed}")
        raise CheckpointError(f"{where} has no {WEIGHTS_NAME}; it holds: {listed}")


# -- loading -----------------------------------------------------------------------------------
def read_config(folder: Path, need_weights: bool = True) -> Dict[str, Any]:
    """Parse and check ``folder/config.json`` (presence, JSON, library, format version, kind), and that
    ``folder`` holds model.safetensors unless ``need_weights`` is False (a Hub download checks the
    config before it fetches the weights)."""
    files = _listing(folder)
    if CONFIG_NAME not in files:
        _check_present(str(folder), files)  # raises, naming what the folder holds
    config = _parse_config(folder / CONFIG_NAME)
    path = folder / CONFIG_NAME
    if isinstance(config, dict) and config.get("kind") == EXPORT_KIND:
        origin = loadable_source(config.get("source_checkpoint") or config.get("source"))
        raise CheckpointError(
            f"{folder} is an export folder ({config.get('format') or 'a'} step graph written by `lrnnx-zoo export`, "
            f"kind={EXPORT_KIND!r}), not a checkpoint: it has no {WEIGHTS_NAME} to build a SequenceModel from. Run it "
            f"with lrnnx_zoo.export (e.g. OnnxStreamer), or load the checkpoint it came from"
            + ((f": {origin}" if in_command_line() else f": from_pretrained({origin!r})") if origin
               else " (see its config.json)"))
    if need_weights:
        _check_present(str(folder), files)
    if not isinstance(config, dict) or config.get("library") != LIBRARY:
        raise CheckpointError(f"{path} is not an lrnnx-zoo config ({library_field(config)}, expected "
                              f"{LIBRARY!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: format_version must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version} (written by lrnnx-zoo {config.get('library_version')}); this "
            f"lrnnx-zoo {__version__} reads format_version <= {FORMAT_VERSION}. Upgrade: pip install -U lrnnx-zoo")
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' section (the ModelConfig); re-save the checkpoint")
    plugin = config.get("plugin")
    fields = [("family", "a str", str), ("plugin", "a dict (name, distribution, version)", dict),
              ("metrics", "a dict of metric name -> value", dict), ("task", "a str", str),
              ("command", "a str", str), ("notes", "a str", str),   # read by evaluate and by a re-save
              (STATE_DIGEST_KEY, "a str", str)]
    fields += [(f"plugin.{k}", "a str or null", str) for k in ("name", "distribution", "version")
               if isinstance(plugin, dict)]      # the registry matches them as text
    for key, expected, allowed in fields:
        section, _, field = key.rpartition(".")
        value = (config[section] if section else config).get(field)
        if value is not None and not isinstance(value, allowed):
            raise CheckpointError(f"{path}: '{key}' must be {expected}, got {value!r} "
                                  f"({type(value).__name__}); re-save the checkpoint")
    bad = _non_finite(config["model"], "model")
    if bad is not None:
        where, value = bad
        raise CheckpointError(f"{path}: {where} is {json.dumps(value)}, expected a finite number (NaN and "
                              "Infinity are not JSON, and save_pretrained never writes them; a NaN lr or wd would "
                              "make the first training step's weights NaN); fix config.json or re-save the checkpoint")
    layer = config["model"].get("layer")
    if not isinstance(layer, str):
        raise CheckpointError(f"{path}: model.layer must be a str (a registered layer name), got {layer!r} "
                              f"({type(layer).__name__}); re-save the checkpoint")
    family = config.get("family")
    if family is not None and layer is not None and family != layer.rpartition(":")[2]:
        # save_pretrained writes the layer's name as the family; which of the two is the model?
        raise CheckpointError(f"{path}: 'family' is {family!r} but model.layer is {layer!r}; they must name the "
                              "same layer (family is the layer's name without a 'plugin:' prefix). Fix "
                              "config.json or re-save the checkpoint")
    return config


def _non_finite(value: Any, where: str) -> Optional[Tuple[str, float]]:
    """(dotted path, value) of the first NaN or infinity in ``value`` (JSON data), None if there is none."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")
        if found is not None:
            return found
    return None


def library_field(config: Any) -> str:
    """What a config.json says of its library, for an error: "library='transformers'", "no 'library'
    field" (a None would read as if it named one), or what the file holds instead of an object."""
    if not isinstance(config, dict):
        return f"a JSON {type(config).__name__}, not an object"
    return f"library={config['library']!r}" if config.get("library") is not None else "no 'library' field"


def peek_config(path: Path) -> Optional[Dict[str, Any]]:
    """``path`` (a config.json) as a dict, or None when it is missing, unreadable or not a JSON
    object: for deciding what a folder holds before writing over it, where :func:`read_config`'s
    errors would be the wrong answer. One larger than :data:`MAX_CONFIG_BYTES` (no config from_pretrained
    reads) is not read into memory: it is None, as unreadable."""
    if not Path(path).is_file():     # a FIFO would be waited on, /dev/zero read forever
        return None
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:    # a 3 GB (sparse) file was read whole
            return None
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def _check_regular_file(path: Path, expected: str) -> None:
    """Refuse anything but a regular file (links followed) before opening it: a folder, a broken link,
    and a FIFO or device, which open() waits on (safetensors even holding the GIL) or reads forever."""
    if path.is_file():
        return
    if path.is_symlink() and not path.exists():
        given = f"a link to {os.readlink(path)}, which does not exist"
    elif path.is_dir():
        given = "a folder"
    else:
        given = "not a regular file (" + ("a FIFO" if stat.S_ISFIFO(path.stat().st_mode) else "a device or socket") + ")"
    raise CheckpointError(f"{path} is {given}, expected {expected}; re-save or re-download the checkpoint")


#: config.json is a few kB (with long notes, some hundred): a larger one is not read into memory.
MAX_CONFIG_BYTES = 16 << 20


def _unique_keys(path: Path) -> Callable[[List[Tuple[str, Any]]], Dict[str, Any]]:
    """A json object_pairs_hook refusing a key given twice: json keeps the last, other readers
    (the Hub's, an editor's) may show the first, so which one the model was saved with is unknown."""
    def build(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        found: Dict[str, Any] = {}
        for key, value in pairs:
            if key in found:
                raise CheckpointError(f"{path} repeats the key {key!r} in one object, so which value counts "
                                      "depends on the reader; keep one of them, or re-save the checkpoint")
            found[key] = value
        return found
    return build


def _parse_config(path: Path) -> Any:
    _check_regular_file(path, "a JSON file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is {size / 1e6:.0f} MB, expected a config of at most "
                              f"{MAX_CONFIG_BYTES / 1e6:.0f} MB (a few kB when saved by lrnnx-zoo); it is not read. "
                              "Re-save or re-download the checkpoint")
    try:
        # utf-8-sig: a BOM, as editors on Windows write, is no reason to refuse a config
        return json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_keys(path))
    except CheckpointError:     # a ValueError, from _unique_keys
        raise
    except RecursionError as exc:
        raise CheckpointError(f"{path} is not valid JSON for a config (nested too deeply to parse); re-save or "
                              "re-download the checkpoint") from exc
    except (UnicodeDecodeError, ValueError) as exc:     # ValueError: also an integer of over 4300 digits
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-save or re-download the checkpoint") from exc
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); check it is a readable JSON file") from exc


def _layer_name(config: Dict[str, Any], path: Path) -> str:
    """The registered layer to build, after checking an installed plugin provides the family."""
    layer = config["model"].get("layer", "")
    family = config.get("family") or layer.rpartition(":")[2]
    plugin = config.get("plugin") or {}
    reg = get_registry()
    owners = layer_owners(family)
    if not owners:
        name, dist = plugin.get("name"), plugin.get("distribution")
        source = (f"plugin {name!r} (distribution {release_of(plugin, 'not recorded')})" if name
                  else "a plugin it does not record")
        msg = (f"{path} needs the layer family {family!r} from {source}, but no loaded plugin "
               f"provides it (layers available: {', '.join(sorted(reg._layers)) or 'none'}).")
        info = reg.plugins.get(name) if name else None
        if dist == LIBRARY and not (info is not None and info.error):
            # already installed: installing again changes nothing, a newer release may
            msg += (f" The config says {LIBRARY} {plugin.get('version') or ''} provides it and this is {LIBRARY} "
                    f"{__version__}: upgrade it (pip install -U {LIBRARY}) and restart Python; if this is the "
                    "newest release, the config names a family lrnnx-zoo does not ship.").replace("  ", " ")
        else:
            msg += f" {f'Plugin {name!r}' if name else 'Its plugin (not recorded)'}, {unloaded_plugin_remedy(info, dist)}"
        raise CheckpointError(msg + ("" if DISABLE_AUTOLOAD_ENV in msg else autoload_note()))   # said once
    if ":" not in layer and len(owners) > 1 and plugin.get("name") in owners:
        return f"{plugin['name']}:{family}"  # several plugins claim the name: take the recorded one
    return layer


def _unreadable(path: Path, exc: BaseException) -> str:
    """Why the safetensors file ``path`` could not be read (``exc``, safetensors' error), and what to do:
    a file that is something else (torch.save's output, a Git LFS pointer) is named as such."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:   # e.g. no read permission, which safetensors reports as "No such file or directory"
        return (f"{path} cannot be read ({err.strerror or err}); expected a file this user may read: check its "
                "permissions (and those of the folders above it)")
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":   # torch.save: a zip archive, or a bare pickle
        return (f"{path} is not a safetensors file but pickled weights (torch.save), which can run arbitrary "
                "code when loaded; it is not loaded. " + _conversion_advice())
    if head.startswith(b"version https://git-lfs"):
        return (f"{path} is a Git LFS pointer ({path.stat().st_size} bytes), not the weights: the repo was cloned "
                "without Git LFS. Run `git lfs install && git lfs pull` in its folder, or load the Hub repo id "
                "instead of the clone")
    return (f"{path} is truncated or corrupt and cannot be read ({exc}); re-save it with model.save_pretrained, "
            "or if it came from the Hub delete its cached copy (see `hf cache --help`) and load it again")


def _read_header(path: Path) -> Dict[str, Tuple[int, ...]]:
    """{name: shape} of the tensors in a safetensors file, from its header alone (no tensor data is
    read), once safetensors has checked the header (offsets, sizes, cover of the file)."""
    from safetensors import SafetensorError, safe_open
    _check_regular_file(path, "a safetensors file")  # a folder was "truncated or corrupt (No such device ...)"
    try:
        # (a path that is no UTF-8 was refused, and reported as a truncated or corrupt file)
        with openable(path) as name, safe_open(name, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(_unreadable(path, exc)) from exc


@functools.lru_cache(maxsize=None)
def _pread_option() -> Dict[str, str]:
    """safetensors' load_file keyword that picks its pread reader, {} where it has none (before 0.8);
    read once, not on every load."""
    import inspect

    from safetensors.torch import load_file
    return {"backend": "pread"} if "backend" in inspect.signature(load_file).parameters else {}


def _read_weights(path: Path) -> Dict[str, Any]:
    """{name: tensor} of the safetensors file ``path``, read with pread(2) where safetensors offers it
    (0.8+): its default mmap reader kept ~56 B of Python memory per tensor and ~12 kB of the process
    per load of a 46-tensor checkpoint (+12 MB RSS per 1000 loads, a server loading models on demand),
    which reading the bytes does not (flat over 4000 loads)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    _check_regular_file(path, "a safetensors file")
    try:
        with openable(path) as name:
            return load_file(name, **_pread_option())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(_unreadable(path, exc)) from exc


def _mismatch(path: Path, parts: List[str], changed: Optional[str] = None) -> str:
    """The message for weights that do not fit their config's model; ``changed``: how the plugin that
    builds its layer changed since the save (:func:`~lrnnx_zoo.registry.plugin_change`), then the
    likelier cause than a config and weights of two models."""
    cause = (f"The plugin changed since the save, the likely cause: the checkpoint {changed}" if changed else
             "The weights and the config come from different models; re-save them together with "
             "model.save_pretrained(DIR)")
    return f"{path} does not match the model its config.json describes: " + "; ".join(parts) + f". {cause}"


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")      # a SequenceModel block's state names
_LAYER_KEY = re.compile(r"blocks\.(\d+)\.layer\.(.+)")      # (block, name inside its layer)


def _check_backbone(config: Any, shapes: Dict[str, Tuple[int, ...]], path: Path, changed: Optional[str] = None) -> None:
    """Compare the backbone sizes of ``config`` (a ModelConfig) with the weights file's header
    (``shapes``) before building: a model of a wrong d_model or n_layers was built in full (1.9 GB and
    5 s for d_model=7800, 50 s for 400 S4D blocks) and only then refused; one of a wrong d_state spent
    a minute in S4D's initialisation at d_state=3000 (ModelConfig.layer_shapes). Blocks are only
    counted when the file holds some (a block of parameterless modules has no state)."""
    expected = config.backbone_shapes()
    layer = config.layer_shapes()
    expected.update({k: layer[m.group(2)] for k, m in zip(shapes, map(_LAYER_KEY.match, shapes))
                     if m and int(m.group(1)) < config.n_layers and m.group(2) in layer})
    wrong = [f"{k}: file {shapes[k]} vs config {v}" for k, v in expected.items() if k in shapes and shapes[k] != v]
    parts = [f"shapes that disagree with config.json ({config.sizes()}): {_few(wrong, '; ')}"] if wrong else []
    blocks = {int(m.group(1)) for m in map(_BLOCK_KEY.match, shapes) if m}
    if blocks and blocks != set(range(config.n_layers)):
        parts.append(f"config.json gives n_layers={config.n_layers}, but the file holds {len(blocks)} blocks "
                     f"(numbered {min(blocks)} to {max(blocks)})")
    if not parts:
        # Every name the model will have, from a small stand-in: a 10-byte file (no tensors) beside a
        # config of 14000-wide LRU blocks built 1.5 GB, 20000 S4D blocks 13-31 s, before "missing keys"
        parts = _name_mismatch(config, shapes)
    if parts:
        raise CheckpointError(_mismatch(path, parts, changed))


def _name_mismatch(config: Any, shapes: Dict[str, Tuple[int, ...]], limit: int = 8) -> List[str]:
    """What :func:`_check_state` would say of the names, from a small stand-in of ``config``'s model
    (ModelConfig.state_names) instead of the model: ["missing keys [...]", "unexpected keys [...]"]
    as they apply, the first ``limit`` of each and how many more ([] when none, or when the stand-in
    cannot say). Counted, not listed, over the blocks: a config may give millions of them."""
    names = config.state_names()
    if names is None:
        return []
    top, per_block = names
    inside = set(per_block)
    unexpected = []
    for k in shapes:
        m = _BLOCK_KEY.match(k)
        if m is None and k not in top or m is not None and (int(m.group(1)) >= config.n_layers
                                                             or k[m.end():] not in inside):
            unexpected.append(k)
    missing = [k for k in top if k not in shapes]
    odd = set(unexpected)
    held = sum(1 for k in shapes if k not in odd and _BLOCK_KEY.match(k))
    total = len(missing) + config.n_layers * len(per_block) - held
    for i in range(config.n_layers):
        if len(missing) >= min(limit, total):
            break
        missing += [f"blocks.{i}.{k}" for k in per_block if f"blocks.{i}.{k}" not in shapes]
    return ([f"missing keys {_few(missing, limit=limit, total=total)}"] if missing else []) + \
        ([f"unexpected keys {_few(sorted(unexpected), limit=limit)}"] if unexpected else [])


def _check_state(expected: Dict[str, Any], found: Dict[str, Tuple[int, ...]], path: Path,
                 changed: Optional[str] = None) -> None:
    """Compare the model's state (``expected``) with the file's {name: shape} (``found``); ``changed``
    as for :func:`_mismatch`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: file {found[k]} vs config {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if found[k] != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing keys {_few(missing)}"] if missing else []
        parts += [f"unexpected keys {_few(unexpected)}"] if unexpected else []
        parts += [f"shapes that disagree with config.json: {_few(shapes, '; ')}"] if shapes else []
        raise CheckpointError(_mismatch(path, parts, changed))


def _few(items: List[str], sep: Optional[str] = None, limit: int = 8, total: Optional[int] = None) -> str:
    """The first ``limit`` of ``items`` and how many more (of ``total``, when items lists only the
    first of them): a size that differs in every block gave one line per tensor of every block
    (14 800 characters for 40 LRU blocks). Without ``sep`` a list."""
    shown, total = items[:limit], max(len(items), total or 0)
    text = sep.join(shown) if sep is not None else str(shown)
    return text + (f" ... and {total - limit} more" if total > limit else "")


def _dtype_kind(tensor: Any) -> str:
    if tensor.is_complex():
        return "complex"
    return "floating" if tensor.is_floating_point() else "integer or bool"


def _check_dtypes(expected: Dict[str, Any], found: Dict[str, Any], path: Path) -> None:
    """Refuse tensors whose kind of dtype differs from the model's: copying int or bool weights into
    float parameters would run with wrong values. Any float width goes into a float parameter."""
    wrong = [f"{k}: file {found[k].dtype} vs model {expected[k].dtype}" for k in sorted(expected)
             if _dtype_kind(found[k]) != _dtype_kind(expected[k])]
    if wrong:
        raise CheckpointError(f"{path} stores tensors of a dtype the model cannot take: {'; '.join(wrong)}. "
                              "Floating parameters need floating weights (float16, bfloat16, float32 or float64); "
                              "re-save the model with model.save_pretrained(DIR)")


def _check_no_nan(found: Dict[str, Any], path: Path, parameters: Iterable[str] = ()) -> None:
    """Refuse NaN weights (a diverged run, or a file damaged in a way its format cannot see): the model
    would load and then answer NaN to everything. Infinities too in ``parameters`` (the model's
    parameter names: an infinite weight answered NaN as well); buffers may keep a -inf mask. And a
    negative BatchNorm running variance (NaN outputs from its square root)."""
    params = set(parameters)
    bad = [k for k in sorted(found) if found[k].is_floating_point()
           and (not bool(found[k].isfinite().all()) if k in params else bool(found[k].isnan().any()))]
    if bad:
        raise CheckpointError(f"{path} holds NaN{' or infinite' if params & set(bad) else ''} weights in "
                              f"{_few(bad, ', ')}; the run that saved them diverged or the file is damaged. "
                              "Re-save the model from a good state with model.save_pretrained(DIR)")
    negative = [k for k in sorted(found) if k.endswith("running_var") and bool((found[k] < 0).any())]
    if negative:
        raise CheckpointError(f"{path} holds negative running variances in {_few(negative, ', ')} (batch norm "
                              "would answer NaN); the file is damaged. Re-save the model with model.save_pretrained(DIR)")


def _weights_dtype(tensors: Dict[str, Any]) -> Optional[Any]:
    """float64 when every floating tensor of the file is float64 (a model saved in double precision),
    else None: the model stays float32 and half-precision weights are cast up."""
    import torch
    floating = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return torch.float64 if floating == {torch.float64} else None


#: Bytes per piece hashed on its own (in parallel): the digest then takes a fraction of a load.
DIGEST_CHUNK = 4 << 20


def _digest_form(tensor: Any) -> Tuple[str, Any]:
    """``tensor`` on the CPU, with unit strides (:func:`_dense`), in the form its digest hashes, and that
    form's name: floating values as float32 when float32 holds every one exactly (so float16, bfloat16,
    and float64 after a lossless ``.double()``, hash like the float32 original), else float64; complex as
    (real, imag) pairs of those; integers as int64 (a file's int32 loaded into an int64 buffer is the
    same value)."""
    import torch
    t = tensor.detach().to("cpu").resolve_conj().resolve_neg()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point() and t.dtype != torch.float32:
        narrow = t.to(torch.float32)
        wide = narrow.to(t.dtype)
        if t.dtype == torch.float64 and not bool(((wide == t) | (wide.isnan() & t.isnan())).all()):
            return "float64", _dense(t)
        t = narrow
    elif not t.is_floating_point() and t.dtype not in (torch.bool, torch.uint64, torch.int64):
        t = t.to(torch.int64)
    return str(t.dtype).replace("torch.", ""), _dense(t)


def _dense(t: Any) -> Any:
    """t laid out with unit strides, so that its flat view can be read as bytes. ``contiguous()`` is not
    enough: a one-element axis of another stride counts as contiguous, and view(uint8) refused it (an
    S4D of d_model=1, d_state=2 held A_imag (1, 1) with strides (2, 2): it could not be saved or resampled)."""
    import torch
    t = t.contiguous()
    return t if t.reshape(-1).stride() in ((1,), ()) else t.clone(memory_format=torch.contiguous_format)


def _sha256(data: Any) -> bytes:
    import hashlib
    return hashlib.sha256(data).digest()


#: config.json's record of the weights file's contents (:func:`state_digest` of its tensors, as saved).
STATE_DIGEST_KEY = "weights_file_digest"


class WeightsDigestWarning(UserWarning):
    """A checkpoint's weights differ from those its config.json records having saved: the file was
    damaged, or converted (a float16 copy rounds them), since."""


def state_digest(state: Dict[str, Any]) -> str:
    """The digest of a state dict (name -> tensor), as :func:`weights_digest` computes it: names in
    sorted order, each tensor's shape and values in :func:`_digest_form`; hashed with SHA-256 in
    pieces of :data:`DIGEST_CHUNK` bytes on several threads (hashlib releases the GIL)."""
    import hashlib
    import torch
    header, pieces = hashlib.sha256(), []
    for name in sorted(state):
        kind, t = _digest_form(state[name])
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        header.update(f"{name}:{tuple(t.shape)}:{kind}:{len(data)};".encode())
        pieces += [data[i:i + DIGEST_CHUNK] for i in range(0, len(data), DIGEST_CHUNK)]
    workers = min(len(pieces), os.cpu_count() or 1, 8)
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(workers, thread_name_prefix="lrnnx-zoo-digest") as pool:
            hashed = list(pool.map(_sha256, pieces))
    else:
        hashed = [_sha256(piece) for piece in pieces]
    header.update(b"".join(hashed))
    return header.hexdigest()[:32]


def _substitutes(model: Any) -> Dict[str, Any]:
    """{state name: tensor} that modules ask to be hashed instead of their state (``digest_substitutes``)."""
    found: Dict[str, Any] = {}
    for prefix, module in model.named_modules():
        substitutes = getattr(module, "digest_substitutes", None)
        if callable(substitutes):
            found.update({f"{prefix}.{key}" if prefix else key: value for key, value in substitutes().items()})
    return found


def weights_digest(model: Any) -> str:
    """A fingerprint of ``model``'s state_dict (names, shapes, values), kept in ``checkpoint_info`` so a
    later save can tell whether the weights changed since (fine-tuning): then the checkpoint's metrics
    no longer describe them.  Values are hashed as float32 where that holds them exactly, else as
    float64 (:func:`_digest_form`), so a cast that loses nothing (``model.double()``, moving devices)
    keeps the digest; any changed value changes it.

    A module may define ``digest_substitutes()`` -> {its own state name: tensor} to be hashed instead
    (S4's kernel: C and L as they were before it extended its length, which keeps the system).
    """
    return state_digest({**model.state_dict(), **_substitutes(model)})


def weights_changed(model: Any, info: Dict[str, Any]) -> bool:
    """Whether ``model``'s weights differ from those ``info`` (its ``checkpoint_info``) was recorded
    for, e.g. after fine-tuning: then that run's metrics, command and notes no longer describe them.
    False when ``info`` records no digest (a model that never came from a checkpoint or a run)."""
    recorded = info.get("weights_digest")
    return recorded is not None and recorded != weights_digest(model)


def _outside_package() -> int:
    """The ``stacklevel`` of the first caller outside lrnnx_zoo, for warnings.warn called by this
    module's caller: a warning then points at the user's line, whichever of our entry points
    (lrnnx_zoo.from_pretrained, SequenceModel.from_pretrained, export, evaluate) led here."""
    frame, level = sys._getframe(2), 2          # 2: the caller of the function that warns
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "lrnnx_zoo":
        frame, level = frame.f_back, level + 1
    return level


#: How many times :func:`load_checkpoint` reads a folder that changed while it was read (another
#: process saving into it) before it gives up.
READ_ATTEMPTS = 4


def _folder_version(folder: Path) -> Tuple[Any, ...]:
    """What changes when a checkpoint folder is saved again: the folder's identity (a save swaps in a
    new folder) and its config's and weights' identity, size and modification time (an in-place save
    renames new files in); None for an entry that cannot be read."""
    def version(path: Path) -> Optional[Tuple[int, ...]]:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
    return version(folder), version(folder / CONFIG_NAME), version(folder / WEIGHTS_NAME)


def load_checkpoint(folder: Path, source: Optional[Dict[str, Any]] = None) -> "SequenceModel":
    """Build the model a checkpoint folder describes and load its weights strictly (eval mode).

    The config and the weights are read in several passes (config, the weights' header, the weights),
    so a folder saved again meanwhile (a training run writing its checkpoint while another process
    loads it) gave the config of one save and the weights of the next: a shape error blaming the
    file, or, with equal shapes, the new weights under the old config's metrics and a warning that
    the file was damaged. A read the folder changed under is read again (:data:`READ_ATTEMPTS`)."""
    def give(notes: List[Tuple[str, type]]) -> None:     # those of the read that counts, once
        for message, category in notes:
            warnings.warn(message, category, stacklevel=_outside_package())

    for _ in range(READ_ATTEMPTS):
        before, notes = _folder_version(folder), []
        try:
            model = _load_checkpoint_once(folder, source, notes)
        except CheckpointError:
            if _folder_version(folder) != before:
                continue
            give(notes)
            raise
        if _folder_version(folder) == before:
            give(notes)
            return model
    raise CheckpointError(f"{folder} changed while it was read, {READ_ATTEMPTS} times (another process saving into "
                          f"it, e.g. a training run's --out?): nothing was loaded. Load it once that process is "
                          f"done, or copy the folder first")


def _load_checkpoint_once(folder: Path, source: Optional[Dict[str, Any]],
                          notes: List[Tuple[str, type]]) -> "SequenceModel":
    """One read of :func:`load_checkpoint`: the model; the warnings it has to give are appended to
    ``notes`` (message, category), given once the read is known to be of one save."""
    import torch

    from .models import ModelConfig, SequenceModel

    config = read_config(folder)
    layer = _layer_name(config, folder / CONFIG_NAME)
    extras = config.get("extra_plugins")     # third-party initializers / backends its layers resolved
    where = loadable_source(source) or str(folder)      # a Hub id, not its cache snapshot's path
    changes = [c for c in [plugin_change(config.get("plugin") or {}, layer)] + extra_plugin_changes(extras) if c]
    notes += [(f"{where} {change}", PluginVersionWarning) for change in changes]
    # a weights mismatch under another plugin release is more likely the release's doing (a renamed or
    # reshaped parameter) than a config and weights of two models, which the mismatch said
    changed = changes[0] if changes else None
    absent = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in config["model"]]
    if absent:      # save_pretrained writes them all; a missing one would be read as its default
        defaults = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(ModelConfig)
                             if f.name in absent and f.default is not dataclasses.MISSING)
        raise CheckpointError(f"{folder / CONFIG_NAME}: the 'model' section lacks {', '.join(absent)}, which "
                              f"save_pretrained always writes; read as the defaults ({defaults or 'none'}) they "
                              f"could build another model than the weights were trained in (pooling, activation "
                              f"and norm leave the weights' shapes alone). Put them back, or re-save the checkpoint")
    try:
        model_config = ModelConfig.from_dict({**config["model"], "layer": layer})
    except (TypeError, ValueError, LookupError) as exc:
        raise CheckpointError(f"cannot build the model described by {folder / CONFIG_NAME}: {exc}"
                              f"{missing_extra_plugins(extras)}") from exc
    shapes = _read_header(folder / WEIGHTS_NAME)     # the file's shapes, read before anything is allocated
    _check_backbone(model_config, shapes, folder / WEIGHTS_NAME, changed)
    try:
        # built from a fork of torch's global generator: its random initial weights are all replaced by
        # the file's, and drawing them moved the caller's stream (torch.manual_seed(0); from_pretrained(...);
        # torch.randn(...) drew other numbers for each architecture loaded in between)
        with torch.random.fork_rng(devices=[]):
            model = SequenceModel(model_config)
    except (TypeError, ValueError, LookupError, RuntimeError, MemoryError) as exc:
        # RuntimeError: the allocator's, for sizes within the parameter budget whose initialisation is
        # not (S4D's HiPPO matrix is d_state x d_state)
        raise CheckpointError(f"cannot build the model described by {folder / CONFIG_NAME} "
                              f"({model_config.sizes()}): {exc}{missing_extra_plugins(extras)}") from exc
    state = model.state_dict()
    _check_state(state, shapes, folder / WEIGHTS_NAME, changed)
    tensors = _read_weights(folder / WEIGHTS_NAME)
    _check_dtypes(state, tensors, folder / WEIGHTS_NAME)
    _check_no_nan(tensors, folder / WEIGHTS_NAME, [name for name, _ in model.named_parameters()])
    # One hash of the weights for both digests: a freshly, strictly loaded model's state is the file's
    # (the digest form hashes a float16 file like its float32 upcast), with no digest substitutes yet.
    digest, recorded = state_digest(tensors), config.get(STATE_DIGEST_KEY)
    if recorded is not None and digest != recorded:
        # loaded all the same: a float16 copy is a conversion the loader supports; the user decides
        notes.append((f"{where}: its weights differ from those its config.json records saving ({STATE_DIGEST_KEY} "
                      f"{recorded}, the file's {digest}): {WEIGHTS_NAME} was damaged or converted "
                      f"since, so its recorded metrics may not hold; measure them with `lrnnx-zoo evaluate "
                      f"{where} --check`, or re-save the model", WeightsDigestWarning))
    dtype = _weights_dtype(tensors)
    if dtype is not None:
        model = model.to(dtype)
    try:
        model.load_state_dict(tensors, strict=True)
    except (ValueError, RuntimeError) as exc:     # a value a layer refuses (S4's stored length of -5)
        why = f". The plugin changed since the save, the likely cause: the checkpoint {changed}" if changed else ""
        raise CheckpointError(f"{folder / WEIGHTS_NAME} holds weights the model refuses: {exc}{why}") from exc
    model.eval()
    model.checkpoint_info = {**config, "source": source or {"type": "local", "path": str(folder.resolve())},
                             "weights_digest": digest}
    return model


def from_pretrained(name_or_path: PathLike, revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                    local_files_only: bool = False, token: Optional[Union[str, bool]] = None,
                    **changes: Any) -> "SequenceModel":
    """Load a :class:`~lrnnx_zoo.models.SequenceModel` from a folder, a shipped name or a Hub repo id.

    Looked up in that order; Hub repos download through huggingface_hub (its cache, ``revision``,
    ``local_files_only``, ``token``, ``HF_HUB_OFFLINE``). The model is returned in eval mode with
    ``model.checkpoint_info`` = the parsed config.json plus ``"source"`` (path, or repo id and commit)
    and ``"weights_digest"`` (:func:`weights_digest` of the loaded weights).

    ``changes`` (any of ``d_input``, ``d_output``, ``pooling``, ``dropout``) adapt the loaded model to
    another task, for fine-tuning: the checkpoint is loaded strictly as it is, then
    :meth:`~lrnnx_zoo.models.SequenceModel.reconfigure` replaces the encoder / decoder whose size
    changes by a freshly initialised one, and a
    :class:`~lrnnx_zoo.models.ReinitializedWeightsWarning` names the tensors not loaded from the
    checkpoint. A change of any other field (d_model, n_layers, ...) is refused before anything is
    read: those weights cannot fill another backbone.
    """
    if changes:
        from .models import check_adaptation
        check_adaptation(changes, "from_pretrained")
    folder, source = resolve_checkpoint(name_or_path, revision, cache_dir, local_files_only, token)
    model = load_checkpoint(folder, source)
    if changes:
        from .models import ReinitializedWeightsWarning
        was = {k: getattr(model.config, k) for k in changes}
        fresh = model.reconfigure(**changes)
        if fresh:
            shown = ", ".join(f"{k} {was[k]!r} -> {v!r}" for k, v in changes.items() if was[k] != v)
            warnings.warn(f"{loadable_source(source) or folder}: {', '.join(fresh)} were not loaded from the "
                          f"checkpoint but initialised afresh ({shown}); train the model before using it",
                          ReinitializedWeightsWarning, stacklevel=_outside_package())
    return model

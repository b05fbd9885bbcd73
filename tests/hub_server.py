"""A local, in-process server that speaks the Hugging Face Hub HTTP protocol, for tests.

``LocalHub`` runs a threaded :mod:`http.server` bound to ``127.0.0.1`` on an ephemeral port and
stores repositories (models, datasets, spaces) under a temporary folder. Each repository has
git-like revisions: branches (at least ``main``) and tags point to 40-hex commit ids, and each
commit is a full snapshot of the repository files. File contents are stored once, content-addressed
by sha256, under ``<root>/objects``; each repository's metadata is mirrored to
``<root>/repos/<type>s/<namespace>/<name>/repo.json``.

It serves what the installed ``huggingface_hub`` client (2.x, httpx2 based) uses, so that with
``HF_ENDPOINT=hub.url`` the following work unchanged:

* downloads: ``hf_hub_download`` (``HEAD``/``GET /{repo}/resolve/{rev}/{path}``, with ``X-Repo-Commit``,
  ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Content-Length`` and ``Range``),
  ``snapshot_download`` (``GET /api/models/{repo}/revision/{rev}`` then ``GET /api/models/{repo}/tree/{sha}``),
  revisions given as branch, tag, full or abbreviated commit id, ``refs/pr/N``;
* errors: 404 answers carry ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`` so the
  client raises ``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``RemoteEntryNotFoundError``;
* uploads: ``HfApi.create_repo`` (``POST /api/repos/create``), ``upload_file``/``upload_folder``/
  ``create_commit`` (``POST /api/{type}s/{repo}/preupload/{rev}``, ``POST .../commit/{rev}`` with NDJSON,
  and for files the server classifies as LFS the git-lfs batch API
  ``POST /{repo}.git/info/lfs/objects/batch`` + a basic-transfer ``PUT`` + verify);
* misc: ``model_info``/``repo_info``, ``list_repo_tree``/``list_repo_files``, ``get_paths_info``,
  ``list_repo_refs``, ``list_repo_commits``, ``create_branch``/``delete_branch``, ``create_tag``/
  ``delete_tag``, ``delete_repo``, ``whoami``, ``/api/validate-yaml`` (README.md uploads).

Xet: the server never sends ``X-Xet-*`` headers nor ``xetHash`` fields, so downloads always use
plain HTTP. For uploads the *client* decides on its own: any file the preupload endpoint classifies as
``"lfs"`` is pushed through Xet whenever the ``hf_xet`` package is installed, and this server does not
implement Xet (``/xet-write-token`` answers 404). Hence LFS uploads need ``HF_HUB_DISABLE_XET=1``
(read once at import into ``huggingface_hub.constants.HF_HUB_DISABLE_XET``); the ``local_hub`` fixture
sets both. Alternatively ``LocalHub(upload_mode="regular")`` makes every upload inline (base64 in the
commit NDJSON), which never involves Xet or LFS.

By default (``upload_mode="auto"``) a file is LFS when its name matches the usual ``.gitattributes``
patterns (``*.safetensors``, ``*.bin``, ``*.pt``, ...) or it is at least 10 MB, as on the Hub.

Tokens: any token is accepted and ``Authorization`` is optional (unless ``required_token`` is set);
every request is recorded (``hub.requests``, ``hub.tokens``) so tests can assert what was sent.
Private repositories (``create_repo(..., private=True)``) answer 401/RepoNotFound without a token.

Client configuration: ``huggingface_hub`` reads most settings once at import time into
``huggingface_hub.constants`` (``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``, ``HF_TOKEN_PATH``, ...), some modules copy them by name
(``utils._cache_manager.HF_HUB_CACHE``, ``utils._git_credential.ENDPOINT``, ...) and the module-level
``huggingface_hub.hf_api.api`` keeps its own ``endpoint``. :func:`configure_client` patches the
environment *and* all of these; :func:`offline` flips offline mode the same way.

Usage::

    def test_x(local_hub):                      # pytest fixture (function scoped)
        sha = local_hub.commit("org/m", {"config.json": b"{}"})
        path = hf_hub_download("org/m", "config.json", revision=sha)
        with local_hub.offline():
            hf_hub_download("org/m", "config.json")   # served from the cache

    with LocalHub() as hub, client_environment(hub, tmp_dir):   # without pytest fixtures
        ...

Slow links: :meth:`LocalHub.throttle` sends chosen files' bodies at a set rate (ranges too), and
:meth:`LocalHub.throttle_uploads` receives LFS uploads at one, for tests of what happens while a large
download or upload is in flight (an interrupt, a retry).

Boundedness: every connection has a socket timeout, request bodies are capped
(``max_body_bytes``), the request log is a bounded deque, the server never answers with codes the
client retries in a loop (429/5xx/"conflicting operation" 409) except for genuine server bugs (500,
recorded in ``hub.errors``), and :meth:`LocalHub.stop` shuts down open keep-alive connections and joins
all threads.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import hashlib
import http.server
import json
import os
import posixpath
import re
import shutil
import socket
import socketserver
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "DEFAULT_LFS_PATTERNS",
    "FileEntry",
    "HubError",
    "LocalHub",
    "RecordedRequest",
    "client_environment",
    "configure_client",
    "local_hub",
    "offline",
]

DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
    "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
    "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
    "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
"""Glob patterns (on the file's base name) that the server treats as git-LFS files in ``auto`` mode."""

DEFAULT_LFS_THRESHOLD = 10 * 1000 * 1000
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{7,39}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LFS_VERSION = "https://git-lfs.github.com/spec/v1"
_INTERNAL = ".local-hub"  # URL namespace of LFS transfer endpoints (repo namespaces cannot start with ".")
_THROTTLE_TICK = 0.05  # seconds between the chunks of a throttled body (LocalHub.throttle)


def _now_iso() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _git_blob_oid(data: bytes) -> str:
    header = f"blob {len(data)}\0".encode()
    return hashlib.sha1(header + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version {_LFS_VERSION}\noid sha256:{sha256}\nsize {size}\n".encode()


# ----------------------------------------------------------------------------------------------
# Data model
# ----------------------------------------------------------------------------------------------


class HubError(Exception):
    """An error answered to the client: HTTP status plus optional ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None,
                 body: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.body = dict(body or {})


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of a commit snapshot. ``oid`` is the git blob id (of the LFS pointer for LFS files)."""

    sha256: str
    size: int
    lfs: bool
    oid: str

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))


@dataclasses.dataclass
class _Commit:
    id: str
    parents: list[str]
    title: str
    message: str
    date: str
    files: dict[str, FileEntry]


@dataclasses.dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    commits: dict[str, _Commit] = dataclasses.field(default_factory=dict)
    pr_count: int = 0

    @property
    def url_path(self) -> str:
        return _URL_PREFIXES[self.repo_type] + self.repo_id


@dataclasses.dataclass
class RecordedRequest:
    """A request as received by the server (headers with lower-cased names)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    token: str | None
    status: int | None = None
    body_size: int = 0


# ----------------------------------------------------------------------------------------------
# HTTP plumbing
# ----------------------------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True
    allow_reuse_address = False
    request_queue_size = 64

    def __init__(self, hub: LocalHub):
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's getfqdn() (a DNS lookup that can be slow in sandboxes).
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def process_request(self, request, client_address):  # type: ignore[override]
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # type: ignore[override]
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    server: _Server
    _record: RecordedRequest | None = None

    def setup(self) -> None:
        self.timeout = self.server.hub.request_timeout
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- body / responses ------------------------------------------------------------------

    def _read(self, size: int, rate: float | None) -> bytes:
        """``size`` bytes of the body; at ``rate`` bytes/s, a chunk per tick (:meth:`LocalHub.throttle_uploads`)."""
        if rate is None:
            return self.rfile.read(size)
        chunks, remaining = [], size
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, max(1, int(rate * _THROTTLE_TICK))))
            if not chunk:       # the client went away
                break
            if not chunks:      # once a body: one cut off still drains its buffered bytes after a clear()
                self.server.hub.throttled_receiving.set()
            chunks.append(chunk)
            remaining -= len(chunk)
            time.sleep(_THROTTLE_TICK)
        return b"".join(chunks)

    def _read_body(self, rate: float | None = None) -> bytes:
        limit = self.server.hub.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            total = 0
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise HubError(400, "Truncated chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > limit:
                    self.close_connection = True
                    raise HubError(413, f"Request body larger than {limit} bytes")
                chunks.append(self._read(size, rate))
                self.rfile.readline(1024)  # CRLF after the chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            self.close_connection = True
            raise HubError(413, f"Request body larger than {limit} bytes")
        return self._read(length, rate) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
              content_type: str = "application/json; charset=utf-8", length: int | None = None) -> None:
        if self._record is not None:
            self._record.status = status  # before any byte is sent: the client may look right after
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, data: Any, status: int = 200, headers: Mapping[str, str] | None = None,
                   content_type: str = "application/json; charset=utf-8") -> None:
        self._send(status, json.dumps(data).encode(), headers, content_type)

    def _send_error(self, error: HubError) -> None:
        headers = dict(error.headers)
        # Header values must stay on one latin-1 line.
        headers["X-Error-Message"] = error.message.replace("\n", " ").encode("latin-1", "replace").decode("latin-1")
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({**error.body, "error": error.message}, status=error.status, headers=headers)

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        hub = self.server.hub
        self._record = None
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        while segments and segments[-1] == "":
            segments.pop()
        auth = self.headers.get("Authorization")
        token = None
        if auth:
            token = auth.split(" ", 1)[1].strip() if auth.lower().startswith("bearer ") else auth.strip()
        record = RecordedRequest(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            token=token,
        )
        hub._record(record)
        self._record = record
        try:
            # an LFS upload's PUT (its URL names an object, no file) at throttle_uploads' rate
            lfs_put = self.command == "PUT" and segments[:2] == [_INTERNAL, "lfs"]
            body = self._read_body(hub._upload_rate if lfs_put else None)
            record.body_size = len(body)
            _Router(hub, self, segments, record.query, body, token).route()
        except HubError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a bug in the server: answer 500 and keep the traceback for the test
            hub._errors.append(f"{self.command} {self.path}\n{traceback.format_exc()}")
            with contextlib.suppress(Exception):
                self._send_error(HubError(500, "LocalHub internal error (see hub.errors)"))


class _Router:
    """Routes one request. Holds the parsed request; answers through the handler."""

    def __init__(self, hub: LocalHub, handler: _Handler, segments: list[str], query: dict[str, list[str]],
                 body: bytes, token: str | None):
        self.hub = hub
        self.h = handler
        self.method = handler.command
        self.segs = segments
        self.query = query
        self.body = body
        self.token = token

    def _flag(self, name: str) -> bool:
        values = self.query.get(name)
        return bool(values) and values[-1].lower() in ("1", "true", "yes")

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from None

    def _check_token(self) -> None:
        required = self.hub.required_token
        if required is not None and self.token != required:
            raise HubError(401, "Invalid credentials in Authorization header")

    def route(self) -> None:
        s = self.segs
        if not s:
            raise HubError(404, "Not found")
        if s[0] == _INTERNAL:
            return self._route_lfs_transfer(s[1:])
        self._check_token()
        if s[0] == "api":
            return self._route_api(s[1:])
        repo_type = "model"
        if s[0] in _REPO_TYPES and s[0] != "models" and len(s) > 1:
            repo_type, s = _REPO_TYPES[s[0]], s[1:]
        if len(s) >= 4 and s[2] == "resolve" and self.method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        if len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"]:
            if self.method == "POST":
                return self._lfs_batch(repo_type, f"{s[0]}/{s[1][:-4]}")
        raise HubError(404, f"No route for {self.method} /{'/'.join(self.segs)}")

    # -- /api --------------------------------------------------------------------------------

    def _route_api(self, s: list[str]) -> None:
        m = self.method
        if s == ["whoami-v2"] and m == "GET":
            return self._whoami()
        if s == ["repos", "create"] and m == "POST":
            return self._create_repo()
        if s == ["repos", "delete"] and m == "DELETE":
            return self._delete_repo()
        if s == ["validate-yaml"] and m == "POST":
            return self.h._send_json({"errors": [], "warnings": []})
        if len(s) >= 3 and s[0] in _REPO_TYPES:
            repo_type, repo_id, rest = _REPO_TYPES[s[0]], f"{s[1]}/{s[2]}", s[3:]
            if not rest and m == "GET":
                return self._info(repo_type, repo_id, None)
            action, args = rest[0], rest[1:]
            if action == "revision" and len(args) == 1 and m == "GET":
                return self._info(repo_type, repo_id, args[0])
            if action == "tree" and args and m == "GET":
                return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]))
            if action == "paths-info" and len(args) == 1 and m == "POST":
                return self._paths_info(repo_type, repo_id, args[0])
            if action == "refs" and not args and m == "GET":
                return self._refs(repo_type, repo_id)
            if action == "commits" and len(args) == 1 and m == "GET":
                return self._commits(repo_type, repo_id, args[0])
            if action == "preupload" and len(args) == 1 and m == "POST":
                return self._preupload(repo_type, repo_id, args[0])
            if action == "commit" and len(args) == 1 and m == "POST":
                return self._commit(repo_type, repo_id, args[0])
            if action == "branch" and len(args) == 1 and m in ("POST", "DELETE"):
                return self._branch(repo_type, repo_id, args[0])
            if action == "tag" and len(args) == 1 and m in ("POST", "DELETE"):
                return self._tag(repo_type, repo_id, args[0])
            if action in ("xet-read-token", "xet-write-token"):
                self.hub._repo(repo_type, repo_id, self.token)  # RepoNotFound first, like the Hub
                raise HubError(404, "Xet storage is not implemented by LocalHub; set HF_HUB_DISABLE_XET=1")
        raise HubError(404, f"No route for {m} /api/{'/'.join(s)}")

    def _whoami(self) -> None:
        if self.token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        user = self.hub.user
        self.h._send_json({
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
            "fullname": user, "email": None, "emailVerified": False, "isPro": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "write"}},
        })

    def _create_repo(self) -> None:
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        name = payload.get("name")
        if repo_type not in _URL_PREFIXES or not isinstance(name, str):
            raise HubError(400, "Invalid repo type or name")
        repo_id = f"{payload.get('organization') or self.hub.user}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.hub.url}/{_URL_PREFIXES[repo_type]}{repo_id}"
        try:
            self.hub.create_repo(repo_id, repo_type=repo_type, private=private, gitattributes=True)
        except FileExistsError:
            # The client reads "url" from this 409 body when exist_ok=True.
            raise HubError(409, f"You already created this {repo_type} repo", body={"url": url}) from None
        self.h._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload.get('name')}"
        self.hub._repo(repo_type, repo_id, self.token)
        self.hub.delete_repo(repo_id, repo_type=repo_type)
        self.h._send_json({})

    def _info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_type, repo_id, self.token)
            sha = hub._resolve(repo, revision or "main")
            commit = repo.commits[sha]
            siblings = []
            for path, entry in sorted(commit.files.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if self._flag("blobs"):
                    sibling.update(size=entry.size, blobId=entry.oid)
                    if entry.lfs:
                        sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
                siblings.append(sibling)
            data: dict[str, Any] = {
                "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": sha,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(e.size for e in commit.files.values()),
            }
            if repo_type == "model":
                data["modelId"] = repo_id
            if repo_type == "space":
                data["sdk"] = "static"
        self.h._send_json(data)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_type, repo_id, self.token)
            sha = hub._resolve(repo, revision)
            files = repo.commits[sha].files
            path = path.strip("/")
            if path and path in files:
                raise HubError(400, f"'{path}' is a file, not a directory", headers={"X-Repo-Commit": sha})
            if path and not any(p.startswith(path + "/") for p in files):
                raise HubError(404, f"Directory '{path}' not found", "EntryNotFound", {"X-Repo-Commit": sha})
            recursive = self._flag("recursive")
            expand = self._flag("expand")
            entries = _list_tree(files, path, recursive)
            out = [hub._path_info(repo, sha, p, kind, expand) for p, kind in entries]
        self.h._send_json(out)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        form = parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)
        if not form and self.body.strip().startswith(b"{"):
            data = self._json_body()
            form = {"paths": list(data.get("paths", [])), "expand": [str(data.get("expand", False))]}
        paths = form.get("paths", [])
        expand = (form.get("expand") or ["false"])[-1].lower() in ("1", "true")
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_type, repo_id, self.token)
            sha = hub._resolve(repo, revision)
            files = repo.commits[sha].files
            out = []
            for raw in paths:
                p = raw.strip("/")
                if p in files:
                    out.append(hub._path_info(repo, sha, p, "file", expand))
                elif p and any(f.startswith(p + "/") for f in files):
                    out.append(hub._path_info(repo, sha, p, "directory", expand))
        self.h._send_json(out)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        with self.hub._lock:
            repo = self.hub._repo(repo_type, repo_id, self.token)
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                for n, c in sorted(repo.branches.items()) if not n.startswith("refs/pr/")
            ]
            prs = [
                {"name": n, "ref": n, "targetCommit": c}
                for n, c in sorted(repo.branches.items()) if n.startswith("refs/pr/")
            ]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in sorted(repo.tags.items())]
        data: dict[str, Any] = {"branches": branches, "converts": [], "tags": tags}
        if self._flag("include_prs"):
            data["pullRequests"] = prs
        self.h._send_json(data)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_type, repo_id, self.token)
            sha = hub._resolve(repo, revision)
            out = []
            for cid in hub._history(repo, sha):
                c = repo.commits[cid]
                out.append({
                    "id": c.id, "title": c.title, "message": c.message, "date": c.date,
                    "authors": [{"user": hub.user}],
                    "formatted": {"title": c.title, "message": c.message},
                })
        self.h._send_json(out)

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        payload = self._json_body()
        files = payload.get("files")
        if not isinstance(files, list):
            raise HubError(400, "Expected a 'files' list")
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_type, repo_id, self.token)
            target = "main" if self._flag("create_pr") else revision
            sha = hub._resolve(repo, target)
            current = repo.commits[sha].files
            out = []
            for f in files:
                path, size = f.get("path"), int(f.get("size") or 0)
                mode = "lfs" if hub._is_lfs(path, size) else "regular"
                existing = current.get(path)
                oid = None
                if existing is not None:
                    oid = existing.sha256 if existing.lfs else existing.oid
                out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self.h._send_json({"files": out, "commitOid": sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Invalid NDJSON commit payload: {e}") from None
        header: dict[str, Any] = {}
        additions: dict[str, FileEntry] = {}
        deletions: list[tuple[str, bool]] = []
        for item in lines:
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    data = str(value.get("content", "")).encode()
                else:
                    data = base64.b64decode(value.get("content", ""))
                additions[_clean_path(value["path"])] = hub._store_bytes(data, lfs=False)
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise HubError(400, "Only sha256 LFS objects are supported")
                oid = str(value.get("oid", ""))
                size = hub._object_size(oid)
                if size is None:
                    raise HubError(422, f"LFS object {oid} was not uploaded", headers={})
                if value.get("size") is not None and int(value["size"]) != size:
                    raise HubError(422, f"LFS object {oid} has size {size}, not {value['size']}")
                pointer_oid = _git_blob_oid(_lfs_pointer(oid, size))
                additions[_clean_path(value["path"])] = FileEntry(oid, size, True, pointer_oid)
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((_clean_path(value["path"]), key == "deletedFolder"))
            else:
                raise HubError(400, f"Unsupported commit operation '{key}'")
        title = header.get("summary") or "Commit"
        description = header.get("description") or ""
        with hub._lock:
            repo = hub._repo(repo_type, repo_id, self.token)
            pr_url = None
            if self._flag("create_pr"):
                base = hub._resolve(repo, revision)
                repo.pr_count += 1
                branch = f"refs/pr/{repo.pr_count}"
                repo.branches[branch] = base
                pr_url = f"{hub.url}/{repo.url_path}/discussions/{repo.pr_count}"
            else:
                branch = _branch_name(revision)
                if branch not in repo.branches:
                    if branch in repo.tags or _HEX40.match(branch):
                        raise HubError(400, f"Cannot commit on '{revision}': not a branch")
                    raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            parent = header.get("parentCommit")
            if parent and not repo.branches[branch].startswith(parent):
                raise HubError(412, f"A commit has happened since. Parent {parent} is not the head of '{branch}'")
            sha = hub._commit_locked(repo, branch, additions, deletions, title, description)
        self.h._send_json({
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{hub.url}/{repo.url_path}/commit/{sha}",
            "hookOutput": "",
            "pullRequestUrl": pr_url,
        })

    def _branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_type, repo_id, self.token)
            if self.method == "DELETE":
                if branch not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
            else:
                payload = self._json_body()
                if branch in repo.branches:
                    raise HubError(409, f"Reference already exists: refs/heads/{branch}")
                hub._check_ref_name(branch)
                repo.branches[branch] = hub._resolve(repo, payload.get("startingPoint") or "main")
            hub._persist(repo)
        self.h._send_json({})

    def _tag(self, repo_type: str, repo_id: str, arg: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_type, repo_id, self.token)
            if self.method == "DELETE":
                if arg not in repo.tags:
                    raise HubError(404, f"Invalid rev id: {arg}", "RevisionNotFound")
                del repo.tags[arg]
            else:
                payload = self._json_body()
                tag = payload.get("tag")
                if not isinstance(tag, str) or not tag:
                    raise HubError(400, "Missing 'tag'")
                if tag in repo.tags:
                    raise HubError(409, f"Tag already exists: {tag}")
                hub._check_ref_name(tag)
                repo.tags[tag] = hub._resolve(repo, arg)
            hub._persist(repo)
        self.h._send_json({})

    # -- resolve -----------------------------------------------------------------------------

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_type, repo_id, self.token)
            sha = hub._resolve(repo, revision)
            entry = repo.commits[sha].files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(posixpath.basename(path))}",
            "Vary": "Origin, Accept",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        self._send_object(entry.sha256, entry.size, headers)

    def _send_object(self, sha256: str, size: int, headers: dict[str, str]) -> None:
        start, end, status = 0, size - 1, 200
        range_header = self.h.headers.get("Range")
        if range_header and self.method == "GET":
            parsed = _parse_range(range_header, size)
            if parsed is None:
                raise HubError(416, f"Range not satisfiable: {range_header}",
                               headers={"Content-Range": f"bytes */{size}"})
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        h = self.h
        h._send(status, b"", headers, "application/octet-stream", length=length)
        if self.method == "HEAD" or length == 0:
            return
        rate = self.hub._throttle_rate(self.segs[-1] if self.segs else "")
        # throttled: a chunk per tick, so that a client going away (or stop()) ends the body within a tick
        size_of_chunk = 1 << 20 if rate is None else max(1, int(rate * _THROTTLE_TICK))
        with open(self.hub._object_path(sha256), "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(remaining, size_of_chunk))
                if not chunk:
                    break
                if rate is not None:
                    # set before the bytes go out: set after, a client could read a short body whole and
                    # clear the event before this thread set it (a flaky test_hub_server check)
                    self.hub.throttled_sending.set()
                h.wfile.write(chunk)
                remaining -= len(chunk)
                if rate is not None:
                    h.wfile.flush()
                    time.sleep(_THROTTLE_TICK)

    # -- LFS -------------------------------------------------------------------------------

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        hub = self.hub
        payload = self._json_body()
        operation = payload.get("operation")
        if operation not in ("upload", "download"):
            raise HubError(400, f"Unsupported LFS operation {operation!r}")
        with hub._lock:
            repo = hub._repo(repo_type, repo_id, self.token)
            ref = (payload.get("ref") or {}).get("name")
            if ref and operation == "upload":
                hub._resolve(repo, ref)
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = str(obj.get("oid", "")), int(obj.get("size") or 0)
            out: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            known = hub._object_size(oid) if re.fullmatch(r"[0-9a-f]{64}", oid) else None
            href = f"{hub.url}/{_INTERNAL}/lfs/{oid}"
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                out["error"] = {"code": 422, "message": "Invalid sha256 oid"}
            elif operation == "upload":
                if known != size:
                    with hub._lock:
                        hub._pending_lfs[oid] = size
                    out["actions"] = {
                        "upload": {"href": href, "expires_at": "2999-01-01T00:00:00Z"},
                        "verify": {"href": f"{hub.url}/{_INTERNAL}/lfs-verify", "header": {}},
                    }
            elif known is None:
                out["error"] = {"code": 404, "message": "Object does not exist"}
            else:
                out["actions"] = {"download": {"href": href, "expires_at": "2999-01-01T00:00:00Z"}}
            objects.append(out)
        self.h._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                          content_type="application/vnd.git-lfs+json")

    def _route_lfs_transfer(self, s: list[str]) -> None:
        hub = self.hub
        if len(s) == 2 and s[0] == "lfs" and re.fullmatch(r"[0-9a-f]{64}", s[1]):
            oid = s[1]
            if self.method == "PUT":
                with hub._lock:
                    expected = hub._pending_lfs.get(oid)
                if expected is None and hub._object_size(oid) is None:
                    raise HubError(403, "No LFS upload was requested for this object")
                digest = hashlib.sha256(self.body).hexdigest()
                if digest != oid or (expected is not None and expected != len(self.body)):
                    raise HubError(400, f"Uploaded content does not match oid {oid} / size {expected}")
                hub._store_bytes(self.body, lfs=True)
                with hub._lock:
                    hub._pending_lfs.pop(oid, None)
                return self.h._send(200, b"", {"ETag": f'"{oid}"'})
            if self.method in ("GET", "HEAD"):
                size = hub._object_size(oid)
                if size is None:
                    raise HubError(404, "Object does not exist")
                return self._send_object(oid, size, {"ETag": f'"{oid}"'})
        if s == ["lfs-verify"] and self.method == "POST":
            payload = self._json_body()
            oid = str(payload.get("oid", ""))
            size = hub._object_size(oid) if re.fullmatch(r"[0-9a-f]{64}", oid) else None
            if size is None or (payload.get("size") is not None and int(payload["size"]) != size):
                raise HubError(404, f"LFS object {oid} not found or of the wrong size")
            return self.h._send_json({"oid": oid, "size": size})
        raise HubError(404, f"No route for {self.method} /{_INTERNAL}/{'/'.join(s)}")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # suffix range: last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return None
        return max(size - n, 0), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def _clean_path(path: str) -> str:
    p = str(path).replace("\\", "/").strip("/")
    parts = p.split("/")
    if not p or any(part in ("", ".", "..") for part in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return p


def _branch_name(revision: str) -> str:
    return revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision


def _list_tree(files: Mapping[str, FileEntry], path: str, recursive: bool) -> list[tuple[str, str]]:
    prefix = path + "/" if path else ""
    out: dict[str, str] = {}
    for f in files:
        if not f.startswith(prefix):
            continue
        rel = f[len(prefix):].split("/")
        for depth in range(1, len(rel)):
            if not recursive and depth > 1:
                break
            out.setdefault(prefix + "/".join(rel[:depth]), "directory")
        if recursive or len(rel) == 1:
            out[f] = "file"
    return sorted(out.items(), key=lambda kv: (kv[1] != "directory", kv[0]))


# ----------------------------------------------------------------------------------------------
# The hub
# ----------------------------------------------------------------------------------------------


class LocalHub:
    """A local Hugging Face Hub, started/stopped as a context manager.

    Args:
        root: storage folder (a temporary one, removed on :meth:`stop`, if ``None``). An existing
            root written by a previous ``LocalHub`` is loaded back.
        upload_mode: ``"auto"`` (Hub-like: LFS for ``lfs_patterns`` or files of ``lfs_threshold`` bytes
            or more), ``"regular"`` (every upload inline in the commit payload; no LFS, no Xet) or
            ``"lfs"`` (every non-empty file through LFS).
        required_token: if set, every API/download request must carry ``Authorization: Bearer <it>``.
        user: name answered by ``whoami`` and used as namespace for ``create_repo("name")``.
        max_body_bytes: largest accepted request body.
        request_timeout: socket timeout of each connection, in seconds.
        max_logged_requests: size of the :attr:`requests` log (oldest entries are dropped).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        upload_mode: str = "auto",
        lfs_patterns: Iterable[str] = DEFAULT_LFS_PATTERNS,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        required_token: str | None = None,
        user: str = "local-user",
        max_body_bytes: int = 512 * 1024 * 1024,
        request_timeout: float = 30.0,
        max_logged_requests: int = 10_000,
    ):
        if upload_mode not in ("auto", "regular", "lfs"):
            raise ValueError(f"upload_mode must be 'auto', 'regular' or 'lfs', not {upload_mode!r}")
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="local-hub-")) if root is None else Path(root)
        self.upload_mode = upload_mode
        self.lfs_patterns = tuple(lfs_patterns)
        self.lfs_threshold = lfs_threshold
        self.required_token = required_token
        self.user = user
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._pending_lfs: dict[str, int] = {}
        self._requests: collections.deque[RecordedRequest] = collections.deque(maxlen=max_logged_requests)
        self._errors: list[str] = []
        self._counter = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._throttles: dict[str, float] = {}
        self.throttled_sending = threading.Event()
        """Set once the first bytes of a throttled body are sent (:meth:`throttle`)."""
        self._upload_rate: float | None = None
        self.throttled_receiving = threading.Event()
        """Set once the first bytes of a throttled LFS upload are received (:meth:`throttle_uploads`)."""
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self._load()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.close_connections()
            server.server_close()
        if thread is not None:
            thread.join(timeout=10)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        return self._server.server_port

    @property
    def url(self) -> str:
        """Base URL, to use as ``HF_ENDPOINT`` / ``HfApi(endpoint=...)``."""
        return f"http://127.0.0.1:{self.port}"

    # -- request log -------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def tokens(self) -> list[str]:
        """Tokens received (``Authorization: Bearer ...``), in request order, without duplicates."""
        return list(dict.fromkeys(r.token for r in self.requests if r.token is not None))

    @property
    def errors(self) -> list[str]:
        """Tracebacks of server-side bugs (answered as HTTP 500)."""
        return list(self._errors)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    def offline(self, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
        """Same as the module-level :func:`offline` (``with local_hub.offline(): ...``)."""
        return offline(enabled)

    def throttle(self, pattern: str, bytes_per_second: float | None) -> None:
        """Send the bodies of files whose base name matches ``pattern`` (fnmatch) at about
        ``bytes_per_second``, a chunk every 50 ms (``Range`` requests too); None sends them at full speed
        again. :attr:`throttled_sending` is set once such a body's first bytes are out. A slow link for
        tests of what happens while a large download is in flight (an interrupt, a retry)."""
        if bytes_per_second is None:
            self._throttles.pop(pattern, None)
        elif not bytes_per_second > 0:
            raise ValueError(f"bytes_per_second must be > 0 (or None for full speed), not {bytes_per_second!r}")
        else:
            self._throttles[pattern] = float(bytes_per_second)

    def throttle_uploads(self, bytes_per_second: float | None) -> None:
        """Receive the bodies of LFS uploads (a pushed model.safetensors, model.onnx: whatever the
        preupload endpoint calls "lfs"; their URLs name objects, not files) at about ``bytes_per_second``,
        a chunk every 50 ms; None receives them at full speed again. :attr:`throttled_receiving` is set
        once such a body's first bytes are in. A slow uplink, for tests of an interrupted push."""
        if bytes_per_second is not None and not bytes_per_second > 0:
            raise ValueError(f"bytes_per_second must be > 0 (or None for full speed), not {bytes_per_second!r}")
        self._upload_rate = None if bytes_per_second is None else float(bytes_per_second)

    def _throttle_rate(self, name: str) -> float | None:
        rates = [rate for pattern, rate in list(self._throttles.items()) if fnmatch.fnmatchcase(name, pattern)]
        return min(rates) if rates else None

    # -- seeding / inspection API ------------------------------------------------------------

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False,
                    exist_ok: bool = False, gitattributes: bool = False) -> str:
        """Create a repo whose ``main`` branch points to an initial commit; return that commit id.

        The initial commit is empty, or holds a Hub-like ``.gitattributes`` if ``gitattributes``
        (repos created over HTTP get one, as on the Hub). Raises ``FileExistsError`` if the repo exists
        (unless ``exist_ok``, which returns the ``main`` head).
        """
        self._check_repo_id(repo_id, repo_type)
        with self._lock:
            existing = self._repos.get((repo_type, repo_id))
            if existing is not None:
                if exist_ok:
                    return existing.branches["main"]
                raise FileExistsError(f"{repo_type} repo {repo_id} already exists")
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
            self._repos[(repo_type, repo_id)] = repo
            files: dict[str, FileEntry] = {}
            if gitattributes:
                text = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in self.lfs_patterns)
                files[".gitattributes"] = self._store_bytes(text.encode(), lfs=False)
            sha = self._new_commit(repo, [], files, "initial commit", "")
            repo.branches["main"] = sha
            self._persist(repo)
            return sha

    def delete_repo(self, repo_id: str, *, repo_type: str = "model") -> None:
        with self._lock:
            if self._repos.pop((repo_type, repo_id), None) is None:
                raise KeyError(f"{repo_type} repo {repo_id} not found")
            shutil.rmtree(self._repo_dir(repo_type, repo_id), ignore_errors=True)

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | None = None,
        *,
        branch: str = "main",
        message: str = "Update files",
        description: str = "",
        delete: Iterable[str] = (),
        replace: bool = False,
        start_from: str | None = None,
        lfs: bool | None = None,
        repo_type: str = "model",
    ) -> str:
        """Commit ``files`` (path -> bytes, or str encoded as UTF-8) on ``branch``; return the commit id.

        The new snapshot is the branch head's files, updated with ``files`` and minus ``delete``
        (paths, or folders with a trailing ``/``); with ``replace=True`` it is exactly ``files``.
        The repo is created if missing. A missing branch is created from ``start_from`` (a revision;
        default: the ``main`` head). ``lfs`` forces the storage kind of the added files (default:
        the server's ``upload_mode`` rule).
        """
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                self.create_repo(repo_id, repo_type=repo_type)
            repo = self._repos[(repo_type, repo_id)]
            branch = _branch_name(branch)
            if branch not in repo.branches:
                self._check_ref_name(branch)
                repo.branches[branch] = self._resolve(repo, start_from or "main")
            additions = {}
            for path, content in (files or {}).items():
                data = content.encode() if isinstance(content, str) else bytes(content)
                is_lfs = self._is_lfs(path, len(data)) if lfs is None else (lfs and len(data) > 0)
                additions[_clean_path(path)] = self._store_bytes(data, lfs=is_lfs)
            deletions = []
            for d in delete:
                deletions.append((_clean_path(d), d.endswith("/")))
            return self._commit_locked(repo, branch, additions, deletions, message, description, replace=replace)

    def tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Create (or move) tag ``tag`` to ``revision``; return the tagged commit id."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            self._check_ref_name(tag)
            repo.tags[tag] = sha = self._resolve(repo, revision)
            self._persist(repo)
            return sha

    def create_branch(self, repo_id: str, branch: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Create (or move) ``branch`` to ``revision``; return its commit id."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            self._check_ref_name(branch)
            repo.branches[branch] = sha = self._resolve(repo, revision)
            self._persist(repo)
            return sha

    def resolve(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Commit id of ``revision`` (branch, tag, full or abbreviated commit id)."""
        with self._lock:
            return self._resolve(self._get_repo(repo_type, repo_id), revision)

    def has_repo(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def list_files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[str]:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return sorted(repo.commits[self._resolve(repo, revision)].files)

    def file_entry(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> FileEntry:
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return repo.commits[self._resolve(repo, revision)].files[path]

    def read_file(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> bytes:
        entry = self.file_entry(repo_id, path, revision, repo_type=repo_type)
        return self._object_path(entry.sha256).read_bytes()

    def history(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[str]:
        """Commit ids reachable from ``revision`` (first parents), newest first."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return self._history(repo, self._resolve(repo, revision))

    def branches(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._get_repo(repo_type, repo_id).branches)

    def tags(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            return dict(self._get_repo(repo_type, repo_id).tags)

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _check_repo_id(repo_id: str, repo_type: str) -> None:
        if repo_type not in _URL_PREFIXES:
            raise ValueError(f"Unknown repo type {repo_type!r}")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_SAFE_NAME.match(p) and ".." not in p and not p.endswith(".git") for p in parts):
            raise ValueError(f"Invalid repo id {repo_id!r}: expected 'namespace/name'")

    @staticmethod
    def _check_ref_name(name: str) -> None:
        if not name or name.startswith(("/", "-")) or ".." in name or _HEX40.match(name) or any(
            c in name for c in " ~^:?*[\\"
        ):
            raise HubError(400, f"Invalid reference name {name!r}")

    def _is_lfs(self, path: str, size: int) -> bool:
        if size <= 0 or self.upload_mode == "regular":
            return False
        if self.upload_mode == "lfs" or size >= self.lfs_threshold:
            return True
        base = posixpath.basename(str(path))
        return any(fnmatch.fnmatchcase(base, pattern) for pattern in self.lfs_patterns)

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"{repo_type} repo {repo_id} not found")
        return repo

    def _repo(self, repo_type: str, repo_id: str, token: str | None) -> _Repo:
        """Repo lookup for HTTP requests (raises the Hub's RepoNotFound answers)."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and token is None:
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> str:
        rev = revision
        if rev in repo.branches:
            return repo.branches[rev]
        if rev.startswith("refs/heads/") and rev[11:] in repo.branches:
            return repo.branches[rev[11:]]
        if rev in repo.tags:
            return repo.tags[rev]
        if rev.startswith("refs/tags/") and rev[10:] in repo.tags:
            return repo.tags[rev[10:]]
        low = rev.lower()
        if _HEX40.match(low) and low in repo.commits:
            return low
        if _HEX_PREFIX.match(low):
            matches = [c for c in repo.commits if c.startswith(low)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _history(self, repo: _Repo, sha: str) -> list[str]:
        out = []
        seen: set[str] = set()
        current: str | None = sha
        while current is not None and current not in seen:
            seen.add(current)
            out.append(current)
            parents = repo.commits[current].parents
            current = parents[0] if parents else None
        return out

    def _last_commit_info(self, repo: _Repo, sha: str, path: str, kind: str) -> dict[str, str]:
        def state(commit_id: str) -> Any:
            files = repo.commits[commit_id].files
            if kind == "file":
                return files.get(path)
            return sorted((p, e) for p, e in files.items() if p.startswith(path + "/"))

        history = self._history(repo, sha)
        last = history[0]
        for newer, older in zip(history, history[1:]):
            if state(newer) != state(older):
                last = newer
                break
            last = older
        c = repo.commits[last]
        return {"id": c.id, "title": c.title, "date": c.date}

    def _path_info(self, repo: _Repo, sha: str, path: str, kind: str, expand: bool) -> dict[str, Any]:
        files = repo.commits[sha].files
        if kind == "file":
            e = files[path]
            info: dict[str, Any] = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
            if e.lfs:
                info["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
        else:
            listing = "\n".join(f"{p} {e.oid}" for p, e in sorted(files.items()) if p.startswith(path + "/"))
            info = {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            info["lastCommit"] = self._last_commit_info(repo, sha, path, kind)
        return info

    def _object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def _object_size(self, sha256: str) -> int | None:
        try:
            return self._object_path(sha256).stat().st_size
        except (OSError, ValueError):
            return None

    def _store_bytes(self, data: bytes, *, lfs: bool) -> FileEntry:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self._object_path(sha256)
        if not target.exists():
            tmp = target.with_name(f"{sha256}.{threading.get_ident()}.{time.monotonic_ns()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        oid = _git_blob_oid(_lfs_pointer(sha256, len(data))) if lfs else _git_blob_oid(data)
        return FileEntry(sha256=sha256, size=len(data), lfs=lfs, oid=oid)

    def _new_commit(self, repo: _Repo, parents: list[str], files: dict[str, FileEntry], title: str,
                    message: str) -> str:
        self._counter += 1
        tree = "\n".join(f"{p} {e.oid}" for p, e in sorted(files.items()))
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parents}\n{tree}\n{title}\n{time.time_ns()}\n{self._counter}"
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = _Commit(sha, parents, title, message, _now_iso(), dict(files))
        return sha

    def _commit_locked(self, repo: _Repo, branch: str, additions: Mapping[str, FileEntry],
                       deletions: Iterable[tuple[str, bool]], title: str, message: str,
                       replace: bool = False) -> str:
        head = repo.branches[branch]
        files = {} if replace else dict(repo.commits[head].files)
        for path, is_folder in deletions:
            if is_folder:
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
        for path, entry in additions.items():
            clash = [p for p in files if p.startswith(path + "/")]
            if clash or any(parent in files for parent in _parents(path)):
                raise HubError(400, f"Cannot add '{path}': a file/folder conflicts with it")
            files[path] = entry
        sha = self._new_commit(repo, [head], files, title, message)
        repo.branches[branch] = sha
        self._persist(repo)
        return sha

    # -- persistence -------------------------------------------------------------------------

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / repo_id

    def _persist(self, repo: _Repo) -> None:
        data = {
            "repo_type": repo.repo_type, "repo_id": repo.repo_id, "private": repo.private,
            "created_at": repo.created_at, "branches": repo.branches, "tags": repo.tags,
            "pr_count": repo.pr_count,
            "commits": {
                c.id: {
                    "parents": c.parents, "title": c.title, "message": c.message, "date": c.date,
                    "files": {p: dataclasses.asdict(e) for p, e in c.files.items()},
                }
                for c in repo.commits.values()
            },
        }
        folder = self._repo_dir(repo.repo_type, repo.repo_id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "repo.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, folder / "repo.json")

    def _load(self) -> None:
        for meta in sorted((self.root / "repos").glob("*/*/*/repo.json")):
            data = json.loads(meta.read_text())
            repo = _Repo(
                repo_type=data["repo_type"], repo_id=data["repo_id"], private=data["private"],
                created_at=data["created_at"], branches=data["branches"], tags=data["tags"],
                pr_count=data.get("pr_count", 0),
            )
            for cid, c in data["commits"].items():
                files = {p: FileEntry(**e) for p, e in c["files"].items()}
                repo.commits[cid] = _Commit(cid, c["parents"], c["title"], c["message"], c["date"], files)
            self._repos[(repo.repo_type, repo.repo_id)] = repo


def _parents(path: str) -> Iterator[str]:
    parts = path.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


# ----------------------------------------------------------------------------------------------
# Client configuration
# ----------------------------------------------------------------------------------------------

_UNSET_ENV = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HUGGINGFACE_CO_STAGING", "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE", "HF_HUB_ENABLE_HF_TRANSFER", "HF_HUB_DISABLE_SYMLINKS",
)


def _hub_modules() -> list[Any]:
    return [
        module for name, module in list(sys.modules.items())
        if module is not None and (name == "huggingface_hub" or name.startswith("huggingface_hub."))
    ]


def _set_constant(mp: Any, name: str, value: Any) -> None:
    """Set ``huggingface_hub.constants.<name>`` and every by-name copy of it in ``huggingface_hub.*``."""
    from huggingface_hub import constants

    if not hasattr(constants, name):
        return
    old = getattr(constants, name)
    for module in _hub_modules():
        if module is constants:
            continue
        namespace = vars(module)
        if name in namespace and namespace[name] is old:
            mp.setattr(module, name, value)
    mp.setattr(constants, name, value)


def configure_client(mp: Any, endpoint: str, hf_home: str | os.PathLike[str], *, disable_xet: bool = True) -> None:
    """Point ``huggingface_hub`` at ``endpoint`` with an isolated cache under ``hf_home``.

    ``mp`` is a ``pytest.MonkeyPatch`` (the ``monkeypatch`` fixture, or ``pytest.MonkeyPatch.context()``):
    everything is restored when it is undone.

    Environment set: ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``,
    ``HF_TOKEN_PATH``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_UPDATE_CHECK=1``,
    ``HF_HUB_DISABLE_XET=1`` (if ``disable_xet``), ``NO_PROXY``/``no_proxy`` (+127.0.0.1,localhost);
    removed: ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``,
    ``HF_OIDC_*``, ``HUGGINGFACE_CO_STAGING``, legacy cache variables.

    Import-time constants patched in ``huggingface_hub.constants`` (and in any ``huggingface_hub.*``
    module holding a by-name copy): ``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``,
    ``HF_HOME``, ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_ASSETS_CACHE``,
    ``HUGGINGFACE_ASSETS_CACHE``, ``default_cache_path``, ``default_assets_cache_path``, ``HF_XET_CACHE``,
    ``default_xet_cache_path``, ``HF_TOKEN_PATH``, ``HF_STORED_TOKENS_PATH``, update-check/agent file paths,
    ``HF_HUB_OFFLINE=False``, ``HF_HUB_DISABLE_XET``, ``HF_HUB_DISABLE_TELEMETRY=True``,
    ``HF_HUB_DISABLE_UPDATE_CHECK=True``. Also ``huggingface_hub.hf_api.api.endpoint`` (module-level
    ``HfApi`` behind ``huggingface_hub.upload_file`` & co) and ``utils._http._HUB_ORIGINS``; the shared
    HTTP client is closed so that it is rebuilt with this environment.
    """
    endpoint = endpoint.rstrip("/")
    home = Path(hf_home)
    home.mkdir(parents=True, exist_ok=True)
    paths = {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
    }
    for name in _UNSET_ENV:
        mp.delenv(name, raising=False)
    mp.setenv("HF_ENDPOINT", endpoint)
    for name, value in paths.items():
        mp.setenv(name, str(value))
    mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    mp.setenv("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    if disable_xet:
        mp.setenv("HF_HUB_DISABLE_XET", "1")
    else:
        mp.delenv("HF_HUB_DISABLE_XET", raising=False)
    for var in ("NO_PROXY", "no_proxy"):
        current = [h for h in os.environ.get(var, "").split(",") if h]
        mp.setenv(var, ",".join(dict.fromkeys([*current, "127.0.0.1", "localhost"])))

    import huggingface_hub
    import huggingface_hub.hf_api as hf_api
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hosts = getattr(constants, "HF_URL_HOSTS", frozenset())
    values: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(hosts) | {"127.0.0.1", "localhost"},
        "HF_HOME": str(home),
        "default_cache_path": str(home / "hub"),
        "default_assets_cache_path": str(home / "assets"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "default_xet_cache_path": str(home / "xet"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": bool(disable_xet),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
    }
    for name, value in values.items():
        _set_constant(mp, name, value)

    if isinstance(getattr(hf_api, "api", None), hf_api.HfApi):
        mp.setattr(hf_api.api, "endpoint", endpoint)
    if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
        mp.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS) | {_http._url_origin(endpoint)})
    huggingface_hub.close_session()


@contextlib.contextmanager
def client_environment(
    hub: LocalHub, hf_home: str | os.PathLike[str], *, disable_xet: bool = True
) -> Iterator[LocalHub]:
    """:func:`configure_client` for ``hub`` outside of a pytest fixture; undone on exit."""
    import huggingface_hub
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        configure_client(mp, hub.url, hf_home, disable_xet=disable_xet)
        try:
            yield hub
        finally:
            huggingface_hub.close_session()


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """Flip ``huggingface_hub`` offline mode (``HF_HUB_OFFLINE`` env + import-time constant); restore on exit.

    In offline mode every request made through the client's HTTP session raises
    ``OfflineModeIsEnabled``, so downloads are served from the cache or fail with
    ``LocalEntryNotFoundError``.
    """
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1" if enabled else "0")
        if not enabled:
            mp.delenv("TRANSFORMERS_OFFLINE", raising=False)
        _set_constant(mp, "HF_HUB_OFFLINE", bool(enabled))
        yield


# ----------------------------------------------------------------------------------------------
# pytest fixture
# ----------------------------------------------------------------------------------------------

try:
    import pytest as _pytest
except ImportError:  # pragma: no cover - the module is usable without pytest
    _pytest = None

if _pytest is not None:

    @_pytest.fixture
    def local_hub(monkeypatch: Any, tmp_path: Path) -> Iterator[LocalHub]:
        """A started :class:`LocalHub` with ``huggingface_hub`` pointed at it (function scoped).

        Each test gets a fresh, empty hub (storage under ``tmp_path/"local-hub"``) and a fresh client
        cache (``HF_HOME=tmp_path/"hf-home"``, so ``HF_HUB_CACHE=tmp_path/"hf-home"/"hub"``); the
        user's cache and token are never touched. Xet is disabled (``HF_HUB_DISABLE_XET=1``) so LFS
        uploads go through the plain LFS protocol. See :func:`configure_client` for everything patched.
        Fails the test at teardown if the server hit an internal error.
        """
        import huggingface_hub

        with LocalHub(tmp_path / "local-hub") as hub:
            configure_client(monkeypatch, hub.url, tmp_path / "hf-home")
            try:
                yield hub
            finally:
                huggingface_hub.close_session()
        if hub.errors:
            raise AssertionError("LocalHub internal errors:\n" + "\n".join(hub.errors))

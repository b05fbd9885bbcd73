"""The local Hub test server, exercised through the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

import huggingface_hub
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_server import LocalHub, configure_client, offline

REPO = "acme/tiny-lru"

# huggingface_hub streams LFS PUT bodies with httpx2 `data=`, which httpx2 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")


def _seed(hub: LocalHub) -> tuple[str, str]:
    """Two commits on main; returns (old_sha, new_sha)."""
    old = hub.commit(
        REPO,
        {"config.json": b'{"d_model": 8}', "weights/model.safetensors": b"\x00" * 2048, "README.md": "# v1"},
        message="v1",
    )
    new = hub.commit(REPO, {"config.json": b'{"d_model": 16}'}, delete=["README.md"], message="v2")
    return old, new


def _paths(hub: LocalHub) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in hub.requests]


def test_fixture_points_client_at_local_hub(local_hub, tmp_path):
    assert local_hub.url.startswith("http://127.0.0.1:")
    assert constants.ENDPOINT == local_hub.url == os.environ["HF_ENDPOINT"]
    assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(local_hub.url + "/")
    assert Path(constants.HF_HUB_CACHE) == tmp_path / "hf-home" / "hub"
    assert Path(os.environ["HF_HUB_CACHE"]) == tmp_path / "hf-home" / "hub"
    assert constants.HF_HUB_OFFLINE is False and constants.HF_HUB_DISABLE_XET is True
    assert huggingface_hub.hf_api.api.endpoint == local_hub.url
    assert huggingface_hub.hf_hub_url(REPO, "a.txt").startswith(local_hub.url + "/")


def test_download_by_branch_commit_sha_and_tag(local_hub, tmp_path):
    old, new = _seed(local_hub)
    assert len(old) == len(new) == 40 and old != new
    dev = local_hub.commit(REPO, {"config.json": b'{"d_model": 32}'}, branch="dev", start_from=old)
    local_hub.tag(REPO, "v1.0", old)

    path = hf_hub_download(REPO, "config.json")
    assert json.loads(Path(path).read_text()) == {"d_model": 16}
    assert Path(path).is_relative_to(tmp_path / "hf-home" / "hub")
    assert f"/snapshots/{new}/" in path

    path_old = hf_hub_download(REPO, "config.json", revision=old)
    assert json.loads(Path(path_old).read_text()) == {"d_model": 8}
    assert Path(hf_hub_download(REPO, "README.md", revision=old)).read_text() == "# v1"
    assert Path(hf_hub_download(REPO, "config.json", revision=old[:10])).read_text() == '{"d_model": 8}'
    assert Path(hf_hub_download(REPO, "config.json", revision="dev")).read_text() == '{"d_model": 32}'
    assert f"/snapshots/{dev}/" in hf_hub_download(REPO, "config.json", revision="dev")
    assert Path(hf_hub_download(REPO, "config.json", revision="v1.0")).read_text() == '{"d_model": 8}'
    lfs = hf_hub_download(REPO, "weights/model.safetensors", revision="main")
    assert Path(lfs).read_bytes() == b"\x00" * 2048

    refs_dir = tmp_path / "hf-home" / "hub" / "models--acme--tiny-lru" / "refs"
    assert (refs_dir / "main").read_text() == new
    assert (refs_dir / "dev").read_text() == dev


def test_resolve_headers_range_and_no_xet(local_hub):
    _, new = _seed(local_hub)
    entry = local_hub.file_entry(REPO, "weights/model.safetensors")
    assert entry.lfs

    url = f"{local_hub.url}/{REPO}/resolve/main/weights/model.safetensors"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as r:
        h = r.headers
        assert h["X-Repo-Commit"] == new
        assert h["X-Linked-Etag"] == f'"{entry.sha256}"' and h["X-Linked-Size"] == "2048"
        assert h["Content-Length"] == "2048"
        assert not [k for k in h if k.lower().startswith("x-xet")] and "Link" not in h

    with urllib.request.urlopen(f"{local_hub.url}/{REPO}/resolve/main/config.json") as r:
        assert r.headers["ETag"] == f'"{local_hub.file_entry(REPO, "config.json").oid}"'
        assert "X-Linked-Etag" not in r.headers
        assert r.read() == b'{"d_model": 16}'

    req = urllib.request.Request(url, headers={"Range": "bytes=2000-"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and r.headers["Content-Range"] == "bytes 2000-2047/2048"
        assert len(r.read()) == 48

    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{local_hub.url}/{REPO}/resolve/main/missing.bin")
    assert exc.value.code == 404
    assert exc.value.headers["X-Error-Code"] == "EntryNotFound"
    assert exc.value.headers["X-Repo-Commit"] == new



def test_throttled_bodies_arrive_at_the_set_rate_ranges_too(local_hub):
    import time
    local_hub.commit(REPO, {"model.safetensors": bytes(range(256)) * 8, "config.json": b"{}"})    # 2048 bytes
    local_hub.throttle("*.safetensors", 8192)           # 0.25 s for the file, in chunks of 409 bytes
    url = f"{local_hub.url}/{REPO}/resolve/main/model.safetensors"
    start = time.monotonic()
    with urllib.request.urlopen(url) as r:
        assert r.read() == bytes(range(256)) * 8
    assert time.monotonic() - start >= 0.2 and local_hub.throttled_sending.is_set()
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=2000-"})) as r:
        assert r.status == 206 and r.read() == (bytes(range(256)) * 8)[2000:]
    with pytest.raises(ValueError, match="bytes_per_second must be > 0"):
        local_hub.throttle("*.safetensors", 0)
    local_hub.throttle("*.safetensors", None)
    local_hub.throttled_sending.clear()
    with urllib.request.urlopen(url) as r, urllib.request.urlopen(f"{local_hub.url}/{REPO}/resolve/main/config.json") as c:
        assert len(r.read()) == 2048 and c.read() == b"{}"
    assert not local_hub.throttled_sending.is_set()

def test_throttled_uploads_are_received_at_the_set_rate(local_hub):
    import hashlib
    import time
    body = bytes(range(256)) * 8                        # 2048 bytes
    url = f"{local_hub.url}/.local-hub/lfs/{hashlib.sha256(body).hexdigest()}"
    local_hub.throttle_uploads(8192)                    # 0.25 s for the body, in chunks of 409 bytes
    start = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as refused:     # no LFS batch asked for it: read, then refused
        urllib.request.urlopen(urllib.request.Request(url, data=body, method="PUT"))
    assert refused.value.code == 403 and time.monotonic() - start >= 0.2 and local_hub.throttled_receiving.is_set()
    with pytest.raises(ValueError, match="bytes_per_second must be > 0"):
        local_hub.throttle_uploads(-1)
    local_hub.throttle_uploads(None)
    local_hub.throttled_receiving.clear()
    local_hub.throttle("*", 8192)                       # downloads' throttle: not uploads'
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(url, data=body, method="PUT"))
    assert not local_hub.throttled_receiving.is_set()


def test_snapshot_download_at_branch_and_old_commit(local_hub):
    old, new = _seed(local_hub)
    folder = Path(snapshot_download(REPO))
    assert folder.name == new
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "config.json",
        "weights/model.safetensors",
    ]
    assert ("GET", f"/api/models/{REPO}/revision/main") in _paths(local_hub)

    folder_old = Path(snapshot_download(REPO, revision=old))
    assert folder_old.name == old
    assert (folder_old / "README.md").read_text() == "# v1"
    assert (folder_old / "config.json").read_text() == '{"d_model": 8}'

    only_json = Path(snapshot_download(REPO, revision=old, allow_patterns=["*.json"], local_dir=folder.parent / "x"))
    assert sorted(p.name for p in only_json.iterdir() if p.is_file()) == ["config.json"]


def test_offline_reuse_from_cache(local_hub):
    _, new = _seed(local_hub)
    online_file = hf_hub_download(REPO, "config.json")
    online_snapshot = snapshot_download(REPO)
    local_hub.clear_requests()

    with local_hub.offline():
        assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
        assert hf_hub_download(REPO, "config.json") == online_file
        assert hf_hub_download(REPO, "config.json", revision=new) == online_file
        assert snapshot_download(REPO) == online_snapshot
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(REPO, "never-downloaded.txt")
        with pytest.raises(LocalEntryNotFoundError):
            snapshot_download("acme/never-downloaded")
    assert local_hub.requests == []  # nothing reached the server

    assert constants.HF_HUB_OFFLINE is False
    with offline(False):  # the module-level helper can also force online mode
        hf_hub_download(REPO, "config.json")
    assert len(local_hub.requests) == 1  # the HEAD call; the blob is reused from the cache


def test_local_files_only(local_hub):
    _, new = _seed(local_hub)
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "config.json", local_files_only=True)
    path = hf_hub_download(REPO, "config.json")
    snapshot = snapshot_download(REPO)
    local_hub.clear_requests()
    assert hf_hub_download(REPO, "config.json", local_files_only=True) == path
    assert hf_hub_download(REPO, "config.json", revision=new, local_files_only=True) == path
    assert snapshot_download(REPO, local_files_only=True) == snapshot
    assert local_hub.requests == []


def test_errors_map_to_client_exceptions(local_hub):
    _seed(local_hub)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/does-not-exist", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="f" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("acme/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch")
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/does-not-exist")
    assert not api.repo_exists("acme/does-not-exist") and api.repo_exists(REPO)
    assert api.file_exists(REPO, "config.json") and not api.file_exists(REPO, "nope.json")
    assert not local_hub.errors


def test_upload_folder_then_download_at_returned_commit(local_hub, tmp_path):
    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    tensors = {"A": torch.randn(64, 64), "B": torch.arange(10, dtype=torch.float32)}
    (folder / "model.safetensors").write_bytes(save(tensors))
    (folder / "config.json").write_text('{"family": "lru"}')
    (folder / "sub" / "notes.txt").write_text("hello")
    (folder / "big.bin").write_bytes(os.urandom(2_000_000))

    api = HfApi(endpoint=local_hub.url, token="hf_pushTOKEN")
    repo_url = api.create_repo("acme/pushed", exist_ok=True)
    assert repo_url.repo_id == "acme/pushed"
    assert api.create_repo("acme/pushed", exist_ok=True).repo_id == "acme/pushed"  # 409 -> ok
    info = api.upload_folder(repo_id="acme/pushed", folder_path=folder, commit_message="push weights")

    assert len(info.oid) == 40 and info.oid == local_hub.resolve("acme/pushed", "main")
    assert info.commit_url == f"{local_hub.url}/acme/pushed/commit/{info.oid}"
    paths = _paths(local_hub)
    assert ("POST", "/api/repos/create") in paths
    assert ("POST", "/api/models/acme/pushed/preupload/main") in paths
    assert ("POST", "/acme/pushed.git/info/lfs/objects/batch") in paths  # .safetensors/.bin go through LFS
    assert sum(1 for m, p in paths if m == "PUT" and p.startswith("/.local-hub/lfs/")) == 2
    assert ("POST", "/api/models/acme/pushed/commit/main") in paths
    assert not [p for _, p in paths if "xet" in p]
    assert local_hub.tokens == ["hf_pushTOKEN"]
    authed = [r for r in local_hub.requests if not r.path.startswith("/.local-hub/")]
    assert all(r.headers.get("authorization") == "Bearer hf_pushTOKEN" for r in authed)

    assert local_hub.file_entry("acme/pushed", "model.safetensors", info.oid).lfs
    assert not local_hub.file_entry("acme/pushed", "config.json", info.oid).lfs
    assert sorted(api.list_repo_files("acme/pushed", revision=info.oid)) == [
        ".gitattributes", "big.bin", "config.json", "model.safetensors", "sub/notes.txt",
    ]
    weights = hf_hub_download("acme/pushed", "model.safetensors", revision=info.oid)
    loaded = load_file(weights)
    assert torch.equal(loaded["A"], tensors["A"]) and torch.equal(loaded["B"], tensors["B"])
    assert Path(hf_hub_download("acme/pushed", "big.bin", revision=info.oid)).read_bytes() == (
        folder / "big.bin"
    ).read_bytes()
    assert Path(hf_hub_download("acme/pushed", "sub/notes.txt", revision=info.oid)).read_text() == "hello"

    # Re-uploading identical content is a no-op commit (client-side check against preupload "oid").
    again = api.upload_folder(repo_id="acme/pushed", folder_path=folder, commit_message="again")
    assert again.oid == info.oid


def test_commits_branches_tags_prs_and_deletes(local_hub):
    api = HfApi(token="hf_x")  # endpoint from the patched constants
    api.create_repo("acme/ops")
    main1 = huggingface_hub.upload_file(  # module-level helper: the patched module `api` instance
        path_or_fileobj=b"one", path_in_repo="a.txt", repo_id="acme/ops", token="hf_x"
    ).oid
    api.create_branch("acme/ops", branch="exp", revision=main1)
    exp = api.upload_file(path_or_fileobj=b"exp", path_in_repo="a.txt", repo_id="acme/ops", revision="exp").oid
    api.create_tag("acme/ops", tag="release", revision=main1)
    main2 = api.create_commit(
        "acme/ops",
        operations=[
            CommitOperationAdd("dir/b.txt", b"bee"),
            CommitOperationAdd("dir/c.pt", b"lfs-ish"),
            CommitOperationDelete("a.txt"),
        ],
        commit_message="reshuffle",
    ).oid
    pr = api.create_commit(
        "acme/ops", operations=[CommitOperationAdd("pr.txt", b"pr")], commit_message="pr", create_pr=True
    )
    assert pr.pr_revision == "refs/pr/1"

    assert Path(hf_hub_download("acme/ops", "a.txt", revision="exp")).read_bytes() == b"exp"
    assert Path(hf_hub_download("acme/ops", "a.txt", revision="release")).read_bytes() == b"one"
    assert Path(hf_hub_download("acme/ops", "pr.txt", revision="refs/pr/1")).read_bytes() == b"pr"
    assert Path(hf_hub_download("acme/ops", "dir/c.pt", revision=main2)).read_bytes() == b"lfs-ish"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("acme/ops", "a.txt", revision=main2)

    refs = api.list_repo_refs("acme/ops", include_pull_requests=True)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": main2, "exp": exp}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("release", main1)]
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    commits = api.list_repo_commits("acme/ops")
    assert [c.commit_id for c in commits][:2] == [main2, main1]
    assert commits[0].title == "reshuffle"
    tree = {f.path: f for f in api.list_repo_tree("acme/ops", recursive=True)}
    assert set(tree) == {".gitattributes", "dir", "dir/b.txt", "dir/c.pt"}
    assert tree["dir/c.pt"].lfs is not None and tree["dir/b.txt"].lfs is None
    info = api.model_info("acme/ops", files_metadata=True)
    assert info.sha == main2 and {s.rfilename for s in info.siblings} == {".gitattributes", "dir/b.txt", "dir/c.pt"}
    assert [p.path for p in api.get_paths_info("acme/ops", ["dir/b.txt", "missing"])] == ["dir/b.txt"]
    api.delete_branch("acme/ops", branch="exp")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("acme/ops", "a.txt", revision="exp", force_download=True)
    api.delete_repo("acme/ops")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/ops")
    assert local_hub.tokens == ["hf_x"]


def test_token_sent_only_when_given(local_hub):
    _seed(local_hub)
    hf_hub_download(REPO, "config.json")
    assert local_hub.tokens == []  # no implicit token: HF_TOKEN unset, token file in the temp HF_HOME
    assert all("authorization" not in r.headers for r in local_hub.requests)
    local_hub.clear_requests()
    hf_hub_download(REPO, "config.json", token="hf_download_token", force_download=True)
    assert local_hub.tokens == ["hf_download_token"]
    assert {r.method for r in local_hub.requests} == {"HEAD", "GET"}


def test_private_repo_and_required_token(local_hub, tmp_path, monkeypatch):
    local_hub.create_repo("acme/secret", private=True)
    local_hub.commit("acme/secret", {"x.txt": b"x"})
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/secret", "x.txt")
    assert Path(hf_hub_download("acme/secret", "x.txt", token="anything")).read_bytes() == b"x"

    with LocalHub(required_token="hf_right") as hub:
        configure_client(monkeypatch, hub.url, tmp_path / "home2")
        hub.commit("acme/m", {"x.txt": b"y"})
        with pytest.raises(huggingface_hub.errors.HfHubHTTPError) as exc:
            hf_hub_download("acme/m", "x.txt", token="hf_wrong")
        assert exc.value.response.status_code == 401
        assert Path(hf_hub_download("acme/m", "x.txt", token="hf_right")).read_bytes() == b"y"
        huggingface_hub.close_session()


def test_regular_upload_mode_works_with_xet_enabled(tmp_path, monkeypatch):
    """Answering "regular" to preupload keeps every file inline: no LFS, no Xet, even if hf_xet is usable."""
    with LocalHub(upload_mode="regular") as hub:
        configure_client(monkeypatch, hub.url, tmp_path / "home", disable_xet=False)
        assert constants.HF_HUB_DISABLE_XET is False
        api = HfApi(token="hf_t")
        api.create_repo("acme/plain")
        data = save({"w": torch.ones(3)})
        oid = api.upload_file(path_or_fileobj=data, path_in_repo="model.safetensors", repo_id="acme/plain").oid
        assert Path(hf_hub_download("acme/plain", "model.safetensors", revision=oid)).read_bytes() == data
        assert not [r for r in hub.requests if "lfs" in r.path or "xet" in r.path]
        assert not hub.file_entry("acme/plain", "model.safetensors").lfs
        huggingface_hub.close_session()
        assert not hub.errors


def test_server_persists_and_stops_cleanly(tmp_path):
    root = tmp_path / "store"
    with LocalHub(root) as hub:
        sha = hub.commit("acme/keep", {"f.txt": b"kept"})
        port = hub.port
        # An idle keep-alive connection must not block shutdown.
        idle = socket.create_connection(("127.0.0.1", port))
    idle.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert not [t for t in threading.enumerate() if t.name == "LocalHub"]
    assert (root / "repos" / "models" / "acme" / "keep" / "repo.json").is_file()

    with LocalHub(root) as reopened:
        assert reopened.resolve("acme/keep") == sha
        assert reopened.read_file("acme/keep", "f.txt") == b"kept"
    assert root.is_dir()  # a caller-provided root is kept

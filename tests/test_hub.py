"""Checkpoints: save_pretrained / from_pretrained / push_to_hub, shipped models, and every refusal.

Round trips compare with torch.equal (exact): loading copies the same float32 values into the same
modules, and the same CPU ops on the same inputs give bit-identical outputs.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any, Callable, List, Tuple

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import lrnnx_zoo
from lrnnx_zoo import CheckpointError, ModelConfig, SequenceModel, from_pretrained, list_models
from lrnnx_zoo import hub
from lrnnx_zoo.cli import main as cli_main
from lrnnx_zoo.registry import PluginInfo, get_registry

# huggingface_hub streams LFS PUT bodies with httpx2 `data=`, which httpx2 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")

DIGITS = {"name": "digits", "source": "scikit-learn bundled", "split": {"seed": 0, "n_train": 1437, "n_test": 360}}
META = dict(task="sequence-classification", dataset=DIGITS, metrics={"test_accuracy": 0.97, "test_loss": 0.12},
            command="lrnnx-zoo train digits --family s4d --seed 0")


def tiny(layer: str = "s4d", seed: int = 0, **kw) -> SequenceModel:
    """A small model on ``layer``; passes d_state only if the layer takes it. No l_max: a kernel cut to
    l_max taps cannot stream (fftconv refuses to), and the round trips compare streaming too."""
    params = inspect.signature(get_registry().get_layer(layer).__init__).parameters
    layer_kwargs = {"d_state": 4} if "d_state" in params else {}
    torch.manual_seed(seed)
    cfg = dict(layer=layer, d_input=3, d_output=2, d_model=8, n_layers=2, layer_kwargs=layer_kwargs)
    return SequenceModel(ModelConfig(**{**cfg, **kw})).eval()


def assert_same_outputs(a: SequenceModel, b: SequenceModel, steps: bool = False) -> None:
    x = torch.randn(2, 12, a.config.d_input, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        if steps and not b.bidirectional:  # streaming reads the loaded parameters and buffers too
            ca, cb = a.allocate_inference_cache(2), b.allocate_inference_cache(2)
            for t in range(x.shape[1]):
                assert torch.equal(a.step(x[:, t], ca)[0], b.step(x[:, t], cb)[0])


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", lrnnx_zoo.list_layers())
def test_round_trip_every_registered_layer(layer, tmp_path):
    model = tiny(layer)
    folder = model.save_pretrained(tmp_path / layer, **META)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = from_pretrained(folder)
    assert isinstance(loaded, SequenceModel) and not loaded.training
    assert_same_outputs(model, loaded, steps=True)
    info = loaded.checkpoint_info
    assert info["family"] == layer and info["metrics"] == META["metrics"]
    assert info["source"] == {"type": "local", "path": str(folder.resolve())}


def test_round_trip_backbone_with_pooling_and_buffers(tmp_path):
    model = tiny("s4d", pooling="mean", norm="batch", post="linear")
    model.train()
    model(torch.randn(4, 16, 3))  # move BatchNorm running statistics away from their init
    model.eval()
    loaded = SequenceModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert torch.equal(loaded.blocks[0].norm.running_mean, model.blocks[0].norm.running_mean)
    assert_same_outputs(model, loaded, steps=True)


def test_config_json_and_model_card_layout(tmp_path):
    from huggingface_hub import ModelCard

    folder = tiny("s4d").save_pretrained(tmp_path / "digits-s4d", notes="tiny test model", **META)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["library"] == "lrnnx-zoo"
    assert cfg["library_version"] == lrnnx_zoo.__version__ and cfg["family"] == "s4d"
    assert cfg["plugin"] == {"name": "s4d", "distribution": "lrnnx-zoo", "version": lrnnx_zoo.__version__}
    assert cfg["model"] == tiny("s4d").config.to_dict()
    assert (cfg["task"], cfg["dataset"], cfg["metrics"]) == (META["task"], DIGITS, META["metrics"])
    assert load_file(folder / "model.safetensors").keys() == tiny("s4d").state_dict().keys()

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "lrnnx-zoo" and card.data.datasets == ["digits"]
    assert {"s4d", "state-space-model"} <= set(card.data.tags)
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == META["metrics"]
    for text in ("## Task", "## Data and split", "n_train = 1437", "## Metrics", "| test_accuracy | 0.9700 |",
                 # a local save loads by its path (the bare name is the shipped model's)
                 META["command"], f'lrnnx_zoo.from_pretrained("{tmp_path / "digits-s4d"}")',
                 f"lrnnx-zoo export {tmp_path / 'digits-s4d'} --format onnx --out DIR", "tiny test model"):
        assert text in card.text, text



def test_card_metric_table_says_which_split_each_metric_comes_from(tmp_path):
    from huggingface_hub import ModelCard
    from lrnnx_zoo.hub_card import metric_split

    folder = tiny("s4d").save_pretrained(tmp_path / "digits", **META)
    card = ModelCard.load(folder / "README.md")
    assert "| metric | value | split |" in card.text and "| test_accuracy | 0.9700 | test (360 examples) |" in card.text
    assert {r.metric_type: r.dataset_split for r in card.data.eval_results} == {"test_accuracy": "test",
                                                                                "test_loss": "test"}
    sunspots = {"name": "sunspots", "split": {"train": {"indices": [0, 9], "dates": ["1749-01", "1749-10"]},
                                              "val": {"indices": [10, 19], "dates": ["1749-11", "1750-08"]},
                                              "test": {"indices": [20, 29], "dates": ["1750-09", "1751-06"]}}}
    metrics = {"test_mse": 0.2, "naive_test_mse": 0.25, "val_mse": 0.3, "train_loss": 0.1, "flops": 1e6}
    folder = tiny("s4d").save_pretrained(tmp_path / "sunspots", task="time-series-forecasting", dataset=sunspots,
                                         metrics=metrics)
    card = ModelCard.load(folder / "README.md")
    for row in ("| test_mse | 0.2000 | test (1750-09 to 1751-06) |",
                "| naive_test_mse | 0.2500 | test (1750-09 to 1751-06) |",   # was not seen as a test metric
                "| val_mse | 0.3000 | validation (1749-11 to 1750-08) |",
                "| train_loss | 0.1000 | train (1749-01 to 1749-10) |", "| flops | 1000000.0000 | not recorded |"):
        assert row in card.text, row
    assert {r.metric_type: r.dataset_split for r in card.data.eval_results} == {
        "test_mse": "test", "naive_test_mse": "test", "val_mse": "validation", "train_loss": "train", "flops": None}
    assert [metric_split(n) for n in ("validation-accuracy", "dev_f1", "latest_loss", "train_test_gap")] == [
        "validation", "validation", None, None]

# -- the Hub, through the real huggingface_hub client against LocalHub -------------------------
def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}



def test_offline_miss_of_a_mistyped_name_names_the_shipped_model(tmp_path):
    # Offline, a typo of a shipped name only said it was not in the Hub cache, as if it were a
    # Hub repo the user had forgotten to download.
    with pytest.raises(CheckpointError, match=r"no checkpoint 'digits-s4dd': it is not an existing folder, not a "
                                              r"shipped model \(did you mean 'digits-s4d'\?\)"):
        from_pretrained("digits-s4dd", local_files_only=True, cache_dir=tmp_path)

def test_hub_download_revisions_offline_and_cache(local_hub, tmp_path):
    v1, v2 = tiny("s4d", seed=1), tiny("s4d", seed=2)
    old = local_hub.commit("acme/tiny-s4d", _files(v1.save_pretrained(tmp_path / "v1")), message="v1")
    new = local_hub.commit("acme/tiny-s4d", _files(v2.save_pretrained(tmp_path / "v2")), message="v2")

    latest = from_pretrained("acme/tiny-s4d")
    assert_same_outputs(v2, latest)
    assert latest.checkpoint_info["source"]["commit"] == new
    older = from_pretrained("acme/tiny-s4d", revision=old)
    assert_same_outputs(v1, older)
    assert older.checkpoint_info["source"] == {**older.checkpoint_info["source"], "type": "hub",
                                               "repo_id": "acme/tiny-s4d", "revision": old, "commit": old}

    local_hub.clear_requests()
    with local_hub.offline():  # HF_HUB_OFFLINE: served from the cache, no request
        assert_same_outputs(v2, from_pretrained("acme/tiny-s4d"))
        assert_same_outputs(v1, from_pretrained("acme/tiny-s4d", revision=old))
        with pytest.raises(CheckpointError, match=r"not in the Hub cache at revision main, which offline mode \(HF_HUB_OFFLINE\)"):
            from_pretrained("acme/never-downloaded")
    assert_same_outputs(v2, from_pretrained("acme/tiny-s4d", local_files_only=True))
    assert local_hub.requests == []
    with pytest.raises(CheckpointError, match="local_files_only=True forbids"):
        from_pretrained("acme/tiny-s4d", revision="f" * 40, local_files_only=True)
    with pytest.raises(CheckpointError, match="has no revision 'nope'"):
        from_pretrained("acme/tiny-s4d", revision="nope")
    with pytest.raises(CheckpointError, match="has no such repo"):
        from_pretrained("acme/missing")


def _weights_requests(hub_server, repo_id: str) -> list:
    return [(r.method, r.path) for r in hub_server.requests
            if r.path.startswith(f"/{repo_id}/") and r.path.endswith("/model.safetensors")]


def test_a_foreign_hub_repo_is_refused_before_its_weights_are_downloaded(local_hub, tmp_path):
    # Another library's repo (a transformers model: config.json + model.safetensors) had its weights
    # downloaded in full (hundreds of MB on the real Hub) before its config.json was found not to be
    # an lrnnx-zoo config. Now config.json comes first, and the weights are never asked for.
    weights = {"embeddings.weight": torch.zeros(1024, 1024)}          # 4 MB stands in for the real size
    local_hub.commit("acme/bert-like", {"config.json": json.dumps({"model_type": "bert", "hidden_size": 768}),
                                        "model.safetensors": save(weights), "README.md": "# a BERT"})
    with pytest.raises(CheckpointError, match=r"config.json is not an lrnnx-zoo config \(no 'library' field, "
                                              r"expected 'lrnnx-zoo'\)"):
        from_pretrained("acme/bert-like")
    assert _weights_requests(local_hub, "acme/bert-like") == []
    assert not list((tmp_path / "hf-home" / "hub").rglob("model.safetensors"))


@pytest.mark.parametrize("where", ["etag", "sha"])
def test_ids_that_would_become_paths_outside_the_cache_are_refused(local_hub, tmp_path, monkeypatch, where):
    # huggingface_hub writes blobs and refs at paths built from the server's ETag and commit id: an
    # endpoint answering "../../../../ESCAPED" (a mirror, a proxy) had a file of its choosing written
    # outside the cache, and the model loaded (an audit). Such answers are refused before any write.
    import hub_server
    evil = "../../../../ESCAPED"
    if where == "etag":
        send = hub_server._Router._send_object

        def evil_send(self, sha256, size, headers):
            if "config.json" in self.h.path:
                headers = {**headers, "ETag": f'"{evil}"'}
                headers.pop("X-Linked-Etag", None)
            return send(self, sha256, size, headers)
        monkeypatch.setattr(hub_server._Router, "_send_object", evil_send)
    else:
        send_json = hub_server._Handler._send_json

        def evil_json(self, data, *args, **kwargs):
            if isinstance(data, dict) and "sha" in data and "siblings" in data:
                data = {**data, "sha": evil}
            return send_json(self, data, *args, **kwargs)
        monkeypatch.setattr(hub_server._Handler, "_send_json", evil_json)
    local_hub.commit("acme/tiny", _files(tiny("s4d").save_pretrained(tmp_path / "m")))
    with pytest.raises(CheckpointError, match=rf"answered ids that are not plain ids \({where}: .*ESCAPED"):
        from_pretrained("acme/tiny")
    assert not [p for p in tmp_path.rglob("ESCAPED*")]


def _trickle(monkeypatch, name: str, head: int, gap: float, chunk: int = 1) -> None:
    """Make the local Hub send ``name``'s first ``head`` bytes, then ``chunk`` bytes every ``gap`` seconds."""
    import time

    import hub_server
    send = hub_server._Router._send_object

    def trickle(self, sha256, size, headers):
        if name not in self.h.path or self.method != "GET":
            return send(self, sha256, size, headers)
        self.h._send(200, b"", headers, "application/octet-stream", length=size)
        data = Path(self.hub._object_path(sha256)).read_bytes()
        self.h.wfile.write(data[:head])
        for i in range(head, size, chunk):
            time.sleep(gap)
            self.h.wfile.write(data[i:i + chunk])
            self.h.wfile.flush()
    monkeypatch.setattr(hub_server._Router, "_send_object", trickle)


def test_a_server_that_trickles_a_file_is_cut_off(local_hub, tmp_path, monkeypatch):
    # httpx's timeouts bound each wait for the next bytes, so a server sending a byte every few
    # seconds held from_pretrained for as long as it liked (session 23's hostile-Hub audit).
    import time
    from huggingface_hub.utils import get_session
    local_hub.commit("acme/tiny", _files(tiny("s4d").save_pretrained(tmp_path / "m")))
    _trickle(monkeypatch, "model.safetensors", head=64, gap=0.1)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    answers_before = list(get_session().event_hooks["response"])
    start = time.monotonic()
    with pytest.raises(hub.TrickledDownloadError, match=r"sent 'model.safetensors' at \d+ bytes/s over \d s "
                                                         r"\(\d+ bytes\), behind the 16384 bytes/s a download must "
                                                         r"keep up after 1 s.* LRNNX_ZOO_HUB_MIN_RATE"):
        from_pretrained("acme/tiny")
    assert time.monotonic() - start < 5
    assert get_session().event_hooks["response"] == answers_before   # the hooks are removed again


def test_a_slow_download_that_keeps_up_with_the_floor_completes(local_hub, tmp_path, monkeypatch):
    # Weights of 32-64 KiB at 20 KiB/s after a stall of 0.8 s, with a floor of 16 KiB/s after a 1 s
    # grace: the download runs 2.4-4 s, keeps up with the floor, and completes. A floor on the average
    # since the start (the first version) cut it off: 20 KiB/s over 3 s is below 16 KiB/s over 3.8 s.
    import time

    import hub_server
    model = tiny("s4d", d_model=48)
    local_hub.commit("acme/tiny", _files(model.save_pretrained(tmp_path / "m")))
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert 32 * 1024 < size < 64 * 1024
    _trickle(monkeypatch, "model.safetensors", head=0, gap=0.05, chunk=1024)      # 20 KiB/s
    trickle = hub_server._Router._send_object

    def stall_first(self, sha256, size, headers):
        if "model.safetensors" in self.h.path and self.method == "GET":
            time.sleep(0.8)
        return trickle(self, sha256, size, headers)
    monkeypatch.setattr(hub_server._Router, "_send_object", stall_first)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    start = time.monotonic()
    loaded = from_pretrained("acme/tiny")
    assert time.monotonic() - start > 2.4          # it did run past the grace
    x = torch.randn(1, 8, model.config.d_input)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_a_floor_of_zero_lets_a_trickle_through(local_hub, tmp_path, monkeypatch):
    model = tiny("s4d")
    local_hub.commit("acme/tiny", _files(model.save_pretrained(tmp_path / "m")))
    size = len((tmp_path / "m" / "config.json").read_bytes())
    _trickle(monkeypatch, "config.json", head=size - 6, gap=0.25)     # 1.5 s for the last 6 bytes
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.setenv("LRNNX_ZOO_HUB_MIN_RATE", "0")
    loaded = from_pretrained("acme/tiny")
    x = torch.randn(1, 8, model.config.d_input)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_a_server_that_trickles_its_headers_is_cut_off(local_hub, tmp_path, monkeypatch):
    # Each wait for bytes is bounded, so a server sending an answer's status line and headers a byte
    # every 50 ms (each of several hundred bytes well inside the 1 s timeout) held from_pretrained
    # for about 20 s per request, and there are several; a slower trickle held it for ever. The headers
    # must now be complete 2 x HF_HUB_ETAG_TIMEOUT after the client starts waiting for them.
    import io
    import time

    import hub_server
    from huggingface_hub.utils import get_session
    local_hub.commit("acme/tiny", _files(tiny("s4d").save_pretrained(tmp_path / "m")))
    send = hub_server._Handler._send

    def trickled_headers(self, *args, **kwargs):
        real, self.wfile = self.wfile, io.BytesIO()
        try:
            send(self, *args, **kwargs)
            if hasattr(self, "_headers_buffer") and self._headers_buffer:
                self.flush_headers()
            answer = self.wfile.getvalue()
        finally:
            self.wfile = real
        end = answer.index(b"\r\n\r\n") + 4
        try:
            for i in range(end):
                real.write(answer[i:i + 1])
                real.flush()
                time.sleep(0.05)
            real.write(answer[end:])
        except OSError:             # the client gave up: what the test wants
            pass
    monkeypatch.setattr(hub_server._Handler, "_send", trickled_headers)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    hooks_before = {k: list(v) for k, v in get_session().event_hooks.items()}
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"status line and headers were not complete after 2 s"):
        from_pretrained("acme/tiny")
    assert time.monotonic() - start < 8
    assert {k: list(v) for k, v in get_session().event_hooks.items()} == hooks_before
    # the deadline is this thread's, and ends with the call: a plain request afterwards is not cut
    assert getattr(hub._header_deadline, "at", None) is None


def test_the_header_deadline_starts_at_the_first_wait_for_the_answer():
    # An upload's body may take minutes to send before the answer's headers are awaited: a deadline
    # counted from the request's start would cut every large push. Fake streams, no server: the
    # request hook arms the deadline, the first read starts it, the response hook ends it.
    import time

    class Late(Exception):
        pass

    class Trickle:
        def read(self, max_bytes, timeout=None):
            time.sleep(min(0.2, timeout))
            if timeout < 0.2:
                raise Late("timed out")
            return b"x"

    stream = hub._HeaderDeadlineStream(Trickle(), Late)
    try:
        hub._set_header_deadline(0.5)(None)
        time.sleep(0.6)                     # "uploading": longer than the deadline itself
        assert stream.read(1, timeout=10) == b"x"
        with pytest.raises(Late, match=r"not complete after 0.5 s \(2 x HF_HUB_ETAG_TIMEOUT\)"):
            for _ in range(10):
                stream.read(1, timeout=10)
        hub._clear_header_deadline(None)
        time.sleep(0.05)
        assert stream.read(1, timeout=10) == b"x"      # a body read: no deadline
    finally:
        hub._clear_header_deadline()


def test_hub_min_rate_reads_the_environment(monkeypatch):
    monkeypatch.delenv("LRNNX_ZOO_HUB_MIN_RATE", raising=False)
    assert hub.hub_min_rate() == hub.DEFAULT_HUB_MIN_RATE == 16384
    monkeypatch.setenv("LRNNX_ZOO_HUB_MIN_RATE", "0")
    assert hub.hub_min_rate() == 0
    for bad in ("-1", "nan", "fast"):
        monkeypatch.setenv("LRNNX_ZOO_HUB_MIN_RATE", bad)
        assert hub.hub_min_rate() == hub.DEFAULT_HUB_MIN_RATE


def test_a_download_that_fails_its_size_check_is_not_blamed_on_the_cache(local_hub, tmp_path, monkeypatch):
    # huggingface_hub's consistency check raises an OSError, which was reported as "cannot use the Hub
    # cache at ...; pass cache_dir= a writable folder", the cache being fine (an audit)
    import hub_server
    send = hub_server._Router._send_object

    def short_size(self, sha256, size, headers):
        if "model.safetensors" in self.h.path:
            headers = {**headers, "X-Linked-Size": str(size // 2)}
        return send(self, sha256, size, headers)
    monkeypatch.setattr(hub_server._Router, "_send_object", short_size)
    local_hub.commit("acme/tiny", _files(tiny("s4d").save_pretrained(tmp_path / "m")))
    with pytest.raises(CheckpointError, match=r"(?s)could not download .acme/tiny.: .*Consistency check failed.*nothing "
                                              r"was loaded") as refused:
        from_pretrained("acme/tiny")
    assert "cannot use the Hub cache" not in str(refused.value)


@pytest.mark.parametrize("revision", ["..", ".", "main/..", "./main"])
def test_a_revision_with_dot_segments_is_refused(local_hub, tmp_path, revision):
    # ".." went into the URL, which dropped it: main was loaded and recorded as revision '..' (an audit)
    local_hub.commit("acme/tiny", _files(tiny("s4d").save_pretrained(tmp_path / "m")))
    with pytest.raises(CheckpointError, match=r"has a '.' or '..' segment"):
        from_pretrained("acme/tiny", revision=revision)


def test_oversized_hub_files_are_refused_before_they_are_downloaded(local_hub, tmp_path, monkeypatch):
    # A 400 MB config.json or card, or a 400 MB model.safetensors beside a config of a 5 kB model,
    # was downloaded in full and only then refused (an audit). The repo's file sizes come first; the
    # limits are shrunk here to the test's small files.
    files = _files(tiny("s4d").save_pretrained(tmp_path / "m"))
    local_hub.commit("acme/tiny", files)
    monkeypatch.setattr(hub, "MAX_CONFIG_BYTES", len(files["config.json"]) - 1)
    with pytest.raises(CheckpointError, match=r"'acme/tiny': config.json is .* MB, more than a config holds "
                                              r".*it was not downloaded"):
        from_pretrained("acme/tiny")
    assert not [r for r in local_hub.requests if r.path.endswith("/config.json")]
    monkeypatch.setattr(hub, "MAX_CONFIG_BYTES", 16 << 20)     # (undo() would undo local_hub's settings too)
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights["junk"] = torch.zeros(1 << 18)          # 1 MB the config's model does not have
    local_hub.commit("acme/padded", {**files, "model.safetensors": save(weights)})
    monkeypatch.setattr(hub, "WEIGHTS_HEADER_BYTES", 0)
    with pytest.raises(CheckpointError, match=r"model.safetensors is 1.0\d* MB, more than the weights of its "
                                              r"config's model holds"):
        from_pretrained("acme/padded")
    assert _weights_requests(local_hub, "acme/padded") == []
    monkeypatch.setattr(hub, "WEIGHTS_HEADER_BYTES", 100 << 20)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['junk'\]"):   # within the bound: as before
        from_pretrained("acme/padded")


def test_hub_config_and_weights_come_from_one_commit(local_hub, tmp_path, monkeypatch):
    # config.json is downloaded before the weights; a push to main in between must not pair the old
    # commit's config with the new commit's weights: the second download is pinned to the first's commit.
    import huggingface_hub
    v1, v2 = tiny("s4d", seed=1), tiny("s4d", seed=2, d_model=16)
    old = local_hub.commit("acme/moving", _files(v1.save_pretrained(tmp_path / "v1")), message="v1")
    real, calls = huggingface_hub.snapshot_download, []

    def push_after_first_call(*args, **kwargs):
        folder = real(*args, **kwargs)
        calls.append(kwargs.get("revision"))
        if len(calls) == 1:
            local_hub.commit("acme/moving", _files(v2.save_pretrained(tmp_path / "v2")), message="v2")
        return folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", push_after_first_call)
    loaded = from_pretrained("acme/moving")
    assert calls == [None, old]                           # main, then main's commit as resolved at first
    assert loaded.checkpoint_info["source"]["commit"] == old
    assert_same_outputs(v1, loaded)


def test_push_to_hub_then_download(local_hub, tmp_path):
    """Exercises the real upload protocol (create_repo, preupload, LFS batch + PUT, commit) against
    LocalHub, then downloads through the normal client and compares outputs."""
    model = tiny("lru", pooling="last")
    commit = model.push_to_hub("acme/pushed", commit_message="first push")
    assert sorted(local_hub.list_files("acme/pushed")) == [".gitattributes", "README.md", "config.json",
                                                           "model.safetensors"]
    assert local_hub.file_entry("acme/pushed", "model.safetensors").lfs  # went through git-lfs
    assert commit.oid == local_hub.resolve("acme/pushed")
    loaded = from_pretrained("acme/pushed")
    assert_same_outputs(model, loaded)
    assert 'from_pretrained("acme/pushed")' in local_hub.read_file("acme/pushed", "README.md").decode()

    # metadata travels with save_pretrained(push_to_hub=True), and again when a loaded model is pushed
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="acme/pushed", **META)
    again = from_pretrained("acme/pushed")
    assert again.checkpoint_info["metrics"] == META["metrics"]
    again.push_to_hub("acme/pushed", revision="dev")
    dev = from_pretrained("acme/pushed", revision="dev")
    assert dev.checkpoint_info["metrics"] == META["metrics"]
    assert_same_outputs(model, dev)



def test_a_changed_model_does_not_republish_its_checkpoints_metrics(local_hub, tmp_path):
    # push_to_hub after fine-tuning a loaded checkpoint published the old checkpoint's metrics and
    # command as this model's.
    folder = tiny("s4d").save_pretrained(tmp_path / "ckpt", notes="trained 3 epochs", **META)
    model = from_pretrained(folder)
    model.double().float()                                    # casts that lose nothing change nothing
    same = json.loads((model.save_pretrained(tmp_path / "same") / "config.json").read_text())
    assert same["metrics"] == META["metrics"] and same["command"] == META["command"]

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 5, 3)).square().mean().backward()
    opt.step()                                                 # one fine-tuning step
    model.push_to_hub("acme/tuned")
    tuned = from_pretrained("acme/tuned").checkpoint_info
    assert tuned["metrics"] is None and tuned["command"] is None
    assert (tuned["task"], tuned["dataset"]) == (META["task"], DIGITS)
    assert tuned["notes"] == (
        f"These weights changed (e.g. fine-tuning) after they were loaded from {folder.resolve()}, so that run's "
        "metrics (test_accuracy=0.97, test_loss=0.12), command and notes no longer describe them and were left out; "
        "the task and dataset above are that run's. Pass metrics= (and command=, notes=) to save_pretrained to "
        "record this model's own.")
    card = local_hub.read_file("acme/tuned", "README.md").decode()
    assert "| test_accuracy |" not in card and META["command"] not in card and "were left out" in card
    # what is given is used as given
    mine = model.save_pretrained(tmp_path / "mine", metrics={"test_accuracy": 0.5}, notes="tuned 1 step")
    config = json.loads((mine / "config.json").read_text())
    assert config["metrics"] == {"test_accuracy": 0.5} and config["command"] is None
    assert config["notes"].startswith("tuned 1 step. These weights changed")
    assert "run's command no longer describes them and was left out" in config["notes"]

def test_weights_digest_costs_a_fraction_of_the_float64_one():
    # from_pretrained spent three quarters of its time on the digest (an ~11M-parameter model: 235 ms
    # against 58 ms without): every tensor cast to float64, copied to bytes and hashed with blake2b on
    # one thread (float64_digest below).  Now float32 values are hashed where they lie, SHA-256 on all
    # cores: ~6x less on 2 cores, ~3x on one.
    import hashlib
    import time
    torch.manual_seed(0)
    model = SequenceModel(ModelConfig(layer="s4d", d_input=1, d_output=10, d_model=512, n_layers=5,
                                      layer_kwargs={"d_state": 16})).float()   # whatever the default dtype

    def float64_digest():
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in model.state_dict().items():
            t = tensor.detach().to("cpu", torch.float64)
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    times = {float64_digest: [], hub.weights_digest: []}
    for _ in range(5):                                     # interleaved: both see the same machine load
        for fn in times:
            start = time.perf_counter()
            fn() if fn is float64_digest else fn(model)
            times[fn].append(time.perf_counter() - start)
    new, old = min(times[hub.weights_digest]), min(times[float64_digest])
    assert new < old / 2, (new, old)


def test_weights_digest_sees_values_not_dtypes():
    model = tiny("s4d")
    digest = hub.weights_digest(model)
    assert hub.weights_digest(model.double()) == digest                  # exact casts keep it
    assert hub.weights_digest(model.float().half().float()) != digest       # rounding is a change
    model = tiny("s4d")
    with torch.no_grad():
        weight = model.decoder.weight
        weight.view(-1)[3] = torch.nextafter(weight.view(-1)[3], torch.tensor(9.0))   # one ulp
    assert hub.weights_digest(model) != digest
    half = tiny("s4d").half()
    assert hub.weights_digest(half) == hub.weights_digest(half.float()) == hub.weights_digest(half.double())


# -- refusals ----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    return tiny("s4d").save_pretrained(tmp_path / "ckpt", **META)


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickled_weights_are_refused(saved, name):
    (saved / "model.safetensors").rename(saved / name)
    with pytest.raises(CheckpointError, match=rf"refusing to load {name} in .*: pickled weights .*safetensors"):
        from_pretrained(saved)
    with pytest.raises(CheckpointError, match=rf"refusing to load .*/{name}: pickled weights"):
        from_pretrained(saved / name)


def test_pickled_only_hub_repo_is_refused(local_hub, saved):
    local_hub.commit("acme/pickled", {"config.json": (saved / "config.json").read_bytes(),
                                      "pytorch_model.bin": b"\x80\x04 not really a pickle"})
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin in Hub repo 'acme/pickled' .*pickled weights"
                                              r".*holds: .*config.json, pytorch_model.bin"):
        from_pretrained("acme/pickled")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_safetensors(saved, damage):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        from_pretrained(saved)


def test_missing_and_unexpected_keys_are_listed(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors.pop("decoder.bias")
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['decoder.bias'\]; unexpected keys \['extra.weight'\]"):
        from_pretrained(saved)


def test_shape_disagreeing_with_config_is_listed(saved):
    cfg = json.loads((saved / "config.json").read_text())
    _edit_config(saved, model={**cfg["model"], "d_output": 5})
    with pytest.raises(CheckpointError, match=r"decoder.bias: file \(2,\) vs config \(5,\)"):
        from_pretrained(saved)


def test_unknown_family_names_plugin_and_fix(saved, monkeypatch):
    cfg = json.loads((saved / "config.json").read_text())
    _edit_config(saved, family="s5", model={**cfg["model"], "layer": "s5"},
                 plugin={"name": "s5", "distribution": "lrnnx-s5", "version": "0.3"})
    with pytest.raises(CheckpointError, match=r"'s5' from plugin 's5' \(distribution lrnnx-s5 0.3\).*"
                                              r"pip install lrnnx-s5"):
        from_pretrained(saved)
    # an installed plugin of that name that failed to import is reported as such
    monkeypatch.setitem(get_registry().plugins, "s5", PluginInfo("s5", "s5_mod", error="ImportError: no module x"))
    with pytest.raises(CheckpointError, match=r"Plugin 's5', which is installed but failed to load: ImportError: "
                                              r"no module x \(see `lrnnx-zoo plugins`\)\.$"):
        from_pretrained(saved)
    # loaded, but another plugin registers the same family: said so, not "failed to load"
    monkeypatch.setitem(get_registry().plugins, "s5", PluginInfo("s5", "s5_mod", error="duplicate names: layer 's5' "
                                                                 "is also registered by s5fork"))
    with pytest.raises(CheckpointError, match=r"Plugin 's5', which is loaded, but layer 's5' is also registered by s5fork"):
        from_pretrained(saved)
    monkeypatch.setenv("LRNNX_ZOO_DISABLE_PLUGIN_AUTOLOAD", "1")
    with pytest.raises(CheckpointError, match=r"Note: LRNNX_ZOO_DISABLE_PLUGIN_AUTOLOAD is set"):
        from_pretrained(saved)


def test_newer_format_version_is_refused(saved):
    _edit_config(saved, format_version=2, library_version="9.0")
    with pytest.raises(CheckpointError, match=r"format_version 2 .*reads format_version <= 1.*pip install -U"):
        from_pretrained(saved)


def test_missing_config_lists_files(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no config.json.*holds: README.md, model.safetensors"):
        from_pretrained(saved)


def test_unknown_name_and_file_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not an existing folder, not a shipped model"):
        from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pass its folder"):
        from_pretrained(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="revision='v1' applies to Hub repos"):
        from_pretrained(tmp_path, revision="v1")


# -- atomic save -------------------------------------------------------------------------------
def test_interrupted_save_keeps_old_checkpoint(saved, monkeypatch):
    import safetensors.torch

    before = _files(saved)
    (saved / "notes.txt").write_text("mine")  # a user's file in the folder survives saves

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        tiny("s4d", seed=5).save_pretrained(saved)
    assert _files(saved) == {**before, "notes.txt": b"mine"}
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]  # no temporary folders left
    assert_same_outputs(tiny("s4d"), from_pretrained(saved))

    monkeypatch.undo()
    new = tiny("s4d", seed=5)
    new.save_pretrained(saved)
    assert_same_outputs(new, from_pretrained(saved))
    assert (saved / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


# -- shipped checkpoints, list_models, CLI -----------------------------------------------------
@pytest.fixture
def fake_shipped(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "shipped"
    for name, layer in (("digits-s4d", "s4d"), ("digits-lru", "lru"), ("sine-lru", "lru")):
        tiny(layer).save_pretrained(root / name, **META)
    (root / "__pycache__").mkdir()
    monkeypatch.setattr(hub, "checkpoints_root", lambda: root)
    return root


def test_list_models_wildcards(fake_shipped):
    assert list_models() == ["digits-lru", "digits-s4d", "sine-lru"]
    assert list_models("digits-*") == ["digits-lru", "digits-s4d"]
    assert list_models("*lru") == ["digits-lru", "sine-lru"]
    assert list_models("s4d") == ["digits-s4d"] and list_models("*-s4?") == ["digits-s4d"]   # no wildcard: substring
    loaded = from_pretrained("digits-s4d")
    assert loaded.checkpoint_info["source"]["type"] == "shipped"
    assert_same_outputs(tiny("s4d"), loaded)


def test_cli_models_and_info(fake_shipped, capsys):
    assert cli_main(["models", "digits-*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].split() == ["digits-s4d", "s4d", "sequence-classification",
                                                    "test_accuracy=0.97"]
    assert cli_main(["info", "digits-lru"]) == 0
    out = capsys.readouterr().out
    assert '"family": "lru"' in out and "test_accuracy: 0.97" in out
    assert cli_main(["info", "digits-lru", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["card_metrics"] == META["metrics"]
    assert cli_main(["info", "no/such/thing"]) == 2
    assert "not a valid Hub repo id" in capsys.readouterr().err


def test_checkpoints_package_is_installed():
    root = hub.checkpoints_root()
    assert root is not None and (root / "__init__.py").is_file()


@pytest.mark.parametrize("name", list_models() or [pytest.param("none", marks=pytest.mark.skip("none shipped yet"))])
def test_every_shipped_checkpoint_loads_strictly(name):
    model = from_pretrained(name)
    info = model.checkpoint_info
    assert info["source"]["type"] == "shipped" and info["family"] in lrnnx_zoo.list_layers()
    assert info["metrics"], f"shipped checkpoint {name} records no metrics"
    x = torch.zeros(1, 8, model.config.d_input)
    assert torch.isfinite(model(x)).all()


def test_saved_weights_are_as_readable_as_the_other_files(tmp_path):
    folder = tiny("lru").save_pretrained(tmp_path / "ckpt", **META)
    modes = {f: (Path(folder) / f).stat().st_mode & 0o777 for f in ("config.json", "model.safetensors", "README.md")}
    assert len(set(modes.values())) == 1, modes


# -- bug bash: bounded Hub requests, dtypes, save targets, push ids, typed configs, CLI ---------
def _silent_server():
    """A TCP server that accepts connections and never answers (a hung Hub)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed by the test
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, accepted


def _raised(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as exc:  # handed to the test thread to assert on
        return exc
    return None


def test_unresponsive_hub_gives_up_within_the_timeout(monkeypatch, tmp_path):
    import re
    import threading
    import time
    from huggingface_hub.utils import get_session
    from hub_server import configure_client

    server, accepted = _silent_server()
    try:
        configure_client(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}", tmp_path / "hf-home")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.5")
        hooks_before = list(get_session().event_hooks["request"])
        errors: list = []
        # in a thread, so that a regression fails here instead of hanging the suite
        worker = threading.Thread(target=lambda: errors.append(_raised(from_pretrained, "acme/never-answers")),
                                  daemon=True)
        start = time.monotonic()
        worker.start()
        worker.join(timeout=20)
        assert not worker.is_alive(), "from_pretrained still waits on a Hub that never answers"
        assert time.monotonic() - start < 5
        assert isinstance(errors[0], CheckpointError), errors
        assert re.search(r"could not be reached .*at most 0.5 s", str(errors[0])), errors[0]
        assert accepted, "the request reached the silent server"
        assert get_session().event_hooks["request"] == hooks_before  # our timeout hook is removed again
    finally:
        server.close()
        for conn in accepted:
            conn.close()


def test_hub_timeout_reads_the_environment(monkeypatch):
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    assert hub.hub_timeout() == hub.DEFAULT_HUB_TIMEOUT
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "7")
    assert hub.hub_timeout() == 7
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "not a number")
    assert hub.hub_timeout() == 7
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "3")
    assert hub.hub_timeout() == 3


def _rewrite_weights(folder: Path, convert) -> None:
    tensors = load_file(folder / "model.safetensors")
    save_file({k: convert(v) for k, v in tensors.items()}, folder / "model.safetensors")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_or_bool_weights_are_refused(saved, dtype):
    _rewrite_weights(saved, lambda v: v.to(dtype) if v.is_floating_point() else v)
    with pytest.raises(CheckpointError, match=rf"dtype the model cannot take: .*decoder.bias: file {dtype} "
                                              r"vs model torch.float32"):
        from_pretrained(saved)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_cast_up(saved, dtype):
    _rewrite_weights(saved, lambda v: v.to(dtype) if v.is_floating_point() else v)
    with pytest.warns(hub.WeightsDigestWarning, match="damaged or converted since"):   # rounded: other weights
        model = from_pretrained(saved)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.decoder.bias, tiny("s4d").decoder.bias.to(dtype).float())


def test_float64_model_comes_back_in_float64(tmp_path):
    model = tiny("s4d").double()
    loaded = from_pretrained(model.save_pretrained(tmp_path / "f64"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    x = torch.randn(2, 12, 3, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_save_into_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    real = tiny("s4d").save_pretrained(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    new = tiny("lru")
    new.save_pretrained(link)
    assert link.is_symlink() and json.loads((real / "config.json").read_text())["family"] == "lru"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .real.old-* left behind
    assert_same_outputs(new, from_pretrained(link))


def test_save_over_a_folder_keeps_its_mode(tmp_path):
    import os
    import stat
    folder = tmp_path / "private"
    folder.mkdir()
    os.chmod(folder, 0o700)
    tiny("s4d").save_pretrained(folder)
    tiny("s4d", seed=1).save_pretrained(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700



def test_save_refuses_to_overwrite_an_export_or_another_librarys_folder(tmp_path):
    # The mirror of export refusing a checkpoint folder: saving into an export folder replaced its
    # config.json and README.md, and the export no longer described its graph.
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"kind": "step-graph", "format": "onnx"}))
    (export / "model.onnx").write_bytes(b"graph")
    with pytest.raises(CheckpointError, match=f"save_directory {export} holds an export \\(a step graph written "
                                              "by `lrnnx-zoo export`\\); saving a checkpoint there would overwrite"):
        tiny("s4d").save_pretrained(export)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"library": "transformers"}))
    with pytest.raises(CheckpointError, match="another model's config.json \\(library='transformers', not "
                                              "'lrnnx-zoo'\\).*save into another folder, e.g. "):
        tiny("s4d").save_pretrained(other)
    assert json.loads((export / "config.json").read_text())["kind"] == "step-graph"
    damaged = tiny("s4d").save_pretrained(tmp_path / "damaged")
    (damaged / "config.json").write_text("{not json")       # a damaged checkpoint may be re-saved
    tiny("s4d").save_pretrained(damaged)
    assert from_pretrained(damaged).checkpoint_info["family"] == "s4d"

_READ_ONLY_SAVES = """
import os, sys, torch
from pathlib import Path
from typing import Any, Callable, Tuple
from lrnnx_zoo import ModelConfig, SequenceModel
root = Path(sys.argv[1])
model = SequenceModel(ModelConfig(layer="s4d", d_input=1, d_output=2, d_model=4, n_layers=1, layer_kwargs={"d_state": 2}))
for target in (root / "ro" / "ckpt", root / "ro_parent" / "new"):
    try:
        model.save_pretrained(target)
        print("saved", target)
    except PermissionError as exc:
        print("PermissionError:", exc)
"""


def test_unwritable_folder_or_parent_is_refused_naming_it(tmp_path):
    """Run without the root capability that overrides permissions, as a normal user would."""
    import os
    import shutil
    import subprocess
    import sys
    old = tiny("s4d").save_pretrained(tmp_path / "ro" / "ckpt")
    before = _files(old)
    (tmp_path / "ro_parent").mkdir()
    os.chmod(old, 0o555)
    os.chmod(tmp_path / "ro_parent", 0o555)
    cmd = [sys.executable, "-c", _READ_ONLY_SAVES, str(tmp_path)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be enforced")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    finally:
        os.chmod(old, 0o755)
        os.chmod(tmp_path / "ro_parent", 0o755)
    assert f"PermissionError: cannot save into {old}: the folder is not writable" in out, out
    assert (f"PermissionError: cannot save into {tmp_path / 'ro_parent' / 'new'}: its parent folder "
            f"{tmp_path / 'ro_parent'} is not writable") in out, out
    assert _files(old) == before and sorted(p.name for p in old.parent.iterdir()) == ["ckpt"]
    assert not list((tmp_path / "ro_parent").iterdir())


def test_push_without_namespace_uploads_to_the_created_repo(local_hub, tmp_path):
    model = tiny("lru")
    model.save_pretrained(tmp_path / "my-model", push_to_hub=True, **META)
    assert "model.safetensors" in local_hub.list_files("local-user/my-model")
    assert_same_outputs(model, from_pretrained("local-user/my-model"))
    assert 'from_pretrained("local-user/my-model")' in (tmp_path / "my-model" / "README.md").read_text()
    commit = model.push_to_hub("bare")
    assert commit.oid == local_hub.resolve("local-user/bare")
    from huggingface_hub import hf_hub_download
    card = Path(hf_hub_download("local-user/bare", "README.md", cache_dir=tmp_path / "cache")).read_text()
    assert 'from_pretrained("local-user/bare")' in card       # the card names where the files are


@pytest.mark.parametrize("section, key, value, message", [
    ("model", "layer", 5, r"model.layer must be a str .*got 5 \(int\)"),
    ("top", "plugin", "s4d", r"'plugin' must be a dict .*got 's4d' \(str\)"),
    ("top", "plugin", ["x"], r"'plugin' must be a dict .*got \['x'\] \(list\)"),
    ("top", "family", 3, r"'family' must be a str, got 3 \(int\)"),
    ("kwargs", "d_state", "64", r"layer_kwargs\['d_state'\] must be a positive int, got '64' \(str\)"),
    ("model", "dropout", "0.1", r"dropout must be a float, got '0.1' \(str\)"),
    ("model", "layer_kwargs", None, r"layer_kwargs must be a dict of layer arguments, got None"),
    ("model", "n_layers", True, r"n_layers must be a positive int, got True \(bool\)"),
    ("model", "d_model", 10**9, r"d_model=1000000000.* parameters, more than the 1e\+09"),
    ("top", "format_version", 0, r"format_version must be a positive int, got 0"),
])
def test_badly_typed_config_fields_name_field_type_and_value(saved, section, key, value, message):
    cfg = json.loads((saved / "config.json").read_text())
    where = {"top": cfg, "model": cfg["model"], "kwargs": cfg["model"]["layer_kwargs"]}[section]
    where[key] = value
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(saved)


def test_config_json_that_is_a_folder(saved):
    (saved / "config.json").unlink()
    (saved / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config.json is a folder, expected a JSON file"):
        from_pretrained(saved)


def _fake_export(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"library": "lrnnx-zoo", "kind": "step-graph", "format": "onnx",
                                                    "source": "shipped:digits-lru", "model": {"layer": "lru"}}))
    (folder / "model.onnx").write_bytes(b"onnx")
    return folder


def test_export_folder_is_named_as_such(tmp_path):
    with pytest.raises(CheckpointError, match=r"is an export folder \(onnx step graph .*not a checkpoint.*"
                                              r"from_pretrained\('digits-lru'\)"):
        from_pretrained(_fake_export(tmp_path / "exported"))


def test_local_folder_shadowing_a_shipped_name_says_so(fake_shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_export(tmp_path / "digits-lru")
    with pytest.raises(CheckpointError, match=r"'digits-lru' names both the folder .* shadows the shipped one"
                                              r".*export folder.*from_pretrained\('.*shipped/digits-lru'\)"):
        from_pretrained("digits-lru")
    assert from_pretrained(str(fake_shipped / "digits-lru")).checkpoint_info["family"] == "lru"


def test_unknown_builtin_family_suggests_upgrading(saved):
    cfg = json.loads((saved / "config.json").read_text())
    _edit_config(saved, family="s6", model={**cfg["model"], "layer": "s6"},
                 plugin={"name": "s6", "distribution": "lrnnx-zoo", "version": "9.0"})
    with pytest.raises(CheckpointError, match=r"lrnnx-zoo 9.0 provides it .*pip install -U lrnnx-zoo"):
        from_pretrained(saved)


def test_metrics_of_numpy_tensors_and_non_finite_values_are_plain_json(tmp_path):
    import numpy as np
    metrics = {"test_accuracy": np.float32(0.5), "test_loss": torch.tensor(0.25), "n": np.int64(3),
               "diverged": float("inf"), "per_class": [np.float64(0.75), float("nan")]}
    folder = tiny("s4d").save_pretrained(tmp_path / "m", metrics=metrics)
    text = (folder / "config.json").read_text()
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert strict["metrics"] == {"test_accuracy": 0.5, "test_loss": 0.25, "n": 3, "diverged": None,
                                 "per_class": [0.75, None]}
    with pytest.raises(TypeError, match=r"metrics\['bad'\] must be JSON data .*got tensor"):
        tiny("s4d").save_pretrained(tmp_path / "bad", metrics={"bad": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cli_backends_unknown_kind_lists_known_kinds(capsys):
    assert cli_main(["backends", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend kind 'nope'" in err and "cauchy" in err and "vandermonde" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "digits-tiny"], "the following arguments are required: --out"),
    (["train", "digits-tiny", "--out", "x", "--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["train", "digits-tiny", "--out", "x", "--epochs", "-1"], "--epochs: expected a positive integer, got -1"),
    (["train", "digits-tiny", "--out", "x", "--batch-size", "0"], "--batch-size: expected a positive integer"),
])
def test_cli_train_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_train_checks_out_before_training(tmp_path, capsys, monkeypatch):
    import lrnnx_zoo.training
    monkeypatch.setattr(lrnnx_zoo.training, "train", lambda *a, **k: pytest.fail("trained before checking --out"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert cli_main(["train", "digits-tiny", "--out", str(a_file)]) == 2
    assert f"lrnnx-zoo train: --out {a_file} is a file" in capsys.readouterr().err
    assert cli_main(["train", "digits-tiny", "--out", str(a_file / "sub")]) == 2
    assert f"{a_file} is a file, expected a folder" in capsys.readouterr().err


def test_from_pretrained_refuses_empty_and_non_path_names():
    with pytest.raises(CheckpointError, match="empty name"):
        from_pretrained("")
    for bad in (None, b"digits-lru", 3):
        with pytest.raises(TypeError, match="expects a shipped name, a folder path or a Hub repo id"):
            from_pretrained(bad)


def _refused_endpoint() -> str:
    """A local URL with nothing listening: connections are refused at once."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_publishing_without_a_hub_says_why_and_keeps_the_local_half(monkeypatch, tmp_path):
    # huggingface_hub raised a bare "ConnectError: [Errno 111] Connection refused" from push_to_hub,
    # and save_pretrained(push_to_hub=True) saved nothing locally.
    from hub_server import configure_client
    from lrnnx_zoo.hub_save import HubPublishError
    configure_client(monkeypatch, _refused_endpoint(), tmp_path / "hf-home")
    model = tiny("s4d")
    with pytest.raises(HubPublishError, match=r"could not create 'acme/x' on the Hub at http://127\.0\.0\.1:\d+: "
                                              r"the Hub could not be reached \(ConnectError.*model in memory is unchanged"):
        model.push_to_hub("acme/x")
    with pytest.raises(HubPublishError, match="The checkpoint was saved to .*kept"):
        model.save_pretrained(tmp_path / "kept", push_to_hub=True, repo_id="acme/x", **META)
    assert_same_outputs(model, from_pretrained(tmp_path / "kept"))
    assert from_pretrained(tmp_path / "kept").checkpoint_info["metrics"] == META["metrics"]


def test_an_invalid_repo_id_is_refused_before_anything_is_written(tmp_path):
    # save_pretrained("my model", push_to_hub=True) raised huggingface_hub's HFValidationError from
    # create_repo and wrote nothing, though README says a failed publish still writes DIR; the
    # export CLI ran the whole export first and then failed without saying what was kept.
    with pytest.raises(ValueError, match=r"repo_id \(the folder's name, as none was given\) must be a Hub repo id, "
                                         r"'name' or 'namespace/name'.*got 'my model'"):
        tiny("s4d").save_pretrained(tmp_path / "my model", push_to_hub=True, **META)
    with pytest.raises(ValueError, match=r"repo_id must be a Hub repo id.*got 'a/b/c'"):
        tiny("s4d").save_pretrained(tmp_path / "ok", push_to_hub=True, repo_id="a/b/c", **META)
    assert not (tmp_path / "my model").exists() and not (tmp_path / "ok").exists()


def _failing_upload(monkeypatch, before=lambda: None):
    """Make HfApi.upload_folder (each push's commit) run ``before`` and then fail as an unreachable Hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    def fail(self, **kwargs):
        before()
        raise HTTPError("Connection refused")
    monkeypatch.setattr(HfApi, "upload_folder", fail)


def test_a_failed_first_push_deletes_the_repo_it_created_and_says_so(local_hub, monkeypatch):
    # The push created 'acme/new' and then failed before its commit: the empty repo (public) stayed.
    from lrnnx_zoo.hub_save import HubPublishError
    _failing_upload(monkeypatch)
    with pytest.raises(HubPublishError) as raised:
        tiny("s4d").push_to_hub("acme/new")
    assert str(raised.value).startswith("could not upload to 'acme/new'") and "Connection refused" in str(raised.value)
    assert str(raised.value).endswith("unchanged (save_pretrained(DIR) keeps a local copy). The empty repo "
                                      "'acme/new' this push created was deleted."), raised.value
    assert not local_hub.has_repo("acme/new")


def test_a_failed_push_leaves_a_repo_that_existed_before(local_hub, monkeypatch):
    from huggingface_hub import HfApi
    from lrnnx_zoo.hub_save import HubPublishError
    HfApi().create_repo("acme/old")                 # empty too, but not this push's
    _failing_upload(monkeypatch)
    with pytest.raises(HubPublishError) as raised:
        tiny("s4d").push_to_hub("acme/old")
    assert "repo" not in str(raised.value).split("Connection refused")[-1], raised.value
    assert local_hub.list_files("acme/old") == [".gitattributes"]


def test_a_failed_first_push_keeps_its_repo_once_another_commit_is_in_it(local_hub, monkeypatch):
    # Another process pushed into the new repo meanwhile: its commit must never be deleted.
    from lrnnx_zoo.hub_save import HubPublishError
    _failing_upload(monkeypatch, lambda: local_hub.commit("acme/new", {"theirs.txt": "x"}))
    with pytest.raises(HubPublishError) as raised:
        tiny("s4d").push_to_hub("acme/new")
    assert str(raised.value).endswith("The repo 'acme/new' this push created was kept: it holds commits, files or "
                                      "refs this push did not make."), raised.value
    assert "theirs.txt" in local_hub.list_files("acme/new")


def _create_answered_200(monkeypatch, repo: str) -> None:
    """The local Hub answers the create of ``repo`` with 200 even where it exists (no 409), as a proxy
    or mirror may."""
    import hub_server
    answer_created = hub_server._Router._create_repo

    def create_answering_200(self):
        try:
            answer_created(self)
        except hub_server.HubError:
            self.h._send_json({"url": f"{self.hub.url}/{repo}", "name": repo, "id": repo})
    monkeypatch.setattr(hub_server._Router, "_create_repo", create_answering_200)


def test_a_failed_push_never_deletes_a_one_commit_repo_holding_files(local_hub, monkeypatch):
    # A proxy or mirror answering 200 to the create of a repo that exists (no 409) made it look created;
    # a squashed repo (super_squash_history) has one commit with every branch on it, as a new one does.
    from lrnnx_zoo.hub_save import HubPublishError
    head = local_hub.commit("acme/squashed", {"model.safetensors": "weights"})
    with local_hub._lock:
        local_hub._repos[("model", "acme/squashed")].commits[head].parents.clear()    # its history: one commit
    _create_answered_200(monkeypatch, "acme/squashed")
    _failing_upload(monkeypatch)
    with pytest.raises(HubPublishError) as raised:
        tiny("s4d").push_to_hub("acme/squashed")
    assert "model.safetensors" in local_hub.list_files("acme/squashed"), raised.value
    assert str(raised.value).endswith("The repo 'acme/squashed' this push created was kept: it holds commits, "
                                      "files or refs this push did not make."), raised.value


def test_a_failed_first_push_keeps_its_own_error_where_exceptions_have_no_notes(local_hub, monkeypatch):
    # Python 3.10 (requires-python >= 3.10) has no add_note: the clause on the deleted repo raised
    # AttributeError from the clean-up, in place of the push's own error.
    class NoteLess(RuntimeError):
        def __getattribute__(self, name):
            if name == "add_note":
                raise AttributeError(name)
            return super().__getattribute__(name)
    from huggingface_hub import HfApi

    def fail(self, **kwargs):
        raise NoteLess("the disk is full")
    monkeypatch.setattr(HfApi, "upload_folder", fail)
    with pytest.raises(NoteLess, match="^the disk is full$"):
        tiny("s4d").push_to_hub("acme/new")
    assert not local_hub.has_repo("acme/new")


def test_a_failed_push_never_deletes_an_older_empty_repo_whose_create_was_answered_200(local_hub, monkeypatch):
    # A proxy answering 200 to the create of a repo made an hour ago (empty, but with its settings,
    # collaborators, discussions) made it look created by this push, which then deleted it.
    from lrnnx_zoo.hub_save import HubPublishError
    root = local_hub.create_repo("acme/older", gitattributes=True)
    with local_hub._lock:
        local_hub._repos[("model", "acme/older")].commits[root].date = "2026-01-01T00:00:00.000Z"
    _create_answered_200(monkeypatch, "acme/older")
    _failing_upload(monkeypatch)
    with pytest.raises(HubPublishError) as raised:
        tiny("s4d").push_to_hub("acme/older")
    assert local_hub.has_repo("acme/older"), raised.value
    assert str(raised.value).endswith("this push did not make."), raised.value


def test_a_failed_first_push_whose_repo_cannot_be_deleted_says_how_to(local_hub, monkeypatch):
    import importlib.util
    import hub_server
    from lrnnx_zoo.hub_save import HubPublishError

    def refuse(self):
        raise hub_server.HubError(403, "deleting repos needs a token with the delete scope")
    monkeypatch.setattr(hub_server._Router, "_delete_repo", refuse)
    _failing_upload(monkeypatch)
    with pytest.raises(HubPublishError) as raised:
        tiny("s4d").push_to_hub("acme/new")
    group = "repos" if importlib.util.find_spec("huggingface_hub.cli.repos") else "repo"     # 2.x / 1.x
    assert ("The repo 'acme/new' this push created, empty but for the Hub's .gitattributes, was left (deleting "
            "it failed: HTTP 403: ") in str(raised.value), raised.value
    assert str(raised.value).endswith(f"if it is still empty, delete it with `hf {group} delete acme/new`."), raised.value
    assert "Connection refused" in str(raised.value)                  # the push's own error stays first
    assert local_hub.list_files("acme/new") == [".gitattributes"]


def test_publishing_with_a_rejected_token_says_how_to_log_in(local_hub):
    from lrnnx_zoo.hub_save import HubPublishError
    local_hub.required_token = "the-right-one"
    with pytest.raises(HubPublishError, match=r"could not create 'acme/x'.*HTTP 401.*log in .*token="):
        tiny("s4d").push_to_hub("acme/x", token="a-wrong-one")


def test_failed_push_names_the_folder_it_saved_to(monkeypatch, tmp_path):
    # save_pretrained("~/kept", push_to_hub=True) wrote to $HOME/kept, and the error said the
    # checkpoint was saved to <cwd>/~/kept.
    from hub_server import configure_client
    from lrnnx_zoo.hub_save import HubPublishError
    configure_client(monkeypatch, _refused_endpoint(), tmp_path / "hf-home")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubPublishError) as err:
        tiny("s4d").save_pretrained("~/kept", push_to_hub=True, repo_id="acme/x", **META)
    assert f"The checkpoint was saved to {tmp_path / 'home' / 'kept'}." in str(err.value)
    assert (tmp_path / "home" / "kept" / "model.safetensors").is_file()


# -- hub audit: files that are not what they claim, Hub answers, revisions -----------------------
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_fifo_in_place_of_a_checkpoint_file_is_refused_not_waited_on(saved, name):
    # open() of a FIFO blocks until a writer comes: for model.safetensors inside safetensors, holding
    # the GIL, so that not even Ctrl-C stops it (hence a child process here); a link to /dev/zero as
    # config.json was read until memory ran out.
    import os
    import subprocess
    import sys
    os.unlink(saved / name)
    os.mkfifo(saved / name)
    code = "import sys, lrnnx_zoo; lrnnx_zoo.from_pretrained(sys.argv[1])"
    try:
        done = subprocess.run([sys.executable, "-c", code, str(saved)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"from_pretrained waited on the FIFO {name}")
    assert re.search(rf"CheckpointError: .*{name} is not a regular file .*expected a", done.stderr), done.stderr


def test_a_broken_link_as_weights_is_called_missing_not_corrupt(saved, tmp_path):
    weights = saved / "model.safetensors"
    weights.unlink()
    weights.symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors is a link to .*gone.safetensors, which does not "
                                              r"exist") as err:
        from_pretrained(saved)
    assert "corrupt" not in str(err.value)


@pytest.mark.parametrize("text, what", [
    ('{"library": "lrnnx-zoo", "format_version": 1, "model": {"d_model": ' + "9" * 5000 + "}}", "digits"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested"),
])
def test_config_json_with_a_huge_number_or_deep_nesting_is_a_checkpoint_error(saved, text, what):
    # json.loads raised a bare ValueError (integer string conversion limit) or RecursionError
    (saved / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"config.json is not valid JSON .*{what}"):
        from_pretrained(saved)


def test_a_config_without_model_layer_says_it_is_missing(saved):
    # with 'family' set it said "unknown layer ''; available: ..."
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["model"]["layer"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.layer must be a str \(a registered layer name\), got None"):
        from_pretrained(saved)


@pytest.mark.parametrize("revision, error, message", [
    (5, TypeError, r"revision must be a str .*got 5 \(int\)"),
    ("", CheckpointError, r"revision='' is empty"),
    (" ", CheckpointError, r"revision=' ' is empty"),
])
def test_a_revision_that_is_not_a_name_is_refused(revision, error, message):
    # revision=5 raised huggingface_hub's "expected string or bytes-like object", revision="" an
    # IsADirectoryError on the cache's refs/ folder
    with pytest.raises(error, match=message):
        from_pretrained("acme/anything", revision=revision)


def test_an_incomplete_cached_snapshot_is_not_called_an_incomplete_repo(local_hub, tmp_path):
    # Offline, a cache holding only config.json (hf_hub_download of that one file) was reported as
    # "Hub repo 'acme/part' ... has no model.safetensors", blaming a repo that has it.
    from huggingface_hub import hf_hub_download
    local_hub.commit("acme/part", _files(tiny("s4d").save_pretrained(tmp_path / "a")))
    hf_hub_download("acme/part", "config.json")
    with pytest.raises(CheckpointError, match=r"the Hub cache holds, of 'acme/part' at \w+, only config.json: "
                                              r"model.safetensors was not downloaded.*local_files_only=True forbids"):
        from_pretrained("acme/part", local_files_only=True)
    with local_hub.offline():
        with pytest.raises(CheckpointError, match=r"model.safetensors was not downloaded.*offline mode"):
            from_pretrained("acme/part")
    assert from_pretrained("acme/part").checkpoint_info["family"] == "s4d"     # online it completes the cache


def test_a_private_repo_without_the_right_token_is_a_checkpoint_error(local_hub, tmp_path):
    # the Hub's 401 escaped as huggingface_hub's HfHubHTTPError
    local_hub.commit("acme/private", _files(tiny("s4d").save_pretrained(tmp_path / "a")))
    local_hub.required_token = "the-right-one"
    for token in (None, "a-wrong-one"):
        with pytest.raises(CheckpointError, match=r"the Hub at http://127\.0\.0\.1:\d+ refused access to "
                                                  r"'acme/private' \(HTTP 401.*pass token="):
            from_pretrained("acme/private", token=token)
    assert from_pretrained("acme/private", token="the-right-one").checkpoint_info["family"] == "s4d"


def _status_server(status: int, body: bytes = b'{"error": "the server says no"}', headers: dict = {}):
    """A local Hub endpoint that answers every request with HTTP ``status``, ``body`` and ``headers``."""
    import http.server
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        do_HEAD = do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


HUB = r"the Hub at http://127\.0\.0\.1:\d+ "


@pytest.mark.parametrize("status, headers, answer", [
    (500, {}, HUB + "answered HTTP 500 "), (503, {}, HUB + "answered HTTP 503 "),
    (403, {}, HUB + r"refused access to 'acme/x' \(HTTP 403.*pass token="),
    # a gated repo was called missing ("no such repo"): huggingface_hub's error is a RepositoryNotFoundError
    (403, {"X-Error-Code": "GatedRepo"}, r"Hub repo 'acme/x' is gated: its owners grant access")])
def test_a_hub_that_answers_an_error_status_is_not_called_unreachable(monkeypatch, tmp_path, status, headers, answer):
    from hub_server import configure_client
    server = _status_server(status, headers=headers)
    try:
        configure_client(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "hf-home")
        with pytest.raises(CheckpointError, match=answer) as err:
            from_pretrained("acme/x")
        assert "could not be reached" not in str(err.value) and "no such repo" not in str(err.value)
    finally:
        server.shutdown()
        server.server_close()


def test_a_cache_dir_that_is_a_file_is_named(local_hub, tmp_path):
    # NotADirectoryError from inside huggingface_hub
    local_hub.commit("acme/cached", _files(tiny("s4d").save_pretrained(tmp_path / "a")))
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"cannot use the Hub cache .*a-file.*pass cache_dir= a writable folder"):
        from_pretrained("acme/cached", cache_dir=tmp_path / "a-file")


@pytest.mark.parametrize("kind", ["fifo", "nested"])
def test_saving_over_a_config_json_that_cannot_be_read_replaces_it(tmp_path, kind):
    # save_pretrained peeks at the config.json already there (is it an export, another library's?):
    # a FIFO hung the save, a deeply nested one raised RecursionError
    import os
    import subprocess
    import sys
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if kind == "fifo":
        os.mkfifo(folder / "config.json")
    else:
        (folder / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    code = ("import sys, lrnnx_zoo; lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer='s4d', d_input=3, "
            "d_output=2, d_model=4, n_layers=1)).save_pretrained(sys.argv[1])")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"save_pretrained waited on the {kind} config.json")
    assert done.returncode == 0, done.stderr
    assert from_pretrained(folder).config.d_model == 4


@pytest.mark.parametrize("n_layers,words", [(1, "1 residual block of width"), (3, "3 residual blocks of width")])
def test_card_counts_its_blocks_in_good_english(tmp_path, n_layers, words):
    # a one-block model's card read "1 residual blocks"
    folder = tiny("lru", n_layers=n_layers).save_pretrained(tmp_path / "ck")
    assert words in (folder / "README.md").read_text()


def test_cli_push_publishes_a_trained_folder(local_hub, tmp_path, capsys):
    # `lrnnx-zoo train --out DIR` wrote a checkpoint the CLI could not publish (Python only):
    # `lrnnx-zoo push DIR REPO` uploads it with its card fields, to main or a branch.
    model = tiny("lru", pooling="last")
    folder = model.save_pretrained(tmp_path / "run", **META)
    assert cli_main(["push", str(folder), "acme/from-cli", "--message", "first"]) == 0
    assert "pushed" in capsys.readouterr().out
    loaded = from_pretrained("acme/from-cli")
    assert_same_outputs(model, loaded)
    assert loaded.checkpoint_info["metrics"] == META["metrics"]
    assert 'from_pretrained("acme/from-cli")' in local_hub.read_file("acme/from-cli", "README.md").decode()
    assert cli_main(["push", str(folder), "acme/from-cli", "--branch", "dev"]) == 0
    assert_same_outputs(model, from_pretrained("acme/from-cli", revision="dev"))


def test_cli_push_refuses_before_uploading(local_hub, tmp_path, capsys):
    folder = tiny("s4d").save_pretrained(tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])                        # truncated
    local_hub.clear_requests()
    assert cli_main(["push", str(folder), "acme/broken"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lrnnx-zoo push: ") and "model.safetensors" in err
    assert cli_main(["push", str(tmp_path / "ckpt"), "not a repo"]) == 2
    assert "REPO must be a Hub repo id" in capsys.readouterr().err
    assert cli_main(["push", str(tmp_path / "nowhere"), "acme/x"]) == 2
    assert cli_main(["push", str(folder), "acme/x", "--revision", "v1"]) == 2
    assert "--revision applies to Hub repos" in capsys.readouterr().err
    assert [r for r in local_hub.requests if r.method != "GET"] == []        # nothing created or uploaded


def test_a_refused_push_to_a_new_branch_leaves_no_branch_behind(local_hub):
    # The check for a repo holding another model ran after create_branch: a push to 'dev' of a repo
    # of another library's model was refused, but left the new branch 'dev' on that repo.
    from huggingface_hub import HfApi
    from lrnnx_zoo.hub_save import HubPublishError
    model = tiny("lru")
    HfApi().create_repo("acme/other")
    HfApi().upload_file(path_or_fileobj=b'{"model_type": "bert"}', path_in_repo="config.json", repo_id="acme/other")
    with pytest.raises(HubPublishError, match=r"refusing to upload a checkpoint to 'acme/other@dev'"):
        model.push_to_hub("acme/other", revision="dev")
    assert set(local_hub.branches("acme/other")) == {"main"}
    # an existing branch is checked as it is, a new one as main (where it starts)
    model.push_to_hub("acme/mixed")
    HfApi().create_branch("acme/mixed", branch="bert")
    HfApi().upload_file(path_or_fileobj=b'{"model_type": "bert"}', path_in_repo="config.json",
                        repo_id="acme/mixed", revision="bert")
    with pytest.raises(HubPublishError, match=r"to 'acme/mixed@bert'"):
        model.push_to_hub("acme/mixed", revision="bert")
    model.push_to_hub("acme/mixed", revision="dev")
    assert_same_outputs(model, from_pretrained("acme/mixed", revision="dev"))


def test_cli_push_that_fails_says_the_source_is_unchanged(local_hub, tmp_path, capsys):
    # A refused or failed `lrnnx-zoo push` ended "The model in memory is unchanged (save_pretrained(DIR)
    # keeps a local copy).": push_to_hub's words, about a model the command-line user never had.
    from huggingface_hub import HfApi
    folder = tiny("lru").save_pretrained(tmp_path / "run")
    HfApi().create_repo("acme/other")
    HfApi().upload_file(path_or_fileobj=b'{"model_type": "bert"}', path_in_repo="config.json", repo_id="acme/other")
    assert cli_main(["push", str(folder), "acme/other"]) == 2
    err = capsys.readouterr().err
    assert "refusing to upload" in err and f"{folder} is unchanged." in err and "in memory" not in err, err


def test_export_folder_given_to_a_command_names_its_checkpoint_not_python(tmp_path, capsys):
    # `lrnnx-zoo info EXPORT_DIR` told a shell user to call from_pretrained('digits-lru')
    from lrnnx_zoo.cli import main as cli_main
    assert cli_main(["evaluate", str(_fake_export(tmp_path / "exported"))]) != 0
    err = capsys.readouterr().err
    assert "is an export folder" in err and "digits-lru" in err and "from_pretrained" not in err


def test_cli_info_on_a_hub_repo_downloads_its_config_and_card_not_its_weights(local_hub, tmp_path, capsys):
    # `lrnnx-zoo info org/model` downloaded model.safetensors (GBs for a large model) to print a config
    # and the card's metrics, neither of which needs it.
    from lrnnx_zoo import cli
    local_hub.commit("acme/info-s4d", _files(tiny("s4d", seed=1).save_pretrained(tmp_path / "m")), message="v1")
    local_hub.clear_requests()
    assert cli.main(["info", "acme/info-s4d", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["library"] == "lrnnx-zoo" and shown["config"]["source"]["repo_id"] == "acme/info-s4d"
    assert _weights_requests(local_hub, "acme/info-s4d") == []
    assert any(r.path.endswith("/README.md") for r in local_hub.requests)      # the card was fetched
    assert from_pretrained("acme/info-s4d") is not None                        # loading still fetches them
    assert _weights_requests(local_hub, "acme/info-s4d") != []


# -- session 20's audit ----------------------------------------------------------------------------

def _dropping_server():
    """A local Hub endpoint that reads each request and closes the connection without a word."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn = server.accept()[0]
            except OSError:           # closed by the test
                return
            conn.recv(65536)
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return server


def test_a_hub_that_drops_the_connection_is_a_checkpoint_error(monkeypatch, tmp_path, capsys):
    # httpx's RemoteProtocolError ("Server disconnected without sending a response") escaped as a traceback
    from hub_server import configure_client
    server = _dropping_server()
    try:
        configure_client(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}", tmp_path / "hf-home")
        with pytest.raises(CheckpointError, match=r"could not download 'acme/x': the connection to the Hub at "
                                                  r"http://127\.0\.0\.1:\d+ failed \(.*\); nothing was loaded"):
            from_pretrained("acme/x")
        assert cli_main(["evaluate", "acme/x"]) == 2
        assert "lrnnx-zoo evaluate: could not download 'acme/x'" in capsys.readouterr().err
    finally:
        server.close()


@pytest.mark.parametrize("key", ["pooling", "activation", "norm", "post", "dropout", "d_model"])
def test_a_config_without_a_model_field_is_refused_by_name(tmp_path, key):
    # read as its default, a missing pooling / activation built another model on the same weights
    folder = tiny("s4d", pooling="last").save_pretrained(tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    del config["model"][key]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"the 'model' section lacks {key}, which save_pretrained always "
                                              r"writes; read as the defaults"):
        from_pretrained(folder)


@pytest.mark.parametrize("key, value", [("metrics", "great"), ("metrics", [0.98]), ("command", 5), ("task", 3),
                                        ("notes", ["a"])])
def test_provenance_fields_of_the_wrong_type_are_refused_at_load(tmp_path, key, value):
    # loaded, then evaluate crashed ('str' object has no attribute 'get') and a re-save refused it
    folder = tiny("s4d").save_pretrained(tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"'{key}' must be a"):
        from_pretrained(folder)


def test_the_same_weights_save_to_the_same_bytes(tmp_path):
    # safetensors wrote its metadata in a hash map's order, which changes from process to process
    import hashlib
    import subprocess
    import sys
    code = ("import sys, torch, lrnnx_zoo; torch.manual_seed(0); "
            "lrnnx_zoo.SequenceModel(lrnnx_zoo.ModelConfig(layer='s4d', d_input=1, d_output=2, d_model=4, n_layers=1))"
            ".save_pretrained(sys.argv[1])")
    digests = set()
    for i in range(4):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"ck{i}")], check=True)
        digests.add(hashlib.sha256((tmp_path / f"ck{i}" / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ck0" / "model.safetensors"), "pt") as f:   # still valid, its metadata kept
        assert f.metadata() == {"format": "pt", "library": "lrnnx-zoo", "family": "s4d"}


def test_a_cards_load_and_export_lines_load_this_checkpoint(tmp_path, monkeypatch):
    # A run saved to runs/digits-lru was loaded as "digits-lru" (the shipped model, from anywhere else);
    # a folder with spaces broke the export line; a bidirectional model was offered an export.
    import shlex
    monkeypatch.chdir(tmp_path)
    folder = tiny("s4d").save_pretrained("runs/digits-lru")
    card = (folder / "README.md").read_text()
    assert 'from_pretrained("runs/digits-lru")' in card and "lrnnx-zoo export runs/digits-lru " in card
    assert 'from_pretrained("./bare")' in (tiny("s4d").save_pretrained("bare") / "README.md").read_text()
    spaced = tiny("s4d").save_pretrained(tmp_path / "with space's")
    card = (spaced / "README.md").read_text()
    line = next(l for l in card.splitlines() if l.startswith("lrnnx-zoo export "))
    assert shlex.split(line)[2] == str(tmp_path / "with space's")
    python = next(l for l in card.splitlines() if "from_pretrained(" in l)
    assert eval(python.split("from_pretrained(")[1].split(")")[0]) == str(tmp_path / "with space's")
    bi = tiny("fftconv", layer_kwargs={"d_state": 4, "bidirectional": True}).save_pretrained(tmp_path / "bi")
    card = (bi / "README.md").read_text()
    assert "lrnnx-zoo export" not in card and "the model is bidirectional" in card


def test_a_card_pushed_to_a_branch_loads_that_branch(local_hub, tmp_path):
    local_hub.commit("acme/branchy", _files(tiny("s4d").save_pretrained(tmp_path / "main")))
    tiny("s4d", seed=1).push_to_hub("acme/branchy", revision="dev")
    assert from_pretrained("acme/branchy", revision="dev").checkpoint_info["family"] == "s4d"
    folder, _ = hub.resolve_checkpoint("acme/branchy", revision="dev")
    text = (folder / "README.md").read_text()
    assert 'from_pretrained("acme/branchy", revision="dev")' in text
    assert "lrnnx-zoo export acme/branchy --revision dev --format onnx" in text


def test_info_points_to_the_configs_metrics_when_the_card_cannot_index_them(tmp_path, capsys):
    # without a task and a dataset the card shows its metrics as text only, and info said "none recorded"
    folder = tiny("s4d").save_pretrained(tmp_path / "m", metrics={"val_accuracy": 0.9})
    assert cli_main(["info", str(folder)]) == 0
    assert "none in its model-index (config.json records val_accuracy 0.9," in capsys.readouterr().out


def test_a_damaged_weights_file_is_named_at_load(tmp_path):
    # checkpoints recorded no digest of their weights: a flipped bit loaded silently (outputs 7e-7 off)
    import warnings
    folder = tiny("s4d").save_pretrained(tmp_path / "ck")
    recorded = json.loads((folder / "config.json").read_text())[hub.STATE_DIGEST_KEY]
    assert recorded == hub.state_digest(load_file(folder / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # an intact checkpoint loads without a word
        from_pretrained(folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0x01                                          # one bit of the last tensor's data
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(hub.WeightsDigestWarning, match=rf"its weights differ from those its config.json records "
                                                      rf"saving \(weights_file_digest {recorded}, the file's"):
        model = from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # re-saved, it records what it now holds
        from_pretrained(model.save_pretrained(tmp_path / "again"))


@pytest.mark.parametrize("theirs", ["README.md", "model.safetensors"])
def test_a_folder_with_the_users_own_readme_is_not_saved_over(tmp_path, theirs):
    # train(out_dir=...) and save_pretrained replaced a project's README.md with the model card
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / theirs).write_text("# My project notes\n")
    (folder / "data.csv").write_text("1,2\n")
    with pytest.raises(CheckpointError, match=rf"holds {theirs} but no checkpoint's config.json; saving a "
                                              r"checkpoint there would replace it"):
        tiny("s4d").save_pretrained(folder)
    assert (folder / theirs).read_text() == "# My project notes\n" and sorted(p.name for p in folder.iterdir()) == \
        sorted([theirs, "data.csv"])
    saved = tiny("s4d").save_pretrained(tmp_path / "ck")          # a checkpoint's own card is replaced, as before
    tiny("s4d", seed=1).save_pretrained(saved)


def test_a_custom_hub_client_loads(local_hub, tmp_path, monkeypatch):
    # huggingface_hub lets a user plug in their own client class (set_client_factory, e.g. for a
    # corporate proxy); the trickle guard looked for SyncByteStream in that class's module and
    # failed every load before any request (review of this session's guard).
    import types

    import httpx2
    from huggingface_hub.utils import get_session, set_client_factory
    corp = types.ModuleType("corpnet")
    corp.ProxyClient = type("ProxyClient", (httpx2.Client,), {"__module__": "corpnet"})
    monkeypatch.setitem(__import__("sys").modules, "corpnet", corp)
    model = tiny("s4d")
    local_hub.commit("acme/tiny", _files(model.save_pretrained(tmp_path / "m")))
    from huggingface_hub.utils import _http
    original = _http._GLOBAL_CLIENT_FACTORY
    set_client_factory(lambda: corp.ProxyClient(follow_redirects=True))
    try:
        assert type(get_session()).__module__ == "corpnet"
        loaded = from_pretrained("acme/tiny")
    finally:
        set_client_factory(original)
    x = torch.randn(1, 8, model.config.d_input)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize("answer", ["html", "listing"])
def test_answers_no_hub_gives_are_one_checkpoint_error(local_hub, tmp_path, monkeypatch, capsys, answer):
    # Session 28 (a Hub fuzzer): a captive portal's HTML page for every API call escaped as
    # JSONDecodeError ("lrnnx-zoo info: Expecting value: line 1 column 1"), a tree listing without
    # "path" as KeyError: 'path' (a traceback from `lrnnx-zoo info` and `evaluate`).
    import huggingface_hub
    import hub_server
    from lrnnx_zoo.cli import main as cli_main
    local_hub.commit("acme/tiny", _files(tiny("s4d").save_pretrained(tmp_path / "m")))
    send_json = hub_server._Handler._send_json

    def odd_json(self, data, *args, **kwargs):
        if answer == "html":
            return self._send(200, b"<html>Sign in to the network</html>", None, "text/html")
        if isinstance(data, list):                          # a tree listing
            data = [{k: v for k, v in entry.items() if k != "path"} for entry in data]
        return send_json(self, data, *args, **kwargs)
    monkeypatch.setattr(hub_server._Handler, "_send_json", odd_json)
    if answer == "listing" and int(huggingface_hub.__version__.split(".")[0]) < 2:
        # huggingface_hub 1.x downloads from the repo info's file list and never reads the tree listing
        assert from_pretrained("acme/tiny").config == tiny("s4d").config
        assert cli_main(["info", "acme/tiny"]) == 0
        return
    with pytest.raises(CheckpointError, match=r"could not download 'acme/tiny': the server at .* answered something a "
                                              r"Hub does not send \((JSONDecodeError|KeyError): .*\); nothing was "
                                              r"loaded. Check HF_ENDPOINT"):
        from_pretrained("acme/tiny")
    assert cli_main(["info", "acme/tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "answered something a Hub does not send" in err


def test_a_publish_answered_by_a_non_hub_is_a_hub_publish_error(local_hub, tmp_path, monkeypatch):
    import hub_server
    from lrnnx_zoo.hub_save import HubPublishError

    def portal(self, *args, **kwargs):
        return self._send(200, b"<html>Sign in to the network</html>", None, "text/html")
    monkeypatch.setattr(hub_server._Handler, "_send_json", portal)
    with pytest.raises(HubPublishError, match=r"the server answered something a Hub does not send \(JSONDecodeError"):
        tiny("s4d").push_to_hub("acme/published")


@pytest.mark.parametrize("short_sends", [1, 99])
def test_a_download_shorter_than_the_listing_is_fetched_again_once(local_hub, tmp_path, monkeypatch, short_sends):
    # Session 28 (a Hub fuzzer): weights sent 1000 bytes short with a matching Content-Length passed
    # huggingface_hub's checks and stayed in the cache: every later load failed ("truncated or
    # corrupt"), also after the server was fixed. The repo's listing gives the real size.
    import hub_server
    send = hub_server._Router._send_object
    sent = []

    def short(self, sha256, size, headers):
        if "model.safetensors" in self.h.path and len(sent) < short_sends:
            if self.method == "GET":
                sent.append(1)
            headers = {**headers, "X-Linked-Size": str(size - 1000)}
            return send(self, sha256, size - 1000, headers)
        return send(self, sha256, size, headers)
    monkeypatch.setattr(hub_server._Router, "_send_object", short)
    model = tiny("s4d")
    local_hub.commit("acme/tiny", _files(model.save_pretrained(tmp_path / "m")))
    if short_sends == 1:
        assert_same_outputs(from_pretrained("acme/tiny"), model)
        assert len(sent) == 1
    else:
        with pytest.raises(CheckpointError, match=r"sent files of other sizes than its listing gives, twice "
                                                  r"\(model.safetensors: [\d,]+ bytes, listed as [\d,]+\); nothing was "
                                                  r"loaded"):
            from_pretrained("acme/tiny")
        assert len(sent) == 2


@pytest.mark.parametrize("same_shapes", [True, False])
def test_a_folder_saved_again_while_it_is_read_is_read_again(tmp_path, monkeypatch, same_shapes):
    # The loader reads config.json, the weights' header and the weights in turn. A training run
    # saving into the folder between those reads gave the config of one save and the weights of the
    # next: a "size mismatch" blaming the file, or (a retrained model, same shapes) the new weights
    # under the old config's metrics with a warning that the file was damaged (two processes racing
    # 30 saves and loads: 4 such loads of 60). Now the read is repeated, and only its warnings given.
    import warnings
    first = tiny("s4d", seed=0)
    second = tiny("s4d", seed=1) if same_shapes else tiny("s4d", seed=1, d_model=12)
    first.save_pretrained(tmp_path / "m", **META)
    read_weights, saves = hub._read_weights, []

    def save_in_between(path):
        if not saves:           # the other process's save lands once, between the two reads
            saves.append(second.save_pretrained(tmp_path / "m", **{**META, "notes": "the second save"}))
        return read_weights(path)
    monkeypatch.setattr(hub, "_read_weights", save_in_between)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no WeightsDigestWarning: the read that counts is of one save
        loaded = from_pretrained(tmp_path / "m")
    assert saves and loaded.checkpoint_info["notes"] == "the second save"
    assert_same_outputs(loaded, second)


def test_a_folder_that_keeps_changing_while_it_is_read_is_refused(tmp_path, monkeypatch):
    tiny("s4d", seed=0).save_pretrained(tmp_path / "m", **META)
    read_weights, seeds = hub._read_weights, iter(range(1, 100))

    def save_every_time(path):
        tiny("s4d", seed=next(seeds)).save_pretrained(tmp_path / "m", **META)
        return read_weights(path)
    monkeypatch.setattr(hub, "_read_weights", save_every_time)
    with pytest.raises(CheckpointError, match=r"m changed while it was read, 4 times \(another process saving into "
                                              r"it, e.g. a training run's --out\?\): nothing was loaded"):
        from_pretrained(tmp_path / "m")


def test_a_push_between_the_listing_and_the_download_is_not_taken_for_a_cut_file(local_hub, tmp_path, monkeypatch):
    # from_pretrained lists the repo's file sizes, then downloads config.json and the weights from
    # the commit that download resolved. A push in between compared the new commit's files with the
    # old commit's sizes: refused as "files of other sizes than its listing gives, twice".
    local_hub.commit("acme/tiny", _files(tiny("s4d").save_pretrained(tmp_path / "v1")), message="v1")
    v2 = tiny("s4d", seed=1, d_model=12)
    fetch, pushed = hub._fetch, []

    def push_first(*args, **kwargs):
        if not pushed:
            pushed.append(local_hub.commit("acme/tiny", _files(v2.save_pretrained(tmp_path / "v2")), message="v2"))
        return fetch(*args, **kwargs)
    monkeypatch.setattr(hub, "_fetch", push_first)
    loaded = from_pretrained("acme/tiny")
    assert_same_outputs(loaded, v2)
    assert loaded.checkpoint_info["source"]["commit"] == pushed[0]



def _skip_unless_transfers_run_in_this_thread() -> None:
    """Skip where this huggingface_hub moves files in a pool that :func:`lrnnx_zoo.hub.transfers_in_this_thread`
    cannot reach (another layout of its modules): there a Ctrl-C waits for the file in flight, as before."""
    from lrnnx_zoo.hub import transfers_in_this_thread
    with transfers_in_this_thread() as wrapped:
        if not wrapped:
            pytest.skip("this huggingface_hub's pooled transfer map is not where lrnnx_zoo.hub wraps it")


def _interrupted_while_sending(hub_server, call: Callable[[], Any], started: Any = None,
                               signum: int = 2) -> Tuple[Any, float]:
    """Run ``call`` with a SIGINT (a Ctrl-C) sent to this thread once ``hub_server`` has sent the first
    bytes of a throttled body (or ``started`` is set: ``hub_server.throttled_receiving`` for an upload):
    (what it returned, or the KeyboardInterrupt it raised; seconds it took from the SIGINT to return).
    ``signum``: another signal to send (SIGTERM, SIGHUP: only to a call that handles it, lrnnx-zoo's main)."""
    import signal
    import threading
    import time
    this, sent = threading.get_ident(), []
    started = hub_server.throttled_sending if started is None else started

    def interrupt():
        if started.wait(30):
            sent.append(time.monotonic())
            signal.pthread_kill(this, signum)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)     # even where pytest's runs ignore it
    watcher = threading.Thread(target=interrupt, daemon=True)
    try:
        watcher.start()
        try:
            result = call()
        except KeyboardInterrupt as exc:
            result = exc
        returned = time.monotonic()
        watcher.join(timeout=30)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent, "the throttled file was never asked for"
    return result, returned - sent[0]


def test_ctrl_c_during_a_download_stops_it_at_once_and_a_retry_loads(local_hub, tmp_path, monkeypatch):
    _skip_unless_transfers_run_in_this_thread()
    # snapshot_download fetched the files in a pool of threads, whose shutdown waits for the file in
    # flight: a Ctrl-C while the weights arrived returned once they had all arrived (here 47.5 kB at
    # 2 kB/s: 23 s after the Ctrl-C). Now the download runs in the calling thread and stops at once,
    # leaves no file in the cache, and the next call downloads the weights again.
    model = tiny("s4d", d_model=48)
    local_hub.commit("acme/tiny", _files(model.save_pretrained(tmp_path / "m")))
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    local_hub.throttle("model.safetensors", 2048)
    assert size / 2048 > 20                         # the whole file would take 20 s or more
    monkeypatch.setenv("LRNNX_ZOO_HUB_MIN_RATE", "0")
    raised, seconds = _interrupted_while_sending(local_hub, lambda: from_pretrained("acme/tiny"))
    assert isinstance(raised, KeyboardInterrupt), raised
    assert seconds < 3, f"from_pretrained returned {seconds:.1f} s after the Ctrl-C"
    cache = tmp_path / "hf-home" / "hub"
    from huggingface_hub import __version__ as hub_version
    resumes = int(hub_version.split(".")[0]) < 2    # 1.x keeps <etag>.incomplete to resume from; 2.x deletes it
    left = [p.name for p in cache.rglob("*") if p.is_file() and p.stat().st_size >= size
            or "incomplete" in p.name and not resumes]
    assert left == [], left                         # no weights, whole or (2.x) in part, under any name
    with local_hub.offline(), pytest.raises(CheckpointError, match=r"model.safetensors was not downloaded"):
        from_pretrained("acme/tiny")
    local_hub.throttle("model.safetensors", None)
    loaded = from_pretrained("acme/tiny")
    assert_same_outputs(loaded, model)


def test_ctrl_c_during_a_cli_download_exits_130_with_one_line(local_hub, tmp_path, monkeypatch, capsys):
    _skip_unless_transfers_run_in_this_thread()
    local_hub.commit("acme/tiny", _files(tiny("s4d", d_model=48).save_pretrained(tmp_path / "m")))
    local_hub.throttle("model.safetensors", 2048)
    monkeypatch.setenv("LRNNX_ZOO_HUB_MIN_RATE", "0")
    status, seconds = _interrupted_while_sending(
        local_hub, lambda: cli_main(["export", "acme/tiny", "--out", str(tmp_path / "out")]))
    assert seconds < 3, f"the command returned {seconds:.1f} s after the Ctrl-C"
    err = capsys.readouterr().err
    assert (status, err.splitlines()[-1]) == (130, "lrnnx-zoo export: interrupted") and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def _last_line(err: str) -> str:
    """The last line a terminal shows of ``err``: progress bars end their lines with a carriage return,
    and one below another goes back up with ESC [A."""
    return [line for line in err.replace("\x1b[A", "").splitlines() if line.strip()][-1]


def _export_to_push(local_hub, out: Path) -> List[str]:
    """A TorchScript export of a 48-wide model in ``out`` (1 s), whose two files of 52 and 79 kB the local
    Hub takes as LFS files (a graph of Hub size is one, whatever its name): its file names."""
    from lrnnx_zoo.export import export_folder
    local_hub.lfs_patterns += ("*.ts",)
    return export_folder(tiny("s4d", d_model=48), out, format="torchscript", latency_steps=0).files


def test_ctrl_c_during_an_export_push_stops_it_at_once_commits_nothing_and_a_retry_pushes(local_hub, tmp_path,
                                                                                          monkeypatch):
    _skip_unless_transfers_run_in_this_thread()
    # upload_folder uploaded two or more LFS files (a graph and its weights) with a pool of threads,
    # whose shutdown waited for the files in flight: a Ctrl-C while they went out at 2 kB/s returned
    # 83 s later (the workers retrying on timeouts). Now they go out in the calling thread, which
    # stops at once, before the commit: the repo holds none of them, and the folder is as it was.
    from lrnnx_zoo.export.folder import upload_folder
    out = tmp_path / "out"
    files = _export_to_push(local_hub, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    local_hub.throttle_uploads(2048)                # each of the two would take 25 s or more
    monkeypatch.setenv("LRNNX_ZOO_HUB_MIN_RATE", "0")
    raised, seconds = _interrupted_while_sending(local_hub, lambda: upload_folder(out, "acme/exp", files),
                                                 local_hub.throttled_receiving)
    assert isinstance(raised, KeyboardInterrupt), raised
    assert seconds < 3, f"the push returned {seconds:.1f} s after the Ctrl-C"
    assert str(raised).endswith("; the empty repo 'acme/exp' this push created was deleted"), raised
    assert not local_hub.has_repo("acme/exp")      # created, nothing committed into it: deleted again
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    local_hub.throttle_uploads(None)
    upload_folder(out, "acme/exp", files)
    assert {f: local_hub.read_file("acme/exp", f) for f in files} == {f: before[f] for f in files}


def test_ctrl_c_during_a_cli_export_push_exits_130_with_one_line(local_hub, tmp_path, monkeypatch, capsys):
    _skip_unless_transfers_run_in_this_thread()
    source, out = tmp_path / "m", tmp_path / "out"
    tiny("s4d", d_model=48).save_pretrained(source)
    files = _export_to_push(local_hub, out)         # what the command below writes, to compare with
    local_hub.throttle_uploads(2048)
    monkeypatch.setenv("LRNNX_ZOO_HUB_MIN_RATE", "0")
    status, seconds = _interrupted_while_sending(local_hub, lambda: cli_main(
        ["export", str(source), "--out", str(out), "--format", "torchscript", "--latency-steps", "0",
         "--push-to-hub", "acme/exp"]), local_hub.throttled_receiving)
    assert seconds < 3, f"the command returned {seconds:.1f} s after the Ctrl-C"
    err = capsys.readouterr().err
    assert status == 130 and "Traceback" not in err, err
    assert _last_line(err) == (f"lrnnx-zoo export: interrupted: nothing was committed to 'acme/exp'; the export "
                                    f"is complete in {out}; push it again with huggingface_hub's upload_folder("
                                    f"allow_patterns={files!r}) or `hf upload acme/exp {out} . "
                                    + " ".join(f"--include {f}" for f in files)
                                    + "`; the empty repo 'acme/exp' this push created was deleted"), err
    assert not local_hub.has_repo("acme/exp")
    assert sorted(p.name for p in out.iterdir()) == sorted(files)         # the export itself is complete


def test_ctrl_c_during_a_push_stops_it_at_once_and_says_nothing_was_committed(local_hub, tmp_path, monkeypatch,
                                                                               capsys):
    # A checkpoint's one LFS file (model.safetensors) was uploaded in the calling thread already: this
    # guards that, and the interrupt now says what the repo holds (the CLI's line said "interrupted").
    model = tiny("s4d", d_model=48)
    folder = model.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    local_hub.throttle_uploads(2048)                # 47.5 kB: 23 s
    monkeypatch.setenv("LRNNX_ZOO_HUB_MIN_RATE", "0")
    raised, seconds = _interrupted_while_sending(local_hub, lambda: model.push_to_hub("acme/tiny"),
                                                 local_hub.throttled_receiving)
    assert isinstance(raised, KeyboardInterrupt) and seconds < 3, (raised, seconds)
    assert str(raised) == ("nothing was committed to 'acme/tiny'; the model in memory is unchanged "
                           "(save_pretrained(DIR) keeps a local copy); the empty repo 'acme/tiny' this push "
                           "created was deleted")
    assert not local_hub.has_repo("acme/tiny")
    local_hub.throttled_receiving.clear()
    status, seconds = _interrupted_while_sending(local_hub, lambda: cli_main(["push", str(folder), "acme/tiny"]),
                                                 local_hub.throttled_receiving)
    err = capsys.readouterr().err
    assert (status, seconds < 3, "Traceback" in err) == (130, True, False), (status, seconds, err)
    assert _last_line(err) == ("lrnnx-zoo push: interrupted: nothing was committed to 'acme/tiny'; "
                                    f"the checkpoint {folder} is unchanged; the empty repo 'acme/tiny' this "
                                    "push created was deleted"), err
    assert not local_hub.has_repo("acme/tiny")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    local_hub.throttle_uploads(None)
    model.push_to_hub("acme/tiny")
    assert_same_outputs(from_pretrained("acme/tiny"), model)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_push_terminated_by_a_signal_says_nothing_was_committed(local_hub, tmp_path, monkeypatch, capsys, name):
    # `timeout`, a scheduler's stop or a closed terminal during a push ended with "lrnnx-zoo push:
    # terminated by SIGTERM" alone, where a Ctrl-C said whether anything was committed.
    import signal
    if not hasattr(signal, name):
        pytest.skip(f"no {name} on this platform")
    signum = getattr(signal, name)
    folder = tiny("s4d", d_model=48).save_pretrained(tmp_path / "m")
    local_hub.throttle_uploads(2048)                # 47.5 kB: 23 s
    monkeypatch.setenv("LRNNX_ZOO_HUB_MIN_RATE", "0")
    status, seconds = _interrupted_while_sending(local_hub, lambda: cli_main(["push", str(folder), "acme/tiny"]),
                                                 local_hub.throttled_receiving, signum)
    err = capsys.readouterr().err
    assert (status, seconds < 3, "Traceback" in err) == (128 + signum, True, False), (status, seconds, err)
    assert _last_line(err) == (f"lrnnx-zoo push: terminated by {name}: nothing was committed to 'acme/tiny'; "
                               f"the checkpoint {folder} is unchanged; the empty repo 'acme/tiny' this push "
                               "created was deleted"), err
    assert not local_hub.has_repo("acme/tiny")


def test_ctrl_c_while_the_commit_is_under_way_says_it_may_have_been_made(local_hub, tmp_path):
    # The commit's request is what publishes: interrupted while it was out (here: as its answer came
    # back, the commit made), "nothing was committed" would be wrong.
    from huggingface_hub.utils import get_session

    def interrupt_at_the_commit(response):
        if response.request.method == "POST" and response.request.url.path.endswith("/commit/main"):
            raise KeyboardInterrupt
    answers = get_session().event_hooks["response"]
    answers.append(interrupt_at_the_commit)
    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            tiny().push_to_hub("acme/tiny")
    finally:
        answers.remove(interrupt_at_the_commit)
    assert str(raised.value).startswith("the commit to 'acme/tiny' was under way, and may have been made: see the "
                                        "repo's history; the model in memory is unchanged"), raised.value
    assert "model.safetensors" in local_hub.list_files("acme/tiny")       # here it was made


def test_an_interrupted_push_does_not_take_another_threads_commit_for_its_own(local_hub, tmp_path):
    # huggingface_hub's client is the process's: the note of the commit's request heard every
    # thread's, and a push interrupted before its own commit said "may have been made" when another
    # thread had committed elsewhere meanwhile.
    import threading
    from huggingface_hub import HfApi
    from lrnnx_zoo.hub_save import publishing
    HfApi().create_repo("acme/other")
    with pytest.raises(KeyboardInterrupt) as raised, publishing("upload to", "acme/tiny"):
        other = threading.Thread(target=lambda: HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt",
                                                                    repo_id="acme/other"))
        other.start()
        other.join(30)
        assert "x.txt" in local_hub.list_files("acme/other")          # that commit was made, meanwhile
        raise KeyboardInterrupt
    assert str(raised.value) == "nothing was committed to 'acme/tiny'; nothing was uploaded", raised.value


def _open_bar() -> Any:
    """A tqdm bar drawn (disable=False: the test's stderr is no terminal) into a buffer of its own."""
    import io
    from tqdm import tqdm
    return tqdm(total=10, desc="theirs", file=io.StringIO(), disable=False, mininterval=0)


def test_an_interrupted_push_leaves_another_threads_progress_bar_open(local_hub, tmp_path, monkeypatch):
    # An interrupted push closed every bar opened while it ran (huggingface_hub leaves its bar of the
    # file in flight open): also one an application's other thread had opened meanwhile, whose next
    # updates then drew nothing.
    import threading
    folder = tiny("s4d", d_model=48).save_pretrained(tmp_path / "m")
    local_hub.throttle_uploads(2048)                # 47.5 kB: 23 s
    monkeypatch.setenv("LRNNX_ZOO_HUB_MIN_RATE", "0")
    theirs, opened = [], threading.Event()

    def open_during_the_push():
        if local_hub.throttled_receiving.wait(30):
            theirs.append(_open_bar())
            opened.set()
    other = threading.Thread(target=open_during_the_push, daemon=True)
    other.start()
    try:
        status, _ = _interrupted_while_sending(local_hub, lambda: cli_main(["push", str(folder), "acme/tiny"]),
                                               opened)
        other.join(30)
        assert status == 130 and theirs, (status, theirs)
        bar = theirs[0]
        assert not bar.disable, "the push closed another thread's progress bar"
        bar.update(4)                               # still drawn: its line now says 4 of 10
        assert bar.fp.getvalue().split("\r")[-1].startswith("theirs:  40%"), bar.fp.getvalue()
    finally:
        for bar in theirs:
            bar.close()


def test_an_interrupted_push_closes_the_bars_its_thread_opened(local_hub):
    # ... while the bars the push's own thread opened (huggingface_hub's of the file in flight) are
    # closed, so that what is said next goes on a line of its own (a bar opened in another thread while
    # it ran, another push's, is left open).
    import threading
    from lrnnx_zoo.hub_save import publishing
    before, theirs = _open_bar(), []
    try:
        with pytest.raises(KeyboardInterrupt), publishing("upload to", "acme/tiny"):
            ours = _open_bar()
            other = threading.Thread(target=lambda: theirs.append(_open_bar()))
            other.start()
            other.join(30)
            raise KeyboardInterrupt
        assert (ours.disable, theirs[0].disable, before.disable) == (True, False, False)
    finally:
        for bar in [before, *theirs]:
            bar.close()


def test_an_interrupted_push_whose_client_was_renewed_does_not_say_nothing_was_committed(local_hub, tmp_path):
    # huggingface_hub closes its client on an SSL error and makes a new one, which the note of the
    # commit's request was not on: a commit made through it was reported as "nothing was committed".
    import huggingface_hub
    from huggingface_hub import HfApi
    from lrnnx_zoo.hub_save import publishing
    HfApi().create_repo("acme/tiny")
    with pytest.raises(KeyboardInterrupt) as raised, publishing("upload to", "acme/tiny"):
        huggingface_hub.close_session()                                # as after an SSLError
        HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="acme/tiny")
        raise KeyboardInterrupt
    assert "x.txt" in local_hub.list_files("acme/tiny")                # it was committed
    assert str(raised.value).startswith("whether anything was committed to 'acme/tiny' is not known"), raised.value
